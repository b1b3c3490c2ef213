//! DNS discovery: `dns: { name, port, refresh }` re-resolves a name (a
//! Kubernetes headless Service) every `refresh`.
//!
//! New addresses join the upstream (with slow start, if configured);
//! vanished ones are drained: they get no new requests and finish their
//! in-flight ones, whose slots hold them. A failed or empty resolution keeps
//! the last good set, is logged, and is counted in
//! `usher_dns_resolutions_total{result="failure"}`.
//!
//! By default the system resolver is used (what a pod's `/etc/resolv.conf`
//! says). `resolver: ip:port` asks that one DNS server instead, through
//! `hickory-resolver`: A and AAAA, over UDP, and again over TCP when the UDP
//! answer comes back truncated. The TCP retry is what matters here: a large
//! headless Service does not fit in one datagram, and a partial answer would
//! drain every pod that did not fit.
//!
//! For the same reason, a family whose query fails (a timeout, SERVFAIL,
//! REFUSED; not "no such records") keeps that family's addresses from the
//! last set rather than losing them: a failed AAAA query must not drain the
//! IPv6 pods, and must not throw away a good IPv4 answer either (servers that
//! only know A records for a name often refuse AAAA for it).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts, ServerOrderingStrategy,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RecordType;
use hickory_resolver::TokioResolver;
use tokio_util::sync::CancellationToken;

use crate::config::DnsConfig;
use crate::discovery::{Live, SharedAddresses};
use crate::observe::metrics::Metrics;

/// How long one query waits for the server before it is sent again.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// How many times a query is sent before it fails.
const QUERY_ATTEMPTS: usize = 2;

/// Where a name is looked up.
enum Lookup {
    /// The system resolver (`getaddrinfo`, through `tokio::net::lookup_host`).
    System,
    /// The configured DNS server, and nothing else.
    Server(Box<TokioResolver>),
}

/// One resolution, per address family. `Ok(vec![])` is an answer (NXDOMAIN,
/// or no records of that type); `Err` is a query that got no answer.
#[derive(Debug)]
struct Answer {
    v4: Result<Vec<IpAddr>, String>,
    v6: Result<Vec<IpAddr>, String>,
}

impl Lookup {
    fn new(resolver: Option<SocketAddr>) -> Result<Self, String> {
        match resolver {
            None => Ok(Self::System),
            Some(server) => server_resolver(server).map(|r| Self::Server(Box::new(r))),
        }
    }

    async fn resolve(&self, name: &str) -> Answer {
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Answer::from_ips(vec![ip]);
        }
        match self {
            // `getaddrinfo` asks for both families and gives one answer.
            Self::System => match tokio::net::lookup_host((name, 0)).await {
                Ok(addrs) => Answer::from_ips(addrs.map(|a| a.ip()).collect()),
                Err(e) => {
                    let e = format!("cannot resolve `{name}`: {e}");
                    Answer {
                        v4: Err(e.clone()),
                        v6: Err(e),
                    }
                }
            },
            Self::Server(r) => {
                // Nothing is kept between refreshes: every refresh asks the
                // server, so a change is seen on the next one whatever the
                // records' TTL says.
                r.clear_cache();
                // A and AAAA separately rather than `lookup_ip`, which hides
                // one family's failure behind the other family's records.
                let (v4, v6) = tokio::join!(
                    family(r, name, RecordType::A),
                    family(r, name, RecordType::AAAA),
                );
                Answer { v4, v6 }
            }
        }
    }
}

impl Answer {
    fn from_ips(ips: Vec<IpAddr>) -> Self {
        let (v4, v6) = ips.into_iter().partition(IpAddr::is_ipv4);
        Self {
            v4: Ok(v4),
            v6: Ok(v6),
        }
    }

    /// The new address set on `port`: a family that answered gives its
    /// fresh addresses, one whose query failed keeps its addresses from
    /// `prev`. An error only when neither family answered.
    fn merge(self, prev: &[SocketAddr], port: u16) -> Result<Vec<SocketAddr>, String> {
        let kept = |v4: bool| {
            prev.iter()
                .map(SocketAddr::ip)
                .filter(move |ip| ip.is_ipv4() == v4)
        };
        let ips: Vec<IpAddr> = match (self.v4, self.v6) {
            (Err(e4), Err(e6)) if e4 == e6 => return Err(e4),
            (Err(e4), Err(e6)) => return Err(format!("{e4}; {e6}")),
            (Ok(v4), Ok(v6)) => v4.into_iter().chain(v6).collect(),
            (Ok(v4), Err(e)) => {
                tracing::debug!(error = %e, "AAAA query failed; keeping the IPv6 addresses");
                v4.into_iter().chain(kept(false)).collect()
            }
            (Err(e), Ok(v6)) => {
                tracing::debug!(error = %e, "A query failed; keeping the IPv4 addresses");
                kept(true).chain(v6).collect()
            }
        };
        Ok(socket_addrs(ips, port))
    }
}

