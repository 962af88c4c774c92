//! Container images with podman: the agent's (`deploy/Containerfile`, `cargo xtask
//! image`) and the end-to-end tests' worker (`tests/e2e/support/worker.Containerfile`).
//!
//! No image registry is reachable, so the base images are made here from Debian
//! packages with `mmdebstrap` (the host's own apt sources, so whatever mirror the host
//! uses), kept as tarballs in `~/.cache/openbox/images` and imported into podman. Every
//! image is tagged by a hash of what it is made of and only built when that tag is
//! missing, so a second run only looks.
//!
//! podman runs with `--runtime runc --cgroup-manager cgroupfs` (crun refuses the hybrid
//! cgroup layout of the machines this is tested on) and a containers.conf of our own
//! (`CONTAINERS_CONF`) with `default_ulimits = []`: without CAP_SYS_RESOURCE, which
//! these machines do not give even to root, setting a container's rlimits fails.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{env, run, workspace_root};

const PACKAGES: &[&str] = &["podman", "runc", "mmdebstrap"];

/// The agent image's name; the tag is the crate version.
pub const AGENT_IMAGE: &str = "localhost/openbox-agent";
const WORKER_IMAGE: &str = "localhost/openbox-e2e-worker";
/// The host's CA bundle, which pip in the worker's build trusts (see its Containerfile).
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A Debian base image made with mmdebstrap.
struct Base {
    name: &'static str,
    variant: &'static str,
    packages: &'static [&'static str],
}

/// The agent's build stage's base: a minimal Debian with the C toolchain Rust links with
/// (the Rust toolchains themselves are mounted from the host, see deploy/Containerfile).
const BUILD_BASE: Base = Base {
    name: "localhost/openbox-builder-base",
    variant: "minbase",
    packages: &["binutils", "gcc", "libc6-dev", "ca-certificates"],
};

/// The test worker's base: a minimal Debian with its own Python and libssl.
const WORKER_BASE: Base = Base {
    name: "localhost/openbox-build-base",
    variant: "minbase",
    packages: &[
        "binutils",
        "ca-certificates",
        "python3",
        "python3-venv",
        "libssl3",
    ],
};

/// The agent's runtime base: the C library and libgcc, extracted, nothing else.
const RUNTIME_BASE: Base = Base {
    name: "localhost/openbox-runtime-base",
    variant: "extract",
    packages: &["libc6", "libgcc-s1"],
};

fn cache_dir() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").ok_or_else(|| anyhow!("HOME is not set"))?;
    Ok(PathBuf::from(home).join(".cache/openbox"))
}

/// The containers.conf every podman command here uses.
pub fn containers_conf() -> Result<PathBuf> {
    let dir = cache_dir()?.join("podman");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let conf = dir.join("containers.conf");
    let want = "# Written by `cargo xtask` (xtask/src/image.rs): containers get no rlimits of\n# their own, since setting them needs CAP_SYS_RESOURCE.\n[containers]\ndefault_ulimits = []\n";
    if fs::read_to_string(&conf).ok().as_deref() != Some(want) {
        fs::write(&conf, want).with_context(|| format!("writing {}", conf.display()))?;
    }
    Ok(conf)
}

/// `podman` with the runtime options this machine needs.
pub fn podman() -> Result<Command> {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", containers_conf()?).args([
        "--runtime",
        "runc",
        "--cgroup-manager",
        "cgroupfs",
    ]);
    Ok(c)
}

fn image_exists(name: &str) -> Result<bool> {
    Ok(podman()?
        .args(["image", "exists", name])
        .status()
        .context("could not run podman")?
        .success())
}

/// Installs podman, runc and mmdebstrap when missing.
pub fn ensure_podman() -> Result<()> {
    env::install_debian_packages(PACKAGES)?;
    containers_conf()?;
    Ok(())
}

