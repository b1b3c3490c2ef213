//! What the process reports about itself: Prometheus metrics (the contract
//! in `docs/DESIGN.md`) and the access log.

pub mod access_log;
pub mod metrics;
