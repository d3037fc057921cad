//! The Stella agent: holds an mTLS identity generated on its own host, dials out to the control
//! plane (it never listens), verifies every signed job offline against keys pinned at enrollment,
//! runs it with an executor plugin, and reports results and inventory.
//!
//! The agent never depends on the control plane crate: they share only `stella-proto` (wire) and
//! `stella-pki` (identity, signatures).

pub mod config;
pub mod enroll;
pub mod executors;
pub mod identity;
pub mod inventory;
pub mod journal;
pub mod relay;
pub mod runtime;
pub mod steps;
pub mod transport;
pub mod watch;
