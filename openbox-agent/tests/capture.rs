//! What a user sees from `openbox-agent trace --json -- COMMAND`: the real agent, real
//! clients (CPython ssl, httpx async, psycopg2-binary, curl) against real local servers
//! (tls_server.py, PostgreSQL), asserted byte for byte where it matters.
//!
//! Run with `cargo xtask test`: it builds the agent, sets up the Python virtualenv and
//! Debian packages these tests use, and runs them one at a time (they share kernel
//! state). Each run's output is kept in target/test-traces/<test>.jsonl.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::*;

/// The traced client finished its own checks (it writes `ok` last).
#[track_caller]
fn assert_client_ok(out: &TempDir, trace: &Trace) {
    assert!(
        out.join("ok").exists(),
        "the traced client did not finish its own checks (no {}); agent stderr (the client's traceback, if passed through):\n{}",
        out.join("ok").display(),
        trace.stderr
    );
}

/// The single `connect` record to `peer`.
#[track_caller]
fn only_connection(trace: &Trace, peer: &str) -> String {
    let conns = trace.conns("connect", peer);
    assert_eq!(
        conns.len(),
        1,
        "expected one connect record to {peer}, got {conns:?}; {}",
        trace.census()
    );
    conns.into_iter().next().unwrap()
}

/// TLS plaintext of one connection: both directions byte-exact, all on the connect
/// record's conn, and nothing emitted as cleartext data for that peer (that would be
/// ciphertext).
#[track_caller]
fn assert_tls_connection_exact(trace: &Trace, peer: &str, sent: &[u8], received: &[u8]) {
    let conn = only_connection(trace, peer);
    for dir in [Dir::Egress, Dir::Ingress] {
        let conns: BTreeSet<String> = trace
            .segments(Some(peer), None, dir, true)
            .into_iter()
            .map(|s| s.conn)
            .collect();
        assert_eq!(
            conns,
            BTreeSet::from([conn.clone()]),
            "{dir:?} TLS plaintext to {peer} must be on the connect record's conn {conn}; {}",
            trace.census()
        );
    }
    assert_bytes_eq(
        &trace.stream(&conn, Dir::Egress, true),
        sent,
        "TLS egress plaintext",
    );
    assert_bytes_eq(
        &trace.stream(&conn, Dir::Ingress, true),
        received,
        "TLS ingress plaintext",
    );
    for dir in [Dir::Egress, Dir::Ingress] {
        let clear = trace.all_bytes(peer, dir, false);
        assert!(
            clear.is_empty(),
            "{dir:?} data with tls:false to {peer} (the socket carries only TLS records, so this is ciphertext): {}",
            preview(&clear)
        );
    }
    let closes: Vec<_> = trace
        .of_type("close")
        .filter(|r| str_of(r, "conn") == conn)
        .collect();
    assert_eq!(
        closes.len(),
        1,
        "one close record for {conn}; {}",
        trace.census()
    );
    assert!(
        bool_of(closes[0], "tls"),
        "close of {conn} must say tls:true: {}",
        closes[0]
    );
}

#[test]
fn tls_request_from_stdlib_ssl_is_captured_byte_exact() {
    let env = TestEnv::get();
    let server = HttpServer::start(&env, true);
    let out = TempDir::new("stdlib-ssl");
    let trace = trace(
        &env,
        "tls_request_from_stdlib_ssl_is_captured_byte_exact",
        &env.python_command("client_ssl.py", &[&server.port.to_string(), &out.arg()]),
    );
    assert_client_ok(&out, &trace);

    let sent = read(&out.join("sent.bin"));
    let received = read(&out.join("received.bin"));
    assert_eq!(server.connections(), 1, "the client makes one connection");
    let (server_in, server_out) = server.recorded(0);
    assert_bytes_eq(
        &server_in,
        &sent,
        "server-side record vs what the client sent",
    );
    assert_bytes_eq(
        &server_out,
        &received,
        "server-side record vs what the client received",
    );
    assert!(sent.starts_with(b"GET /stdlib/first?marker=stdlib-get HTTP/1.1\r\n"));
    assert!(
        contains(&sent, b"POST /stdlib/post HTTP/1.1\r\n")
            && contains(&sent, b"stdlib-body-00276\n")
    );

    assert_tls_connection_exact(&trace, &server.peer(), &sent, &received);
}

#[test]
fn tls_requests_from_httpx_async_are_captured_byte_exact() {
    let env = TestEnv::get();
    let server = HttpServer::start(&env, true);
    let out = TempDir::new("httpx-async");
    let trace = trace(
        &env,
        "tls_requests_from_httpx_async_are_captured_byte_exact",
        &env.python_command(
            "client_httpx_async.py",
            &[&server.port.to_string(), &out.arg()],
        ),
    );
    assert_client_ok(&out, &trace);

    // httpx writes its own headers, so the server's record is the reference.
    assert_eq!(
        server.connections(),
        1,
        "one AsyncClient keeps one keep-alive connection"
    );
    let (sent, received) = server.recorded(0);
    assert!(
        sent.starts_with(b"GET /httpx/first?marker=httpx-get HTTP/1.1\r\n"),
        "{}",
        preview(&sent)
    );
    assert!(
        contains(&sent, b"POST /httpx/post HTTP/1.1\r\n") && contains(&sent, b"httpx-body-00351\n")
    );
    assert!(contains(&sent, b"GET /httpx/third HTTP/1.1\r\n"));

    assert_tls_connection_exact(&trace, &server.peer(), &sent, &received);
}

