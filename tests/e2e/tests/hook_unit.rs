//! The worker hook's own unit tests (hooks/python/tests, Python unittest), run with the
//! test environment's interpreter so `cargo xtask test` covers them too.

use std::process::Command;

#[test]
fn the_worker_hooks_python_unit_tests_pass() {
    let python = std::env::var("OPENBOX_TEST_PYTHON")
        .expect("OPENBOX_TEST_PYTHON is not set: run `cargo xtask test`");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(python)
        .args(["-m", "unittest", "discover", "-s", "hooks/python/tests"])
        .current_dir(&root)
        .output()
        .expect("running the hook's unit tests");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "hook unit tests failed:\n{err}");
    eprintln!("{}", err.lines().rev().take(3).collect::<Vec<_>>().join("\n"));
}
