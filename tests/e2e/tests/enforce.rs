//! Enforcement before the operation (`openbox-agent run --enforce`), end to end: a real
//! Temporal dev server, a real Python worker with the hook, the agent and the fake
//! OpenBox Core. The activities (support/enforce_ops.py) are sync, so each runs on an
//! executor thread whose seccomp filter holds its calls until the agent answers, but
//! one, async, held on the event-loop thread.
//!
//! Checked: Core's BLOCK at a file's `started` hook event means the file is never
//! created; a BLOCK on a plain-HTTP or HTTPS request by URL (sync clients, and async ones
//! whose TLS is asyncio's memory BIO) means the server never receives it, and on a SQL
//! statement (plain or TLS) that the server never runs it;
//! both fail the activity with SDK 2.0's `GovernanceBlock`, and another activity of the
//! worker runs normally. A HALT mid-activity denies every later connection of the
//! `curl` loop the activity started (a subprocess: the filter is inherited), and the
//! denials are counted.

use std::{
    io::Write,
    net::TcpListener,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use openbox_e2e::{read_request_head, GovAgentReport, GovWorld, Proc};
use serde_json::{json, Value};

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// A plain-HTTP server that records the request line of every request it receives and
/// answers `200 ok`.
struct Recorder {
    port: u16,
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Recorder {
    fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the recording server");
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let record = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let record = record.clone();
                std::thread::spawn(move || {
                    let mut conn = conn;
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                    let buf = read_request_head(&mut conn);
                    if buf.is_empty() {
                        return;
                    }
                    let line = String::from_utf8_lossy(&buf)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    record.lock().unwrap().push((Instant::now(), line));
                    let _ = conn.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    );
                });
            }
        });
        Recorder { port, seen }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn lines(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }
}

/// Core, an agent with `--enforce` (and `agent_flags`), a worker with `conventions`.
fn world(
    name: &str,
    script: &Value,
    conventions: Option<&'static str>,
    agent_flags: &[&str],
) -> GovWorld {
    let mut w = GovWorld::new(name);
    w.sdk_conventions = conventions;
    w.start_core(script);
    let args = agent_args(&w, agent_flags);
    w.start_agent(&args);
    w.start_worker();
    w
}

/// The agent's arguments in `world`: Core's, a spool directory, `--enforce` and
/// `agent_flags`.
fn agent_args(w: &GovWorld, agent_flags: &[&str]) -> Vec<String> {
    let mut args = w.core().agent_args();
    args.extend(["--spool-dir".into(), w.spool_dir().display().to_string()]);
    args.push("--enforce".into());
    args.extend(agent_flags.iter().map(|f| f.to_string()));
    args
}

fn step(w: &GovWorld, k: usize, i: usize, activity: &str, arg: Value) -> Value {
    json!({"id": w.workflow_id(k), "workflow": "GovSteps",
        "arg": {"steps": [{"activity": activity, "args": [arg], "activity_id": w.marker(i)}],
                "max_attempts": 1, "retry_ms": 200}})
}

fn outcome<'a>(outcomes: &'a [Value], id: &str) -> &'a Value {
    outcomes
        .iter()
        .find(|o| o["id"] == json!(id))
        .unwrap_or_else(|| panic!("no outcome for workflow {id}: {outcomes:?}"))
}

/// The ApplicationError of a failed workflow's chain, as (type, message, non_retryable).
fn app_error(o: &Value) -> Option<(String, String, bool)> {
    let chain = o["error"]["chain"].as_array()?;
    let app = chain
        .iter()
        .find(|l| l["class"] == json!("ApplicationError"))?;
    Some((
        app["type"].as_str()?.to_string(),
        app["message"].as_str()?.to_string(),
        app["non_retryable"] == json!(true),
    ))
}

fn item(w: &GovWorld, i: usize, extra: Value) -> Value {
    let mut it = w.item(i);
    for (k, v) in extra.as_object().unwrap() {
        it[k] = v.clone();
    }
    it
}

fn started_hooks(w: &GovWorld, needle: &str) -> Vec<Value> {
    w.core()
        .evaluated(200)
        .into_iter()
        .filter(|b| b["hook_trigger"] == json!(true))
        .filter(|b| b["spans"][0]["stage"] == json!("started"))
        .filter(|b| b["spans"].to_string().contains(needle))
        .collect()
}

