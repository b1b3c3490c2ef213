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
//! says). `resolver: ip:port` sends A queries over UDP to that server instead,
//! which is what tests use to talk to a DNS server on a loopback port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::config::DnsConfig;
use crate::discovery::{Live, SharedAddresses};
use crate::observe::metrics::Metrics;

/// Last good resolution per upstream, shared across reloads.

/// Resolves `name` to socket addresses on `port`, sorted and deduplicated.
pub async fn resolve(
    name: &str,
    port: u16,
    resolver: Option<SocketAddr>,
) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let mut addrs: Vec<SocketAddr> = match resolver {
        None => tokio::net::lookup_host((name, port))
            .await
            .map_err(|e| format!("cannot resolve `{name}`: {e}"))?
            .collect(),
        Some(server) => query_a(name, server)
            .await?
            .into_iter()
            .map(|ip| SocketAddr::new(IpAddr::V4(ip), port))
            .collect(),
    };
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// One DNS A query over UDP (RFC 1035), with a 2 s timeout.
async fn query_a(name: &str, server: SocketAddr) -> Result<Vec<Ipv4Addr>, String> {
    let id: u16 = fastrand::u16(..);
    let packet = build_query(id, name)?;
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    };
    let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    sock.connect(server).await.map_err(|e| e.to_string())?;
    sock.send(&packet).await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
        .await
        .map_err(|_| format!("DNS server {server} did not answer for `{name}`"))?
        .map_err(|e| format!("DNS server {server}: {e}"))?;
    parse_answer(&buf[..n], id)
        .map_err(|e| format!("bad DNS answer from {server} for `{name}`: {e}"))
}

fn build_query(id: u16, name: &str) -> Result<Vec<u8>, String> {
    let mut p = Vec::with_capacity(32 + name.len());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0x01, 0x00]); // recursion desired
    p.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // 1 question
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("`{name}` is not a valid DNS name"));
        }
        p.push(label.len() as u8);
        p.extend_from_slice(label.as_bytes());
    }
    p.push(0);
    p.extend_from_slice(&[0, 1, 0, 1]); // QTYPE A, QCLASS IN
    Ok(p)
}

/// Skips a (possibly compressed) name starting at `i`; returns the index after it.
fn skip_name(b: &[u8], mut i: usize) -> Result<usize, &'static str> {
    loop {
        let len = *b.get(i).ok_or("truncated name")? as usize;
        if len == 0 {
            return Ok(i + 1);
        }
        if len & 0xC0 == 0xC0 {
            return Ok(i + 2);
        }
        i += 1 + len;
    }
}

fn parse_answer(b: &[u8], id: u16) -> Result<Vec<Ipv4Addr>, &'static str> {
    if b.len() < 12 {
        return Err("short packet");
    }
    if u16::from_be_bytes([b[0], b[1]]) != id {
        return Err("id mismatch");
    }
    let rcode = b[3] & 0x0F;
    if rcode == 3 {
        return Ok(Vec::new()); // NXDOMAIN: no addresses
    }
    if rcode != 0 {
        return Err("server failure");
    }
    let qd = u16::from_be_bytes([b[4], b[5]]) as usize;
    let an = u16::from_be_bytes([b[6], b[7]]) as usize;
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(b, i)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        i = skip_name(b, i)?;
        let h = b.get(i..i + 10).ok_or("truncated record")?;
        let (rtype, rdlen) = (
            u16::from_be_bytes([h[0], h[1]]),
            u16::from_be_bytes([h[8], h[9]]) as usize,
        );
        i += 10;
        let data = b.get(i..i + rdlen).ok_or("truncated data")?;
        if rtype == 1 && rdlen == 4 {
            out.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += rdlen;
    }
    Ok(out)
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
    loop {
        let result = resolve(&cfg.name, cfg.port, cfg.resolver).await;
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
    use super::*;

    #[test]
    fn parses_an_answer_with_compressed_names() {
        let q = build_query(0x1234, "w.svc").unwrap();
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 2; // two answers
        for ip in [[10, 0, 0, 1], [10, 0, 0, 2]] {
            r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
            r.extend_from_slice(&ip);
        }
        let got = parse_answer(&r, 0x1234).unwrap();
        assert_eq!(
            got,
            vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]
        );
        assert!(parse_answer(&r, 0x9999).is_err());
        assert!(build_query(1, "a..b").is_err());
    }
}
