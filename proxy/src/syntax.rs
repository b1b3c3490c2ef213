//! HTTP syntax rules that both config validation and the edge apply (a
//! leaf: it imports nothing of the crate).

/// `host [":" port]` where host is an RFC 3986 reg-name (unreserved,
/// sub-delims, pct-encoded; not empty) or a bracketed IPv6 literal, and port
/// is at most five digits (possibly none, as RFC 3986 allows). No userinfo.
pub fn valid_authority(s: &str) -> bool {
    let port = if let Some(rest) = s.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(port) => port.as_bytes(),
                None => return false,
            },
        }
    } else {
        // One pass with a table lookup per byte (the edge checks every
        // request's `Host`): the reg-name up to the first `:`, then the
        // port. A second `:` fails the port, as it is not a digit.
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() && b[i] != b':' {
            match b[i] {
                b'%' => {
                    let hex = |j: usize| b.get(j).is_some_and(u8::is_ascii_hexdigit);
                    if !(hex(i + 1) && hex(i + 2)) {
                        return false;
                    }
                    i += 3;
                }
                c if REG_NAME[usize::from(c)] => i += 1,
                _ => return false,
            }
        }
        if i == 0 {
            return false;
        }
        b.get(i + 1..).unwrap_or_default()
    };
    port.len() <= 5 && port.iter().all(u8::is_ascii_digit)
}

/// The bytes of an RFC 3986 reg-name other than `%` (pct-encoded):
/// unreserved and sub-delims.
const REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        c += 1;
    }
    t
};
