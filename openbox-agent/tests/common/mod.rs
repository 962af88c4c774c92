//! Harness for the integration tests: the test environment `cargo xtask test` sets up,
//! the fixture servers, and the agent run as a user runs it (`openbox-agent trace --json
//! -- COMMAND`), its JSON-lines output parsed into records.

// Each test binary (capture.rs, spans.rs) uses part of this module.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::STANDARD, Engine};
use openbox_testkit::fixtures;
pub use openbox_testkit::{env_path, workspace_root, Background, TempDir};
use serde_json::Value;

/// The agent's default capture limit per call (bytes).
pub const DEFAULT_CAPTURE_LIMIT: u64 = 16 * 1024;
/// The longest a traced command or a fixture's start-up may take before the test fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// What `cargo xtask test` provides (see xtask/src/env.rs).
pub struct TestEnv {
    pub python: PathBuf,
    pub support: PathBuf,
    pub pg_bin: PathBuf,
    pub agent: PathBuf,
}

impl TestEnv {
    /// The environment, including a built agent.
    pub fn get() -> TestEnv {
        let env = TestEnv::without_agent();
        assert!(
            env.agent.is_file(),
            "agent binary {} not found: run `cargo xtask test`, which builds it (or set OPENBOX_AGENT_BIN)",
            env.agent.display()
        );
        env
    }

    /// The environment for fixture-only checks: the agent need not be built.
    pub fn without_agent() -> TestEnv {
        let var = |name: &str| {
            std::env::var_os(name).map(PathBuf::from).unwrap_or_else(|| {
                panic!("{name} is not set: run `cargo xtask test`, which sets up the test environment")
            })
        };
        let agent = std::env::var_os("OPENBOX_AGENT_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target/release/openbox-agent"));
        let env = TestEnv {
            python: var("OPENBOX_TEST_PYTHON"),
            support: var("OPENBOX_TEST_SUPPORT"),
            pg_bin: var("OPENBOX_PG_BIN"),
            agent,
        };
        assert!(
            env.python.is_file(),
            "{} not found: run `cargo xtask test`, which sets up the test environment",
            env.python.display()
        );
        env
    }

    pub fn script(&self, name: &str) -> PathBuf {
        self.support.join(name)
    }

    /// `<venv python> <support>/<script>` followed by `args`.
    pub fn python_command(&self, script: &str, args: &[&str]) -> Vec<String> {
        let mut cmd = vec![
            self.python.display().to_string(),
            self.script(script).display().to_string(),
        ];
        cmd.extend(args.iter().map(|a| a.to_string()));
        cmd
    }
}

pub fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A fixture process running beside the test (not under the agent). Stopped with
/// SIGTERM on drop, so it can clean up (pg_server.py shuts PostgreSQL down).
/// tls_server.py: HTTPS (or plain HTTP) on 127.0.0.1, recording each connection's
/// plaintext under `record/conn-<k>.{in,out}`.
pub struct HttpServer {
    pub port: u16,
    pub record: TempDir,
    _process: Background,
}

impl HttpServer {
    pub fn start(env: &TestEnv, tls: bool) -> HttpServer {
        let record = TempDir::new("http-record");
        let mut cmd = fixtures::tls_server(&env.python, &env.support, tls, Some(record.path()), 0);
        let mut process = Background::spawn("tls_server.py", &mut cmd);
        let port = process.port();
        HttpServer {
            port,
            record,
            _process: process,
        }
    }

