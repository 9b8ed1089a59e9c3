//! The credential broker daemon: library behind the `broker` binary.
//!
//! See `docs/ARCHITECTURE.md` for how the pieces fit together.
#![deny(unsafe_code)]

pub mod admin;
pub mod admin_revoke;
pub mod app;
pub mod audit;
pub mod btf;
pub mod ca;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod connector;
pub mod drain;
pub mod ebpf;
pub mod fdstore;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod pidns;
pub mod policy;
pub mod privilege;
pub mod proxy;
pub mod ratelimit;
pub mod resolver;
pub mod runtime;
pub mod secret;
pub mod secrets;
// Every raw system call lives in `sys`; nothing else may use `unsafe`.
#[allow(unsafe_code)]
pub mod sys;
pub mod tls;
pub mod watch;
