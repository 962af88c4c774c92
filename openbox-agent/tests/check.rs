//! `openbox-agent check` without privileges, and every command's output into a pipe whose
//! reader is gone (issue 10): "permission denied" is reported as such, and nothing panics.
//!
//! Run with `cargo xtask test -p openbox-agent --test check`.

mod common;

use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

/// The unprivileged user the checks run as.
const NOBODY: &str = "65534";

#[test]
fn check_without_privileges_reports_permission_denied_not_a_missing_tracefs() {
    let env = TestEnv::get();
    let out = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .arg(&env.agent)
        .args(["check", "--json"])
        .stdin(Stdio::null())
        .output()
        .expect("setpriv runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "not ready without privileges; stderr: {stderr}"
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("check --json prints JSON");
    let item = |name: &str| {
        report["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .unwrap_or_else(|| panic!("no {name} item in {report:#}"))
            .clone()
    };
    let tracefs = item("tracefs");
    let detail = tracefs["detail"].as_str().unwrap();
    assert!(detail.contains("permission denied"), "tracefs: {tracefs}");
    assert!(!detail.contains("not mounted"), "tracefs: {tracefs}");
    let syscalls = item("syscall tracepoints");
    assert!(
        syscalls["detail"]
            .as_str()
            .unwrap()
            .contains("permission denied"),
        "syscall tracepoints: {syscalls}"
    );
    // bpffs is mounted by the agents run before; its records are root's.
    if std::path::Path::new("/sys/fs/bpf/openbox").exists() {
        let left = item("left stopped");
        assert!(
            left["detail"]
                .as_str()
                .unwrap()
                .contains("permission denied"),
            "left stopped: {left}"
        );
    }
    let kill = item("CAP_KILL");
    assert_eq!(kill["ok"], false, "{kill}");
    assert!(kill["fix"].as_str().unwrap().contains("cap_kill"), "{kill}");
    assert!(item("CAP_BPF")["fix"]
        .as_str()
        .unwrap()
        .contains("cap_kill"));
}

/// Runs the agent with stdout a pipe whose reading end is already closed; returns its
/// exit code and stderr.
fn into_closed_pipe(env: &TestEnv, args: &[&str]) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(&env.agent)
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("agent runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_into_a_closed_pipe_ends_quietly() {
    let env = TestEnv::get();
    for args in [&["check", "--json"][..], &["check"]] {
        let (code, stderr) = into_closed_pipe(&env, args);
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(
            matches!(code, Some(0 | 1)),
            "{args:?} exited with {code:?}, not its readiness: {stderr}"
        );
    }
}

#[test]
fn trace_json_into_a_closed_pipe_does_not_panic() {
    let env = TestEnv::get();
    let python = env.python.display().to_string();
    let (code, stderr) = into_closed_pipe(
        &env,
        &[
            "trace",
            "--json",
            "--",
            &python,
            "-c",
            "open('/etc/hostname').read()",
        ],
    );
    assert!(!stderr.contains("panicked"), "trace panicked: {stderr}");
    assert_eq!(code, Some(0), "trace exits as its command did: {stderr}");
}
