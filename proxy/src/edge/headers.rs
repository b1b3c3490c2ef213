//! Header rewriting between client and backend.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection and must not
//! cross the proxy, in either direction: `Connection` and every header it
//! names, `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade` and
//! `Proxy-Connection`. Framing is redone by Usher (`Content-Length` of the
//! buffered body), so the client's framing headers are dropped too.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Uri, Version};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

const PROXY_CONNECTION: &str = "proxy-connection";
const KEEP_ALIVE: &str = "keep-alive";

/// Whether a comma-separated header value (`Connection`) holds `token`,
/// case-insensitively. A value that is not visible ASCII holds none.
pub fn has_token(v: &HeaderValue, token: &str) -> bool {
    v.to_str()
        .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Whether `name` is hop-by-hop on its own (not counting those `Connection`
/// names).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || name.as_str() == KEEP_ALIVE
        || name.as_str() == PROXY_CONNECTION
}

/// Whether Usher reads, replaces or drops response header `name` on its way
/// to the client: such a line goes into the header map, any other may be
/// relayed as it came (`http1::Lines`). Hop-by-hop names, framing, the ids
/// and HSTS Usher sets, and the worker's reports.
pub fn read_or_set_by_usher(name: &HeaderName) -> bool {
    is_hop_by_hop(name)
        || *name == header::CONTENT_LENGTH
        || *name == header::STRICT_TRANSPORT_SECURITY
        || *name == X_REQUEST_ID
        || *name == usher_worker::X_USHER_REFUSED
        || *name == usher_worker::X_USHER_LOAD
}

/// Whether Usher reads, replaces or drops request header `name` on its way
/// to the backend: such a line goes into the header map, any other may be
/// relayed as it came (`http1::Lines`). Hop-by-hop names, framing and
/// `Expect`, `Host`, what Usher tells the backend (`Identity`, and the
/// `X-Request-Start` stamp), and `User-Agent` (the access log). Any new
/// rule that reads or sets a request header must add its name here: a line
/// kept out of the map is invisible to `HeaderMap` lookups.
pub fn read_by_usher_in_requests(name: &HeaderName) -> bool {
    is_hop_by_hop(name)
        || matches!(
            *name,
            header::HOST | header::CONTENT_LENGTH | header::EXPECT | header::USER_AGENT
        )
        || name.as_str().starts_with("x-")
            && (*name == X_FORWARDED_FOR
                || *name == X_FORWARDED_PROTO
                || *name == X_FORWARDED_HOST
                || *name == X_REQUEST_ID
                || *name == crate::upstream::stamp::X_REQUEST_START
                || *name == crate::upstream::stamp::X_USHER_QUEUE_MS)
}

/// Which of the names the request path looks up a request carries, read in
/// one pass over its names. Looking up a name a map does not hold still
/// hashes it and probes; most requests carry few of these.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Present {
    pub connection: bool,
    pub content_length: bool,
    pub transfer_encoding: bool,
    pub request_id: bool,
    pub forwarded_for: bool,
}

impl Present {
    pub fn of(h: &HeaderMap) -> Self {
        let mut p = Present::default();
        for name in h.keys() {
            match *name {
                header::CONNECTION => p.connection = true,
                header::CONTENT_LENGTH => p.content_length = true,
                header::TRANSFER_ENCODING => p.transfer_encoding = true,
                _ if *name == X_REQUEST_ID => p.request_id = true,
                _ if *name == X_FORWARDED_FOR => p.forwarded_for = true,
                _ => {}
            }
        }
        p
    }
}

/// Removes hop-by-hop headers, including those named by `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages have none: one pass over the names, no lookups.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    // Tokens are read as bytes: a value with one non-ASCII byte must not hide
    // the names beside it.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        h.remove(n);
    }
    h.remove(KEEP_ALIVE);
    h.remove(PROXY_CONNECTION);
}

