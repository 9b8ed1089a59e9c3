//! The credential broker daemon: library behind the `broker` binary.
//!
//! See `docs/ARCHITECTURE.md` for how the pieces fit together.

pub mod broker;
pub mod config;
pub mod connector;
pub mod provider;
pub mod secret;
pub mod tls;
