//! HTTP syntax rules that both config validation and the edge apply (a
//! leaf: it imports nothing of the crate).

/// `host [":" port]` where host is an RFC 3986 reg-name (unreserved,
/// sub-delims, pct-encoded; not empty) or a bracketed IPv6 literal, and port
/// is at most five digits (possibly none, as RFC 3986 allows). No userinfo.
pub fn valid_authority(s: &str) -> bool {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(port) => ("[]", port),
                None => return false,
            },
        }
    } else {
        // A plain scan: an authority is short, and `rsplit_once`'s search
        // costs more than it saves here.
        match s.bytes().rposition(|b| b == b':') {
            Some(at) => (&s[..at], &s[at + 1..]),
            None => (s, ""),
        }
    };
    let port_ok = port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    let host_ok = host == "[]" || (!host.is_empty() && valid_reg_name(host));
    port_ok && host_ok
}

fn valid_reg_name(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = |j: usize| b.get(j).is_some_and(u8::is_ascii_hexdigit);
                if !(hex(i + 1) && hex(i + 2)) {
                    return false;
                }
                i += 3;
                continue;
            }
            c if c.is_ascii_alphanumeric() => {}
            b'-' | b'.' | b'_' | b'~' => {}
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' => {}
            _ => return false,
        }
        i += 1;
    }
    true
}