/// Core answers `verdict` (with `reason`) to the hook events whose spans match the
/// regular expression `spans`, and allows everything else.
fn decide_on(w: &GovWorld, spans: &str, verdict: &str, reason: &str) {
    w.core().set_script(&json!({"default": {"verdict": "allow"},
        "rules": [{"match": {"hook_trigger": true, "spans": format!("re:{spans}")},
                   "body": {"verdict": verdict, "reason": reason}}]}));
}

/// Stops the worker and the agent, which must exit cleanly; its report.
fn finish_clean(w: GovWorld) -> GovAgentReport {
    let (_, agent) = w.finish();
    let agent = agent.expect("the agent ran");
    agent.assert_clean_exit();
    agent
}

/// A problem unless the workflow `o` failed with a non-retryable ApplicationError of
/// type `ty` whose message holds `msg`.
fn check_failure(p: &mut Vec<String>, what: &str, o: &Value, ty: &str, msg: &str) {
    match app_error(o) {
        Some((t, m, true)) if t == ty && m.contains(msg) => {}
        other => p.push(format!(
            "{what}: expected {ty} with \"{msg}\", got {other:?} ({o})"
        )),
    }
}

/// Fails with every problem found, pointing at Core's record.
fn assert_no_problems(p: &[String], record: &Path) {
    assert!(
        p.is_empty(),
        "{} problem(s) (Core's record: {}):\n{}",
        p.len(),
        record.display(),
        p.join("\n")
    );
}

/// Core blocks a file write at its `started` hook event: the file is never created,
/// the activity fails with `GovernanceBlock`; the worker's next activity (on the same
/// executor threads) writes its own file normally.
#[test]
fn a_blocked_file_write_never_creates_the_file() {
    let w = world(
        "a_blocked_file_write_never_creates_the_file",
        &json!({"default": {"verdict": "allow"}}),
        Some("2.0"),
        &[],
    );
    let blocked = format!("{}.txt", w.marker(0));
    decide_on(&w, &blocked, "block", "no writing there");
    let outcomes = w.run(
        &[
            step(&w, 0, 0, "enf_write", w.item(0)),
            step(&w, 1, 1, "enf_write", w.item(1)),
        ],
        RUN_TIMEOUT,
    );
    let (bad, good) = (
        outcome(&outcomes, &w.workflow_id(0)).clone(),
        outcome(&outcomes, &w.workflow_id(1)).clone(),
    );
    let blocked_path = w.files.join(format!("{}.txt", w.marker(0)));
    let allowed_path = w.files.join(format!("{}.txt", w.marker(1)));
    // Before finish(): it removes the files directory.
    let (blocked_exists, allowed_exists) = (blocked_path.exists(), allowed_path.exists());
    let hooks = started_hooks(&w, &blocked);
    let record = w.core().record.clone();
    finish_clean(w);

    let mut p = Vec::new();
    if blocked_exists {
        p.push(format!(
            "{} exists: the blocked write happened",
            blocked_path.display()
        ));
    }
    check_failure(
        &mut p,
        "the blocked activity",
        &bad,
        "GovernanceBlock",
        "Governance block: no writing there",
    );
    if good["ok"] != json!(true) || !allowed_exists {
        p.push(format!(
            "the other activity: {good}, file {} exists: {allowed_exists}",
            allowed_path.display()
        ));
    }
    if hooks.len() != 1
        || hooks[0]["spans"][0]["file_path"] != json!(blocked_path.display().to_string())
    {
        p.push(format!(
            "expected one started file_operation hook event for {}, got {hooks:?}",
            blocked_path.display()
        ));
    }
    assert_no_problems(&p, &record);
}

/// Core blocks a plain-HTTP request by URL at its `started` hook event: the server never
/// receives it, the activity fails with `GovernanceBlock`; another activity of the worker
/// requests another URL of the same server normally.
#[test]
fn a_blocked_http_request_never_reaches_the_server() {
    blocked_plain_http(
        "a_blocked_http_request_never_reaches_the_server",
        "enf_http",
        "not that URL",
    );
}

