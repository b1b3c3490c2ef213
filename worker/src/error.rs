//! Errors: [`Error`] for starting and running a server, and the answers the front
//! gives on its own when a request cannot reach a handler ([`Rejection`]).

use std::io;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// Why a server could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The OS refused to start a pool thread.
    #[error("cannot spawn worker thread {name}: {source}")]
    SpawnThread {
        /// The name the thread would have had.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The listener's local address could not be read.
    #[error("cannot read the listener's local address: {0}")]
    LocalAddr(#[source] io::Error),
    /// The listen address could not be bound (CLI only).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address as given.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The tokio runtime could not be built (CLI only).
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
}

/// An answer produced by the server itself instead of the handler.
///
/// [`Rejection::response`] is the one place that maps these to status codes. Every
/// body is a short plain-text line naming the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// All threads are busy and the queue is full.
    QueueFull { threads: usize, queue: usize },
    /// The server is draining and takes no new work.
    ShuttingDown,
    /// The request body is larger than `max_body`.
    BodyTooLarge { limit: usize },
    /// The client paused longer than the body read timeout between two chunks.
    BodyTimeout { after: Duration },
    /// The body could not be read (client reset, bad chunked framing, ...).
    BodyRead(String),
    /// The handler panicked.
    HandlerPanicked,
    /// The pool dropped the request without answering. Should not happen.
    NoAnswer,
}

impl Rejection {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::QueueFull { .. } | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::BodyRead(_) => StatusCode::BAD_REQUEST,
            Self::HandlerPanicked | Self::NoAnswer => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::QueueFull { threads, queue } => format!(
                "server busy: all {threads} threads busy and {queue} requests queued; retry later"
            ),
            Self::ShuttingDown => "server shutting down; retry on another worker".into(),
            Self::BodyTooLarge { limit } => {
                format!("request body too large: the limit is {limit} bytes")
            }
            Self::BodyTimeout { after } => {
                format!("request body timeout: no data for {after:?}")
            }
            Self::BodyRead(e) => format!("cannot read request body: {e}"),
            Self::HandlerPanicked => "internal server error: the handler panicked".into(),
            Self::NoAnswer => "internal server error: the request was dropped".into(),
        }
    }

    /// Whether the connection must not be reused (the body may be half read).
    pub(crate) fn closes_connection(&self) -> bool {
        matches!(
            self,
            Self::BodyTooLarge { .. } | Self::BodyTimeout { .. } | Self::BodyRead(_)
        )
    }

    pub(crate) fn response(&self) -> Response<Bytes> {
        let mut resp = Response::new(Bytes::from(self.message() + "\n"));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if matches!(self, Self::QueueFull { .. } | Self::ShuttingDown) {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, Self::QueueFull { .. }) {
            h.insert(
                crate::load::X_USHER_REFUSED,
                HeaderValue::from_static(crate::load::REFUSED_BUSY),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_full_is_503_with_retry_after() {
        let r = Rejection::QueueFull {
            threads: 2,
            queue: 2,
        }
        .response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert_eq!(r.headers()[crate::load::X_USHER_REFUSED], "busy");
        assert!(std::str::from_utf8(r.body()).unwrap().contains("busy"));
        // Draining is no refusal for lack of a thread: it is not marked.
        let r = Rejection::ShuttingDown.response();
        assert!(r.headers().get(crate::load::X_USHER_REFUSED).is_none());
    }

    #[test]
    fn body_errors_map_to_4xx() {
        assert_eq!(
            Rejection::BodyTooLarge { limit: 1 }.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            Rejection::BodyTimeout {
                after: Duration::from_secs(1)
            }
            .status(),
            StatusCode::REQUEST_TIMEOUT
        );
    }
}
