use serde_json::{json, Value};

use super::*;
use crate::protocol::StatusCode;

// --- packet builders (MySQL source docs, "Client/Server Protocol") ---

const CLIENT_LONG_FLAG: u64 = 1 << 2;
const CLIENT_MULTI_STATEMENTS: u64 = 1 << 16;
const CLIENT_MULTI_RESULTS: u64 = 1 << 17;
const CLIENT_PLUGIN_AUTH: u64 = 1 << 19;
/// What a current client library offers (without DEPRECATE_EOF).
const BASE: u64 = CLIENT_MYSQL
    | CLIENT_LONG_FLAG
    | CLIENT_CONNECT_WITH_DB
    | CLIENT_PROTOCOL_41
    | CLIENT_TRANSACTIONS
    | CLIENT_SECURE_CONNECTION
    | CLIENT_MULTI_STATEMENTS
    | CLIENT_MULTI_RESULTS
    | CLIENT_PLUGIN_AUTH
    | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA;

fn pkt(seq: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = (payload.len() as u32).to_le_bytes()[..3].to_vec();
    p.push(seq);
    p.extend_from_slice(payload);
    p
}

/// Consecutive packets with sequence ids from `seq`.
fn pkts(seq: u8, payloads: &[Vec<u8>]) -> Vec<u8> {
    payloads
        .iter()
        .enumerate()
        .flat_map(|(i, p)| pkt(seq + i as u8, p))
        .collect()
}

fn int(n: u64) -> Vec<u8> {
    match n {
        0..=250 => vec![n as u8],
        251..=0xffff => [vec![0xfc], (n as u16).to_le_bytes().to_vec()].concat(),
        0x1_0000..=0xff_ffff => [vec![0xfd], (n as u32).to_le_bytes()[..3].to_vec()].concat(),
        _ => [vec![0xfe], n.to_le_bytes().to_vec()].concat(),
    }
}

fn ls(v: &str) -> Vec<u8> {
    [int(v.len() as u64), v.as_bytes().to_vec()].concat()
}

fn cs(v: &str) -> Vec<u8> {
    [v.as_bytes(), &[0]].concat()
}

fn greeting(caps: u64) -> Vec<u8> {
    let mut g = vec![0x0a];
    g.extend(cs("8.0.36"));
    g.extend(42u32.to_le_bytes());
    g.extend(b"abcdefgh\0");
    g.extend((caps as u16).to_le_bytes());
    g.push(0xff);
    g.extend(2u16.to_le_bytes());
    g.extend(((caps >> 16) as u16).to_le_bytes());
    g.push(21);
    g.extend([0; 6]);
    g.extend(((caps >> 32) as u32).to_le_bytes());
    g.extend(b"ijklmnopqrst\0");
    g.extend(cs("caching_sha2_password"));
    pkt(0, &g)
}

fn handshake_response(seq: u8, caps: u64, user: &str, db: Option<&str>) -> Vec<u8> {
    let caps = if db.is_some() {
        caps
    } else {
        caps & !CLIENT_CONNECT_WITH_DB
    };
    let mut r = (caps as u32).to_le_bytes().to_vec();
    r.extend(16_777_216u32.to_le_bytes());
    r.push(45);
    r.extend([0; 19]);
    r.extend(((caps >> 32) as u32).to_le_bytes());
    r.extend(cs(user));
    r.extend(ls("01234567890123456789"));
    if let Some(db) = db {
        r.extend(cs(db));
    }
    r.extend(cs("caching_sha2_password"));
    pkt(seq, &r)
}

fn ok(affected: u64, status: u16) -> Vec<u8> {
    [
        vec![0],
        int(affected),
        int(0),
        status.to_le_bytes().to_vec(),
        vec![0, 0],
    ]
    .concat()
}

/// The OK packet that ends rows under CLIENT_DEPRECATE_EOF.
fn ok_fe(status: u16) -> Vec<u8> {
    [
        vec![0xfe],
        int(0),
        int(0),
        status.to_le_bytes().to_vec(),
        vec![0, 0],
    ]
    .concat()
}

fn eof(status: u16) -> Vec<u8> {
    [vec![0xfe, 0, 0], status.to_le_bytes().to_vec()].concat()
}

fn err(code: u16, state: &str, message: &str) -> Vec<u8> {
    [
        vec![0xff],
        code.to_le_bytes().to_vec(),
        b"#".to_vec(),
        state.as_bytes().to_vec(),
        message.as_bytes().to_vec(),
    ]
    .concat()
}

fn column(name: &str) -> Vec<u8> {
    let mut c = [ls("def"), ls("shop"), ls("t"), ls("t"), ls(name), ls(name)].concat();
    c.push(0x0c);
    c.extend(45u16.to_le_bytes());
    c.extend(80u32.to_le_bytes());
    c.extend([0xfd, 0, 0, 0, 0, 0]);
    c
}

/// A text result set's packets: count, definitions, [EOF], rows, terminator.
fn result_set(seq: u8, caps: u64, cols: usize, rows: usize, status: u16) -> Vec<u8> {
    let mut p = vec![int(cols as u64)];
    p.extend((0..cols).map(|i| column(&format!("c{i}"))));
    let deprecate = caps & CLIENT_DEPRECATE_EOF != 0;
    if !deprecate {
        p.push(eof(0));
    }
    p.extend((0..rows).map(|r| (0..cols).flat_map(|c| ls(&format!("{r}-{c}"))).collect()));
    p.push(if deprecate {
        ok_fe(status)
    } else {
        eof(status)
    });
    pkts(seq, &p)
}

fn command(cmd: u8, arg: &[u8]) -> Vec<u8> {
    pkt(0, &[&[cmd], arg].concat())
}

fn query(sql: &str) -> Vec<u8> {
    command(COM_QUERY, sql.as_bytes())
}

use crate::protocol::scripts::{self, Script};

fn connect(caps: u64, user: &str, db: Option<&str>) -> Script {
    vec![
        (
            Side::Server,
            greeting(caps | CLIENT_DEPRECATE_EOF | CLIENT_QUERY_ATTRIBUTES),
            1,
        ),
        (Side::Client, handshake_response(1, caps, user, db), 2),
        (Side::Server, pkt(2, &ok(0, 2)), 3),
    ]
}

fn run_with(cfg: ParserConfig, script: &Script, byte_at_a_time: bool) -> (Vec<Op>, u64) {
    scripts::run_with(Protocol::Mysql, cfg, script, byte_at_a_time)
}

/// Runs the script whole and one byte at a time; both must agree and parse cleanly.
fn run(script: &Script) -> Vec<Op> {
    scripts::run(Protocol::Mysql, script)
}

fn attr<'a>(op: &'a Op, k: &str) -> Option<&'a Value> {
    op.attributes.get(k)
}

fn summary(ops: &[Op]) -> Vec<(String, Option<Value>, StatusCode, u64)> {
    ops.iter()
        .map(|o| {
            (
                o.name.clone(),
                attr(o, "db.rowcount").cloned(),
                o.status,
                o.end_ts,
            )
        })
        .collect()
}

#[test]
fn handshake_records_user_and_database() {
    let mut s = connect(BASE, "alice", Some("shop"));
    s.push((Side::Client, query("SELECT 1"), 4));
    s.push((Side::Server, result_set(1, BASE, 1, 1, 2), 5));
    let ops = run(&s);
    assert_eq!(ops.len(), 1);
    assert_eq!(attr(&ops[0], "db.user"), Some(&json!("alice")));
    assert_eq!(attr(&ops[0], "db.name"), Some(&json!("shop")));
    assert!(attr(&ops[0], "db.system").is_none());
}

#[test]
fn ssl_request_then_handshake_response_in_plaintext() {
    let caps = BASE | CLIENT_SSL;
    let mut ssl = (caps as u32).to_le_bytes().to_vec();
    ssl.extend(16_777_216u32.to_le_bytes());
    ssl.push(45);
    ssl.extend([0; 23]);
    let s: Script = vec![
        (Side::Server, greeting(caps), 1),
        (Side::Client, pkt(1, &ssl), 2),
        (
            Side::Client,
            handshake_response(2, caps, "bob", Some("app")),
            3,
        ),
        (Side::Server, pkt(3, &ok(0, 2)), 4),
        (Side::Client, query("DELETE FROM t"), 5),
        (Side::Server, pkt(1, &ok(4, 2)), 6),
    ];
    let ops = run(&s);
    assert_eq!(ops.len(), 1);
    assert_eq!(attr(&ops[0], "db.user"), Some(&json!("bob")));
    assert_eq!(attr(&ops[0], "db.name"), Some(&json!("app")));
    assert_eq!(attr(&ops[0], "db.rowcount"), Some(&json!(4)));
}

