//! `cargo xtask bench`: the agent's cost per syscall.
//!
//! Runs `openbox-agent/examples/syscall_loop` (three loops: 1-byte and 4 KiB write+read
//! pairs on an AF_UNIX socketpair, open+read+close of a 100-byte file in /tmp) under
//! three conditions, interleaved over several rounds:
//! - baseline: no agent;
//! - unwatched: `openbox-agent trace --json [--raw] --pid <idle sleep>` running, so every
//!   program is attached but the loop process is filtered out by the watched-map lookup;
//! - watched: `openbox-agent trace --json -- syscall_loop <loop>` (one agent run per loop,
//!   so each gets its own summary), its stdout drained through a pipe and thrown away
//!   except for the last line (the summary, which span output puts on stderr instead).
//!
//! Each syscall_loop run reports, per loop, the median of its timed batches; the table
//! shows the median of those over the rounds. One more round, with
//! `kernel.bpf_stats_enabled` on, reads the agent's programs' run time over the loops
//! (from its fdinfo, while the loops' process is still alive) to split the added cost
//! per syscall into what the programs ran and the rest (the syscall slow path,
//! trampolines, the ring's wake-ups). All of it once per capture mode the kernel has (`--capture-mode fentry`, `tracepoint`), each with its own baseline.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::proc::Proc;

const ROUNDS: usize = 5;
/// (name, label, syscalls per iteration) of each syscall_loop loop.
pub const LOOPS: [(&str, &str, u64); 3] = [
    ("sock1", "socketpair 1 B write+read", 2),
    ("sock4k", "socketpair 4 KiB write+read", 2),
    ("file", "open+read 100 B+close /tmp", 3),
];
/// Time given to the unwatched agent to load and attach its programs (it takes ~0.5 s).
const ATTACH_WAIT: Duration = Duration::from_secs(2);
/// Pause of the watched loop process before its loops, so the agent has handled its
/// exec first: a socket created within ~2 ms of exec loses its egress capture after a
/// millisecond or two (the agent's post-exec fd resync races with it), which would
/// leave half the payload uncaptured and the watched figure too low.
const SETTLE_MS: &str = "300";
/// Pause of the watched loop process after its results, while the bench reads the
/// agent's program counters.
const HOLD_MS: &str = "400";

/// One loop's medians in one capture mode, ns per iteration.
pub struct Row {
    /// The agent's capture mode ("auto": whatever the agent chooses on this kernel).
    pub mode: &'static str,
    pub label: &'static str,
    pub syscalls: u64,
    pub baseline: f64,
    pub unwatched: f64,
    pub watched: f64,
}

pub fn run(agent: &Path, iterations: u64, modes: &[&'static str]) -> Result<Vec<Row>> {
    if iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    let loop_bin = build_syscall_loop()?;
    // `trace --json` prints spans when the agent has a span mode (the summary then goes
    // to stderr, without the probe-hit counters); `--raw` brings back the records and
    // the full summary, which the unwatched run uses to check the agent was attached.
    let help = Command::new(agent)
        .args(["trace", "--help"])
        .output()
        .with_context(|| format!("could not run {}", agent.display()))?;
    let has_raw = String::from_utf8_lossy(&help.stdout).contains("--raw");
    let mut rows = Vec::new();
    for &mode in modes {
        let bench = Bench {
            agent: agent.to_path_buf(),
            has_raw,
            loop_bin: loop_bin.clone(),
            iterations,
            out: std::env::temp_dir().join(format!("openbox-bench-{}.json", std::process::id())),
            mode,
        };
        let result = bench.all();
        let _ = std::fs::remove_file(&bench.out);
        rows.extend(result?);
    }
    Ok(rows)
}

/// Builds `openbox-agent/examples/syscall_loop` (release) and returns its path.
pub fn build_syscall_loop() -> Result<PathBuf> {
    let root = crate::workspace_root();
    crate::run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "openbox-agent",
        "--example",
        "syscall_loop",
    ]))?;
    Ok(root.join("target/release/examples/syscall_loop"))
}