    pub fn peer(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Number of connections the server accepted.
    pub fn connections(&self) -> usize {
        fs::read_dir(self.record.path())
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".in"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// (bytes received, bytes sent) in plaintext on connection `k`.
    pub fn recorded(&self, k: usize) -> (Vec<u8>, Vec<u8>) {
        (
            read(&self.record.join(&format!("conn-{k}.in"))),
            read(&self.record.join(&format!("conn-{k}.out"))),
        )
    }
}

/// pg_server.py: a throwaway PostgreSQL cluster on 127.0.0.1, TLS only.
pub struct PgServer {
    pub port: u16,
    _process: Background,
}

impl PgServer {
    pub fn start(env: &TestEnv) -> PgServer {
        let mut cmd = fixtures::pg_server(&env.python, &env.support, &env.pg_bin, false, 0);
        let mut process = Background::spawn("pg_server.py", &mut cmd);
        let port = process.port();
        PgServer {
            port,
            _process: process,
        }
    }

    pub fn peer(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// What the agent printed for one run.
pub struct Trace {
    pub records: Vec<Value>,
    pub stderr: String,
    /// Where this run's stdout and stderr were saved, for a failing test's reader.
    pub saved: PathBuf,
}

/// Runs the agent with `args` to completion (bounded by RUN_TIMEOUT) and saves its
/// output under target/test-traces/<name>.{jsonl,stderr}.
pub fn run_agent<S: AsRef<OsStr>>(
    env: &TestEnv,
    name: &str,
    args: &[S],
) -> (ExitStatus, Vec<u8>, String, PathBuf) {
    run_agent_with(env, name, args, &[])
}

/// [`run_agent`] with more environment variables for the agent (test-only knobs).
pub fn run_agent_with<S: AsRef<OsStr>>(
    env: &TestEnv,
    name: &str,
    args: &[S],
    vars: &[(&str, &str)],
) -> (ExitStatus, Vec<u8>, String, PathBuf) {
    let mut cmd = Command::new(&env.agent);
    cmd.args(args)
        .envs(vars.iter().copied())
        // Keep the interpreter from writing .pyc files next to the fixtures.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (status, stdout, stderr) = run_bounded(&mut cmd, RUN_TIMEOUT);
    let dir = workspace_root().join("target/test-traces");
    let _ = fs::create_dir_all(&dir);
    let saved = dir.join(format!("{name}.jsonl"));
    let _ = fs::write(&saved, &stdout);
    let _ = fs::write(dir.join(format!("{name}.stderr")), &stderr);
    (status, stdout, stderr, saved)
}

/// `openbox-agent trace --json -- COMMAND...`; the run must succeed and end with a
/// summary record.
pub fn trace(env: &TestEnv, name: &str, command: &[String]) -> Trace {
    trace_with(env, name, &[], &[], command)
}

/// [`trace`] with more options for `trace` (before the `--`) and environment variables
/// for the agent.
pub fn trace_with(
    env: &TestEnv,
    name: &str,
    options: &[&str],
    vars: &[(&str, &str)],
    command: &[String],
) -> Trace {
    let mut args: Vec<String> = vec!["trace".into(), "--json".into(), "--raw".into()];
    args.extend(options.iter().map(|o| o.to_string()));
    args.push("--".into());
    args.extend(command.iter().cloned());
    let (status, stdout, stderr, saved) = run_agent_with(env, name, &args, vars);
    assert!(
        status.success(),
        "`openbox-agent trace --json -- {}` failed with {status}\nstderr:\n{stderr}",
        command.join(" ")
    );
    let mut records = Vec::new();
    for (i, line) in String::from_utf8_lossy(&stdout).lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "line {} of the agent's stdout is not JSON ({e}): {line:?} (the traced clients print nothing to stdout; see {})",
                i + 1,
                saved.display()
            )
        });
        assert!(
            value.get("type").and_then(Value::as_str).is_some(),
            "record without \"type\": {line}"
        );
        records.push(value);
    }
    let trace = Trace {
        records,
        stderr,
        saved,
    };
    assert_eq!(
        trace.records.last().map(|r| str_of(r, "type")),
        Some("summary"),
        "the last record must be the summary ({})",
        trace.saved.display()
    );
    trace
}

/// Runs `cmd` with piped stdout/stderr, killing it after `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> (ExitStatus, Vec<u8>, String) {
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr =
                String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).to_string();
            panic!("{cmd:?} did not finish within {timeout:?}; killed. stderr:\n{stderr}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).to_string();
    (status, stdout, stderr)
}

pub fn str_of<'a>(record: &'a Value, key: &str) -> &'a str {
    record
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("record has no string {key:?}: {record}"))
}

pub fn u64_of(record: &Value, key: &str) -> u64 {
    record
        .get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("record has no integer {key:?}: {record}"))
}

pub fn bool_of(record: &Value, key: &str) -> bool {
    record
        .get(key)
        .and_then(Value::as_bool)
        .unwrap_or_else(|| panic!("record has no boolean {key:?}: {record}"))
}