#[test]
fn auth_switch_exchange_ends_at_ok() {
    let s: Script = vec![
        (Side::Server, greeting(BASE), 1),
        (Side::Client, handshake_response(1, BASE, "u", None), 2),
        (
            Side::Server,
            pkt(
                2,
                &[
                    b"\xfemysql_native_password\0".as_slice(),
                    b"01234567890123456789\0",
                ]
                .concat(),
            ),
            3,
        ),
        (Side::Client, pkt(3, b"01234567890123456789"), 4),
        (Side::Server, pkt(4, b"\x01\x03"), 5),
        (Side::Server, pkt(5, &ok(0, 2)), 5),
        (Side::Client, query("SELECT 1"), 6),
        (Side::Server, result_set(1, BASE, 1, 1, 2), 7),
    ];
    let ops = run(&s);
    assert_eq!(
        summary(&ops),
        [("SELECT".into(), Some(json!(1)), StatusCode::Unset, 7)]
    );
    assert!(attr(&ops[0], "db.name").is_none());
}

#[test]
fn select_rows_counted_with_eof_packets() {
    let mut s = connect(BASE, "u", Some("shop"));
    s.push((Side::Client, query("SELECT id, name FROM items"), 4));
    s.push((Side::Server, result_set(1, BASE, 2, 3, 2), 5));
    let ops = run(&s);
    let op = &ops[0];
    assert_eq!(op.name, "SELECT");
    assert_eq!(
        attr(op, "db.statement"),
        Some(&json!("SELECT id, name FROM items"))
    );
    assert_eq!(attr(op, "db.operation"), Some(&json!("SELECT")));
    assert_eq!(attr(op, "db.rowcount"), Some(&json!(3)));
    assert_eq!(
        (op.start_ts, op.end_ts, op.status),
        (4, 5, StatusCode::Unset)
    );
}

#[test]
fn select_rows_counted_with_deprecate_eof() {
    let caps = BASE | CLIENT_DEPRECATE_EOF;
    let mut s = connect(caps, "u", Some("shop"));
    s.push((Side::Client, query("SELECT * FROM items"), 4));
    s.push((Side::Server, result_set(1, caps, 2, 5, 2), 5));
    s.push((Side::Client, query("SELECT * FROM empty"), 6));
    s.push((Side::Server, result_set(1, caps, 1, 0, 2), 7));
    let ops = run(&s);
    assert_eq!(
        summary(&ops),
        [
            ("SELECT".into(), Some(json!(5)), StatusCode::Unset, 5),
            ("SELECT".into(), Some(json!(0)), StatusCode::Unset, 7)
        ]
    );
}

#[test]
fn insert_reports_affected_rows() {
    let mut s = connect(BASE, "u", Some("shop"));
    s.push((
        Side::Client,
        query("  /* c */ INSERT INTO t VALUES (1),(2),(3)"),
        4,
    ));
    s.push((Side::Server, pkt(1, &ok(3, 2)), 5));
    let ops = run(&s);
    assert_eq!(
        summary(&ops),
        [("INSERT".into(), Some(json!(3)), StatusCode::Unset, 5)]
    );
}

#[test]
fn server_error_reports_code_and_message() {
    let mut s = connect(BASE, "u", Some("shop"));
    s.push((Side::Client, query("SELECT * FROM missing"), 4));
    s.push((
        Side::Server,
        pkt(1, &err(1146, "42S02", "Table 'shop.missing' doesn't exist")),
        5,
    ));
    s.push((Side::Client, query("SELECT 1"), 6));
    s.push((Side::Server, result_set(1, BASE, 1, 1, 2), 7));
    let ops = run(&s);
    assert_eq!(ops[0].status, StatusCode::Error);
    assert_eq!(
        ops[0].status_description.as_deref(),
        Some("Table 'shop.missing' doesn't exist")
    );
    assert_eq!(attr(&ops[0], "db.error.code"), Some(&json!(1146)));
    assert!(attr(&ops[0], "db.rowcount").is_none());
    assert_eq!(ops[1].status, StatusCode::Unset);
}

#[test]
fn init_db_changes_database_for_later_ops() {
    let mut s = connect(BASE, "u", Some("shop"));
    s.push((Side::Client, command(COM_INIT_DB, b"billing"), 4));
    s.push((Side::Server, pkt(1, &ok(0, 2)), 5));
    s.push((Side::Client, query("SELECT 1"), 6));
    s.push((Side::Server, result_set(1, BASE, 1, 1, 2), 7));
    s.push((Side::Client, command(COM_INIT_DB, b"nope"), 8));
    s.push((
        Side::Server,
        pkt(1, &err(1049, "42000", "Unknown database 'nope'")),
        9,
    ));
    s.push((Side::Client, query("SELECT 2"), 10));
    s.push((Side::Server, result_set(1, BASE, 1, 1, 2), 11));
    let ops = run(&s);
    assert_eq!(ops[0].name, "INIT_DB");
    assert_eq!(attr(&ops[0], "db.operation"), Some(&json!("INIT_DB")));
    assert_eq!(attr(&ops[0], "db.statement"), Some(&json!("USE billing")));
    assert_eq!(attr(&ops[1], "db.name"), Some(&json!("billing")));
    assert_eq!(ops[2].status, StatusCode::Error);
    assert_eq!(attr(&ops[3], "db.name"), Some(&json!("billing")));
}

#[test]
fn use_statement_changes_database() {
    let mut s = connect(BASE, "u", None);
    s.push((Side::Client, query("use `my db`"), 4));
    s.push((Side::Server, pkt(1, &ok(0, 2)), 5));
    s.push((Side::Client, query("SELECT 1"), 6));
    s.push((Side::Server, result_set(1, BASE, 1, 1, 2), 7));
    let ops = run(&s);
    assert!(attr(&ops[0], "db.name").is_none());
    assert_eq!(ops[0].name, "USE");
    assert_eq!(attr(&ops[1], "db.name"), Some(&json!("my db")));
}

/// COM_STMT_PREPARE_OK and its definitions.
fn prepare_ok(caps: u64, id: u32, cols: u16, params: u16) -> Vec<u8> {
    let mut first = vec![0];
    first.extend(id.to_le_bytes());
    first.extend(cols.to_le_bytes());
    first.extend(params.to_le_bytes());
    first.extend([0, 0, 0]);
    let mut p = vec![first];
    let deprecate = caps & CLIENT_DEPRECATE_EOF != 0;
    p.extend((0..params).map(|_| column("?")));
    if params > 0 && !deprecate {
        p.push(eof(2));
    }
    p.extend((0..cols).map(|i| column(&format!("c{i}"))));
    if cols > 0 && !deprecate {
        p.push(eof(2));
    }
    pkts(1, &p)
}

fn execute(id: u32, params: &[u8]) -> Vec<u8> {
    let mut e = id.to_le_bytes().to_vec();
    e.push(0);
    e.extend(1u32.to_le_bytes());
    e.extend(params);
    command(COM_STMT_EXECUTE, &e)
}

/// A binary result set: rows start with 0x00 and a NULL bitmap.
fn binary_result(caps: u64, cols: usize, rows: usize) -> Vec<u8> {
    let mut p = vec![int(cols as u64)];
    p.extend((0..cols).map(|i| column(&format!("c{i}"))));
    let deprecate = caps & CLIENT_DEPRECATE_EOF != 0;
    if !deprecate {
        p.push(eof(2));
    }
    p.extend((0..rows).map(|_| [vec![0, 0], (0..cols).flat_map(|_| ls("v")).collect()].concat()));
    p.push(if deprecate { ok_fe(2) } else { eof(2) });
    pkts(1, &p)
}

