//! `cargo xtask fuzz`: runs the protocol parsers' cargo-fuzz targets, each for a set time,
//! starting from the committed seed inputs, and prints libFuzzer's final statistics.

use std::{fs, process::Command};

use anyhow::{bail, Context, Result};

use crate::{run, workspace_root};

pub const TARGETS: [&str; 6] = ["http", "http2", "postgres", "mysql", "redis", "mongo"];

fn ensure_cargo_fuzz() -> Result<()> {
    let ok = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
        .context("cargo-fuzz could not be installed: run `cargo install cargo-fuzz --locked`")
}

pub fn run_fuzz(targets: &[String], seconds: u64) -> Result<()> {
    crate::toolchain::build_ebpf()?;
    ensure_cargo_fuzz()?;
    let fuzz_dir = workspace_root().join("openbox-agent/fuzz");
    let targets: Vec<String> = if targets.is_empty() {
        TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        targets.to_vec()
    };
    for t in &targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("unknown fuzz target {t}: one of {}", TARGETS.join(", "));
        }
        // Work on a copy of the seeds: the corpus grows, the committed seeds do not.
        let corpus = fuzz_dir.join("corpus").join(t);
        fs::create_dir_all(&corpus)?;
        let seeds = fuzz_dir.join("seeds").join(t);
        if let Ok(entries) = fs::read_dir(&seeds) {
            for e in entries.flatten() {
                let _ = fs::copy(e.path(), corpus.join(e.file_name()));
            }
        }
        eprintln!("xtask: fuzzing {t} for {seconds} s");
        run(Command::new("cargo")
            .current_dir(&fuzz_dir)
            .args(["+nightly", "fuzz", "run", t])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1"))?;
    }
    Ok(())
}
