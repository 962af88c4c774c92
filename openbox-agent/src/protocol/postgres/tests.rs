use serde_json::{json, Value};

use super::*;
use crate::protocol::StatusCode;

// --- message builders (PostgreSQL docs, "Message Formats") ---

fn msg(t: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![t];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cs(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn untyped(code: u32, rest: &[u8]) -> Vec<u8> {
    let mut m = (rest.len() as u32 + 8).to_be_bytes().to_vec();
    m.extend_from_slice(&code.to_be_bytes());
    m.extend_from_slice(rest);
    m
}

fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut rest = Vec::new();
    for (k, v) in params {
        rest.extend(cs(k));
        rest.extend(cs(v));
    }
    rest.push(0);
    untyped(196_608, &rest)
}

fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', &cs(sql))
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = cs(name);
    b.extend(cs(sql));
    b.extend([0, 0]);
    msg(b'P', &b)
}

fn bind(portal: &str, stmt: &str) -> Vec<u8> {
    let mut b = cs(portal);
    b.extend(cs(stmt));
    b.extend([0, 0, 0, 0, 0, 0]);
    msg(b'B', &b)
}

fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend(cs(name));
    msg(b'D', &b)
}

fn execute(portal: &str) -> Vec<u8> {
    let mut b = cs(portal);
    b.extend([0, 0, 0, 0]);
    msg(b'E', &b)
}

fn sync() -> Vec<u8> {
    msg(b'S', &[])
}

fn auth_ok_ready() -> Vec<u8> {
    let mut v = msg(b'R', &0u32.to_be_bytes());
    let mut ps = cs("server_version");
    ps.extend(cs("15.6"));
    v.extend(msg(b'S', &ps));
    v.extend(msg(b'K', &[0, 0, 0, 7, 1, 2, 3, 4]));
    v.extend(ready());
    v
}

fn ready() -> Vec<u8> {
    msg(b'Z', b"I")
}

fn row_description() -> Vec<u8> {
    let mut b = 1u16.to_be_bytes().to_vec();
    b.extend(cs("n"));
    b.extend([0; 18]);
    msg(b'T', &b)
}

fn data_row(v: &str) -> Vec<u8> {
    let mut b = 1u16.to_be_bytes().to_vec();
    b.extend((v.len() as u32).to_be_bytes());
    b.extend(v.as_bytes());
    msg(b'D', &b)
}

fn complete(tag: &str) -> Vec<u8> {
    msg(b'C', &cs(tag))
}

fn error(code: &str, message: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (f, v) in [
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', code),
        (b'M', message),
        (b'F', "parse_relation.c"),
    ] {
        b.push(f);
        b.extend(cs(v));
    }
    b.push(0);
    msg(b'E', &b)
}

fn rows(n: usize) -> Vec<u8> {
    let mut v = row_description();
    for i in 0..n {
        v.extend(data_row(&i.to_string()));
    }
    v
}

use crate::protocol::scripts::{self, Script};

fn login(user: &str, db: &str) -> Script {
    vec![
        (
            Side::Client,
            startup(&[("user", user), ("database", db), ("application_name", "t")]),
            1,
        ),
        (Side::Server, auth_ok_ready(), 2),
    ]
}

fn run_with(cfg: ParserConfig, script: &Script, byte_at_a_time: bool) -> (Vec<Op>, u64) {
    scripts::run_with(Protocol::Postgres, cfg, script, byte_at_a_time)
}

/// Runs the script whole and one byte at a time; both must agree and parse cleanly.
fn run(script: &Script) -> Vec<Op> {
    scripts::run(Protocol::Postgres, script)
}

fn attr<'a>(op: &'a Op, k: &str) -> Option<&'a Value> {
    op.attributes.get(k)
}

#[test]
fn startup_records_user_and_database() {
    let mut s = login("alice", "shop");
    s.push((Side::Client, query("SELECT 1"), 3));
    s.push((
        Side::Server,
        [rows(1), complete("SELECT 1"), ready()].concat(),
        4,
    ));
    let ops = run(&s);
    assert_eq!(ops.len(), 1);
    assert_eq!(attr(&ops[0], "db.user"), Some(&json!("alice")));
    assert_eq!(attr(&ops[0], "db.name"), Some(&json!("shop")));
    assert!(attr(&ops[0], "db.system").is_none());
}

#[test]
fn database_defaults_to_user() {
    let s: Script = vec![
        (Side::Client, startup(&[("user", "bob")]), 1),
        (Side::Server, auth_ok_ready(), 2),
        (Side::Client, query("BEGIN"), 3),
        (
            Side::Server,
            [complete("BEGIN"), msg(b'Z', b"T")].concat(),
            4,
        ),
    ];
    let ops = run(&s);
    assert_eq!(attr(&ops[0], "db.name"), Some(&json!("bob")));
    assert_eq!(ops[0].name, "BEGIN");
    assert!(attr(&ops[0], "db.rowcount").is_none());
}

#[test]
fn ssl_request_then_startup_in_plaintext() {
    let mut s: Script = vec![
        (Side::Client, untyped(SSL_REQUEST, &[]), 1),
        (Side::Server, b"S".to_vec(), 2),
    ];
    s.extend(login("carol", "app"));
    s.push((Side::Client, query("select 42"), 3));
    s.push((
        Side::Server,
        [rows(1), complete("SELECT 1"), ready()].concat(),
        4,
    ));
    let ops = run(&s);
    assert_eq!(ops.len(), 1);
    assert_eq!(attr(&ops[0], "db.user"), Some(&json!("carol")));
    assert_eq!(ops[0].name, "SELECT");
}

#[test]
fn gssenc_refused_then_ssl_refused_then_cleartext_startup() {
    let mut s: Script = vec![
        (Side::Client, untyped(GSSENC_REQUEST, &[]), 1),
        (Side::Server, b"N".to_vec(), 1),
        (Side::Client, untyped(SSL_REQUEST, &[]), 1),
        (Side::Server, b"N".to_vec(), 1),
    ];
    s.extend(login("dave", "db"));
    s.push((Side::Client, query("SELECT 1"), 3));
    s.push((
        Side::Server,
        [rows(1), complete("SELECT 1"), ready()].concat(),
        4,
    ));
    assert_eq!(run(&s).len(), 1);
}

#[test]
fn simple_query_reports_rowcount_and_timestamps() {
    let mut s = login("u", "d");
    s.push((Side::Client, query("SELECT * FROM users WHERE id > 3"), 10));
    s.push((Side::Server, rows(5), 11));
    s.push((Side::Server, [complete("SELECT 5"), ready()].concat(), 12));
    let ops = run(&s);
    assert_eq!(ops.len(), 1);
    let op = &ops[0];
    assert_eq!(op.name, "SELECT");
    assert_eq!(
        attr(op, "db.statement"),
        Some(&json!("SELECT * FROM users WHERE id > 3"))
    );
    assert_eq!(attr(op, "db.operation"), Some(&json!("SELECT")));
    assert_eq!(attr(op, "db.rowcount"), Some(&json!(5)));
    assert_eq!((op.start_ts, op.end_ts), (10, 12));
    assert_eq!(op.status, StatusCode::Unset);
}

#[test]
fn insert_and_update_tags_give_rowcounts() {
    let mut s = login("u", "d");
    s.push((Side::Client, query("INSERT INTO t VALUES (1),(2),(3)"), 3));
    s.push((Side::Server, [complete("INSERT 0 3"), ready()].concat(), 4));
    s.push((
        Side::Client,
        query("/* app */ -- note\n  update t set a = 1 where a < 3"),
        5,
    ));
    s.push((Side::Server, [complete("UPDATE 2"), ready()].concat(), 6));
    let ops = run(&s);
    assert_eq!(attr(&ops[0], "db.rowcount"), Some(&json!(3)));
    assert_eq!(ops[1].name, "UPDATE");
    assert_eq!(attr(&ops[1], "db.rowcount"), Some(&json!(2)));
}

#[test]
fn multi_statement_query_is_one_op_with_last_rowcount() {
    let mut s = login("u", "d");
    let sql = "INSERT INTO t VALUES (1); SELECT * FROM t; DELETE FROM t";
    s.push((Side::Client, query(sql), 3));
    s.push((
        Side::Server,
        [
            complete("INSERT 0 1"),
            rows(4),
            complete("SELECT 4"),
            complete("DELETE 7"),
            ready(),
        ]
        .concat(),
        4,
    ));
    let ops = run(&s);
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].name, "INSERT");
    assert_eq!(attr(&ops[0], "db.statement"), Some(&json!(sql)));
    assert_eq!(attr(&ops[0], "db.rowcount"), Some(&json!(7)));
}

#[test]
fn failing_query_reports_error_message_and_sqlstate() {
    let mut s = login("u", "d");
    s.push((Side::Client, query("SELECT * FROM missing"), 3));
    s.push((
        Side::Server,
        [
            error("42P01", "relation \"missing\" does not exist"),
            ready(),
        ]
        .concat(),
        4,
    ));
    s.push((Side::Client, query("SELECT 1"), 5));
    s.push((
        Side::Server,
        [rows(1), complete("SELECT 1"), ready()].concat(),
        6,
    ));
    let ops = run(&s);
    assert_eq!(ops.len(), 2);
    assert_eq!(ops[0].status, StatusCode::Error);
    assert_eq!(
        ops[0].status_description.as_deref(),
        Some("relation \"missing\" does not exist")
    );
    assert_eq!(attr(&ops[0], "db.error.code"), Some(&json!("42P01")));
    assert_eq!(ops[1].status, StatusCode::Unset);
    assert!(ops[1].status_description.is_none());
}

