//! `cargo xtask bench --only http`: what one httpx POST costs with nothing added, with
//! the in-process SDK's instrumentation, and watched by the agent — side by side.
//!
//! The server (openbox-agent/tests/support/tls_server.py: keep-alive, TCP_NODELAY, so no
//! request waits for a delayed ACK) runs in its own process, unwatched, once over HTTP
//! and once over HTTPS. The client, xtask/bench/http_loop.py in the SDK's virtualenv,
//! times each request after a warm-up and reports the median. Variants:
//! - plain: the loop alone;
//! - sdk: `http_loop.py --sdk`, openbox-temporal-sdk-python 1.0.0 set up as
//!   `create_openbox_worker` does, the requests inside a registered activity span;
//! - agent: `openbox-agent trace --json -- python http_loop.py`, spans drained.
//!
//! Each round runs every (scheme, variant) once, the variants' order rotating from
//! round to round so drifts of the machine's load hit them all alike; the table shows
//! the median over rounds of each run's median.
//!
//! Wall time per request is what the target is about, but on a busy machine it
//! is mostly time spent waiting for a CPU. So the bench also reports CPU time per
//! request, client and server processes together (the client's from the loop itself,
//! the server's from /proc): the SDK's work, and the uprobe traps and kernel programs
//! the agent's capture runs in those processes. The agent's own processing of each
//! event is elsewhere (its process; `--only load` measures it per span).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{bench::median, env::TestEnv, proc::Proc};

