//! `cargo xtask bench --only enforce`: what an allowed operation costs inside a sync
//! activity, side by side:
//! - none: the same code (tests/e2e/support/enforce_ops.py `enf_bench`) run directly by
//!   the worker's Python, no Temporal, no hook, no agent;
//! - hook events: a real worker with the hook on a Temporal dev server, the agent with
//!   `--hook-events` (each operation reported to the fake Core after it happens);
//! - enforce: the same with `--enforce` (each operation held by the seccomp filter until
//!   the agent answers): a remembered verdict (the same path or URL again) and a fake-Core
//!   round trip (a new one each time);
//! - SDK 2.0: `openbox-temporal-sdk-python` 2.0.0's own `OpenBoxPlugin` in the worker
//!   (xtask/bench/enforce_sdk2.py, its virtualenv), the same fake Core, no agent: what it
//!   instruments (urllib, file opens) it reports to Core in process.
//!
//! Operations: a 1-byte `write` to an open file, an `open` for appending, one for
//! reading, a plain-HTTP GET (http.client, a new connection each) to a server in this
//! process. Each round runs
//! every variant once; the table shows the median over rounds of each run's median.
//!
//! A second table: an HTTPS GET from an async activity (`enf_bench_async`: aiohttp, one
//! keep-alive session, asyncio's memory-BIO TLS) to openbox-agent/tests/support/
//! tls_server.py in a process of its own, in the same worker after `enf_bench` (none,
//! hook events, enforce; SDK 2.0 instruments no aiohttp and its virtualenv has none).
//! Under `--enforce` each request's `SSL_write` return probe keeps its plaintext
//! (`TLS_UNSENT`: an insert and a copy of up to 2 KiB, the entry removed once the send
//! is answered), where with `--hook-events` alone it counts one more write on the entry
//! its SSL object kept first. With kernel.bpf_stats_enabled switched on for the bench,
//! the agent's libssl programs' `run_time_ns`/`run_cnt` (`ssl_*`, read before the agent
//! stops) give their cost per request, in the worker's thread.
//! The worlds are the end-to-end tests' (openbox-e2e's `GovWorld`: Temporal dev server,
//! fake Core, worker, agent), so their logs go to target/e2e-runs/enforce_bench_*.

use std::{io::Write, net::TcpListener, path::Path, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use openbox_e2e::{read_request_head, GovWorld};
use serde_json::{json, Value};

use crate::{bench::median, env::TestEnv};

#[derive(Clone, Copy)]
pub struct Size {
    pub rounds: usize,
    /// Iterations of the operations whose verdict is remembered (and of the baseline).
    pub n: u32,
    /// Iterations of the operations that ask Core each time.
    pub n_new: u32,
}

/// The figures `enf_bench` reports, in ns: (key, label).
const OPS: [(&str, &str); 6] = [
    ("write_1_byte", "write 1 B (held, nothing to govern)"),
    ("open_same_path", "open for append, same path"),
    ("open_read", "open for read (held, let through)"),
    ("open_new_path", "open for write, new path"),
    ("http_same_url", "HTTP GET, same URL"),
    ("http_new_url", "HTTP GET, new URL"),
];

const VARIANTS: [&str; 4] = ["none", "hook events", "enforce", "SDK 2.0"];

/// The figures `enf_bench_async` reports, in ns: (key, label).
const ASYNC_OPS: [(&str, &str); 2] = [
    ("https_async_same_url", "HTTPS GET (aiohttp), same URL"),
    ("https_async_new_url", "HTTPS GET (aiohttp), new URL"),
];

/// Requests `enf_bench_async` makes before it times any (the connection's handshake).
const ASYNC_WARMUP: u32 = 20;

/// A plain-HTTP server on a thread of its own that answers every request `200 ok`.
fn http_server() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the bench's HTTP server")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            read_request_head(&mut conn);
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    Ok(port)
}

