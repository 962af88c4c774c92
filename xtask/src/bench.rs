//! `cargo xtask bench`: the agent's cost per syscall.
use std::path::Path;

use anyhow::Result;

pub fn run(_agent: &Path, _iterations: u64) -> Result<()> {
    anyhow::bail!("not written yet")
}
