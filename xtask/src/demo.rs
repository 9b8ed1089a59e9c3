//! `cargo xtask demo` (filled in with the PostgreSQL connector).
use std::path::Path;

pub fn run(_root: &Path) -> anyhow::Result<()> {
    anyhow::bail!("demo not written yet")
}
