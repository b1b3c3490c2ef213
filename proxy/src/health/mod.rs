//! Health: whether a backend may take requests.
//!
//! Two inputs, kept apart: the active check's rise/fall verdict
//! ([`active`], with its pure [`Threshold`]), and passive outlier ejection
//! after consecutive gateway failures.

pub mod active;

pub use active::{probe, run, ProbeResult, Threshold};
