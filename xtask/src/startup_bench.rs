//! `cargo xtask bench --only startup`: how long `openbox-agent trace -- CMD` makes the
//! user wait, beside the same command run bare.
//!
//! CMD prints the wall-clock time it starts at (`date +%s.%N`); the bench notes when it
//! spawned the agent and when the agent exited. Start-up is spawn → command start; exit
//! is command start → agent exit (the command itself takes ~1 ms). Medians over the
//! runs; the bare command gives the floor of both on this machine.
//!
//! The agent hands its detach to a child that finishes after it exits (see the agent's
//! capture/detach.rs), and the kernel attaches and detaches tracepoints under one lock:
//! a `trace` started while an earlier one's detach is still running waits for it. So
//! start-up is measured twice: spaced (a pause before each run) and back to back.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};

const RUNS: usize = 7;

pub fn run(agent: &Path) -> Result<()> {
    println!("bench startup: `trace -- sh -c 'date +%s.%N'`, {RUNS} runs, medians");
    let bare = measure(None, false)?;
    let traced = measure(Some(agent), true)?;
    let back_to_back = measure(Some(agent), false)?;
    println!("  {:<24} {:>10} {:>10}", "", "start (ms)", "exit (ms)");
    println!("  {:<24} {:>10.1} {:>10.1}", "bare sh", bare.0, bare.1);
    println!(
        "  {:<24} {:>10.1} {:>10.1}",
        "trace, spaced runs", traced.0, traced.1
    );
    println!(
        "  {:<24} {:>10.1} {:>10.1}",
        "trace, back to back", back_to_back.0, back_to_back.1
    );
    println!(
        "  added by the agent: start +{:.0} ms, exit +{:.0} ms (targets: start ≤ 500 ms, exit ≤ 200 ms)",
        traced.0 - bare.0,
        traced.1 - bare.1
    );
    Ok(())
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Median (start, exit) in ms.
fn measure(agent: Option<&Path>, spaced: bool) -> Result<(f64, f64)> {
    let (mut starts, mut exits) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        if spaced {
            // Longer than an earlier run's background detach (2–4 s).
            std::thread::sleep(std::time::Duration::from_secs(5));
        }
        let script = ["/bin/sh", "-c", "date +%s.%N"];
        let mut cmd = match agent {
            Some(agent) => {
                let mut c = Command::new(agent);
                c.arg("trace").arg("--").args(script);
                c
            }
            None => {
                let mut c = Command::new(script[0]);
                c.args(&script[1..]);
                c
            }
        };
        let spawned = now();
        let out = cmd
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .context("running the startup bench command")?;
        let ended = now();
        if !out.status.success() {
            bail!("the startup bench command failed: {}", out.status);
        }
        // The agent prints its own lines too; the command's is a bare number.
        let started: f64 = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .next_back()
            .context("the command printed no start time")?;
        starts.push((started - spawned) * 1e3);
        exits.push((ended - started) * 1e3);
    }
    Ok((crate::bench::median(starts), crate::bench::median(exits)))
}
