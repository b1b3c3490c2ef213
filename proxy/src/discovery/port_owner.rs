//! Who listens on a TCP port, read from `/proc`: when a fleet port is taken,
//! the operator is told by what (a pid and its command line, often an orphan
//! of an earlier Usher), not only "address already in use".
//!
//! `/proc/net/tcp` and `/proc/net/tcp6` list the sockets of this network
//! namespace with their inode; a process's open sockets are the
//! `socket:[INODE]` links under `/proc/PID/fd`. The fd links of other users'
//! processes are unreadable without privileges: their sockets are not found.

use std::path::Path;

/// A process listening on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    /// Its command line, arguments joined by spaces (shortened if long).
    pub command: String,
}

/// The process listening on TCP `port` (any address), if `/proc` tells.
pub fn find(port: u16) -> Option<Owner> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            inodes.extend(listening_inodes(&text, port));
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| wanted.iter().any(|w| Path::new(w) == target))
        });
        if holds {
            return Some(Owner {
                pid,
                command: command_line(pid),
            });
        }
    }
    None
}

/// The inodes of the LISTEN sockets on `port` in one `/proc/net/tcp*` table.
///
/// A line reads `sl local_address rem_address st ... uid timeout inode ...`,
/// with the local address as `HEXIP:HEXPORT` and state `0A` for LISTEN.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit_once(':')?.1;
            let listening = *fields.get(3)? == "0A";
            let inode = fields.get(9)?.parse::<u64>().ok()?;
            (listening && u16::from_str_radix(local_port, 16).ok()? == port && inode != 0)
                .then_some(inode)
        })
        .collect()
}

/// `/proc/PID/cmdline` as one line, or the process name in brackets when it
/// has none (a kernel thread, a zombie).
fn command_line(pid: u32) -> String {
    const MAX: usize = 200;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut line = String::from_utf8_lossy(&raw)
        .split('\0')
        .filter(|a| !a.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if line.is_empty() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        line = format!("[{}]", comm.trim());
    }
    if line.len() > MAX {
        let mut end = MAX;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push('…');
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listening_sockets_of_a_port_from_a_tcp_table() {
        // Port 9001 (0x2329) listening on 127.0.0.1 and on 0.0.0.0, one
        // established connection from it, and another port.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2329 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 100 0 0 10 0
   1: 00000000:2329 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 100 0 0 10 0
   2: 0100007F:2329 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 4444 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4545 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(listening_inodes(table, 9001), vec![4242, 4343]);
        assert_eq!(listening_inodes(table, 8080), vec![4545]);
        assert!(listening_inodes(table, 9002).is_empty());
        assert!(listening_inodes("", 9001).is_empty());
    }

    #[test]
    fn finds_this_process_listening_on_a_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let owner = find(port).expect("the listener's owner in /proc");
        assert_eq!(owner.pid, std::process::id());
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_str().unwrap();
        assert!(owner.command.contains(name), "{owner:?}");
        drop(l);
        assert_eq!(find(port), None, "a closed listener has no owner");
    }

    #[test]
    fn finds_an_ipv6_listener_too() {
        let Ok(l) = std::net::TcpListener::bind("[::1]:0") else {
            return; // no IPv6 loopback here
        };
        let port = l.local_addr().unwrap().port();
        assert_eq!(find(port).map(|o| o.pid), Some(std::process::id()));
    }
}