#[test]
fn empty_query_is_reported_without_rowcount() {
    let mut s = login("u", "d");
    s.push((Side::Client, query(""), 3));
    s.push((Side::Server, [msg(b'I', &[]), ready()].concat(), 4));
    let ops = run(&s);
    assert_eq!(ops[0].name, "QUERY");
    assert!(attr(&ops[0], "db.rowcount").is_none());
}

#[test]
fn extended_unnamed_statement_parse_bind_execute_sync() {
    let mut s = login("u", "d");
    let sql = "SELECT * FROM users WHERE id = $1";
    s.push((
        Side::Client,
        [
            parse("", sql),
            bind("", ""),
            describe(b'P', ""),
            execute(""),
            sync(),
        ]
        .concat(),
        20,
    ));
    s.push((
        Side::Server,
        [msg(b'1', &[]), msg(b'2', &[]), rows(2)].concat(),
        21,
    ));
    s.push((Side::Server, complete("SELECT 2"), 22));
    s.push((Side::Server, ready(), 23));
    // The unnamed statement is replaced by the next Parse.
    s.push((
        Side::Client,
        [
            parse("", "DELETE FROM t"),
            bind("", ""),
            execute(""),
            sync(),
        ]
        .concat(),
        30,
    ));
    s.push((
        Side::Server,
        [
            msg(b'1', &[]),
            msg(b'2', &[]),
            complete("DELETE 0"),
            ready(),
        ]
        .concat(),
        31,
    ));
    let ops = run(&s);
    assert_eq!(ops.len(), 2);
    assert_eq!(ops[0].name, "SELECT");
    assert_eq!(attr(&ops[0], "db.statement"), Some(&json!(sql)));
    assert_eq!(attr(&ops[0], "db.rowcount"), Some(&json!(2)));
    assert_eq!((ops[0].start_ts, ops[0].end_ts), (20, 22));
    assert_eq!(ops[1].name, "DELETE");
    assert_eq!(attr(&ops[1], "db.rowcount"), Some(&json!(0)));
}

#[test]
fn named_statement_prepared_then_executed_later() {
    // asyncpg: Parse + Describe + Sync prepares (no op), Bind + Execute + Sync runs.
    let mut s = login("u", "d");
    let sql = "UPDATE accounts SET n = n + 1 WHERE id = $1";
    s.push((
        Side::Client,
        [
            parse("__asyncpg_stmt_1__", sql),
            describe(b'S', "__asyncpg_stmt_1__"),
            sync(),
        ]
        .concat(),
        3,
    ));
    s.push((
        Side::Server,
        [
            msg(b'1', &[]),
            msg(b't', &[0, 1, 0, 0, 0, 23]),
            msg(b'n', &[]),
            ready(),
        ]
        .concat(),
        4,
    ));
    for ts in [5, 7] {
        s.push((
            Side::Client,
            [bind("", "__asyncpg_stmt_1__"), execute(""), sync()].concat(),
            ts,
        ));
        s.push((
            Side::Server,
            [msg(b'2', &[]), complete("UPDATE 1"), ready()].concat(),
            ts + 1,
        ));
    }
    let ops = run(&s);
    assert_eq!(ops.len(), 2);
    for (op, ts) in ops.iter().zip([5, 7]) {
        assert_eq!(op.name, "UPDATE");
        assert_eq!(attr(op, "db.statement"), Some(&json!(sql)));
        assert_eq!(attr(op, "db.rowcount"), Some(&json!(1)));
        assert_eq!((op.start_ts, op.end_ts), (ts, ts + 1));
    }
}

#[test]
fn closed_statement_is_forgotten() {
    let mut s = login("u", "d");
    s.push((
        Side::Client,
        [
            parse("s1", "SELECT 1"),
            msg(b'C', &[b"S".as_slice(), &cs("s1")].concat()),
            sync(),
        ]
        .concat(),
        3,
    ));
    s.push((
        Side::Server,
        [msg(b'1', &[]), msg(b'3', &[]), ready()].concat(),
        4,
    ));
    s.push((
        Side::Client,
        [bind("", "s1"), execute(""), sync()].concat(),
        5,
    ));
    s.push((
        Side::Server,
        [msg(b'2', &[]), rows(1), complete("SELECT 1"), ready()].concat(),
        6,
    ));
    let ops = run(&s);
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].name, "EXECUTE");
    assert!(attr(&ops[0], "db.statement").is_none());
}

#[test]
fn pipelined_executes_before_one_sync() {
    let mut s = login("u", "d");
    s.push((
        Side::Client,
        [
            parse("a", "INSERT INTO t VALUES ($1)"),
            parse("b", "SELECT * FROM t"),
            bind("", "a"),
            execute(""),
            bind("", "a"),
            execute(""),
            bind("p", "b"),
            execute("p"),
            sync(),
        ]
        .concat(),
        3,
    ));
    s.push((
        Side::Server,
        [
            msg(b'1', &[]),
            msg(b'1', &[]),
            msg(b'2', &[]),
            complete("INSERT 0 1"),
        ]
        .concat(),
        4,
    ));
    s.push((
        Side::Server,
        [
            msg(b'2', &[]),
            complete("INSERT 0 1"),
            msg(b'2', &[]),
            rows(3),
        ]
        .concat(),
        5,
    ));
    s.push((Side::Server, [complete("SELECT 3"), ready()].concat(), 6));
    let ops = run(&s);
    let names: Vec<_> = ops.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["INSERT", "INSERT", "SELECT"]);
    assert_eq!(ops.iter().map(|o| o.end_ts).collect::<Vec<_>>(), [4, 5, 6]);
    assert_eq!(attr(&ops[2], "db.rowcount"), Some(&json!(3)));
}

#[test]
fn error_in_extended_mode_fails_queued_executes_until_sync() {
    let mut s = login("u", "d");
    s.push((
        Side::Client,
        [
            parse("", "INSERT INTO t VALUES (1)"),
            bind("", ""),
            execute(""),
            parse("", "INSERT INTO t VALUES (1)"),
            bind("", ""),
            execute(""),
            parse("", "SELECT 2"),
            bind("", ""),
            execute(""),
            sync(),
        ]
        .concat(),
        3,
    ));
    s.push((
        Side::Server,
        [
            msg(b'1', &[]),
            msg(b'2', &[]),
            complete("INSERT 0 1"),
            msg(b'1', &[]),
            msg(b'2', &[]),
        ]
        .concat(),
        4,
    ));
    s.push((
        Side::Server,
        [
            error("23505", "duplicate key value violates unique constraint"),
            ready(),
        ]
        .concat(),
        5,
    ));
    // The connection is usable again after the Sync.
    s.push((
        Side::Client,
        [parse("", "SELECT 3"), bind("", ""), execute(""), sync()].concat(),
        6,
    ));
    s.push((
        Side::Server,
        [
            msg(b'1', &[]),
            msg(b'2', &[]),
            rows(1),
            complete("SELECT 1"),
            ready(),
        ]
        .concat(),
        7,
    ));
    let ops = run(&s);
    let status: Vec<_> = ops.iter().map(|o| (o.name.as_str(), o.status)).collect();
    assert_eq!(
        status,
        [
            ("INSERT", StatusCode::Unset),
            ("INSERT", StatusCode::Error),
            ("SELECT", StatusCode::Error),
            ("SELECT", StatusCode::Unset)
        ]
    );
    for op in &ops[1..3] {
        assert_eq!(
            op.status_description.as_deref(),
            Some("duplicate key value violates unique constraint")
        );
        assert_eq!(attr(op, "db.error.code"), Some(&json!("23505")));
        assert_eq!(op.end_ts, 5);
    }
}

#[test]
fn executes_sent_after_the_error_fail_at_ready_for_query() {
    // Flush instead of Sync: the error arrives before the client queues the rest.
    let mut s = login("u", "d");
    s.push((
        Side::Client,
        [
            parse("", "SELEC 1"),
            bind("", ""),
            execute(""),
            msg(b'H', &[]),
        ]
        .concat(),
        3,
    ));
    s.push((
        Side::Server,
        error("42601", "syntax error at or near \"SELEC\""),
        4,
    ));
    s.push((
        Side::Client,
        [bind("", ""), execute(""), sync()].concat(),
        5,
    ));
    s.push((Side::Server, ready(), 6));
    let ops = run(&s);
    assert_eq!(ops.len(), 2);
    assert!(ops.iter().all(|o| o.status == StatusCode::Error));
    assert_eq!((ops[1].start_ts, ops[1].end_ts), (5, 6));
}

#[test]
fn failed_parse_without_execute_reports_error() {
    let mut s = login("u", "d");
    s.push((
        Side::Client,
        [parse("stmt", "SELEC oops"), describe(b'S', "stmt"), sync()].concat(),
        3,
    ));
    s.push((
        Side::Server,
        [error("42601", "syntax error"), ready()].concat(),
        4,
    ));
    let ops = run(&s);
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].name, "SELEC");
    assert_eq!(ops[0].status, StatusCode::Error);
    assert_eq!(attr(&ops[0], "db.statement"), Some(&json!("SELEC oops")));
}

