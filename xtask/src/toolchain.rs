//! The eBPF toolchain: a nightly (or, failing that, stable with RUSTC_BOOTSTRAP=1) with
//! `rust-src`, and `bpf-linker` built against that toolchain's own LLVM.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{run, workspace_root};

const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_TARGET: &str = "bpfel-unknown-none";

/// The toolchain that builds the kernel crate.
struct Toolchain {
    /// rustup name: "nightly" or "stable".
    name: String,
    /// Its sysroot (holds lib/libLLVM.so.*).
    sysroot: PathBuf,
    /// Stable with RUSTC_BOOTSTRAP=1: the fallback on a machine without a nightly.
    bootstrap: bool,
}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("could not start {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// Where the project keeps tools it installs (bpf-linker, the LLVM link directory).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("OPENBOX_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/openbox"))
}

fn rustup() -> Command {
    Command::new("rustup")
}

fn find_toolchain() -> Result<Toolchain> {
    let have_rustup = output(rustup().arg("--version")).is_ok();
    if !have_rustup {
        bail!("rustup is not installed: the kernel programs need a nightly toolchain with rust-src. Install rustup, then run `cargo xtask build-ebpf` again.");
    }
    let installed = output(rustup().args(["toolchain", "list"]))?;
    let mut name = "nightly";
    if !installed.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("xtask: installing the nightly toolchain (rustup toolchain install nightly --profile minimal)");
        if run(rustup().args(["toolchain", "install", "nightly", "--profile", "minimal"])).is_err()
        {
            eprintln!("xtask: no nightly toolchain could be installed; falling back to stable with RUSTC_BOOTSTRAP=1");
            name = "stable";
        }
    }
    ensure_component(
        name,
        "rust-src",
        "the kernel programs are built with -Z build-std=core, which needs rust-src",
    )?;
    let sysroot = PathBuf::from(output(
        rustup().args(["run", name, "rustc", "--print", "sysroot"]),
    )?);
    Ok(Toolchain {
        name: name.to_string(),
        sysroot,
        bootstrap: name == "stable",
    })
}

/// Adds a rustup component to the toolchain when it is missing; `why` says what needs it.
fn ensure_component(toolchain: &str, component: &str, why: &str) -> Result<()> {
    let components =
        output(rustup().args(["component", "list", "--installed", "--toolchain", toolchain]))?;
    if !components.lines().any(|l| l.starts_with(component)) {
        eprintln!("xtask: adding {component} to the {toolchain} toolchain");
        run(rustup().args(["component", "add", component, "--toolchain", toolchain])).map_err(
            |e| {
                anyhow!(
                    "{e}\n{why}: run `rustup component add {component} --toolchain {toolchain}`"
                )
            },
        )?;
    }
    Ok(())
}

/// The toolchain's LLVM shared library, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn llvm_library(sysroot: &Path) -> Result<(String, u32)> {
    let lib = sysroot.join("lib");
    for entry in fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().to_string();
        if let Some(rest) = name.strip_prefix("libLLVM.so.") {
            let major: u32 = rest
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .ok_or_else(|| anyhow!("cannot read the LLVM version from {name}"))?;
            return Ok((name, major));
        }
    }
    bail!(
        "no libLLVM.so.* in {}: bpf-linker is built against the toolchain's own LLVM",
        lib.display()
    )
}

/// Installs bpf-linker when it is missing or does not run, and returns its directory.
fn ensure_bpf_linker(tc: &Toolchain) -> Result<PathBuf> {
    let (llvm_so, major) = llvm_library(&tc.sysroot)?;
    // One directory per LLVM build: its lib/ holds the two links bpf-linker needs, and
    // it is the binary's RUNPATH, so it must stay where it is.
    let prefix = cache_dir().join(format!("llvm/{llvm_so}"));
    let root = cache_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}-{llvm_so}"));
    let bin = root.join("bin/bpf-linker");
    if bin.exists() && output(Command::new(&bin).arg("--version")).is_ok() {
        return Ok(root.join("bin"));
    }
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let target = tc.sysroot.join("lib").join(&llvm_so);
    for link in ["libLLVM.so".to_string(), llvm_so.clone()] {
        let path = lib.join(&link);
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(&target, &path)
            .with_context(|| format!("linking {} to {}", path.display(), target.display()))?;
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} of the {} toolchain (about a minute)", tc.name);
    run(Command::new("cargo")
        .env("LLVM_PREFIX", &prefix)
        .env(format!("LLVM_SYS_{major}1_PREFIX"), &prefix)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--force"])
        .args(["--no-default-features", "--features", &format!("llvm-{major}")])
        .arg("--root")
        .arg(&root))
    .map_err(|e| {
        anyhow!(
            "{e}\nbpf-linker could not be built. It needs a C toolchain (apt-get install build-essential) and the toolchain's LLVM at {}. To build it by hand: LLVM_PREFIX={} cargo install bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features llvm-{major} --root {}",
            target.display(),
            prefix.display(),
            root.display()
        )
    })?;
    output(Command::new(&bin).arg("--version"))
        .context("the freshly built bpf-linker does not run")?;
    Ok(root.join("bin"))
}

/// The built kernel object, where the agent's build script looks for it.
pub fn ebpf_object() -> PathBuf {
    workspace_root().join("target/bpf/openbox-ebpf.o")
}

/// `cargo +<toolchain> <task> --release --target bpfel-unknown-none -Z build-std=core`
/// in the kernel crate, free of the outer cargo's toolchain, target dir and flags.
fn ebpf_cargo(tc: &Toolchain, task: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root().join("openbox-ebpf"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .arg(format!("+{}", tc.name))
        .args([
            task,
            "--release",
            "--target",
            BPF_TARGET,
            "-Z",
            "build-std=core",
        ]);
    if tc.bootstrap {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    cmd
}

/// Clippy on the kernel crate, warnings denied, with the toolchain that builds it (its
/// own workspace and target, so the root workspace's clippy does not reach it).
pub fn clippy_ebpf() -> Result<()> {
    let tc = find_toolchain()?;
    ensure_component(
        &tc.name,
        "clippy",
        "`cargo xtask lint` runs clippy on the kernel crate",
    )?;
    run(ebpf_cargo(&tc, "clippy").args(["--", "-D", "warnings"]))
}

pub fn build_ebpf() -> Result<PathBuf> {
    let tc = find_toolchain()?;
    let linker_dir = ensure_bpf_linker(&tc)?;
    let path = format!(
        "{}:{}",
        linker_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let crate_dir = workspace_root().join("openbox-ebpf");
    run(ebpf_cargo(&tc, "build").env("PATH", &path))?;
    let built = crate_dir.join(format!("target/{BPF_TARGET}/release/openbox-ebpf"));
    let dest = ebpf_object();
    fs::create_dir_all(dest.parent().unwrap())?;
    // Copy only when changed, so the agent's build script does not rebuild needlessly.
    let new = fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    if fs::read(&dest).ok().as_deref() != Some(&new[..]) {
        fs::write(&dest, &new).with_context(|| format!("writing {}", dest.display()))?;
    }
    Ok(dest)
}
