//! What Usher tells a backend about a request's timing, for the APM and
//! autoscaling world: Usher's queue is *before* the backend, so these
//! headers are how an app's agent sees queueing at all.

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub static X_REQUEST_START: HeaderName = HeaderName::from_static("x-request-start");
pub static X_USHER_QUEUE_MS: HeaderName = HeaderName::from_static("x-usher-queue-ms");

/// Sets `X-Request-Start` to `at` in integer milliseconds since the epoch
/// (13 digits, Heroku's form, which New Relic, Scout, Judoscale and HireFire
/// all read), replacing whatever the client sent, and `X-Usher-Queue-Ms` to
/// the time the request waited in Usher's queue.
pub fn stamp_request_start(
    h: &mut HeaderMap,
    at: std::time::SystemTime,
    queued: std::time::Duration,
) {
    for (name, value) in request_start(at, queued) {
        h.insert(name.clone(), value);
    }
}

/// The two headers of [`stamp_request_start`], for a request encoded
/// straight to the wire (`h1::Outgoing`).
pub fn request_start(
    at: std::time::SystemTime,
    queued: std::time::Duration,
) -> [(&'static HeaderName, HeaderValue); 2] {
    [
        (
            &X_REQUEST_START,
            HeaderValue::from(crate::observe::unix_ms(at)),
        ),
        (
            &X_USHER_QUEUE_MS,
            HeaderValue::from(queued.as_millis() as u64),
        ),
    ]
}