/// A HALT mid-activity, triggered by the activity right after the first request of its
/// `curl` loop succeeded (not after a fixed time: on a loaded machine starting `curl`
/// alone can take longer): the loop (a subprocess started before the HALT) gets
/// connection errors from then on and the server receives none of its later
/// requests (curl is refused its connection, or cannot start at all: its loader's opens
/// are denied); the activity cannot open a file even for reading, which it could before
/// the HALT, nor connect to the server itself; it fails with `GovernanceHalt`; another activity of the worker runs
/// normally afterwards.
#[test]
fn after_a_halt_the_activitys_curl_loop_cannot_connect() {
    let server = Recorder::start();
    let w = world(
        "after_a_halt_the_activitys_curl_loop_cannot_connect",
        &json!({"default": {"verdict": "allow"}}),
        None,
        &["--hook-events"],
    );
    let (m0, m1) = (w.marker(0), w.marker(1));
    let halt_file = format!("{m0}-halt.txt");
    decide_on(&w, &halt_file, "halt", "stop everything");
    let loop_url = format!("{}/loop/{m0}", server.url());
    let outcomes = w.run(
        &[step(
            &w,
            0,
            0,
            "enf_curl_loop",
            item(&w, 0, json!({"url": loop_url, "n": 30})),
        )],
        RUN_TIMEOUT,
    );
    let halted = outcome(&outcomes, &w.workflow_id(0)).clone();
    let after = w.run(
        &[step(
            &w,
            1,
            1,
            "enf_http",
            item(
                &w,
                1,
                json!({"url": format!("{}/after/{m1}", server.url())}),
            ),
        )],
        RUN_TIMEOUT,
    );
    let good = outcome(&after, &w.workflow_id(1)).clone();
    let record = w.core().record.clone();
    let halt_path = w.files.join(&halt_file);
    let halt_exists = halt_path.exists();
    let worker_log = std::fs::read_to_string(w.worker().stderr_path()).unwrap_or_default();
    let agent = finish_clean(w);

    let seen = server.lines();
    let loop_seen: Vec<&String> = seen
        .iter()
        .filter(|l| l.contains(&format!("/loop/{m0}/")))
        .collect();
    let log_text = agent.stderr.clone();
    let mut p = Vec::new();
    check_failure(
        &mut p,
        "the halted activity",
        &halted,
        "GovernanceHalt",
        "stop everything",
    );
    if halt_exists {
        p.push(format!(
            "{} exists: the halting write happened",
            halt_path.display()
        ));
    }
    if loop_seen.is_empty() || loop_seen.len() >= 30 {
        p.push(format!("the server received {} of the loop's 30 requests, expected some before the HALT and none after: {loop_seen:?}", loop_seen.len()));
    }
    // The loop's own account: every request the server did not get failed in curl
    // (HTTP code 000, a non-zero exit), and there were such requests.
    let prefix = format!("enf_curl_loop {m0}: ");
    let lines: Vec<Vec<String>> = worker_log
        .lines()
        .filter_map(|l| l.split_once(&prefix).map(|(_, rest)| rest))
        .map(|l| l.split(' ').map(str::to_string).collect())
        .collect();
    if lines.len() != 30 {
        p.push(format!(
            "the curl loop logged {} lines, expected 30",
            lines.len()
        ));
    }
    let mut refused = 0;
    for l in &lines {
        let got = loop_seen
            .iter()
            .any(|s| s.contains(&format!("/loop/{m0}/{} ", l[0])));
        match (
            got,
            l.get(1).map(String::as_str),
            l.get(2).map(String::as_str),
        ) {
            (true, Some("200"), Some("0")) => {}
            // A request after the HALT: curl's connect is refused (000), or curl cannot
            // even start — its loader's opens are denied too (no code, exit 127).
            (false, Some("000" | ""), Some(exit)) if exit != "0" => refused += 1,
            _ => p.push(format!("curl loop line {l:?} (the server got it: {got})")),
        }
    }
    if refused == 0 {
        p.push("no request of the curl loop failed after the HALT".to_string());
    }
    // Sticky for every open: the halted activity cannot even open a file for reading,
    // which it could before.
    let read = format!(
        "enf_curl_loop_read {m0}: before ok, after PermissionError: Operation not permitted; connect ConnectionRefusedError"
    );
    if !worker_log.contains(&read) {
        let got: Vec<&str> = worker_log
            .lines()
            .filter(|l| l.contains("enf_curl_loop_read"))
            .collect();
        p.push(format!(
            "expected \"{read}\" in the worker's log, got {got:?}"
        ));
    }
    if good["ok"] != json!(true) || good["result"][0]["body"] != json!("ok") {
        p.push(format!("the activity after the HALT: {good}"));
    }
    if !log_text.contains("operations_denied") {
        p.push("the agent's log does not report the denied calls (operations_denied)".to_string());
    }
    assert_no_problems(&p, &record);
}

