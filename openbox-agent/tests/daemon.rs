//! `openbox-agent run` against a hand-written stand-in for the worker hook
//! (support/fake_hook.py): registration checks, attribution of concurrent threads and
//! of subprocesses, and clean-up when a worker dies. The real hook with a real
//! Temporal server is tested end to end in tests/e2e.

mod common;

use std::{
    collections::BTreeMap,
    fs,
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// The daemon, with its events, unattributed spans and stderr in files.
struct Daemon {
    agent: RunningAgent,
    dir: TempDir,
    socket: PathBuf,
}

impl Daemon {
    fn start(env: &TestEnv) -> Daemon {
        Daemon::start_with(env, &[], &[])
    }

    /// Started with extra arguments and environment variables.
    fn start_with(env: &TestEnv, args: &[&str], vars: &[(&str, &str)]) -> Daemon {
        let dir = TempDir::new("daemon");
        let socket = dir.join("agent.sock");
        let agent = RunningAgent::start(env, &socket, &dir.join("agent.err"), |cmd| {
            cmd.args(args)
                .envs(vars.iter().copied())
                .arg("--events")
                .arg(dir.join("events.jsonl"))
                .arg("--unattributed")
                .arg(dir.join("unattributed.jsonl"));
        });
        Daemon { agent, dir, socket }
    }

    fn stderr(&self) -> String {
        self.agent.stderr_text()
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
        self.agent.stop()
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
    // Each end was handled once the ring was read past the worker's request (the real
    // ring's positions, read from its meta pages), none at the wait's bound.
    let order = &summary["activity_end_order"];
    assert_eq!(order["activity_ends_proven"], 2, "{summary}");
    assert_eq!(order["activity_ends_unproven"], 0, "{summary}");
    // The summary says how sockets and files were captured (the mode asked for, when
    // the run asked for one).
    let mode = summary["capture_mode"].as_str().unwrap_or_default();
    match std::env::var("OPENBOX_CAPTURE_MODE").as_deref() {
        Ok(asked @ ("fentry" | "tracepoint")) => assert_eq!(mode, asked, "{summary}"),
        _ => assert!(["fentry", "tracepoint"].contains(&mode), "{summary}"),
    }
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

/// A process pool's worker registers as a helper of the worker that started it: its
/// thread publishes the worker's tokens and its spans land on the worker's activity; it
/// may not start activities, and a helper no registered worker started is refused.
#[test]
fn a_helper_forked_by_a_worker_publishes_the_workers_activity_and_nothing_else() {
    let env = TestEnv::get();
    let work = TempDir::new("work-helper");
    let mut daemon = Daemon::start(&env);
    let orphan = daemon.hook(&env, &["helper-orphan"]);
    assert_eq!(orphan[0]["reply"]["ok"], false, "{orphan:?}");
    let replies = daemon.hook(&env, &["helper", &work.arg()]);
    let of_helper = |op: &str| {
        replies
            .iter()
            .find(|r| r["helper"] == op)
            .unwrap_or_else(|| panic!("no {op} from the helper: {replies:?}"))["reply"]
            .clone()
    };
    assert_eq!(of_helper("hello")["ok"], true, "{replies:?}");
    assert_eq!(of_helper("thread")["ok"], true, "{replies:?}");
    let own_start = of_helper("activity_start");
    assert_eq!(own_start["ok"], false, "{replies:?}");
    assert!(
        own_start["error"]
            .as_str()
            .unwrap()
            .contains("may only register threads"),
        "{own_start}"
    );
    let summary = daemon.stop();
    assert_eq!(summary["registrations_refused"], 1, "{summary}");
    assert_eq!(summary["workers"], 1, "a helper is not a worker: {summary}");
    assert!(
        daemon
            .stderr()
            .contains("no registered worker is among its ancestors"),
        "{}",
        daemon.stderr()
    );
    let events = daemon.lines("events.jsonl");
    let done = completed(&events);
    assert_eq!(done.len(), 1, "{events:?}");
    let written = format!("{}/p-helper.txt", work.arg());
    let subjects: Vec<String> = done[0]["spans"]
        .as_array()
        .unwrap()
        .iter()
        .map(subject)
        .collect();
    assert!(subjects.contains(&written), "{subjects:?}");
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

/// `GET path` on the agent's metrics address: (status code, body).
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {out:?}"));
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}

/// The address the agent printed for its endpoints (started with `--metrics-addr
/// 127.0.0.1:0`), from its stderr file.
fn metrics_addr(stderr: impl Fn() -> String) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let err = stderr();
        if let Some(rest) = err.split("/readyz on http://").nth(1) {
            let addr: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                .collect();
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not say where its endpoints are within 30 s:\n{err}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Prometheus text → `name{labels}` → value (comments skipped).
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l}"));
            (
                name.to_string(),
                value.parse().unwrap_or_else(|_| panic!("{l}")),
            )
        })
        .collect()
}

