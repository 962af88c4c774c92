//! The test environment: Debian packages, two Python virtualenvs (the first with the
//! worker hook from hooks/python installed in it), a FerretDB binary and the Temporal CLI.
//!
//! `setup()` checks before it installs, so a second run only looks: `dpkg-query` for the
//! packages, a marker file in each virtualenv for its pip requirements, a stamp of the
//! hook's sources, the versioned FerretDB binary and the `temporal`, `helm` and `jaeger`
//! binaries in `~/.cache/openbox/go/bin`.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{run, workspace_root};

/// Debian packages the integration tests use: the `curl` client (system libssl), the
/// `openssl` CLI (self-signed certificates), PostgreSQL, MariaDB (server, and the client
/// the fixture bootstraps it with) and Redis server binaries, `runuser` and `setpriv`
/// (run a program as `postgres` or `nobody`), `ps`/`pgrep`, `systemd-analyze` (checks
/// deploy/systemd/openbox-agent.service). No service is started: the
/// tests start throwaway servers themselves (tests/support/*_server.py).
const APT_PACKAGES: &[&str] = &[
    "curl",
    "openssl",
    "postgresql",
    "mariadb-server",
    "mariadb-client",
    // MariaDB Connector/C, loaded by tests/support/client_mysql_cursor.py through ctypes.
    "libmariadb3",
    "redis-server",
    "ca-certificates",
    "util-linux",
    "procps",
    "libcap2-bin",
    "systemd",
];

/// Binaries that must be on PATH once the packages are installed: (binary, package).
const REQUIRED_BINARIES: &[(&str, &str)] = &[
    ("curl", "curl"),
    ("openssl", "openssl"),
    ("runuser", "util-linux"),
    ("setpriv", "util-linux"),
    ("pgrep", "procps"),
    ("capsh", "libcap2-bin"),
    ("systemd-analyze", "systemd"),
    ("mariadb-install-db", "mariadb-server"),
    ("mariadb", "mariadb-client"),
    ("redis-server", "redis-server"),
];

/// Where Debian's mariadb-server puts the server binary.
const MARIADB_BIN_DIR: &str = "/usr/sbin";

/// The in-process SDK and the OpenTelemetry instrumentations it enables, for the
/// side-by-side test; a separate virtualenv because it pins its own versions.
const SDK_REQUIREMENTS_FILE: &str = "openbox-agent/tests/support/sdk-requirements.txt";

/// FerretDB, a MongoDB-wire-protocol server; v1 has the SQLite backend
/// (`--handler=sqlite --sqlite-url=file:DIR/`).
const FERRETDB_MODULE: &str = "github.com/FerretDB/FerretDB";
const FERRETDB_VERSION: &str = "v1.24.0";

/// The fixtures' pip requirements, one pinned package a line (dependencies pinned too).
/// SDK 2.0 (openbox-temporal-sdk-python 2.0.0), for side-by-side checks of 2.0 requests.
const SDK2_REQUIREMENTS_FILE: &str = "openbox-agent/tests/support/sdk2-requirements.txt";
const REQUIREMENTS_FILE: &str = "openbox-agent/tests/support/requirements.txt";

/// The Temporal CLI, whose `temporal server start-dev` is the end-to-end tests' Temporal
/// server (no Debian or PyPI package has one). Always an explicit version: the module
/// proxy this project reaches refuses version listings, so `@latest` cannot resolve.
const TEMPORAL_PACKAGE: &str = "github.com/temporalio/cli/cmd/temporal";
const TEMPORAL_MODULE: &str = "github.com/temporalio/cli";
const TEMPORAL_VERSION: &str = "v1.1.2";

/// Helm 3, for `helm lint` and `helm template` of the chart in deploy/helm (no Debian
/// or PyPI package has it). Explicit version, as for the Temporal CLI.
const HELM_PACKAGE: &str = "helm.sh/helm/v3/cmd/helm";
const HELM_MODULE: &str = "helm.sh/helm/v3";
const HELM_VERSION: &str = "v3.22.0";