/// HALT is sticky for what an async activity's event loop sends on its behalf between
/// its steps: an HTTPS upload to a slowly reading server, encrypted by the activity's
/// step into asyncio's memory BIO and sent by the loop's callbacks as the server reads,
/// is cut when Core halts the activity (on a file write made while the upload is on its
/// way): the server receives part of the body, not all of it, and the upload fails.
#[test]
fn after_a_halt_an_async_activitys_upload_on_its_way_is_cut() {
    let w = world(
        "after_a_halt_an_async_activitys_upload_on_its_way_is_cut",
        &json!({"default": {"verdict": "allow"}}),
        None,
        &["--hook-events"],
    );
    let m0 = w.marker(0);
    decide_on(&w, &format!("{m0}-halt.txt"), "halt", "stop the upload");
    let record = w.logs.join("https-received");
    let (mut server, port) = https_recorder(&w, &record);
    let size: usize = 4 << 20;
    let url = format!("https://127.0.0.1:{port}/trickle/10/{m0}");
    let outcomes = w.run(
        &[step(
            &w,
            0,
            0,
            "enf_async_upload",
            item(
                &w,
                0,
                json!({"url": url, "size": size, "halt_after_s": 0.5}),
            ),
        )],
        RUN_TIMEOUT,
    );
    let halted = outcome(&outcomes, &w.workflow_id(0)).clone();
    let core_record = w.core().record.clone();
    let worker_log = std::fs::read_to_string(w.worker().stderr_path()).unwrap_or_default();
    let agent = finish_clean(w);
    server.stop(libc::SIGTERM, Duration::from_secs(10));
    let got = received(&record);
    let body = got.bytes().filter(|&b| b == b'u').count();
    let mut p = Vec::new();
    check_failure(
        &mut p,
        "the halted activity",
        &halted,
        "GovernanceHalt",
        "stop the upload",
    );
    if !got.contains(&format!("POST /trickle/10/{m0} ")) {
        p.push(format!(
            "the server never received the upload's request (body bytes: {body})"
        ));
    }
    if body == 0 || body >= size {
        p.push(format!("the server received {body} of the upload's {size} body bytes: expected some before the HALT and not all"));
    }
    let line = worker_log
        .lines()
        .find_map(|l| l.split_once(&format!("enf_async_upload {m0}: ")))
        .map(|(_, rest)| rest.to_string())
        .unwrap_or_default();
    if !line.starts_with("halt write PermissionError") || !line.contains("upload failed") {
        p.push(format!(
            "expected the halting write denied and the upload failed in the worker's log, got {line:?}"
        ));
    }
    if !agent.stderr.contains("operations_denied") {
        p.push("the agent's log does not report the denied calls (operations_denied)".to_string());
    }
    assert_no_problems(&p, &core_record);
}

/// Core blocks a SQL statement (a psycopg2 query on a plain PostgreSQL connection) at its
/// `started` hook event: the server never runs it — the table it would create does not
/// exist afterwards, as another activity asks the same server — and the activity fails
/// with `GovernanceBlock`.
#[test]
fn a_blocked_sql_statement_never_reaches_the_server() {
    blocked_sql(
        "a_blocked_sql_statement_never_reaches_the_server",
        "disable",
    );
}

/// The same over TLS (`sslmode=require`): libpq's `SSL_write` sends the ciphertext from
/// within the call, and the agent reads the query from its plaintext.
#[test]
fn a_blocked_sql_statement_over_tls_never_reaches_the_server() {
    blocked_sql(
        "a_blocked_sql_statement_over_tls_never_reaches_the_server",
        "require",
    );
}