#[test]
fn portal_suspended_counts_rows() {
    let mut s = login("u", "d");
    let mut ex = cs("");
    ex.extend(2u32.to_be_bytes());
    s.push((
        Side::Client,
        [
            parse("", "SELECT * FROM big"),
            bind("", ""),
            msg(b'E', &ex),
            sync(),
        ]
        .concat(),
        3,
    ));
    s.push((
        Side::Server,
        [
            msg(b'1', &[]),
            msg(b'2', &[]),
            data_row("a"),
            data_row("b"),
            msg(b's', &[]),
            ready(),
        ]
        .concat(),
        4,
    ));
    let ops = run(&s);
    assert_eq!(attr(&ops[0], "db.rowcount"), Some(&json!(2)));
}

#[test]
fn copy_in_and_out_do_not_desync() {
    let mut s = login("u", "d");
    s.push((Side::Client, query("COPY t FROM STDIN"), 3));
    s.push((Side::Server, msg(b'G', &[0, 0, 1, 0, 0]), 4));
    s.push((
        Side::Client,
        [msg(b'd', b"1\tZ\n"), msg(b'd', b"2\tC\n"), msg(b'c', &[])].concat(),
        5,
    ));
    s.push((Side::Server, [complete("COPY 2"), ready()].concat(), 6));
    s.push((Side::Client, query("COPY t TO STDOUT"), 7));
    s.push((
        Side::Server,
        [
            msg(b'H', &[0, 0, 1, 0, 0]),
            msg(b'd', b"1\tZ\n"),
            msg(b'c', &[]),
            complete("COPY 1"),
            ready(),
        ]
        .concat(),
        8,
    ));
    s.push((Side::Client, query("SELECT 1"), 9));
    s.push((
        Side::Server,
        [rows(1), complete("SELECT 1"), ready()].concat(),
        10,
    ));
    let ops = run(&s);
    let got: Vec<_> = ops
        .iter()
        .map(|o| (o.name.as_str(), attr(o, "db.rowcount").cloned()))
        .collect();
    assert_eq!(
        got,
        [
            ("COPY", Some(json!(2))),
            ("COPY", Some(json!(1))),
            ("SELECT", Some(json!(1)))
        ]
    );
}

#[test]
fn close_emits_requests_still_waiting() {
    let mut s = login("u", "d");
    s.push((Side::Client, query("SELECT pg_sleep(10)"), 3));
    let ops = run(&s);
    assert_eq!(ops.len(), 1);
    assert_eq!(
        (ops[0].start_ts, ops[0].end_ts, ops[0].status),
        (3, 1000, StatusCode::Unset)
    );
}

#[test]
fn capture_starting_mid_connection_still_parses() {
    let s: Script = vec![
        (Side::Client, query("SELECT 1"), 3),
        (
            Side::Server,
            [rows(1), complete("SELECT 1"), ready()].concat(),
            4,
        ),
    ];
    let ops = run(&s);
    assert_eq!(ops.len(), 1);
    assert!(attr(&ops[0], "db.user").is_none());
}

#[test]
fn gap_inside_message_skips_it() {
    let mut p = PostgresParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (side, data, ts) in login("u", "d") {
        p.feed(side, &data, ts, &mut out);
    }
    // A long query whose tail was not captured, then a normal one.
    let long = format!("SELECT '{}'", "x".repeat(500));
    let q = query(&long);
    p.feed(Side::Client, &q[..100], 3, &mut out);
    p.gap(Side::Client, (q.len() - 100) as u64, 3, &mut out);
    p.feed(Side::Client, &query("SELECT 2"), 4, &mut out);
    // The server's row for the first query is cut in the middle too.
    let first = [rows(1), data_row(&"y".repeat(300))].concat();
    p.feed(Side::Server, &first[..first.len() - 200], 5, &mut out);
    p.gap(Side::Server, 200, 5, &mut out);
    p.feed(
        Side::Server,
        &[
            complete("SELECT 2"),
            ready(),
            rows(1),
            complete("SELECT 1"),
            ready(),
        ]
        .concat(),
        6,
        &mut out,
    );
    assert_eq!(p.unparsed(), 0);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].name, "SELECT");
    assert!(attr(&out[0], "db.statement")
        .unwrap()
        .as_str()
        .unwrap()
        .starts_with("SELECT 'xxx"));
    assert_eq!(attr(&out[0], "db.rowcount"), Some(&json!(2)));
    assert_eq!(attr(&out[1], "db.statement"), Some(&json!("SELECT 2")));
}

#[test]
fn gap_between_server_messages_resynchronises_at_the_next_request() {
    let mut p = PostgresParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (side, data, ts) in login("u", "d") {
        p.feed(side, &data, ts, &mut out);
    }
    p.feed(Side::Client, &query("SELECT 1"), 3, &mut out);
    p.gap(Side::Server, 50, 4, &mut out);
    assert_eq!(p.unparsed(), 1);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].end_ts, out[0].status), (4, StatusCode::Unset));
    assert!(attr(&out[0], "db.rowcount").is_none());
    assert_eq!(attr(&out[0], "db.response_truncated"), Some(&json!(true)));
    // The rest of that response, however it is cut, is not parsed (nor counted).
    p.feed(Side::Server, &[0xff; 10], 5, &mut out);
    p.gap(Side::Server, 50, 5, &mut out);
    p.feed(Side::Server, &ready(), 5, &mut out);
    assert_eq!((out.len(), p.unparsed()), (1, 1));
    // The client's next request starts the server's next response.
    p.feed(Side::Client, &query("SELECT 2"), 6, &mut out);
    p.feed(
        Side::Server,
        &[rows(1), complete("SELECT 1"), ready()].concat(),
        7,
        &mut out,
    );
    p.close(8, &mut out);
    assert_eq!((out.len(), p.unparsed()), (2, 1));
    assert_eq!(attr(&out[1], "db.statement"), Some(&json!("SELECT 2")));
    assert_eq!(attr(&out[1], "db.rowcount"), Some(&json!(1)));
    assert!(attr(&out[1], "db.response_truncated").is_none());
    assert_eq!((out[1].start_ts, out[1].end_ts), (6, 7));
}

#[test]
fn old_response_bytes_after_the_next_request_end_it_when_they_do_not_frame() {
    // A client that does not wait lets the old response's tail arrive after its next
    // request: that cannot be told apart, but garbage framing ends that request (UNSET)
    // and the server side waits for the next request again.
    let mut p = PostgresParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (side, data, ts) in login("u", "d") {
        p.feed(side, &data, ts, &mut out);
    }
    p.feed(Side::Client, &query("SELECT 1"), 3, &mut out);
    p.gap(Side::Server, 50, 4, &mut out);
    p.feed(Side::Client, &query("SELECT 2"), 5, &mut out);
    p.feed(Side::Server, &[b'z'; 40], 6, &mut out);
    p.feed(Side::Client, &query("SELECT 3"), 7, &mut out);
    p.feed(
        Side::Server,
        &[rows(1), complete("SELECT 1"), ready()].concat(),
        8,
        &mut out,
    );
    p.close(9, &mut out);
    let l = p.losses();
    assert_eq!(
        (l.get(Loss::Gap), l.get(Loss::Malformed), l.total()),
        (1, 1, 2)
    );
    assert_eq!(out.len(), 3);
    assert_eq!((out[1].end_ts, out[1].status), (6, StatusCode::Unset));
    assert!(out[..2].iter().all(|o| attr(o, "db.rowcount").is_none()));
    assert_eq!(attr(&out[2], "db.statement"), Some(&json!("SELECT 3")));
    assert_eq!(attr(&out[2], "db.rowcount"), Some(&json!(1)));
}

// --- responses beyond the capture limit ---

/// The agent's capture limit per call.
const CAPTURED: usize = 16 * 1024;

enum Step {
    Feed(Side, Vec<u8>, u64),
    /// `n` bytes of this side not captured.
    Gap(Side, u64, u64),
}

fn steps(script: Script) -> Vec<Step> {
    script
        .into_iter()
        .map(|(side, data, ts)| Step::Feed(side, data, ts))
        .collect()
}

/// A server response read by one call: the first `CAPTURED` bytes arrive, the rest
/// is a gap.
fn cut_response(steps: &mut Vec<Step>, response: Vec<u8>, ts: u64) {
    assert!(response.len() > CAPTURED);
    let lost = (response.len() - CAPTURED) as u64;
    let mut head = response;
    head.truncate(CAPTURED);
    steps.push(Step::Feed(Side::Server, head, ts));
    steps.push(Step::Gap(Side::Server, lost, ts));
}

fn run_steps_with(steps: &[Step], byte_at_a_time: bool) -> (Vec<Op>, u64) {
    let mut p = PostgresParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for step in steps {
        match step {
            Step::Feed(side, data, ts) if byte_at_a_time => {
                for b in data {
                    p.feed(*side, std::slice::from_ref(b), *ts, &mut out);
                }
            }
            Step::Feed(side, data, ts) => p.feed(*side, data, *ts, &mut out),
            Step::Gap(side, n, ts) => p.gap(*side, *n, *ts, &mut out),
        }
    }
    p.close(1000, &mut out);
    (out, p.unparsed())
}

/// Runs the steps whole and one byte at a time; both must give the same.
fn run_steps(steps: &[Step]) -> (Vec<Op>, u64) {
    let whole = run_steps_with(steps, false);
    assert_eq!(
        whole,
        run_steps_with(steps, true),
        "byte-at-a-time feeding must give the same ops"
    );
    whole
}

type Summary<'a> = (&'a str, Option<i64>, bool, StatusCode, u64, u64);