/// One `data` record.
#[derive(Debug, Clone)]
pub struct Segment {
    pub conn: String,
    pub tid: u64,
    pub seq: u64,
    pub bytes: Vec<u8>,
    pub truncated: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dir {
    Egress,
    Ingress,
}

impl Dir {
    fn as_str(self) -> &'static str {
        match self {
            Dir::Egress => "egress",
            Dir::Ingress => "ingress",
        }
    }
}

impl Trace {
    pub fn of_type<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.records
            .iter()
            .filter(move |r| str_of(r, "type") == kind)
    }

    pub fn summary(&self) -> &Value {
        self.records.last().expect("a summary record")
    }

    pub fn summary_u64(&self, key: &str) -> u64 {
        u64_of(self.summary(), key)
    }

    /// `conn` ids of `connect` (or `accept`) records with this peer, in output order.
    pub fn conns(&self, kind: &str, peer: &str) -> Vec<String> {
        self.of_type(kind)
            .filter(|r| str_of(r, "peer") == peer)
            .map(|r| str_of(r, "conn").to_string())
            .collect()
    }

    pub fn conns_of_kind(&self, kind: &str) -> Vec<String> {
        self.of_type(kind)
            .map(|r| str_of(r, "conn").to_string())
            .collect()
    }

    /// `data` records matching the filters, decoded and sorted by `seq`.
    pub fn segments(
        &self,
        peer: Option<&str>,
        conn: Option<&str>,
        dir: Dir,
        tls: bool,
    ) -> Vec<Segment> {
        let mut out: Vec<Segment> = self
            .of_type("data")
            .filter(|r| peer.is_none_or(|p| str_of(r, "peer") == p))
            .filter(|r| conn.is_none_or(|c| str_of(r, "conn") == c))
            .filter(|r| str_of(r, "direction") == dir.as_str() && bool_of(r, "tls") == tls)
            .map(|r| {
                let bytes = STANDARD
                    .decode(str_of(r, "data_b64"))
                    .unwrap_or_else(|e| panic!("data_b64 is not base64 ({e}): {r}"));
                assert_eq!(
                    bytes.len() as u64,
                    u64_of(r, "len"),
                    "\"len\" differs from the decoded data: {r}"
                );
                Segment {
                    conn: str_of(r, "conn").to_string(),
                    tid: u64_of(r, "tid"),
                    seq: u64_of(r, "seq"),
                    bytes,
                    truncated: u64_of(r, "truncated"),
                }
            })
            .collect();
        out.sort_by_key(|s| s.seq);
        out
    }

    /// The (conn, direction, tls) stream, reassembled by `seq`: it must start at 0,
    /// have no gap or overlap and nothing truncated.
    pub fn stream(&self, conn: &str, dir: Dir, tls: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for s in self.segments(None, Some(conn), dir, tls) {
            assert_eq!(
                s.seq,
                out.len() as u64,
                "conn {conn} {dir:?} tls={tls}: segment at seq {} but {} bytes so far ({})",
                s.seq,
                out.len(),
                self.saved.display()
            );
            assert_eq!(
                s.truncated,
                0,
                "conn {conn} {dir:?}: segment at seq {} truncated ({})",
                s.seq,
                self.saved.display()
            );
            out.extend_from_slice(&s.bytes);
        }
        out
    }

    /// Every data record's bytes for this peer, direction and tls flag, by seq, with no
    /// continuity check.
    pub fn all_bytes(&self, peer: &str, dir: Dir, tls: bool) -> Vec<u8> {
        self.segments(Some(peer), None, dir, tls)
            .into_iter()
            .flat_map(|s| s.bytes)
            .collect()
    }

    /// Count of records of each type, for failure messages.
    pub fn census(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for r in &self.records {
            *counts.entry(str_of(r, "type").to_string()).or_default() += 1;
        }
        format!("{counts:?} (full output: {})", self.saved.display())
    }
}

/// `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Shows bytes in failure messages without flooding the terminal.
pub fn preview(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(300)];
    format!(
        "{:?}{} ({} bytes)",
        String::from_utf8_lossy(shown),
        if bytes.len() > 300 { "…" } else { "" },
        bytes.len()
    )
}