/// The libssl probes are attached per watched process: a process that is not watched
/// runs the same libssl without trapping on them, and its TLS calls run no program.
#[test]
fn unwatched_https_client_runs_no_tls_probe_while_a_watched_one_is_traced() {
    let env = TestEnv::get();
    let server = HttpServer::start(&env, true);
    let watched_out = TempDir::new("tls-watched");
    let command = env.python_command(
        "client_ssl_hold.py",
        &[&server.port.to_string(), &watched_out.arg()],
    );
    let traced = {
        let env = TestEnv::get();
        thread::spawn(move || {
            trace(
                &env,
                "unwatched_https_client_runs_no_tls_probe_while_a_watched_one_is_traced",
                &command,
            )
        })
    };
    // The watched client has made its TLS calls (its probes are attached) and waits.
    for _ in 0..1200 {
        if watched_out.join("ok").exists() || traced.is_finished() {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        watched_out.join("ok").exists(),
        "the traced client did not finish its exchange"
    );
    // Same interpreter, same libssl, not under the agent.
    let unwatched_out = TempDir::new("tls-unwatched");
    let status = Command::new(&env.python)
        .arg(env.script("client_ssl.py"))
        .args([server.port.to_string(), unwatched_out.arg()])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .status()
        .expect("running the unwatched client");
    assert!(
        status.success() && unwatched_out.join("ok").exists(),
        "the unwatched client failed: {status}"
    );
    fs::write(watched_out.join("go"), b"").unwrap();
    let trace = traced.join().expect("the trace thread panicked");
    assert_client_ok(&watched_out, &trace);
    assert_eq!(server.connections(), 2, "one connection from each client");

    let summary = trace.summary();
    assert!(
        trace.summary_u64("tls_watched_hits") > 0,
        "the watched client's libssl calls ran the probes: {summary}"
    );
    assert_eq!(
        trace.summary_u64("tls_unwatched_hits"),
        0,
        "the unwatched client's libssl calls must run no probe program: {summary}"
    );
    let probes = &summary["tls_probes"];
    assert!(
        u64_of(probes, "attached") > 0 && u64_of(probes, "not_attached") == 0,
        "probes attached for the watched client, none failed: {summary}"
    );
    // Only the watched client's connection is in the trace, byte for byte.
    let sent = read(&watched_out.join("sent.bin"));
    let received = read(&watched_out.join("received.bin"));
    assert_tls_connection_exact(&trace, &server.peer(), &sent, &received);
}

/// A child forked (without exec) by a process with TLS probes runs its parent's libssl,
/// where the parent's probes do not fire: it gets its own before its first TLS call.
#[test]
fn https_from_a_child_forked_by_a_watched_process_is_captured() {
    let env = TestEnv::get();
    let server = HttpServer::start(&env, true);
    let out = TempDir::new("fork-ssl");
    let trace = trace(
        &env,
        "https_from_a_child_forked_by_a_watched_process_is_captured",
        &env.python_command(
            "client_fork_ssl.py",
            &[&server.port.to_string(), &out.arg()],
        ),
    );
    assert_client_ok(&out, &trace);
    let child: u64 = String::from_utf8_lossy(&read(&out.join("child.pid")))
        .trim()
        .parse()
        .expect("child.pid holds a pid");
    let conn = only_connection(&trace, &server.peer());
    let connect = trace
        .of_type("connect")
        .find(|r| str_of(r, "conn") == conn)
        .unwrap();
    assert_eq!(
        u64_of(connect, "pid"),
        child,
        "the connection is the forked child's: {connect}"
    );
    let sent = read(&out.join("sent.bin"));
    let received = read(&out.join("received.bin"));
    assert_tls_connection_exact(&trace, &server.peer(), &sent, &received);
    let summary = trace.summary();
    assert_eq!(
        trace.summary_u64("resumed"),
        trace.summary_u64("paused"),
        "every process stopped for its probes was resumed: {summary}"
    );
}

#[test]
fn postgres_query_over_tls_from_psycopg2_binary_is_captured() {
    let env = TestEnv::get();
    let pg = PgServer::start(&env);
    let out = TempDir::new("psycopg2");
    let trace = trace(
        &env,
        "postgres_query_over_tls_from_psycopg2_binary_is_captured",
        &env.python_command("client_psycopg2.py", &[&pg.port.to_string(), &out.arg()]),
    );
    assert_client_ok(&out, &trace);
    let peer = pg.peer();
    only_connection(&trace, &peer);

    let egress = trace.all_bytes(&peer, Dir::Egress, true);
    assert!(
        contains(&egress, b"SELECT 'marker-xyz'"),
        "the query text must be in TLS egress plaintext to {peer} (libssl bundled in psycopg2-binary): {}; {}",
        preview(&egress),
        trace.census()
    );
    let ingress = trace.all_bytes(&peer, Dir::Ingress, true);
    assert!(
        contains(&ingress, b"marker-xyz"),
        "the result must be in TLS ingress plaintext: {}",
        preview(&ingress)
    );

    // Before TLS starts, libpq sends an 8-byte SSLRequest and the server answers 'S';
    // everything after that on the socket is ciphertext and must not appear as data.
    const SSL_REQUEST: &[u8] = &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    assert_bytes_eq(
        &trace.all_bytes(&peer, Dir::Egress, false),
        SSL_REQUEST,
        "cleartext egress to PostgreSQL",
    );
    assert_bytes_eq(
        &trace.all_bytes(&peer, Dir::Ingress, false),
        b"S",
        "cleartext ingress from PostgreSQL",
    );
}

#[test]
fn curl_plain_http_request_is_captured() {
    let env = TestEnv::get();
    let server = HttpServer::start(&env, false);
    let out = TempDir::new("curl-http");
    let body = out.join("body");
    let url = format!("http://127.0.0.1:{}/curl-plain-marker", server.port);
    let trace = trace(
        &env,
        "curl_plain_http_request_is_captured",
        &[
            "curl".into(),
            "-s".into(),
            "-o".into(),
            body.display().to_string(),
            url,
        ],
    );
    assert_eq!(
        read(&body),
        b"echo:GET /curl-plain-marker 0",
        "curl's response body"
    );

    let peer = server.peer();
    let conn = only_connection(&trace, &peer);
    let (sent, received) = server.recorded(0);
    assert!(
        sent.starts_with(b"GET /curl-plain-marker HTTP/1.1\r\n"),
        "{}",
        preview(&sent)
    );
    assert_bytes_eq(
        &trace.stream(&conn, Dir::Egress, false),
        &sent,
        "curl's request",
    );
    assert_bytes_eq(
        &trace.stream(&conn, Dir::Ingress, false),
        &received,
        "the response to curl",
    );
    assert!(
        trace
            .segments(Some(&peer), None, Dir::Egress, true)
            .is_empty(),
        "plain HTTP must not be reported as TLS"
    );
}

#[test]
fn curl_https_request_is_captured_as_tls_plaintext() {
    let env = TestEnv::get();
    let server = HttpServer::start(&env, true);
    let out = TempDir::new("curl-https");
    let body = out.join("body");
    let url = format!("https://127.0.0.1:{}/curl-tls-marker", server.port);
    let trace = trace(
        &env,
        "curl_https_request_is_captured_as_tls_plaintext",
        &[
            "curl".into(),
            "-sk".into(),
            "-o".into(),
            body.display().to_string(),
            url,
        ],
    );
    assert_eq!(
        read(&body),
        b"echo:GET /curl-tls-marker 0",
        "curl's response body"
    );

    let (sent, received) = server.recorded(0);
    assert!(
        sent.starts_with(b"GET /curl-tls-marker HTTP/1.1\r\n"),
        "{}",
        preview(&sent)
    );
    assert_tls_connection_exact(&trace, &server.peer(), &sent, &received);
}

/// One `file` close record as client_files.py produces it; `None` counts are not
/// asserted (Python's buffered io decides them).
struct ExpectedClose {
    name: &'static str,
    mode: &'static str,
    bytes_read: u64,
    bytes_written: u64,
    reads: Option<u64>,
    writes: Option<u64>,
}

const fn close(
    name: &'static str,
    mode: &'static str,
    bytes_read: u64,
    bytes_written: u64,
    reads: Option<u64>,
    writes: Option<u64>,
) -> ExpectedClose {
    ExpectedClose {
        name,
        mode,
        bytes_read,
        bytes_written,
        reads,
        writes,
    }
}

/// Mirrors the table in client_files.py, in the order the client opens the files.
const EXPECTED_FILES: &[ExpectedClose] = &[
    close("written.txt", "w", 0, 1000, Some(0), Some(3)),
    close("written.txt", "r", 1000, 0, Some(2), Some(0)),
    close("written.txt", "a", 0, 24, Some(0), Some(1)),
    close("rw.bin", "r+", 50, 100, Some(1), Some(1)),
    close("appendplus.log", "a+", 10, 10, Some(1), Some(1)),
    close("highlevel.txt", "w", 0, 12345, None, None),
    close("highlevel.txt", "r", 12345, 0, None, None),
];

fn is_noise(path: &str) -> bool {
    ["/proc/", "/dev/", "/sys/"]
        .iter()
        .any(|p| path.starts_with(p))
        || path.contains("/__pycache__/")
        || path.ends_with(".pyc")
        || path.ends_with(".so")
}

#[test]
fn files_are_reported_with_exact_paths_modes_and_sizes() {
    let env = TestEnv::get();
    let dir = TempDir::new("files");
    let trace = trace(
        &env,
        "files_are_reported_with_exact_paths_modes_and_sizes",
        &env.python_command("client_files.py", &[&dir.arg()]),
    );
    assert_client_ok(&dir, &trace);

    let files: Vec<_> = trace.of_type("file").collect();
    let in_dir = |r: &&serde_json::Value, event: &str| {
        str_of(r, "event") == event
            && EXPECTED_FILES
                .iter()
                .any(|e| dir.join(e.name).display().to_string() == str_of(r, "path"))
    };
    let opens: Vec<_> = files.iter().filter(|r| in_dir(r, "open")).collect();
    let closes: Vec<_> = files.iter().filter(|r| in_dir(r, "close")).collect();
    assert_eq!(
        opens.len(),
        EXPECTED_FILES.len(),
        "file open records for the client's files; {}",
        trace.census()
    );
    assert_eq!(
        closes.len(),
        EXPECTED_FILES.len(),
        "file close records for the client's files; {}",
        trace.census()
    );

    for (i, e) in EXPECTED_FILES.iter().enumerate() {
        let path = dir.join(e.name).display().to_string();
        let (open, close) = (opens[i], closes[i]);
        assert_eq!(str_of(open, "path"), path, "open #{i}: {open}");
        assert_eq!(str_of(open, "mode"), e.mode, "open #{i} of {path}: {open}");
        assert_eq!(str_of(close, "path"), path, "close #{i}: {close}");
        assert_eq!(
            str_of(close, "mode"),
            e.mode,
            "close #{i} of {path}: {close}"
        );
        assert_eq!(
            u64_of(close, "fd"),
            u64_of(open, "fd"),
            "close #{i} of {path} has the open's fd: {close}"
        );
        assert_eq!(
            u64_of(close, "bytes_read"),
            e.bytes_read,
            "bytes_read of {path} ({}): {close}",
            e.mode
        );
        assert_eq!(
            u64_of(close, "bytes_written"),
            e.bytes_written,
            "bytes_written of {path} ({}): {close}",
            e.mode
        );
        if let Some(reads) = e.reads {
            assert_eq!(
                u64_of(close, "reads"),
                reads,
                "reads of {path} ({}): {close}",
                e.mode
            );
        }
        if let Some(writes) = e.writes {
            assert_eq!(
                u64_of(close, "writes"),
                writes,
                "writes of {path} ({}): {close}",
                e.mode
            );
        }
    }

    let noise: Vec<&str> = files
        .iter()
        .map(|r| str_of(r, "path"))
        .filter(|p| is_noise(p))
        .collect();
    assert!(
        noise.is_empty(),
        "noise paths must not be reported: {noise:?}"
    );
}

#[test]
fn unwatched_process_fires_probes_but_produces_no_records() {
    let env = TestEnv::get();
    let mut cmd = Command::new(&env.python);
    cmd.arg(env.script("unwatched_load.py"))
        .arg("60")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stderr(Stdio::inherit());
    let mut load = Background::spawn("unwatched_load.py", &mut cmd);
    assert_eq!(load.line(), "ready");
    let load_pid = u64::from(load.pid());

    let trace = trace(
        &env,
        "unwatched_process_fires_probes_but_produces_no_records",
        &["sleep".into(), "3".into()],
    );
    let rest = load.stop();
    let iterations: u64 = rest.last().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    assert!(iterations > 0, "the unwatched load did no work ({rest:?})");

    let from_load: Vec<_> = trace
        .records
        .iter()
        .filter(|r| {
            ["pid", "child"]
                .iter()
                .any(|k| r.get(*k).and_then(serde_json::Value::as_u64) == Some(load_pid))
        })
        .collect();
    assert!(
        from_load.is_empty(),
        "records of the unwatched process {load_pid}: {from_load:?}"
    );

    let summary = trace.summary();
    assert!(
        trace.summary_u64("unwatched_hits") > 0,
        "probes must have fired for the unwatched process ({iterations} loop iterations): {summary}"
    );
    assert_eq!(
        trace.summary_u64("events"),
        trace.summary_u64("records_received"),
        "every record the kernel wrote was read by the agent: {summary}"
    );
}

#[test]
fn body_beyond_the_capture_limit_is_truncated_and_counted() {
    let env = TestEnv::get();
    let server = HttpServer::start(&env, false);
    let out = TempDir::new("bigbody");
    let trace = trace(
        &env,
        "body_beyond_the_capture_limit_is_truncated_and_counted",
        &env.python_command("client_bigbody.py", &[&server.port.to_string(), &out.arg()]),
    );
    assert_client_ok(&out, &trace);
    let sent = read(&out.join("sent.bin"));
    let received = read(&out.join("received.bin"));
    let peer = server.peer();
    let conn = only_connection(&trace, &peer);

    let segments = trace.segments(None, Some(&conn), Dir::Egress, false);
    assert!(
        !segments.is_empty(),
        "no egress data for {conn}; {}",
        trace.census()
    );
    let mut next = 0u64;
    let mut in_call = 0u64;
    for s in &segments {
        assert_eq!(
            s.seq, next,
            "seq must count uncaptured bytes too (seq = previous seq + len + truncated)"
        );
        let at = s.seq as usize;
        assert_bytes_eq(
            &s.bytes,
            &sent[at..(at + s.bytes.len()).min(sent.len())],
            &format!("segment at seq {at}"),
        );
        // A call's segments end with the one that reports the call's uncaptured rest.
        in_call += s.bytes.len() as u64;
        if s.truncated > 0 {
            assert!(
                in_call <= DEFAULT_CAPTURE_LIMIT,
                "{in_call} bytes captured from one call; limit {DEFAULT_CAPTURE_LIMIT}"
            );
            in_call = 0;
        }
        next = s.seq + s.bytes.len() as u64 + s.truncated;
    }
    assert_eq!(
        next,
        sent.len() as u64,
        "seq + len + truncated of the last segment must be the request's size"
    );
    let truncated: u64 = segments.iter().map(|s| s.truncated).sum();
    assert!(truncated > 0, "a 1 MiB write must be reported truncated");
    let captured: u64 = segments.iter().map(|s| s.bytes.len() as u64).sum();
    assert_eq!(captured + truncated, sent.len() as u64);

    assert!(
        trace.summary_u64("truncated_calls") >= 1,
        "{}",
        trace.summary()
    );
    assert!(
        trace.summary_u64("truncated_bytes") >= truncated,
        "summary truncated_bytes must count at least the {truncated} bytes the data records report: {}",
        trace.summary()
    );
    assert_bytes_eq(
        &trace.stream(&conn, Dir::Ingress, false),
        &received,
        "the response",
    );
}

/// `trace` (with `options`) of a 16 MiB burst (client_burst.py) while the agent's
/// parsing thread is held up for 3 s; the client succeeded and the agent was held up.
fn burst_while_held_up(env: &TestEnv, name: &str, options: &[&str]) -> (TempDir, Trace) {
    let out = TempDir::new(name);
    let trace = trace_with(
        env,
        name,
        options,
        &[("OPENBOX_TEST_STALL_MS", "3000")],
        &env.python_command("client_burst.py", &["16", &out.arg()]),
    );
    assert_client_ok(&out, &trace);
    assert!(
        trace.stderr.contains("OPENBOX_TEST_STALL_MS is set"),
        "the agent was not held up: {}",
        trace.stderr
    );
    (out, trace)
}

/// While the thread that parses records is held up (as it is when it waits for a CPU on
/// a busy node), the ring buffer is still emptied: a burst sixteen times the ring's size
/// is captured whole, with no ring-buffer drop.
#[test]
fn a_burst_while_the_parsing_thread_is_held_up_is_captured_without_drops() {
    let env = TestEnv::get();
    let (out, trace) = burst_while_held_up(
        &env,
        "a_burst_while_the_parsing_thread_is_held_up_is_captured_without_drops",
        &["--ring-mib", "1"],
    );
    assert_eq!(
        trace.summary_u64("ringbuf_drops"),
        0,
        "records were dropped: {}",
        trace.summary()
    );
    let sent = read(&out.join("sent.bin"));
    let port = fs::read_to_string(out.join("port")).expect("the client's port file");
    let conn = only_connection(&trace, &format!("127.0.0.1:{}", port.trim()));
    assert_bytes_eq(
        &trace.stream(&conn, Dir::Egress, false),
        &sent,
        "the burst as captured",
    );
}

/// The same burst with the queue bounded at 1 MiB (`--queue-mib 1`): the backlog beyond
/// it is not held in memory — the queue is found full, the ring fills behind it and the
/// kernel drops — and both are counted in the summary.
#[test]
fn a_backlog_beyond_the_queue_bound_is_dropped_and_counted() {
    let env = TestEnv::get();
    let (_out, trace) = burst_while_held_up(
        &env,
        "a_backlog_beyond_the_queue_bound_is_dropped_and_counted",
        &["--ring-mib", "1", "--queue-mib", "1"],
    );
    let queue = &trace.summary()["ring_queue"];
    let full = queue["full"].as_u64().unwrap_or(0);
    let peak = queue["peak_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(
        // (A batch may pass the bound by one record, at most 16 KiB.)
        full > 0 && peak <= (1 << 20) + (16 << 10) && trace.summary_u64("ringbuf_drops") > 0,
        "expected the 1 MiB queue full (and no fuller) and drops counted: {}",
        trace.summary()
    );
    // A bound that cannot work is refused before anything loads.
    let refused = std::process::Command::new(&env.agent)
        .args(["trace", "--queue-mib", "0", "--", "true"])
        .output()
        .expect("running openbox-agent");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("queue_mib (--queue-mib) must be 1 to"),
        "{stderr}"
    );
}