fn cut_summary(ops: &[Op]) -> Vec<Summary<'_>> {
    ops.iter()
        .map(|o| {
            (
                o.name.as_str(),
                attr(o, "db.rowcount").and_then(Value::as_i64),
                attr(o, "db.response_truncated") == Some(&json!(true)),
                o.status,
                o.start_ts,
                o.end_ts,
            )
        })
        .collect()
}

fn big_rows() -> Vec<u8> {
    [row_description(), data_row(&"z".repeat(100_000))].concat()
}

#[test]
fn simple_queries_after_a_result_beyond_the_capture_limit_are_parsed() {
    use StatusCode::{Error, Unset};
    let mut s = steps(login("u", "d"));
    s.push(Step::Feed(
        Side::Client,
        query("SELECT repeat('z', 100000)"),
        3,
    ));
    let big = [
        big_rows(),
        data_row(&"z".repeat(100_000)),
        complete("SELECT 2"),
        ready(),
    ]
    .concat();
    // Read in two calls: the first cut by the capture limit, its gap running into
    // the second row; the second call (the rest) arrives whole but framed on nothing.
    let (first, tail) = big.split_at(120_000);
    cut_response(&mut s, first.to_vec(), 4);
    s.push(Step::Feed(Side::Server, tail.to_vec(), 5));
    s.push(Step::Feed(Side::Client, query("SELECT 'after-big'"), 6));
    s.push(Step::Feed(
        Side::Server,
        [rows(1), complete("SELECT 1"), ready()].concat(),
        7,
    ));
    s.push(Step::Feed(
        Side::Client,
        query("INSERT INTO t VALUES (1), (2), (3)"),
        8,
    ));
    s.push(Step::Feed(
        Side::Server,
        [complete("INSERT 0 3"), ready()].concat(),
        9,
    ));
    s.push(Step::Feed(Side::Client, query("SELECT * FROM missing"), 10));
    s.push(Step::Feed(
        Side::Server,
        [
            error("42P01", "relation \"missing\" does not exist"),
            ready(),
        ]
        .concat(),
        11,
    ));
    s.push(Step::Feed(Side::Client, query("SELECT * FROM t"), 12));
    s.push(Step::Feed(
        Side::Server,
        [rows(3), complete("SELECT 3"), ready()].concat(),
        13,
    ));
    let (ops, unparsed) = run_steps(&s);
    assert_eq!(
        cut_summary(&ops),
        [
            ("SELECT", None, true, Unset, 3, 4),
            ("SELECT", Some(1), false, Unset, 6, 7),
            ("INSERT", Some(3), false, Unset, 8, 9),
            ("SELECT", None, false, Error, 10, 11),
            ("SELECT", Some(3), false, Unset, 12, 13),
        ]
    );
    assert_eq!(
        attr(&ops[1], "db.statement"),
        Some(&json!("SELECT 'after-big'"))
    );
    assert_eq!(attr(&ops[3], "db.error.code"), Some(&json!("42P01")));
    assert_eq!(unparsed, 1, "one resync");
}

#[test]
fn repeated_big_results_each_resynchronise() {
    // client_bigresult.py: a big result and a small query, five times over.
    let mut s = steps(login("u", "d"));
    let mut ts = 3;
    for _ in 0..5 {
        s.push(Step::Feed(Side::Client, query("SELECT big"), ts));
        cut_response(
            &mut s,
            [big_rows(), complete("SELECT 1"), ready()].concat(),
            ts + 1,
        );
        s.push(Step::Feed(
            Side::Client,
            query("SELECT 'after-big'"),
            ts + 2,
        ));
        s.push(Step::Feed(
            Side::Server,
            [rows(1), complete("SELECT 1"), ready()].concat(),
            ts + 3,
        ));
        ts += 4;
    }
    let (ops, unparsed) = run_steps(&s);
    assert_eq!(ops.len(), 10);
    for pair in ops.chunks(2) {
        assert_eq!(attr(&pair[0], "db.response_truncated"), Some(&json!(true)));
        assert_eq!(attr(&pair[1], "db.rowcount"), Some(&json!(1)));
        assert_eq!(pair[1].end_ts, pair[1].start_ts + 1);
    }
    assert_eq!(unparsed, 5);
}

/// asyncpg's round trip for one statement: Parse/Bind/Describe/Execute/Sync.
fn extended(sql: &str) -> Vec<u8> {
    [
        parse("", sql),
        bind("", ""),
        describe(b'P', ""),
        execute(""),
        sync(),
    ]
    .concat()
}

fn extended_answer(body: Vec<u8>) -> Vec<u8> {
    [msg(b'1', &[]), msg(b'2', &[]), body, ready()].concat()
}

#[test]
fn extended_queries_after_a_result_beyond_the_capture_limit_are_parsed() {
    use StatusCode::{Error, Unset};
    let mut s = steps(login("u", "d"));
    s.push(Step::Feed(
        Side::Client,
        extended("SELECT repeat('z', $1)"),
        3,
    ));
    cut_response(
        &mut s,
        extended_answer([big_rows(), complete("SELECT 1")].concat()),
        4,
    );
    s.push(Step::Feed(
        Side::Client,
        extended("SELECT id FROM t WHERE id > $1"),
        5,
    ));
    s.push(Step::Feed(
        Side::Server,
        extended_answer([rows(2), complete("SELECT 2")].concat()),
        6,
    ));
    // A named statement prepared with Flush (asyncpg), then bound and executed.
    s.push(Step::Feed(
        Side::Client,
        [
            parse("__asyncpg_stmt_1__", "UPDATE t SET n = $1"),
            describe(b'S', "__asyncpg_stmt_1__"),
            msg(b'H', &[]),
        ]
        .concat(),
        7,
    ));
    s.push(Step::Feed(
        Side::Server,
        [
            msg(b'1', &[]),
            msg(b't', &[0, 1, 0, 0, 0, 23]),
            msg(b'n', &[]),
        ]
        .concat(),
        8,
    ));
    s.push(Step::Feed(
        Side::Client,
        [bind("", "__asyncpg_stmt_1__"), execute(""), sync()].concat(),
        9,
    ));
    s.push(Step::Feed(
        Side::Server,
        [msg(b'2', &[]), complete("UPDATE 2"), ready()].concat(),
        10,
    ));
    s.push(Step::Feed(
        Side::Client,
        extended("INSERT INTO t VALUES (1)"),
        11,
    ));
    s.push(Step::Feed(
        Side::Server,
        [
            msg(b'1', &[]),
            msg(b'2', &[]),
            error("23505", "duplicate key"),
            ready(),
        ]
        .concat(),
        12,
    ));
    let (ops, unparsed) = run_steps(&s);
    assert_eq!(
        cut_summary(&ops),
        [
            ("SELECT", None, true, Unset, 3, 4),
            ("SELECT", Some(2), false, Unset, 5, 6),
            ("UPDATE", Some(2), false, Unset, 7, 10),
            ("INSERT", None, false, Error, 11, 12),
        ]
    );
    assert_eq!(unparsed, 1, "one resync");
}

#[test]
fn flushed_execute_beyond_the_capture_limit_resynchronises() {
    // A cursor: Execute with a row limit and Flush, PortalSuspended, Execute again.
    let mut s = steps(login("u", "d"));
    let mut limited = cs("c1");
    limited.extend(1u32.to_be_bytes());
    s.push(Step::Feed(
        Side::Client,
        [
            parse("", "SELECT blob FROM big"),
            bind("c1", ""),
            msg(b'E', &limited),
            msg(b'H', &[]),
        ]
        .concat(),
        3,
    ));
    cut_response(
        &mut s,
        [
            msg(b'1', &[]),
            msg(b'2', &[]),
            data_row(&"z".repeat(100_000)),
            msg(b's', &[]),
        ]
        .concat(),
        4,
    );
    s.push(Step::Feed(
        Side::Client,
        [msg(b'E', &limited), sync()].concat(),
        5,
    ));
    s.push(Step::Feed(
        Side::Server,
        [data_row("small"), complete("SELECT 1"), ready()].concat(),
        6,
    ));
    let (ops, unparsed) = run_steps(&s);
    assert_eq!(
        cut_summary(&ops),
        [
            ("SELECT", None, true, StatusCode::Unset, 3, 4),
            ("SELECT", Some(1), false, StatusCode::Unset, 5, 6),
        ]
    );
    assert_eq!(unparsed, 1);
}