fn prepare_then_execute(caps: u64) {
    let mut s = connect(caps, "u", Some("shop"));
    let sql = "SELECT id, name FROM items WHERE id > ?";
    s.push((Side::Client, command(COM_STMT_PREPARE, sql.as_bytes()), 4));
    s.push((Side::Server, prepare_ok(caps, 7, 2, 1), 5));
    // One parameter: NULL bitmap, new-params-bound flag, type LONGLONG, value.
    let params = [vec![0, 1, 8, 0], 1u64.to_le_bytes().to_vec()].concat();
    s.push((Side::Client, execute(7, &params), 6));
    s.push((Side::Server, binary_result(caps, 2, 2), 7));
    let upd = "UPDATE items SET name = ? WHERE id = ?";
    s.push((Side::Client, command(COM_STMT_PREPARE, upd.as_bytes()), 8));
    s.push((Side::Server, prepare_ok(caps, 8, 0, 2), 9));
    s.push((
        Side::Client,
        execute(
            8,
            &[
                vec![0, 1, 0xfd, 0, 8, 0],
                ls("x"),
                1u64.to_le_bytes().to_vec(),
            ]
            .concat(),
        ),
        10,
    ));
    s.push((Side::Server, pkt(1, &ok(1, 2)), 11));
    s.push((
        Side::Client,
        command(COM_STMT_CLOSE, &7u32.to_le_bytes()),
        12,
    ));
    s.push((
        Side::Client,
        command(COM_STMT_RESET_FOR_TEST, &8u32.to_le_bytes()),
        13,
    ));
    s.push((Side::Server, pkt(1, &ok(0, 2)), 14));
    s.push((Side::Client, execute(7, &[]), 15));
    s.push((
        Side::Server,
        pkt(1, &err(1243, "HY000", "Unknown prepared statement handler")),
        16,
    ));
    let ops = run(&s);
    assert_eq!(
        summary(&ops),
        [
            ("SELECT".into(), Some(json!(2)), StatusCode::Unset, 7),
            ("UPDATE".into(), Some(json!(1)), StatusCode::Unset, 11),
            ("EXECUTE".into(), None, StatusCode::Error, 16),
        ]
    );
    assert_eq!(attr(&ops[0], "db.statement"), Some(&json!(sql)));
    assert_eq!(ops[0].start_ts, 6);
    assert_eq!(attr(&ops[1], "db.statement"), Some(&json!(upd)));
}

const COM_STMT_RESET_FOR_TEST: u8 = 0x1a;

#[test]
fn prepare_then_execute_without_deprecate_eof() {
    prepare_then_execute(BASE);
}

#[test]
fn prepare_then_execute_with_deprecate_eof() {
    prepare_then_execute(BASE | CLIENT_DEPRECATE_EOF);
}

#[test]
fn mariadb_pipelined_prepare_and_execute_of_last_statement() {
    // MariaDB Connector/J and /C send COM_STMT_PREPARE and COM_STMT_EXECUTE with
    // statement id 0xFFFFFFFF together, before the PREPARE_OK.
    let caps = BASE | CLIENT_DEPRECATE_EOF;
    let mut s = connect(caps, "u", Some("shop"));
    s.push((Side::Client, command(COM_STMT_PREPARE, b"SELECT 1"), 4));
    s.push((Side::Client, command(COM_STMT_PREPARE, b"DELETE FROM t"), 4));
    s.push((Side::Client, execute(u32::MAX, &[]), 4));
    s.push((
        Side::Server,
        [
            prepare_ok(caps, 1, 1, 0),
            prepare_ok(caps, 2, 0, 0),
            pkt(1, &ok(5, 2)),
        ]
        .concat(),
        5,
    ));
    let ops = run(&s);
    assert_eq!(
        summary(&ops),
        [("DELETE".into(), Some(json!(5)), StatusCode::Unset, 5)]
    );
}

#[test]
fn failed_prepare_is_reported() {
    let mut s = connect(BASE, "u", Some("shop"));
    s.push((Side::Client, command(COM_STMT_PREPARE, b"SELEC 1"), 4));
    s.push((
        Side::Server,
        pkt(
            1,
            &err(1064, "42000", "You have an error in your SQL syntax"),
        ),
        5,
    ));
    let ops = run(&s);
    assert_eq!(
        summary(&ops),
        [("SELEC".into(), None, StatusCode::Error, 5)]
    );
    assert_eq!(attr(&ops[0], "db.statement"), Some(&json!("SELEC 1")));
}

#[test]
fn multi_results_report_first_rowcount_and_later_errors() {
    let caps = BASE | CLIENT_DEPRECATE_EOF;
    let mut s = connect(caps, "u", Some("shop"));
    let more = SERVER_MORE_RESULTS_EXISTS | 2;
    s.push((
        Side::Client,
        query("SELECT * FROM a; SELECT * FROM b; UPDATE c SET x = 1"),
        4,
    ));
    let mut resp = result_set(1, caps, 1, 2, more);
    resp.extend(result_set(5, caps, 3, 4, more));
    resp.extend(pkt(12, &ok(6, 2)));
    s.push((Side::Server, resp, 5));
    s.push((Side::Client, query("CALL p()"), 6));
    let mut resp = result_set(1, caps, 1, 1, more);
    resp.extend(pkt(5, &err(1054, "42S22", "Unknown column 'z'")));
    s.push((Side::Server, resp, 7));
    // Without DEPRECATE_EOF the flag rides on the EOF packet.
    let mut s2 = connect(BASE, "u", Some("shop"));
    s2.push((Side::Client, query("SELECT 1; SELECT 2"), 4));
    s2.push((
        Side::Server,
        [
            result_set(1, BASE, 1, 1, more),
            result_set(5, BASE, 1, 1, 2),
        ]
        .concat(),
        5,
    ));
    s2.push((Side::Client, query("SELECT 3"), 6));
    s2.push((Side::Server, result_set(1, BASE, 1, 1, 2), 7));
    let ops = run(&s);
    assert_eq!(
        summary(&ops),
        [
            ("SELECT".into(), Some(json!(2)), StatusCode::Unset, 5),
            ("CALL".into(), Some(json!(1)), StatusCode::Error, 7)
        ]
    );
    assert_eq!(run(&s2).len(), 2);
}

#[test]
fn optional_metadata_can_skip_column_definitions() {
    let caps = BASE | CLIENT_DEPRECATE_EOF | CLIENT_OPTIONAL_RESULTSET_METADATA;
    let mut s: Script = vec![
        (Side::Server, greeting(caps), 1),
        (Side::Client, handshake_response(1, caps, "u", None), 2),
        (Side::Server, pkt(2, &ok(0, 2)), 3),
    ];
    s.push((Side::Client, query("SELECT 1, 2"), 4));
    // Column count 2, metadata_follows = RESULTSET_METADATA_NONE, then rows.
    s.push((
        Side::Server,
        pkts(1, &[vec![2, 0], [ls("1"), ls("2")].concat(), ok_fe(2)]),
        5,
    ));
    assert_eq!(
        summary(&run(&s)),
        [("SELECT".into(), Some(json!(1)), StatusCode::Unset, 5)]
    );
}

#[test]
fn query_attributes_prefix_is_skipped() {
    let caps = BASE | CLIENT_QUERY_ATTRIBUTES;
    let mut s = connect(caps, "u", Some("shop"));
    // No attributes: counts 0 and 1.
    s.push((Side::Client, command(COM_QUERY, b"\x00\x01SELECT 1"), 4));
    s.push((Side::Server, result_set(1, caps, 1, 1, 2), 5));
    // One string attribute "trace" = "abc": bitmap, bound flag, type + name, value.
    let mut q = vec![1, 1, 0, 1, 0xfe, 0];
    q.extend(ls("trace"));
    q.extend(ls("abc"));
    q.extend(b"INSERT INTO t VALUES (1)");
    s.push((Side::Client, command(COM_QUERY, &q), 6));
    s.push((Side::Server, pkt(1, &ok(1, 2)), 7));
    let ops = run(&s);
    assert_eq!(attr(&ops[0], "db.statement"), Some(&json!("SELECT 1")));
    assert_eq!(
        attr(&ops[1], "db.statement"),
        Some(&json!("INSERT INTO t VALUES (1)"))
    );
}