#[test]
fn streams_reassemble_exactly_from_short_vectored_and_concurrent_io() {
    let env = TestEnv::get();
    let out = TempDir::new("iovec");
    let trace = trace(
        &env,
        "streams_reassemble_exactly_from_short_vectored_and_concurrent_io",
        &env.python_command("client_iovec.py", &[&out.arg()]),
    );
    assert_client_ok(&out, &trace);

    let mut expected: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for entry in fs::read_dir(out.path()).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(tag) = name.strip_suffix(".sent") {
            expected.insert(tag.to_string(), read(&entry.path()));
        }
    }
    assert_eq!(
        expected.len(),
        20,
        "short-writes, writev, sendmsg, peek and 16 threads: {:?}",
        expected.keys()
    );

    // Both ends are in the traced process: the connecting side sends the payload and
    // reads the echo; the accepting side reads the payload and sends the echo.
    for (kind, sends) in [("connect", Dir::Egress), ("accept", Dir::Ingress)] {
        let conns = trace.conns_of_kind(kind);
        let mut found = BTreeSet::new();
        for conn in &conns {
            let payload = trace.stream(conn, sends, false);
            let Some(tag) = expected
                .keys()
                .find(|t| payload.starts_with(format!("{t}\n").as_bytes()))
            else {
                continue;
            };
            let want = &expected[tag];
            assert_bytes_eq(
                &payload,
                want,
                &format!("{tag}: {kind} side {sends:?} ({conn})"),
            );
            let other = if sends == Dir::Egress {
                Dir::Ingress
            } else {
                Dir::Egress
            };
            assert_bytes_eq(
                &trace.stream(conn, other, false),
                want,
                &format!("{tag}: {kind} side {other:?}, the echo ({conn})"),
            );
            assert!(
                found.insert(tag.clone()),
                "two {kind} connections carry {tag}"
            );
        }
        let missing: Vec<_> = expected.keys().filter(|t| !found.contains(*t)).collect();
        assert!(
            missing.is_empty(),
            "no {kind} connection carries {missing:?}; {}",
            trace.census()
        );
    }

    // Each of the 16 sender threads wrote only on its own connection.
    let mut tids = BTreeSet::new();
    for conn in trace.conns_of_kind("connect") {
        let segments = trace.segments(None, Some(&conn), Dir::Egress, false);
        let Some(first) = segments.first() else {
            continue;
        };
        if !first.bytes.starts_with(b"thread-") {
            continue;
        }
        let conn_tids: BTreeSet<u64> = segments.iter().map(|s| s.tid).collect();
        assert_eq!(
            conn_tids.len(),
            1,
            "{conn} written by one thread, got tids {conn_tids:?}"
        );
        tids.extend(conn_tids);
    }
    assert_eq!(
        tids.len(),
        16,
        "16 sender threads, each with its own connection: {tids:?}"
    );
}

