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

/// One `enf_bench` run with no governance: the worker's Python calls it directly.
fn run_plain(python: &str, arg: &Value) -> Result<Value> {
    let support = crate::workspace_root().join("tests/e2e/support");
    let out = Command::new(python)
        .current_dir(&support)
        .args([
            "-c",
            "import json, sys; import enforce_ops; \
             print(json.dumps(enforce_ops.enf_bench(json.loads(sys.argv[1]))))",
        ])
        .arg(arg.to_string())
        .env("PYTHONPATH", &support)
        .output()
        .with_context(|| format!("running {python}"))?;
    if !out.status.success() {
        bail!(
            "enf_bench without governance failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("enf_bench's output")
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

/// One `enf_bench` run in a sync activity of a real worker, the agent with `flags`; its
/// result and the hook events Core got.
fn run_governed(name: &str, flags: &[&str], arg: &Value) -> Result<(Value, usize)> {
    let mut w = GovWorld::new(name);
    w.sdk_conventions = Some("2.0");
    w.start_core(&json!({"default": {"verdict": "allow"}}));
    let mut args = w.core().agent_args();
    args.extend(["--spool-dir".into(), w.spool_dir().display().to_string()]);
    args.extend(flags.iter().map(|f| f.to_string()));
    w.start_agent(&args);
    w.start_worker();
    let mut item = w.item(0);
    for (k, v) in arg.as_object().expect("an object") {
        item[k] = v.clone();
    }
    let wf = json!({"id": w.workflow_id(0), "workflow": "GovSteps",
        "arg": {"steps": [{"activity": "enf_bench", "args": [item], "activity_id": w.marker(0)}],
                "max_attempts": 1, "retry_ms": 200}});
    let out = w.run(&[wf], Duration::from_secs(600));
    let o = out.first().cloned().unwrap_or_default();
    let logs = w.logs.display().to_string();
    let record = w.core().record.clone();
    let (_, agent) = w.finish();
    if let Some(agent) = agent {
        agent.assert_clean_exit();
    }
    let hooks = hook_events(&record)?;
    if o["ok"] != json!(true) {
        bail!("the enf_bench activity ({name}) failed: {o} (logs in {logs})");
    }
    Ok((o["result"][0].clone(), hooks))
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

pub fn run(agent: &Path, env: &TestEnv, size: Size) -> Result<()> {
    // openbox-e2e reads its environment from these variables, as under `cargo xtask test`.
    for (k, v) in env.vars() {
        std::env::set_var(k, v);
    }
    std::env::set_var("OPENBOX_AGENT_BIN", agent);
    let python = std::env::var("OPENBOX_TEST_PYTHON").context("OPENBOX_TEST_PYTHON")?;
    let port = http_server()?;
    let dir = std::env::temp_dir().join(format!("openbox-enforce-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "\nenforce: an allowed operation in a sync activity, {} rounds, {} iterations ({} for a new path or URL each)",
        size.rounds, size.n, size.n_new
    );
    // Per (variant, op): each run's median ns.
    let mut runs: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); OPS.len()]; VARIANTS.len()];
    for round in 0..size.rounds {
        for (vi, variant) in VARIANTS.iter().enumerate() {
            let arg = json!({"n": size.n, "n_new": size.n_new,
                "url": format!("http://127.0.0.1:{port}/bench/{round}/{vi}")});
            let (r, hooks) = match *variant {
                "none" => {
                    let mut a = arg.clone();
                    a["dir"] = json!(dir.display().to_string());
                    a["marker"] = json!(format!("plain-{round}"));
                    (run_plain(&python, &a)?, 0)
                }
                "hook events" => run_governed(
                    &format!("enforce_bench_hook_events_{round}"),
                    &["--hook-events"],
                    &arg,
                )?,
                "enforce" => run_governed(
                    &format!("enforce_bench_enforce_{round}"),
                    &["--hook-events", "--enforce"],
                    &arg,
                )?,
                _ => run_sdk2(&format!("enforce_bench_sdk2_{round}"), &arg)?,
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
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "  {:<38} {:>8} {:>8} {:>8} {:>8}   {:>6} {:>6} {:>6}",
        "µs per operation (median)",
        "none",
        "hook ev",
        "enforce",
        "SDK 2.0",
        "hook×",
        "enf×",
        "SDK2×"
    );
    for (oi, (_, label)) in OPS.iter().enumerate() {
        let m: Vec<f64> = (0..VARIANTS.len())
            .map(|vi| median(runs[vi][oi].clone()) / 1000.0)
            .collect();
        println!(
            "  {label:<38} {:>8.1} {:>8.1} {:>8.1} {:>8.1}   {:>6.2} {:>6.2} {:>6.2}",
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
    Ok(())
}