/// Jaeger (v2, an OpenTelemetry Collector distribution with in-memory storage and the
/// query API), the OTLP backend of the end-to-end export test. Its module's go.mod has
/// `replace` directives, which `go install PKG@VERSION` refuses: it is built as a tool
/// of a module of our own (`go get -tool`, then `go build`).
const JAEGER_PACKAGE: &str = "github.com/jaegertracing/jaeger/cmd/jaeger";
const JAEGER_MODULE: &str = "github.com/jaegertracing/jaeger";
const JAEGER_VERSION: &str = "v1.76.0";

/// The strict Kubernetes manifest checker (a Go module in the repository).
const K8S_VALIDATE_DIR: &str = "tests/k8s-validate";

/// The worker hook's Python package, installed (not editable) into the fixtures'
/// virtualenv so the end-to-end tests prove it is pip-installable.
const HOOK_DIR: &str = "hooks/python";
/// Module the installed hook must provide.
const HOOK_IMPORT: &str = "from openbox_hook import OpenBoxHook, create_openbox_worker";

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
    let mariadb_bin = Path::new(MARIADB_BIN_DIR);
    if !mariadb_bin.join("mariadbd").is_file() {
        bail!("{}/mariadbd is missing although mariadb-server is installed: run `apt-get install --reinstall -y mariadb-server`", mariadb_bin.display());
    }
    let redis_server = on_path("redis-server").expect("checked by check_binaries");
    let venv = root.join("target/test-env/venv");
    let venv_python = ensure_venv(
        &python3,
        &venv,
        &root.join(REQUIREMENTS_FILE),
        FIXTURE_IMPORTS,
    )?;
    let sdk_venv = root.join("target/test-env/sdk-venv");
    let sdk_python = ensure_venv(
        &python3,
        &sdk_venv,
        &root.join(SDK_REQUIREMENTS_FILE),
        SDK_IMPORTS,
    )?;
    let sdk2_python = ensure_venv(
        &python3,
        &root.join("target/test-env/sdk2-venv"),
        &root.join(SDK2_REQUIREMENTS_FILE),
        SDK2_IMPORTS,
    )?;
    let hook_dir = root.join(HOOK_DIR);
    install_hook(&venv_python, &venv, &hook_dir)?;
    let ferretdb = ensure_ferretdb()?;
    let temporal = ensure_temporal()?;
    let helm = ensure_helm()?;
    let jaeger = ensure_jaeger()?;
    let k8s_validate = build_k8s_validate()?;

    let vars = vec![
        (
            "OPENBOX_TEST_PYTHON".to_string(),
            venv_python.display().to_string(),
        ),
        ("OPENBOX_PG_BIN".to_string(), pg_bin.display().to_string()),
        (
            "OPENBOX_MARIADB_BIN_DIR".to_string(),
            mariadb_bin.display().to_string(),
        ),
        (
            "OPENBOX_REDIS_SERVER".to_string(),
            redis_server.display().to_string(),
        ),
        (
            "OPENBOX_FERRETDB_BIN".to_string(),
            ferretdb.display().to_string(),
        ),
        (
            "OPENBOX_SDK_PYTHON".to_string(),
            sdk_python.display().to_string(),
        ),
        (
            "OPENBOX_SDK2_PYTHON".to_string(),
            sdk2_python.display().to_string(),
        ),
        (
            "OPENBOX_TEST_SUPPORT".to_string(),
            support.display().to_string(),
        ),
        (
            "OPENBOX_TEMPORAL_BIN".to_string(),
            temporal.display().to_string(),
        ),
        (
            "OPENBOX_HOOK_DIR".to_string(),
            hook_dir.display().to_string(),
        ),
        ("OPENBOX_HELM_BIN".to_string(), helm.display().to_string()),
        (
            "OPENBOX_JAEGER_BIN".to_string(),
            jaeger.display().to_string(),
        ),
        (
            "OPENBOX_K8S_VALIDATE_BIN".to_string(),
            k8s_validate.display().to_string(),
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

pub(crate) fn install_debian_packages(wanted: &[&str]) -> Result<()> {
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

/// The pinned Python lint tools (ruff, mypy and the Temporal SDK mypy checks the hook
/// against), one package a line; a change rebuilds their virtualenv.
const LINT_REQUIREMENTS_FILE: &str = "xtask/lint-requirements.txt";
const LINT_IMPORTS: &str = "import mypy.api, temporalio.worker";

/// The lint tools' virtualenv (target/test-env/lint-venv), built on first use and
/// reused while xtask/lint-requirements.txt is unchanged. Returns its `bin` directory.
pub fn lint_tools() -> Result<PathBuf> {
    let python3 = match find_python3()? {
        Some(p) if python_has_venv(&p) => p,
        _ => {
            install_debian_packages(&["python3", "python3-venv"])?;
            find_python3()?
                .filter(|p| python_has_venv(p))
                .ok_or_else(|| anyhow!("python3 with the venv module is missing: run `apt-get install -y python3 python3-venv`"))?
        }
    };
    let root = workspace_root();
    let venv = root.join("target/test-env/lint-venv");
    ensure_venv(
        &python3,
        &venv,
        &root.join(LINT_REQUIREMENTS_FILE),
        LINT_IMPORTS,
    )?;
    Ok(venv.join("bin"))
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

/// Modules each virtualenv must import once built.
const FIXTURE_IMPORTS: &str = "import httpx, psycopg2, asyncpg, pymysql, redis, pymongo, \
     requests, urllib3, aiohttp, temporalio.client, temporalio.worker, jsonschema, openai, \
     anthropic, brotli, temporalio.contrib.opentelemetry, opentelemetry.sdk.trace, hypercorn, h2, \
     grpc, grpclib";
const SDK2_IMPORTS: &str = "import openbox.plugin, openbox.client, openbox_core.identity, \
     temporalio.worker, httpx, cryptography";
const SDK_IMPORTS: &str =
    "import openbox.otel_setup, openbox.span_processor, opentelemetry.sdk.trace, \
     opentelemetry.instrumentation.httpx, opentelemetry.instrumentation.psycopg2, \
     opentelemetry.instrumentation.redis, psycopg2, httpx, redis";

fn ensure_venv(
    python3: &Path,
    venv: &Path,
    requirements_file: &Path,
    imports: &str,
) -> Result<PathBuf> {
    let requirements = fs::read_to_string(requirements_file).with_context(|| {
        format!(
            "could not read the pip requirements {}",
            requirements_file.display()
        )
    })?;
    let marker = venv.join("openbox-requirements.txt");
    let venv_python = venv.join("bin/python");
    let want = marker_contents(python3, &requirements)?;
    let have = fs::read_to_string(&marker).ok();
    if have.as_deref() == Some(want.as_str()) && venv_usable(&venv_python, imports) {
        return Ok(venv_python);
    }

    eprintln!("xtask: creating the virtualenv {}", venv.display());
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
            "{e}\ninstalling the Python packages failed (is PyPI reachable?); retry with `{} -m pip install -r {}`, then run this again",
            venv_python.display(),
            requirements_file.display()
        )
    })?;
    if !venv_usable(&venv_python, imports) {
        bail!("the virtualenv {} was built but `{imports}` fails in it; delete it and run `cargo xtask setup-env` again", venv.display());
    }
    // Written last: an interrupted install leaves no marker and is redone next time.
    fs::write(&marker, want).with_context(|| format!("could not write {}", marker.display()))?;
    Ok(venv_python)
}

fn venv_usable(venv_python: &Path, imports: &str) -> bool {
    Command::new(venv_python)
        .args(["-c", imports])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `go` on PATH, else the official tarball's place.
fn find_go() -> Option<PathBuf> {
    on_path("go").or_else(|| {
        let p = PathBuf::from("/usr/local/go/bin/go");
        p.is_file().then_some(p)
    })
}

fn ferretdb_runs(bin: &Path) -> bool {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .contains(&format!("version: {FERRETDB_VERSION}"))
        })
        .unwrap_or(false)
}

