//! The test environment: Debian packages and a Python virtualenv.
//!
//! `setup()` checks before it installs, so a second run only looks: `dpkg-query` for the
//! packages, a marker file in the virtualenv for the pip requirements.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{run, workspace_root};

/// Debian packages the integration tests use: the `curl` client (system libssl), the
/// `openssl` CLI (self-signed certificates), PostgreSQL server binaries, `runuser` and
/// `setpriv` (run a program as `postgres` or `nobody`), `ps`/`pgrep`.
const APT_PACKAGES: &[&str] = &[
    "curl",
    "openssl",
    "postgresql",
    "ca-certificates",
    "util-linux",
    "procps",
];

/// Binaries that must be on PATH once the packages are installed: (binary, package).
const REQUIRED_BINARIES: &[(&str, &str)] = &[
    ("curl", "curl"),
    ("openssl", "openssl"),
    ("runuser", "util-linux"),
    ("setpriv", "util-linux"),
    ("pgrep", "procps"),
];

/// The fixtures' pip requirements, one pinned package a line (dependencies pinned too).
const REQUIREMENTS_FILE: &str = "openbox-agent/tests/support/requirements.txt";

pub struct TestEnv {
    vars: Vec<(String, String)>,
}

impl TestEnv {
    pub fn vars(&self) -> Vec<(String, String)> {
        self.vars.clone()
    }
}

pub fn setup() -> Result<TestEnv> {
    let root = workspace_root();
    let support = root.join("openbox-agent/tests/support");
    if !support.is_dir() {
        bail!(
            "the test fixtures are missing: {} is not a directory",
            support.display()
        );
    }

    let python3 = find_python3()?;
    let mut wanted: Vec<&str> = APT_PACKAGES.to_vec();
    if let Some(p) = &python3 {
        if !python_has_venv(p) {
            // Debian's python3 ships `venv` without `ensurepip`; python3-venv adds it.
            wanted.push("python3-venv");
        }
    } else {
        wanted.extend(["python3", "python3-venv"]);
    }
    install_debian_packages(&wanted)?;
    check_binaries()?;
    let python3 = match python3 {
        Some(p) if python_has_venv(&p) => p,
        _ => find_python3()?
            .filter(|p| python_has_venv(p))
            .ok_or_else(|| anyhow!("python3 with the venv module is still missing after installing python3-venv: run `apt-get install -y python3 python3-venv`"))?,
    };

    let pg_bin = find_pg_bin()?;
    let venv = root.join("target/test-env/venv");
    let venv_python = ensure_venv(&python3, &venv, &root.join(REQUIREMENTS_FILE))?;

    let vars = vec![
        (
            "OPENBOX_TEST_PYTHON".to_string(),
            venv_python.display().to_string(),
        ),
        ("OPENBOX_PG_BIN".to_string(), pg_bin.display().to_string()),
        (
            "OPENBOX_TEST_SUPPORT".to_string(),
            support.display().to_string(),
        ),
    ];
    for (k, v) in &vars {
        eprintln!("xtask: {k}={v}");
    }
    Ok(TestEnv { vars })
}

fn is_root() -> bool {
    // /proc/self belongs to the process's effective uid.
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn on_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(binary))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn dpkg_installed(package: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .context("could not run dpkg-query: the test environment installer needs a Debian-based system (dpkg and apt-get)")?;
    // dpkg-query exits 1 for a package it has never heard of: that is "not installed".
    Ok(out.status.success()
        && String::from_utf8_lossy(&out.stdout).trim() == "install ok installed")
}