#[derive(Clone, Copy)]
pub struct Size {
    pub rounds: usize,
    pub requests: u32,
    pub warmup: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Variant {
    Plain,
    Sdk,
    Agent,
}

const VARIANTS: [Variant; 3] = [Variant::Plain, Variant::Sdk, Variant::Agent];
const SCHEMES: [&str; 2] = ["http", "https"];

/// Per scheme: median µs per request of plain, SDK and agent, in wall time and in CPU
/// time (client + server).
pub struct HttpResult {
    pub scheme: &'static str,
    pub wall: Triple,
    pub cpu: Triple,
}

#[derive(Clone, Copy)]
pub struct Triple {
    pub plain: f64,
    pub sdk: f64,
    pub agent: f64,
}

impl Triple {
    /// The agent's added µs as a fraction of the SDK's.
    pub fn ratio(&self) -> f64 {
        (self.agent - self.plain) / (self.sdk - self.plain)
    }
}

/// One run's figures.
#[derive(Clone, Copy)]
struct Run {
    wall_us: f64,
    cpu_us: f64,
}

pub fn run(agent: &Path, env: &TestEnv, size: Size) -> Result<Vec<HttpResult>> {
    let vars: BTreeMap<String, String> = env.vars().into_iter().collect();
    let var = |k: &str| {
        vars.get(k)
            .cloned()
            .with_context(|| format!("the test environment did not provide {k}"))
    };
    let root = crate::workspace_root();
    let bench = Bench {
        agent: agent.to_path_buf(),
        sdk_python: PathBuf::from(var("OPENBOX_SDK_PYTHON")?),
        script: root.join("xtask/bench/http_loop.py"),
        out: std::env::temp_dir().join(format!("openbox-http-bench-{}.json", std::process::id())),
        size,
    };
    let server_script = PathBuf::from(var("OPENBOX_TEST_SUPPORT")?).join("tls_server.py");
    let python = var("OPENBOX_TEST_PYTHON")?;
    let mut servers = Vec::new();
    let mut urls = BTreeMap::new();
    let mut server_pids = BTreeMap::new();
    for scheme in SCHEMES {
        let (server, port) = test_server(&python, &server_script, scheme)?;
        urls.insert(scheme, format!("{scheme}://127.0.0.1:{port}/echo/bench"));
        server_pids.insert(scheme, server.pid());
        servers.push(server);
    }

    let started = Instant::now();
    println!(
        "\nhttpx POST loop: {} rounds × (http, https) × (plain, sdk, agent), {} timed requests after {} warm-up per run",
        size.rounds, size.requests, size.warmup
    );
    let mut runs: BTreeMap<(&str, Variant), Vec<Run>> = BTreeMap::new();
    let mut drops = 0.0;
    for round in 0..size.rounds {
        for scheme in SCHEMES {
            for k in 0..VARIANTS.len() {
                let variant = VARIANTS[(k + round) % VARIANTS.len()];
                let (run, run_drops) = bench.one(&urls[scheme], server_pids[scheme], variant)?;
                drops += run_drops;
                runs.entry((scheme, variant)).or_default().push(run);
            }
        }
        let last = |s, v| {
            runs[&(s, v)]
                .last()
                .map(|r: &Run| r.wall_us)
                .unwrap_or(f64::NAN)
        };
        println!(
            "  round {}/{} ({:.0} s): µs/request plain/sdk/agent: http {:.0}/{:.0}/{:.0}, https {:.0}/{:.0}/{:.0}",
            round + 1,
            size.rounds,
            started.elapsed().as_secs_f64(),
            last("http", Variant::Plain),
            last("http", Variant::Sdk),
            last("http", Variant::Agent),
            last("https", Variant::Plain),
            last("https", Variant::Sdk),
            last("https", Variant::Agent),
        );
    }
    drop(servers);
    let _ = std::fs::remove_file(&bench.out);

    let med = |s, v, f: fn(&Run) -> f64| median(runs[&(s, v)].iter().map(f).collect());
    let triple = |s, f: fn(&Run) -> f64| Triple {
        plain: med(s, Variant::Plain, f),
        sdk: med(s, Variant::Sdk, f),
        agent: med(s, Variant::Agent, f),
    };
    let results: Vec<HttpResult> = SCHEMES
        .iter()
        .map(|&scheme| HttpResult {
            scheme,
            wall: triple(scheme, |r| r.wall_us),
            cpu: triple(scheme, |r| r.cpu_us),
        })
        .collect();
    println!(
        "\nµs per request (median over {} rounds of each run's median; CPU: client + server processes):",
        size.rounds
    );
    println!(
        "  {:<12} {:>8} | {:>20} | {:>20} | {:>15}",
        "", "plain", "sdk (+µs, ×)", "agent (+µs, ×)", "agent/sdk added"
    );
    for r in &results {
        for (what, t) in [("wall", r.wall), ("CPU", r.cpu)] {
            let cell = |v: f64| format!("{v:.0} ({:+.0}, ×{:.2})", v - t.plain, v / t.plain);
            println!(
                "  {:<12} {:>8.0} | {:>20} | {:>20} | {:>15.3}",
                format!("{} {what}", r.scheme),
                t.plain,
                cell(t.sdk),
                cell(t.agent),
                t.ratio()
            );
        }
    }
    let spread = |s, v| {
        let r: Vec<f64> = runs[&(s, v)].iter().map(|r| r.wall_us).collect();
        let lo = r.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = r.iter().cloned().fold(0.0, f64::max);
        format!("{lo:.0}-{hi:.0}")
    };
    for scheme in SCHEMES {
        println!(
            "  wall spread over rounds, {scheme}: plain {}, sdk {}, agent {}",
            spread(scheme, Variant::Plain),
            spread(scheme, Variant::Sdk),
            spread(scheme, Variant::Agent)
        );
    }
    println!(
        "  target: agent/sdk added ≤ 0.050; agent ring-buffer drops over all runs: {drops:.0}"
    );
    Ok(results)
}

/// Starts openbox-agent/tests/support/tls_server.py (`script`) with `python`, over
/// `scheme` (`http` or `https`), in a process of its own; returns it and its port.
pub fn test_server(python: &str, script: &Path, scheme: &str) -> Result<(Proc, u16)> {
    let mut cmd = Command::new(python);
    cmd.arg(script).stdin(Stdio::null());
    if scheme == "http" {
        cmd.arg("--plain");
    }
    let server = Proc::spawn(&format!("the {scheme} test server"), &mut cmd, true)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(port) = server.last_line().trim().parse() {
            return Ok((server, port));
        }
        if Instant::now() > deadline {
            bail!(
                "the {scheme} test server printed no port: {}",
                server.stderr_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Bench {
    agent: PathBuf,
    sdk_python: PathBuf,
    script: PathBuf,
    out: PathBuf,
    size: Size,
}

impl Bench {
    /// One run: its figures, and the agent's ring-buffer drops.
    fn one(&self, url: &str, server: u32, variant: Variant) -> Result<(Run, f64)> {
        let _ = std::fs::remove_file(&self.out);
        let server_cpu0 = crate::load_bench::proc_cpu(server).unwrap_or(f64::NAN);
        let mut cmd = match variant {
            Variant::Agent => {
                let mut c = Command::new(&self.agent);
                c.args(["trace", "--json", "--"]).arg(&self.sdk_python);
                c
            }
            _ => Command::new(&self.sdk_python),
        };
        cmd.arg(&self.script)
            .args(["--url", url, "--requests"])
            .arg(self.size.requests.to_string())
            .arg("--warmup")
            .arg(self.size.warmup.to_string())
            .arg("--out")
            .arg(&self.out)
            .args((variant == Variant::Sdk).then_some("--sdk"))
            .stdin(Stdio::null());
        let mut proc = Proc::spawn(&format!("http_loop.py ({variant:?})"), &mut cmd, true)?;
        let status = proc.wait(Duration::from_secs(
            120 + u64::from(self.size.requests) / 100,
        ))?;
        if !status.success() {
            bail!(
                "the {variant:?} run against {url} failed ({status}): {}",
                proc.stderr_text()
            );
        }
        let drops = match variant {
            Variant::Agent => {
                crate::bench::json_num(&proc.summary()?, "ringbuf_drops").unwrap_or(0.0)
            }
            _ => 0.0,
        };
        let text = std::fs::read_to_string(&self.out)
            .with_context(|| format!("http_loop.py wrote no result to {}", self.out.display()))?;
        let num =
            |k| crate::bench::json_num(&text, k).with_context(|| format!("no {k} in {text:?}"));
        // The server's CPU over the whole run, warm-up requests included, shared out.
        let server_cpu = crate::load_bench::proc_cpu(server).unwrap_or(f64::NAN) - server_cpu0;
        let served = f64::from(self.size.requests + self.size.warmup);
        let run = Run {
            wall_us: num("median_us")?,
            cpu_us: num("cpu_us")? + server_cpu * 1e6 / served,
        };
        Ok((run, drops))
    }
}