/// The host's apt sources, given to mmdebstrap as its mirror (deb822 or one-line form).
fn apt_sources() -> Result<PathBuf> {
    for p in [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ] {
        let p = Path::new(p);
        if fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false) {
            return Ok(p.to_path_buf());
        }
    }
    bail!("no apt sources found (/etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list): the base images are made from the Debian packages apt can reach; configure apt first")
}

/// The host's Debian release name (`bookworm`).
fn suite() -> Result<String> {
    let text = fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            anyhow!("/etc/os-release names no VERSION_CODENAME: the base images need a Debian host")
        })
}

/// FNV-1a, as the hook stamp: stable across Rust releases.
fn fnv(parts: &[&[u8]]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in (part.len() as u64).to_le_bytes().iter().chain(part.iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// Makes (or finds) a base image; its name with tag.
fn ensure_base(base: &Base) -> Result<String> {
    let suite = suite()?;
    let sources = apt_sources()?;
    let sources_text = fs::read(&sources)?;
    let hash = fnv(&[
        base.variant.as_bytes(),
        base.packages.join(",").as_bytes(),
        suite.as_bytes(),
        &sources_text,
    ]);
    let tag = format!("{}:{suite}-{hash}", base.name);
    if image_exists(&tag)? {
        return Ok(tag);
    }
    let dir = cache_dir()?.join("images");
    fs::create_dir_all(&dir)?;
    let short = base.name.rsplit('/').next().unwrap_or(base.name);
    let tarball = dir.join(format!("{short}-{suite}-{hash}.tar"));
    if !tarball.is_file() {
        eprintln!(
            "xtask: making the base image {tag} with mmdebstrap ({} {})",
            base.variant,
            base.packages.join(" ")
        );
        let partial = tarball.with_extension("tar.partial");
        run(Command::new("mmdebstrap")
            .arg(format!("--variant={}", base.variant))
            .arg(format!("--include={}", base.packages.join(",")))
            .args(["--quiet", "--format=tar"])
            .arg(&suite)
            .arg(&partial)
            .arg(&sources))
        .map_err(|e| anyhow!("{e}\nmaking the base image failed: mmdebstrap needs root and the Debian packages apt can reach"))?;
        fs::rename(&partial, &tarball)?;
    }
    run(podman()?.arg("import").arg(&tarball).arg(&tag))?;
    Ok(tag)
}

/// A fresh directory under target/image/ for a build context.
fn context_dir(name: &str) -> Result<PathBuf> {
    let dir = workspace_root().join("target/image").join(name);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// `HOST:HOST[:ro]`, a directory mounted into the build at the host's own path.
fn same_path_volume(dir: &Path, read_only: bool) -> Result<String> {
    if !dir.is_dir() {
        bail!(
            "{} is missing: the agent image's builder stage uses the host's Rust toolchains and caches (run `cargo xtask build` once first)",
            dir.display()
        );
    }
    let d = dir.display();
    Ok(if read_only {
        format!("{d}:{d}:ro")
    } else {
        format!("{d}:{d}")
    })
}

/// Builds the agent image from deploy/Containerfile: its builder stage runs `cargo xtask
/// build` in the container, offline, with the host's toolchains mounted read-only and
/// the workspace (so target/ and the build stay incremental) at their host paths. Its
/// name with tag.
pub fn agent_image() -> Result<String> {
    ensure_podman()?;
    let build = ensure_base(&BUILD_BASE)?;
    let runtime = ensure_base(&RUNTIME_BASE)?;
    let root = workspace_root();
    let home = PathBuf::from(std::env::var_os("HOME").ok_or_else(|| anyhow!("HOME is not set"))?);
    let cargo_home =
        std::env::var_os("CARGO_HOME").map_or_else(|| home.join(".cargo"), PathBuf::from);
    let rustup_home =
        std::env::var_os("RUSTUP_HOME").map_or_else(|| home.join(".rustup"), PathBuf::from);
    if cargo_home != home.join(".cargo") || rustup_home != home.join(".rustup") {
        bail!(
            "the agent image's builder stage expects the Rust toolchains in {0}/.cargo and {0}/.rustup (CARGO_HOME={1}, RUSTUP_HOME={2} here)",
            home.display(),
            cargo_home.display(),
            rustup_home.display()
        );
    }
    // An empty context: everything the build reads is mounted.
    let ctx = context_dir("agent")?;
    let tag = format!("{AGENT_IMAGE}:{}", env!("CARGO_PKG_VERSION"));
    eprintln!("xtask: building {tag} (the builder stage runs `cargo xtask build` offline, in the container)");
    run(podman()?
        // --no-cache: the builder's layer depends on the mounted sources, which podman
        // cannot see; cargo itself keeps the build incremental.
        .args([
            "build",
            "--quiet",
            "--no-cache",
            "--network",
            "none",
            "--file",
        ])
        .arg(root.join("deploy/Containerfile"))
        .arg("--volume")
        .arg(same_path_volume(&root, false)?)
        .arg("--volume")
        .arg(same_path_volume(&cargo_home, true)?)
        .arg("--volume")
        .arg(same_path_volume(&rustup_home, true)?)
        .arg("--volume")
        .arg(same_path_volume(&cache_dir()?, true)?)
        .arg("--build-arg")
        .arg(format!("WORKSPACE={}", root.display()))
        .arg("--build-arg")
        .arg(format!("HOST_HOME={}", home.display()))
        .arg("--build-arg")
        .arg(format!("BUILD_BASE={build}"))
        .arg("--build-arg")
        .arg(format!("RUNTIME_BASE={runtime}"))
        .args(["--tag", &tag])
        .arg(&ctx))?;
    eprintln!("xtask: built {tag}");
    Ok(tag)
}

/// The end-to-end tests' worker image (own Python, temporalio, libssl, and the hook).
pub fn worker_image() -> Result<String> {
    ensure_podman()?;
    let base = ensure_base(&WORKER_BASE)?;
    let root = workspace_root();
    let containerfile = root.join("tests/e2e/support/worker.Containerfile");
    let requirements = root.join("openbox-agent/tests/support/requirements.txt");
    let hook_dir = root.join("hooks/python");
    let hook_files = env::hook_sources(&hook_dir)?;
    let hash = fnv(&[
        base.as_bytes(),
        &fs::read(&containerfile)
            .with_context(|| format!("reading {}", containerfile.display()))?,
        &fs::read(&requirements).with_context(|| format!("reading {}", requirements.display()))?,
        env::hook_stamp(&hook_dir, &hook_files)?.as_bytes(),
    ]);
    let tag = format!("{WORKER_IMAGE}:{hash}");
    if image_exists(&tag)? {
        return Ok(tag);
    }
    let ctx = context_dir("worker")?;
    fs::copy(&requirements, ctx.join("requirements.txt"))?;
    for f in &hook_files {
        let to = ctx.join("hook").join(f);
        fs::create_dir_all(to.parent().expect("a file has a parent"))?;
        fs::copy(hook_dir.join(f), &to)?;
    }
    eprintln!("xtask: building the test worker image {tag} (pip installs from PyPI)");
    let ca = Path::new(HOST_CA_BUNDLE);
    if !ca.is_file() {
        bail!("{HOST_CA_BUNDLE} is missing: pip in the worker image's build trusts the host's CA bundle; install ca-certificates");
    }
    run(podman()?
        .args(["build", "--quiet", "--network", "host"])
        .arg("--volume")
        .arg(format!("{HOST_CA_BUNDLE}:/run/host-ca.crt:ro"))
        .arg("--file")
        .arg(&containerfile)
        .arg("--build-arg")
        .arg(format!("BASE={base}"))
        .args(["--tag", &tag])
        .arg(&ctx))?;
    Ok(tag)
}