/// A command line that runs `program args…` as `nobody` with no capabilities.
fn as_nobody(program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        program,
    ]);
    cmd
}

#[test]
fn agent_without_privileges_exits_with_an_error_naming_cap_bpf_and_root() {
    let env = TestEnv::get();
    // `nobody` must be able to reach the binary; the workspace may sit in a private home.
    let copy = TempDir::new("unprivileged");
    let mut agent = env.agent.display().to_string();
    let reachable = as_nobody("test")
        .args(["-x", &agent])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !reachable {
        let dest = copy.join("openbox-agent");
        fs::copy(&env.agent, &dest).unwrap();
        fs::set_permissions(copy.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)).unwrap();
        agent = dest.display().to_string();
    }
    let mut cmd = as_nobody(&agent);
    cmd.args(["trace", "--", "true"])
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (status, stdout, stderr) = run_bounded(&mut cmd, Duration::from_secs(60));
    assert!(
        !status.success(),
        "the agent must fail without privileges; stdout: {}",
        preview(&stdout)
    );
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("root"),
        "the error must name CAP_BPF and root; stderr:\n{stderr}"
    );
}

#[track_caller]
fn assert_agent_fails_with(env: &TestEnv, name: &str, args: &[&str], needles: &[&str]) {
    let (status, stdout, stderr, _) = run_agent(env, name, args);
    assert!(
        !status.success(),
        "`openbox-agent {}` must fail; stdout: {}",
        args.join(" "),
        preview(&stdout)
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "the error must mention {needle:?}; stderr:\n{stderr}"
        );
    }
}