/// One run of `call` (an expression of `enforce_ops` and `arg`, e.g. `enf_bench(arg)`)
/// with no governance: the worker's Python calls it directly.
fn run_plain(python: &str, call: &str, arg: &Value) -> Result<Value> {
    let support = crate::workspace_root().join("tests/e2e/support");
    let out = Command::new(python)
        .current_dir(&support)
        .args([
            "-c",
            &format!(
                "import asyncio, json, sys; from enforce_ops import *; \
                 arg = json.loads(sys.argv[1]); print(json.dumps({call}))"
            ),
        ])
        .arg(arg.to_string())
        .env("PYTHONPATH", &support)
        .output()
        .with_context(|| format!("running {python}"))?;
    if !out.status.success() {
        bail!(
            "{call} without governance failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("{call}'s output"))
}

/// Hook events (requests with `hook_trigger`) a fake Core answered, from its record
/// (read after the world finished: the agent sends what happened after the fact
/// asynchronously, and delivers the rest before it exits).
fn hook_events(record: &Path) -> Result<usize> {
    let text = std::fs::read_to_string(record)
        .with_context(|| format!("reading Core's record {}", record.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| {
            r["path"] == json!("/api/v1/governance/evaluate")
                && r["status"] == json!(200)
                && r["body"]["hook_trigger"] == json!(true)
        })
        .count())
}

/// What one governed world measured.
struct Governed {
    /// `enf_bench`'s result.
    sync: Value,
    /// `enf_bench_async`'s result.
    async_: Value,
    /// Hook events Core got.
    hooks: usize,
    /// The agent's libssl programs (`ssl_*`) at the end of the run: (run_time_ns,
    /// run_cnt), and `ssl_ret`'s alone.
    tls: (u64, u64),
    ssl_ret: (u64, u64),
}

/// `enf_bench` in a sync activity, then `enf_bench_async` in an async one, of a real
/// worker, the agent with `flags`.
fn run_governed(name: &str, flags: &[&str], arg: &Value, async_arg: &Value) -> Result<Governed> {
    let mut w = GovWorld::new(name);
    w.sdk_conventions = Some("2.0");
    w.start_core(&json!({"default": {"verdict": "allow"}}));
    let mut args = w.core().agent_args();
    args.extend(["--spool-dir".into(), w.spool_dir().display().to_string()]);
    args.extend(flags.iter().map(|f| f.to_string()));
    w.start_agent(&args);
    w.start_worker();
    let item = |arg: &Value| {
        let mut item = w.item(0);
        for (k, v) in arg.as_object().expect("an object") {
            item[k] = v.clone();
        }
        item
    };
    let wf = json!({"id": w.workflow_id(0), "workflow": "GovSteps",
        "arg": {"steps": [
            {"activity": "enf_bench", "args": [item(arg)], "activity_id": w.marker(0)},
            {"activity": "enf_bench_async", "args": [item(async_arg)], "activity_id": w.marker(1)},
        ], "max_attempts": 1, "retry_ms": 200}});
    let out = w.run(&[wf], Duration::from_secs(600));
    let o = out.first().cloned().unwrap_or_default();
    let (tls, ssl_ret) = tls_programs(w.agent().pid())?;
    let logs = w.logs.display().to_string();
    let record = w.core().record.clone();
    let (_, agent) = w.finish();
    if let Some(agent) = agent {
        agent.assert_clean_exit();
    }
    let hooks = hook_events(&record)?;
    if o["ok"] != json!(true) {
        bail!("the enf_bench activities ({name}) failed: {o} (logs in {logs})");
    }
    Ok(Governed {
        sync: o["result"][0].clone(),
        async_: o["result"][1].clone(),
        hooks,
        tls,
        ssl_ret,
    })
}

/// The libssl programs (names `ssl_*`, `bpftool prog show`) process `pid` holds: their
/// (run_time_ns, run_cnt) summed, and `ssl_ret`'s alone.
fn tls_programs(pid: u32) -> Result<((u64, u64), (u64, u64))> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .context("running bpftool prog show")?;
    let all: Value = serde_json::from_slice(&out.stdout).context("bpftool prog show's output")?;
    let name_of = |id: u32| {
        all.as_array()
            .into_iter()
            .flatten()
            .find(|p| p["id"] == json!(id))
            .and_then(|p| p["name"].as_str().map(str::to_string))
    };
    let (mut tls, mut ret) = ((0, 0), (0, 0));
    for p in crate::load_bench::bpf_programs(pid) {
        let Some(name) = name_of(p.id).filter(|n| n.starts_with("ssl_")) else {
            continue;
        };
        tls = (tls.0 + p.run_time_ns, tls.1 + p.run_cnt);
        if name == "ssl_ret" {
            ret = (ret.0 + p.run_time_ns, ret.1 + p.run_cnt);
        }
    }
    Ok((tls, ret))
}

/// One `enf_bench` run in a sync activity of a worker with SDK 2.0's own `OpenBoxPlugin`
/// (xtask/bench/enforce_sdk2.py), against the fake Core, no agent; its result and the hook
/// events Core got.
fn run_sdk2(name: &str, arg: &Value) -> Result<(Value, usize)> {
    let mut w = GovWorld::new(name);
    w.start_core(&json!({"default": {"verdict": "allow"}}));
    let python = std::env::var("OPENBOX_SDK2_PYTHON").context("OPENBOX_SDK2_PYTHON")?;
    let mut item = w.item(0);
    for (k, v) in arg.as_object().expect("an object") {
        item[k] = v.clone();
    }
    let out = Command::new(&python)
        .arg(crate::workspace_root().join("xtask/bench/enforce_sdk2.py"))
        .args(["--address", &w.shared.temporal])
        .args(["--task-queue", &w.task_queue])
        .args(["--workflow-id", &w.workflow_id(0)])
        .args(["--openbox-url", &w.core().url()])
        .args(["--openbox-api-key", openbox_e2e::FAKE_CORE_KEY])
        .args(["--arg", &item.to_string()])
        .output()
        .with_context(|| format!("running {python}"))?;
    let record = w.core().record.clone();
    w.finish();
    let hooks = hook_events(&record)?;
    if !out.status.success() {
        bail!(
            "enf_bench under SDK 2.0 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let r = serde_json::from_slice(&out.stdout).context("enforce_sdk2.py's output")?;
    Ok((r, hooks))
}

/// A table's header: the variants, then the ratios to none and `last`.
fn header(title: &str, last: &str) {
    println!(
        "  {title:<38} {:>8} {:>8} {:>8} {:>8}   {:>6} {:>6} {last:>8}",
        "none", "hook ev", "enforce", "SDK 2.0", "hook×", "enf×"
    );
}

pub fn run(agent: &Path, env: &TestEnv, size: Size) -> Result<()> {
    // openbox-e2e reads its environment from these variables, as under `cargo xtask test`.
    for (k, v) in env.vars() {
        std::env::set_var(k, v);
    }
    std::env::set_var("OPENBOX_AGENT_BIN", agent);
    let python = std::env::var("OPENBOX_TEST_PYTHON").context("OPENBOX_TEST_PYTHON")?;
    let support = std::env::var("OPENBOX_TEST_SUPPORT").context("OPENBOX_TEST_SUPPORT")?;
    let port = http_server()?;
    let (https_server, https_port) = crate::http_bench::test_server(
        &python,
        &Path::new(&support).join("tls_server.py"),
        "https",
    )?;
    let dir = std::env::temp_dir().join(format!("openbox-enforce-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let stats = crate::load_bench::BpfStats::enable();
    println!(
        "\nenforce: an allowed operation in a sync activity, {} rounds, {} iterations ({} for a new path or URL each); \
         then HTTPS from an async activity, as many",
        size.rounds, size.n, size.n_new
    );
    // Per (variant, op): each run's median ns.
    let mut runs: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); OPS.len()]; VARIANTS.len()];
    let mut async_runs: Vec<Vec<Vec<f64>>> =
        vec![vec![Vec::new(); ASYNC_OPS.len()]; VARIANTS.len()];
    // Per variant: each run's libssl programs' ns per request, and ssl_ret's ns per run.
    let mut tls_per_request: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    let mut ret_per_run: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    let mut runs_per_request: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    for round in 0..size.rounds {
        for (vi, variant) in VARIANTS.iter().enumerate() {
            let arg = json!({"n": size.n, "n_new": size.n_new,
                "url": format!("http://127.0.0.1:{port}/bench/{round}/{vi}")});
            let async_arg = json!({"n": size.n, "n_new": size.n_new, "warmup": ASYNC_WARMUP,
                "https_url": format!("https://127.0.0.1:{https_port}/async/{round}/{vi}")});
            let governed = |name: &str, flags: &[&str]| {
                run_governed(
                    &format!("enforce_bench_{name}_{round}"),
                    flags,
                    &arg,
                    &async_arg,
                )
                .map(Some)
            };
            let (r, ra, hooks, g) = match *variant {
                "none" => {
                    let mut a = arg.clone();
                    a["dir"] = json!(dir.display().to_string());
                    a["marker"] = json!(format!("plain-{round}"));
                    let ra = run_plain(&python, "asyncio.run(enf_bench_async(arg))", &async_arg)?;
                    (run_plain(&python, "enf_bench(arg)", &a)?, Some(ra), 0, None)
                }
                "hook events" => {
                    let g = governed("hook_events", &["--hook-events"])?;
                    (
                        g.as_ref().map(|g| g.sync.clone()).unwrap_or_default(),
                        None,
                        0,
                        g,
                    )
                }
                "enforce" => {
                    let g = governed("enforce", &["--hook-events", "--enforce"])?;
                    (
                        g.as_ref().map(|g| g.sync.clone()).unwrap_or_default(),
                        None,
                        0,
                        g,
                    )
                }
                _ => {
                    let (r, hooks) = run_sdk2(&format!("enforce_bench_sdk2_{round}"), &arg)?;
                    (r, None, hooks, None)
                }
            };
            let (ra, hooks) = match &g {
                Some(g) => (Some(g.async_.clone()), g.hooks),
                None => (ra, hooks),
            };
            if vi > 0 {
                println!(
                    "  round {}: {variant}: Core got {hooks} hook events",
                    round + 1
                );
            }
            for (oi, (key, _)) in OPS.iter().enumerate() {
                let ns = r[*key]
                    .as_f64()
                    .with_context(|| format!("enf_bench gave no {key}: {r}"))?;
                runs[vi][oi].push(ns);
            }
            let Some(ra) = ra else { continue };
            for (oi, (key, _)) in ASYNC_OPS.iter().enumerate() {
                let ns = ra[*key]
                    .as_f64()
                    .with_context(|| format!("enf_bench_async gave no {key}: {ra}"))?;
                async_runs[vi][oi].push(ns);
            }
            if let Some(g) = g.filter(|g| g.tls.1 > 0) {
                let requests = ra["https_async_requests"].as_f64().unwrap_or(f64::NAN);
                tls_per_request[vi].push(g.tls.0 as f64 / requests);
                runs_per_request[vi].push(g.tls.1 as f64 / requests);
                ret_per_run[vi].push(g.ssl_ret.0 as f64 / g.ssl_ret.1.max(1) as f64);
                println!(
                    "  round {}: {variant}: libssl programs {} runs, {:.0} ns per request; ssl_ret {} runs, {:.0} ns per run",
                    round + 1,
                    g.tls.1,
                    g.tls.0 as f64 / requests,
                    g.ssl_ret.1,
                    g.ssl_ret.0 as f64 / g.ssl_ret.1.max(1) as f64
                );
            }
        }
    }
    drop(stats);
    drop(https_server);
    let _ = std::fs::remove_dir_all(&dir);
    header("µs per operation (median)", "SDK2×");
    for (oi, (_, label)) in OPS.iter().enumerate() {
        let m: Vec<f64> = (0..VARIANTS.len())
            .map(|vi| median(runs[vi][oi].clone()) / 1000.0)
            .collect();
        println!(
            "  {label:<38} {:>8.1} {:>8.1} {:>8.1} {:>8.1}   {:>6.2} {:>6.2} {:>8.2}",
            m[0],
            m[1],
            m[2],
            m[3],
            m[1] / m[0],
            m[2] / m[0],
            m[3] / m[0]
        );
    }
    println!("  (enforce: \"same\" rows answer from a remembered verdict, \"new\" rows wait for a fake-Core round trip each)");
    header("async activity, µs per request (median)", "enf/hook");
    for (oi, (_, label)) in ASYNC_OPS.iter().enumerate() {
        let m: Vec<f64> = (0..3)
            .map(|vi| median(async_runs[vi][oi].clone()) / 1000.0)
            .collect();
        println!(
            "  {label:<38} {:>8.1} {:>8.1} {:>8.1} {:>8}   {:>6.2} {:>6.2} {:>8.2}",
            m[0],
            m[1],
            m[2],
            "-",
            m[1] / m[0],
            m[2] / m[0],
            m[2] / m[1]
        );
    }
    if tls_per_request[1].is_empty() || tls_per_request[2].is_empty() {
        println!("  libssl programs: no run_time_ns (kernel.bpf_stats_enabled could not be set)");
        return Ok(());
    }
    let (hook, enf) = (
        median(tls_per_request[1].clone()),
        median(tls_per_request[2].clone()),
    );
    let (hook_ret, enf_ret) = (
        median(ret_per_run[1].clone()),
        median(ret_per_run[2].clone()),
    );
    println!(
        "  libssl programs per async HTTPS request (bpf_stats, median over rounds): hook events {hook:.0} ns, \
         enforce {enf:.0} ns (×{:.2}, {:+.0} ns: the TLS_UNSENT copy of each write); \
         ssl_ret {hook_ret:.0} → {enf_ret:.0} ns per run; {:.1} program runs per request",
        enf / hook,
        enf - hook,
        median(runs_per_request[2].clone())
    );
    Ok(())
}