#[test]
fn utility_commands_produce_no_ops_and_keep_sync() {
    let mut s = connect(BASE, "u", Some("shop"));
    s.push((Side::Client, command(0x0e, &[]), 4)); // COM_PING
    s.push((Side::Server, pkt(1, &ok(0, 2)), 5));
    s.push((Side::Client, command(COM_STATISTICS, &[]), 6));
    s.push((Side::Server, pkt(1, b"Uptime: 5  Threads: 1"), 7));
    s.push((Side::Client, command(COM_FIELD_LIST, b"items\0"), 8));
    s.push((
        Side::Server,
        pkts(1, &[column("id"), column("name"), eof(2)]),
        9,
    ));
    s.push((Side::Client, query("SELECT 1"), 10));
    s.push((Side::Server, result_set(1, BASE, 1, 1, 2), 11));
    s.push((Side::Client, command(COM_QUIT, &[]), 12));
    let ops = run(&s);
    assert_eq!(
        summary(&ops),
        [("SELECT".into(), Some(json!(1)), StatusCode::Unset, 11)]
    );
}

#[test]
fn load_data_local_infile_keeps_sync() {
    let mut s = connect(BASE, "u", Some("shop"));
    s.push((
        Side::Client,
        query("LOAD DATA LOCAL INFILE 'x.csv' INTO TABLE t"),
        4,
    ));
    s.push((Side::Server, pkt(1, b"\xfbx.csv"), 5));
    s.push((
        Side::Client,
        [pkt(2, b"1,a\n2,b\n"), pkt(3, b"")].concat(),
        6,
    ));
    s.push((Side::Server, pkt(4, &ok(2, 2)), 7));
    let ops = run(&s);
    assert_eq!(
        summary(&ops),
        [("LOAD".into(), Some(json!(2)), StatusCode::Unset, 7)]
    );
}

#[test]
fn payloads_over_16_mib_are_reassembled() {
    let mut s = connect(BASE, "u", Some("shop"));
    let sql = format!("INSERT INTO blobs VALUES ('{}')", "b".repeat(MAX_PACKET));
    let payload = [&[COM_QUERY], sql.as_bytes()].concat();
    let (a, b) = payload.split_at(MAX_PACKET);
    s.push((Side::Client, [pkt(0, a), pkt(1, b)].concat(), 4));
    s.push((Side::Server, pkt(1, &ok(1, 2)), 5));
    let cfg = ParserConfig {
        max_statement: 30,
        ..ParserConfig::default()
    };
    let (ops, unparsed) = run_with(cfg, &s, false);
    assert_eq!(unparsed, 0);
    assert_eq!(
        summary(&ops),
        [("INSERT".into(), Some(json!(1)), StatusCode::Unset, 5)]
    );
    assert_eq!(
        attr(&ops[0], "db.statement"),
        Some(&json!("INSERT INTO blobs VALUES ('bbb...[truncated]"))
    );
}

#[test]
fn mariadb_progress_reports_are_not_errors() {
    let mut s = connect(BASE, "u", Some("shop"));
    s.push((Side::Client, query("ALTER TABLE t ADD c INT"), 4));
    s.push((
        Side::Server,
        [
            pkt(1, b"\xff\xff\xff\x01\x01\x00\x10\x00\x00\x05alter"),
            pkt(2, &ok(0, 2)),
        ]
        .concat(),
        5,
    ));
    let ops = run(&s);
    assert_eq!(
        summary(&ops),
        [("ALTER".into(), Some(json!(0)), StatusCode::Unset, 5)]
    );
}

#[test]
fn compressed_connection_is_not_parsed() {
    let caps = BASE | CLIENT_COMPRESS;
    let mut s = connect(caps, "u", None);
    s.push((
        Side::Client,
        b"\x0d\x00\x00\x00\x00\x00\x00\x09\x00\x00\x00\x03SELECT 1".to_vec(),
        4,
    ));
    let (ops, unparsed) = run_with(ParserConfig::default(), &s, false);
    assert!(ops.is_empty());
    assert_eq!(unparsed, 1);
}

#[test]
fn close_emits_requests_still_waiting() {
    let mut s = connect(BASE, "u", Some("shop"));
    s.push((Side::Client, query("SELECT SLEEP(10)"), 4));
    s.push((Side::Server, pkts(1, &[int(1), column("x"), eof(2)]), 5));
    let ops = run(&s);
    assert_eq!(
        summary(&ops),
        [("SELECT".into(), None, StatusCode::Unset, 1000)]
    );
}

#[test]
fn gap_inside_packet_skips_it() {
    let mut p = MysqlParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (side, data, ts) in connect(BASE, "u", Some("shop")) {
        p.feed(side, &data, ts, &mut out);
    }
    let q = query(&format!("INSERT INTO t VALUES ('{}')", "x".repeat(400)));
    p.feed(Side::Client, &q[..60], 4, &mut out);
    p.gap(Side::Client, (q.len() - 60) as u64, 4, &mut out);
    // A row cut short in the response.
    let resp = [
        pkts(1, &[int(1), column("x"), eof(2), ls(&"y".repeat(300))]),
        pkt(5, &eof(2)),
    ]
    .concat();
    let cut = resp.len() - 9 - 100;
    p.feed(Side::Server, &resp[..cut], 5, &mut out);
    p.gap(Side::Server, 100, 5, &mut out);
    p.feed(Side::Server, &resp[cut + 100..], 6, &mut out);
    p.feed(Side::Client, &query("SELECT 2"), 7, &mut out);
    p.feed(Side::Server, &result_set(1, BASE, 1, 1, 2), 8, &mut out);
    assert_eq!(p.unparsed(), 0);
    assert_eq!(
        summary(&out),
        [
            ("INSERT".into(), Some(json!(1)), StatusCode::Unset, 6),
            ("SELECT".into(), Some(json!(1)), StatusCode::Unset, 8)
        ]
    );
    assert!(attr(&out[0], "db.statement")
        .unwrap()
        .as_str()
        .unwrap()
        .starts_with("INSERT INTO t VALUES ('xxx"));
}

#[test]
fn gap_between_packets_ends_the_command_and_resynchronises_at_the_next() {
    let mut p = MysqlParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (side, data, ts) in connect(BASE, "u", Some("shop")) {
        p.feed(side, &data, ts, &mut out);
    }
    p.feed(Side::Client, &query("SELECT 1"), 4, &mut out);
    p.gap(Side::Server, 30, 5, &mut out);
    assert_eq!((p.unparsed(), out.len()), (1, 1));
    assert_eq!((out[0].end_ts, out[0].status), (5, StatusCode::Unset));
    p.feed(Side::Client, &query("SELECT 2"), 6, &mut out);
    p.feed(Side::Server, &result_set(1, BASE, 1, 1, 2), 7, &mut out);
    p.close(8, &mut out);
    assert_eq!(
        (p.losses().get(Loss::Gap), p.unparsed(), out.len()),
        (1, 1, 2)
    );
    assert_eq!(attr(&out[1], "db.statement"), Some(&json!("SELECT 2")));
    assert_eq!(attr(&out[1], "db.rowcount"), Some(&json!(1)));
    assert_eq!((out[1].start_ts, out[1].end_ts), (6, 7));
}

#[test]
fn random_garbage_never_panics() {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for round in 0..2000 {
        let mut input = Vec::new();
        for _ in 0..((round % 300) + 1) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            input.push(x as u8);
        }
        if round % 2 == 0 {
            // Seed 0xff feeds the first pieces to the server side.
            let mut real = vec![0xff];
            real.extend(greeting(BASE));
            real.extend(input);
            input = real;
        }
        super::super::fuzz_one(Protocol::Mysql, &input);
    }
}

#[test]
fn looks_like_greeting_accepts_server_greetings_only() {
    assert!(looks_like_greeting(&greeting(BASE)));
    let mut maria = greeting(BASE);
    maria.splice(5..11, b"5.5.5-10.11.6-MariaDB-0+deb12u1".iter().copied());
    let len = (maria.len() - 4) as u32;
    maria[..3].copy_from_slice(&len.to_le_bytes()[..3]);
    assert!(looks_like_greeting(&maria));
    assert!(
        !looks_like_greeting(&greeting(BASE)[..8]),
        "version not complete yet"
    );
    let mut wrong_seq = greeting(BASE);
    wrong_seq[3] = 1;
    assert!(!looks_like_greeting(&wrong_seq));
    assert!(!looks_like_greeting(&pkt(
        0,
        b"\x0a\x01\x02\x00garbage-garbage-garbage"
    )));
    assert!(!looks_like_greeting(&pkt(
        0,
        &err(1130, "HY000", "Host is not allowed")
    )));
    assert!(!looks_like_greeting(b"HTTP/1.1 200 OK\r\n"));
    assert_eq!(
        super::super::detect(Side::Server, &greeting(BASE)),
        Some(Protocol::Mysql)
    );
}

