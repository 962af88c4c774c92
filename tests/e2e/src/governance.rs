//! Governance: the fake OpenBox Core, the governing agent, the governance worker and
//! client.

use std::{
    fs,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use openbox_testkit::{tail, unique, workspace_root, Proc, TempDir};
use serde_json::{json, Value};

use crate::{agent::json_lines, logs_dir, shared, Env, Shared, WorkerOutput, START_TIMEOUT};

/// The API key the fake Core accepts in the governance tests.
pub const FAKE_CORE_KEY: &str = "obx_test_e2e_governance_key";

/// One HTTP/1.1 request to `127.0.0.1:port` (`Connection: close`): status and body.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp).to_string();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {resp:?}")))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((status, body))
}

/// Writes `text` to `path` atomically (temp file and rename), for files another process
/// polls.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
}

/// tests/fake_core/fake_core.py: a fake OpenBox Core that records every request (JSON
/// lines), answers scripted verdicts, and can be taken down (connection refused) and
/// brought back.
pub struct FakeCore {
    proc: Proc,
    pub port: u16,
    pub api_key: String,
    /// The recorded requests, one JSON object per line (see fake_core.py).
    pub record: PathBuf,
    pub script_file: PathBuf,
    pub control_file: PathBuf,
}

impl FakeCore {
    /// Starts it with `script` (see fake_core.py) and waits until it listens.
    pub fn start(env: &Env, logs: &Path, name: &str, api_key: &str, script: &Value) -> FakeCore {
        FakeCore::start_with(env, logs, name, api_key, script, &[])
    }