#[test]
fn gap_where_the_client_does_not_wait_gives_up_but_copy_resynchronises() {
    let later = |s: &mut Vec<Step>, ts: u64| {
        s.push(Step::Feed(Side::Client, query("SELECT 'later'"), ts));
        s.push(Step::Feed(
            Side::Server,
            [rows(1), complete("SELECT 1"), ready()].concat(),
            ts + 1,
        ));
    };
    // A pipeline: three Syncs outstanding when the first response is cut.
    let mut s = steps(login("u", "d"));
    s.push(Step::Feed(
        Side::Client,
        [
            extended("SELECT repeat('z', 100000)"),
            extended("SELECT 2"),
            extended("SELECT 3"),
        ]
        .concat(),
        3,
    ));
    cut_response(
        &mut s,
        extended_answer([big_rows(), complete("SELECT 1")].concat()),
        4,
    );
    for n in [2, 3] {
        s.push(Step::Feed(
            Side::Server,
            extended_answer([rows(n), complete(&format!("SELECT {n}"))].concat()),
            5,
        ));
    }
    later(&mut s, 6);
    let (ops, unparsed) = run_steps(&s);
    let truncated = ("SELECT", None, true, StatusCode::Unset, 3, 4);
    assert_eq!(cut_summary(&ops), [truncated; 3]);
    assert_eq!(unparsed, 1);

    // Executes queued without Sync or Flush: the client has not finished its batch.
    let mut s = steps(login("u", "d"));
    s.push(Step::Feed(
        Side::Client,
        [
            parse("", "SELECT repeat('z', 100000)"),
            bind("", ""),
            execute(""),
        ]
        .concat(),
        3,
    ));
    cut_response(
        &mut s,
        [msg(b'1', &[]), msg(b'2', &[]), big_rows(), data_row("z")].concat(),
        4,
    );
    s.push(Step::Feed(
        Side::Client,
        [bind("", ""), execute(""), sync()].concat(),
        5,
    ));
    s.push(Step::Feed(
        Side::Server,
        [
            complete("SELECT 1"),
            msg(b'2', &[]),
            rows(1),
            complete("SELECT 1"),
            ready(),
        ]
        .concat(),
        6,
    ));
    later(&mut s, 7);
    let (ops, unparsed) = run_steps(&s);
    assert_eq!(cut_summary(&ops), [truncated]);
    assert_eq!(unparsed, 1);

    // COPY out, cut: the client sends its next request after the copy's ReadyForQuery,
    // so the server side resumes there.
    let mut s = steps(login("u", "d"));
    s.push(Step::Feed(Side::Client, query("COPY big TO STDOUT"), 3));
    cut_response(
        &mut s,
        [
            msg(b'H', &[0, 0, 1, 0, 0]),
            msg(b'd', &[b'z'; 100_000]),
            msg(b'c', &[]),
            complete("COPY 1"),
            ready(),
        ]
        .concat(),
        4,
    );
    later(&mut s, 5);
    let (ops, unparsed) = run_steps(&s);
    assert_eq!(
        cut_summary(&ops),
        [
            ("COPY", None, true, StatusCode::Unset, 3, 4),
            ("SELECT", Some(1), false, StatusCode::Unset, 5, 6)
        ]
    );
    assert_eq!(unparsed, 1);

    // The client's own stream lost before the server's, or while the server side waits
    // for it: both resume at the client's next captured request (a whole piece: fed a
    // byte at a time, no piece starts a request and nothing resumes).
    for (client_gap_ts, server_gap_ts, later_ts) in [(3, 4, 5), (5, 4, 6)] {
        let mut s = steps(login("u", "d"));
        s.push(Step::Feed(Side::Client, query("SELECT 1"), 3));
        let gaps = [
            Step::Gap(Side::Client, 20, client_gap_ts),
            Step::Gap(Side::Server, 20, server_gap_ts),
        ];
        let gaps = if client_gap_ts < server_gap_ts {
            gaps
        } else {
            let [c, sv] = gaps;
            [sv, c]
        };
        s.extend(gaps);
        later(&mut s, later_ts);
        let (ops, unparsed) = run_steps_with(&s, false);
        assert_eq!(
            cut_summary(&ops),
            [
                ("SELECT", None, true, StatusCode::Unset, 3, 4),
                (
                    "SELECT",
                    Some(1),
                    false,
                    StatusCode::Unset,
                    later_ts,
                    later_ts + 1
                )
            ]
        );
        assert_eq!(unparsed, 2);
    }
}

#[test]
fn error_seen_before_the_gap_is_kept() {
    // The failing statement's ErrorResponse arrived; the rest of the batch is lost.
    let mut s = steps(login("u", "d"));
    s.push(Step::Feed(
        Side::Client,
        query("SELECT * FROM missing; SELECT 2"),
        3,
    ));
    s.push(Step::Feed(Side::Server, error("42P01", "missing"), 4));
    s.push(Step::Gap(Side::Server, 6, 5));
    s.push(Step::Feed(Side::Client, query("SELECT 3"), 6));
    s.push(Step::Feed(
        Side::Server,
        [rows(1), complete("SELECT 1"), ready()].concat(),
        7,
    ));
    let (ops, unparsed) = run_steps(&s);
    assert_eq!(
        cut_summary(&ops),
        [
            ("SELECT", None, true, StatusCode::Error, 3, 5),
            ("SELECT", Some(1), false, StatusCode::Unset, 6, 7),
        ]
    );
    assert_eq!(unparsed, 1);
}

#[test]
fn gap_between_client_messages_keeps_answering_earlier_requests() {
    let mut p = PostgresParser::new(ParserConfig::default());
    let mut out = Vec::new();
    p.feed(Side::Client, &query("SELECT 1"), 3, &mut out);
    p.gap(Side::Client, 10, 3, &mut out);
    p.feed(Side::Client, &query("SELECT 2"), 3, &mut out);
    p.feed(
        Side::Server,
        &[rows(1), complete("SELECT 1"), ready()].concat(),
        4,
        &mut out,
    );
    p.feed(
        Side::Server,
        &[rows(1), complete("SELECT 1"), ready()].concat(),
        5,
        &mut out,
    );
    // The second query came while the first still waited: the answers to what was lost
    // in between come before its own, so it is dropped rather than paired by a guess.
    assert_eq!(out.len(), 1);
    let l = p.losses();
    assert_eq!(
        (l.get(Loss::Gap), l.get(Loss::Unpaired), l.total()),
        (1, 1, 2)
    );
    // Once nothing waits, the next request pairs again.
    p.feed(Side::Client, &query("SELECT 3"), 6, &mut out);
    p.feed(
        Side::Server,
        &[rows(3), complete("SELECT 3"), ready()].concat(),
        7,
        &mut out,
    );
    assert_eq!(out.len(), 2);
    assert_eq!(attr(&out[1], "db.statement"), Some(&json!("SELECT 3")));
    assert_eq!(attr(&out[1], "db.rowcount"), Some(&json!(3)));
}

#[test]
fn oversize_message_is_kept_truncated() {
    let cfg = ParserConfig {
        max_buffer: 64,
        max_statement: 20,
        ..ParserConfig::default()
    };
    let mut s = login("u", "d");
    s.push((
        Side::Client,
        query(&format!("INSERT INTO t VALUES ('{}')", "z".repeat(1000))),
        3,
    ));
    s.push((Side::Server, [complete("INSERT 0 1"), ready()].concat(), 4));
    let (ops, unparsed) = run_with(cfg.clone(), &s, false);
    assert_eq!((ops.clone(), unparsed), run_with(cfg, &s, true));
    assert_eq!(unparsed, 0);
    assert_eq!(
        attr(&ops[0], "db.statement"),
        Some(&json!("INSERT INTO t VALUES...[truncated]"))
    );
    assert_eq!(attr(&ops[0], "db.rowcount"), Some(&json!(1)));
}

#[test]
fn out_of_sync_stream_is_counted_not_parsed() {
    let mut p = PostgresParser::new(ParserConfig::default());
    let mut out = Vec::new();
    // TLS ciphertext where plaintext was expected.
    p.feed(
        Side::Client,
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00],
        1,
        &mut out,
    );
    p.feed(Side::Server, &[0x16, 0x03, 0x03, 0x00, 0x7a], 2, &mut out);
    p.close(3, &mut out);
    assert!(out.is_empty());
    // The client's bytes and the server's answer to them: one exchange, counted once.
    assert_eq!(p.unparsed(), 1);
}

#[test]
fn prepared_statements_are_bounded() {
    let mut p = PostgresParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for i in 0..(MAX_STATEMENTS * 3) {
        p.feed(
            Side::Client,
            &parse(&format!("s{i}"), "SELECT 1"),
            1,
            &mut out,
        );
        p.feed(Side::Server, &msg(b'1', &[]), 1, &mut out);
    }
    assert_eq!(p.statements.len(), MAX_STATEMENTS);
    assert!(p.pending.is_empty());
}

/// Bug fixed with the shared bounded map: re-parsing a statement name used to leave it
/// at its first insertion's place in the eviction order, so the unnamed statement that
/// every simple extended query re-parses was the first one forgotten once 256 named
/// statements had been prepared, and its Executes lost their statement text.
#[test]
fn a_statement_parsed_again_is_the_newest() {
    let mut p = PostgresParser::new(ParserConfig::default());
    let mut out = Vec::new();
    let mut prepare = |p: &mut PostgresParser, name: &str, sql: &str| {
        p.feed(Side::Client, &parse(name, sql), 1, &mut out);
        p.feed(Side::Server, &msg(b'1', &[]), 1, &mut out);
    };
    prepare(&mut p, "", "SELECT 0");
    for i in 1..MAX_STATEMENTS {
        prepare(&mut p, &format!("s{i}"), "SELECT 1");
    }
    prepare(&mut p, "", "UPDATE t SET a = 1");
    prepare(&mut p, "one_more", "SELECT 2");
    assert_eq!(p.statements.len(), MAX_STATEMENTS);
    assert!(p.statements.get("s1").is_none(), "the oldest is forgotten");
    let mut out = Vec::new();
    let batch = [bind("", ""), execute(""), sync()].concat();
    p.feed(Side::Client, &batch, 2, &mut out);
    let answer = [msg(b'2', &[]), complete("UPDATE 1"), ready()].concat();
    p.feed(Side::Server, &answer, 3, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].name, "UPDATE");
    assert_eq!(
        out[0].attributes.get("db.statement"),
        Some(&json!("UPDATE t SET a = 1"))
    );
}