/// FerretDB v1 built from its module source into `~/.cache/openbox/go/bin`, reused when
/// present.
///
/// Not `go install …@version`, for two reasons: `go install` reads the module's version
/// list (for its deprecation check), which the module proxy this project reaches refuses
/// (403) for FerretDB; and FerretDB v1's `build/version` package panics at start-up
/// unless `build/version/version.txt` exists, a file only its own Taskfile generates. So:
/// `go mod download` the tagged module, copy it, write version.txt, `go build`.
fn ensure_ferretdb() -> Result<PathBuf> {
    let cache = go_cache()?;
    let bin = cache.join(format!("bin/ferretdb-{FERRETDB_VERSION}"));
    if ferretdb_runs(&bin) {
        return Ok(bin);
    }
    let go = find_go().ok_or_else(|| {
        anyhow!("Go is needed to build FerretDB {FERRETDB_VERSION} (the tests' MongoDB-protocol server) and is not installed: install Go 1.22 or newer (https://go.dev/dl/ tarball into /usr/local/go), then run this again")
    })?;
    eprintln!(
        "xtask: building FerretDB {FERRETDB_VERSION} into {} (once; takes a few minutes)",
        bin.display()
    );
    let out = Command::new(&go)
        .args(["mod", "download", "-json"])
        .arg(format!("{FERRETDB_MODULE}@{FERRETDB_VERSION}"))
        .env("GOFLAGS", "-mod=mod")
        .current_dir(std::env::temp_dir())
        .output()
        .with_context(|| format!("could not run {}", go.display()))?;
    if !out.status.success() {
        bail!(
            "`go mod download {FERRETDB_MODULE}@{FERRETDB_VERSION}` failed (is the Go module proxy reachable?): {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let info = String::from_utf8_lossy(&out.stdout);
    // `"Dir": "/root/go/pkg/mod/github.com/!ferret!d!b/!ferret!d!b@v1.24.0",`
    let module_dir = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"Dir\":"))
        .map(|v| v.trim().trim_end_matches(',').trim_matches('"').to_string())
        .filter(|d| Path::new(d).is_dir())
        .ok_or_else(|| anyhow!("`go mod download -json` gave no usable Dir: {info}"))?;
    let src = cache.join(format!("src/ferretdb-{FERRETDB_VERSION}"));
    if src.exists() {
        fs::remove_dir_all(&src).with_context(|| format!("removing {}", src.display()))?;
    }
    fs::create_dir_all(src.parent().expect("has a parent"))?;
    run(Command::new("cp").arg("-r").arg(&module_dir).arg(&src))?;
    // The module cache is read-only; the copy must be writable for version.txt.
    run(Command::new("chmod").args(["-R", "u+w"]).arg(&src))?;
    fs::write(
        src.join("build/version/version.txt"),
        format!("{FERRETDB_VERSION}\n"),
    )?;
    let tmp = bin.with_extension("tmp");
    fs::create_dir_all(bin.parent().expect("has a parent"))?;
    run(Command::new(&go)
        .args(["build", "-trimpath", "-o"])
        .arg(&tmp)
        .arg("./cmd/ferretdb")
        .current_dir(&src))
    .map_err(|e| {
        anyhow!(
            "{e}\nbuilding FerretDB failed; the source is in {}",
            src.display()
        )
    })?;
    fs::rename(&tmp, &bin)?;
    let _ = fs::remove_dir_all(&src);
    if !ferretdb_runs(&bin) {
        bail!(
            "{} was built but `--version` does not report {FERRETDB_VERSION}",
            bin.display()
        );
    }
    Ok(bin)
}

