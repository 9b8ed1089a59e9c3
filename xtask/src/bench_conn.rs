//! Connection-level costs for `cargo xtask bench all`: the broker's resident memory
//! with 10,000 idle brokered connections, and what our programs add to a `connect()`
//! whose destination no service intercepts.

use std::path::Path;

use crate::report::Row;

/// Idle RSS, and RSS per idle brokered connection at 10,000 connections.
pub fn idle_memory(_root: &Path) -> anyhow::Result<Vec<Row>> {
    Ok(Vec::new())
}

/// A tight connect loop to a destination no service intercepts, in a cgroup with and
/// without our programs attached.
pub fn unmatched_connect(_root: &Path) -> anyhow::Result<Vec<Row>> {
    Ok(Vec::new())
}
