//! `cargo xtask bench pg` (filled in with the PostgreSQL connector).
use std::path::Path;

pub fn pg(_root: &Path, _seconds: u32) -> anyhow::Result<()> {
    anyhow::bail!("bench not written yet")
}