#[test]
fn waiting_requests_are_bounded() {
    let mut p = PostgresParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for _ in 0..(MAX_PENDING + 10) {
        p.feed(Side::Client, &query("SELECT 1"), 1, &mut out);
    }
    assert_eq!(p.pending.len(), MAX_PENDING);
    assert_eq!(out.len(), 10);
}

#[test]
fn random_garbage_never_panics() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..2000 {
        let mut input = Vec::new();
        let len = (round % 300) + 1;
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            input.push(x as u8);
        }
        // Half the rounds start with a real handshake so the parser gets deep.
        if round % 2 == 0 {
            let mut real = vec![(round % 251) as u8];
            real.extend(startup(&[("user", "u")]));
            real.extend(auth_ok_ready());
            real.extend(input);
            input = real;
        }
        super::super::fuzz_one(Protocol::Postgres, &input);
    }
}

#[test]
fn requests_of_a_connection_already_open_are_recognised_and_garbage_is_not() {
    let parse = msg(b'P', b"__asyncpg_stmt_1__\0SELECT 'marker-1'\0\0\0");
    assert!(looks_like_request_midstream(&parse));
    assert!(looks_like_request_midstream(&msg(b'Q', b"SELECT 1\0")));
    assert!(looks_like_request_midstream(&msg(
        b'B',
        b"\0__asyncpg_stmt_1__\0\0\0"
    )));
    assert!(!looks_like_request_midstream(b"PING\r\n"));
    assert!(!looks_like_request_midstream(b"POST / HTTP/1.1\r\n"));
    assert!(!looks_like_request_midstream(&msg(b'Q', b"\x01\x02\x03\0")));
    assert!(!looks_like_request_midstream(&[
        0x17, 3, 3, 0, 5, 1, 2, 3, 4, 5
    ]));
    assert!(!looks_like_request_midstream(&[b'Q', 0xff, 0, 0, 0]));
}

#[test]
fn looks_like_startup_accepts_handshakes_only() {
    assert!(looks_like_startup(&untyped(SSL_REQUEST, &[])));
    assert!(looks_like_startup(&untyped(GSSENC_REQUEST, &[])));
    assert!(looks_like_startup(&untyped(
        CANCEL_REQUEST,
        &[0, 0, 0, 1, 0, 0, 0, 2]
    )));
    assert!(looks_like_startup(&startup(&[("user", "u")])));
    assert!(!looks_like_startup(&startup(&[("user", "u")])[..6]));
    assert!(
        !looks_like_startup(&untyped(131_072, &[0])),
        "protocol 2 is not parsed"
    );
    assert!(!looks_like_startup(&untyped(196_608, &[0; 20_000])));
    assert!(!looks_like_startup(&query("SELECT 1")));
    assert!(!looks_like_startup(b"GET / HTTP/1.1\r\n"));
    assert!(!looks_like_startup(b"*1\r\n$4\r\nPING\r\n"));
    assert_eq!(
        super::super::detect(Side::Client, &startup(&[("user", "u")])),
        Some(Protocol::Postgres)
    );
}

#[test]
fn command_tags_give_row_counts() {
    assert_eq!(tag_rowcount(b"SELECT 5"), Some(5));
    assert_eq!(tag_rowcount(b"INSERT 0 3"), Some(3));
    assert_eq!(tag_rowcount(b"MERGE 4"), Some(4));
    assert_eq!(tag_rowcount(b"CREATE TABLE"), None);
    assert_eq!(tag_rowcount(b"SELECT"), None);
    assert_eq!(tag_rowcount(b"SELECT 99999999999999999999999"), None);
}

#[test]
fn fuzz_seeds_replay_their_recordings() {
    // The seeds lay the recordings above out in fuzz_one's pieces; without gaps they
    // must still give every op, so the fuzzer starts deep in real conversations.
    for (seed, ops) in [
        (
            include_bytes!("../../../fuzz/seeds/postgres/psycopg2-seed55.bin").as_slice(),
            9,
        ),
        (
            include_bytes!("../../../fuzz/seeds/postgres/psycopg2-seeda7.bin").as_slice(),
            9,
        ),
        (
            include_bytes!("../../../fuzz/seeds/postgres/psycopg2-seed3c.bin").as_slice(),
            9,
        ),
        (
            include_bytes!("../../../fuzz/seeds/postgres/asyncpg-seed55.bin").as_slice(),
            10,
        ),
        (
            include_bytes!("../../../fuzz/seeds/postgres/asyncpg-seeda7.bin").as_slice(),
            10,
        ),
        (
            include_bytes!("../../../fuzz/seeds/postgres/asyncpg-seed3c.bin").as_slice(),
            10,
        ),
    ] {
        assert_eq!(super::super::fuzz_one(Protocol::Postgres, seed), ops);
    }
    for seed in [
        include_bytes!("../../../fuzz/seeds/postgres/psycopg2-seed4e.bin").as_slice(),
        include_bytes!("../../../fuzz/seeds/postgres/asyncpg-seed4e.bin").as_slice(),
    ] {
        // Every fifth piece is lost here: the parser resynchronises or gives up, without
        // panicking.
        super::super::fuzz_one(Protocol::Postgres, seed);
    }
    // Every seed, watched from a byte offset and with capture gaps (as the fuzz target
    // feeds it too): never a panic.
    for name in
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/postgres")).unwrap()
    {
        let seed = std::fs::read(name.unwrap().path()).unwrap();
        super::super::fuzz_resync(Protocol::Postgres, &seed);
    }
}

fn replay(recording: &str) -> Vec<Op> {
    run(&scripts::recording(recording))
}

fn summary(ops: &[Op]) -> Vec<(&str, Option<i64>, StatusCode, Option<&str>)> {
    ops.iter()
        .map(|o| {
            let code = attr(o, "db.error.code").and_then(Value::as_str);
            (
                o.name.as_str(),
                attr(o, "db.rowcount").and_then(Value::as_i64),
                o.status,
                code,
            )
        })
        .collect()
}

#[test]
fn recorded_psycopg2_session() {
    let ops = replay(PSYCOPG2_SESSION);
    use StatusCode::{Error, Unset};
    assert_eq!(
        summary(&ops),
        [
            ("BEGIN", None, Unset, None),
            ("SELECT", Some(3), Unset, None),
            ("INSERT", Some(2), Unset, None),
            ("UPDATE", Some(2), Unset, None),
            ("SELECT", None, Error, Some("42P01")),
            ("ROLLBACK", None, Unset, None),
            ("BEGIN", None, Unset, None),
            ("SELECT", Some(0), Unset, None),
            ("COMMIT", None, Unset, None),
        ]
    );
    assert!(ops
        .iter()
        .all(|o| attr(o, "db.user") == Some(&json!("openbox"))
            && attr(o, "db.name") == Some(&json!("shop"))));
    assert_eq!(
        ops[4].status_description.as_deref(),
        Some("relation \"missing\" does not exist")
    );
}

#[test]
fn recorded_asyncpg_session() {
    let ops = replay(ASYNCPG_SESSION);
    use StatusCode::{Error, Unset};
    assert_eq!(
        summary(&ops),
        [
            ("SELECT", Some(2), Unset, None),
            ("SELECT", Some(1), Unset, None),
            ("INSERT", Some(1), Unset, None),
            ("INSERT", Some(1), Unset, None),
            ("INSERT", Some(1), Unset, None),
            ("INSERT", Some(1), Unset, None),
            ("INSERT", None, Error, Some("23505")),
            ("SELEC", None, Error, Some("42601")),
            ("DELETE", Some(4), Unset, None),
            ("SELECT", Some(1), Unset, None),
        ]
    );
    assert_eq!(
        attr(&ops[0], "db.statement"),
        Some(&json!("SELECT id, name FROM items WHERE id > $1"))
    );
    // The first fetch prepares (Parse/Describe/Flush) before it binds and executes.
    assert_eq!((ops[0].start_ts, ops[0].end_ts), (3, 6));
    assert_eq!((ops[1].start_ts, ops[1].end_ts), (7, 8));
}