#[test]
fn metrics_scraped_during_a_run_hold_the_values_of_the_summary_and_json_logs_parse() {
    let env = TestEnv::get();
    let server = HttpServer::start(&env, true);
    let work = TempDir::new("work-metrics");
    let mut daemon = Daemon::start_with(
        &env,
        &["--metrics-addr", "127.0.0.1:0", "--log-format", "json"],
        &[("OPENBOX_LOG", "info")],
    );
    let addr = metrics_addr(|| daemon.stderr());
    let url = format!("https://127.0.0.1:{}", server.port);
    daemon.hook(&env, &["attribute", &url, &work.arg()]);
    let mut other = Command::new("sleep").arg("30").spawn().unwrap();
    daemon.hook(&env, &["forge-pid", &other.id().to_string()]);
    let _ = other.kill();
    let _ = other.wait();
    // The hook processes' exits reach the agent through the ring buffer.
    thread::sleep(Duration::from_millis(300));
    let (status, text) = http_get(&addr, "/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    let m = parse_metrics(&text);
    let summary = daemon.stop();

    let metric = |name: &str| -> u64 {
        *m.get(name)
            .unwrap_or_else(|| panic!("{name} is not in /metrics:\n{text}")) as u64
    };
    let num = |v: &Value| v.as_u64().unwrap_or(0);
    let g = &summary["governance"];
    let mut pairs: Vec<(String, u64)> = vec![
        ("openbox_events_total".into(), num(&summary["events"])),
        (
            "openbox_ringbuf_drops_total".into(),
            num(&summary["ringbuf_drops"]),
        ),
        (
            "openbox_truncated_calls_total".into(),
            num(&summary["truncated_calls"]),
        ),
        (
            "openbox_truncated_bytes_total".into(),
            num(&summary["truncated_bytes"]),
        ),
        (
            "openbox_records_received_total".into(),
            num(&summary["records_received"]),
        ),
        (
            "openbox_spans_attributed_total".into(),
            num(&summary["spans_attributed"]),
        ),
        (
            "openbox_connections_unrecognised_total".into(),
            num(&summary["unrecognised_connections"]),
        ),
        (
            "openbox_hook_connections_total".into(),
            num(&summary["hook_connections"]),
        ),
        (
            "openbox_hook_registrations_refused_total".into(),
            num(&summary["registrations_refused"]),
        ),
        (
            "openbox_activities_total".into(),
            num(&summary["activities"]),
        ),
        (
            "openbox_activity_ends_proven_total".into(),
            num(&summary["activity_end_order"]["activity_ends_proven"]),
        ),
        (
            "openbox_activity_ends_unproven_total".into(),
            num(&summary["activity_end_order"]["activity_ends_unproven"]),
        ),
        (
            "openbox_hook_connections_refused_total".into(),
            num(&summary["hook_connections_refused"]),
        ),
        (
            "openbox_hook_peers_dropped_total".into(),
            num(&summary["hook_peers_dropped"]),
        ),
        (
            "openbox_hook_closed_without_hello_total".into(),
            num(&summary["hook_closed_without_hello"]),
        ),
        (
            "openbox_worker_settings_refused_total".into(),
            num(&summary["worker_settings_refused"]),
        ),
        ("openbox_spool_events".into(), num(&g["spool_pending"])),
        (
            "openbox_spool_dropped_total".into(),
            num(&g["spool_dropped"]),
        ),
        (
            "openbox_governance_request_duration_seconds_count".into(),
            g["requests"].as_object().unwrap().values().map(num).sum(),
        ),
    ];
    for reason in ["no_activity", "after_activity_end", "unknown_activity"] {
        pairs.push((
            format!("openbox_spans_unattributed_total{{reason=\"{reason}\"}}"),
            num(&summary["unattributed_reasons"][reason]),
        ));
    }
    for protocol in ["http", "postgres", "mysql", "redis", "mongo"] {
        pairs.push((
            format!("openbox_parser_unparsed_messages_total{{protocol=\"{protocol}\"}}"),
            num(&summary["unparsed_by_protocol"][protocol]),
        ));
    }
    for outcome in ["ok", "non_json", "http_error", "timeout", "network"] {
        pairs.push((
            format!("openbox_governance_requests_total{{outcome=\"{outcome}\"}}"),
            num(&g["requests"][outcome]),
        ));
    }
    for (name, want) in &pairs {
        assert_eq!(
            metric(name),
            *want,
            "{name}: /metrics and the summary disagree\nsummary: {summary}\n/metrics:\n{text}"
        );
    }
    // And the run really counted something.
    assert!(metric("openbox_spans_attributed_total") >= 6, "{text}");
    assert!(
        metric("openbox_spans_unattributed_total{reason=\"no_activity\"}") >= 1,
        "{text}"
    );
    assert_eq!(metric("openbox_hook_registrations_refused_total"), 1);
    assert!(metric("openbox_hook_connections_total") >= 2, "{text}");
    // Two ActivityStarted and two ActivityCompleted, answered by the local policy.
    assert!(
        metric("openbox_governance_requests_total{outcome=\"ok\"}") >= 4,
        "{text}"
    );
    assert!(metric("openbox_events_total") > 0);

    // --log-format json: every line on stderr is a JSON object (the summary too).
    let err = daemon.stderr();
    let lines: Vec<Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["level"] == "INFO"
            && l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("listening for worker hooks"))),
        "{err}"
    );
    assert!(
        lines.iter().any(|l| l["level"] == "WARN"
            && l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("refused hook registration"))),
        "{err}"
    );
}

