//! DNS discovery against a real DNS server (Debian's dnsmasq) on a loopback
//! port: scaling the name from 2 to 4 to 1 addresses is followed within
//! `refresh`, with zero failed requests during the changes, and a dead DNS
//! server keeps the last good set. A name with more pods than fit in one
//! UDP answer comes back whole (over TCP), IPv6 ones included.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use usher_e2e::dns::start_dnsmasq;
use usher_e2e::load::SteadyLoad;
use usher_e2e::usher::{TempDir, Usher};
use usher_e2e::{blocking, free_port, wait_until, Proc};

fn write_hosts(path: &Path, ips: &[&str]) {
    let text: String = ips
        .iter()
        .map(|ip| format!("{ip} workers.usher.test\n"))
        .collect();
    // Write then rename, so dnsmasq never reads a half-written file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn backend_addrs(usher: &Usher) -> Vec<String> {
    let mut v: Vec<String> = usher.status()["upstreams"]["app"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dns_discovery_follows_the_name_with_zero_failed_requests() {
    let dir = TempDir::new("dns");
    let port = free_port();
    let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"];
    // Four workers on four loopback addresses, all on the same port, as pods
    // behind a headless Service would be.
    let _workers: Vec<Proc> = ips
        .iter()
        .map(|ip| {
            let w = Proc::spawn_bin(
                "usher-worker",
                ["--threads", "2", "--listen", &format!("{ip}:{port}")],
            );
            let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
            assert!(
                wait_until(Duration::from_secs(30), || blocking::get(&format!(
                    "http://{addr}/healthz"
                ))
                .is_ok()),
                "worker on {addr} did not start:\n{}",
                w.output()
            );
            w
        })
        .collect();

    write_hosts(&dir.0.join("hosts"), &ips[..2]);
    let dns_port = free_port();
    let mut dnsmasq = start_dnsmasq(&dir.0, dns_port);

    let usher = Usher::start_ready(&format!(
        r#"
listeners: [{{ name: public, address: "LISTEN" }}]
admin: {{ address: "ADMIN" }}
routes: [{{ path_prefix: /, upstream: app }}]
upstreams:
  app:
    dns: {{ name: workers.usher.test, port: {port}, refresh: 200ms, resolver: "127.0.0.1:{dns_port}" }}
    queue: {{ max_depth: 1000, timeout: 10s }}
access_log: {{ format: off }}
"#
    ));
    let want =
        |n: usize| -> Vec<String> { ips[..n].iter().map(|ip| format!("{ip}:{port}")).collect() };
    assert!(
        wait_until(Duration::from_secs(10), || backend_addrs(&usher) == want(2)),
        "{:?}",
        backend_addrs(&usher)
    );

    // Steady bounded load while the name changes.
    let urls: Vec<String> = (0..4).map(|_| usher.url("/sleep?ms=5")).collect();
    let load = SteadyLoad::start(&urls, Duration::from_millis(10), Duration::from_secs(60));

    let pid = |p: &Proc| nix::unistd::Pid::from_raw(p.pid() as i32);
    for n in [4, 1] {
        write_hosts(&dir.0.join("hosts"), &ips[..n]);
        nix::sys::signal::kill(pid(&dnsmasq), nix::sys::signal::Signal::SIGHUP).unwrap();
        let t0 = Instant::now();
        assert!(
            wait_until(Duration::from_secs(10), || backend_addrs(&usher) == want(n)),
            "usher follows the name to {n} addresses: {:?}",
            backend_addrs(&usher)
        );
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "followed within a few refreshes"
        );
        // Let traffic flow on the new set for a moment.
        assert!(load.wait_for_more(50, Duration::from_secs(10)));
    }

    // The DNS server dies: the last good set stays, failures are counted.
    dnsmasq.signal(nix::sys::signal::Signal::SIGKILL);
    dnsmasq.wait_exit(Duration::from_secs(5));
    assert!(wait_until(Duration::from_secs(15), || {
        usher.metric("usher_dns_resolutions_total", &[("result", "failure")]) >= 2.0
    }));
    assert_eq!(backend_addrs(&usher), want(1));
    assert!(load.wait_for_more(20, Duration::from_secs(10)));

    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "no request failed during the changes: {failures:?}"
    );
    assert!(ok > 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_too_large_for_udp_comes_back_whole_with_its_ipv6_pods() {
    let dir = TempDir::new("dns-large");
    // 120 IPv4 pods are about 2 KB of answer: past dnsmasq's 1232-byte EDNS
    // limit, so the UDP answer is truncated and only TCP has them all. One
    // IPv6 pod comes from the AAAA query. Nothing listens on these addresses;
    // the test is about the set, not traffic.
    let mut ips: Vec<String> = (1..=120).map(|i| format!("127.0.1.{i}")).collect();
    ips.push("::1".to_string());
    let text: String = ips
        .iter()
        .map(|ip| format!("{ip} big.usher.test\n"))
        .collect();
    std::fs::write(dir.0.join("hosts"), text).unwrap();
    let dns_port = free_port();
    let _dnsmasq = start_dnsmasq(&dir.0, dns_port);

    let port = free_port();
    let usher = Usher::start_ready(&format!(
        r#"
listeners: [{{ name: public, address: "LISTEN" }}]
admin: {{ address: "ADMIN" }}
routes: [{{ path_prefix: /, upstream: app }}]
upstreams:
  app:
    dns: {{ name: big.usher.test, port: {port}, refresh: 200ms, resolver: "127.0.0.1:{dns_port}" }}
access_log: {{ format: off }}
"#
    ));
    let mut want: Vec<String> = ips
        .iter()
        .map(|ip| SocketAddr::new(ip.parse().unwrap(), port).to_string())
        .collect();
    want.sort();
    assert!(
        wait_until(Duration::from_secs(10), || backend_addrs(&usher) == want),
        "all 121 pods, got {}: {:?}",
        backend_addrs(&usher).len(),
        backend_addrs(&usher)
    );
}
