//! Pausing a process that loads a libssl needs CAP_KILL to resume it (issue 10): without
//! it the agent does not pause, says what that costs, and never leaves a process stopped.
//!
//! Run with `cargo xtask test -p openbox-agent --test pause`.

mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use common::*;

#[test]
fn without_cap_kill_the_agent_does_not_pause_and_the_command_runs_to_its_end() {
    let env = TestEnv::get();
    // The traced program loads libssl after watching began (the case the pause exists
    // for) and prints once it has.
    let program =
        "import ssl, sys; print('loaded', ssl.OPENSSL_VERSION_NUMBER > 0); sys.stdout.flush()";
    let mut cmd = Command::new("capsh");
    cmd.arg("--drop=cap_kill")
        .arg("--")
        .arg("-c")
        .arg(format!(
            "exec {} trace -- {} -c \"{program}\"",
            env.agent.display(),
            env.python.display()
        ))
        .env("OPENBOX_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (status, stdout, stderr) = run_bounded(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&stdout);
    assert!(status.success(), "trace failed: {status}; stderr: {stderr}");
    assert!(stdout.contains("loaded True"), "stdout: {stdout}");
    assert!(
        stderr.contains("CAP_KILL is missing"),
        "the missing privilege and its cost are not said; stderr: {stderr}"
    );
    assert!(!stderr.contains("could not resume"), "stderr: {stderr}");
}

#[test]
fn with_cap_kill_nothing_is_said_about_pausing_and_the_command_runs() {
    let env = TestEnv::get();
    let program =
        "import ssl, sys; print('loaded', ssl.OPENSSL_VERSION_NUMBER > 0); sys.stdout.flush()";
    let mut cmd = Command::new(&env.agent);
    cmd.args(["trace", "--raw", "--"])
        .arg(&env.python)
        .args(["-c", program])
        .env("OPENBOX_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (status, stdout, stderr) = run_bounded(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&stdout);
    assert!(status.success(), "trace failed: {status}; stderr: {stderr}");
    assert!(stdout.contains("loaded True"), "stdout: {stdout}");
    assert!(!stderr.contains("CAP_KILL is missing"), "stderr: {stderr}");
    assert!(!stderr.contains("could not resume"), "stderr: {stderr}");
}
