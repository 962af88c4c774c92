//! What `cargo xtask test` provides, and where each test's process output goes.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use openbox_testkit::{env_path, workspace_root, FIX};

/// What `cargo xtask test` provides (xtask/src/env.rs).
#[derive(Clone, Debug)]
pub struct Env {
    /// The fixtures' virtualenv python (temporalio, httpx, asyncpg, psycopg2, requests,
    /// and the hook installed from hooks/python).
    pub python: PathBuf,
    /// openbox-agent/tests/support: tls_server.py, pg_server.py.
    pub fixtures: PathBuf,
    /// tests/e2e/support: worker.py, client.py, forge.py.
    pub scripts: PathBuf,
    pub pg_bin: PathBuf,
    pub agent: PathBuf,
    pub temporal: PathBuf,
    pub hook_dir: PathBuf,
}

impl Env {
    /// The environment; fails the test (never skips it) when anything is missing.
    pub fn get() -> Env {
        let env = Env {
            python: env_path("OPENBOX_TEST_PYTHON"),
            fixtures: env_path("OPENBOX_TEST_SUPPORT"),
            scripts: Path::new(env!("CARGO_MANIFEST_DIR")).join("support"),
            pg_bin: env_path("OPENBOX_PG_BIN"),
            agent: env_path("OPENBOX_AGENT_BIN"),
            temporal: env_path("OPENBOX_TEMPORAL_BIN"),
            hook_dir: env_path("OPENBOX_HOOK_DIR"),
        };
        static HOOK_CHECKED: OnceLock<()> = OnceLock::new();
        HOOK_CHECKED.get_or_init(|| env.check_hook());
        env
    }

    /// The hook must be installed in the virtualenv (setup-env does it from hooks/python).
    fn check_hook(&self) {
        let out = Command::new(&self.python)
            .args([
                "-c",
                "import openbox_hook; from openbox_hook import OpenBoxHook; print(openbox_hook.__file__)",
            ])
            .current_dir("/")
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.python.display()));
        assert!(
            out.status.success(),
            "the worker hook is not importable in {} ({}): {} must hold the hook package and `cargo xtask setup-env` installs it; {FIX}",
            self.python.display(),
            String::from_utf8_lossy(&out.stderr).trim(),
            self.hook_dir.display()
        );
    }

    pub fn fixture(&self, name: &str) -> PathBuf {
        self.fixtures.join(name)
    }

    pub fn script(&self, name: &str) -> PathBuf {
        self.scripts.join(name)
    }

    /// `<venv python> -u <script>` with the environment every Python process here gets.
    pub(crate) fn python(&self, script: &Path) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg("-u").arg(script);
        python_env(&mut cmd);
        cmd
    }
}

/// The environment every Python process here gets: unbuffered output (the harness reads
/// it while the process runs) and no bytecode files in the source tree.
pub(crate) fn python_env(cmd: &mut Command) {
    cmd.env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
}

/// `target/e2e-runs/<name>/`, emptied at the start: every process's output of one
/// test, kept after the test for its reader.
pub fn logs_dir(name: &str) -> PathBuf {
    let dir = workspace_root().join("target/e2e-runs").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}