/// Checks request framing: `Content-Length` together with
/// `Transfer-Encoding`, or any `Transfer-Encoding` but exactly `chunked`, is a
/// request-smuggling vector and is refused.
///
/// On HTTP/1.1, hyper's parser has already settled CL+TE by the time a
/// request gets here: it drops the `Content-Length`, frames the body by
/// `chunked` and closes the connection after the answer (RFC 9112 §6.3
/// allows exactly that), so a request smuggled behind the body is never
/// read. h2 forbids `Transfer-Encoding` outright. This check is the rule for
/// whatever reaches Usher with the headers intact.
pub fn check_framing(h: &HeaderMap) -> Result<(), &'static str> {
    let te: Vec<&HeaderValue> = h.get_all(header::TRANSFER_ENCODING).iter().collect();
    if te.is_empty() {
        let cls: Vec<&HeaderValue> = h.get_all(header::CONTENT_LENGTH).iter().collect();
        if cls.len() > 1 && cls.windows(2).any(|w| w[0] != w[1]) {
            return Err("conflicting Content-Length headers");
        }
        return Ok(());
    }
    if h.contains_key(header::CONTENT_LENGTH) {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if te.len() != 1 || !te[0].as_bytes().eq_ignore_ascii_case(b"chunked") {
        return Err("unsupported Transfer-Encoding (only `chunked` is accepted)");
    }
    Ok(())
}

/// The authority a request names (RFC 9112 §3.2, RFC 9113 §8.3.1), for
/// routing and for the `Host` sent upstream.
///
/// - HTTP/1.1 needs exactly one `Host`, with a valid value, even when the
///   target is in absolute form; the absolute form's authority then wins.
/// - HTTP/1.0 may omit `Host`.
/// - h2's `:authority` and a `host` header, when both are there, must agree.
///
/// Anything else is a 400: a proxy that routes on one `Host` while the
/// backend reads another is a cache-poisoning and ACL-bypass vector.
///
/// The authority comes as a header value, the `Host` header's own when it
/// is that one (shared, not copied), and as the text it was checked as (for
/// routing: a value's text would be checked again).
pub fn request_host<'a>(
    version: Version,
    uri: &'a Uri,
    h: &'a HeaderMap,
) -> Result<Option<(HeaderValue, &'a str)>, &'static str> {
    let (authority, host) = authority_and_host(version, uri, h)?;
    Ok(authority.and_then(|a| match host {
        Some(v) if v.as_bytes() == a.as_bytes() => Some((v.clone(), a)),
        _ => HeaderValue::from_str(a).ok().map(|v| (v, a)),
    }))
}

/// The authority alone (tests).
#[cfg(test)]
pub fn request_authority<'a>(
    version: Version,
    uri: &'a Uri,
    h: &'a HeaderMap,
) -> Result<Option<&'a str>, &'static str> {
    authority_and_host(version, uri, h).map(|(a, _)| a)
}

/// The authority, with the one `Host` header when there is one.
fn authority_and_host<'a>(
    version: Version,
    uri: &'a Uri,
    h: &'a HeaderMap,
) -> Result<(Option<&'a str>, Option<&'a HeaderValue>), &'static str> {
    let mut all = h.get_all(header::HOST).iter();
    let header = all.next();
    if all.next().is_some() {
        return Err("more than one Host header");
    }
    let host = match header {
        None => None,
        Some(v) => match v.to_str() {
            Ok(s) if valid_authority(s) => Some(s),
            _ => return Err("invalid Host header"),
        },
    };
    let target = match uri.authority() {
        None => None,
        Some(a) if valid_authority(a.as_str()) => Some(a.as_str()),
        Some(_) => return Err("invalid authority in the request target"),
    };
    if version >= Version::HTTP_2 {
        return match (target, host) {
            (Some(a), Some(h)) if !a.eq_ignore_ascii_case(h) => Err(":authority and Host disagree"),
            (Some(a), _) => Ok((Some(a), header)),
            (None, Some(h)) => Ok((Some(h), header)),
            (None, None) => Err("neither :authority nor Host"),
        };
    }
    if host.is_none() && version == Version::HTTP_11 {
        return Err("missing Host header");
    }
    Ok((target.or(host), header))
}

pub use crate::syntax::valid_authority;

/// A new request id: 16 random bytes in hex.
///
/// Ids are cut from a shared chunk made per thread for [`IDS_PER_CHUNK`] of
/// them: each one is a slice of it (a reference count), where a value of its
/// own cost an allocation when made and another when first cloned (an id
/// goes both to the backend and to the client).
pub fn new_request_id() -> HeaderValue {
    thread_local! {
        static IDS: std::cell::RefCell<(bytes::Bytes, usize)> =
            const { std::cell::RefCell::new((bytes::Bytes::new(), 0)) };
    }
    IDS.with_borrow_mut(|(chunk, next)| {
        if *next == chunk.len() {
            *chunk = random_ids();
            *next = 0;
        }
        let id = chunk.slice(*next..*next + ID_LEN);
        *next += ID_LEN;
        HeaderValue::from_maybe_shared(id).expect("hex is a valid header value")
    })
}