/// Core blocks `CREATE TABLE blocked_<token>` made by psycopg2 with `sslmode`; a second
/// activity then asks the server whether the table exists.
fn blocked_sql(name: &str, sslmode: &str) {
    let w = world(
        name,
        &json!({"default": {"verdict": "allow"}}),
        Some("2.0"),
        &[],
    );
    let mut cmd = openbox_testkit::fixtures::pg_server(
        &w.env.python,
        &w.env.fixtures,
        &w.env.pg_bin,
        true,
        0,
    );
    cmd.env("PYTHONUNBUFFERED", "1");
    let mut pg = Proc::spawn("postgres-plain", cmd, &w.logs);
    let port = pg.port();
    let table = format!("blocked_{}", &w.token[2..]);
    decide_on(
        &w,
        &format!("CREATE TABLE {table}"),
        "block",
        "no new tables",
    );
    let blocked = w.run(
        &[step(
            &w,
            0,
            0,
            "enf_sql",
            item(
                &w,
                0,
                json!({"pg_plain_port": port, "sslmode": sslmode, "sql": format!("CREATE TABLE {table} (x int)")}),
            ),
        )],
        RUN_TIMEOUT,
    );
    let check = w.run(
        &[step(&w, 1, 1, "enf_sql", item(&w, 1, json!({"pg_plain_port": port, "sslmode": sslmode, "sql": format!("SELECT to_regclass('{table}')::text")})))],
        RUN_TIMEOUT,
    );
    let (bad, good) = (
        outcome(&blocked, &w.workflow_id(0)).clone(),
        outcome(&check, &w.workflow_id(1)).clone(),
    );
    let hooks = started_hooks(&w, &format!("CREATE TABLE {table}"));
    let record = w.core().record.clone();
    finish_clean(w);
    pg.stop(libc::SIGTERM, Duration::from_secs(10));

    let mut p = Vec::new();
    check_failure(
        &mut p,
        "the blocked activity",
        &bad,
        "GovernanceBlock",
        "Governance block: no new tables",
    );
    if good["ok"] != json!(true) || good["result"][0]["value"] != Value::Null {
        p.push(format!("the server has the table the blocked statement would create (or the check failed): {good}"));
    }
    if hooks.len() != 1
        || hooks[0]["spans"][0]["db_statement"] != json!(format!("CREATE TABLE {table} (x int)"))
        || hooks[0]["spans"][0]["hook_type"] != json!("db_query")
    {
        p.push(format!(
            "expected one started db_query hook event for the CREATE TABLE, got {hooks:?}"
        ));
    }
    assert_no_problems(&p, &record);
}

/// tls_server.py (HTTPS, self-signed) recording each connection's received plaintext in
/// `dir` (`conn-<k>.in`): what the server got, whatever the client saw.
fn https_recorder(w: &GovWorld, dir: &std::path::Path) -> (Proc, u16) {
    let mut cmd =
        openbox_testkit::fixtures::tls_server(&w.env.python, &w.env.fixtures, true, Some(dir), 0);
    cmd.env("PYTHONUNBUFFERED", "1");
    let mut proc = Proc::spawn("https-recorder", cmd, &w.logs);
    let port = proc.port();
    (proc, port)
}

/// Everything the recording server received, over all connections.
fn received(dir: &std::path::Path) -> String {
    let mut all = String::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "in") {
            all.push_str(&String::from_utf8_lossy(
                &std::fs::read(e.path()).unwrap_or_default(),
            ));
        }
    }
    all
}

/// Core blocks HTTPS requests by URL at their `started` hook event, with `requests` and
/// with httpx's sync client: the held call is the ciphertext write, and the agent reads
/// the plaintext `SSL_write` is encrypting. The server never receives the blocked
/// requests (its record of every connection's plaintext has none of them), each blocked
/// activity fails with `GovernanceBlock`, and other URLs of the same server, with the same
/// clients, go through.
#[test]
fn a_blocked_https_request_never_reaches_the_server() {
    blocked_https(
        "a_blocked_https_request_never_reaches_the_server",
        "enf_https",
        ["requests", "httpx"],
    );
}

