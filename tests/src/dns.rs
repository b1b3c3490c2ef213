//! A real DNS server for the DNS-discovery tests: dnsmasq on a loopback port,
//! answering from a hosts file the test writes (and rewrites, then SIGHUPs).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::Proc;

/// Starts dnsmasq on `127.0.0.1:port`, answering from `dir/hosts` with TTL 0
/// and no negative cache, and waits until it logs `started`. Killed on drop.
pub fn start_dnsmasq(dir: &Path, port: u16) -> Proc {
    let hosts = dir.join("hosts");
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        "--local-ttl=0",
        "--no-negcache",
        "--user=root",
        "--log-facility=-",
    ])
    .arg(format!("--port={port}"))
    .arg(format!("--addn-hosts={}", hosts.display()))
    .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()));
    let dnsmasq = Proc::spawn(cmd);
    assert!(
        dnsmasq
            .wait_for_output("started", Duration::from_secs(10))
            .is_some(),
        "dnsmasq (Debian package dnsmasq-base) must be installed and start:\n{}",
        dnsmasq.output()
    );
    dnsmasq
}
