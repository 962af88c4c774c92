//! `openbox-agent run` against a hand-written stand-in for the worker hook
//! (support/fake_hook.py): registration checks, attribution of concurrent threads and
//! of subprocesses, and clean-up when a worker dies. The real hook with a real
//! Temporal server is tested end to end in tests/e2e.

mod common;

use std::{
    fs,
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// The daemon, with its events, unattributed spans and stderr in files.
struct Daemon {
    child: Option<Child>,
    dir: TempDir,
    socket: PathBuf,
}

impl Daemon {
    fn start(env: &TestEnv) -> Daemon {
        let dir = TempDir::new("daemon");
        let socket = dir.join("agent.sock");
        let stderr = fs::File::create(dir.join("agent.err")).unwrap();
        let child = Command::new(&env.agent)
            .arg("run")
            .arg("--socket")
            .arg(&socket)
            .arg("--events")
            .arg(dir.join("events.jsonl"))
            .arg("--unattributed")
            .arg(dir.join("unattributed.jsonl"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting openbox-agent run");
        let d = Daemon {
            child: Some(child),
            dir,
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&d.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the agent did not listen on {} within 30 s; its stderr:\n{}",
                d.socket.display(),
                d.stderr()
            );
            thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.dir.join("agent.err")).unwrap_or_default()
    }

    fn lines(&self, name: &str) -> Vec<Value> {
        fs::read_to_string(self.dir.join(name))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: {e}: {l}")))
            .collect()
    }

    /// SIGTERM, wait, and return the summary it printed last on stderr.
    fn stop(&mut self) -> Value {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "the agent exited with {status}: {}",
            self.stderr()
        );
        let err = self.stderr();
        let last = err.lines().last().unwrap_or_default();
        serde_json::from_str(last)
            .unwrap_or_else(|_| panic!("no summary at the end of stderr:\n{err}"))
    }

    fn hook(&self, env: &TestEnv, args: &[&str]) -> Vec<Value> {
        let mut cmd = Command::new(&env.python);
        cmd.arg(env.script("fake_hook.py"))
            .arg(&self.socket)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (status, out, err) = run_bounded(&mut cmd, Duration::from_secs(60));
        assert!(status.success(), "fake_hook.py {args:?} failed: {err}");
        String::from_utf8_lossy(&out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn completed(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["event_type"] == "ActivityCompleted")
        .collect()
}

/// What a span is about: its URL or file path.
fn subject(span: &Value) -> String {
    let a = &span["attributes"];
    a["http.url"]
        .as_str()
        .or(a["file.path"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn concurrent_activities_on_two_threads_and_their_subprocesses_are_attributed_exactly() {
    let env = TestEnv::get();
    let server = HttpServer::start(&env, true);
    let work = TempDir::new("work");
    let mut daemon = Daemon::start(&env);
    let url = format!("https://127.0.0.1:{}", server.port);
    daemon.hook(&env, &["attribute", &url, &work.arg()]);
    let summary = daemon.stop();

    let events = daemon.lines("events.jsonl");
    let done = completed(&events);
    assert_eq!(done.len(), 2, "{events:?}");
    for e in &done {
        let id = e["activity_id"].as_str().unwrap();
        let other = if id == "a" { "b" } else { "a" };
        let subjects: Vec<String> = e["spans"].as_array().unwrap().iter().map(subject).collect();
        for want in [
            format!("{}/{id}-marker.txt", work.arg()),
            format!("{url}/{id}-marker"),
            format!("{url}/{id}-curl"),
        ] {
            assert!(
                subjects.contains(&want),
                "activity {id} lacks {want}: {subjects:?}"
            );
        }
        assert!(
            !subjects.iter().any(|s| s.contains(&format!("/{other}-"))),
            "activity {id} holds activity {other}'s spans: {subjects:?}"
        );
        for s in e["spans"].as_array().unwrap() {
            assert_eq!(s["activity_id"], id);
        }
        assert_eq!(e["status"], "completed");
        assert_eq!(e["activity_output"]["done"], id);
        assert_eq!(e["span_count"].as_u64().unwrap() as usize, subjects.len());
    }
    // Written with no activity published: never attributed, reported with the reason.
    let unattributed = daemon.lines("unattributed.jsonl");
    let none = format!("{}/none.txt", work.arg());
    assert!(
        unattributed
            .iter()
            .any(|u| u["reason"] == "no_activity" && subject(&u["span"]) == none),
        "{unattributed:?}"
    );
    assert!(!done.iter().any(|e| e["spans"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| subject(s) == none)));
    assert_eq!(summary["workers"], 1);
    assert_eq!(summary["activities"], 2);
    assert_eq!(summary["ringbuf_drops"], 0);
}

#[test]
fn a_registration_claiming_another_process_or_thread_is_refused_and_logged() {
    let env = TestEnv::get();
    let mut daemon = Daemon::start(&env);
    let mut other = Command::new("sleep").arg("30").spawn().unwrap();
    let other_pid = other.id().to_string();

    let replies = daemon.hook(&env, &["forge-pid", &other_pid]);
    assert_eq!(replies[0]["reply"]["ok"], false, "{replies:?}");
    assert!(replies[0]["reply"]["error"]
        .as_str()
        .unwrap()
        .contains("refused"));

    let replies = daemon.hook(&env, &["forge-thread", &other_pid]);
    assert_eq!(
        replies[0]["reply"]["ok"], true,
        "a genuine hello: {replies:?}"
    );
    assert_eq!(replies[1]["reply"]["ok"], false, "{replies:?}");
    let _ = other.kill();
    let _ = other.wait();

    let summary = daemon.stop();
    assert_eq!(summary["registrations_refused"], 2);
    let log = daemon.stderr();
    assert!(
        log.contains(&format!("claims to be pid {other_pid}")),
        "{log}"
    );
    assert!(
        log.contains(&format!("thread {other_pid} is not a thread of process")),
        "{log}"
    );
}

#[test]
fn a_worker_in_its_own_pid_namespace_registers_and_is_attributed() {
    let env = TestEnv::get();
    let server = HttpServer::start(&env, false);
    let work = TempDir::new("work-ns");
    let mut daemon = Daemon::start(&env);
    let url = format!("http://127.0.0.1:{}", server.port);
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc"])
        .arg(&env.python)
        .arg(env.script("fake_hook.py"))
        .arg(&daemon.socket)
        .args(["attribute", &url, &work.arg()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (status, _, err) = run_bounded(&mut cmd, Duration::from_secs(60));
    assert!(status.success(), "{err}");
    daemon.stop();
    let events = daemon.lines("events.jsonl");
    let done = completed(&events);
    assert_eq!(done.len(), 2);
    for e in done {
        let id = e["activity_id"].as_str().unwrap();
        let subjects: Vec<String> = e["spans"].as_array().unwrap().iter().map(subject).collect();
        assert!(
            subjects.contains(&format!("{url}/{id}-marker")),
            "{subjects:?}"
        );
        assert!(
            subjects.contains(&format!("{url}/{id}-curl")),
            "{subjects:?}"
        );
    }
}

#[test]
fn requests_before_hello_and_malformed_lines_get_errors_not_a_crash() {
    use std::io::{BufRead, BufReader, Write};
    let env = TestEnv::get();
    let mut daemon = Daemon::start(&env);
    let mut s = UnixStream::connect(&daemon.socket).unwrap();
    s.write_all(b"not json\n{\"id\":1,\"op\":\"activity_start\"}\n")
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut replies = Vec::new();
    for _ in 0..2 {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        replies.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    assert_eq!(replies[0]["ok"], false);
    assert_eq!(replies[1]["id"], 1);
    assert!(replies[1]["error"].as_str().unwrap().contains("hello"));
    drop(s);
    let summary = daemon.stop();
    assert_eq!(summary["workers"], 0);
}

#[test]
fn a_worker_that_dies_mid_activity_leaves_nothing_behind() {
    let env = TestEnv::get();
    let mut daemon = Daemon::start(&env);
    daemon.hook(&env, &["die"]);
    // The exit reaches the agent through the ring buffer within a drain tick.
    thread::sleep(Duration::from_millis(300));
    let summary = daemon.stop();
    assert_eq!(summary["activities_in_flight"], 0, "{summary}");
    assert_eq!(summary["activities_abandoned"], 1, "{summary}");
}

#[test]
fn bad_governance_settings_stop_the_agent_with_a_message_naming_the_setting() {
    let env = TestEnv::get();
    let dir = TempDir::new("bad-config");
    // (arguments, environment, the setting the message must name)
    #[expect(
        clippy::type_complexity,
        reason = "a table of literal cases, read in place"
    )]
    let cases: [(&[&str], &[(&str, &str)], &str); 4] = [
        (&["--governance-timeout", "abc"], &[], "governance_timeout"),
        (
            &[],
            &[("OPENBOX_GOVERNANCE_POLICY", "sometimes")],
            "OPENBOX_GOVERNANCE_POLICY",
        ),
        (&["--openbox-url", "http://core.example.com"], &[], "https"),
        (
            &["--policy-file", "/nonexistent/policy.toml"],
            &[],
            "/nonexistent/policy.toml",
        ),
    ];
    for (args, vars, named) in cases {
        let mut cmd = Command::new(&env.agent);
        cmd.arg("run")
            .arg("--socket")
            .arg(dir.join("agent.sock"))
            .args(args)
            .envs(vars.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (status, _, err) = run_bounded(&mut cmd, Duration::from_secs(30));
        assert!(!status.success(), "{args:?} {vars:?} was accepted");
        assert!(
            err.contains(named),
            "{args:?} {vars:?}: the error does not name {named}: {err}"
        );
        assert!(
            !dir.join("agent.sock").exists(),
            "a refused start left its socket behind"
        );
    }
}