/// One syscall_loop result: loop, median ns per iteration, iterations run (with warm-up).
type LoopResult = (&'static str, f64, u64);
/// Per (loop, condition), the ns per iteration of each run.
type Runs = BTreeMap<(&'static str, Cond), Vec<f64>>;
/// Per loop, each watched run's iterations (with warm-up) and agent summary line.
type Summaries = BTreeMap<&'static str, Vec<(u64, String)>>;
/// The agent's programs' run time per syscall of the loops, ns, in the round with
/// bpf_stats on (None where not read).
#[derive(Default)]
struct Progs {
    /// Over all three loops (one unwatched run runs them all).
    unwatched: Option<f64>,
    watched: BTreeMap<&'static str, Option<f64>>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Cond {
    Baseline,
    Unwatched,
    Watched,
}

struct Bench {
    agent: PathBuf,
    /// The agent takes `trace --raw` (records instead of spans).
    has_raw: bool,
    loop_bin: PathBuf,
    iterations: u64,
    out: PathBuf,
    /// The agent's `--capture-mode`.
    mode: &'static str,
}

impl Bench {
    fn all(&self) -> Result<Vec<Row>> {
        let started = Instant::now();
        println!(
            "bench: capture mode {}: {} iterations per loop, {ROUNDS} rounds of baseline / unwatched / watched",
            self.mode, self.iterations
        );
        println!(
            "  unwatched: `{} --pid <sleep>`; watched: `trace --json -- syscall_loop <loop>`{}, stdout drained",
            if self.has_raw { "trace --json --raw" } else { "trace --json" },
            if self.has_raw { " (span output)" } else { "" },
        );
        let mut runs: Runs = BTreeMap::new();
        let mut summaries: Summaries = BTreeMap::new();
        let mut unwatched_summaries = Vec::new();
        for round in 1..=ROUNDS {
            for (kind, ns, _) in self.baseline()? {
                runs.entry((kind, Cond::Baseline)).or_default().push(ns);
            }
            let (results, summary, _) = self.unwatched()?;
            for (kind, ns, _) in results {
                runs.entry((kind, Cond::Unwatched)).or_default().push(ns);
            }
            unwatched_summaries.push(summary);
            for (kind, _, _) in LOOPS {
                let (ns, total, summary, _) = self.watched(kind)?;
                runs.entry((kind, Cond::Watched)).or_default().push(ns);
                summaries.entry(kind).or_default().push((total, summary));
            }
            let show = |c| {
                LOOPS
                    .iter()
                    .map(|(k, _, _)| format!("{:.0}", runs[&(*k, c)].last().unwrap()))
                    .collect::<Vec<_>>()
                    .join("/")
            };
            println!(
                "  round {round}/{ROUNDS} ({:.0} s): ns/iter sock1/sock4k/file: baseline {}, unwatched {}, watched {}",
                started.elapsed().as_secs_f64(),
                show(Cond::Baseline),
                show(Cond::Unwatched),
                show(Cond::Watched)
            );
        }
        let rows = self.report(&runs, &summaries, &unwatched_summaries);
        // One more round with the programs' counters on, apart: they add two clock reads
        // to every program run, which the timed rounds above must not pay.
        let stats = crate::load_bench::BpfStats::enable();
        let mut progs = Progs::default();
        if stats.is_on() {
            progs.unwatched = self.unwatched()?.2;
            for (kind, _, _) in LOOPS {
                progs.watched.insert(kind, self.watched(kind)?.3);
            }
        }
        drop(stats);
        self.report_programs(&runs, &progs);
        println!("bench: done in {:.0} s", started.elapsed().as_secs_f64());
        Ok(rows)
    }

    /// `syscall_loop --iterations N --out FILE LOOPS...`, run by the agent when
    /// `watched` (and clears FILE).
    fn loop_cmd(&self, watched: bool, loops: &[&str]) -> Command {
        let _ = std::fs::remove_file(&self.out);
        let mut cmd = if watched {
            let mut c = Command::new(&self.agent);
            c.args(["trace", "--json", "--capture-mode", self.mode, "--"])
                .arg(&self.loop_bin)
                .args(["--settle-ms", SETTLE_MS, "--hold-ms", HOLD_MS]);
            c
        } else {
            Command::new(&self.loop_bin)
        };
        cmd.args(["--iterations", &self.iterations.to_string(), "--out"])
            .arg(&self.out)
            .args(loops)
            .stdin(Stdio::null());
        cmd
    }

    /// (loop, median ns per iteration, iterations run including the warm-up).
    fn results(&self) -> Result<Vec<LoopResult>> {
        let text = std::fs::read_to_string(&self.out)
            .with_context(|| format!("syscall_loop wrote no results to {}", self.out.display()))?;
        let mut out = Vec::new();
        for line in text.lines() {
            let kind = LOOPS
                .iter()
                .map(|(k, _, _)| *k)
                .find(|k| line.contains(&format!("\"loop\":\"{k}\"")))
                .with_context(|| format!("unexpected syscall_loop line {line:?}"))?;
            let ns = json_num(line, "ns_per_iter")
                .with_context(|| format!("no ns_per_iter in {line:?}"))?;
            let total = json_num(line, "total_iterations")
                .with_context(|| format!("no total_iterations in {line:?}"))?;
            out.push((kind, ns, total as u64));
        }
        Ok(out)
    }

    fn baseline(&self) -> Result<Vec<LoopResult>> {
        crate::run(&mut self.loop_cmd(false, &[]))?;
        self.results()
    }

    /// Agent attached and watching an idle `sleep`; the loops run outside it. Also
    /// returns the agent's programs' run time per syscall of the loops (every process's
    /// runs while the loops ran, so the bench's and the node's own syscalls too).
    fn unwatched(&self) -> Result<(Vec<LoopResult>, String, Option<f64>)> {
        let sleep = Proc::spawn(
            "sleep 600",
            Command::new("sleep").arg("600").stdin(Stdio::null()),
            false,
        )?;
        let mut agent = Proc::spawn(
            "agent (unwatched)",
            Command::new(&self.agent)
                .args(["trace", "--json", "--capture-mode", self.mode])
                .args(self.has_raw.then_some("--raw"))
                .args(["--pid", &sleep.pid().to_string()])
                .stdin(Stdio::null()),
            true,
        )?;
        std::thread::sleep(ATTACH_WAIT);
        if let Some(status) = agent.try_wait()? {
            bail!("the agent exited early ({status}): {}", agent.stderr_text());
        }
        let before = program_ns(agent.pid());
        crate::run(&mut self.loop_cmd(false, &[]))?;
        let after = program_ns(agent.pid());
        let results = self.results()?;
        agent.interrupt()?;
        let status = agent.wait(Duration::from_secs(60))?;
        if !status.success() {
            bail!("the agent failed ({status}): {}", agent.stderr_text());
        }
        drop(sleep);
        let summary = agent.summary()?;
        // Every syscall of the loops must have reached the agent's (unwatched) filter.
        let loop_syscalls: u64 = LOOPS.iter().map(|(_, _, n)| n * self.iterations).sum();
        let hits = json_num(&summary, "unwatched_hits").map(|h| h as u64);
        if let Some(hits) = hits.filter(|&h| h < loop_syscalls) {
            println!(
                "  warning: the unwatched agent saw {hits} unwatched hits, fewer than the loops' {loop_syscalls} syscalls: was it attached in time?"
            );
        }
        let run_syscalls: u64 = results
            .iter()
            .map(|(kind, _, total)| total * syscalls_per_iter(kind))
            .sum();
        let progs = per_syscall(before, after, run_syscalls);
        Ok((results, summary, progs))
    }

    /// The loop run by the agent, which watches it; returns ns/iter, the iterations
    /// run, the agent's summary and its programs' run time per syscall of the loop (the
    /// whole run's, read once the results are written, while the loop process holds).
    fn watched(&self, kind: &'static str) -> Result<(f64, u64, String, Option<f64>)> {
        let mut agent = Proc::spawn("agent (watched)", &mut self.loop_cmd(true, &[kind]), true)?;
        let limit = Duration::from_secs(120 + self.iterations / 1000);
        let deadline = Instant::now() + limit;
        let mut progs = None;
        while Instant::now() < deadline && agent.try_wait()?.is_none() {
            if self.out.exists() {
                progs = program_ns(agent.pid());
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let status = agent.wait(deadline.saturating_duration_since(Instant::now()))?;
        if !status.success() {
            bail!(
                "watched run of {kind} failed ({status}): {}",
                agent.stderr_text()
            );
        }
        let summary = agent.summary()?;
        let results = self.results()?;
        let (ns, total) = results
            .iter()
            .find(|(k, _, _)| *k == kind)
            .map(|(_, ns, total)| (*ns, *total))
            .with_context(|| format!("no {kind} result"))?;
        let progs = per_syscall(Some(0), progs, total * syscalls_per_iter(kind));
        Ok((ns, total, summary, progs))
    }

    /// What the added cost per syscall is made of: the agent's programs' run time per
    /// syscall of the loops, and the rest.
    fn report_programs(&self, runs: &Runs, progs: &Progs) {
        println!();
        if progs.unwatched.is_none() && progs.watched.values().all(Option::is_none) {
            println!("the agent's programs' run time: not measured (kernel.bpf_stats_enabled could not be set, or no run was read)");
            return;
        }
        let med = |kind, c| median(runs[&(kind, c)].clone());
        println!(
            "added ns per syscall, split: medians of the rounds above = programs (the agent's BPF programs' run_time_ns / the loops' syscalls, tail calls included, from one more round with kernel.bpf_stats_enabled on) + rest (the syscall slow path or trampolines, the ring's wake-ups, caches):"
        );
        for (kind, label, n) in LOOPS {
            let b = med(kind, Cond::Baseline);
            let split = |c: Cond, p: Option<f64>| {
                let added = (med(kind, c) - b) / n as f64;
                match p {
                    Some(p) => format!(
                        "{added:>+6.0} = programs {p:>4.0} + rest {:>+5.0}",
                        added - p
                    ),
                    None => format!("{added:>+6.0} (programs not read)"),
                }
            };
            println!(
                "  {:<30} unwatched {}   watched {}",
                label,
                split(Cond::Unwatched, progs.unwatched),
                split(Cond::Watched, progs.watched.get(kind).copied().flatten()),
            );
        }
    }

    fn report(&self, runs: &Runs, summaries: &Summaries, unwatched: &[String]) -> Vec<Row> {
        let med = |kind, c| median(runs[&(kind, c)].clone());
        // One row per (mode, loop): a capture mode measured is a set of rows more.
        let rows: Vec<Row> = LOOPS
            .iter()
            .map(|&(kind, label, syscalls)| Row {
                mode: self.mode,
                label,
                syscalls,
                baseline: med(kind, Cond::Baseline),
                unwatched: med(kind, Cond::Unwatched),
                watched: med(kind, Cond::Watched),
            })
            .collect();
        let spread = |kind, c| {
            let v = &runs[&(kind, c)];
            let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = v.iter().cloned().fold(0.0, f64::max);
            format!("{lo:.0}-{hi:.0}")
        };
        println!();
        println!("capture mode {}:", self.mode);
        println!(
            "ns per iteration (median over {ROUNDS} rounds of each run's median of 15 timed batches; {} iterations per run):",
            self.iterations
        );
        println!(
            "{:<6} {:<30} {:>9} | {:>24} | {:>24}",
            "mode", "loop (syscalls/iter)", "baseline", "unwatched (+ns, ×)", "watched (+ns, ×)"
        );
        println!("{}", "-".repeat(7 + 30 + 1 + 9 + 3 + 24 + 3 + 24));
        for r in &rows {
            let cell = |v: f64| format!("{v:.0} ({:+.0}, ×{:.2})", v - r.baseline, v / r.baseline);
            println!(
                "{:<6} {:<30} {:>9.0} | {:>24} | {:>24}",
                r.mode,
                format!("{} ({})", r.label, r.syscalls),
                r.baseline,
                cell(r.unwatched),
                cell(r.watched)
            );
        }
        println!();
        println!("added ns per syscall (added per iteration / syscalls per iteration):");
        for (kind, label, n) in LOOPS {
            let b = med(kind, Cond::Baseline);
            println!(
                "  {:<30} unwatched {:>+6.0}   watched {:>+6.0}",
                label,
                (med(kind, Cond::Unwatched) - b) / n as f64,
                (med(kind, Cond::Watched) - b) / n as f64
            );
        }
        println!();
        println!("spread over rounds (min-max ns/iter):");
        for (kind, label, _) in LOOPS {
            println!(
                "  {:<30} baseline {:>11}   unwatched {:>11}   watched {:>11}",
                label,
                spread(kind, Cond::Baseline),
                spread(kind, Cond::Unwatched),
                spread(kind, Cond::Watched)
            );
        }
        println!();
        println!("watched agent summaries (median over rounds; one agent run per loop):");
        for (kind, label, _) in LOOPS {
            let s = &summaries[kind];
            let m = |key| median(s.iter().filter_map(|(_, l)| json_num(l, key)).collect());
            let (events, drops) = (m("events"), m("ringbuf_drops"));
            let per_iter = median(
                s.iter()
                    .filter_map(|(total, l)| Some(json_num(l, "events")? / *total as f64))
                    .collect(),
            );
            let lost = if events + drops > 0.0 {
                100.0 * drops / (events + drops)
            } else {
                0.0
            };
            // Counters only some output modes of the agent report.
            let extra: String = [
                "map_full",
                "captured_bytes",
                "watched_hits",
                "unrecognised_connections",
            ]
            .iter()
            .filter(|k| s.iter().any(|(_, l)| json_num(l, k).is_some()))
            .map(|k| format!("  {k} {:.0}", m(k)))
            .collect();
            println!(
                "  {:<30} events {:>9.0} ({per_iter:.2}/iter)  ringbuf_drops {:>9.0} ({lost:.1}% lost){extra}",
                label, events, drops,
            );
        }
        let hits: Vec<f64> = unwatched
            .iter()
            .filter_map(|l| json_num(l, "unwatched_hits"))
            .collect();
        if !hits.is_empty() {
            println!(
                "unwatched agent: median {:.0} unwatched probe hits per run (the loops make {} syscalls)",
                median(hits),
                LOOPS.iter().map(|(_, _, n)| n * self.iterations).sum::<u64>()
            );
        }
        rows
    }
}

/// Syscalls per iteration of loop `kind`.
fn syscalls_per_iter(kind: &str) -> u64 {
    LOOPS.iter().find(|(k, _, _)| *k == kind).map_or(1, |l| l.2)
}

/// Total run time (ns) of the BPF programs process `pid` holds; None without bpf_stats
/// (every counter 0) or when it holds none.
fn program_ns(pid: u32) -> Option<u64> {
    let (ns, _) = crate::load_bench::bpf_run_stats(pid);
    (ns > 0).then_some(ns)
}

/// (after − before) / syscalls, when both were read.
fn per_syscall(before: Option<u64>, after: Option<u64>, syscalls: u64) -> Option<f64> {
    let (before, after) = (before?, after?);
    (syscalls > 0 && after >= before).then(|| (after - before) as f64 / syscalls as f64)
}

/// The number after `"key":` in a flat JSON line.
pub fn json_num(line: &str, key: &str) -> Option<f64> {
    let pat = format!("\"{key}\":");
    let start = line.find(&pat)? + pat.len();
    let rest = line[start..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
