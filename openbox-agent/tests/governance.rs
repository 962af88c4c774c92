//! `openbox-agent run` governing through the fake OpenBox Core
//! (tests/fake_core/fake_core.py, which records every request it gets), with
//! support/fake_hook.py as the worker hook (issue 10):
//! - what the agent acknowledged to the hook survives a SIGKILL of the agent and reaches
//!   Core exactly once after the restart;
//! - while Core is down, spool delivery retries on its jittered backoff, not once per
//!   activity event, and delivers everything once Core is back.
//!
//! Run with `flock /tmp/openbox-kernel.lock cargo xtask test -p openbox-agent --test governance`.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::{json, Value};

const KEY: &str = "obx_test_governance_key";
const EVALUATE: &str = "/api/v1/governance/evaluate";

/// tests/fake_core/fake_core.py on a free port, recording every request.
struct FakeCore {
    _process: Background,
    port: u16,
    record: PathBuf,
}

impl FakeCore {
    fn start(env: &TestEnv, dir: &TempDir) -> FakeCore {
        Self::start_with(env, dir, &json!({}))
    }

    /// With a script (fake_core.py's rules), kept in `dir` and re-read when rewritten.
    fn start_with(env: &TestEnv, dir: &TempDir, script: &Value) -> FakeCore {
        let record = dir.join("core.requests.jsonl");
        let script_file = dir.join("core.script.json");
        fs::write(&script_file, script.to_string()).unwrap();
        let mut cmd = Command::new(&env.python);
        cmd.arg(workspace_root().join("tests/fake_core/fake_core.py"))
            .args(["--port", "0", "--api-key", KEY, "--record"])
            .arg(&record)
            .arg("--script")
            .arg(&script_file);
        let mut process = Background::spawn("fake_core.py", &mut cmd);
        let line = process.line();
        let port = line
            .strip_prefix("listening on ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("fake_core.py printed {line:?}"));
        FakeCore {
            _process: process,
            port,
            record,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `"close"`: Core accepts connections and closes them unanswered (each try is
    /// recorded, with status 0). `false`: Core answers again.
    fn set_down(&self, down: Value) {
        let body = json!({ "down": down }).to_string();
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("fake Core control");
        write!(
            s,
            "POST /_control HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "fake Core control: {answer}"
        );
    }

    /// Every request recorded so far.
    fn requests(&self) -> Vec<Value> {
        fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a recorded request"))
            .collect()
    }
}

/// Evaluate bodies among `requests` answered with `status`.
fn evaluated(requests: &[Value], status: u64) -> Vec<&Value> {
    requests
        .iter()
        .filter(|r| r["path"] == EVALUATE && r["status"] == status)
        .map(|r| &r["body"])
        .collect()
}

fn text<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_default()
}

/// `openbox-agent run` with a Core URL, its spool in the test directory (kept across
/// restarts), fail_open and a 1 s governance timeout.
struct Agent {
    agent: RunningAgent,
    socket: PathBuf,
    stderr: PathBuf,
}

impl Agent {
    fn start(env: &TestEnv, dir: &TempDir, core: &FakeCore, name: &str) -> Agent {
        Self::start_with_timeout(env, dir, core, name, 1)
    }

    fn start_with_timeout(
        env: &TestEnv,
        dir: &TempDir,
        core: &FakeCore,
        name: &str,
        timeout_secs: u32,
    ) -> Agent {
        let socket = dir.join("agent.sock");
        let stderr = dir.join(&format!("{name}.stderr"));
        let agent = RunningAgent::start(env, &socket, &stderr, |cmd| {
            cmd.args(["--openbox-url", &core.url(), "--openbox-api-key", KEY])
                .arg("--spool-dir")
                .arg(dir.join("spool"))
                .args(["--governance-policy", "fail_open"])
                .args(["--governance-timeout", &timeout_secs.to_string()]);
        });
        Agent {
            agent,
            socket,
            stderr,
        }
    }

    fn stderr_text(&self) -> String {
        self.agent.stderr_text()
    }

    fn kill(&mut self) {
        self.agent.kill();
    }

    /// SIGTERM, wait, and the `governance` object of the summary it printed last.
    fn stop(&mut self) -> Value {
        self.agent.stop()["governance"].clone()
    }
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// `workflow_id/event_type/signal argument`, as fake_hook.py's `event_key`.
fn event_key(body: &Value) -> String {
    let n = match text(body, "event_type") {
        "SignalReceived" => body["signal_args"][0].to_string(),
        _ => String::new(),
    };
    format!(
        "{}/{}/{n}",
        text(body, "workflow_id"),
        text(body, "event_type")
    )
}

/// Waits (at most `timeout`) until `done` holds for what Core answered 200, then a little
/// longer (a duplicate would come right after).
fn delivered_when(core: &FakeCore, timeout: Duration, done: impl Fn(&[&Value]) -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done(&evaluated(&core.requests(), 200)) {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    thread::sleep(Duration::from_millis(1500));
}

/// Waits (at most `timeout`) until every event in `acked` (keys as fake_hook.py's
/// `event_key`) was answered 200 by Core, and asserts each arrived exactly once.
fn every_acked_event_reaches_core_once(
    core: &FakeCore,
    acked: &[String],
    agent: &Agent,
    timeout: Duration,
) {
    let keys = |bodies: &[&Value]| -> BTreeMap<String, usize> {
        let mut n = BTreeMap::new();
        for b in bodies {
            *n.entry(event_key(b)).or_default() += 1;
        }
        n
    };
    delivered_when(core, timeout, |bodies| {
        let got = keys(bodies);
        acked.iter().all(|k| got.contains_key(k))
    });
    let got = keys(&evaluated(&core.requests(), 200));
    let missing: Vec<&String> = acked.iter().filter(|k| !got.contains_key(*k)).collect();
    let twice: Vec<(&String, &usize)> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        missing.is_empty() && twice.is_empty(),
        "{} of the {} acknowledged events never reached Core (first: {:?}); delivered more than once: {:?}\n\
         (recording {}, agent stderr {})",
        missing.len(),
        acked.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        twice.iter().take(5).collect::<Vec<_>>(),
        core.record.display(),
        agent.stderr.display()
    );
}

/// The hook writes workflow events without waiting for replies (as the real hook's
/// sender does) while Core takes none, so the agent spools them; the agent is SIGKILLed
/// part-way. Every event the hook had been told was accepted must reach Core once the
/// agent is started again on the same spool, and exactly once.
#[test]
fn every_workflow_event_acknowledged_before_a_sigkill_reaches_core_exactly_once() {
    let env = TestEnv::get();
    let dir = TempDir::new("gov-durable");
    let core = FakeCore::start(&env, &dir);
    let mut agent = Agent::start(&env, &dir, &core, "agent-1");
    core.set_down(json!("close"));

    let acked_file = dir.join("acked.txt");
    // 200 runs × (WorkflowStarted, 8 signals, WorkflowCompleted).
    let total = 200 * 10;
    let mut hook = Command::new(&env.python)
        .arg(env.script("fake_hook.py"))
        .arg(&agent.socket)
        .args(["workflow-events", "200", "8"])
        .arg(&acked_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("hook.stderr")).unwrap())
        .spawn()
        .expect("starting fake_hook.py");
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines(&acked_file).len() < 300 {
        assert!(
            Instant::now() < deadline && hook.try_wait().unwrap().is_none(),
            "the hook got {} acknowledgements and {}; agent stderr:\n{}",
            lines(&acked_file).len(),
            match hook.try_wait().unwrap() {
                Some(s) => format!("exited ({s})"),
                None => "is still waiting".to_string(),
            },
            agent.stderr_text()
        );
        thread::sleep(Duration::from_millis(5));
    }
    agent.kill();
    let exited = Instant::now() + Duration::from_secs(30);
    while hook.try_wait().unwrap().is_none() {
        assert!(Instant::now() < exited, "the hook did not see the agent go");
        thread::sleep(Duration::from_millis(20));
    }
    let acked = lines(&acked_file);
    let acked_set: BTreeSet<&String> = acked.iter().collect();
    assert_eq!(acked.len(), acked_set.len(), "an event acknowledged twice");
    eprintln!(
        "{} of {total} events acknowledged before the SIGKILL",
        acked.len()
    );

    core.set_down(json!(false));
    let mut agent = Agent::start(&env, &dir, &core, "agent-2");
    every_acked_event_reaches_core_once(&core, &acked, &agent, Duration::from_secs(90));
    let governance = agent.stop();
    assert_eq!(governance["spool_pending"], 0, "{governance}");
}

/// SIGTERM (a rolling update) while workflow events are still with Core: Core holds each
/// request 8 s and then closes it unanswered, the governance timeout is 5 s, so at the
/// SIGTERM every event is either in a Core call or waiting for its run's previous one.
/// The agent must finish those calls — each ends spooled — and answer the hook before it
/// exits; the next agent on the same spool delivers every event to Core exactly once.
#[test]
fn workflow_events_under_way_at_sigterm_are_acknowledged_and_reach_core_after_the_restart() {
    let env = TestEnv::get();
    let dir = TempDir::new("gov-sigterm");
    let stall = json!({"rules": [{"match": {"event_type": ["WorkflowStarted", "SignalReceived", "WorkflowCompleted"]},
                                  "delay": 8, "close": true}]});
    let core = FakeCore::start_with(&env, &dir, &stall);
    let mut agent = Agent::start_with_timeout(&env, &dir, &core, "agent-1", 5);

    let acked_file = dir.join("acked.txt");
    let (runs, signals) = (20, 1);
    let total = runs * (signals + 2);
    let mut hook = Command::new(&env.python)
        .arg(env.script("fake_hook.py"))
        .arg(&agent.socket)
        .args(["workflow-events", &runs.to_string(), &signals.to_string()])
        .arg(&acked_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("hook.stderr")).unwrap())
        .spawn()
        .expect("starting fake_hook.py");
    // The hook sends every event at once; the first Core calls take the 5 s timeout.
    thread::sleep(Duration::from_secs(2));
    assert_eq!(
        lines(&acked_file).len(),
        0,
        "events were answered before the SIGTERM: the test needs them under way"
    );
    assert!(hook.try_wait().unwrap().is_none(), "the hook exited early");
    let governance = agent.stop();
    let stderr = agent.stderr_text();
    assert!(
        stderr.contains("governance call(s) under way"),
        "the agent did not say it waited for calls under way:\n{stderr}"
    );
    let summary: Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
    assert_eq!(summary["governance_calls_abandoned"], 0, "{summary}");
    let exited = Instant::now() + Duration::from_secs(30);
    while hook.try_wait().unwrap().is_none() {
        assert!(Instant::now() < exited, "the hook did not see the agent go");
        thread::sleep(Duration::from_millis(20));
    }
    let acked = lines(&acked_file);
    assert_eq!(
        acked.len(),
        total,
        "{} of {total} events acknowledged before the agent exited; agent stderr:\n{stderr}",
        acked.len()
    );
    assert!(
        governance["spool_pending"].as_u64().unwrap_or(0) > 0,
        "the events were spooled: {governance}"
    );

    fs::write(dir.join("core.script.json"), "{}").unwrap();
    thread::sleep(Duration::from_millis(300));
    let mut agent = Agent::start(&env, &dir, &core, "agent-2");
    every_acked_event_reaches_core_once(&core, &acked, &agent, Duration::from_secs(60));
    let governance = agent.stop();
    assert_eq!(governance["spool_pending"], 0, "{governance}");
}

/// Core is down for ~10 s while 50 activities at a time run through the agent (fail_open,
/// governance timeout 1 s). Spool delivery must retry on its own backoff — full jitter,
/// waits uniform in [0, min(30 s, 0.5 s·2ⁿ)] — not once per activity event, and every
/// ActivityCompleted the hook was answered for reaches Core exactly once after Core is
/// back.
#[test]
fn while_core_is_down_spool_delivery_retries_on_its_backoff_not_per_activity() {
    let env = TestEnv::get();
    let dir = TempDir::new("gov-storm");
    let core = FakeCore::start(&env, &dir);
    let mut agent = Agent::start(&env, &dir, &core, "agent");
    core.set_down(json!("close"));
    let before = core.requests().len();
    let mut cmd = Command::new(&env.python);
    cmd.arg(env.script("fake_hook.py"))
        .arg(&agent.socket)
        .args(["activities", "50", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (status, out, err) = run_bounded(&mut cmd, Duration::from_secs(120));
    assert!(status.success(), "fake_hook.py activities failed: {err}");
    let all = core.requests();
    core.set_down(json!(false));
    let ended: Vec<String> = serde_json::from_slice::<Value>(&out).expect("the hook's report")
        ["ended"]
        .as_array()
        .expect("ended ids")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(ended.len() >= 50, "only {} activities ran", ended.len());

    // During the outage each event is tried directly at most once (then it is spooled,
    // or it met the failure policy); every try beyond that is spool delivery, which keeps
    // retrying the oldest spooled event.
    let outage = &all[before..];
    let mut tries: BTreeMap<(String, String), usize> = BTreeMap::new();
    for r in outage.iter().filter(|r| r["path"] == EVALUATE) {
        let b = &r["body"];
        let key = (
            text(b, "activity_id").to_string(),
            text(b, "event_type").to_string(),
        );
        *tries.entry(key).or_default() += 1;
    }
    let (head, most) = tries
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(k, n)| (k.clone(), *n))
        .expect("Core saw tries during the outage");
    let retries = outage.iter().filter(|r| r["path"] == EVALUATE).count() - tries.len();
    // 13 spool tries need 12 waits summing to less than the ~12 s outage; the last seven
    // alone (uniform up to 16 s and 30 s) do so with probability below 1e-6.
    assert!(
        (2..=12).contains(&retries),
        "{retries} retries of spooled events while Core was down ({} activities, {} tries of {head:?}); \
         the backoff allows 2 to 12 (recording {})",
        ended.len(),
        most,
        core.record.display()
    );
    assert_eq!(
        retries,
        most - 1,
        "only the oldest spooled event is retried"
    );

    // Back up: every ActivityCompleted the hook was answered for arrives, once.
    let want: BTreeSet<&String> = ended.iter().collect();
    let completed = |bodies: &[&Value]| -> BTreeMap<String, usize> {
        let mut n = BTreeMap::new();
        for b in bodies
            .iter()
            .filter(|b| text(b, "event_type") == "ActivityCompleted")
        {
            *n.entry(text(b, "activity_id").to_string()).or_default() += 1;
        }
        n
    };
    delivered_when(&core, Duration::from_secs(90), |bodies| {
        let got = completed(bodies);
        want.iter().all(|k| got.contains_key(*k))
    });
    let got = completed(&evaluated(&core.requests(), 200));
    let missing: Vec<&&String> = want.iter().filter(|k| !got.contains_key(**k)).collect();
    let twice: Vec<(&String, &usize)> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        missing.is_empty() && twice.is_empty(),
        "ActivityCompleted of {} of {} activities never reached Core (first: {:?}); more than once: {:?}\n\
         (recording {}, agent stderr {})",
        missing.len(),
        want.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        twice.iter().take(5).collect::<Vec<_>>(),
        core.record.display(),
        agent.stderr.display()
    );
    let governance = agent.stop();
    assert_eq!(governance["spool_pending"], 0, "{governance}");
    eprintln!(
        "{} activities, {retries} spool retries during the outage, summary {governance}",
        ended.len()
    );
}
