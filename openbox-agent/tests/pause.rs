//! No process is left stopped by the agent (issue 10). Pausing a process that loads a
//! libssl needs CAP_KILL to resume it: without it the agent does not pause and says what
//! that costs. With it, a paused process runs on whatever becomes of the attach, when the
//! agent is stopped, and, when the agent is killed, at the agent's next start.
//!
//! Run with `cargo xtask test -p openbox-agent --test pause`.

mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use openbox_testkit::Proc;

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

// ---- no process is left stopped: attach failure, the agent's exit, its crash ----

/// Loads libssl (`import ssl`) once told to on stdin, then exits 7. Started by the test,
/// not by the agent, so the test sees its exit code whatever became of the agent.
const LOADS_LIBSSL_WHEN_TOLD: &str = "import sys; sys.stdin.readline(); import ssl; sys.exit(7)";

/// A process of the test's own; killed (also when stopped) if the test fails first.
struct Watched {
    child: std::process::Child,
}

impl Watched {
    fn start(env: &TestEnv) -> Watched {
        let child = Command::new(&env.python)
            .args(["-c", LOADS_LIBSSL_WHEN_TOLD])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the watched python");
        Watched { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets it load libssl.
    fn go(&mut self) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        stdin
            .write_all(b"go\n")
            .expect("telling the watched python to go");
        stdin.flush().unwrap();
    }

    /// Its state letter in /proc/PID/stat (`T`: stopped).
    fn state(&self) -> char {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        stat.rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .unwrap_or('?')
    }

    fn wait_stopped(&self, agent: &mut Proc) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.state() != 'T' {
            assert!(
                agent.exited().is_none(),
                "the agent exited before the process was paused; its stderr: {}",
                agent.stderr_tail()
            );
            assert!(
                std::time::Instant::now() < deadline,
                "process {} was not paused when it loaded libssl (state {}); agent stderr: {}",
                self.pid(),
                self.state(),
                agent.stderr_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its exit code, waiting up to a minute: `None` when it did not exit (still stopped).
    fn exit_code(&mut self) -> Option<i32> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .expect("waiting for the watched python")
            {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `trace --pid` on the watched process, holding paused processes (the test-only
/// OPENBOX_TEST_HOLD_PAUSED): the window between the kernel's stop and the agent's
/// resume, made as long as the test needs. Returns once the agent watches it.
fn holding_agent(env: &TestEnv, logs: &TempDir, name: &str, pid: u32) -> Proc {
    let mut cmd = Command::new(&env.agent);
    cmd.args(["trace", "--raw", "--json", "--pid", &pid.to_string()])
        .env("OPENBOX_LOG", "info")
        .env("OPENBOX_TEST_HOLD_PAUSED", "1");
    let mut agent = Proc::spawn(name, cmd, logs.path());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !agent.stderr_text().contains("watching process") {
        assert!(
            agent.exited().is_none() && std::time::Instant::now() < deadline,
            "the agent did not start watching process {pid}; its stderr: {}",
            agent.stderr_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agent
}

/// The pins in bpffs of the agent with this pid.
fn pins_of(agent: u32) -> Vec<String> {
    std::fs::read_dir("/sys/fs/bpf/openbox")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(&format!("paused-{agent}-")))
                .collect()
        })
        .unwrap_or_default()
}

fn summary_of(stdout: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    let last = text.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("the last stdout line is not JSON ({e}): {last}"));
    assert_eq!(v["type"], "summary", "{last}");
    v
}

#[test]
fn a_process_paused_for_a_libssl_that_cannot_be_probed_runs_on() {
    let env = TestEnv::get();
    let dir = TempDir::new("pause-attach");
    // Named like libssl, so the kernel pauses the process when it opens it; not an ELF
    // object, so the uprobe attach fails.
    let fake = dir.join("libssl-not-a-library.so.3");
    std::fs::write(&fake, b"not a library\n").unwrap();
    let program = format!(
        "import sys; open({:?}).read(); sys.exit(7)",
        fake.display().to_string()
    );
    let mut cmd = Command::new(&env.agent);
    cmd.args(["trace", "--raw", "--json", "--"])
        .arg(&env.python)
        .args(["-c", &program])
        .env("OPENBOX_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (status, stdout, stderr) = run_bounded(&mut cmd, Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(7),
        "the traced command did not run to its end; stderr: {stderr}"
    );
    assert!(
        stderr.contains("not an ELF object") && stderr.contains("libssl-not-a-library"),
        "the failed attach is not reported; stderr: {stderr}"
    );
    let summary = summary_of(&stdout);
    assert!(
        summary["paused"].as_u64() >= Some(1),
        "the process was not paused: {summary}"
    );
    assert_eq!(summary["resumed"], summary["paused"], "{summary}");
    assert_eq!(summary["resume_failures"], 0, "{summary}");
}

#[test]
fn a_process_paused_when_the_agent_is_stopped_runs_on() {
    let env = TestEnv::get();
    let logs = TempDir::new("pause-exit");
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGHUP, "SIGHUP")] {
        let mut watched = Watched::start(&env);
        let mut agent = holding_agent(&env, &logs, &format!("agent-{name}"), watched.pid());
        watched.go();
        watched.wait_stopped(&mut agent);
        let (_, in_time) = agent.stop_leader(sig, Duration::from_secs(30));
        assert!(
            in_time,
            "the agent did not exit on {name}: {}",
            agent.stderr_tail()
        );
        assert_eq!(
            watched.exit_code(),
            Some(7),
            "after {name} the process the agent paused stays {}; agent stderr: {}",
            watched.state(),
            agent.stderr_tail()
        );
        assert!(
            pins_of(agent.pid()).is_empty(),
            "the agent left its pin behind"
        );
    }
}

/// The agent is SIGKILLed while a process is stopped: the next start of `trace`
/// resumes it; of `run` too.
#[test]
fn a_process_paused_when_the_agent_is_killed_runs_again_at_the_next_start() {
    let env = TestEnv::get();
    let logs = TempDir::new("pause-crash");
    for next in ["trace", "run"] {
        let mut watched = Watched::start(&env);
        let pid = watched.pid();
        let mut agent = holding_agent(&env, &logs, &format!("crashing-before-{next}"), pid);
        watched.go();
        watched.wait_stopped(&mut agent);
        agent.stop(libc::SIGKILL, Duration::from_secs(10));
        assert_eq!(
            watched.state(),
            'T',
            "the process was not left stopped by the crash"
        );
        assert_eq!(
            pins_of(agent.pid()).len(),
            1,
            "the crashed agent's record of paused processes is not in bpffs"
        );
        // `check` names it.
        let out = Command::new(&env.agent)
            .args(["check", "--json"])
            .stdin(Stdio::null())
            .output()
            .expect("check runs");
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("check --json prints JSON");
        let left = report["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == "left stopped")
            .unwrap_or_else(|| panic!("no `left stopped` item in {report:#}"));
        assert_eq!(left["ok"], false, "{left}");
        assert!(
            left["detail"].as_str().unwrap().contains(&pid.to_string()),
            "{left}"
        );

        let (summary, stderr) = match next {
            "trace" => {
                let mut cmd = Command::new(&env.agent);
                cmd.args(["trace", "--raw", "--json", "--", "true"])
                    .env("OPENBOX_LOG", "warn")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let (status, stdout, stderr) = run_bounded(&mut cmd, Duration::from_secs(60));
                assert!(status.success(), "trace failed: {status}; stderr: {stderr}");
                (summary_of(&stdout), stderr)
            }
            _ => {
                let mut cmd = Command::new(&env.agent);
                cmd.arg("run")
                    .arg("--socket")
                    .arg(logs.join("agent.sock"))
                    .args(["--events", "off"])
                    .env("OPENBOX_LOG", "warn");
                let mut run = Proc::spawn("run-after-crash", cmd, logs.path());
                assert_eq!(
                    watched.exit_code(),
                    Some(7),
                    "`run` did not resume process {pid}; its stderr: {}",
                    run.stderr_tail()
                );
                // Its summary needs its signal handlers, installed once it listens.
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while !run.stderr_text().contains("listening for worker hooks") {
                    assert!(
                        run.exited().is_none() && std::time::Instant::now() < deadline,
                        "`run` did not start; its stderr: {}",
                        run.stderr_tail()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                run.stop_leader(libc::SIGTERM, Duration::from_secs(30));
                let stderr = run.stderr_text();
                let summary = stderr
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .find(|v| v["type"] == "summary")
                    .unwrap_or_else(|| panic!("no summary from `run`; stderr: {stderr}"));
                (summary, stderr)
            }
        };
        assert_eq!(
            watched.exit_code(),
            Some(7),
            "`{next}` did not resume process {pid} (state {}); its stderr: {stderr}",
            watched.state()
        );
        assert!(
            stderr.contains(&format!("resumed process {pid}")),
            "`{next}` did not say it resumed process {pid}; stderr: {stderr}"
        );
        assert_eq!(summary["resumed_at_start"], 1, "{summary}");
        assert!(
            pins_of(agent.pid()).is_empty(),
            "the crashed agent's pin is still there"
        );
    }
}