const ID_LEN: usize = 32;
const IDS_PER_CHUNK: usize = 64;

/// [`IDS_PER_CHUNK`] ids of [`ID_LEN`] lowercase hex digits, back to back.
fn random_ids() -> bytes::Bytes {
    // One lookup per random byte gives both of its digits.
    const PAIRS: [[u8; 2]; 256] = {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut t = [[0; 2]; 256];
        let mut b = 0;
        while b < 256 {
            t[b] = [HEX[b >> 4], HEX[b & 0xf]];
            b += 1;
        }
        t
    };
    let mut ids = vec![0u8; ID_LEN * IDS_PER_CHUNK];
    for id in ids.chunks_exact_mut(ID_LEN) {
        for (pair, b) in id.chunks_exact_mut(2).zip(fastrand::u128(..).to_be_bytes()) {
            pair.copy_from_slice(&PAIRS[usize::from(b)]);
        }
    }
    bytes::Bytes::from(ids)
}

/// The request's id: the client's `X-Request-Id` if it sent a usable one,
/// else a new one. Kept as a header value, since it is sent both ways.
pub fn request_id(h: &HeaderMap) -> HeaderValue {
    h.get(&X_REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 200 && v.to_str().is_ok())
        .cloned()
        .unwrap_or_else(new_request_id)
}

/// A peer's address as it goes into `X-Forwarded-For`: made once per
/// connection.
pub fn ip_value(ip: std::net::IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).expect("an IP address is a valid header value")
}

/// Sets `X-Forwarded-For` (appending the peer), `-Proto` and `-Host`, as
/// [`Identity`] does (tests check the list rules through it).
#[cfg(test)]
pub fn set_forwarded(
    h: &mut HeaderMap,
    peer_ip: &HeaderValue,
    proto: &'static str,
    host: Option<&HeaderValue>,
) {
    Identity::new(h, peer_ip, proto, host, &HeaderValue::from_static("-")).insert_forwarded(h);
}

/// What Usher tells a backend about the request: `X-Forwarded-*`,
/// `X-Request-Id`, and the `Host` it was routed by (see
/// [`request_host`]: an absolute-form target's or h2's `:authority`).
pub fn set_upstream_identity(
    h: &mut HeaderMap,
    peer_ip: &HeaderValue,
    proto: &'static str,
    host: Option<&HeaderValue>,
    request_id: &HeaderValue,
) {
    Identity::new(h, peer_ip, proto, host, request_id).insert_into(h);
}

/// The headers [`set_upstream_identity`] sets, made once per request and
/// kept beside the client's head rather than put into it: an HTTP/1 backend
/// gets them written straight into the request it is sent
/// (`upstream::h1::Outgoing`), skipping the client's own, and an h2 backend
/// through [`Identity::insert_into`]. Inserting five names into a header map
/// costs more than writing five lines.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `None` only when the joined list is not a header value: the client's
    /// lines then pass as they are.
    forwarded_for: Option<HeaderValue>,
    proto: HeaderValue,
    /// The routed host: `Host` and `X-Forwarded-Host`. With none, the
    /// client's `X-Forwarded-Host` is dropped and its `Host` (if any) kept.
    host: Option<HeaderValue>,
    request_id: HeaderValue,
}

/// `X-Forwarded-For` as it goes to the backend: the client's lines that are
/// text, in order, as one list with the peer appended. `None` when the list
/// is not a header value (the client's lines then pass as they are).
fn forwarded_list(h: &HeaderMap, peer_ip: &HeaderValue) -> Option<HeaderValue> {
    let mut prev = h
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .peekable();
    if prev.peek().is_none() {
        return Some(peer_ip.clone());
    }
    let mut xff = String::new();
    for p in prev {
        xff.push_str(p);
        xff.push_str(", ");
    }
    xff.push_str(peer_ip.to_str().unwrap_or_default());
    HeaderValue::from_str(&xff).ok()
}

impl Identity {
    /// Every `X-Forwarded-For` line the client sent is kept, in order, as one
    /// list with the peer appended (a line that is not text is dropped).
    pub fn new(
        h: &HeaderMap,
        peer_ip: &HeaderValue,
        proto: &'static str,
        host: Option<&HeaderValue>,
        request_id: &HeaderValue,
    ) -> Self {
        Self::of_request(h, Present::of(h), peer_ip, proto, host, request_id)
    }