#[test]
fn fuzz_seeds_replay_their_recordings() {
    // The seeds lay the recordings above out in fuzz_one's pieces; without gaps they
    // must still give every op, so the fuzzer starts deep in real conversations.
    for (seed, ops) in [
        (
            include_bytes!("../../../fuzz/seeds/mysql/pymysql-seed55.bin").as_slice(),
            11,
        ),
        (
            include_bytes!("../../../fuzz/seeds/mysql/pymysql-seeda7.bin").as_slice(),
            11,
        ),
        (
            include_bytes!("../../../fuzz/seeds/mysql/pymysql-seed3c.bin").as_slice(),
            11,
        ),
        (
            include_bytes!("../../../fuzz/seeds/mysql/deprecate-eof-seed55.bin").as_slice(),
            11,
        ),
        (
            include_bytes!("../../../fuzz/seeds/mysql/deprecate-eof-seeda7.bin").as_slice(),
            11,
        ),
        (
            include_bytes!("../../../fuzz/seeds/mysql/deprecate-eof-seed3c.bin").as_slice(),
            11,
        ),
        (
            include_bytes!("../../../fuzz/seeds/mysql/cache-metadata-seed55.bin").as_slice(),
            11,
        ),
        (
            include_bytes!("../../../fuzz/seeds/mysql/cache-metadata-seeda7.bin").as_slice(),
            11,
        ),
        (
            include_bytes!("../../../fuzz/seeds/mysql/cache-metadata-seed3c.bin").as_slice(),
            11,
        ),
    ] {
        assert_eq!(super::super::fuzz_one(Protocol::Mysql, seed), ops);
    }
    for seed in [
        include_bytes!("../../../fuzz/seeds/mysql/pymysql-seed4e.bin").as_slice(),
        include_bytes!("../../../fuzz/seeds/mysql/deprecate-eof-seed4e.bin").as_slice(),
        include_bytes!("../../../fuzz/seeds/mysql/cache-metadata-seed4e.bin").as_slice(),
    ] {
        // Every fifth piece is lost here: the parser gives up without panicking.
        super::super::fuzz_one(Protocol::Mysql, seed);
    }
    // Every seed, watched from a byte offset and with capture gaps (as the fuzz target
    // feeds it too): never a panic.
    for name in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/mysql")).unwrap()
    {
        let seed = std::fs::read(name.unwrap().path()).unwrap();
        super::super::fuzz_resync(Protocol::Mysql, &seed);
    }
}

fn replay(recording: &str) -> Vec<Op> {
    run(&scripts::recording(recording))
}

fn names_and_counts(ops: &[Op]) -> Vec<(&str, Option<i64>, StatusCode)> {
    ops.iter()
        .map(|o| {
            (
                o.name.as_str(),
                attr(o, "db.rowcount").and_then(Value::as_i64),
                o.status,
            )
        })
        .collect()
}

#[test]
fn recorded_pymysql_session() {
    let ops = replay(PYMYSQL_SESSION);
    use StatusCode::{Error, Unset};
    assert_eq!(
        names_and_counts(&ops),
        [
            ("SET", Some(0), Unset),
            ("SET", Some(0), Unset),
            ("SELECT", Some(3), Unset),
            ("INSERT", Some(2), Unset),
            ("SELECT", None, Error),
            ("INIT_DB", None, Unset),
            ("SELECT", Some(1), Unset),
            ("USE", Some(0), Unset),
            ("SELECT", Some(1), Unset),
            ("CALL", Some(1), Unset),
            ("DELETE", Some(2), Unset),
        ]
    );
    assert_eq!(attr(&ops[4], "db.error.code"), Some(&json!(1146)));
    let dbs: Vec<_> = ops
        .iter()
        .map(|o| attr(o, "db.name").and_then(Value::as_str).unwrap())
        .collect();
    assert_eq!(
        dbs,
        [
            "shop", "shop", "shop", "shop", "shop", "shop", "billing", "billing", "shop", "shop",
            "shop"
        ]
    );
    assert!(ops
        .iter()
        .all(|o| attr(o, "db.user") == Some(&json!("app"))));
}

fn assert_raw_session(ops: &[Op]) {
    use StatusCode::{Error, Unset};
    assert_eq!(
        names_and_counts(ops),
        [
            ("SELECT", Some(3), Unset),
            ("SELECT", Some(0), Unset),
            ("INSERT", Some(2), Unset),
            ("SELECT", None, Error),
            ("SELECT", Some(1), Unset),
            ("CALL", Some(1), Unset),
            ("SELECT", Some(4), Unset),
            ("SELECT", Some(3), Unset),
            ("DELETE", Some(2), Unset),
            ("INIT_DB", None, Unset),
            ("SELECT", Some(1), Unset),
        ]
    );
    assert_eq!(
        attr(&ops[6], "db.statement"),
        Some(&json!("SELECT id, name FROM items WHERE id > ?"))
    );
    assert_eq!(attr(&ops[10], "db.name"), Some(&json!("billing")));
}

#[test]
fn recorded_session_with_deprecate_eof() {
    assert_raw_session(&replay(DEPRECATE_EOF_SESSION));
}

#[test]
fn recorded_session_with_mariadb_cache_metadata() {
    assert_raw_session(&replay(MARIADB_CACHE_METADATA_SESSION));
}

