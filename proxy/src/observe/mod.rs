//! What the process reports about itself: Prometheus metrics (the contract
//! in `docs/DESIGN.md`) and the access log.

pub mod access_log;
pub mod histogram;
pub mod metrics;

/// Milliseconds since the Unix epoch (0 for a time before it): how `/status`,
/// the status page and `X-Request-Start` write a time.
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