    /// [`Identity::new`] for a request whose names are known already
    /// (`present`, the request path's one pass over them): one without
    /// `X-Forwarded-For` (most) is not looked up in `h`.
    pub fn of_request(
        h: &HeaderMap,
        present: Present,
        peer_ip: &HeaderValue,
        proto: &'static str,
        host: Option<&HeaderValue>,
        request_id: &HeaderValue,
    ) -> Self {
        let forwarded_for = if present.forwarded_for {
            forwarded_list(h, peer_ip)
        } else {
            // The common case: the peer alone, shared from the connection.
            Some(peer_ip.clone())
        };
        Identity {
            forwarded_for,
            proto: proto_value(proto),
            host: host.cloned(),
            request_id: request_id.clone(),
        }
    }

    /// The routed host, when there is one (it replaces the client's `Host`).
    pub fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// The `X-Forwarded-*` headers as they are sent: the one list of them
    /// (`Host` is not among them: see [`Identity::host`]).
    fn forwarded(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        let xff = self.forwarded_for.as_ref().map(|v| (&X_FORWARDED_FOR, v));
        let host = self.host.as_ref().map(|v| (&X_FORWARDED_HOST, v));
        xff.into_iter()
            .chain([(&X_FORWARDED_PROTO, &self.proto)])
            .chain(host)
    }

    /// Every `X-` header, in the order they are sent.
    pub fn fields(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.forwarded().chain([(&X_REQUEST_ID, &self.request_id)])
    }

    /// Whether the client's header `name` gives way to these: it is not sent.
    /// A client's `X-Forwarded-Host` never is, even when Usher has none.
    pub fn replaces(&self, name: &HeaderName) -> bool {
        if *name == header::HOST {
            return self.host.is_some();
        }
        // Only `x-` names below; most headers are standard ones.
        name.as_str().starts_with("x-")
            && (*name == X_FORWARDED_HOST || self.fields().any(|(n, _)| n == name))
    }

    /// Sets the `X-Forwarded-*` headers in `h`, replacing the client's.
    fn insert_forwarded(&self, h: &mut HeaderMap) {
        for (name, value) in self.forwarded() {
            h.insert(name.clone(), value.clone());
        }
        if self.host.is_none() {
            h.remove(&X_FORWARDED_HOST);
        }
    }

    /// Sets them all in `h`, replacing the client's.
    pub fn insert_into(&self, h: &mut HeaderMap) {
        self.insert_forwarded(h);
        h.insert(X_REQUEST_ID.clone(), self.request_id.clone());
        if let Some(v) = &self.host {
            if h.get(header::HOST) != Some(v) {
                h.insert(header::HOST, v.clone());
            }
        }
    }
}