fn install_debian_packages(wanted: &[&str]) -> Result<()> {
    let mut missing = Vec::new();
    for package in wanted {
        if !dpkg_installed(package)? {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let fix = format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !is_root() {
        bail!("Debian packages missing for the tests: {}. Installing them needs root: run `{fix}` as root, then run this again", missing.join(", "));
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    let apt = || {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(apt().args(["update"])).map_err(|e| {
        anyhow!("{e}\ncould not refresh the package lists; fix apt, then run `{fix}`")
    })?;
    run(apt()
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing))
    .map_err(|e| {
        anyhow!(
            "{e}\ninstalling {} failed; run `{fix}` to see why",
            missing.join(", ")
        )
    })?;
    Ok(())
}

fn check_binaries() -> Result<()> {
    for (binary, package) in REQUIRED_BINARIES {
        if on_path(binary).is_none() {
            bail!("`{binary}` is not on PATH although package {package} is installed: run `apt-get install --reinstall -y {package}` or fix PATH");
        }
    }
    Ok(())
}

fn find_python3() -> Result<Option<PathBuf>> {
    Ok(on_path("python3"))
}

fn python_has_venv(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import venv, ensurepip"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The newest `/usr/lib/postgresql/<ver>/bin` holding `initdb` and `postgres`.
fn find_pg_bin() -> Result<PathBuf> {
    let base = Path::new("/usr/lib/postgresql");
    let fix = "run `apt-get install -y --no-install-recommends postgresql`";
    let entries = fs::read_dir(base).with_context(|| {
        format!(
            "PostgreSQL server binaries not found: cannot read {}; {fix}",
            base.display()
        )
    })?;
    let mut best: Option<(Vec<u64>, PathBuf)> = None;
    for entry in entries.flatten() {
        let bin = entry.path().join("bin");
        if !(bin.join("initdb").is_file() && bin.join("postgres").is_file()) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().to_string();
        let version: Vec<u64> = name.split('.').map(|p| p.parse().unwrap_or(0)).collect();
        if best.as_ref().is_none_or(|(v, _)| version > *v) {
            best = Some((version, bin));
        }
    }
    best.map(|(_, bin)| bin)
        .ok_or_else(|| anyhow!("PostgreSQL server binaries not found: no {}/<version>/bin with initdb and postgres; {fix}", base.display()))
}

/// What the virtualenv was built from; a change rebuilds it.
fn marker_contents(python3: &Path, requirements: &str) -> Result<String> {
    let out = Command::new(python3)
        .args([
            "-c",
            "import sys; print(sys.version.split()[0], sys.base_prefix)",
        ])
        .output()
        .with_context(|| format!("could not run {}", python3.display()))?;
    if !out.status.success() {
        bail!(
            "{} -c 'import sys' failed: {}",
            python3.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(format!(
        "# python {}\n{requirements}",
        String::from_utf8_lossy(&out.stdout).trim()
    ))
}

fn ensure_venv(python3: &Path, venv: &Path, requirements_file: &Path) -> Result<PathBuf> {
    let requirements = fs::read_to_string(requirements_file).with_context(|| {
        format!(
            "could not read the fixtures' pip requirements {}",
            requirements_file.display()
        )
    })?;
    let marker = venv.join("openbox-requirements.txt");
    let venv_python = venv.join("bin/python");
    let want = marker_contents(python3, &requirements)?;
    let have = fs::read_to_string(&marker).ok();
    if have.as_deref() == Some(want.as_str()) && venv_usable(&venv_python) {
        return Ok(venv_python);
    }

    eprintln!("xtask: creating the test virtualenv {}", venv.display());
    if venv.exists() {
        fs::remove_dir_all(venv)
            .with_context(|| format!("could not remove the stale virtualenv {}", venv.display()))?;
    }
    fs::create_dir_all(venv.parent().expect("venv has a parent"))?;
    run(Command::new(python3).args(["-m", "venv"]).arg(venv)).map_err(|e| {
        anyhow!("{e}\ncould not create the virtualenv; on Debian `python3 -m venv` needs `apt-get install -y python3-venv`")
    })?;
    run(Command::new(&venv_python)
        .args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--quiet", "-r"])
        .arg(requirements_file))
    .map_err(|e| {
        anyhow!(
            "{e}\ninstalling the fixtures' Python packages failed (is PyPI reachable?); retry with `{} -m pip install -r {}`, then run this again",
            venv_python.display(),
            requirements_file.display()
        )
    })?;
    if !venv_usable(&venv_python) {
        bail!("the virtualenv {} was built but cannot import httpx and psycopg2; delete it and run `cargo xtask setup-env` again", venv.display());
    }
    // Written last: an interrupted install leaves no marker and is redone next time.
    fs::write(&marker, want).with_context(|| format!("could not write {}", marker.display()))?;
    Ok(venv_python)
}

fn venv_usable(venv_python: &Path) -> bool {
    Command::new(venv_python)
        .args(["-c", "import httpx, psycopg2"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
