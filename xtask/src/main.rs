//! Project tasks: `cargo xtask build-ebpf | build | image | lint | test | demo | bench |
//! kernel-matrix | guest-test`.
//!
//! Every task installs what it needs and reuses what is already there, so the two
//! commands of the README work on a fresh machine.

mod bench;
mod enforce_bench;
mod env;
mod fuzz;
mod guest_suite;
mod hook_bench;
mod http_bench;
mod image;
mod kernel_matrix;
mod lint;
mod load_bench;
mod proc;
mod startup_bench;
mod toolchain;

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "openbox-agent project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchPart {
    Syscalls,
    Parsers,
    /// The worker hook: per coroutine step, per activity, and a no-op activity's latency
    /// with and without the hook on a real Temporal dev server.
    Hook,
    /// `trace -- CMD`: how long until CMD runs, and until `trace` returns after it ends;
    /// the daemon's stop and start (a restart in a rolling update).
    Startup,
    /// An httpx POST loop over HTTP and HTTPS: plain, with the in-process SDK, watched by
    /// the agent.
    Http,
    /// The agent's CPU per span, peak RSS and ring-buffer drops under a sustained load.
    Load,
    /// The syscall loops in Debian's 6.1 and 6.12 kernels under qemu (TCG), in each
    /// capture mode: the fentry data path's cost where this machine's kernel refuses it.
    Kernels,
    /// An allowed operation in a sync activity: no governance, the agent with
    /// `--hook-events`, and with `--enforce` (remembered verdict, fake-Core round trip).
    Enforce,
}