/// Asserts two byte strings are equal, showing where they first differ.
#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    if actual == expected {
        return;
    }
    let at = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(actual.len().min(expected.len()));
    panic!(
        "{what}: differs at byte {at} (captured {} bytes, expected {})\ncaptured: {}\nexpected: {}",
        actual.len(),
        expected.len(),
        preview(&actual[at.saturating_sub(40)..]),
        preview(&expected[at.saturating_sub(40)..]),
    );
}

// ---------------------------------------------------------------------------------------
// Spans (`openbox-agent trace --json -- COMMAND`, without --raw) and the fixture servers
// the span tests use.
// ---------------------------------------------------------------------------------------

impl TestEnv {
    /// The SDK's virtualenv python (openbox-temporal-sdk-python 1.0.0 and its OTel
    /// instrumentations).
    pub fn sdk_python(&self) -> PathBuf {
        env_path("OPENBOX_SDK_PYTHON")
    }
}

/// A fixture server script (support/<script>) that prints its port and stops on SIGTERM.
pub struct Server {
    pub port: u16,
    _process: Background,
}

impl Server {
    pub fn start(env: &TestEnv, script: &str, args: &[String]) -> Server {
        let mut cmd = Command::new(&env.python);
        cmd.arg(env.script(script)).args(args);
        Server::spawn(script, cmd)
    }

    fn spawn(name: &str, mut cmd: Command) -> Server {
        let mut process = Background::spawn(name, &mut cmd);
        let port = process.port();
        Server {
            port,
            _process: process,
        }
    }

    /// pg_server.py: plain TCP and TLS both accepted (--allow-plain); `port` 0 = free.
    pub fn postgres(env: &TestEnv, port: u16) -> Server {
        Server::spawn(
            "pg_server.py",
            fixtures::pg_server(&env.python, &env.support, &env.pg_bin, true, port),
        )
    }

    pub fn mariadb(env: &TestEnv) -> Server {
        let dir = env_path("OPENBOX_MARIADB_BIN_DIR");
        Server::start(
            env,
            "mariadb_server.py",
            &["--bin-dir".into(), dir.display().to_string()],
        )
    }

    pub fn redis(env: &TestEnv) -> Server {
        let bin = env_path("OPENBOX_REDIS_SERVER");
        Server::start(
            env,
            "redis_server.py",
            &["--redis-server".into(), bin.display().to_string()],
        )
    }

    pub fn ferretdb(env: &TestEnv) -> Server {
        let bin = env_path("OPENBOX_FERRETDB_BIN");
        Server::start(
            env,
            "ferretdb_server.py",
            &["--ferretdb".into(), bin.display().to_string()],
        )
    }

    /// tls_server.py on `port` (0 = free): HTTPS, or plain HTTP with `tls` false.
    pub fn http(env: &TestEnv, tls: bool, port: u16) -> Server {
        Server::spawn(
            "tls_server.py",
            fixtures::tls_server(&env.python, &env.support, tls, None, port),
        )
    }
}

/// What `openbox-agent trace --json -- COMMAND` printed: spans on stdout, the summary on
/// stderr.
pub struct SpanRun {
    pub spans: Vec<Value>,
    pub summary: Value,
    pub stderr: String,
    pub saved: PathBuf,
    /// Wall-clock window of the run (Unix ns): every span must fall inside it.
    pub started_ns: u64,
    pub ended_ns: u64,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Runs `openbox-agent trace --json -- COMMAND…`, which must exit as COMMAND did
/// (`expect_code`), and parses and checks its output: every stdout line is a span in
/// the SDK's format (see [`check_span_shape`]), the last stderr line is the summary.
pub fn trace_spans_exit(
    env: &TestEnv,
    name: &str,
    command: &[String],
    expect_code: i32,
) -> SpanRun {
    let mut args: Vec<String> = vec!["--".into()];
    args.extend(command.iter().cloned());
    spans_of_run(env, name, &args, expect_code)
}

fn spans_of_run(env: &TestEnv, name: &str, rest: &[String], expect_code: i32) -> SpanRun {
    let mut args: Vec<String> = vec!["trace".into(), "--json".into()];
    args.extend(rest.iter().cloned());
    let started_ns = now_ns();
    let (status, stdout, stderr, saved) = run_agent(env, name, &args);
    let ended_ns = now_ns();
    assert_eq!(
        status.code(),
        Some(expect_code),
        "`openbox-agent {}` exited with {status}, expected {expect_code}\nstderr:\n{stderr}",
        args.join(" ")
    );
    let mut spans = Vec::new();
    for (i, line) in String::from_utf8_lossy(&stdout).lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "line {} of the agent's stdout is not JSON ({e}): {line:?} (see {})",
                i + 1,
                saved.display()
            )
        });
        check_span_shape(&value);
        spans.push(value);
    }
    let summary_line = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| {
            panic!("the agent printed nothing on stderr; the summary belongs there")
        });
    let summary: Value = serde_json::from_str(summary_line).unwrap_or_else(|e| {
        panic!("the last stderr line is not the JSON summary ({e}): {summary_line:?}")
    });
    assert_eq!(
        summary.get("type").and_then(Value::as_str),
        Some("summary"),
        "the last stderr line is not the summary: {summary_line}"
    );
    let run = SpanRun {
        spans,
        summary,
        stderr,
        saved,
        started_ns,
        ended_ns,
    };
    run.check_ids_and_times();
    run
}

