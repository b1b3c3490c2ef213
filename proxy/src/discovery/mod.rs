//! Where backends come from besides the config file: DNS (a Kubernetes
//! headless Service) and the fleet of processes Usher starts itself.
//!
//! Discovery only finds addresses. It hands each new set to a callback that
//! the control layer gives it, so it never reaches into the state.

pub mod dns;
pub mod fleet;