#[derive(Subcommand)]
enum Task {
    /// Build the kernel programs (installs rust-src and bpf-linker when missing).
    BuildEbpf,
    /// Build the kernel programs and the agent (release).
    Build,
    /// Build the agent's container image (deploy/Containerfile) with podman, base images
    /// made locally with mmdebstrap; prints the image's name.
    Image {
        /// Also build the end-to-end tests' worker image (`cargo xtask test` does).
        #[arg(long)]
        e2e_worker: bool,
    },
    /// Check formatting and lints: rustfmt and clippy (warnings denied) on the workspace
    /// and on the kernel crate, ruff and mypy on the worker hook, gofmt and go vet on the
    /// Kubernetes manifest checker.
    Lint,
    /// Run `lint`, then install the test environment (Debian packages, Python virtualenvs
    /// with the worker hook, FerretDB, the Temporal CLI, Helm and the Kubernetes manifest
    /// checker) and run every test, end-to-end tests included; with no test arguments,
    /// then `kernel-matrix --quick`.
    Test {
        /// Skip `lint` (when iterating on one test; CI never does).
        #[arg(long)]
        skip_lint: bool,
        /// Extra arguments passed to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the demo: the agent tracing a sample program doing HTTPS and file I/O.
    Demo,
    /// Measure what the agent costs, side by side with no agent and with the in-process
    /// SDK: per syscall, per HTTP(S) request, per span under load, at start and exit.
    Bench {
        /// Iterations per syscall loop (default 200 000; 50 000 with --quick).
        #[arg(long)]
        iterations: Option<u64>,
        /// Run only one part.
        #[arg(long, value_enum)]
        only: Option<BenchPart>,
        /// Fewer rounds and shorter runs (about 4 minutes instead of 15), and no hook
        /// bench (it needs the Temporal dev server).
        #[arg(long)]
        quick: bool,
        /// Measure this agent binary instead of building the workspace's (to compare
        /// with another build).
        #[arg(long)]
        agent: Option<PathBuf>,
    },
    /// The load generator of `bench --only load` (run by the bench under the agent).
    #[command(hide = true)]
    LoadGen {
        #[arg(long)]
        clients: usize,
        #[arg(long)]
        seconds: f64,
        /// Requests per second over all clients; 0: as fast as they go.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long)]
        marker: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Boot Debian's 6.1 and 6.12 cloud kernels under qemu (TCG) with the agent and run
    /// `check` and, per capture mode, a `trace` of an HTTPS request and a file write in
    /// each, beside the host; prints the matrix and what differs.
    KernelMatrix {
        /// One `trace` per kernel in the default capture mode (and a forced one on the
        /// Debian kernels: tracepoint on 6.1, fentry on 6.12), and no helper probe.
        #[arg(long)]
        quick: bool,
        /// Only this kernel (host, 6.1, 6.12); repeatable. All when none is given.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// Run this agent binary instead of building the workspace's.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Also run `bench`'s syscall loops in each guest, in every capture mode: this
        /// many iterations per loop and run (the fentry mode's cost where the host
        /// refuses fentry).
        #[arg(long, value_name = "ITERATIONS")]
        bench: Option<u64>,
        /// Rounds of the guest bench (baseline, then per mode unwatched and watched).
        #[arg(long, default_value_t = 3)]
        bench_rounds: usize,
    },
    /// Run openbox-agent's capture tests in a Debian kernel under qemu (TCG) with this
    /// machine's root filesystem shared over virtiofs: the capture mode this machine's
    /// kernel refuses (fentry), with the same test binaries and environment.
    GuestTest {
        /// The kernel to boot (6.1, 6.12).
        #[arg(long, default_value = "6.12")]
        kernel: String,
        /// The capture mode the tests' agents use (OPENBOX_CAPTURE_MODE).
        #[arg(long, default_value = "fentry")]
        mode: String,
        /// A test binary of openbox-agent (capture, spans, syscalls, …); repeatable.
        /// Default: the ones `cargo xtask test` runs in both modes.
        #[arg(long = "test")]
        tests: Vec<String>,
        /// Arguments passed to each test binary (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install the test environment only (Debian packages, Python virtualenvs with the
    /// worker hook, FerretDB, the Temporal CLI, Helm and the Kubernetes manifest
    /// checker); prints the OPENBOX_* variables.
    SetupEnv,
    /// Fuzz the protocol parsers (cargo-fuzz, nightly), each target for --seconds.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets (http, postgres, mysql, redis, mongo); all when none is given.
        targets: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::BuildEbpf => toolchain::build_ebpf().map(|_| ()),
        Task::Build => build_agent(),
        Task::Image { e2e_worker } => {
            build_agent()?;
            println!("{}", image::agent_image()?);
            if e2e_worker {
                println!("{}", image::worker_image()?);
            }
            Ok(())
        }
        Task::Lint => lint::lint(),
        Task::Test { skip_lint, args } => test(skip_lint, &args),
        Task::Demo => demo(),
        Task::Bench {
            iterations,
            only,
            quick,
            agent,
        } => bench(iterations, only, quick, agent),
        Task::LoadGen {
            clients,
            seconds,
            rate,
            marker,
            out,
        } => load_bench::generate(clients, seconds, rate, &marker, &out),
        Task::KernelMatrix {
            quick,
            kernels,
            agent,
            bench,
            bench_rounds,
        } => {
            let agent = match agent {
                Some(path) => path,
                None => {
                    build_agent()?;
                    agent_binary()
                }
            };
            let object = workspace_root().join("target/bpf/openbox-ebpf.o");
            kernel_matrix::run(
                &agent,
                &kernel_matrix::Options {
                    quick,
                    kernels,
                    object,
                    bench: bench.map(|iterations| kernel_matrix::GuestBench {
                        iterations,
                        rounds: bench_rounds,
                    }),
                },
            )
            .map(|_| ())
        }
        Task::GuestTest {
            kernel,
            mode,
            tests,
            args,
        } => {
            build_agent()?;
            let test_env = env::setup()?;
            let tests = if tests.is_empty() {
                CAPTURE_MODE_TESTS.iter().map(|t| t.to_string()).collect()
            } else {
                tests
            };
            guest_suite::run(
                &agent_binary(),
                &test_env.vars(),
                &guest_suite::Options {
                    kernel,
                    mode,
                    tests,
                    args,
                },
            )
        }
        Task::SetupEnv => env::setup().map(|_| ()),
        Task::Fuzz { seconds, targets } => fuzz::run_fuzz(&targets, seconds),
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn build_agent() -> Result<()> {
    toolchain::build_ebpf()?;
    run(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "openbox-agent",
    ]))
}

fn agent_binary() -> PathBuf {
    workspace_root().join("target/release/openbox-agent")
}

fn test(skip_lint: bool, args: &[String]) -> Result<()> {
    if !skip_lint {
        lint::lint().context(
            "`cargo xtask lint` failed, so no test ran: fix its findings (listed above) and run again",
        )?;
    }
    build_agent()?;
    let test_env = env::setup()?;
    // tests/e2e/tests/containers.rs runs the agent image as the DaemonSet does, and a
    // worker in a container of its own.
    let agent_image = image::agent_image()?;
    let worker_image = image::worker_image()?;
    let root = workspace_root();
    // Unit tests and the parsers' tests, then the integration tests, which share kernel
    // state (loaded programs, tracefs) and so run one at a time.
    let cargo_test = |extra: &[String]| -> Result<Command> {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&root)
            .env("OPENBOX_AGENT_BIN", agent_binary())
            .envs(test_env.vars())
            .env("OPENBOX_AGENT_IMAGE", &agent_image)
            .env("OPENBOX_WORKER_IMAGE", &worker_image)
            .env("CONTAINERS_CONF", image::containers_conf()?)
            .args(["test", "--release", "--workspace"])
            .args(extra)
            .args(["--", "--test-threads=1"]);
        Ok(cmd)
    };
    // Every test in the capture mode OPENBOX_CAPTURE_MODE names (the agents the tests
    // start inherit it), `auto` by default.
    run(&mut cargo_test(args)?)?;
    if !args.is_empty() {
        return Ok(());
    }
    // The whole suite (CI) also boots the other kernels users have: check and one trace
    // each, about a minute (the full matrix is `cargo xtask kernel-matrix`). Not when
    // the run is narrowed to some tests.
    kernel_matrix::run(
        &agent_binary(),
        &kernel_matrix::Options {
            quick: true,
            kernels: Vec::new(),
            object: root.join("target/bpf/openbox-ebpf.o"),
            bench: None,
        },
    )?;
    if std::env::var_os(CAPTURE_MODE_ENV).is_some() {
        return Ok(());
    }
    // The capture tests again in the mode `auto` did not pick, when the kernel has it.
    match other_capture_mode()? {
        OtherMode::Runs(mode) => {
            println!("xtask: the capture tests again in {mode} mode ({CAPTURE_MODE_ENV}={mode})");
            let extra: Vec<String> = CAPTURE_MODE_TESTS
                .iter()
                .flat_map(|t| ["--test".to_string(), t.to_string()])
                .collect();
            let mut extra_args = vec!["-p".to_string(), "openbox-agent".to_string()];
            extra_args.extend(extra);
            run(cargo_test(&extra_args)?.env(CAPTURE_MODE_ENV, mode))
        }
        OtherMode::Unavailable(why) => {
            // Where this kernel refuses fentry, the capture tests run in fentry mode on
            // Debian's 6.12 under qemu instead (`cargo xtask guest-test`).
            println!("xtask: this kernel cannot run fentry/fexit programs ({why}): the capture tests ({}) run in fentry mode on Debian's {GUEST_KERNEL} kernel under qemu", GUEST_SUITE_TESTS.join(", "));
            guest_suite::run(
                &agent_binary(),
                &test_env.vars(),
                &guest_suite::Options {
                    kernel: GUEST_KERNEL.to_string(),
                    mode: "fentry".to_string(),
                    tests: GUEST_SUITE_TESTS.iter().map(|t| t.to_string()).collect(),
                    args: Vec::new(),
                },
            )
        }
    }
}

/// The agent's capture mode setting (`--capture-mode`), which the tests' agents inherit.
const CAPTURE_MODE_ENV: &str = "OPENBOX_CAPTURE_MODE";
/// The test binaries run in both capture modes (the whole suite runs in `auto`'s).
const CAPTURE_MODE_TESTS: &[&str] = &["capture", "syscalls", "spans"];
/// Those of them the whole suite runs in the guest when this kernel refuses fentry: the
/// data path's own tests (about 20 minutes under TCG). `spans` (the parsers above the
/// same records, another 20 minutes) runs there with `cargo xtask guest-test`.
const GUEST_SUITE_TESTS: &[&str] = &["capture", "syscalls"];
/// The kernel the capture tests run on in fentry mode when this one refuses it.
const GUEST_KERNEL: &str = "6.12";

enum OtherMode {
    /// The mode to run the capture tests in as well.
    Runs(&'static str),
    /// `auto` picked tracepoints: fentry cannot run here, for this reason.
    Unavailable(String),
}

/// The capture mode `auto` does not use on this kernel, from `openbox-agent check`.
fn other_capture_mode() -> Result<OtherMode> {
    let out = Command::new(agent_binary())
        .args(["check", "--json"])
        .output()
        .context("running `openbox-agent check --json`")?;
    let report = String::from_utf8_lossy(&out.stdout);
    Ok(match json_string_after(&report, "\"capture_mode\"") {
        Some("fentry") => OtherMode::Runs("tracepoint"),
        Some(_) => OtherMode::Unavailable(
            report
                .find("\"fentry/fexit\"")
                .and_then(|at| json_string_after(&report[at..], "\"detail\""))
                .unwrap_or("see `openbox-agent check`")
                .to_string(),
        ),
        None => bail!("`openbox-agent check --json` says no capture_mode:\n{report}"),
    })
}

/// The string value after the first `key` in pretty-printed JSON (no escapes needed:
/// the values read here are plain words and sentences).
fn json_string_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let rest = &text[text.find(key)? + key.len()..];
    let rest = rest
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    Some(&rest[..rest.find('"')?])
}

fn demo() -> Result<()> {
    build_agent()?;
    let test_env = env::setup()?;
    run(Command::new("python3")
        .arg(workspace_root().join("tests/demo/demo.py"))
        .env("OPENBOX_AGENT_BIN", agent_binary())
        .envs(test_env.vars()))
}

fn bench(
    iterations: Option<u64>,
    only: Option<BenchPart>,
    quick: bool,
    agent: Option<PathBuf>,
) -> Result<()> {
    let agent = match agent {
        Some(path) => path,
        None => {
            build_agent()?;
            agent_binary()
        }
    };
    let started = std::time::Instant::now();
    let load_before = load_average();
    println!(
        "bench on {} CPUs ({}), load average {load_before}{}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        if quick { ", quick" } else { "" }
    );
    let part = |p: BenchPart| only.is_none() || only == Some(p);
    let mut summary = Vec::new();
    if part(BenchPart::Syscalls) {
        let modes = match other_capture_mode()? {
            OtherMode::Runs(_) => vec!["fentry", "tracepoint"],
            OtherMode::Unavailable(why) => {
                println!("bench: tracepoint mode only: this kernel cannot run fentry/fexit programs ({why})");
                vec!["tracepoint"]
            }
        };
        let iterations = iterations.unwrap_or(if quick { 50_000 } else { 200_000 });
        for row in bench::run(&agent, iterations, &modes)? {
            summary.push(format!(
                "syscalls  {:<6} {:<30} unwatched ×{:.2} ({:+.0} ns/syscall)   watched ×{:.2} ({:+.0} ns/syscall)",
                row.mode,
                row.label,
                row.unwatched / row.baseline,
                (row.unwatched - row.baseline) / row.syscalls as f64,
                row.watched / row.baseline,
                (row.watched - row.baseline) / row.syscalls as f64,
            ));
        }
    }
    if part(BenchPart::Kernels) {
        let object = workspace_root().join("target/bpf/openbox-ebpf.o");
        let rows = kernel_matrix::run(
            &agent,
            &kernel_matrix::Options {
                quick: true,
                // One kernel in the quick form: the newer, where fentry is the default.
                kernels: if quick {
                    vec!["6.12".into()]
                } else {
                    vec!["6.1".into(), "6.12".into()]
                },
                object,
                bench: Some(kernel_matrix::GuestBench {
                    iterations: if quick { 10_000 } else { 30_000 },
                    rounds: if quick { 2 } else { 3 },
                }),
            },
        )?;
        for r in rows {
            summary.push(format!(
                "kernels   {:<5} {:<10} {:<30} unwatched ×{:.3} ({:+.0} ns/syscall)   watched ×{:.2} ({:+.0} ns/syscall)   (TCG)",
                r.kernel,
                r.mode,
                r.label,
                r.unwatched / r.baseline,
                (r.unwatched - r.baseline) / r.syscalls as f64,
                r.watched / r.baseline,
                (r.watched - r.baseline) / r.syscalls as f64,
            ));
        }
    }
    if part(BenchPart::Parsers) && !quick {
        parser_bench()?;
    }
    let test_env =
        if part(BenchPart::Http) || part(BenchPart::Enforce) || (part(BenchPart::Hook) && !quick) {
            Some(env::setup()?)
        } else {
            None
        };
    if part(BenchPart::Http) {
        let size = if quick {
            http_bench::Size {
                rounds: 5,
                requests: 500,
                warmup: 50,
            }
        } else {
            http_bench::Size {
                rounds: 11,
                requests: 1500,
                warmup: 100,
            }
        };
        let env = test_env.as_ref().expect("set up above");
        for r in http_bench::run(&agent, env, size)? {
            for (what, t) in [("wall", r.wall), ("CPU ", r.cpu)] {
                summary.push(format!(
                    "http      {:<5} {what} plain {:.0} µs   sdk {:+.0} µs (×{:.2})   agent {:+.0} µs (×{:.2})   agent/sdk {:.3} (target ≤ 0.050)",
                    r.scheme,
                    t.plain,
                    t.sdk - t.plain,
                    t.sdk / t.plain,
                    t.agent - t.plain,
                    t.agent / t.plain,
                    t.ratio()
                ));
            }
        }
    }
    if part(BenchPart::Load) {
        let size = load_bench::Size {
            clients: 8,
            seconds: if quick { 5.0 } else { 15.0 },
        };
        // The targets' rates, then as fast as the clients go (where drops begin).
        let rates: &[f64] = if quick {
            &[50_000.0, 100_000.0]
        } else {
            &[50_000.0, 100_000.0, 0.0]
        };
        for &rate in rates {
            let r = load_bench::run(&agent, size, rate)?;
            summary.push(format!(
                "load      {:>7} {:.0} events/s ({:.0} req/s), drops {:.0}; agent {:.2} µs CPU/span, {:.0} % of a core, peak RSS {:.0} MiB{}",
                if r.target_events_per_s > 0.0 {
                    format!("@{:.0}k/s", r.target_events_per_s / 1e3)
                } else {
                    "@max".into()
                },
                r.events_per_s,
                r.requests_per_s,
                r.drops,
                r.cpu_us_per_span,
                100.0 * r.agent_cpu_share,
                r.peak_rss_mib,
                r.bpf_ns_per_request
                    .map(|ns| format!("; kernel programs {ns:.0} ns/request"))
                    .unwrap_or_default()
            ));
        }
        summary.push("load      targets: ≤ 5 µs agent CPU per span; 100 000 events/s with 0 drops on 2 cores".into());
    }
    if part(BenchPart::Hook) && !quick {
        let env = test_env.as_ref().expect("set up above");
        hook_bench::run(&agent, env, 40)?;
    }
    if part(BenchPart::Enforce) {
        let env = test_env.as_ref().expect("set up above");
        let size = if quick {
            enforce_bench::Size {
                rounds: 1,
                n: 300,
                n_new: 30,
            }
        } else {
            // 1 801 operations per activity: under the agent's 2 000 spans per activity,
            // past which it reports no more (`spans_dropped_over_limit`) and would look
            // cheaper than SDK 2.0, which reports every one.
            enforce_bench::Size {
                rounds: 3,
                n: 800,
                n_new: 100,
            }
        };
        enforce_bench::run(&agent, env, size)?;
    }
    if part(BenchPart::Startup) {
        let s = startup_bench::run(&agent, if quick { 3 } else { 7 })?;
        summary.push(format!(
            "startup   trace: command started after {:.0} ms (bare {:.0}), trace gone {:.0} ms after it (bare {:.0}) (targets ≤ 500, ≤ 200); daemon: stop {:.0} ms, start to ready {:.0} ms",
            s.trace_start, s.bare_start, s.trace_exit, s.bare_exit, s.daemon_stop, s.daemon_ready
        ));
    }
    println!(
        "\n== bench summary ({:.0} s; load average before {load_before}, after {}) ==",
        started.elapsed().as_secs_f64(),
        load_average()
    );
    for line in summary {
        println!("{line}");
    }
    Ok(())
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg has them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Parser throughput over the recorded traffic in openbox-agent/benches/traffic.
fn parser_bench() -> Result<()> {
    let root = workspace_root();
    run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "openbox-agent",
        "--example",
        "parser_bench",
    ]))?;
    let dir = root.join("openbox-agent/benches/traffic");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    println!("\nparser throughput, one core, recorded traffic replayed through detection, parser and span builder:");
    run(Command::new(root.join("target/release/examples/parser_bench")).args(&files))
}