/// PyMySQL 1.2 against MariaDB 10.11 (no TLS), recorded through a proxy: EOF packets, an error, COM_INIT_DB, USE, multi-statements, CALL, COM_PING.
const PYMYSQL_SESSION: &str = "\
S 640000000a352e352e352d31302e31312e31392d4d6172696144422d302b646562313275310005000000573d6a7d\
     5821383900fef7080200ff81150000000000001d000000516c4c742967503b7354296d006d7973716c5f6e617469\
     76655f70617373776f726400\n\
C 8a0000010da23b00ffffff002d000000000000000000000000000000000000000000000061707000146cf0666d03\
     546cc665eb1cb3666be199bb1c098273686f70006d7973716c5f6e61746976655f70617373776f726400350c5f63\
     6c69656e745f6e616d650770796d7973716c0f5f636c69656e745f76657273696f6e05312e322e34045f70696404\
     38323031\n\
S 0700000200000002000000\n\
C 1200000003534554204e414d455320757466386d6234\n\
S 0700000100000002000000\n\
C 1300000003534554204155544f434f4d4d4954203d2030\n\
S 0700000100000000000000\n\
C 270000000353454c4543542069642c206e616d652046524f4d206974656d73204f52444552204259206964\n\
S 010000010228000002036465660473686f70056974656d73056974656d730269640269640c3f000b000000030350\
     0000002c000003036465660473686f70056974656d73056974656d73046e616d65046e616d650c2d00fcff0300fc\
     100000000005000004fe00002100080000050131056170706c650900000601320662616e616e6109000007013306\
     63686572727905000008fe00002100\n\
C 2e00000003494e5345525420494e544f206974656d732056414c554553202831302c20277827292c202831312c20\
     27792729\n\
S 2e00000100020001000000265265636f7264733a203220204475706c6963617465733a203020205761726e696e67\
     733a2030\n\
C 160000000353454c454354202a2046524f4d206d697373696e67\n\
S 2b000001ff7a042334325330325461626c65202773686f702e6d697373696e672720646f65736e27742065786973\
     74\n\
C 080000000262696c6c696e67\n\
S 0700000100000001000000\n\
C 120000000353454c4543542044415441424153452829\n\
S 010000010120000002036465660000000a44415441424153452829000c2d0000010000fd000027000005000003fe\
     00000100080000040762696c6c696e6705000005fe00000100\n\
C 09000000035553452073686f70\n\
S 0700000100000001000000\n\
C 3d0000000353454c45435420313b20555044415445206974656d7320534554206e616d653d277a27205748455245\
     206964203e3d2031303b2053454c4543542032\n\
S 010000010117000002036465660000000131000c3f000100000003810000000005000003fe000009000200000401\
     3105000005fe00000900\n\
S 300000060002000900000028526f7773206d6174636865643a203220204368616e6765643a203220205761726e69\
     6e67733a2030010000070117000008036465660000000132000c3f000100000003810000000005000009fe000001\
     000200000a01320500000bfe00000100\n\
C 090000000343414c4c20702829\n\
S 010000010117000002036465660000000131000c3f000100000003810000000005000003fe000009000200000401\
     3105000005fe00000900\n\
S 010000060228000007036465660473686f70056974656d73056974656d730269640269640c3f000b000000030350\
     0000002c000008036465660473686f70056974656d73056974656d73046e616d65046e616d650c2d00fcff0300fc\
     100000000005000009fe000029000800000a0131056170706c650900000b01320662616e616e610900000c013306\
     6368657272790500000d023130017a0500000e023131017a0500000ffe00002900\n\
S 0700001000000021000000\n\
C 210000000344454c4554452046524f4d206974656d73205748455245206964203e3d203130\n\
S 0700000100020001000000\n\
C 010000000e\n\
S 0700000100000001000000\n\
C 0100000001\n\
";
/// A raw client offering CLIENT_DEPRECATE_EOF against MariaDB 10.11, recorded through a proxy: text and binary result sets, multi-results, prepare/execute, COM_STMT_CLOSE, COM_INIT_DB, COM_PING, COM_QUIT.
const DEPRECATE_EOF_SESSION: &str = "\
S 640000000a352e352e352d31302e31312e31392d4d6172696144422d302b6465623132753100080000003e2b5c6e\
     3660614400fef7080200ff81150000000000001d0000007233454052594943555e5b2d006d7973716c5f6e617469\
     76655f70617373776f726400\n\
C 540000010da20b01000000012d0000000000000000000000000000000000000000000000617070001403d5c16eed\
     492554f4998b44c2abdac5a627c03473686f70006d7973716c5f6e61746976655f70617373776f726400\n\
S 0700000200000002000000\n\
C 140000000353454c454354202a2046524f4d206974656d73\n\
S 010000010228000002036465660473686f70056974656d73056974656d730269640269640c3f000b000000030350\
     0000002c000003036465660473686f70056974656d73056974656d73046e616d65046e616d650c2d00fcff0300fc\
     1000000000080000040131056170706c650900000501320662616e616e6109000006013306636865727279070000\
     07fe000022000000\n\
C 230000000353454c454354202a2046524f4d206974656d73205748455245206964203e20313030\n\
S 010000010228000002036465660473686f70056974656d73056974656d730269640269640c3f000b000000030350\
     0000002c000003036465660473686f70056974656d73056974656d73046e616d65046e616d650c2d00fcff0300fc\
     100000000007000004fe000002000000\n\
C 2e00000003494e5345525420494e544f206974656d732056414c554553202833302c20277027292c202833312c20\
     27712729\n\
S 2e00000100020002000000265265636f7264733a203220204475706c6963617465733a203020205761726e696e67\
     733a2030\n\
C 160000000353454c454354202a2046524f4d206d697373696e67\n\
S 2b000001ff7a042334325330325461626c65202773686f702e6d697373696e672720646f65736e27742065786973\
     74\n\
C 3f0000000353454c45435420313b20555044415445206974656d7320534554206e616d65203d2027722720574845\
     5245206964203e3d2033303b2053454c4543542032\n\
S 010000010117000002036465660000000131000c3f000100000003810000000002000003013107000004fe00000a\
     000000\n\
S 300000050002000a00000028526f7773206d6174636865643a203220204368616e6765643a203220205761726e69\
     6e67733a2030\n\
S 010000060117000007036465660000000132000c3f000100000003810000000002000008013207000009fe000002\
     000000\n\
C 090000000343414c4c20702829\n\
S 010000010117000002036465660000000131000c3f000100000003810000000002000003013107000004fe00000a\
     000000010000050228000006036465660473686f70056974656d73056974656d730269640269640c3f000b000000\
     0303500000002c000007036465660473686f70056974656d73056974656d73046e616d65046e616d650c2d00fcff\
     0300fc1000000000080000080131056170706c650900000901320662616e616e610900000a013306636865727279\
     0500000b02333001720500000c02333101720700000dfe00002a0000000700000e00000022000000\n\
C 280000001653454c4543542069642c206e616d652046524f4d206974656d73205748455245206964203e203f\n\
S 0c0000010004000000020001000000001700000203646566000000013f000c3f0000000000068000000000280000\
     03036465660473686f70056974656d73056974656d730269640269640c3f000b0000000303500000002c00000403\
     6465660473686f70056974656d73056974656d73046e616d65046e616d650c2d00fcff0300fc1000000000\n\
C 1600000017040000000001000000000108000100000000000000\n\
S 010000010228000002036465660473686f70056974656d73056974656d730269640269640c3f000b000000030350\
     0000002c000003036465660473686f70056974656d73056974656d73046e616d65046e616d650c2d00fcff0300fc\
     10000000000d0000040000020000000662616e616e610d000005000003000000066368657272790800000600001e\
     00000001720800000700001f000000017207000008fe000002000000\n\
C 1600000017040000000001000000000108000200000000000000\n\
S 010000010228000002036465660473686f70056974656d73056974656d730269640269640c3f000b000000030350\
     0000002c000003036465660473686f70056974656d73056974656d73046e616d65046e616d650c2d00fcff0300fc\
     10000000000d000004000003000000066368657272790800000500001e00000001720800000600001f0000000172\
     07000007fe000002000000\n\
C 200000001644454c4554452046524f4d206974656d73205748455245206964203e3d203f\n\
S 0c0000010005000000000001000000001700000203646566000000013f000c3f0000000000068000000000\n\
C 1600000017050000000001000000000108001e00000000000000\n\
S 0700000100020002000000\n\
C 050000001904000000\n\
C 080000000262696c6c696e67\n\
S 0700000100000002000000\n\
C 120000000353454c4543542044415441424153452829\n\
S 010000010120000002036465660000000a44415441424153452829000c2d0000010000fd00002700000800000307\
     62696c6c696e6707000004fe000002000000\n\
C 010000000e\n\
S 0700000100000002000000\n\
C 0100000001\n\
";
/// The same commands with MariaDB's extended capabilities (MARIADB_CLIENT_CACHE_METADATA: the second execute of a statement omits its column definitions) and EOF packets.
const MARIADB_CACHE_METADATA_SESSION: &str = "\
S 640000000a352e352e352d31302e31312e31392d4d6172696144422d302b646562313275310009000000327a307e\
     4b3d2e6c00fef7080200ff81150000000000001d000000564c57527470594a4765497c006d7973716c5f6e617469\
     76655f70617373776f726400\n\
C 540000010ca20b00000000012d000000000000000000000000000000000000001d000000617070001419eba6058a\
     fad230d72b4da92790c989d324c60373686f70006d7973716c5f6e61746976655f70617373776f726400\n\
S 0700000200000002000000\n\
C 140000000353454c454354202a2046524f4d206974656d73\n\
S 02000001020129000002036465660473686f70056974656d73056974656d73026964026964000c3f000b00000003\
     03500000002d000003036465660473686f70056974656d73056974656d73046e616d65046e616d65000c2d00fcff\
     0300fc100000000005000004fe00002200080000050131056170706c650900000601320662616e616e6109000007\
     01330663686572727905000008fe00002200\n\
C 230000000353454c454354202a2046524f4d206974656d73205748455245206964203e20313030\n\
S 02000001020129000002036465660473686f70056974656d73056974656d73026964026964000c3f000b00000003\
     03500000002d000003036465660473686f70056974656d73056974656d73046e616d65046e616d65000c2d00fcff\
     0300fc100000000005000004fe0000020005000005fe00000200\n\
C 2e00000003494e5345525420494e544f206974656d732056414c554553202833302c20277027292c202833312c20\
     27712729\n\
S 2e00000100020002000000265265636f7264733a203220204475706c6963617465733a203020205761726e696e67\
     733a2030\n\
C 160000000353454c454354202a2046524f4d206d697373696e67\n\
S 2b000001ff7a042334325330325461626c65202773686f702e6d697373696e672720646f65736e27742065786973\
     74\n\
C 3f0000000353454c45435420313b20555044415445206974656d7320534554206e616d65203d2027722720574845\
     5245206964203e3d2033303b2053454c4543542032\n\
S 0200000101011800000203646566000000013100000c3f000100000003810000000005000003fe00000a00020000\
     04013105000005fe00000a00\n\
S 300000060002000a00000028526f7773206d6174636865643a203220204368616e6765643a203220205761726e69\
     6e67733a2030\n\
S 0200000701011800000803646566000000013200000c3f000100000003810000000005000009fe00000200020000\
     0a01320500000bfe00000200\n\
C 090000000343414c4c20702829\n\
S 0200000101011800000203646566000000013100000c3f000100000003810000000005000003fe00000a00020000\
     04013105000005fe00000a00\n\
S 02000006020129000007036465660473686f70056974656d73056974656d73026964026964000c3f000b00000003\
     03500000002d000008036465660473686f70056974656d73056974656d73046e616d65046e616d65000c2d00fcff\
     0300fc100000000005000009fe00002a000800000a0131056170706c650900000b01320662616e616e610900000c\
     0133066368657272790500000d02333001720500000e02333101720500000ffe00002a00\n\
S 0700001000000022000000\n\
C 280000001653454c4543542069642c206e616d652046524f4d206974656d73205748455245206964203e203f\n\
S 0c0000010006000000020001000000001800000203646566000000013f00000c3f00000000000680000000000500\
     0003fe0000020029000004036465660473686f70056974656d73056974656d73026964026964000c3f000b000000\
     0303500000002d000005036465660473686f70056974656d73056974656d73046e616d65046e616d65000c2d00fc\
     ff0300fc100000000005000006fe00000200\n\
C 1600000017060000000001000000000108000100000000000000\n\
S 02000001020005000002fe000002000d0000030000020000000662616e616e610d00000400000300000006636865\
     7272790800000500001e00000001720800000600001f000000017205000007fe00000200\n\
C 1600000017060000000001000000000108000200000000000000\n\
S 02000001020005000002fe000002000d000003000003000000066368657272790800000400001e00000001720800\
     000500001f000000017205000006fe00000200\n\
C 200000001644454c4554452046524f4d206974656d73205748455245206964203e3d203f\n\
S 0c0000010007000000000001000000001800000203646566000000013f00000c3f00000000000680000000000500\
     0003fe00000200\n\
C 1600000017070000000001000000000108001e00000000000000\n\
S 0700000100020002000000\n\
C 050000001906000000\n\
C 080000000262696c6c696e67\n\
S 0700000100000002000000\n\
C 120000000353454c4543542044415441424153452829\n\
S 02000001010121000002036465660000000a4441544142415345282900000c2d0000010000fd0000270000050000\
     03fe00000200080000040762696c6c696e6705000005fe00000200\n\
C 010000000e\n\
S 0700000100000002000000\n\
C 0100000001\n\
";