/// The `X-Forwarded-Proto` value of a scheme, made at compile time for the
/// two an edge serves: `from_static` at run time checks its bytes again on
/// every request.
fn proto_value(proto: &'static str) -> HeaderValue {
    const HTTP: HeaderValue = HeaderValue::from_static("http");
    const HTTPS: HeaderValue = HeaderValue::from_static("https");
    match proto {
        "http" => HTTP,
        "https" => HTTPS,
        other => HeaderValue::from_static(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_request_ids_are_32_hex_digits() {
        // Across chunks too: every id is whole and none repeats.
        let ids: Vec<HeaderValue> = (0..3 * IDS_PER_CHUNK + 1)
            .map(|_| new_request_id())
            .collect();
        for a in &ids {
            assert_eq!(a.len(), 32);
            assert!(a
                .as_bytes()
                .iter()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        }
        let distinct: std::collections::HashSet<&[u8]> = ids.iter().map(|v| v.as_bytes()).collect();
        assert_eq!(distinct.len(), ids.len());
    }

    #[test]
    fn present_names_what_a_head_carries() {
        let mut h = HeaderMap::new();
        h.insert("host", "a".parse().unwrap());
        h.insert("user-agent", "b".parse().unwrap());
        assert_eq!(Present::of(&h), Present::default());
        h.insert("x-request-id", "1".parse().unwrap());
        h.insert("content-length", "2".parse().unwrap());
        let p = Present::of(&h);
        assert!(p.request_id && p.content_length && !p.connection);
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("connection", "upgrade".parse().unwrap());
        let p = Present::of(&h);
        assert!(p.transfer_encoding && p.connection);
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn framing_rules() {
        let mut h = HeaderMap::new();
        assert!(check_framing(&h).is_ok());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        assert!(check_framing(&h).is_ok());
        h.insert("content-length", "5".parse().unwrap());
        assert!(check_framing(&h).is_err());
        h.remove("content-length");
        h.insert("transfer-encoding", "gzip, chunked".parse().unwrap());
        assert!(check_framing(&h).is_err());
        let mut h = HeaderMap::new();
        h.append("content-length", "5".parse().unwrap());
        h.append("content-length", "6".parse().unwrap());
        assert!(check_framing(&h).is_err());
    }

    #[test]
    fn authority_syntax() {
        for ok in [
            "main.test",
            "MAIN.test:8080",
            "127.0.0.1",
            "[::1]",
            "[::1]:80",
            "a%41b",
            "a%41:80",
            "host:",
            "~x-y_z!$&'()*+,;=:65535",
        ] {
            assert!(valid_authority(ok), "{ok}");
        }
        for bad in [
            "",
            "main.test/../x y",
            "a b",
            "main.test:80:80",
            "user@main.test",
            "main.test:abc",
            "[::1",
            "[zz]:1",
            ":80",
            "a%4",
            "a%zz",
            "a::80",
            "a:8%30",
            "a\u{e9}b",
            "main.test:123456",
        ] {
            assert!(!valid_authority(bad), "{bad}");
        }
    }

    #[test]
    fn authority_rules() {
        let h = |pairs: &[&str]| {
            let mut m = HeaderMap::new();
            for v in pairs {
                m.append(header::HOST, v.parse().unwrap());
            }
            m
        };
        let origin: Uri = "/x".parse().unwrap();
        let absolute: Uri = "http://alt.test/abs".parse().unwrap();
        let v11 = Version::HTTP_11;
        assert_eq!(
            request_authority(v11, &origin, &h(&["main.test"])),
            Ok(Some("main.test"))
        );
        assert!(request_authority(v11, &origin, &h(&[])).is_err());
        assert!(request_authority(v11, &origin, &h(&["a", "b"])).is_err());
        assert_eq!(
            request_authority(Version::HTTP_10, &origin, &h(&[])),
            Ok(None)
        );
        assert_eq!(
            request_authority(v11, &absolute, &h(&["main.test"])),
            Ok(Some("alt.test"))
        );
        let h2 = Version::HTTP_2;
        assert!(request_authority(h2, &absolute, &h(&["main.test"])).is_err());
        assert_eq!(
            request_authority(h2, &absolute, &h(&["ALT.test"])),
            Ok(Some("alt.test"))
        );
        assert_eq!(
            request_authority(h2, &absolute, &h(&[])),
            Ok(Some("alt.test"))
        );
        assert_eq!(
            request_authority(h2, &origin, &h(&["main.test"])),
            Ok(Some("main.test"))
        );
        assert!(request_authority(h2, &origin, &h(&[])).is_err());
        // As a value: the Host header's own, else the target's authority.
        let one = h(&["main.test"]);
        let (host, text) = request_host(v11, &origin, &one).unwrap().unwrap();
        assert_eq!(host.as_bytes().as_ptr(), one["host"].as_bytes().as_ptr());
        assert_eq!(text, "main.test");
        let (host, text) = request_host(v11, &absolute, &one).unwrap().unwrap();
        assert_eq!(host, "alt.test");
        assert_eq!(text, "alt.test");
        assert_eq!(request_host(Version::HTTP_10, &origin, &h(&[])), Ok(None));
        assert!(request_host(v11, &origin, &h(&["a", "b"])).is_err());
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        set_forwarded(
            &mut h,
            &HeaderValue::from_static("127.0.0.1"),
            "http",
            Some(&HeaderValue::from_static("example.com")),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "1.1.1.1".parse().unwrap());
        h.append("x-forwarded-for", "2.2.2.2, 3.3.3.3".parse().unwrap());
        h.insert("x-forwarded-host", "spoofed".parse().unwrap());
        set_forwarded(&mut h, &HeaderValue::from_static("9.9.9.9"), "http", None);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 3.3.3.3, 9.9.9.9");
        assert!(!h.contains_key("x-forwarded-host"));
    }
}
