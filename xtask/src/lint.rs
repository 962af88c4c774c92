//! `cargo xtask lint`: formatting and lints of every part of the project, the way CI
//! checks them (`cargo xtask test` runs this first).
//!
//! - rustfmt on the root workspace and on the kernel crate (its own workspace);
//! - clippy, warnings denied, on the root workspace (release, every target, like the
//!   tests build) and on the kernel crate (nightly, bpfel-unknown-none);
//! - ruff (lint and format) and mypy on the worker hook, from a pinned tools virtualenv;
//! - gofmt and go vet on the Kubernetes manifest checker (tests/k8s-validate).
//!
//! Every check runs even when an earlier one fails, so one run shows every finding.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use crate::{env, run, toolchain, workspace_root};

/// A check's name and how to fix what it found.
struct Check {
    name: &'static str,
    fix: &'static str,
}

pub fn lint() -> Result<()> {
    let started = Instant::now();
    let root = workspace_root();
    let ebpf = root.join("openbox-ebpf");
    let hook = root.join("hooks/python");
    let mut failed: Vec<Check> = Vec::new();
    let mut check = |check: Check, result: Result<()>| {
        if let Err(e) = result {
            eprintln!("xtask lint: {} failed: {e:#}", check.name);
            failed.push(check);
        }
    };

    check(
        Check {
            name: "rustfmt (workspace)",
            fix: "run `cargo fmt --all`",
        },
        run(cargo(&root).args(["fmt", "--all", "--check"])),
    );
    // Stable rustfmt, like the workspace: formatting needs no target. Not `--all`: that
    // also reaches path dependencies, which the workspace check covers.
    check(
        Check {
            name: "rustfmt (openbox-ebpf)",
            fix: "run `cargo fmt` in openbox-ebpf",
        },
        run(cargo(&ebpf).args(["fmt", "--check"])),
    );
    check(
        Check {
            name: "clippy (workspace)",
            fix: "see clippy's findings above (`cargo clippy --release --workspace --all-targets`)",
        },
        run(cargo(&root).args([
            "clippy",
            "--release",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])),
    );
    check(
        Check {
            name: "clippy (openbox-ebpf)",
            fix: "see clippy's findings above",
        },
        toolchain::clippy_ebpf(),
    );
    check(
        Check {
            name: "gofmt and go vet (tests/k8s-validate)",
            fix: "run `gofmt -w tests/k8s-validate`, or see go vet's findings above",
        },
        env::lint_k8s_validate(),
    );
    match env::lint_tools() {
        Ok(bin) => {
            check(
                Check {
                    name: "ruff check (hooks/python)",
                    fix: "see ruff's findings above (`ruff check --fix` fixes some)",
                },
                run(Command::new(bin.join("ruff"))
                    .current_dir(&hook)
                    .args(["check", "."])),
            );
            check(
                Check {
                    name: "ruff format (hooks/python)",
                    fix: "run `target/test-env/lint-venv/bin/ruff format hooks/python`",
                },
                run(Command::new(bin.join("ruff"))
                    .current_dir(&hook)
                    .args(["format", "--check", "."])),
            );
            // Its files and settings are in hooks/python/pyproject.toml.
            check(
                Check {
                    name: "mypy (hooks/python)",
                    fix: "see mypy's findings above",
                },
                run(Command::new(bin.join("mypy"))
                    .current_dir(&hook)
                    .env("MYPY_CACHE_DIR", root.join("target/mypy-cache"))),
            );
        }
        Err(e) => check(
            Check {
                name: "the Python lint tools",
                fix: "see the error above",
            },
            Err(e),
        ),
    }

    let took = started.elapsed();
    if failed.is_empty() {
        eprintln!("xtask lint: all checks passed in {}", seconds(took));
        return Ok(());
    }
    let list: Vec<String> = failed
        .iter()
        .map(|c| format!("  - {}: {}", c.name, c.fix))
        .collect();
    bail!(
        "{} of the lint checks failed (in {}):\n{}",
        failed.len(),
        seconds(took),
        list.join("\n")
    )
}

/// `cargo` in `dir`, free of a toolchain or flags set by the cargo that runs xtask.
fn cargo(dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(dir).env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

fn seconds(d: Duration) -> String {
    format!("{:.0} s", d.as_secs_f64())
}
