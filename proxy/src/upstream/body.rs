//! The response body Usher sends to clients: buffered whole, or relayed
//! from the backend while holding its slot.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::h1::ResponseBody;
use crate::dispatch::Slot;
use crate::edge::headers::X_REQUEST_ID;
use crate::http1::Lines;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body as it arrives from a backend: off Usher's own HTTP/1
/// connection (`Left`, which goes back to the pool when the body has been
/// read whole), or from hyper's h2 client (`Right`).
pub type UpstreamBody = http_body_util::Either<ResponseBody, Incoming>;

/// The response body Usher sends to clients: either fully buffered, or a
/// relay that streams the rest from the backend and holds the slot until
/// the backend has sent it all.
///
/// Small (the rare parts are boxed): a response is moved from future to
/// future on its way to the client.
pub struct ProxyBody {
    buffered: Chunks,
    remaining: u64,
    trailers: Option<Box<http::HeaderMap>>,
    relay: Option<Box<Relay>>,
    /// Header lines of the response that are not in its map (see
    /// `http1::Lines`): the head travels with its body.
    lines: Lines,
    /// The `X-Request-Id` Usher gives the response, kept out of its map
    /// as the lines are: most responses' maps are empty, and the first
    /// entry of one costs two allocations.
    request_id: Option<HeaderValue>,
}

/// A body's chunks in the order they came, empty ones left out. The first
/// is held inline: most bodies arrive in one frame, and a queue's first
/// push allocates.
#[derive(Default)]
pub struct Chunks {
    first: Option<Bytes>,
    rest: VecDeque<Bytes>,
}

impl Chunks {
    pub fn push_back(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(chunk);
        } else {
            self.rest.push_back(chunk);
        }
    }

    pub fn pop_front(&mut self) -> Option<Bytes> {
        self.first.take().or_else(|| self.rest.pop_front())
    }

    pub fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }

    /// Bytes held.
    pub fn len(&self) -> u64 {
        self.first
            .iter()
            .chain(&self.rest)
            .map(|b| b.len() as u64)
            .sum()
    }
}

/// The part of a streamed response still to come from the backend.
struct Relay {
    rest: UpstreamBody,
    /// Held for as long as the backend sends: dropped with the relay.
    _slot: Slot,
    timer: Option<(crate::observe::histogram::Histogram, Instant)>,
}

impl ProxyBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        let len = b.len() as u64;
        let mut chunks = Chunks::default();
        chunks.push_back(b);
        Self::buffered(chunks, len, None)
    }

    pub fn empty() -> Self {
        Self::buffered(Chunks::default(), 0, None)
    }

    pub(crate) fn buffered(
        chunks: Chunks,
        size: u64,
        trailers: Option<Box<http::HeaderMap>>,
    ) -> Self {
        ProxyBody {
            buffered: chunks,
            remaining: size,
            trailers,
            relay: None,
            lines: Lines::default(),
            request_id: None,
        }
    }

    pub(crate) fn relay(
        chunks: Chunks,
        rest: UpstreamBody,
        slot: Slot,
        timer: Option<(crate::observe::histogram::Histogram, Instant)>,
    ) -> Self {
        ProxyBody {
            buffered: chunks,
            remaining: 0,
            trailers: None,
            relay: Some(Box::new(Relay {
                rest,
                _slot: slot,
                timer,
            })),
            lines: Lines::default(),
            request_id: None,
        }
    }

    /// With `lines`, the response's header lines kept out of its map.
    pub(crate) fn with_lines(mut self, lines: Lines) -> Self {
        self.lines = lines;
        self
    }

    /// The response's header lines kept out of its map, taken: once they
    /// are written, the backend's head they point into can go.
    pub fn take_lines(&mut self) -> Lines {
        std::mem::take(&mut self.lines)
    }

    /// With `id` as the response's `X-Request-Id`, replacing any other.
    pub(crate) fn set_request_id(resp: &mut Response<ProxyBody>, id: HeaderValue) {
        resp.headers_mut().remove(&X_REQUEST_ID);
        resp.body_mut().request_id = Some(id);
    }

    /// The response's `X-Request-Id`, taken (see `set_request_id`).
    pub fn take_request_id(&mut self) -> Option<HeaderValue> {
        self.request_id.take()
    }

    /// Puts the lines and the id kept out of `resp`'s map into it, for a
    /// writer that knows only the map (hyper's).
    pub fn lines_into_map(resp: Response<ProxyBody>) -> Response<ProxyBody> {
        if resp.body().lines.is_empty() && resp.body().request_id.is_none() {
            return resp;
        }
        let (mut parts, mut body) = resp.into_parts();
        body.take_lines().append_to(&mut parts.headers);
        if let Some(id) = body.take_request_id() {
            parts.headers.insert(X_REQUEST_ID.clone(), id);
        }
        Response::from_parts(parts, body)
    }

    /// Bytes known up front (buffered bodies only).
    pub fn known_len(&self) -> Option<u64> {
        self.relay.is_none().then_some(self.remaining)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(chunk) = this.buffered.pop_front() {
            this.remaining = this.remaining.saturating_sub(chunk.len() as u64);
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(relay) = this.relay.as_mut() {
            let polled = Pin::new(&mut relay.rest).poll_frame(cx);
            if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
                // The backend is done with this request: free its thread
                // (a whole body has put its connection back already).
                if let Some((h, t)) = relay.timer.take() {
                    h.observe(t.elapsed().as_secs_f64());
                }
                this.relay = None;
            }
            return polled;
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(*t))))
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_empty()
            && self.relay.as_ref().is_none_or(|r| r.rest.is_end_stream())
            && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.relay {
            None => SizeHint::with_exact(self.remaining),
            Some(relay) => {
                let r = &relay.rest;
                // What is still buffered plus what the backend has yet to
                // send. Raised upper bound first: `SizeHint` asserts
                // lower <= upper on every set.
                let buffered = self.buffered.len();
                let rest = r.size_hint();
                let mut h = SizeHint::new();
                if let Some(u) = rest.upper() {
                    h.set_upper(u.saturating_add(buffered));
                }
                h.set_lower(rest.lower().saturating_add(buffered));
                h
            }
        }
    }
}

/// A plain-text response, for the admin listener and simple answers.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_buffered_body_gives_its_chunks_in_order_and_skips_empty_ones() {
        let mut chunks = Chunks::default();
        for c in ["", "ab", "", "c", "def"] {
            chunks.push_back(Bytes::from(c));
        }
        assert_eq!(chunks.len(), 6);
        let mut body = ProxyBody::buffered(chunks, 6, None);
        assert_eq!(body.size_hint().exact(), Some(6));
        let mut seen = Vec::new();
        while let Some(frame) = body.frame().await {
            seen.push(frame.unwrap().into_data().unwrap());
        }
        assert_eq!(seen, ["ab", "c", "def"]);
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn an_empty_body_ends_at_once() {
        let mut body = ProxyBody::full(Bytes::new());
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }
}
