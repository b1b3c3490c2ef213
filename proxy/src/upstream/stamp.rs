//! What Usher tells a backend about a request's timing, for the APM and
//! autoscaling world: Usher's queue is *before* the backend, so these
//! headers are how an app's agent sees queueing at all.

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub static X_REQUEST_START: HeaderName = HeaderName::from_static("x-request-start");
pub static X_USHER_QUEUE_MS: HeaderName = HeaderName::from_static("x-usher-queue-ms");

/// `X-Request-Start`: the request's arrival in integer milliseconds since
/// the epoch (13 digits, Heroku's form, which New Relic, Scout, Judoscale
/// and HireFire all read), and `X-Usher-Queue-Ms`: the time it waited in
/// Usher's queue. Both replace whatever the client sent.
///
/// Kept as numbers: a request encoded straight to the wire (`h1::Outgoing`)
/// writes their digits, with no header value made.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    fields: [(&'static HeaderName, u64); 2],
}

impl Stamp {
    pub fn new(at: std::time::SystemTime, queued: std::time::Duration) -> Self {
        Stamp {
            fields: [
                (&X_REQUEST_START, crate::observe::unix_ms(at)),
                (&X_USHER_QUEUE_MS, queued.as_millis() as u64),
            ],
        }
    }

    /// The two headers, as name and number.
    pub fn fields(&self) -> &[(&'static HeaderName, u64)] {
        &self.fields
    }

    /// Sets both headers in `h`.
    pub fn insert_into(&self, h: &mut HeaderMap) {
        for &(name, n) in &self.fields {
            h.insert(name.clone(), HeaderValue::from(n));
        }
    }
}