/// `~/.cache/openbox/go`: where the Go-built test servers live (`bin/`) and are built.
fn go_cache() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from).ok_or_else(|| {
        anyhow!("HOME is not set: cannot place the Go build cache (~/.cache/openbox/go)")
    })?;
    Ok(home.join(".cache/openbox/go"))
}

/// The Temporal CLI in `~/.cache/openbox/go/bin/temporal`, built once with `go install`
/// and reused when present.
///
/// Unlike FerretDB, `go install PACKAGE@VERSION` works for the CLI here (its module needs
/// no generated file), as long as the version is explicit. The binary reports
/// `0.0.0-DEV` as its own version (the release's ldflags are not applied), so which
/// module version it was built from is read from its build information instead.
fn ensure_temporal() -> Result<PathBuf> {
    let cache = go_cache()?;
    let gobin = cache.join("bin");
    let bin = gobin.join("temporal");
    if temporal_runs(&bin) {
        return Ok(bin);
    }
    let go = find_go().ok_or_else(|| {
        anyhow!("Go is needed to build the Temporal CLI {TEMPORAL_VERSION} (the end-to-end tests' Temporal dev server) and is not installed: install Go 1.22 or newer (https://go.dev/dl/ tarball into /usr/local/go), then run this again")
    })?;
    eprintln!(
        "xtask: building the Temporal CLI {TEMPORAL_VERSION} into {} (once; takes about 4 minutes)",
        bin.display()
    );
    fs::create_dir_all(&gobin).with_context(|| format!("creating {}", gobin.display()))?;
    run(Command::new(&go)
        .arg("install")
        .arg(format!("{TEMPORAL_PACKAGE}@{TEMPORAL_VERSION}"))
        .env("GOBIN", &gobin)
        // Outside any module, so the go.mod of whatever directory we run in is ignored.
        .current_dir(std::env::temp_dir()))
    .map_err(|e| {
        anyhow!(
            "{e}\nbuilding the Temporal CLI failed (is the Go module proxy reachable?); retry with `GOBIN={} {} install {TEMPORAL_PACKAGE}@{TEMPORAL_VERSION}`",
            gobin.display(),
            go.display()
        )
    })?;
    if !temporal_runs(&bin) {
        bail!(
            "{} was built but does not run (`temporal --version`) or is not {TEMPORAL_MODULE} {TEMPORAL_VERSION}",
            bin.display()
        );
    }
    Ok(bin)
}