/// The same for an async activity, with aiohttp and httpx's `AsyncClient`: asyncio's TLS
/// encrypts into a memory BIO (`SSL_write` returns before any byte is sent) and the
/// event loop sends the ciphertext afterwards, outside any libssl call; the agent finds
/// the plaintext that ciphertext carries from the write's record in the kernel.
#[test]
fn an_async_activitys_blocked_https_request_never_reaches_the_server() {
    blocked_https(
        "an_async_activitys_blocked_https_request_never_reaches_the_server",
        "enf_aiohttp",
        ["aiohttp", "httpx"],
    );
}

/// The same for a Python process an async activity starts (aiohttp in it): the process
/// inherits the activity and the event-loop thread's filter, and its memory-BIO writes
/// are kept like the worker's.
#[test]
fn an_async_activitys_subprocess_blocked_https_request_never_reaches_the_server() {
    blocked_https(
        "an_async_activitys_subprocess_blocked_https_request_never_reaches_the_server",
        "enf_aiohttp",
        ["subprocess", "aiohttp"],
    );
}

/// Core blocks `GET https://…/blocked/<marker>` at its `started` hook event, made by
/// `activity` with each of `clients` (cases 0 and 1), and allows `/fine/` (cases 2 and 3,
/// the same clients): the recording TLS server never receives the blocked requests, each
/// blocked activity fails with `GovernanceBlock` and one `started` hook event names its
/// URL; the allowed ones get the server's answer.
fn blocked_https(name: &str, activity: &str, clients: [&'static str; 2]) {
    let w = world(
        name,
        &json!({"default": {"verdict": "allow"}}),
        Some("2.0"),
        &[],
    );
    let record = w.logs.join("https-received");
    let (mut server, port) = https_recorder(&w, &record);
    let base = format!("https://127.0.0.1:{port}");
    w.core().set_script(&json!({"default": {"verdict": "allow"},
        "rules": [{"match": {"hook_trigger": true, "spans": "re:/blocked/"},
                   "body": {"verdict": "block", "reason": "not over TLS either"}}]}));
    // (index, client, path): 0 and 1 blocked, 2 and 3 allowed.
    let cases = [
        (0, clients[0], "blocked"),
        (1, clients[1], "blocked"),
        (2, clients[0], "fine"),
        (3, clients[1], "fine"),
    ];
    let url = |i: usize, path: &str| format!("{base}/{path}/{}", w.marker(i));
    let outcomes = w.run(
        &cases
            .iter()
            .map(|&(i, client, path)| {
                step(
                    &w,
                    i,
                    i,
                    activity,
                    item(&w, i, json!({"url": url(i, path), "client": client})),
                )
            })
            .collect::<Vec<_>>(),
        RUN_TIMEOUT,
    );
    let hooks = started_hooks(&w, "/blocked/");
    let core_record = w.core().record.clone();
    let got = received(&record);
    // (workflow id, marker, URL) of each case, before finish() takes the world.
    let named: Vec<(String, String, String)> = cases
        .iter()
        .map(|&(i, _, path)| (w.workflow_id(i), w.marker(i), url(i, path)))
        .collect();
    let (_, agent) = w.finish();
    server.stop(libc::SIGTERM, Duration::from_secs(10));
    let agent = agent.expect("the agent ran");
    agent.assert_clean_exit();

    let mut p = Vec::new();
    // The agent's own account: both blocked sends denied; an async client's sends were
    // matched to their plaintext, none left to the failure policy.
    let enforcement = agent
        .summary
        .as_ref()
        .map(|s| s["enforcement"].clone())
        .unwrap_or_default();
    let count = |k: &str| enforcement[k].as_u64().unwrap_or(0);
    let memory_bio = activity == "enf_aiohttp";
    if count("denied") < 2 || (memory_bio && (count("tls_named") < 4 || count("tls_unnamed") != 0))
    {
        p.push(format!(
            "the summary's enforcement: expected at least 2 denied{}, got {enforcement}",
            if memory_bio {
                ", 4 TLS sends named and none unnamed"
            } else {
                ""
            }
        ));
    }
    for (&(_, client, path), (id, marker, wanted)) in cases.iter().zip(&named) {
        let o = outcome(&outcomes, id);
        let request_line = format!("GET /{path}/{marker} HTTP/1.1");
        let reached = got.contains(&request_line);
        if path == "blocked" {
            if reached {
                p.push(format!("{client}: the server received the blocked request"));
            }
            match app_error(o) {
                Some((t, m, true))
                    if t == "GovernanceBlock" && m == "Governance block: not over TLS either" => {}
                other => p.push(format!("{client}, blocked: expected GovernanceBlock \"Governance block: not over TLS either\", got {other:?} ({o})")),
            }
            let mine: Vec<&Value> = hooks
                .iter()
                .filter(|h| h["spans"][0]["http_url"] == json!(wanted))
                .collect();
            if mine.len() != 1 || mine[0]["spans"][0]["http_method"] != json!("GET") {
                p.push(format!("{client}: expected one started http_request hook event for GET {wanted}, got {mine:?}"));
            }
        } else {
            let body = format!("echo:GET /{path}/{marker} 0");
            if !reached || o["ok"] != json!(true) || o["result"][0]["body"] != json!(body) {
                p.push(format!(
                    "{client}, allowed: the server received it: {reached}; the activity: {o}"
                ));
            }
        }
    }
    if hooks.len() != 2 {
        p.push(format!(
            "expected two started hook events for the blocked URLs, got {}: {hooks:?}",
            hooks.len()
        ));
    }
    assert!(
        p.is_empty(),
        "{} problem(s) (Core's record: {}; the server's: {}):\n{}",
        p.len(),
        core_record.display(),
        record.display(),
        p.join("\n")
    );
}

/// An async activity's plain-HTTP request (aiohttp, on the worker's event-loop thread,
/// whose filter the hook installs for async activities) blocked by URL at its `started`
/// hook event never reaches the server; the activity fails with `GovernanceBlock`; an
/// async activity requesting another URL, on the same loop, goes through.
#[test]
fn an_async_activitys_blocked_request_never_reaches_the_server() {
    blocked_plain_http(
        "an_async_activitys_blocked_request_never_reaches_the_server",
        "enf_aiohttp",
        "not from the loop either",
    );
}

/// Core blocks `GET {server}/blocked/<marker 0>` at its `started` hook event, made by
/// `activity` (a plain-HTTP client): the server never receives it, the activity fails with
/// `GovernanceBlock` and Core's `reason`; the same activity requesting another URL of the
/// server goes through.
fn blocked_plain_http(name: &str, activity: &str, reason: &str) {
    let server = Recorder::start();
    let w = world(
        name,
        &json!({"default": {"verdict": "allow"}}),
        Some("2.0"),
        &[],
    );
    let (m0, m1) = (w.marker(0), w.marker(1));
    w.core().set_script(&json!({"default": {"verdict": "allow"},
        "rules": [{"match": {"hook_trigger": true, "spans": format!("re:/blocked/{m0}")},
                   "body": {"verdict": "block", "reason": reason}}]}));
    let outcomes = w.run(
        &[
            step(
                &w,
                0,
                0,
                activity,
                item(
                    &w,
                    0,
                    json!({"url": format!("{}/blocked/{m0}", server.url())}),
                ),
            ),
            step(
                &w,
                1,
                1,
                activity,
                item(&w, 1, json!({"url": format!("{}/fine/{m1}", server.url())})),
            ),
        ],
        RUN_TIMEOUT,
    );
    let (bad, good) = (
        outcome(&outcomes, &w.workflow_id(0)).clone(),
        outcome(&outcomes, &w.workflow_id(1)).clone(),
    );
    let hooks = started_hooks(&w, &format!("/blocked/{m0}"));
    let record = w.core().record.clone();
    finish_clean(w);

    let seen = server.lines();
    let mut p = Vec::new();
    if seen.iter().any(|l| l.contains(&m0)) {
        p.push(format!("the server received the blocked request: {seen:?}"));
    }
    if !seen
        .iter()
        .any(|l| l == &format!("GET /fine/{m1} HTTP/1.1"))
    {
        p.push(format!(
            "the server did not receive the allowed request: {seen:?}"
        ));
    }
    match app_error(&bad) {
        Some((t, m, true)) if t == "GovernanceBlock" && m == format!("Governance block: {reason}") => {}
        other => p.push(format!("the blocked activity: expected GovernanceBlock \"Governance block: {reason}\", got {other:?} ({bad})")),
    }
    if good["ok"] != json!(true) || good["result"][0]["body"] != json!("ok") {
        p.push(format!("the other activity: {good}"));
    }
    let url = format!("{}/blocked/{m0}", server.url());
    if hooks.len() != 1
        || hooks[0]["spans"][0]["http_url"] != json!(url)
        || hooks[0]["spans"][0]["http_method"] != json!("GET")
    {
        p.push(format!(
            "expected one started http_request hook event for GET {url}, got {hooks:?}"
        ));
    }
    assert!(
        p.is_empty(),
        "{} problem(s) (Core's record: {}):\n{}",
        p.len(),
        record.display(),
        p.join("\n")
    );
}

/// The agent restarts under a running worker whose event-loop thread it holds (its
/// seccomp filter was installed under the first agent): while no agent runs, the hook
/// answers the held calls itself (`fail_open`: the request goes through, nothing
/// waits); the next agent is handed the same listener, so a request Core blocks after
/// the restart still never reaches the server, and the first agent's stop and the
/// second's are clean.
#[test]
fn after_an_agent_restart_the_next_agent_holds_the_same_threads() {
    let server = Recorder::start();
    let mut w = world(
        "after_an_agent_restart_the_next_agent_holds_the_same_threads",
        &json!({"default": {"verdict": "allow"}}),
        Some("2.0"),
        &[],
    );
    let (m0, m1, m2) = (w.marker(0), w.marker(1), w.marker(2));
    let reason = "blocked by the second agent";
    decide_on(&w, &format!("/blocked/{m2}"), "block", reason);
    let get = |w: &GovWorld, k: usize, path: &str| {
        let marker = w.marker(k);
        let url = format!("{}/{path}/{marker}", server.url());
        let o = w.run(
            &[step(
                w,
                k,
                k,
                "enf_aiohttp",
                item(w, k, json!({"url": url})),
            )],
            RUN_TIMEOUT,
        );
        outcome(&o, &w.workflow_id(k)).clone()
    };
    // The loop thread is filtered, and its listener held by the first agent.
    let first = get(&w, 0, "first");
    let first_agent = w.stop_agent();
    // No agent: the hook answers the loop thread's held calls itself.
    let alone = get(&w, 1, "alone");
    let args = agent_args(&w, &[]);
    w.start_agent(&args);
    // The worker registers again at once (its presence connection) and hands the
    // listener over.
    let blocked = get(&w, 2, "blocked");
    let hooks = started_hooks(&w, &format!("/blocked/{m2}"));
    let record = w.core().record.clone();
    let second_agent = finish_clean(w);

    first_agent.assert_clean_exit();
    let seen = server.lines();
    let mut p = Vec::new();
    for (what, o, m, path) in [
        ("first", &first, &m0, "first"),
        ("alone", &alone, &m1, "alone"),
    ] {
        if o["ok"] != json!(true) || o["result"][0]["body"] != json!("ok") {
            p.push(format!("the {what} activity: {o}"));
        }
        if !seen
            .iter()
            .any(|l| l == &format!("GET /{path}/{m} HTTP/1.1"))
        {
            p.push(format!(
                "the server did not receive the {what} request: {seen:?}"
            ));
        }
    }
    if seen.iter().any(|l| l.contains(&m2)) {
        p.push(format!(
            "the server received the request blocked after the restart: {seen:?}"
        ));
    }
    check_failure(
        &mut p,
        "the activity after the restart",
        &blocked,
        "GovernanceBlock",
        reason,
    );
    if hooks.len() != 1 {
        p.push(format!(
            "expected one started hook event for /blocked/{m2}, got {hooks:?}"
        ));
    }
    let enforcement = second_agent
        .summary
        .as_ref()
        .and_then(|s| s.get("enforcement"))
        .cloned()
        .unwrap_or_default();
    // One Core round trip for the blocked request; denied at least once (the client may
    // try the same request again, denied by the remembered verdict).
    if enforcement["asked"] != json!(1) || enforcement["denied"].as_u64().is_none_or(|d| d < 1) {
        p.push(format!(
            "the second agent's summary should count one call asked of Core and denied: enforcement {enforcement}"
        ));
    }
    assert_no_problems(&p, &record);
}
