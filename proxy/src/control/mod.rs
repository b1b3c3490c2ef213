//! The control plane: the hot state and how it is rebuilt (two-phase:
//! build without touching anything live, swap, then commit), reloads, and
//! the admin API.

pub mod admin;
pub mod reload;
pub mod state;