/// `bin --version` works, and, when Go is there to read the build information, the
/// binary was built from the pinned module version.
fn temporal_runs(bin: &Path) -> bool {
    let runs = Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).starts_with("temporal version")
        })
        .unwrap_or(false);
    if !runs {
        return false;
    }
    built_from(bin, TEMPORAL_MODULE, TEMPORAL_VERSION)
}

/// The Go binary was built from `module` at `version`, as its build information says;
/// true when Go is not there to read it.
fn built_from(bin: &Path, module: &str, version: &str) -> bool {
    let Some(go) = find_go() else {
        return true;
    };
    // `go version -m BIN` lists `\tmod\tgithub.com/temporalio/cli\tv1.1.2\th1:…`.
    Command::new(go)
        .args(["version", "-m"])
        .arg(bin)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() >= 3 && f[0] == "mod" && f[1] == module && f[2] == version
            })
        })
        .unwrap_or(false)
}

/// `go` with its module downloads kept in `~/.cache/openbox/go/mod` (writable, so the
/// cache can be deleted like any other directory).
fn go_command(go: &Path) -> Result<Command> {
    let mut cmd = Command::new(go);
    cmd.env("GOMODCACHE", go_cache()?.join("mod"))
        .env("GOFLAGS", "-modcacherw");
    Ok(cmd)
}

