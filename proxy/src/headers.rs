//! Header rewriting between client and backend.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection and must not
//! cross the proxy, in either direction: `Connection` and every header it
//! names, `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade` and
//! `Proxy-Connection`. Framing is redone by Usher (`Content-Length` of the
//! buffered body), so the client's framing headers are dropped too.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_USHER_LOAD: HeaderName = HeaderName::from_static("x-usher-load");
const PROXY_CONNECTION: &str = "proxy-connection";
const KEEP_ALIVE: &str = "keep-alive";

/// Removes hop-by-hop headers, including those named by `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
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

/// A new request id: 16 random bytes in hex.
pub fn new_request_id() -> HeaderValue {
    let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    HeaderValue::from_str(&id).expect("hex is a valid header value")
}

/// The request's id: the client's `X-Request-Id` if it sent a usable one,
/// else a new one. Kept as a header value, since it is sent both ways.
pub fn request_id(h: &HeaderMap) -> HeaderValue {
    h.get(&X_REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 200 && v.to_str().is_ok())
        .cloned()
        .unwrap_or_else(new_request_id)
}

/// Sets `X-Forwarded-For` (appending the peer), `-Proto` and `-Host`.
pub fn set_forwarded(h: &mut HeaderMap, peer_ip: &str, proto: &'static str, host: Option<&str>) {
    let xff = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {peer_ip}"),
        _ => peer_ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    if let Some(v) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
        h.insert(X_FORWARDED_HOST.clone(), v);
    }
}

/// What Usher tells a backend about the request: `X-Forwarded-*`,
/// `X-Request-Id`, and a `Host` (from h2's `:authority`) when the client sent
/// none.
pub fn set_upstream_identity(
    h: &mut HeaderMap,
    peer_ip: &str,
    proto: &'static str,
    host: Option<&str>,
    request_id: &HeaderValue,
) {
    set_forwarded(h, peer_ip, proto, host);
    h.insert(X_REQUEST_ID.clone(), request_id.clone());
    if !h.contains_key(header::HOST) {
        if let Some(v) = host.and_then(|s| HeaderValue::from_str(s).ok()) {
            h.insert(header::HOST, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        set_forwarded(&mut h, "127.0.0.1", "http", Some("example.com"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
    }
}
