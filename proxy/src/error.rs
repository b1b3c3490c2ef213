//! Usher's error type and the one place that maps errors to status codes.

use std::time::Duration;

use http::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no route for host `{host}` and path `{path}`")]
    NoRoute { host: String, path: String },
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("client sent the request body too slowly (no data for {0:?})")]
    ClientTooSlow(Duration),
    #[error("client did not send the whole request within {0:?}")]
    RequestDeadline(Duration),
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// A request head past the edge's limits (`edge/h1.rs`): too many
    /// headers or too many bytes.
    #[error("{0}")]
    HeadTooLarge(&'static str),
    #[error("request target too long")]
    UriTooLong,
    #[error("method {0} is not supported by this proxy")]
    MethodNotAllowed(String),
    #[error("client connection failed while reading the body: {0}")]
    ClientBody(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("queue full for upstream `{upstream}`")]
    QueueFull { upstream: String },
    #[error("queue wait timed out for upstream `{upstream}`")]
    QueueTimeout { upstream: String },
    /// Shed by overload control: the queue stood past capacity and this
    /// request had waited longer than `queue.overload_target`.
    #[error("queue overloaded for upstream `{upstream}`")]
    QueueOverloaded { upstream: String },
    #[error("no healthy backend for upstream `{upstream}`")]
    NoBackend { upstream: String },
    #[error("cannot reach backend {backend}: {reason}")]
    Connect { backend: String, reason: String },
    #[error("backend {backend} failed: {reason}")]
    Upstream { backend: String, reason: String },
    #[error("backend {backend} did not answer within {timeout:?}")]
    UpstreamTimeout { backend: String, timeout: Duration },
    #[error("every backend of upstream `{upstream}` has its most upgraded connections open")]
    UpgradeLimit { upstream: String },
}

impl Error {
    /// What the client reads in the body. Gateway failures (502, 504) stay
    /// generic: a client learns nothing of backend addresses or connect
    /// errors (they go to the access log's `error` field and the error log).
    /// The rest say what was wrong with the request or why it was refused.
    pub fn client_text(&self) -> String {
        match self {
            Error::Connect { .. } | Error::Upstream { .. } => {
                "upstream app unavailable".to_string()
            }
            Error::UpstreamTimeout { .. } => "upstream app did not answer in time".to_string(),
            other => other.to_string(),
        }
    }

    /// The status code the client sees.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::NoRoute { .. } => StatusCode::NOT_FOUND,
            Error::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::ClientTooSlow(_) | Error::RequestDeadline(_) => StatusCode::REQUEST_TIMEOUT,
            Error::BadRequest(_) | Error::ClientBody(_) => StatusCode::BAD_REQUEST,
            Error::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Error::UriTooLong => StatusCode::URI_TOO_LONG,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::QueueFull { .. }
            | Error::QueueTimeout { .. }
            | Error::QueueOverloaded { .. }
            | Error::NoBackend { .. }
            | Error::UpgradeLimit { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::Connect { .. } | Error::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Error::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Seconds for `Retry-After` on answers that mean "try again later".
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Error::QueueFull { .. }
            | Error::QueueTimeout { .. }
            | Error::QueueOverloaded { .. }
            | Error::UpgradeLimit { .. } => Some(1),
            Error::NoBackend { .. } => Some(5),
            _ => None,
        }
    }

    /// Whether the client connection must be closed after this answer
    /// (the rest of its byte stream can no longer be trusted).
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            Error::BadRequest(_)
                | Error::HeadTooLarge(_)
                | Error::UriTooLong
                | Error::MethodNotAllowed(_)
                | Error::ClientTooSlow(_)
                | Error::RequestDeadline(_)
                | Error::BodyTooLarge { .. }
                | Error::ClientBody(_)
        )
    }
}

/// Renders an error with its causes: hyper's top-level messages are vague.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
