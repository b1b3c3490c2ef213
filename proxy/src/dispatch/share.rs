//! Sharing a worker's threads with other Usher replicas (`proxy_replicas`).
//!
//! Several replicas in front of one fleet must never, together, hold more
//! requests on a worker than it has threads. Two ways to know one's part:
//!
//! - **By load reports** (a worker that sends `X-Usher-Load`): a report says
//!   how many threads were busy when it was made; the ones that are not this
//!   replica's are the others'. While the report is fresh this replica may
//!   use `threads − others`, so a busy replica uses what the quiet ones leave.
//!   A report goes stale after [`REPORT_TTL`]: the others may have grown into
//!   what they left, so the replica falls back to its static share.
//! - **A static split** (a worker that reports nothing, or a stale report):
//!   `floor(threads / replicas)` each, and the remainder to `threads mod
//!   replicas` of the replicas, chosen per backend by the replica's index so
//!   that with distinct indices the shares add up to exactly `threads`.
//!
//! The replica's identity is `USHER_REPLICA_ID`, else the host name (a pod's
//! name in Kubernetes). Its index is the ordinal at the end of the identity
//! (`usher-2`: a StatefulSet pod) when there is one, else a stable hash of
//! the identity: hashed indices may coincide, and then two replicas take the
//! same remainder thread. The startup summary says which it is.

use std::sync::OnceLock;
use std::time::Duration;

/// How long a worker's load report stands for the other replicas' use of it.
/// A report is a snapshot of requests that finish within about one service
/// time; kept longer it only keeps a replica (a quiet one, which sees few
/// responses) away from threads that are free again, and kept much shorter
/// the busy replica falls back to its static split between its own
/// responses. `bench/sharesim.py` swept 5 ms … 1 s (50 ms views, 3×2 and
/// 10×20 replicas × workers, 80% load, uneven traffic): 20 ms had the lowest
/// or within 1% of the lowest p99 in every case but one.
pub const REPORT_TTL: Duration = Duration::from_millis(20);

/// After a worker refused a request for lack of a thread, how long this
/// replica takes that as "every thread not mine is taken" before it tries
/// its static share there again. A refusal costs one round trip; the
/// simulator's sweep (2, 10, 30 ms) found 10 ms best: 2 ms doubles the
/// refusals for little, 30 ms leaves the refused request waiting.
pub const REFUSAL_BACKOFF: Duration = Duration::from_millis(10);

/// This replica's name among the Ushers that share a fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaId {
    pub name: String,
    /// The trailing `-N` of the name, when it has one.
    pub ordinal: Option<u32>,
}

impl ReplicaId {
    /// `USHER_REPLICA_ID`, else the host name, else `usher`.
    pub fn get() -> &'static ReplicaId {
        static ID: OnceLock<ReplicaId> = OnceLock::new();
        ID.get_or_init(|| {
            let name = std::env::var("USHER_REPLICA_ID")
                .ok()
                .filter(|s| !s.trim().is_empty())
                .or_else(|| {
                    std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .ok()
                        .filter(|s| !s.trim().is_empty())
                })
                .unwrap_or_else(|| "usher".to_string());
            ReplicaId::new(name.trim())
        })
    }

    pub fn new(name: &str) -> Self {
        let ordinal = name
            .rsplit_once('-')
            .and_then(|(_, n)| (!n.is_empty() && n.len() <= 9).then_some(n))
            .and_then(|n| n.parse().ok());
        ReplicaId {
            name: name.to_string(),
            ordinal,
        }
    }

    /// The index among `replicas` replicas.
    pub fn index(&self, replicas: u32) -> u32 {
        let p = replicas.max(1);
        match self.ordinal {
            Some(n) => n % p,
            None => (stable_hash(self.name.as_bytes()) % u64::from(p)) as u32,
        }
    }

    /// How the index was found, for the startup summary.
    pub fn describe(&self, replicas: u32) -> String {
        let i = self.index(replicas);
        match self.ordinal {
            Some(_) => format!("replica {} is index {i} of {replicas}", self.name),
            None => format!(
                "replica {} is index {i} of {replicas}, hashed from its name: two replicas may hash alike (name them <anything>-0 … -{} with USHER_REPLICA_ID, or run a StatefulSet, for an exact static split)",
                self.name,
                replicas.saturating_sub(1)
            ),
        }
    }
}

/// FNV-1a: the same on every replica and every build (std's hasher is not
/// promised to be).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// This replica's static share of a backend's `threads`: the floor for
/// everyone, and one more for the `threads mod replicas` indices that follow
/// the backend's own offset (its key's hash), so the remainder lands on
/// different replicas for different backends.
pub fn static_share(threads: u32, replicas: u32, index: u32, backend_hash: u64) -> u32 {
    let p = replicas.max(1);
    let (floor, rest) = (threads / p, threads % p);
    let offset = (backend_hash % u64::from(p)) as u32;
    let slot = (index % p + p - offset) % p;
    floor + u32::from(slot < rest)
}

/// The threads the other replicas were using when a report was made:
/// everything taken on the worker (`busy + queued`, [`Load::taken`]) that
/// was not this replica's. `own` is this replica's requests holding a
/// thread at that moment.
///
/// [`Load::taken`]: crate::health::Load
pub fn others_from_report(taken: usize, own: u32) -> u32 {
    let theirs = taken.saturating_sub(own as usize);
    u32::try_from(theirs).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_indices_share_exactly_the_threads() {
        for threads in 0..20 {
            for replicas in 1..12 {
                for backend in 0..10u64 {
                    let total: u32 = (0..replicas)
                        .map(|i| static_share(threads, replicas, i, backend))
                        .sum();
                    assert_eq!(total, threads, "{threads} threads, {replicas} replicas");
                }
            }
        }
    }

    #[test]
    fn the_remainder_moves_between_backends() {
        // 4 threads, 3 replicas: one replica gets 2 on each backend, and
        // over three backends each replica gets it once.
        let per_replica: Vec<u32> = (0..3)
            .map(|i| (0..3).map(|b| static_share(4, 3, i, b)).sum())
            .collect();
        assert_eq!(per_replica, vec![4, 4, 4]);
        assert_eq!(static_share(4, 3, 0, 0), 2);
        assert_eq!(static_share(4, 3, 1, 0), 1);
    }

    #[test]
    fn fewer_threads_than_replicas_leaves_some_replicas_none() {
        let shares: Vec<u32> = (0..3).map(|i| static_share(2, 3, i, 0)).collect();
        assert_eq!(shares.iter().sum::<u32>(), 2);
        assert!(shares.contains(&0));
    }

    #[test]
    fn identity_ordinals_and_hashes() {
        assert_eq!(ReplicaId::new("usher-2").ordinal, Some(2));
        assert_eq!(ReplicaId::new("usher-2").index(3), 2);
        assert_eq!(ReplicaId::new("usher-7f9c-abcde").ordinal, None);
        assert_eq!(ReplicaId::new("usher").ordinal, None);
        assert_eq!(ReplicaId::new("usher-").ordinal, None);
        let h = ReplicaId::new("usher-7f9c-abcde");
        assert_eq!(h.index(5), h.index(5));
        assert!(h.index(5) < 5);
        assert!(h.describe(5).contains("hashed"));
        // Known value: the hash is the same on every build.
        assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn others_are_what_is_not_ours() {
        assert_eq!(others_from_report(3, 1), 2);
        assert_eq!(others_from_report(3 + 2, 1), 4);
        assert_eq!(others_from_report(1, 3), 0);
    }
}
