//! Project tasks: `cargo xtask build-ebpf | build | image | lint | test | demo | bench |
//! kernel-matrix`.
//!
//! Every task installs what it needs and reuses what is already there, so the two
//! commands of the README work on a fresh machine.

mod bench;
mod env;
mod fuzz;
mod hook_bench;
mod image;
mod kernel_matrix;
mod lint;
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
    /// `trace -- CMD`: how long until CMD runs, and until `trace` returns after it ends.
    Startup,
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
    /// Measure the per-syscall cost of the agent (watched, unwatched, no agent).
    Bench {
        /// Iterations per loop.
        #[arg(long, default_value_t = 200_000)]
        iterations: u64,
        /// Run only one part: syscalls (the agent's cost per syscall), parsers, or hook.
        #[arg(long, value_enum)]
        only: Option<BenchPart>,
    },
    /// Boot Debian's 6.1 and 6.12 cloud kernels under qemu (TCG) with the agent and run
    /// `check` and, per capture mode, a `trace` of an HTTPS request and a file write in
    /// each, beside the host; prints the matrix and what differs.
    KernelMatrix {
        /// One `trace` per kernel in the default capture mode, and no helper probe.
        #[arg(long)]
        quick: bool,
        /// Only this kernel (host, 6.1, 6.12); repeatable. All when none is given.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// Run this agent binary instead of building the workspace's.
        #[arg(long)]
        agent: Option<PathBuf>,
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
        Task::Bench { iterations, only } => bench(iterations, only),
        Task::KernelMatrix {
            quick,
            kernels,
            agent,
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
    run(Command::new("cargo")
        .current_dir(&root)
        .env("OPENBOX_AGENT_BIN", agent_binary())
        .envs(test_env.vars())
        .env("OPENBOX_AGENT_IMAGE", &agent_image)
        .env("OPENBOX_WORKER_IMAGE", &worker_image)
        .env("CONTAINERS_CONF", image::containers_conf()?)
        .args(["test", "--release", "--workspace"])
        .args(args)
        .args(["--", "--test-threads=1"]))?;
    // The whole suite (CI) also boots the other kernels users have: check and one trace
    // each, about a minute (the full matrix is `cargo xtask kernel-matrix`). Not when
    // the run is narrowed to some tests.
    if args.is_empty() {
        kernel_matrix::run(
            &agent_binary(),
            &kernel_matrix::Options {
                quick: true,
                kernels: Vec::new(),
                object: root.join("target/bpf/openbox-ebpf.o"),
            },
        )?;
    }
    Ok(())
}

fn demo() -> Result<()> {
    build_agent()?;
    let test_env = env::setup()?;
    run(Command::new("python3")
        .arg(workspace_root().join("tests/demo/demo.py"))
        .env("OPENBOX_AGENT_BIN", agent_binary())
        .envs(test_env.vars()))
}

fn bench(iterations: u64, only: Option<BenchPart>) -> Result<()> {
    build_agent()?;
    let part = |p: BenchPart| only.is_none() || only == Some(p);
    if part(BenchPart::Syscalls) {
        bench::run(&agent_binary(), iterations)?;
    }
    if part(BenchPart::Parsers) {
        parser_bench()?;
    }
    if part(BenchPart::Hook) {
        let test_env = env::setup()?;
        hook_bench::run(&agent_binary(), &test_env, 40)?;
    }
    if part(BenchPart::Startup) {
        startup_bench::run(&agent_binary())?;
    }
    Ok(())
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