/// MariaDB Connector/C 3.3 (libmariadb, through tests/support/client_mysql_cursor.py) against
/// MariaDB 10.11, recorded through a proxy: a server-side cursor (COM_STMT_EXECUTE with
/// CURSOR_TYPE_READ_ONLY, then COM_STMT_FETCH of 2 rows at a time) with EOF packets and
/// MariaDB's metadata caching.
const CURSOR_CONNECTOR_C_SESSION: &str = "\
S 640000000a352e352e352d31302e31312e31392d4d6172696144422d302b64656231327531000500000059516a43\
     4f43405600fef7080200ff81150000000000001d000000725947382343675d7d21263c006d7973716c5f6e617469\
     76655f70617373776f726400\n\
C c40000018ca2be00000010002d000000000000000000000000000000000000001d0000006f70656e626f780014ce\
     200e42f853e99bf47b77e65cd6980cecee8b0573686f70006d7973716c5f6e61746976655f70617373776f726400\
     6b035f6f73054c696e75780c5f636c69656e745f6e616d650a6c69626d617269616462045f70696404383035310f\
     5f636c69656e745f76657273696f6e06332e332e3230095f706c6174666f726d067838365f36340c5f7365727665\
     725f686f7374093132372e302e302e31\n\
S 1000000200000002400000000701050473686f70\n\
C 270000001653454c4543542069642c206e616d652046524f4d206974656d73204f52444552204259206964\n\
S 0c00000100010000000200000000000029000002036465660473686f70056974656d73056974656d730269640269\
     64000c3f000b0000000303500000002d000003036465660473686f70056974656d73056974656d73046e616d6504\
     6e616d65000c2d0000010000fd000000000005000004fe00000200\n\
C 0a00000017010000000101000000\n\
S 02000001020129000002036465660473686f70056974656d73056974656d73026964026964000c3f000b00000003\
     01100000002d000003036465660473686f70056974656d73056974656d73046e616d65046e616d65000c2d000001\
     0000fd000000000005000004fe00006200\n\
C 090000001c0100000002000000\n\
S 0c000001000001000000056170706c650d0000020000020000000662616e616e6105000003fe00004200\n\
C 090000001c0100000002000000\n\
S 0d0000010000030000000663686572727905000002fe00008200\n\
C 050000001901000000\n\
C 0100000001\n\
";
/// The same cursor from a client offering CLIENT_DEPRECATE_EOF (Connector/C refuses that
/// flag; tests/support/client_mysql_raw_cursor.py speaks the protocol itself) against
/// MariaDB 10.11, recorded through a proxy: the execute's OK (0xFE, with
/// SERVER_STATUS_CURSOR_EXISTS) stands where the columns' EOF was, and each fetch's rows
/// end in an OK packet.
const CURSOR_DEPRECATE_EOF_SESSION: &str = "\
S 640000000a352e352e352d31302e31312e31392d4d6172696144422d302b646562313275310006000000534e6d5b\
     5e49325b00fef7080200ff81150000000000001d00000057224161447029773e6c287e006d7973716c5f6e617469\
     76655f70617373776f726400\n\
C 580000010da20801000000012d00000000000000000000000000000000000000000000006f70656e626f78001421\
     a71f9016a788de9f278fc7a87d0e04291abadc73686f70006d7973716c5f6e61746976655f70617373776f726400\n\
S 0700000200000002000000\n\
C 270000001653454c4543542069642c206e616d652046524f4d206974656d73204f52444552204259206964\n\
S 0c00000100020000000200000000000028000002036465660473686f70056974656d73056974656d730269640269\
     640c3f000b0000000303500000002c000003036465660473686f70056974656d73056974656d73046e616d65046e\
     616d650c2d0000010000fd0000000000\n\
C 0a00000017020000000101000000\n\
S 010000010228000002036465660473686f70056974656d73056974656d730269640269640c3f000b000000030110\
     0000002c000003036465660473686f70056974656d73056974656d73046e616d65046e616d650c2d0000010000fd\
     000000000007000004fe000062000000\n\
C 090000001c0200000002000000\n\
S 0c000001000001000000056170706c650d0000020000020000000662616e616e6107000003fe000042000000\n\
C 090000001c0200000002000000\n\
S 0d0000010000030000000663686572727907000002fe000082000000\n\
C 050000001902000000\n\
C 0100000001\n\
";

/// A cursor's rows as the client read them: the execute that opened it (no rows yet),
/// then one op per COM_STMT_FETCH with the rows it returned, all named by the statement.
fn assert_cursor_session(ops: &[Op], end_ts: [u64; 3]) {
    use StatusCode::Unset;
    assert_eq!(
        names_and_counts(ops),
        [
            ("SELECT", None, Unset),
            ("SELECT", Some(2), Unset),
            ("SELECT", Some(1), Unset)
        ]
    );
    for op in ops {
        assert_eq!(
            attr(op, "db.statement"),
            Some(&json!("SELECT id, name FROM items ORDER BY id"))
        );
        assert_eq!(attr(op, "db.name"), Some(&json!("shop")));
        assert_eq!(attr(op, "db.user"), Some(&json!("openbox")));
    }
    let spans: Vec<_> = ops.iter().map(|o| (o.start_ts, o.end_ts)).collect();
    assert_eq!(spans, [(6, end_ts[0]), (8, end_ts[1]), (10, end_ts[2])]);
}

#[test]
fn cursor_fetch_with_eof_packets() {
    assert_cursor_session(&replay(CURSOR_CONNECTOR_C_SESSION), [7, 9, 11]);
}

#[test]
fn cursor_fetch_with_deprecate_eof() {
    assert_cursor_session(&replay(CURSOR_DEPRECATE_EOF_SESSION), [7, 9, 11]);
}