/// A resolver that asks only `server`: no `/etc/hosts`, no search domains,
/// no cache across refreshes, UDP with TCP on truncation.
fn server_resolver(server: SocketAddr) -> Result<TokioResolver, String> {
    let mut ns = NameServerConfig::udp_and_tcp(server.ip());
    for c in &mut ns.connections {
        c.port = server.port();
    }
    let config = ResolverConfig::from_parts(None, vec![], vec![ns]);
    let mut opts = ResolverOpts::default();
    opts.timeout = QUERY_TIMEOUT;
    opts.attempts = QUERY_ATTEMPTS;
    opts.cache_size = 0;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.server_ordering_strategy = ServerOrderingStrategy::UserProvidedOrder;
    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| format!("cannot set up a resolver for {server}: {e}"))
}

/// The addresses of one record type. NXDOMAIN and an empty answer are an
/// answer (no addresses), not a failure.
async fn family(r: &TokioResolver, name: &str, rtype: RecordType) -> Result<Vec<IpAddr>, String> {
    match r.lookup(name, rtype).await {
        Ok(l) => Ok(l
            .answers()
            .iter()
            .filter(|rec| rec.record_type() == rtype)
            .filter_map(|rec| rec.data.ip_addr())
            .collect()),
        Err(e) if e.is_no_records_found() => Ok(Vec::new()),
        Err(e) => Err(format!("cannot resolve `{name}` ({rtype}): {e}")),
    }
}