pub fn trace_spans(env: &TestEnv, name: &str, command: &[String]) -> SpanRun {
    trace_spans_exit(env, name, command, 0)
}

/// `openbox-agent trace --json ARGS…`: ARGS holds the agent's options, then `--` and
/// the command.
pub fn trace_spans_with(env: &TestEnv, name: &str, args: &[String]) -> SpanRun {
    spans_of_run(env, name, args, 0)
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// One span has every field of the SDK's span JSON (openbox-core-protocol.md §3.1),
/// with the right types.
#[track_caller]
pub fn check_span_shape(s: &Value) {
    let o = s
        .as_object()
        .unwrap_or_else(|| panic!("a span is not a JSON object: {s}"));
    let id = o.get("span_id").and_then(Value::as_str).unwrap_or("");
    assert!(
        is_hex(id, 16),
        "span_id must be 16 lowercase hex characters: {s}"
    );
    let tid = o.get("trace_id").and_then(Value::as_str).unwrap_or("");
    assert!(
        is_hex(tid, 32),
        "trace_id must be 32 lowercase hex characters: {s}"
    );
    match o.get("parent_span_id") {
        Some(Value::Null) => {}
        Some(Value::String(p)) if is_hex(p, 16) => {}
        other => panic!("parent_span_id must be null or 16 hex characters, is {other:?}: {s}"),
    }
    assert!(
        o.get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty()),
        "span without a name: {s}"
    );
    let kind = o.get("kind").and_then(Value::as_str).unwrap_or("");
    assert!(
        ["INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"].contains(&kind),
        "kind {kind:?} is not an OTel kind name: {s}"
    );
    let start = o.get("start_time").and_then(Value::as_u64);
    let end = o.get("end_time").and_then(Value::as_u64);
    let (Some(start), Some(end)) = (start, end) else {
        panic!("start_time and end_time must be integers (ns): {s}")
    };
    assert!(start <= end, "start_time after end_time: {s}");
    assert_eq!(
        o.get("duration_ns").and_then(Value::as_u64),
        Some(end - start),
        "duration_ns must be end_time - start_time: {s}"
    );
    assert!(
        o.get("attributes").is_some_and(Value::is_object),
        "attributes must be an object: {s}"
    );
    let status = o
        .get("status")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("no status object: {s}"));
    let code = status.get("code").and_then(Value::as_str).unwrap_or("");
    assert!(
        ["UNSET", "OK", "ERROR"].contains(&code),
        "status.code {code:?}: {s}"
    );
    assert!(
        matches!(
            status.get("description"),
            Some(Value::Null | Value::String(_))
        ),
        "status.description must be a string or null: {s}"
    );
    assert!(
        o.get("events").is_some_and(Value::is_array),
        "events must be an array: {s}"
    );
    for key in ["request_body", "response_body"] {
        assert!(
            o.get(key).is_none_or(Value::is_string),
            "{key} must be a string when present: {s}"
        );
    }
    for key in ["request_headers", "response_headers"] {
        if let Some(h) = o.get(key) {
            let h = h
                .as_object()
                .unwrap_or_else(|| panic!("{key} must be an object: {s}"));
            for (name, value) in h {
                assert_eq!(
                    name,
                    &name.to_ascii_lowercase(),
                    "{key} names must be lowercase: {s}"
                );
                assert!(value.is_string(), "{key} values must be strings: {s}");
            }
        }
    }
}