/// Helm in `~/.cache/openbox/go/bin/helm`, built once with `go install` and reused while
/// it is the pinned version.
fn ensure_helm() -> Result<PathBuf> {
    let gobin = go_cache()?.join("bin");
    let bin = gobin.join("helm");
    // A `go install`ed Helm reports only its minor version (`v3.22`), the release's
    // ldflags not being applied: the exact version is read from its build information.
    let runs = || {
        Command::new(&bin)
            .args(["version", "--short"])
            .output()
            .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).starts_with("v3."))
            .unwrap_or(false)
    };
    if runs() && built_from(&bin, HELM_MODULE, HELM_VERSION) {
        return Ok(bin);
    }
    let go = find_go().ok_or_else(|| {
        anyhow!("Go is needed to build Helm {HELM_VERSION} (the chart's lint and render tests) and is not installed: install Go 1.26 or newer (https://go.dev/dl/ tarball into /usr/local/go), then run this again")
    })?;
    eprintln!(
        "xtask: building Helm {HELM_VERSION} into {} (once; takes several minutes)",
        bin.display()
    );
    fs::create_dir_all(&gobin).with_context(|| format!("creating {}", gobin.display()))?;
    run(go_command(&go)?
        .arg("install")
        .arg(format!("{HELM_PACKAGE}@{HELM_VERSION}"))
        .env("GOBIN", &gobin)
        // Outside any module, so the go.mod of whatever directory we run in is ignored.
        .current_dir(std::env::temp_dir()))
    .map_err(|e| {
        anyhow!(
            "{e}\nbuilding Helm failed (is the Go module proxy reachable?); retry with `GOBIN={} {} install {HELM_PACKAGE}@{HELM_VERSION}`",
            gobin.display(),
            go.display()
        )
    })?;
    if !(runs() && built_from(&bin, HELM_MODULE, HELM_VERSION)) {
        bail!(
            "{} was built but does not run (`helm version --short`) or is not {HELM_MODULE} {HELM_VERSION}",
            bin.display()
        );
    }
    Ok(bin)
}