/// `ips` on `port`, sorted and without duplicates.
fn socket_addrs(ips: impl IntoIterator<Item = IpAddr>, port: u16) -> Vec<SocketAddr> {
    let mut addrs: Vec<SocketAddr> = ips
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

/// Re-resolves one upstream's name every `refresh` until `cancel` fires, and
/// publishes changes to `live`.
pub async fn run(
    upstream: String,
    cfg: DnsConfig,
    live: Arc<dyn Live>,
    discovered: SharedAddresses,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    // Built once and reused; built again on the next refresh if it failed.
    let mut lookup: Option<Lookup> = None;
    loop {
        let answer = match &lookup {
            Some(l) => Ok(l.resolve(&cfg.name).await),
            None => match Lookup::new(cfg.resolver) {
                Ok(l) => Ok(lookup.insert(l).resolve(&cfg.name).await),
                Err(e) => Err(e),
            },
        };
        let result = answer.and_then(|a| {
            let prev = discovered.lock().unwrap().get(&upstream).cloned();
            a.merge(prev.as_deref().unwrap_or_default(), cfg.port)
        });
        let ok = matches!(&result, Ok(a) if !a.is_empty());
        metrics
            .dns_resolutions
            .with_label_values(&[upstream.as_str(), if ok { "success" } else { "failure" }])
            .inc();
        match result {
            Ok(addrs) if !addrs.is_empty() => {
                let changed = {
                    let mut d = discovered.lock().unwrap();
                    let prev = d.insert(upstream.clone(), addrs.clone());
                    prev.as_ref() != Some(&addrs)
                };
                if changed {
                    tracing::info!(%upstream, name = %cfg.name, ?addrs, "DNS discovery: backend set changed");
                    live.publish(&upstream, &addrs, cfg.max_in_flight.fixed());
                }
            }
            Ok(_) => {
                tracing::warn!(%upstream, name = %cfg.name, "DNS name has no addresses; keeping the last good set")
            }
            Err(e) => {
                tracing::warn!(%upstream, error = %e, "DNS resolution failed; keeping the last good set")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(cfg.refresh.0) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hickory_resolver::proto::op::{Message, Query, ResponseCode};
    use hickory_resolver::proto::rr::{RData, Record};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, UdpSocket};

    use super::*;

    /// What the fake server answers for one question.
    type Respond = fn(&Query) -> Result<Vec<IpAddr>, ResponseCode>;

    /// A DNS server on a loopback port, UDP and TCP, answering with `answer`.
    /// Over UDP it behaves like a server without EDNS: an answer longer than
    /// 512 bytes goes out truncated (TC bit, no records).
    struct FakeDns {
        addr: SocketAddr,
        tcp_queries: Arc<AtomicUsize>,
    }

    fn reply(query: &[u8], answer: Respond) -> Vec<u8> {
        let req = Message::from_vec(query).unwrap();
        let q = req.queries[0].clone();
        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        resp.add_query(q.clone());
        match answer(&q) {
            Ok(ips) => {
                for ip in ips {
                    let rdata = RData::from(ip);
                    if rdata.record_type() == q.query_type() {
                        resp.add_answer(Record::from_rdata(q.name.clone(), 0, rdata));
                    }
                }
            }
            Err(code) => resp.metadata.response_code = code,
        }
        resp.to_vec().unwrap()
    }

    async fn fake_dns(answer: Respond) -> FakeDns {
        // UDP and TCP on the same port number, as a real server has.
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            loop {
                let (n, from) = udp.recv_from(&mut buf).await.unwrap();
                let mut out = reply(&buf[..n], answer);
                if out.len() > 512 {
                    let full = Message::from_vec(&out).unwrap();
                    out = full.truncate().to_vec().unwrap();
                }
                udp.send_to(&out, from).await.unwrap();
            }
        });
        let tcp_queries = Arc::new(AtomicUsize::new(0));
        let counted = tcp_queries.clone();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = tcp.accept().await.unwrap();
                let counted = counted.clone();
                tokio::spawn(async move {
                    // Each message is preceded by its length (RFC 1035 4.2.2).
                    while let Ok(len) = conn.read_u16().await {
                        let mut q = vec![0u8; usize::from(len)];
                        if conn.read_exact(&mut q).await.is_err() {
                            return;
                        }
                        counted.fetch_add(1, Ordering::SeqCst);
                        let out = reply(&q, answer);
                        let _ = conn.write_u16(out.len() as u16).await;
                        let _ = conn.write_all(&out).await;
                    }
                });
            }
        });
        FakeDns { addr, tcp_queries }
    }

    /// 100 pods on IPv4 (about 1.6 KB of answer, past 512 bytes) and one on
    /// IPv6, for `pods.test`; NXDOMAIN for anything else.
    fn hundred_pods(q: &Query) -> Result<Vec<IpAddr>, ResponseCode> {
        if q.name.to_ascii() != "pods.test." {
            return Err(ResponseCode::NXDomain);
        }
        let mut ips: Vec<IpAddr> = (1..=100)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 1, i)))
            .collect();
        ips.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
        Ok(ips)
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[tokio::test]
    async fn a_truncated_answer_is_asked_again_over_tcp_and_aaaa_counts() {
        let dns = fake_dns(hundred_pods).await;
        let lookup = Lookup::new(Some(dns.addr)).unwrap();
        let got = lookup.resolve("pods.test").await.merge(&[], 8080).unwrap();
        assert_eq!(got.len(), 101, "every pod, not the ones that fit in UDP");
        assert_eq!(got[0], "10.0.1.1:8080".parse().unwrap());
        assert_eq!(got[99], "10.0.1.100:8080".parse().unwrap());
        assert_eq!(got[100], "[::1]:8080".parse().unwrap());
        assert!(dns.tcp_queries.load(Ordering::SeqCst) >= 1);
    }

    #[tokio::test]
    async fn a_missing_name_is_empty_not_an_error() {
        let dns = fake_dns(hundred_pods).await;
        let lookup = Lookup::new(Some(dns.addr)).unwrap();
        let prev = addrs(&["10.0.0.9:80"]);
        assert_eq!(
            lookup.resolve("gone.test").await.merge(&prev, 80),
            Ok(vec![])
        );
    }

    #[tokio::test]
    async fn a_failed_family_keeps_its_previous_addresses() {
        // A answers, AAAA is SERVFAIL: the fresh IPv4 set is taken, the
        // IPv6 pods known from the last resolution stay.
        let dns = fake_dns(|q| match q.query_type() {
            RecordType::A => Ok(vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))]),
            _ => Err(ResponseCode::ServFail),
        })
        .await;
        let lookup = Lookup::new(Some(dns.addr)).unwrap();
        let answer = lookup.resolve("pods.test").await;
        assert!(
            matches!(&answer.v6, Err(e) if e.contains("AAAA")),
            "{answer:?}"
        );
        let prev = addrs(&["10.0.0.9:80", "[::2]:80"]);
        assert_eq!(
            answer.merge(&prev, 80),
            Ok(addrs(&["10.0.0.1:80", "[::2]:80"]))
        );
    }

    #[test]
    fn merging_takes_answered_families_and_fails_only_when_none_answered() {
        let prev = addrs(&["10.0.0.9:80", "[::2]:80"]);
        let failed = || Err("timed out".to_string());
        let both_failed = Answer {
            v4: failed(),
            v6: failed(),
        };
        assert_eq!(both_failed.merge(&prev, 80), Err("timed out".to_string()));
        // The A query failed: the last IPv4 set stays, on the current port.
        let a_failed = Answer {
            v4: failed(),
            v6: Ok(vec!["::3".parse().unwrap()]),
        };
        assert_eq!(
            a_failed.merge(&prev, 81),
            Ok(addrs(&["10.0.0.9:81", "[::3]:81"]))
        );
        // Both answered: nothing of the last set is kept.
        let both = Answer {
            v4: Ok(vec![]),
            v6: Ok(vec!["::3".parse().unwrap()]),
        };
        assert_eq!(both.merge(&prev, 80), Ok(addrs(&["[::3]:80"])));
    }

    #[tokio::test]
    async fn an_ip_literal_needs_no_server() {
        // Nothing listens on port 9 of 127.0.0.1; the literal is not looked up.
        let lookup = Lookup::new(Some("127.0.0.1:9".parse().unwrap())).unwrap();
        let got = lookup.resolve("10.1.2.3").await.merge(&[], 80);
        assert_eq!(got, Ok(addrs(&["10.1.2.3:80"])));
    }

    #[test]
    fn addresses_are_sorted_and_deduplicated_on_the_port() {
        let ips = ["10.0.0.2", "::1", "10.0.0.1", "10.0.0.2"].map(|s| s.parse().unwrap());
        let got = socket_addrs(ips, 8080);
        assert_eq!(
            got,
            addrs(&["10.0.0.1:8080", "10.0.0.2:8080", "[::1]:8080"])
        );
    }
}
