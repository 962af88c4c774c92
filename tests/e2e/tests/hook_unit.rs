//! The worker hook's own tests (hooks/python/tests), run by pytest with the test
//! environment's interpreter so `cargo xtask test` covers them too (its configuration is
//! in hooks/python/pyproject.toml).

use std::process::Command;

use openbox_testkit::{workspace_root, FIX};

#[test]
fn the_worker_hooks_python_unit_tests_pass() {
    let python = std::env::var("OPENBOX_TEST_PYTHON")
        .unwrap_or_else(|_| panic!("OPENBOX_TEST_PYTHON is not set: {FIX}"));
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(workspace_root().join("hooks/python"))
        .output()
        .unwrap_or_else(|e| panic!("running {python} -m pytest: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the hook's tests failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    eprintln!(
        "{}",
        stdout.lines().rev().take(3).collect::<Vec<_>>().join("\n")
    );
}