/// Jaeger in `~/.cache/openbox/go/bin/jaeger`, built once (a module of our own in
/// `~/.cache/openbox/go/src/jaeger-<version>` requires it as a tool) and reused while it
/// is the pinned version.
fn ensure_jaeger() -> Result<PathBuf> {
    let cache = go_cache()?;
    let bin = cache.join("bin/jaeger");
    let runs = || {
        Command::new(&bin)
            .arg("--help")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if runs() && built_from(&bin, JAEGER_MODULE, JAEGER_VERSION) {
        return Ok(bin);
    }
    let go = find_go().ok_or_else(|| {
        anyhow!("Go is needed to build Jaeger {JAEGER_VERSION} (the OTLP export test's backend) and is not installed: install Go 1.26 or newer (https://go.dev/dl/ tarball into /usr/local/go), then run this again")
    })?;
    let module = cache.join(format!("src/jaeger-{JAEGER_VERSION}"));
    fs::create_dir_all(&module).with_context(|| format!("creating {}", module.display()))?;
    fs::create_dir_all(cache.join("bin"))?;
    eprintln!(
        "xtask: building Jaeger {JAEGER_VERSION} into {} (once; takes several minutes)",
        bin.display()
    );
    if !module.join("go.mod").is_file() {
        run(go_command(&go)?
            .args(["mod", "init", "openbox-test-tools/jaeger"])
            .current_dir(&module))?;
    }
    let retry = format!(
        "retry with `cd {} && go get -tool {JAEGER_PACKAGE}@{JAEGER_VERSION} && go build -o {} {JAEGER_PACKAGE}`",
        module.display(),
        bin.display()
    );
    run(go_command(&go)?
        .args(["get", "-tool"])
        .arg(format!("{JAEGER_PACKAGE}@{JAEGER_VERSION}"))
        .current_dir(&module))
    .map_err(|e| {
        anyhow!("{e}\nfetching Jaeger failed (is the Go module proxy reachable?); {retry}")
    })?;
    run(go_command(&go)?
        .arg("build")
        .arg("-o")
        .arg(&bin)
        .arg(JAEGER_PACKAGE)
        .current_dir(&module))
    .map_err(|e| anyhow!("{e}\nbuilding Jaeger failed; {retry}"))?;
    if !(runs() && built_from(&bin, JAEGER_MODULE, JAEGER_VERSION)) {
        bail!(
            "{} was built but does not run (`jaeger --help`) or is not {JAEGER_MODULE} {JAEGER_VERSION}",
            bin.display()
        );
    }
    Ok(bin)
}

/// `gofmt` and `go vet` on the manifest checker: gofmt lists no file to reformat and vet
/// finds nothing.
pub fn lint_k8s_validate() -> Result<()> {
    let src = workspace_root().join(K8S_VALIDATE_DIR);
    let go = find_go().ok_or_else(|| {
        anyhow!("Go is needed to check the Kubernetes manifest checker ({K8S_VALIDATE_DIR}) and is not installed: install Go 1.26 or newer (https://go.dev/dl/ tarball into /usr/local/go), then run this again")
    })?;
    let gofmt = go.with_file_name("gofmt");
    let out = Command::new(&gofmt)
        .arg("-l")
        .arg(".")
        .current_dir(&src)
        .output()
        .with_context(|| format!("could not run {}", gofmt.display()))?;
    let unformatted = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !unformatted.trim().is_empty() {
        bail!(
            "gofmt: not formatted in {}: {}{}",
            src.display(),
            unformatted.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    run(go_command(&go)?
        .env("GOFLAGS", "-modcacherw -mod=readonly")
        .args(["vet", "."])
        .current_dir(&src))
}

/// The manifest checker (tests/k8s-validate) built into target/test-env. `go build`
/// runs every time: Go's build cache makes an unchanged checker a no-op, and a changed
/// one is never stale. Its dependencies are pinned by its go.sum (`-mod=readonly`).
fn build_k8s_validate() -> Result<PathBuf> {
    let root = workspace_root();
    let src = root.join(K8S_VALIDATE_DIR);
    let bin = root.join("target/test-env/k8s-validate");
    let go = find_go().ok_or_else(|| {
        anyhow!("Go is needed to build the Kubernetes manifest checker ({K8S_VALIDATE_DIR}) and is not installed: install Go 1.26 or newer (https://go.dev/dl/ tarball into /usr/local/go), then run this again")
    })?;
    fs::create_dir_all(bin.parent().expect("has a parent"))?;
    run(go_command(&go)?
        .env("GOFLAGS", "-modcacherw -mod=readonly")
        .args(["build", "-trimpath", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(&src))
    .map_err(|e| {
        anyhow!(
            "{e}\nbuilding the manifest checker in {} failed (its modules come from the Go module proxy the first time)",
            src.display()
        )
    })?;
    Ok(bin)
}

/// Names under hooks/python that are build output or caches, not the package's sources:
/// neither hashed nor copied.
fn is_build_output(name: &str) -> bool {
    matches!(
        name,
        "__pycache__"
            | "build"
            | "dist"
            | ".git"
            | ".pytest_cache"
            | ".mypy_cache"
            | ".ruff_cache"
            | ".venv"
    ) || name.ends_with(".egg-info")
        || name.ends_with(".pyc")
        || name.ends_with(".pyo")
}

/// The package's source files (relative paths, sorted), build output left out.
pub(crate) fn hook_sources(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(top: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let here = top.join(rel);
        for entry in fs::read_dir(&here).with_context(|| format!("reading {}", here.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if is_build_output(&name) {
                continue;
            }
            let path = rel.join(&name);
            let meta = fs::metadata(top.join(&path))
                .with_context(|| format!("reading {}", top.join(&path).display()))?;
            if meta.is_dir() {
                walk(top, &path, out)?;
            } else if meta.is_file() {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, Path::new(""), &mut out)?;
    out.sort();
    Ok(out)
}

/// FNV-1a over every source file's relative path and contents: stable across Rust
/// releases (unlike `DefaultHasher`), which is all a stamp needs.
pub(crate) fn hook_stamp(dir: &Path, files: &[PathBuf]) -> Result<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for f in files {
        let data =
            fs::read(dir.join(f)).with_context(|| format!("reading {}", dir.join(f).display()))?;
        feed(f.to_string_lossy().as_bytes());
        feed(&[0]);
        feed(&(data.len() as u64).to_le_bytes());
        feed(&data);
    }
    Ok(format!("{h:016x} {} files\n", files.len()))
}

/// Installs the worker hook (hooks/python) into the fixtures' virtualenv with
/// `pip install --no-deps --force-reinstall`, not editable, so the tests use the package
/// as a user would get it. Redone whenever a source file under hooks/python changes (a
/// stamp of their hash in the virtualenv). pip builds from a copy under target/, so no
/// build output (`build/`, `*.egg-info`) lands in the source tree.
///
/// While hooks/python holds no package yet (no pyproject.toml or setup.py), this says so
/// and goes on: everything but the end-to-end tests works without the hook.
fn install_hook(venv_python: &Path, venv: &Path, hook_dir: &Path) -> Result<()> {
    let has_package =
        hook_dir.join("pyproject.toml").is_file() || hook_dir.join("setup.py").is_file();
    if !has_package {
        eprintln!(
            "xtask: {} holds no Python package yet (no pyproject.toml or setup.py): the worker hook is not installed, so the end-to-end tests (tests/e2e) will fail until it exists; run `cargo xtask setup-env` again then",
            hook_dir.display()
        );
        return Ok(());
    }
    let files = hook_sources(hook_dir)?;
    let stamp_file = venv.join("openbox-hook.stamp");
    let want = hook_stamp(hook_dir, &files)?;
    let importable = || {
        // From /, so the import cannot come from a source checkout in the cwd.
        Command::new(venv_python)
            .args(["-c", HOOK_IMPORT])
            .current_dir("/")
            .output()
    };
    if fs::read_to_string(&stamp_file).ok().as_deref() == Some(want.as_str())
        && importable().map(|o| o.status.success()).unwrap_or(false)
    {
        return Ok(());
    }
    eprintln!(
        "xtask: installing the worker hook from {} into {}",
        hook_dir.display(),
        venv.display()
    );
    let _ = fs::remove_file(&stamp_file);
    let build = venv
        .parent()
        .expect("venv has a parent")
        .join("hook-build/python");
    if build.exists() {
        fs::remove_dir_all(&build).with_context(|| format!("removing {}", build.display()))?;
    }
    for f in &files {
        let to = build.join(f);
        fs::create_dir_all(to.parent().expect("a file has a parent"))?;
        fs::copy(hook_dir.join(f), &to).with_context(|| {
            format!("copying {} to {}", hook_dir.join(f).display(), to.display())
        })?;
    }
    run(Command::new(venv_python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
            "--no-deps",
            "--force-reinstall",
        ])
        .arg(&build))
    .map_err(|e| {
        anyhow!(
            "{e}\nthe worker hook in {} is not pip-installable (or its build backend could not be fetched from PyPI); retry with `{} -m pip install --no-deps --force-reinstall {}`",
            hook_dir.display(),
            venv_python.display(),
            hook_dir.display()
        )
    })?;
    let _ = fs::remove_dir_all(build.parent().expect("has a parent"));
    let check = importable().with_context(|| format!("could not run {}", venv_python.display()))?;
    if !check.status.success() {
        bail!(
            "the worker hook from {} was installed but `{HOOK_IMPORT}` fails in {}: {}",
            hook_dir.display(),
            venv.display(),
            String::from_utf8_lossy(&check.stderr).trim()
        );
    }
    // Written last: an interrupted install leaves no stamp and is redone next time.
    fs::write(&stamp_file, want)
        .with_context(|| format!("could not write {}", stamp_file.display()))?;
    Ok(())
}