/// psycopg2 2.9 against PostgreSQL 15 (sslmode=disable), recorded through a proxy: simple queries, an error, a multi-statement query.
const PSYCOPG2_SESSION: &str = "\
C 000000240003000075736572006f70656e626f780064617461626173650073686f700000\n\
S 52000000080000000053000000166170706c69636174696f6e5f6e616d6500005300000019636c69656e745f656e\
     636f64696e670055544638005300000017446174655374796c650049534f2c204d44590053000000266465666175\
     6c745f7472616e73616374696f6e5f726561645f6f6e6c79006f6666005300000017696e5f686f745f7374616e64\
     6279006f6666005300000019696e74656765725f6461746574696d6573006f6e00530000001b496e74657276616c\
     5374796c6500706f73746772657300530000001569735f737570657275736572006f666600530000001973657276\
     65725f656e636f64696e6700555446380053000000327365727665725f76657273696f6e0031352e313820284465\
     6269616e2031352e31382d302b646562313275312900530000002273657373696f6e5f617574686f72697a617469\
     6f6e006f70656e626f780053000000237374616e646172645f636f6e666f726d696e675f737472696e6773006f6e\
     00530000001554696d655a6f6e65004574632f555443004b0000000c00002356218473155a0000000549\n\
C 510000000a424547494e00\n\
S 430000000a424547494e005a0000000554\n\
C 510000002b53454c4543542069642c206e616d652046524f4d206974656d73204f5244455220425920696400\n\
S 54000000320002696400000040020001000000170004ffffffff00006e616d650000004002000200000019ffffff\
     ffffff0000440000001400020000000131000000056170706c654400000015000200000001320000000662616e61\
     6e6144000000150002000000013300000006636865727279430000000d53454c4543542033005a0000000554\n\
C 5100000032494e5345525420494e544f206974656d732056414c554553202831302c20277827292c202831312c20\
     2779272900\n\
S 430000000f494e5345525420302032005a0000000554\n\
C 510000002f555044415445206974656d7320534554206e616d65203d20277a27205748455245206964203e3d2031\
     3000\n\
S 430000000d5550444154452032005a0000000554\n\
C 510000001a53454c454354202a2046524f4d206d697373696e6700\n\
S 450000006a534552524f5200564552524f5200433432503031004d72656c6174696f6e20226d697373696e672220\
     646f6573206e6f7420657869737400503135004670617273655f72656c6174696f6e2e63004c3133393200527061\
     727365724f70656e5461626c650000\n\
S 5a0000000545\n\
C 510000000d524f4c4c4241434b00\n\
S 430000000d524f4c4c4241434b005a0000000549\n\
C 510000000a424547494e00\n\
S 430000000a424547494e005a0000000554\n\
C 510000002f53454c45435420313b2044454c4554452046524f4d206974656d73205748455245206964203e3d2031\
     3000\n\
S 540000002100013f636f6c756d6e3f00000000000000000000170004ffffffff0000440000000b00010000000131\
     430000000d53454c454354203100430000000d44454c4554452030005a0000000554\n\
C 510000000b434f4d4d495400\n\
S 430000000b434f4d4d4954005a0000000549\n\
C 5800000004\n\
";
/// asyncpg 0.32 against PostgreSQL 15 (ssl=False), recorded through a proxy: Parse/Describe/Flush then Bind/Execute/Sync, executemany pipelining, a failing Execute, a failing Parse, simple queries.
const ASYNCPG_SESSION: &str = "\
C 0000003c00030000636c69656e745f656e636f64696e6700277574662d38270075736572006f70656e626f780064\
     617461626173650073686f700000\n\
S 52000000080000000053000000166170706c69636174696f6e5f6e616d6500005300000019636c69656e745f656e\
     636f64696e670055544638005300000017446174655374796c650049534f2c204d44590053000000266465666175\
     6c745f7472616e73616374696f6e5f726561645f6f6e6c79006f6666005300000017696e5f686f745f7374616e64\
     6279006f6666005300000019696e74656765725f6461746574696d6573006f6e00530000001b496e74657276616c\
     5374796c6500706f73746772657300530000001569735f737570657275736572006f666600530000001973657276\
     65725f656e636f64696e6700555446380053000000327365727665725f76657273696f6e0031352e313820284465\
     6269616e2031352e31382d302b646562313275312900530000002273657373696f6e5f617574686f72697a617469\
     6f6e006f70656e626f780053000000237374616e646172645f636f6e666f726d696e675f737472696e6773006f6e\
     00530000001554696d655a6f6e65004574632f555443004b0000000c0000235a426704335a0000000549\n\
C 50000000425f5f6173796e6370675f73746d745f315f5f0053454c4543542069642c206e616d652046524f4d2069\
     74656d73205748455245206964203e2024310000004400000018535f5f6173796e6370675f73746d745f315f5f00\
     4800000004\n\
S 3100000004740000000a00010000001754000000320002696400000040020001000000170004ffffffff00006e61\
     6d650000004002000200000019ffffffffffff0000\n\
C 420000002a005f5f6173796e6370675f73746d745f315f5f00000100010001000000040000000100010001450000\
     000900000000005300000004\n\
S 32000000044400000018000200000004000000020000000662616e616e6144000000180002000000040000000300\
     000006636865727279430000000d53454c4543542032005a0000000549\n\
C 420000002a005f5f6173796e6370675f73746d745f315f5f00000100010001000000040000000200010001450000\
     000900000000005300000004\n\
S 320000000444000000180002000000040000000300000006636865727279430000000d53454c4543542031005a00\
     00000549\n\
C 500000003b5f5f6173796e6370675f73746d745f325f5f00494e5345525420494e544f206974656d732056414c55\
     4553202824312c202432290000004400000018535f5f6173796e6370675f73746d745f325f5f004800000004\n\
S 3100000004740000000e000200000017000000196e00000004\n\
C 4200000031005f5f6173796e6370675f73746d745f325f5f00000200010001000200000004000000140000000177\
     00010001450000000900000000005300000004\n\
S 3200000004430000000f494e5345525420302031005a0000000549\n\
C 4200000031005f5f6173796e6370675f73746d745f325f5f00000200010001000200000004000000150000000161\
     00010001450000000900000000004200000031005f5f6173796e6370675f73746d745f325f5f0000020001000100\
     020000000400000016000000016200010001450000000900000000004200000031005f5f6173796e6370675f7374\
     6d745f325f5f00000200010001000200000004000000170000000163000100014500000009000000000053000000\
     04\n\
S 3200000004430000000f494e5345525420302031003200000004430000000f494e53455254203020310032000000\
     04430000000f494e5345525420302031005a0000000549\n\
C 4200000033005f5f6173796e6370675f73746d745f325f5f00000200010001000200000004000000140000000364\
     757000010001450000000900000000005300000004\n\
S 320000000445000000b5534552524f5200564552524f5200433233353035004d6475706c6963617465206b657920\
     76616c75652076696f6c6174657320756e6971756520636f6e73747261696e7420226974656d735f706b65792200\
     444b657920286964293d2832302920616c7265616479206578697374732e00737075626c696300746974656d7300\
     6e6974656d735f706b657900466e6274696e736572742e63004c36363400525f62745f636865636b5f756e697175\
     650000\n\
S 5a0000000549\n\
C 50000000215f5f6173796e6370675f73746d745f335f5f0053454c454320310000004400000018535f5f6173796e\
     6370675f73746d745f335f5f004800000004\n\
S 450000005d534552524f5200564552524f5200433432363031004d73796e746178206572726f72206174206f7220\
     6e656172202253454c45432200503100467363616e2e6c004c3131383800527363616e6e65725f79796572726f72\
     0000\n\
C 5300000004\n\
S 5a0000000549\n\
C 510000002544454c4554452046524f4d206974656d73205748455245206964203e3d20323000\n\
S 430000000d44454c4554452034005a0000000549\n\
C 510000001753454c45435420313b2053454c454354203200\n\
S 540000002100013f636f6c756d6e3f00000000000000000000170004ffffffff0000440000000b00010000000131\
     430000000d53454c454354203100540000002100013f636f6c756d6e3f00000000000000000000170004ffffffff\
     0000440000000b00010000000132430000000d53454c4543542031005a0000000549\n\
C 5800000004\n\
";

#[test]
fn recorded_sessions_watched_from_any_byte_offset_yield_every_later_exchange_paired_right() {
    for rec in [PSYCOPG2_SESSION, ASYNCPG_SESSION] {
        let s = scripts::recording(rec);
        for cut in [scripts::Cut::Start, scripts::Cut::Midstream] {
            let checked =
                scripts::every_offset_with(Protocol::Postgres, &s, cut, scripts::sql_unknowable);
            assert!(checked > 0, "{cut:?}");
        }
    }
}

/// [`scripts::one_side_first`] over the recorded sessions.
fn one_side_first(first: scripts::First) {
    for rec in [PSYCOPG2_SESSION, ASYNCPG_SESSION] {
        let s = scripts::recording(rec);
        let checked =
            scripts::one_side_first(Protocol::Postgres, &s, first, scripts::sql_unknowable);
        assert!(checked > 0);
    }
}

/// One side captured before the other at the start of a connection watched from its
/// middle (the TLS probes attaching): no op carries another's answer.
#[test]
fn recorded_sessions_with_one_side_captured_first_never_pair_wrongly() {
    one_side_first(scripts::First::Server);
}

/// The same with the client side captured first.
#[test]
fn recorded_sessions_with_the_client_side_captured_first_never_pair_wrongly() {
    one_side_first(scripts::First::Either);
}

/// Watched from its middle, the client side captured first: a query seen without its
/// answer, then another, then an answer. Which query it answers cannot be told from the
/// bytes: both are dropped, counted `unpaired`, and the next exchange pairs by order.
/// (Before the parser was told the connection was open before watching began, the
/// first query took the second's answer.)
#[test]
fn a_request_seen_without_its_answer_on_a_connection_watched_midstream_takes_no_other_answer() {
    let mut answer = rows(2);
    answer.extend(complete("SELECT 2"));
    answer.extend(ready());
    let op = scripts::an_answer_missed_at_a_midstream_start(
        Protocol::Postgres,
        [&query("SELECT 1"), &query("SELECT 2"), &query("SELECT 3")],
        &answer,
    );
    assert_eq!(op.attributes["db.statement"], json!("SELECT 3"));
    // One query waiting: its answer is its own, from the first.
    let mut p = PostgresParser::new(ParserConfig::default());
    p.watched_midstream();
    let mut out = Vec::new();
    p.feed(Side::Client, &query("SELECT 2"), 3, &mut out);
    p.feed(Side::Server, &answer, 4, &mut out);
    assert_eq!(out.len(), 1, "{out:#?}");
    assert_eq!(out[0].attributes["db.rowcount"], json!(2));
    assert_eq!(p.losses().total(), 0, "{:?}", p.losses());
}