#[test]
fn readyz_says_not_ready_until_the_programs_are_attached_then_systemd_hears_ready() {
    use std::os::unix::net::UnixDatagram;
    let env = TestEnv::get();
    let dir = TempDir::new("readyz");
    let socket = dir.join("agent.sock");
    let gate = dir.join("attach-now");
    let notify = UnixDatagram::bind(dir.join("notify.sock")).unwrap();
    notify.set_nonblocking(true).unwrap();
    let stderr = fs::File::create(dir.join("agent.err")).unwrap();
    let mut child = Command::new(&env.agent)
        .args([
            "run",
            "--events",
            "off",
            "--metrics-addr",
            "127.0.0.1:0",
            "--socket",
        ])
        .arg(&socket)
        // Test-only: the agent waits for this file before it loads its programs.
        .env("OPENBOX_TEST_HOLD_ATTACH", &gate)
        .env("NOTIFY_SOCKET", dir.join("notify.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let read_err = || fs::read_to_string(dir.join("agent.err")).unwrap_or_default();
    let addr = metrics_addr(read_err);

    assert_eq!(http_get(&addr, "/healthz").unwrap().0, 200);
    let (status, body) = http_get(&addr, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not attached"), "{body}");
    assert_eq!(http_get(&addr, "/metrics").unwrap().0, 503);
    assert!(
        UnixStream::connect(&socket).is_err(),
        "socket before attach"
    );
    let mut buf = [0u8; 256];
    assert!(
        notify.recv(&mut buf).is_err(),
        "systemd was told something before the agent was ready"
    );

    fs::write(&gate, b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let (status, _) = http_get(&addr, "/readyz").unwrap();
        if seen.last() != Some(&status) {
            seen.push(status);
        }
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never ready: {seen:?}\n{}",
            read_err()
        );
        thread::sleep(Duration::from_millis(20));
    }
    // Ready means serving: the hook socket answers, systemd got READY=1, and /metrics
    // has counters.
    assert!(UnixStream::connect(&socket).is_ok());
    notify.set_nonblocking(false).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let n = notify.recv(&mut buf).unwrap();
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    let (status, text) = http_get(&addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(text.contains("openbox_events_total"), "{text}");

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success(), "{}", read_err());
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
}

/// A SIGTERM that came before the daemon caught signals ended it by the default action,
/// with every program attached: the kernel then detached them as the process exited,
/// 2–4 s (a rolling update's stop measured at 2.3 s), with no summary. Sent here while
/// the daemon waits before loading its programs.
#[test]
fn sigterm_during_start_up_stops_the_daemon_through_its_exit_path() {
    let env = TestEnv::get();
    let dir = TempDir::new("early-term");
    let gate = dir.join("attach-now");
    let stderr = fs::File::create(dir.join("agent.err")).unwrap();
    let mut child = Command::new(&env.agent)
        .args([
            "run",
            "--events",
            "off",
            "--metrics-addr",
            "127.0.0.1:0",
            "--socket",
        ])
        .arg(dir.join("agent.sock"))
        // Test-only: the agent waits for this file before it loads its programs.
        .env("OPENBOX_TEST_HOLD_ATTACH", &gate)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let read_err = || fs::read_to_string(dir.join("agent.err")).unwrap_or_default();
    let addr = metrics_addr(read_err);
    assert_eq!(http_get(&addr, "/healthz").unwrap().0, 200);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    fs::write(&gate, b"").unwrap();
    let status = child.wait().unwrap();
    let err = read_err();
    assert!(status.success(), "{status}: {err}");
    assert!(
        err.lines().any(|l| l.contains("\"type\":\"summary\"")),
        "no summary: {err}"
    );
}

#[test]
fn the_config_file_covers_run_settings_with_flag_over_env_over_file_and_rejects_unknown_keys() {
    let env = TestEnv::get();
    let dir = TempDir::new("config");
    let config = dir.join("agent.toml");
    // Not an address: `run` stops at once and names the value it used, so each case
    // shows which layer won without loading any program.
    fs::write(
        &config,
        "[agent]\nmetrics_addr = \"from-the-file\"\n[capture]\nring_mib = 16\n",
    )
    .unwrap();
    let run = |args: &[&str], vars: &[(&str, &str)]| -> String {
        let mut cmd = Command::new(&env.agent);
        cmd.arg("run")
            .arg("--socket")
            .arg(dir.join("agent.sock"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("OPENBOX_METRICS_ADDR")
            .envs(vars.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (status, _, err) = run_bounded(&mut cmd, Duration::from_secs(30));
        assert!(!status.success(), "{args:?} {vars:?} started");
        err
    };
    let err = run(&[], &[]);
    assert!(err.contains("\"from-the-file\""), "the file's: {err}");
    let err = run(&[], &[("OPENBOX_METRICS_ADDR", "from-the-env")]);
    assert!(err.contains("\"from-the-env\""), "env over file: {err}");
    let err = run(
        &["--metrics-addr", "from-the-flag"],
        &[("OPENBOX_METRICS_ADDR", "from-the-env")],
    );
    assert!(err.contains("\"from-the-flag\""), "flag over env: {err}");

    // A misspelled key stops the agent, naming the file and the key.
    fs::write(&config, "[capture]\nring_mb = 16\n").unwrap();
    let err = run(&[], &[]);
    assert!(
        err.contains(&config.display().to_string()) && err.contains("ring_mb"),
        "{err}"
    );
    fs::write(&config, "[agnet]\nsocket = \"/tmp/x\"\n").unwrap();
    let err = run(&[], &[]);
    assert!(err.contains("agnet"), "{err}");
    // A value of the wrong kind is named too.
    fs::write(&config, "[capture]\nring_mib = 3\n").unwrap();
    let err = run(&[], &[]);
    assert!(
        err.contains("ring_mib") && err.contains("power of two"),
        "{err}"
    );
    assert!(!dir.join("agent.sock").exists());
}