#[test]
fn tls_lib_without_ssl_symbols_is_an_error_naming_the_file_and_the_symbols() {
    let env = TestEnv::get();
    assert_agent_fails_with(
        &env,
        "tls_lib_without_ssl_symbols_is_an_error_naming_the_file_and_the_symbols",
        &["trace", "--tls-lib", "/etc/hostname", "--", "true"],
        &["/etc/hostname", "SSL_"],
    );
}

#[test]
fn tls_lib_that_does_not_exist_is_an_error_saying_not_found() {
    let env = TestEnv::get();
    assert_agent_fails_with(
        &env,
        "tls_lib_that_does_not_exist_is_an_error_saying_not_found",
        &[
            "trace",
            "--tls-lib",
            "/nonexistent/libssl.so.3",
            "--",
            "true",
        ],
        &["/nonexistent/libssl.so.3", "not found"],
    );
}

/// The capture mode `--capture-mode auto` uses on this kernel, as `check` reports it,
/// and the detail of its fentry/fexit item (why fentry cannot be used, when it cannot).
fn auto_capture_mode(env: &TestEnv) -> (String, String) {
    let (_, stdout, stderr, _) = run_agent(env, "check_capture_mode", &["check", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&stdout)
        .unwrap_or_else(|e| panic!("check --json is not JSON ({e}); stderr:\n{stderr}"));
    let fentry = report["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["name"] == "fentry/fexit"))
        .map(|i| i["detail"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    (str_of(&report, "capture_mode").to_string(), fentry)
}

/// The suite runs in the mode `OPENBOX_CAPTURE_MODE` asks for (`cargo xtask test` runs
/// the capture tests in each mode the kernel has), and the summary says which it was:
/// a run meant for one mode that silently used the other would test nothing new.
#[test]
fn trace_captures_in_the_mode_asked_for_and_says_which() {
    let env = TestEnv::get();
    let (auto, fentry_detail) = auto_capture_mode(&env);
    let expected = match std::env::var("OPENBOX_CAPTURE_MODE").as_deref() {
        Ok("fentry") => "fentry".to_string(),
        Ok("tracepoint") => "tracepoint".to_string(),
        _ => auto.clone(),
    };
    let out = TempDir::new("capture-mode");
    let file = out.join("written.txt");
    let trace = trace(
        &env,
        "trace_captures_in_the_mode_asked_for_and_says_which",
        &[
            "sh".into(),
            "-c".into(),
            format!("echo captured > {}", file.display()),
        ],
    );
    assert_eq!(
        str_of(trace.summary(), "capture_mode"),
        expected,
        "summary: {}; check's fentry/fexit item: {fentry_detail}",
        trace.summary()
    );
    let path = file.display().to_string();
    let opened = trace
        .of_type("file")
        .any(|r| str_of(r, "event") == "open" && str_of(r, "path") == path);
    assert!(
        opened,
        "the file written in {expected} mode was not reported; {}",
        trace.census()
    );
    if auto == "tracepoint" {
        // This kernel refuses fentry (check said why): asking for it is an error naming
        // the mode and what to use instead, not a silent fallback.
        assert_agent_fails_with(
            &env,
            "capture_mode_fentry_refused",
            &["trace", "--capture-mode", "fentry", "--", "true"],
            &["--capture-mode fentry", "auto or tracepoint"],
        );
    }
}

/// Keeps the fixtures honest without the agent: each client passes against its server
/// on its own, so a failure in the tests above is about the agent.
#[test]
fn fixtures_work_without_the_agent() {
    let env = TestEnv::without_agent();
    let run = |script: &str, args: &[&str]| {
        let mut cmd = Command::new(&env.python);
        cmd.arg(env.script(script))
            .args(args)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (status, _, stderr) = run_bounded(&mut cmd, Duration::from_secs(120));
        assert!(status.success(), "{script} {args:?} failed: {stderr}");
    };
    let tls = HttpServer::start(&env, true);
    let plain = HttpServer::start(&env, false);
    let pg = PgServer::start(&env);
    let (tls_port, plain_port, pg_port) = (
        tls.port.to_string(),
        plain.port.to_string(),
        pg.port.to_string(),
    );
    for (script, port) in [
        ("client_ssl.py", tls_port.as_str()),
        ("client_httpx_async.py", &tls_port),
        ("client_psycopg2.py", &pg_port),
        ("client_bigbody.py", &plain_port),
    ] {
        let out = TempDir::new("fixture");
        run(script, &[port, &out.arg()]);
        assert!(out.join("ok").exists(), "{script} did not write ok");
    }
    for script in ["client_files.py", "client_iovec.py"] {
        let out = TempDir::new("fixture");
        run(script, &[&out.arg()]);
        assert!(out.join("ok").exists(), "{script} did not write ok");
    }
    // Let the servers' connection threads finish writing their records.
    thread::sleep(Duration::from_millis(100));
    assert_eq!(tls.connections(), 2);
    let (sent, received) = tls.recorded(0);
    assert!(
        sent.starts_with(b"GET /stdlib/first")
            && received.ends_with(b"echo:POST /stdlib/post 5000")
    );
}

/// A number a running client writes to a file (0 before its first write).
fn count_in(path: &std::path::Path) -> usize {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits (up to 30 s) for a running client's first request.
#[track_caller]
fn wait_for_first_request(count: impl Fn() -> usize) {
    for _ in 0..600 {
        if count() > 0 {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("the client made no request");
}

/// `trace --json --pid PID` started on a process already running, its TLS probes
/// attached `OPENBOX_TEST_TLS_PROBE_GAP_MS` = 1000 apart (as a restarted agent waiting on
/// the last one's detach can take): span lines on stdout, logs and the summary on
/// stderr.
struct AttachedTrace {
    agent: std::process::Child,
    logs: TempDir,
}

impl AttachedTrace {
    /// Returns once the agent says it watches `pid` (its TLS probes are attached then).
    fn start(env: &TestEnv, pid: u32, name: &str) -> AttachedTrace {
        let logs = TempDir::new(name);
        let agent = Command::new(&env.agent)
            .args(["trace", "--json", "--pid", &pid.to_string()])
            .env("OPENBOX_LOG", "info")
            .env("OPENBOX_TEST_TLS_PROBE_GAP_MS", "1000")
            .stdout(fs::File::create(logs.join("stdout")).unwrap())
            .stderr(fs::File::create(logs.join("stderr")).unwrap())
            .spawn()
            .expect("starting the agent");
        let mut t = AttachedTrace { agent, logs };
        for _ in 0..1200 {
            if t.stderr().contains("watching process") {
                break;
            }
            assert!(
                t.agent.try_wait().unwrap().is_none(),
                "the agent ended: {}",
                t.stderr()
            );
            thread::sleep(Duration::from_millis(50));
        }
        assert!(t.stderr().contains("attached TLS probes"), "{}", t.stderr());
        t
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.logs.join("stderr")).unwrap_or_default()
    }

    /// Ends tracing (SIGINT): the HTTP spans printed, and the summary.
    fn stop(mut self) -> (Vec<serde_json::Value>, serde_json::Value) {
        let _ = Command::new("kill")
            .args(["-INT", &self.agent.id().to_string()])
            .status();
        let _ = self.agent.wait();
        let spans = fs::read_to_string(self.logs.join("stdout"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v: &serde_json::Value| v["attributes"]["http.target"].is_string())
            .collect();
        let stderr = self.stderr();
        let summary = stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["type"] == "summary")
            .unwrap_or_else(|| panic!("no summary on the agent's stderr:\n{stderr}"));
        (spans, summary)
    }
}

/// The agent starts watching a running process whose one thread makes TLS calls
/// (memory-BIO, as asyncio does) and plain socket calls in turn: while its libssl probes
/// are being attached, a TLS call may run its entry probe without its return probe, and
/// the plain connection the thread uses next must not be taken for that call's
/// ciphertext. The test widens the gap between two probes' attaches to a second, as a
/// restarted agent waiting on the last one's detach does (OPENBOX_TEST_TLS_PROBE_GAP_MS).
#[test]
fn a_plain_connection_stays_plain_while_tls_probes_attach_to_a_running_process() {
    let env = TestEnv::get();
    let https = HttpServer::start(&env, true);
    let http = HttpServer::start(&env, false);
    let out = TempDir::new("tls-and-plain");
    let mut client = Command::new(&env.python)
        .arg(env.script("client_tls_and_plain.py"))
        .args([https.port.to_string(), http.port.to_string(), out.arg()])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .spawn()
        .expect("starting the client");
    let rounds = || count_in(&out.join("rounds"));
    wait_for_first_request(rounds);
    let agent = AttachedTrace::start(&env, client.id(), "tls-and-plain-agent");
    // Requests from the next round on are made with every probe in place.
    let first = rounds() + 1;
    thread::sleep(Duration::from_secs(2));
    let last = rounds().saturating_sub(1);
    let (spans, _) = agent.stop();
    fs::write(out.join("stop"), b"").unwrap();
    let _ = client.wait();
    assert!(last > first + 10, "too few rounds: {first}..{last}");
    // (The spans' peer port comes from the Host header, which names no port here.)
    let seen = |kind: &str, scheme: &str| -> BTreeSet<usize> {
        spans
            .iter()
            .filter(|s| s["attributes"]["http.scheme"] == scheme)
            .filter_map(|s| {
                s["attributes"]["http.target"]
                    .as_str()?
                    .strip_prefix(&format!("/json/{kind}-"))?
                    .parse()
                    .ok()
            })
            .collect()
    };
    let wanted: BTreeSet<usize> = (first..=last).collect();
    let plain = seen("plain", "http");
    let tls = seen("tls", "https");
    assert!(
        wanted.is_subset(&plain),
        "plain requests {first}..={last} missing from the plain connection's spans: {:?}; plain requests taken for TLS (scheme https): {:?}",
        wanted.difference(&plain).collect::<Vec<_>>(),
        seen("plain", "https")
    );
    assert!(
        wanted.is_subset(&tls),
        "TLS requests {first}..={last} missing: {:?}",
        wanted.difference(&tls).collect::<Vec<_>>()
    );
}

/// The agent starts watching a process whose two HTTPS clients each already hold a
/// keep-alive connection and send one request after another: aiohttp (memory-BIO TLS)
/// and requests.Session (socket-BIO TLS). Its libssl probes attach a second apart (as a
/// restarted agent waiting on the last one's detach can take), so for seconds some
/// libssl functions are probed and others not. A request captured without its
/// response would put the HTTP parser one request ahead, pairing every later response
/// of the connection with an earlier request: every span must carry its own request's
/// answer (the server echoes the path), every request made once all probes are in
/// place must have its span, and what the attach window cost is counted as lost.
#[test]
fn keep_alive_https_spans_stay_paired_while_tls_probes_attach_to_a_running_process() {
    let env = TestEnv::get();
    let https = HttpServer::start(&env, true);
    let out = TempDir::new("keepalive-tls");
    let mut client = Command::new(&env.python)
        .arg(env.script("client_keepalive_tls.py"))
        .args([https.port.to_string(), out.arg()])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .spawn()
        .expect("starting the client");
    let clients = ["aio", "sync"];
    let rounds = |name: &str| count_in(&out.join(&format!("rounds-{name}")));
    for name in clients {
        wait_for_first_request(|| rounds(name));
    }
    let agent = AttachedTrace::start(&env, client.id(), "keepalive-tls-agent");
    // Requests from each client's next one on are made with every probe in place.
    let first: Vec<usize> = clients.iter().map(|c| rounds(c) + 1).collect();
    thread::sleep(Duration::from_secs(2));
    // Under emulation (fentry mode in a TCG guest) 2 s can hold fewer than the dozen
    // requests per client checked below: wait for them, within a minute.
    let enough = Instant::now() + Duration::from_secs(60);
    while Instant::now() < enough && clients.iter().zip(&first).any(|(c, f)| rounds(c) < f + 12) {
        thread::sleep(Duration::from_millis(50));
    }
    let last: Vec<usize> = clients
        .iter()
        .map(|c| rounds(c).saturating_sub(1))
        .collect();
    let (spans, summary) = agent.stop();
    fs::write(out.join("stop"), b"").unwrap();
    let status = client.wait().unwrap();
    assert!(
        status.success() && out.join("ok").exists(),
        "the client failed ({status}): a response did not echo its request"
    );
    assert_eq!(
        https.connections(),
        2,
        "each client was to use its one pooled connection"
    );
    // A span names its client and request number in its target.
    let request_of = |s: &serde_json::Value| -> Option<(usize, usize)> {
        let target = s["attributes"]["http.target"].as_str()?;
        let (name, n) = target.strip_prefix("/echo/")?.split_once('-')?;
        Some((clients.iter().position(|c| *c == name)?, n.parse().ok()?))
    };
    // Every response must be its own request's; a request with no response is one in
    // flight when tracing stopped (after the last one the client had finished).
    let wrong: Vec<String> = spans
        .iter()
        .filter(|s| {
            let target = s["attributes"]["http.target"].as_str().unwrap_or_default();
            match s["response_body"].as_str() {
                Some(body) => body != format!("echo:GET {target} 0"),
                None => request_of(s).is_none_or(|(k, n)| n <= last[k]),
            }
        })
        .map(|s| {
            format!(
                "{} -> {}",
                s["attributes"]["http.target"], s["response_body"]
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} HTTPS spans carry another request's response, or none; the first: {:#?}",
        wrong.len(),
        spans.len(),
        &wrong[..wrong.len().min(12)]
    );
    for (k, name) in clients.iter().enumerate() {
        let (first, last) = (first[k], last[k]);
        assert!(
            last > first + 10,
            "too few {name} requests: {first}..{last}"
        );
        let seen: BTreeSet<usize> = spans
            .iter()
            .filter(|s| s["attributes"]["http.scheme"] == "https")
            .filter_map(|s| {
                s["attributes"]["http.target"]
                    .as_str()?
                    .strip_prefix(&format!("/echo/{name}-"))?
                    .parse()
                    .ok()
            })
            .collect();
        let wanted: BTreeSet<usize> = (first..=last).collect();
        assert!(
            wanted.is_subset(&seen),
            "{name} requests {first}..={last} missing: {:?}",
            wanted.difference(&seen).collect::<Vec<_>>()
        );
    }
    // Between the read-side and the write-side probes, responses are captured without
    // their requests: each is counted, never paired with another request.
    let lost = &summary["parser_losses"]["http"];
    let unpaired = lost["unpaired"].as_u64().unwrap_or(0);
    assert!(
        unpaired > 0,
        "no HTTP response counted unpaired while the probes attached: parser losses {lost}; summary {summary}"
    );
}