impl SpanRun {
    fn check_ids_and_times(&self) {
        let mut ids = std::collections::HashSet::new();
        for s in &self.spans {
            assert!(
                ids.insert(str_of(s, "span_id").to_string()),
                "span_id {} appears twice ({})",
                str_of(s, "span_id"),
                self.saved.display()
            );
            let (start, end) = (u64_of(s, "start_time"), u64_of(s, "end_time"));
            // The kernel's clock is converted to wall-clock time: allow 2 s of skew.
            let slack = 2_000_000_000;
            assert!(
                start + slack >= self.started_ns && end <= self.ended_ns + slack,
                "span outside the run's wall-clock window [{}, {}]: {s}",
                self.started_ns,
                self.ended_ns
            );
        }
        for s in &self.spans {
            if let Some(p) = s.get("parent_span_id").and_then(Value::as_str) {
                assert!(
                    ids.contains(p),
                    "parent_span_id {p} names no span of this run: {s}"
                );
            }
        }
    }

    /// Spans whose `net.peer.port` attribute is `port`, in start order.
    pub fn on_port(&self, port: u16) -> Vec<&Value> {
        let mut v: Vec<&Value> = self
            .spans
            .iter()
            .filter(|s| s["attributes"]["net.peer.port"].as_u64() == Some(port as u64))
            .collect();
        v.sort_by_key(|s| u64_of(s, "start_time"));
        v
    }

    /// `file.open` spans whose path is under `dir`, in start order.
    pub fn file_opens_under(&self, dir: &Path) -> Vec<&Value> {
        let prefix = format!("{}/", dir.display());
        let mut v: Vec<&Value> = self
            .spans
            .iter()
            .filter(|s| str_of(s, "name") == "file.open")
            .filter(|s| {
                s["attributes"]["file.path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(&prefix))
            })
            .collect();
        v.sort_by_key(|s| u64_of(s, "start_time"));
        v
    }

    /// Spans whose parent is `span`, in start order.
    pub fn children_of(&self, span: &Value) -> Vec<&Value> {
        let id = str_of(span, "span_id");
        let mut v: Vec<&Value> = self
            .spans
            .iter()
            .filter(|s| s["parent_span_id"].as_str() == Some(id))
            .collect();
        v.sort_by_key(|s| u64_of(s, "start_time"));
        v
    }

    /// One line per span (name, key attributes, status), for failure messages.
    pub fn show(&self, spans: &[&Value]) -> String {
        let mut out = String::new();
        for s in spans {
            out.push_str(&format!(
                "  {} {} {} status={}\n",
                str_of(s, "name"),
                str_of(s, "kind"),
                s["attributes"],
                s["status"]
            ));
        }
        format!("{out}(full output: {})", self.saved.display())
    }
}

/// `openbox-agent run`, started the one way every daemon test starts it: listening on
/// `socket`, its stderr in a file, waited for until the socket takes connections.
/// `configure` adds the test's own arguments, environment and pre-exec steps.
pub struct RunningAgent {
    child: Option<std::process::Child>,
    pub socket: PathBuf,
    pub stderr: PathBuf,
}

impl RunningAgent {
    pub fn start(
        env: &TestEnv,
        socket: &Path,
        stderr: &Path,
        configure: impl FnOnce(&mut Command),
    ) -> RunningAgent {
        let mut cmd = Command::new(&env.agent);
        cmd.arg("run").arg("--socket").arg(socket);
        configure(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(stderr).expect("creating the agent's stderr file"))
            .spawn()
            .expect("starting openbox-agent run");
        let agent = RunningAgent {
            child: Some(child),
            socket: socket.to_path_buf(),
            stderr: stderr.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        // A socket file left by a killed agent refuses connections until this one binds.
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the agent did not listen on {} within 30 s; its stderr:\n{}",
                socket.display(),
                agent.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, wait for a successful exit, and the summary it printed last on stderr.
    pub fn stop(&mut self) -> Value {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        let err = self.stderr_text();
        assert!(status.success(), "the agent exited with {status}: {err}");
        let last = err.lines().last().unwrap_or_default();
        serde_json::from_str(last)
            .unwrap_or_else(|_| panic!("no summary at the end of stderr:\n{err}"))
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
