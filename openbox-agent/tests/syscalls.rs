//! The syscalls beyond read/write that move a process's bytes, as a user sees them in
//! `openbox-agent trace --json`: descriptor copies (dup, dup2, fcntl F_DUPFD_CLOEXEC),
//! descriptors inherited at fork, the positional calls (pread64, pwrite64, preadv,
//! pwritev and their `2` forms), sendfile, sendmmsg/recvmmsg, and io_uring's count.
//! Real programs: CPython clients against tls_server.py, and two small C programs
//! (tests/support/mmsg.c, io_uring.c) compiled here with the system's cc.
//!
//! Run with `cargo xtask test` (root, one kernel test at a time).

mod common;

use std::{collections::BTreeMap, fs, path::PathBuf, process::Command};

use common::*;
use serde_json::Value;

#[track_caller]
fn assert_client_ok(out: &TempDir, stderr: &str) {
    assert!(
        out.join("ok").exists(),
        "the traced client did not finish its own checks (no {}); agent stderr:\n{stderr}",
        out.join("ok").display()
    );
}

/// Compiles tests/support/`name`.c into `dir` with the system's C compiler.
fn compile(env: &TestEnv, name: &str, dir: &TempDir) -> PathBuf {
    let exe = dir.join(name);
    let status = Command::new("cc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&exe)
        .arg(env.support.join(format!("{name}.c")))
        .status()
        .unwrap_or_else(|e| panic!("running cc to build {name}.c: {e} (install gcc)"));
    assert!(status.success(), "cc failed on {name}.c: {status}");
    exe
}

fn json_file(path: PathBuf) -> Value {
    serde_json::from_slice(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The client_fdcopies.py run, in records mode, shared by the record-level tests.
fn fdcopies(name: &str) -> (TempDir, Trace, HttpServer) {
    let env = TestEnv::get();
    let server = HttpServer::start(&env, false);
    let out = TempDir::new("fdcopies");
    let trace = trace(
        &env,
        name,
        &env.python_command(
            "client_fdcopies.py",
            &[&server.port.to_string(), &out.arg()],
        ),
    );
    assert_client_ok(&out, &trace.stderr);
    (out, trace, server)
}

#[test]
fn writes_through_dup2_fcntl_and_dup_copies_stay_on_one_connection() {
    let (out, trace, server) =
        fdcopies("writes_through_dup2_fcntl_and_dup_copies_stay_on_one_connection");
    let sent = read(&out.join("dup.sent"));
    let received = read(&out.join("dup.received"));
    let fds = json_file(out.join("dup.fds"));
    let peer = server.peer();
    // The first connection to the server is the dup scenario's.
    let conns = trace.conns("connect", &peer);
    let conn = conns.first().unwrap_or_else(|| {
        panic!("no connect record to {peer}; {}", trace.census());
    });
    assert_bytes_eq(
        &trace.stream(conn, Dir::Egress, false),
        &sent,
        "the three requests, written through three different copies",
    );
    assert_bytes_eq(
        &trace.stream(conn, Dir::Ingress, false),
        &received,
        "the three answers",
    );
    let used: BTreeMap<u64, usize> = trace
        .of_type("data")
        .filter(|r| str_of(r, "conn") == conn)
        .fold(BTreeMap::new(), |mut m, r| {
            *m.entry(u64_of(r, "fd")).or_default() += 1;
            m
        });
    for which in ["original", "dup2", "fcntl", "dup"] {
        let fd = fds[which].as_u64().unwrap();
        assert!(
            used.contains_key(&fd),
            "no data record of the {which} descriptor {fd} on {conn}: fds used {used:?}"
        );
    }
    // Closing the original and two copies leaves the connection open: one close, at
    // the end, with every byte.
    let closes: Vec<&Value> = trace
        .of_type("close")
        .filter(|r| str_of(r, "conn") == conn)
        .collect();
    assert_eq!(closes.len(), 1, "one close record for {conn}: {closes:?}");
    assert_eq!(u64_of(closes[0], "bytes_sent"), sent.len() as u64);
    assert_eq!(u64_of(closes[0], "bytes_received"), received.len() as u64);
    assert_eq!(
        u64_of(closes[0], "fd"),
        fds["dup"].as_u64().unwrap(),
        "the connection closes with its last copy: {}",
        closes[0]
    );
}

#[test]
fn sendfile_body_is_counted_on_the_connection_and_the_file() {
    let (out, trace, server) = fdcopies("sendfile_body_is_counted_on_the_connection_and_the_file");
    let head = read(&out.join("sendfile.head"));
    let body = out.join("body.bin").display().to_string();
    let body_len = fs::metadata(&body).unwrap().len();
    let conns = trace.conns("connect", &server.peer());
    assert_eq!(conns.len(), 2, "dup and sendfile connections: {conns:?}");
    let conn = &conns[1];
    let segments = trace.segments(None, Some(conn), Dir::Egress, false);
    let from_file: Vec<&Value> = trace
        .of_type("data")
        .filter(|r| str_of(r, "conn") == conn && r.get("from_file").is_some())
        .collect();
    assert!(!from_file.is_empty(), "no from_file record on {conn}");
    for r in &from_file {
        assert_eq!(str_of(r, "from_file"), body, "{r}");
        assert_eq!(str_of(r, "via"), "sendfile", "{r}");
        assert_eq!(u64_of(r, "len"), 0, "sendfile bytes are not copied: {r}");
    }
    // The head as written, then the body by length, the offsets continuous.
    let mut next = 0;
    for s in &segments {
        assert_eq!(s.seq, next, "egress offsets of {conn} are continuous");
        next = s.seq + s.bytes.len() as u64 + s.truncated;
    }
    assert_eq!(next, head.len() as u64 + body_len);
    let captured: Vec<u8> = segments.iter().flat_map(|s| s.bytes.clone()).collect();
    assert_bytes_eq(&captured, &head, "the head sent with sendall");
    let file_close = trace
        .of_type("file")
        .filter(|r| str_of(r, "event") == "close" && str_of(r, "path") == body)
        .find(|r| u64_of(r, "bytes_read") > 0)
        .unwrap_or_else(|| panic!("no close of {body} read by sendfile; {}", trace.census()));
    assert_eq!(u64_of(file_close, "bytes_read"), body_len, "{file_close}");
    let close = trace
        .of_type("close")
        .find(|r| str_of(r, "conn") == conn)
        .unwrap();
    assert_eq!(u64_of(close, "bytes_sent"), head.len() as u64 + body_len);
}

#[test]
fn positional_reads_and_writes_are_counted_on_their_file() {
    let (out, trace, _server) = fdcopies("positional_reads_and_writes_are_counted_on_their_file");
    let want = json_file(out.join("pread.json"));
    let path = out.join("pos.bin").display().to_string();
    let close = trace
        .of_type("file")
        .find(|r| str_of(r, "event") == "close" && str_of(r, "path") == path)
        .unwrap_or_else(|| panic!("no close record of {path}; {}", trace.census()));
    for key in ["bytes_written", "writes", "bytes_read", "reads"] {
        assert_eq!(
            u64_of(close, key),
            want[key].as_u64().unwrap(),
            "{key} of {path} (pwrite, pwritev, pwritev2, pread, preadv, preadv2): {close}"
        );
    }
}

#[test]
fn http_body_sent_with_sendfile_shows_on_its_span_by_file_and_size() {
    let env = TestEnv::get();
    let server = HttpServer::start(&env, false);
    let out = TempDir::new("fdcopies-spans");
    let run = trace_spans(
        &env,
        "http_body_sent_with_sendfile_shows_on_its_span_by_file_and_size",
        &env.python_command(
            "client_fdcopies.py",
            &[&server.port.to_string(), &out.arg()],
        ),
    );
    assert_client_ok(&out, &run.stderr);
    let spans = run.on_port(server.port);
    let urls: Vec<&str> = spans
        .iter()
        .map(|s| s["attributes"]["http.url"].as_str().unwrap_or(""))
        .collect();
    let base = format!("http://127.0.0.1:{}", server.port);
    assert_eq!(
        urls,
        ["/dup/one", "/dup/two", "/dup/three", "/sendfile"]
            .map(|p| format!("{base}{p}"))
            .to_vec(),
        "one span per request, the three dup requests included: {}",
        run.show(&spans)
    );
    let sendfile = spans[3];
    let attrs = &sendfile["attributes"];
    assert_eq!(attrs["http.status_code"], 200, "{sendfile}");
    assert_eq!(
        attrs["http.request.body.file"],
        out.join("body.bin").display().to_string(),
        "{sendfile}"
    );
    assert_eq!(attrs["http.request.body.file_bytes"], 50000, "{sendfile}");
}

#[test]
fn socket_inherited_at_fork_is_captured_from_the_childs_first_write() {
    let env = TestEnv::get();
    let server = HttpServer::start(&env, false);
    let out = TempDir::new("fork-inherit");
    let trace = trace(
        &env,
        "socket_inherited_at_fork_is_captured_from_the_childs_first_write",
        &env.python_command(
            "client_fork_inherit.py",
            &[&server.port.to_string(), &out.arg()],
        ),
    );
    assert_client_ok(&out, &trace.stderr);
    let children = json_file(out.join("children.json"));
    let children = children.as_object().unwrap();
    assert_eq!(children.len(), 5);
    for (pid, request) in children {
        let pid: u64 = pid.parse().unwrap();
        let mut sent = Vec::new();
        for r in trace
            .of_type("data")
            .filter(|r| u64_of(r, "pid") == pid && str_of(r, "direction") == "egress")
        {
            sent.extend(
                base64::Engine::decode(
                    &base64::engine::general_purpose::STANDARD,
                    str_of(r, "data_b64"),
                )
                .unwrap(),
            );
        }
        assert_bytes_eq(
            &sent,
            request.as_str().unwrap().as_bytes(),
            &format!("the request child {pid} wrote first thing on the socket it inherited"),
        );
    }
}

#[test]
fn each_message_of_sendmmsg_and_recvmmsg_batches_is_captured_in_order() {
    let env = TestEnv::get();
    let out = TempDir::new("mmsg");
    let exe = compile(&env, "mmsg", &out);
    let trace = trace(
        &env,
        "each_message_of_sendmmsg_and_recvmmsg_batches_is_captured_in_order",
        &[exe.display().to_string(), out.arg()],
    );
    assert_client_ok(&out, &trace.stderr);
    let sent = read(&out.join("mmsg.sent"));
    let messages: Vec<&[u8]> = sent.split_inclusive(|b| *b == b'\n').collect();
    assert_eq!(messages.len(), 25, "batches of 5 and 20");
    for (via, dir) in [("sendmmsg", Dir::Egress), ("recvmmsg", Dir::Ingress)] {
        let records: Vec<&Value> = trace
            .of_type("data")
            .filter(|r| str_of(r, "via") == via)
            .collect();
        let conns: std::collections::BTreeSet<&str> =
            records.iter().map(|r| str_of(r, "conn")).collect();
        assert_eq!(conns.len(), 1, "{via}: one socket, got {conns:?}");
        let conn = conns.into_iter().next().unwrap();
        let segments = trace.segments(None, Some(conn), dir, false);
        // The first 5 + 16 messages are copied (two iovecs each for sendmmsg); the last
        // 4 of the batch of 20 are past the per-call copy limit: not copied, but their
        // length keeps the offsets exact.
        let copied = 5 + 16;
        let want: Vec<u8> = messages[..copied].concat();
        let got: Vec<u8> = segments.iter().flat_map(|s| s.bytes.clone()).collect();
        assert_bytes_eq(
            &got,
            &want,
            &format!("{via}: the copied messages, in order"),
        );
        let mut next = 0;
        for s in &segments {
            assert_eq!(s.seq, next, "{via}: the copied messages are contiguous");
            next = s.seq + s.bytes.len() as u64;
        }
        let close = trace
            .of_type("close")
            .find(|r| str_of(r, "conn") == conn)
            .unwrap_or_else(|| panic!("no close of {conn}"));
        let key = if dir == Dir::Egress {
            "bytes_sent"
        } else {
            "bytes_received"
        };
        assert_eq!(
            u64_of(close, key),
            sent.len() as u64,
            "{via}: every message counted, the uncopied ones too: {close}"
        );
    }
    assert!(
        trace.summary_u64("truncated_calls") >= 2,
        "the batches of 20 are reported truncated: {}",
        trace.summary()
    );
}

#[test]
fn io_uring_requests_are_counted_as_not_captured() {
    let env = TestEnv::get();
    let out = TempDir::new("io-uring");
    let exe = compile(&env, "io_uring", &out);
    let trace = trace(
        &env,
        "io_uring_requests_are_counted_as_not_captured",
        &[exe.display().to_string(), out.arg()],
    );
    assert_client_ok(&out, &trace.stderr);
    let summary = trace.summary();
    assert_eq!(
        summary["io_uring"]["counted"], true,
        "this kernel has io_uring:io_uring_submit_req: {summary}"
    );
    assert_eq!(
        trace.summary_u64("io_uring_ops_not_captured"),
        7,
        "4 writes, 2 reads and a nop: {summary}"
    );
    assert_eq!(
        trace.summary_u64("io_uring_data_ops_not_captured"),
        6,
        "the writes and reads: {summary}"
    );
}

/// The exit program reports a process's exit only when its last thread ends, and the
/// fork program copies the parent's tracked descriptors to each child: neither may take
/// a thread's end or a child's for the process's. Threads that end together, children
/// that exit at once or with threads of their own, all while the process keeps a TLS
/// connection: every request it made is captured, and it exits once, last.
#[test]
fn threads_and_forked_children_that_come_and_go_leave_their_process_watched() {
    let env = TestEnv::get();
    let server = HttpServer::start(&env, true);
    let out = TempDir::new("thread-churn");
    let trace = trace(
        &env,
        "threads_and_forked_children_that_come_and_go_leave_their_process_watched",
        &env.python_command(
            "client_thread_churn.py",
            &[&server.port.to_string(), &out.arg()],
        ),
    );
    assert_client_ok(&out, &trace.stderr);
    let churn = json_file(out.join("churn.json"));
    let pid = churn["pid"].as_u64().unwrap();
    let sent = trace.all_bytes(&server.peer(), Dir::Egress, true);
    for path in churn["requests"].as_array().unwrap() {
        let line = format!("GET {} HTTP/1.1\r\n", path.as_str().unwrap());
        assert!(
            contains(&sent, line.as_bytes()),
            "the TLS plaintext of process {pid} lacks {line:?}: it stopped being watched; {}",
            trace.census()
        );
    }
    let exits = |of: u64| -> Vec<u64> {
        trace
            .of_type("process")
            .filter(|r| str_of(r, "event") == "exit" && u64_of(r, "pid") == of)
            .map(|r| u64_of(r, "ts"))
            .collect()
    };
    let own = exits(pid);
    assert_eq!(
        own.len(),
        1,
        "process {pid} exits once, at its end: exit records at {own:?}; {}",
        trace.census()
    );
    let last_data = trace
        .of_type("data")
        .filter(|r| u64_of(r, "pid") == pid)
        .map(|r| u64_of(r, "ts"))
        .max()
        .unwrap_or_else(|| panic!("no data record of process {pid}; {}", trace.census()));
    assert!(
        last_data <= own[0],
        "process {pid} was reported exited ({}) before its last call ({last_data})",
        own[0]
    );
    for child in churn["children"].as_array().unwrap() {
        let child = child.as_u64().unwrap();
        assert_eq!(exits(child).len(), 1, "child {child} exits once");
    }
}