#[test]
fn a_capture_gap_at_any_byte_offset_of_a_recorded_session_loses_only_what_it_cuts() {
    for rec in [PSYCOPG2_SESSION, ASYNCPG_SESSION] {
        let s = scripts::recording(rec);
        let checked = scripts::every_offset_with(
            Protocol::Postgres,
            &s,
            scripts::Cut::Gap,
            scripts::sql_unknowable,
        );
        assert!(checked > 0);
    }
}

/// A session with COPY both ways, laid out as psycopg2's `copy_expert` and the server
/// send it: COPY FROM STDIN with its rows in several CopyData writes and CopyDone alone;
/// COPY TO STDOUT whose CopyData rows arrive over several reads; a COPY the client
/// aborts with CopyFail; extended-protocol COPY (Parse/Bind/Execute/Sync, as asyncpg's
/// `copy_to_table` does); queries between them.
fn copy_session() -> Script {
    let copy_in = [0u8, 0, 2, 0, 0, 0, 0];
    let mut s = login("openbox", "shop");
    let mut push = |side, bytes: Vec<u8>| {
        let ts = s.len() as u64 + 1;
        s.push((side, bytes, ts));
    };
    use Side::{Client as C, Server as S};
    push(C, query("BEGIN"));
    push(S, [complete("BEGIN"), msg(b'Z', b"T")].concat());
    push(C, query("COPY items (id, name) FROM STDIN"));
    push(S, msg(b'G', &copy_in));
    push(
        C,
        [msg(b'd', b"1\tapple\n"), msg(b'd', b"2\tbanana\n")].concat(),
    );
    push(C, msg(b'd', b"3\tcherry\n4\tdate\n"));
    push(C, msg(b'c', &[]));
    push(S, [complete("COPY 4"), msg(b'Z', b"T")].concat());
    push(C, query("COPY items TO STDOUT"));
    push(
        S,
        [
            msg(b'H', &copy_in),
            msg(b'd', b"1\tapple\n"),
            msg(b'd', b"2\tbanana\n"),
        ]
        .concat(),
    );
    push(
        S,
        [msg(b'd', b"3\tcherry\n"), msg(b'd', b"4\tdate\n")].concat(),
    );
    push(
        S,
        [msg(b'c', &[]), complete("COPY 4"), msg(b'Z', b"T")].concat(),
    );
    push(C, query("SELECT count(*) FROM items"));
    push(S, [rows(1), complete("SELECT 1"), msg(b'Z', b"T")].concat());
    push(C, query("COPY items FROM STDIN"));
    push(S, msg(b'G', &copy_in));
    push(C, msg(b'd', b"5\telderberry\n"));
    push(C, msg(b'f', &cs("aborted by the client")));
    push(
        S,
        [
            error("57014", "COPY from stdin failed: aborted by the client"),
            msg(b'Z', b"E"),
        ]
        .concat(),
    );
    push(C, query("ROLLBACK"));
    push(S, [complete("ROLLBACK"), ready()].concat());
    push(
        C,
        [
            parse("", "COPY items (id, name) FROM STDIN"),
            bind("", ""),
            execute(""),
            sync(),
        ]
        .concat(),
    );
    push(
        S,
        [msg(b'1', &[]), msg(b'2', &[]), msg(b'G', &copy_in)].concat(),
    );
    push(
        C,
        [
            msg(b'd', b"6\tfig\n"),
            msg(b'd', b"7\tgrape\n"),
            msg(b'c', &[]),
        ]
        .concat(),
    );
    push(S, [complete("COPY 2"), ready()].concat());
    push(C, query("COPY (SELECT id FROM items) TO STDOUT"));
    push(
        S,
        [
            msg(b'H', &[0, 0, 1, 0, 0]),
            msg(b'd', b"1\n"),
            msg(b'd', b"2\n"),
            msg(b'c', &[]),
            complete("COPY 2"),
            ready(),
        ]
        .concat(),
    );
    push(C, query("SELECT 1"));
    push(S, [rows(1), complete("SELECT 1"), ready()].concat());
    s
}

#[test]
fn copy_session_gives_one_op_per_copy() {
    let ops = run(&copy_session());
    use StatusCode::{Error, Unset};
    let got: Vec<_> = ops
        .iter()
        .map(|o| {
            (
                o.name.as_str(),
                attr(o, "db.rowcount").and_then(Value::as_i64),
                o.status,
                o.start_ts,
                o.end_ts,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("BEGIN", None, Unset, 3, 4),
            ("COPY", Some(4), Unset, 5, 10),
            ("COPY", Some(4), Unset, 11, 14),
            ("SELECT", Some(1), Unset, 15, 16),
            ("COPY", None, Error, 17, 21),
            ("ROLLBACK", None, Unset, 22, 23),
            ("COPY", Some(2), Unset, 24, 27),
            ("COPY", Some(2), Unset, 28, 29),
            ("SELECT", Some(1), Unset, 30, 31),
        ]
    );
}

#[test]
fn a_copy_session_watched_from_any_byte_offset_yields_every_later_exchange_paired_right() {
    for cut in [scripts::Cut::Start, scripts::Cut::Midstream] {
        let checked = scripts::every_offset_with(
            Protocol::Postgres,
            &copy_session(),
            cut,
            scripts::sql_unknowable,
        );
        assert!(checked > 0, "{cut:?}");
    }
}

#[test]
fn a_capture_gap_at_any_byte_offset_of_a_copy_session_loses_only_what_it_cuts() {
    let checked = scripts::every_offset_with(
        Protocol::Postgres,
        &copy_session(),
        scripts::Cut::Gap,
        scripts::sql_unknowable,
    );
    assert!(checked > 0);
}

/// Each lost exchange is counted once: the loss on the side that lost it, not again
/// as an unpaired reply on the other.
#[test]
fn an_exchange_lost_to_a_gap_or_a_mid_stream_start_is_counted_once() {
    let mut q = query("SELECT 1");
    let mut answer = rows(1);
    answer.extend(complete("SELECT 1"));
    answer.extend(ready());
    // The capture cut the query: its reply answers nothing seen.
    let mut cut: Script = login("u", "d");
    cut.push((Side::Client, q[..3].to_vec(), 3));
    let mut p = PostgresParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (side, data, ts) in &cut {
        p.feed(*side, data, *ts, &mut out);
    }
    p.gap(Side::Client, (q.len() - 3) as u64, 3, &mut out);
    p.feed(Side::Server, &answer, 4, &mut out);
    p.feed(Side::Client, &query("SELECT 2"), 5, &mut out);
    p.feed(Side::Server, &answer, 6, &mut out);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(p.losses().total(), 1, "{:?}", p.losses());
    // Watching began inside the query.
    q.drain(..4);
    let mut p = PostgresParser::new(ParserConfig::default());
    let mut out = Vec::new();
    p.feed(Side::Client, &q, 1, &mut out);
    p.feed(Side::Server, &answer, 2, &mut out);
    p.feed(Side::Client, &query("SELECT 2"), 3, &mut out);
    p.feed(Side::Server, &answer, 4, &mut out);
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(p.losses().total() <= 1, "{:?}", p.losses());
}

#[test]
fn a_login_seen_from_its_last_bytes_is_counted_once() {
    // Watching began three bytes before the startup message's end: too few to judge.
    let s = scripts::recording(PSYCOPG2_SESSION);
    let mut p = PostgresParser::new(ParserConfig::default());
    let mut out = Vec::new();
    let (side, first, ts) = &s[0];
    p.feed(*side, &first[first.len() - 3..], *ts, &mut out);
    // The server's answer to the login answers nothing seen (counted), and the client's
    // next request shows those three bytes were not a message: the same exchange, not
    // counted again.
    for (side, d, ts) in &s[1..] {
        p.feed(*side, d, *ts, &mut out);
    }
    assert!(!out.is_empty());
    assert_eq!(p.losses().total(), 1, "{:?}", p.losses());
}

#[test]
fn a_gap_from_inside_a_parse_into_the_next_messages_is_counted_once() {
    let s = scripts::recording(ASYNCPG_SESSION);
    let mut p = PostgresParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (side, d, ts) in &s[..2] {
        p.feed(*side, d, *ts, &mut out);
    }
    // The batch Parse, Describe, Flush: the capture cut it inside the Parse's name, and
    // lost the rest of the write.
    let (side, d, ts) = &s[2];
    assert_eq!(d[0], b'P');
    p.feed(*side, &d[..10], *ts, &mut out);
    p.gap(*side, (d.len() - 10) as u64, *ts, &mut out);
    assert_eq!(p.losses().get(Loss::Gap), 1);
    assert_eq!(p.losses().total(), 1, "{:?}", p.losses());
}

#[test]
fn a_copy_watched_from_inside_its_response_is_counted_once() {
    // Watching began inside the server's CopyInResponse: the client's first bytes are
    // the copy's data, the other half of the same exchange.
    let s = copy_session();
    let mut p = PostgresParser::new(ParserConfig::default());
    let mut out = Vec::new();
    let (side, d, ts) = &s[5];
    assert_eq!((*side, d[0]), (Side::Server, b'G'));
    p.feed(*side, &d[1..], *ts, &mut out);
    for (side, d, ts) in &s[6..] {
        p.feed(*side, d, *ts, &mut out);
    }
    assert!(!out.is_empty());
    assert_eq!(p.losses().total(), 1, "{:?}", p.losses());
}