#[test]
fn cursor_fetch_watched_mid_stream_infers_deprecate_eof() {
    // Watched from the prepare on: the flags are inferred, the statement is known.
    let s = scripts::recording(CURSOR_DEPRECATE_EOF_SESSION);
    let (ops, unparsed) = run_with(ParserConfig::default(), &s[3..].to_vec(), false);
    assert_eq!(unparsed, 0);
    use StatusCode::Unset;
    assert_eq!(
        names_and_counts(&ops),
        [
            ("SELECT", None, Unset),
            ("SELECT", Some(2), Unset),
            ("SELECT", Some(1), Unset)
        ]
    );
}

#[test]
fn recorded_sessions_watched_from_any_byte_offset_yield_every_later_exchange_paired_right() {
    for rec in [
        PYMYSQL_SESSION,
        DEPRECATE_EOF_SESSION,
        MARIADB_CACHE_METADATA_SESSION,
        CURSOR_CONNECTOR_C_SESSION,
        CURSOR_DEPRECATE_EOF_SESSION,
    ] {
        let s = scripts::recording(rec);
        for cut in [scripts::Cut::Start, scripts::Cut::Midstream] {
            let checked =
                scripts::every_offset_with(Protocol::Mysql, &s, cut, scripts::sql_unknowable);
            assert!(checked > 0, "{cut:?}");
        }
    }
}

const ONE_SIDE_FIRST_SESSIONS: [&str; 5] = [
    PYMYSQL_SESSION,
    DEPRECATE_EOF_SESSION,
    MARIADB_CACHE_METADATA_SESSION,
    CURSOR_CONNECTOR_C_SESSION,
    CURSOR_DEPRECATE_EOF_SESSION,
];

/// [`scripts::one_side_first`] over the recorded sessions, each from its first command
/// on when `from_first_command` (a connection watched from its middle shows no
/// handshake), else whole.
fn one_side_first(first: scripts::First, from_first_command: bool) {
    for rec in ONE_SIDE_FIRST_SESSIONS {
        let s = scripts::recording(rec);
        let start = match from_first_command {
            true => s
                .iter()
                .position(|(side, data, _)| *side == Side::Client && starts_command(data))
                .unwrap(),
            false => 0,
        };
        let checked = scripts::one_side_first(
            Protocol::Mysql,
            &s[start..].to_vec(),
            first,
            scripts::sql_unknowable,
        );
        assert!(checked > 0);
    }
}

/// One side captured before the other at the start of a connection watched from its
/// middle (the TLS probes attaching): no op carries another's answer.
#[test]
fn recorded_sessions_with_one_side_captured_first_never_pair_wrongly() {
    one_side_first(scripts::First::Server, true);
}

/// The same with the client side captured first.
#[test]
fn recorded_sessions_with_the_client_side_captured_first_never_pair_wrongly() {
    one_side_first(scripts::First::Either, true);
}

/// A connection opened while the probes attach, over TLS: the greeting is cleartext
/// (captured), the client's handshake response is TLS plaintext written before the
/// write side was probed (missed, with no gap), the server's answers are read through
/// probed functions. The parser then infers the capability flags from a session it
/// takes for one without its handshake, and can read a result set wrongly.
#[test]
fn recorded_sessions_with_the_handshake_response_missed_never_pair_wrongly() {
    one_side_first(scripts::First::Server, false);
}

/// Watched from its middle, the client side captured first: a query seen without its
/// answer, then another, then an answer. Which query it answers cannot be told: both
/// are dropped, counted `unpaired`, and the next exchange pairs by order. (Before the
/// parser was told the connection was open before watching began, the first query took
/// the second's answer.)
#[test]
fn a_command_seen_without_its_answer_on_a_connection_watched_midstream_takes_no_other_answer() {
    let caps = BASE | CLIENT_DEPRECATE_EOF;
    let op = scripts::an_answer_missed_at_a_midstream_start(
        Protocol::Mysql,
        [&query("SELECT 1"), &query("SELECT 2"), &query("SELECT 3")],
        &result_set(1, caps, 1, 3, 2),
    );
    assert_eq!(op.attributes["db.statement"], json!("SELECT 3"));
    assert_eq!(op.attributes["db.rowcount"], json!(3));
}

/// A TLS connection opened while the probes attach: the greeting and the server's
/// login OK are seen, the handshake response (written through a libssl function not
/// yet probed) is not. The first command ends the handshake and its answer is read
/// with the flags inferred (here CLIENT_DEPRECATE_EOF), not the command taken for the
/// handshake response.
#[test]
fn a_command_where_the_handshake_response_was_expected_ends_the_handshake() {
    let caps = BASE | CLIENT_DEPRECATE_EOF;
    let login = connect(caps, "u", Some("shop"));
    let mut p = MysqlParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (side, data, ts) in login.iter().filter(|(side, _, _)| *side == Side::Server) {
        p.feed(*side, data, *ts, &mut out);
    }
    for (i, ts) in [(1, 4), (2, 6)] {
        p.feed(Side::Client, &query(&format!("SELECT {i}")), ts, &mut out);
        p.feed(
            Side::Server,
            &result_set(1, caps, 2, i, 2),
            ts + 1,
            &mut out,
        );
    }
    assert_eq!(out.len(), 2, "{out:#?}");
    for (op, (rows, ts)) in out.iter().zip([(1, 4), (2, 6)]) {
        assert_eq!(op.attributes["db.rowcount"], json!(rows), "{op:?}");
        assert_eq!((op.start_ts, op.end_ts), (ts, ts + 1));
    }
    assert_eq!(p.losses().total(), 0, "{:?}", p.losses());
}

#[test]
fn a_capture_gap_at_any_byte_offset_of_a_recorded_session_loses_only_what_it_cuts() {
    for rec in [
        PYMYSQL_SESSION,
        DEPRECATE_EOF_SESSION,
        MARIADB_CACHE_METADATA_SESSION,
        CURSOR_CONNECTOR_C_SESSION,
        CURSOR_DEPRECATE_EOF_SESSION,
    ] {
        let s = scripts::recording(rec);
        let checked = scripts::every_offset_with(
            Protocol::Mysql,
            &s,
            scripts::Cut::Gap,
            scripts::sql_unknowable,
        );
        assert!(checked > 0);
    }
}

/// Each lost exchange is counted once: the loss on the side that lost it, not again
/// as an unpaired reply on the other.
#[test]
fn an_exchange_lost_to_a_gap_or_a_mid_stream_start_is_counted_once() {
    let caps = BASE | CLIENT_DEPRECATE_EOF;
    let q = query("SELECT 1");
    let answer = result_set(1, caps, 1, 1, 2);
    let mut p = MysqlParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (side, data, ts) in &connect(caps, "u", None) {
        p.feed(*side, data, *ts, &mut out);
    }
    // The capture cut the query: its reply answers nothing seen.
    p.feed(Side::Client, &q[..3], 4, &mut out);
    p.gap(Side::Client, (q.len() - 3) as u64, 4, &mut out);
    p.feed(Side::Server, &answer, 5, &mut out);
    p.feed(Side::Client, &query("SELECT 2"), 6, &mut out);
    p.feed(Side::Server, &answer, 7, &mut out);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(p.losses().total(), 1, "{:?}", p.losses());
    // Watching began inside the query.
    let mut p = MysqlParser::new(ParserConfig::default());
    let mut out = Vec::new();
    p.feed(Side::Client, &q[6..], 1, &mut out);
    p.feed(Side::Server, &answer, 2, &mut out);
    p.feed(Side::Client, &query("SELECT 2"), 3, &mut out);
    p.feed(Side::Server, &answer, 4, &mut out);
    assert!(p.losses().total() <= 1, "{:?}", p.losses());
}

#[test]
fn a_gap_from_a_packets_header_into_the_next_packets_is_counted_once() {
    let s = scripts::recording(DEPRECATE_EOF_SESSION);
    let mut p = MysqlParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (side, d, ts) in &s[..4] {
        p.feed(*side, d, *ts, &mut out);
    }
    // A result set: the capture kept the first packet's header and lost the rest.
    let (side, d, ts) = &s[4];
    assert_eq!(*side, Side::Server);
    p.feed(*side, &d[..4], *ts, &mut out);
    p.gap(*side, (d.len() - 4) as u64, *ts, &mut out);
    assert_eq!(p.losses().get(Loss::Gap), 1);
    assert_eq!(p.losses().total(), 1, "{:?}", p.losses());
}
