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
//!
//! The daemon (`openbox-agent run`) is measured as a rolling update restarts it: SIGTERM
//! to exit (stop), then a new daemon at once, spawn to its hook socket accepting
//! connections (start: the socket is bound after the programs are attached).

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};

use crate::{bench::median, proc::Proc};

/// Medians, in ms.
pub struct Startup {
    pub bare_start: f64,
    pub bare_exit: f64,
    pub trace_start: f64,
    pub trace_exit: f64,
    pub daemon_stop: f64,
    pub daemon_ready: f64,
}

pub fn run(agent: &Path, runs: usize) -> Result<Startup> {
    println!("\nbench startup: `trace -- sh -c 'date +%s.%N'`, {runs} runs, medians");
    let bare = measure(None, false, runs)?;
    let traced = measure(Some(agent), true, runs)?;
    let back_to_back = measure(Some(agent), false, runs)?;
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
    let (stop, ready) = daemon_restarts(agent, runs)?;
    println!(
        "  daemon restart (SIGTERM, then a new `run` at once): stop {stop:.0} ms, start to hook socket ready {ready:.0} ms"
    );
    Ok(Startup {
        bare_start: bare.0,
        bare_exit: bare.1,
        trace_start: traced.0,
        trace_exit: traced.1,
        daemon_stop: stop,
        daemon_ready: ready,
    })
}

/// Median (stop, start-to-ready) in ms over `runs` restarts of `openbox-agent run`.
fn daemon_restarts(agent: &Path, runs: usize) -> Result<(f64, f64)> {
    let dir = std::env::temp_dir().join(format!("openbox-restart-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("agent.sock");
    let start = || -> Result<(Proc, f64)> {
        let _ = std::fs::remove_file(&socket);
        let spawned = Instant::now();
        let mut daemon = Proc::service(
            "openbox-agent run",
            Command::new(agent)
                .arg("run")
                .arg("--socket")
                .arg(&socket)
                .arg("--events")
                .arg(dir.join("events.jsonl"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        daemon.wait_for_socket(&socket, Duration::from_secs(60))?;
        Ok((daemon, spawned.elapsed().as_secs_f64() * 1e3))
    };
    let (mut daemon, _) = start()?;
    let (mut stops, mut readies) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let asked = Instant::now();
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(daemon.pid() as libc::pid_t, libc::SIGTERM) };
        daemon.wait(Duration::from_secs(60))?;
        stops.push(asked.elapsed().as_secs_f64() * 1e3);
        let (next, ready) = start()?;
        readies.push(ready);
        daemon = next;
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
    Ok((median(stops), median(readies)))
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Median (start, exit) in ms.
fn measure(agent: Option<&Path>, spaced: bool, runs: usize) -> Result<(f64, f64)> {
    let (mut starts, mut exits) = (Vec::new(), Vec::new());
    for _ in 0..runs {
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
    Ok((median(starts), median(exits)))
}