    /// [`FakeCore::start`] with more fake_core.py arguments (e.g. an identity to require).
    pub fn start_with(
        env: &Env,
        logs: &Path,
        name: &str,
        api_key: &str,
        script: &Value,
        extra: &[String],
    ) -> FakeCore {
        let record = logs.join(format!("{name}.requests.jsonl"));
        let script_file = logs.join(format!("{name}.script.json"));
        let control_file = logs.join(format!("{name}.control.json"));
        write_atomic(&script_file, &serde_json::to_string_pretty(script).unwrap());
        write_atomic(&control_file, "{\"down\": false}");
        let mut cmd = env.python(&workspace_root().join("tests/fake_core/fake_core.py"));
        cmd.args(["--port", "0", "--api-key", api_key])
            .arg("--record")
            .arg(&record)
            .arg("--script")
            .arg(&script_file)
            .arg("--control-file")
            .arg(&control_file)
            .args(extra);
        let mut proc = Proc::spawn(name, cmd, logs);
        let line = proc.wait_for_line("`listening on PORT`", START_TIMEOUT, |l| {
            l.starts_with("listening on ")
        });
        let port = line["listening on ".len()..]
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("fake Core printed {line:?}"));
        FakeCore {
            proc,
            port,
            api_key: api_key.to_string(),
            record,
            script_file,
            control_file,
        }
    }

    /// `http://127.0.0.1:PORT`, its base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `--openbox-url URL --openbox-api-key KEY` for the agent.
    pub fn agent_args(&self) -> Vec<String> {
        vec![
            "--openbox-url".into(),
            self.url(),
            "--openbox-api-key".into(),
            self.api_key.clone(),
        ]
    }

    fn control_state(&self) -> Option<Value> {
        let (status, body) = http_request(self.port, "GET", "/_control", None).ok()?;
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// Replaces the script and waits until the server uses it.
    pub fn set_script(&self, script: &Value) {
        write_atomic(
            &self.script_file,
            &serde_json::to_string_pretty(script).unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self
                .control_state()
                .is_some_and(|s| s.get("script") == Some(script))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the fake Core did not take the new script within 10 s: {}",
                self.stderr_tail()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops listening (connection refused) until [`FakeCore::up`].
    pub fn down(&self) {
        write_atomic(&self.control_file, "{\"down\": \"refuse\"}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "the fake Core still accepts connections 10 s after being told to go down"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Listens again on the same port.
    pub fn up(&self) {
        write_atomic(&self.control_file, "{\"down\": false}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.control_state().is_none() {
            assert!(
                Instant::now() < deadline,
                "the fake Core did not come back within 10 s: {}",
                self.stderr_tail()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every request recorded so far, in the order they were answered.
    pub fn requests(&self) -> Vec<Value> {
        let text = fs::read_to_string(&self.record).unwrap_or_default();
        // A line being written may be incomplete: only complete lines.
        let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!(
                        "{} holds a line that is not JSON ({e}): {l}",
                        self.record.display()
                    )
                })
            })
            .collect()
    }

    /// The evaluate requests Core answered with `status` (0: the connection was closed),
    /// as their bodies, in order.
    pub fn evaluated(&self, status: u64) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| {
                r["path"] == json!("/api/v1/governance/evaluate") && r["status"] == json!(status)
            })
            .map(|r| r["body"].clone())
            .collect()
    }

    /// [`FakeCore::evaluated`] without per-operation hook events (`hook_trigger: true`,
    /// SDK 2.0 §3.2): the workflow's and activities' lifecycle events only.
    pub fn lifecycle(&self, status: u64) -> Vec<Value> {
        self.evaluated(status)
            .into_iter()
            .filter(|b| !crate::is_hook_event(b))
            .collect()
    }

    /// Waits (up to `timeout`) until `pred` holds for the recorded requests.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.requests()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the fake Core did not record {what} within {timeout:?} (recorded: {})",
                self.record.display()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// tests/fake_core/validate.py over everything recorded: `Err(its output)` unless
    /// every request matches tests/schema/openbox-core-v1.schema.json.
    pub fn validate_schema(&self, env: &Env) -> Result<String, String> {
        validate_with_schema(env, &self.record, None)
    }

    pub fn stderr_tail(&self) -> String {
        self.proc.stderr_tail()
    }
}

/// validate.py over a JSON-lines file (`def`: validate each line's `body` against
/// `$defs/<def>`): `Ok(output)` when valid, else `Err(output)`.
pub fn validate_with_schema(env: &Env, file: &Path, def: Option<&str>) -> Result<String, String> {
    let mut cmd = env.python(&workspace_root().join("tests/fake_core/validate.py"));
    cmd.arg(file);
    if let Some(d) = def {
        cmd.args(["--def", d]);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running validate.py: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// `openbox-agent run` with governance flags.
pub struct GovAgent {
    proc: Proc,
    pub name: String,
    pub socket: PathBuf,
    /// Its `--events` file.
    pub events: PathBuf,
}

/// What a governing agent left when it stopped.
#[derive(Debug)]
pub struct GovAgentReport {
    pub status: ExitStatus,
    /// Whether it exited within the grace period after SIGTERM.
    pub in_time: bool,
    pub stderr: String,
    pub stderr_path: PathBuf,
    pub events: Vec<Value>,
    pub events_path: PathBuf,
    /// The `{"type":"summary",…}` line on stderr, if any.
    pub summary: Option<Value>,
}

impl GovAgent {
    fn command(
        env: &Env,
        logs: &Path,
        name: &str,
        socket: &Path,
        args: &[String],
    ) -> (Command, PathBuf) {
        let events = logs.join(format!("{name}.events.jsonl"));
        let mut cmd = Command::new(&env.agent);
        cmd.arg("run")
            .arg("--socket")
            .arg(socket)
            .arg("--events")
            .arg(&events)
            .arg("--unattributed")
            .arg(logs.join(format!("{name}.unattributed.jsonl")))
            .args(args)
            .env(
                "OPENBOX_LOG",
                std::env::var("OPENBOX_LOG").unwrap_or_else(|_| "info".into()),
            )
            // Only what the test passes: none of the developer's own settings.
            .env_remove("OPENBOX_URL")
            .env_remove("OPENBOX_API_KEY")
            .env_remove("OPENBOX_GOVERNANCE_TIMEOUT")
            .env_remove("OPENBOX_GOVERNANCE_POLICY");
        (cmd, events)
    }

    /// Starts the daemon (logs `<name>.stdout|stderr`, events `<name>.events.jsonl`) and
    /// waits until its socket accepts connections.
    pub fn start(env: &Env, logs: &Path, name: &str, socket: &Path, args: &[String]) -> GovAgent {
        let (cmd, events) = Self::command(env, logs, name, socket, args);
        let mut proc = Proc::spawn(name, cmd, logs);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = proc.exited() {
                panic!(
                    "`openbox-agent run` ({name}) exited ({status}) before its socket {} accepted a connection\nstderr: {}",
                    socket.display(),
                    proc.stderr_tail()
                );
            }
            if UnixStream::connect(socket).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "`openbox-agent run` ({name}) did not accept connections on {} within {START_TIMEOUT:?}\nstderr: {}",
                socket.display(),
                proc.stderr_tail()
            );
            thread::sleep(Duration::from_millis(50));
        }
        GovAgent {
            proc,
            name: name.to_string(),
            socket: socket.to_path_buf(),
            events,
        }
    }

    /// Starts the daemon (with `extra_env` set) expecting it to exit by itself within
    /// `timeout`: its status and stderr (fails the test if it is still running then).
    pub fn start_expecting_exit(
        env: &Env,
        logs: &Path,
        name: &str,
        socket: &Path,
        args: &[String],
        extra_env: &[(&str, &str)],
        timeout: Duration,
    ) -> (ExitStatus, String) {
        let (mut cmd, _) = Self::command(env, logs, name, socket, args);
        cmd.envs(extra_env.iter().copied());
        let mut proc = Proc::spawn(name, cmd, logs);
        match proc.wait(timeout) {
            Some(status) => (status, proc.stderr_text()),
            None => panic!(
                "`openbox-agent run` ({name}) was expected to exit but still runs after {timeout:?}\nstderr: {}",
                proc.stderr_tail()
            ),
        }
    }

    /// Fails the test if the daemon has exited.
    #[track_caller]
    pub fn assert_running(&mut self) {
        if let Some(status) = self.proc.exited() {
            panic!(
                "`openbox-agent run` ({}) exited ({status}) while it should be running\nstderr: {}",
                self.name,
                self.proc.stderr_tail()
            );
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The events it has written to its `--events` file so far.
    pub fn events_so_far(&self) -> Vec<Value> {
        let text = fs::read_to_string(&self.events).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
        complete
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (up to `timeout`) until `pred` holds for its events so far.
    pub fn wait_for_events(&self, what: &str, timeout: Duration, pred: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.events_so_far()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent ({}) did not write {what} to {} within {timeout:?}\nstderr: {}",
                self.name,
                self.events.display(),
                self.proc.stderr_tail()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stderr_tail(&self) -> String {
        self.proc.stderr_tail()
    }

    /// SIGTERM to the daemon, wait up to 30 s, and collect what it left.
    pub fn stop(mut self) -> GovAgentReport {
        let (status, in_time) = self
            .proc
            .stop_leader(libc::SIGTERM, Duration::from_secs(30));
        let stderr = self.proc.stderr_text();
        let summary = stderr
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .find(|v| v.get("type").and_then(Value::as_str) == Some("summary"));
        GovAgentReport {
            status,
            in_time,
            stderr,
            stderr_path: self.proc.stderr.clone(),
            events: json_lines(&self.events, "events"),
            events_path: self.events.clone(),
            summary,
        }
    }
}

impl GovAgentReport {
    /// It exited 0 within the grace period after SIGTERM.
    #[track_caller]
    pub fn assert_clean_exit(&self) {
        assert!(
            self.in_time && self.status.success(),
            "`openbox-agent run` did not exit cleanly after SIGTERM ({}, in time: {})\nstderr: {}",
            self.status,
            self.in_time,
            tail(&self.stderr_path, 6000)
        );
    }

    /// `summary.governance.<key>` as an integer.
    pub fn governance_stat(&self, key: &str) -> Option<u64> {
        self.summary.as_ref()?.get("governance")?.get(key)?.as_u64()
    }
}

/// support/gov_worker.py (workflows of support/gov_workflows.py) with the hook pointed
/// at `socket`.
pub struct GovWorker {
    proc: Proc,
}

impl GovWorker {
    pub fn start(
        env: &Env,
        logs: &Path,
        shared: &Shared,
        task_queue: &str,
        socket: &Path,
        extra: &[String],
        sdk_conventions: Option<&str>,
    ) -> GovWorker {
        let mut cmd = env.python(&env.script("gov_worker.py"));
        if let Some(c) = sdk_conventions {
            // The hook's own switch: the worker chooses its conventions in `hello`.
            cmd.env("OPENBOX_SDK_CONVENTIONS", c);
        }
        cmd.args(extra)
            .arg("--address")
            .arg(&shared.temporal)
            .arg("--task-queue")
            .arg(task_queue)
            .arg("--socket")
            .arg(socket)
            .env("OPENBOX_AGENT_SOCKET", socket)
            .current_dir(&env.scripts);
        let mut proc = Proc::spawn("worker", cmd, logs);
        proc.wait_for_line("`ready`", START_TIMEOUT, |l| l.starts_with("ready"));
        GovWorker { proc }
    }

    pub fn stderr_tail(&self) -> String {
        self.proc.stderr_tail()
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.proc.stderr.clone()
    }

    /// SIGTERM (clean shutdown), then its stderr.
    pub fn stop(mut self) -> WorkerOutput {
        let (status, _) = self.proc.stop(libc::SIGTERM, Duration::from_secs(30));
        WorkerOutput {
            status,
            stderr: self.proc.stderr_text(),
            stderr_path: self.proc.stderr.clone(),
        }
    }
}

/// One governance test's processes on the shared servers: a fake Core (optional), the
/// agent (restartable), and the worker. Field order is drop order: worker, agent, Core.
pub struct GovWorld {
    pub worker: Option<GovWorker>,
    pub agent: Option<GovAgent>,
    pub core: Option<FakeCore>,
    pub env: Env,
    pub shared: Shared,
    pub name: String,
    pub logs: PathBuf,
    /// Marker prefix of this run (`mk<8 hex>`).
    pub token: String,
    pub task_queue: String,
    pub socket: PathBuf,
    /// Where the activities write their files (and their `ran-…` marks).
    pub files: PathBuf,
    agents_started: usize,
    clients_run: std::cell::Cell<usize>,
    pub tmp: TempDir,
    /// The SDK conventions the worker's hook asks for (`None`: the agent's default).
    pub sdk_conventions: Option<&'static str>,
    /// The agent signs as [`TEST_AGENT_DID`] with this key file, and the fake Core
    /// requires it (see [`GovWorld::sign_requests`]).
    pub agent_key_file: Option<PathBuf>,
}

/// The OpenBox DID the signing tests register with the fake Core.
pub const TEST_AGENT_DID: &str = "did:aip:6d1f3c2b-8a4e-4f5d-9b7c-0e1a2b3c4d5e";

impl GovWorld {
    /// The shared servers and this test's directories; no process of its own yet.
    pub fn new(name: &str) -> GovWorld {
        let env = Env::get();
        let shared = shared(&env);
        let logs = logs_dir(name);
        let tmp = TempDir::new("gov");
        let files = tmp.join("files");
        fs::create_dir_all(&files).expect("creating the activities' file directory");
        let id = unique();
        GovWorld {
            worker: None,
            agent: None,
            core: None,
            socket: tmp.join("agent.sock"),
            task_queue: format!("tq-{name}-{id}"),
            token: format!("mk{id}"),
            env,
            shared,
            name: name.to_string(),
            logs,
            files,
            agents_started: 0,
            clients_run: std::cell::Cell::new(0),
            tmp,
            sdk_conventions: None,
            agent_key_file: None,
        }
    }

    /// Signed requests from here on: a fresh Ed25519 seed in a key file only the agent
    /// reads; the fake Core started next requires signatures by it, and
    /// [`GovWorld::signing_args`] gives the agent's flags.
    pub fn sign_requests(&mut self) {
        let seed: Vec<u8> = (0..32).map(|_| random_byte()).collect();
        let file = self.tmp.join("agent-key.b64");
        fs::write(&file, format!("{}\n", base64_std(&seed))).expect("writing the agent key file");
        fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod the agent key file");
        self.agent_key_file = Some(file);
    }

    /// `--agent-did … --agent-private-key-file …` when requests are signed.
    pub fn signing_args(&self) -> Vec<String> {
        match &self.agent_key_file {
            Some(file) => vec![
                "--agent-did".into(),
                TEST_AGENT_DID.into(),
                "--agent-private-key-file".into(),
                file.display().to_string(),
            ],
            None => vec![],
        }
    }

    /// Starts the fake Core (key [`FAKE_CORE_KEY`]) with `script`.
    pub fn start_core(&mut self, script: &Value) -> &FakeCore {
        let extra = match &self.agent_key_file {
            Some(file) => vec![
                "--agent-did".into(),
                TEST_AGENT_DID.into(),
                "--agent-key-file".into(),
                file.display().to_string(),
            ],
            None => vec![],
        };
        let core =
            FakeCore::start_with(&self.env, &self.logs, "core", FAKE_CORE_KEY, script, &extra);
        self.core.insert(core)
    }

    pub fn core(&self) -> &FakeCore {
        self.core.as_ref().expect("start_core() first")
    }

    /// The spool directory of this test (kept across agent restarts).
    pub fn spool_dir(&self) -> PathBuf {
        self.tmp.join("spool")
    }

    /// Starts an agent (`agent`, then `agent-2`, … in the logs) with `args`.
    pub fn start_agent(&mut self, args: &[String]) -> &mut GovAgent {
        assert!(self.agent.is_none(), "an agent already runs");
        self.agents_started += 1;
        let name = match self.agents_started {
            1 => "agent".to_string(),
            n => format!("agent-{n}"),
        };
        let agent = GovAgent::start(&self.env, &self.logs, &name, &self.socket, args);
        self.agent.insert(agent)
    }

    pub fn agent(&self) -> &GovAgent {
        self.agent.as_ref().expect("start_agent() first")
    }

    pub fn agent_mut(&mut self) -> &mut GovAgent {
        self.agent.as_mut().expect("start_agent() first")
    }

    pub fn stop_agent(&mut self) -> GovAgentReport {
        self.agent.take().expect("an agent runs").stop()
    }

    pub fn start_worker(&mut self) {
        self.start_worker_with(&[]);
    }

    /// Starts the worker with more arguments for support/gov_worker.py (e.g. `--plugin`).
    pub fn start_worker_with(&mut self, extra: &[String]) {
        assert!(self.worker.is_none(), "a worker already runs");
        self.worker = Some(GovWorker::start(
            &self.env,
            &self.logs,
            &self.shared,
            &self.task_queue,
            &self.socket,
            extra,
            self.sdk_conventions,
        ));
    }

    pub fn worker(&self) -> &GovWorker {
        self.worker.as_ref().expect("start_worker() first")
    }

    /// The marker of activity `i`: `<token>-NNN`.
    pub fn marker(&self, i: usize) -> String {
        format!("{}-{i:03}", self.token)
    }

    /// Workflow id `k` of this run.
    pub fn workflow_id(&self, k: usize) -> String {
        format!("wf-{}-{k}-{}", self.name, &self.token[2..])
    }

    /// `{"marker", "https_base", "pg_port", "dir"}` for activity `i`.
    pub fn item(&self, i: usize) -> Value {
        json!({
            "marker": self.marker(i),
            "https_base": format!("https://127.0.0.1:{}", self.shared.https_port),
            "pg_port": self.shared.pg_port,
            "dir": self.files.display().to_string(),
        })
    }

    /// Runs support/gov_client.py with `workflows` (`{"id", "workflow", "arg",
    /// "signal"?}`) and returns their outcomes in order (`{"id", "run_id", "ok",
    /// "result"|"error"}`).
    pub fn run(&self, workflows: &[Value], timeout: Duration) -> Vec<Value> {
        let n = self.clients_run.get() + 1;
        self.clients_run.set(n);
        let name = if n == 1 {
            "client".to_string()
        } else {
            format!("client-{n}")
        };
        let plan_path = self.logs.join(format!("{name}.plan.json"));
        fs::write(
            &plan_path,
            serde_json::to_vec_pretty(&json!({ "workflows": workflows })).unwrap(),
        )
        .expect("writing the plan");
        let mut cmd = self.env.python(&self.env.script("gov_client.py"));
        cmd.arg("--address")
            .arg(&self.shared.temporal)
            .arg("--task-queue")
            .arg(&self.task_queue)
            .arg("--plan")
            .arg(&plan_path)
            .arg("--timeout")
            .arg(timeout.as_secs().to_string());
        let mut proc = Proc::spawn(&name, cmd, &self.logs);
        let worker_tail = || {
            self.worker
                .as_ref()
                .map_or_else(String::new, GovWorker::stderr_tail)
        };
        let status = proc
            .wait(timeout + Duration::from_secs(30))
            .unwrap_or_else(|| {
                panic!(
                    "{name} did not finish within {timeout:?}\nstderr: {}\nworker stderr: {}",
                    proc.stderr_tail(),
                    worker_tail()
                )
            });
        assert!(
            status.success(),
            "{name} failed ({status}): no outcome for every workflow within {timeout:?}\nstderr: {}\nworker stderr: {}",
            proc.stderr_tail(),
            worker_tail()
        );
        let out: Value = serde_json::from_str(proc.stdout_text().trim()).unwrap_or_else(|e| {
            panic!(
                "{name}'s stdout is not JSON ({e}): {}",
                tail(&proc.stdout, 2000)
            )
        });
        out["workflows"].as_array().cloned().unwrap_or_default()
    }

    /// The attempts of activity `activity_id` that really ran their body (the `ran-…`
    /// files support/gov_worker.py's `echo`, `echo_dc` and `answer` create).
    pub fn ran_attempts(&self, activity_id: &str) -> Vec<u64> {
        let prefix = format!("ran-{activity_id}-");
        let mut out: Vec<u64> = fs::read_dir(&self.files)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix(&prefix)?.parse().ok())
            .collect();
        out.sort_unstable();
        out
    }

    /// Stops the worker, then the agent (if one runs), then the fake Core.
    pub fn finish(mut self) -> (Option<WorkerOutput>, Option<GovAgentReport>) {
        let worker = self.worker.take().map(GovWorker::stop);
        let agent = self.agent.take().map(GovAgent::stop);
        (worker, agent)
    }
}

/// Seconds since the Unix epoch of an RFC 3339 UTC time `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
pub fn rfc3339_utc_seconds(text: &str) -> Option<f64> {
    let t = text.strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut hms = time.split(':');
    let (h, mi) = (
        hms.next()?.parse::<i64>().ok()?,
        hms.next()?.parse::<i64>().ok()?,
    );
    let s: f64 = hms.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60) as f64 + s)
}

/// A random byte from the OS (the key of a test identity).
fn random_byte() -> u8 {
    use std::io::Read;
    let mut b = [0u8; 1];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("reading /dev/urandom");
    b[0]
}

/// Standard padded base64.
fn base64_std(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
