//! Response framing is Usher's own: what a backend said about its body's
//! length is checked and taken off, and hyper frames the response to the
//! client from the body Usher really read.

use http::header::{self, HeaderMap};
use http::{Method, StatusCode};

/// The worker's load report (`threads=4, busy=3, queued=0`, the worker's
/// [`usher_worker::LoadReport`]), consumed here and never passed to clients.
pub use usher_worker::{REFUSED_BUSY, X_USHER_LOAD, X_USHER_REFUSED};

/// Whether a request with a buffered body of `len` bytes says its length to
/// the backend: when it has a body, and always for the methods that carry
/// one (an empty POST says `Content-Length: 0`).
pub fn request_has_length(method: &Method, len: usize) -> bool {
    len > 0 || matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// Takes a backend's framing headers off its response, so that the framing
/// the client sees is Usher's own, made from the body Usher really read
/// (hyper writes `Content-Length` from the body's exact size, or chunks).
///
/// A response framed two ways (`Content-Length` and `Transfer-Encoding`), or
/// with a transfer coding other than `chunked`, is refused: such a response is
/// either a splitting attempt or a body Usher cannot frame, and relaying it
/// lets the backend decide where the *next* response starts.
///
/// For `HEAD` and `304` the `Content-Length` describes the representation, not
/// this message (which has no body), so it stays.
///
/// For h2 backends and a tunnel's plain answer (hyper's client): Usher's own
/// HTTP/1 parser applies the same rules and keeps the framing out of the map
/// (`upstream::h1::parse`).
pub fn take_response_framing(
    method: &Method,
    status: StatusCode,
    h: &mut HeaderMap,
) -> Result<(), &'static str> {
    let mut te = h.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = te.next() {
        if h.contains_key(header::CONTENT_LENGTH) {
            return Err("response has both Content-Length and Transfer-Encoding");
        }
        if te.next().is_some() || !first.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err("response has a Transfer-Encoding other than `chunked`");
        }
        h.remove(header::TRANSFER_ENCODING);
    }
    let describes_representation = *method == Method::HEAD || status == StatusCode::NOT_MODIFIED;
    if !describes_representation {
        h.remove(header::CONTENT_LENGTH);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_framing_is_usher_s() {
        let mut h = HeaderMap::new();
        h.insert("content-length", "5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        assert!(take_response_framing(&Method::GET, StatusCode::OK, &mut h).is_err());
        h.remove("content-length");
        assert!(take_response_framing(&Method::GET, StatusCode::OK, &mut h).is_ok());
        assert!(h.is_empty());
        h.insert("transfer-encoding", "gzip".parse().unwrap());
        assert!(take_response_framing(&Method::GET, StatusCode::OK, &mut h).is_err());
        let mut h = HeaderMap::new();
        h.insert("content-length", "5".parse().unwrap());
        take_response_framing(&Method::HEAD, StatusCode::OK, &mut h).unwrap();
        assert_eq!(h["content-length"], "5");
        take_response_framing(&Method::GET, StatusCode::OK, &mut h).unwrap();
        assert!(h.is_empty());
    }
}
