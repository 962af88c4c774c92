use Side::{Client as C, Server as S};

use super::*;
use crate::protocol::{scripts, Loss};

/// BSON document builder for tests.
#[derive(Default, Clone)]
struct Bson(Vec<u8>);

impl Bson {
    fn el(mut self, ty: u8, k: &str, v: &[u8]) -> Self {
        self.0.push(ty);
        self.0.extend_from_slice(k.as_bytes());
        self.0.push(0);
        self.0.extend_from_slice(v);
        self
    }
    fn s(self, k: &str, v: &str) -> Self {
        let mut b = ((v.len() + 1) as i32).to_le_bytes().to_vec();
        b.extend_from_slice(v.as_bytes());
        b.push(0);
        self.el(0x02, k, &b)
    }
    fn i32(self, k: &str, v: i32) -> Self {
        self.el(0x10, k, &v.to_le_bytes())
    }
    fn i64(self, k: &str, v: i64) -> Self {
        self.el(0x12, k, &v.to_le_bytes())
    }
    fn f64(self, k: &str, v: f64) -> Self {
        self.el(0x01, k, &v.to_le_bytes())
    }
    fn bool(self, k: &str, v: bool) -> Self {
        self.el(0x08, k, &[u8::from(v)])
    }
    fn d(self, k: &str, d: Bson) -> Self {
        self.el(0x03, k, &d.build())
    }
    fn arr(self, k: &str, items: Vec<Bson>) -> Self {
        let mut a = Bson::default();
        for (i, d) in items.into_iter().enumerate() {
            a = a.d(&i.to_string(), d);
        }
        self.el(0x04, k, &a.build())
    }
    fn build(&self) -> Vec<u8> {
        let mut v = ((self.0.len() + 5) as i32).to_le_bytes().to_vec();
        v.extend_from_slice(&self.0);
        v.push(0);
        v
    }
}

fn header(len: usize, id: i32, to: i32, op: i32) -> Vec<u8> {
    let mut v = (len as i32).to_le_bytes().to_vec();
    v.extend(id.to_le_bytes());
    v.extend(to.to_le_bytes());
    v.extend(op.to_le_bytes());
    v
}

fn op_msg(id: i32, to: i32, flags: u32, body: &Bson, seq: Option<(&str, Vec<Bson>)>) -> Vec<u8> {
    let mut b = flags.to_le_bytes().to_vec();
    b.push(0);
    b.extend(body.build());
    if let Some((ident, docs)) = seq {
        let docs: Vec<u8> = docs.iter().flat_map(Bson::build).collect();
        b.push(1);
        b.extend(((4 + ident.len() + 1 + docs.len()) as i32).to_le_bytes());
        b.extend(ident.as_bytes());
        b.push(0);
        b.extend(docs);
    }
    if flags & CHECKSUM_PRESENT != 0 {
        b.extend([0xde, 0xad, 0xbe, 0xef]);
    }
    let mut m = header(b.len() + 16, id, to, OP_MSG);
    m.extend(b);
    m
}

fn ok() -> Bson {
    Bson::default().f64("ok", 1.0)
}

fn run(pieces: &[(Side, &[u8])]) -> (Vec<Op>, MongoParser) {
    let mut p = MongoParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (i, (side, data)) in pieces.iter().enumerate() {
        p.feed(*side, data, 10 * (i as u64 + 1), &mut out);
    }
    (out, p)
}

fn run_bytewise(pieces: &[(Side, &[u8])]) -> Vec<Op> {
    let mut p = MongoParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (i, (side, data)) in pieces.iter().enumerate() {
        for b in data.iter() {
            p.feed(
                *side,
                std::slice::from_ref(b),
                10 * (i as u64 + 1),
                &mut out,
            );
        }
    }
    out
}

fn attr<'a>(op: &'a Op, k: &str) -> &'a serde_json::Value {
    op.attributes.get(k).unwrap_or(&serde_json::Value::Null)
}

fn find_pair() -> (Vec<u8>, Vec<u8>) {
    let lsid = Bson::default().el(
        0x05,
        "id",
        &[
            16, 0, 0, 0, 4, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
        ],
    );
    let find = Bson::default()
        .s("find", "users")
        .d("filter", Bson::default().s("name", "ann"))
        .d("lsid", lsid)
        .d(
            "$clusterTime",
            Bson::default().el(0x11, "clusterTime", &[1, 0, 0, 0, 2, 0, 0, 0]),
        )
        .s("$db", "app");
    let oid = [0x65, 0x5f, 0x1c, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    let reply = Bson::default()
        .d(
            "cursor",
            Bson::default()
                .arr(
                    "firstBatch",
                    vec![
                        Bson::default().el(0x07, "_id", &oid).s("name", "ann"),
                        Bson::default().s("name", "ann"),
                    ],
                )
                .i64("id", 0)
                .s("ns", "app.users"),
        )
        .f64("ok", 1.0);
    (
        op_msg(7, 0, 0, &find, None),
        op_msg(100, 7, 0, &reply, None),
    )
}

#[test]
fn op_msg_find_gives_collection_db_statement_and_rowcount() {
    let (req, rep) = find_pair();
    let (ops, p) = run(&[(C, &req), (S, &rep)]);
    assert_eq!(ops.len(), 1);
    let op = &ops[0];
    assert_eq!(op.name, "find");
    assert_eq!(attr(op, "db.operation"), "find");
    assert_eq!(attr(op, "db.mongodb.collection"), "users");
    assert_eq!(attr(op, "db.name"), "app");
    assert_eq!(
        attr(op, "db.statement"),
        r#"{"find": "users", "filter": {"name": "ann"}, "$db": "app"}"#
    );
    assert_eq!(attr(op, "db.rowcount"), 2);
    assert_eq!(
        (op.start_ts, op.end_ts, op.status),
        (10, 20, StatusCode::Unset)
    );
    assert!(!op.attributes.contains_key("db.system"));
    assert_eq!(p.unparsed(), 0);
    assert!(looks_like_message(&req));
    assert!(!looks_like_message(&rep));
    assert!(!looks_like_message(b"GET / HTTP/1.1\r\nHost: x\r\n"));
}

#[test]
fn bytewise_feeding_gives_the_same_ops() {
    let (req, rep) = find_pair();
    let ins = op_msg(
        8,
        0,
        0,
        &Bson::default().s("insert", "c").s("$db", "app"),
        Some(("documents", vec![Bson::default().i32("a", 1)])),
    );
    let ins_rep = op_msg(101, 8, 0, &Bson::default().i32("n", 1).f64("ok", 1.0), None);
    let pieces: &[(Side, &[u8])] = &[(C, &req), (S, &rep), (C, &ins), (S, &ins_rep)];
    let (whole, _) = run(pieces);
    assert_eq!(whole.len(), 2);
    assert_eq!(run_bytewise(pieces), whole);
}

#[test]
fn insert_with_document_sequence_shows_documents_and_n() {
    let body = Bson::default()
        .s("insert", "users")
        .bool("ordered", true)
        .s("$db", "app");
    let docs = vec![
        Bson::default().s("name", "ann").i32("age", 30),
        Bson::default().s("name", "bob").i32("age", 41),
    ];
    let req = op_msg(9, 0, 0, &body, Some(("documents", docs)));
    let rep = op_msg(200, 9, 0, &Bson::default().i32("n", 2).f64("ok", 1.0), None);
    let (ops, p) = run(&[(C, &req), (S, &rep)]);
    let op = &ops[0];
    assert_eq!(op.name, "insert");
    assert_eq!(attr(op, "db.mongodb.collection"), "users");
    assert_eq!(
        attr(op, "db.statement"),
        r#"{"insert": "users", "ordered": true, "$db": "app", "documents": [{"name": "ann", "age": 30}, {"name": "bob", "age": 41}]}"#
    );
    assert_eq!(attr(op, "db.rowcount"), 2);
    assert_eq!(op.status, StatusCode::Unset);
    assert_eq!(p.unparsed(), 0);
}

#[test]
fn ok_zero_reply_is_an_error_with_code() {
    let req = op_msg(
        3,
        0,
        0,
        &Bson::default().s("drop", "nope").s("$db", "app"),
        None,
    );
    let rep = op_msg(
        4,
        3,
        0,
        &Bson::default()
            .f64("ok", 0.0)
            .s("errmsg", "ns not found")
            .i32("code", 26)
            .s("codeName", "NamespaceNotFound"),
        None,
    );
    let (ops, _) = run(&[(C, &req), (S, &rep)]);
    assert_eq!(ops[0].status, StatusCode::Error);
    assert_eq!(ops[0].status_description.as_deref(), Some("ns not found"));
    assert_eq!(attr(&ops[0], "db.error.code"), 26);
}

#[test]
fn write_errors_make_an_error_status() {
    let req = op_msg(
        5,
        0,
        0,
        &Bson::default().s("insert", "users").s("$db", "app"),
        Some(("documents", vec![Bson::default().i32("_id", 1)])),
    );
    let we = Bson::default()
        .i32("index", 0)
        .i32("code", 11000)
        .s("errmsg", "E11000 duplicate key error");
    let rep = op_msg(
        6,
        5,
        0,
        &Bson::default()
            .i32("n", 0)
            .arr("writeErrors", vec![we])
            .f64("ok", 1.0),
        None,
    );
    let (ops, _) = run(&[(C, &req), (S, &rep)]);
    assert_eq!(ops[0].status, StatusCode::Error);
    assert_eq!(
        ops[0].status_description.as_deref(),
        Some("E11000 duplicate key error")
    );
    assert_eq!(attr(&ops[0], "db.error.code"), 11000);
    assert_eq!(attr(&ops[0], "db.rowcount"), 0);
}

#[test]
fn out_of_order_replies_pair_by_response_to() {
    let a = op_msg(1, 0, 0, &Bson::default().s("find", "a").s("$db", "x"), None);
    let b = op_msg(
        2,
        0,
        0,
        &Bson::default().s("count", "b").s("$db", "x"),
        None,
    );
    let rb = op_msg(50, 2, 0, &Bson::default().i32("n", 5).f64("ok", 1.0), None);
    let ra = op_msg(
        51,
        1,
        0,
        &Bson::default().f64("ok", 0.0).s("errmsg", "boom"),
        None,
    );
    let (ops, p) = run(&[(C, &a), (C, &b), (S, &rb), (S, &ra)]);
    assert_eq!(ops.len(), 2);
    assert_eq!(
        (
            ops[0].name.as_str(),
            ops[0].start_ts,
            ops[0].end_ts,
            ops[0].status
        ),
        ("count", 20, 30, StatusCode::Unset)
    );
    assert_eq!(
        (
            ops[1].name.as_str(),
            ops[1].start_ts,
            ops[1].end_ts,
            ops[1].status
        ),
        ("find", 10, 40, StatusCode::Error)
    );
    assert_eq!(p.unparsed(), 0);
}

#[test]
fn op_query_handshake_pairs_with_op_reply() {
    let q = Bson::default().i32("isMaster", 1).bool("helloOk", true).d(
        "client",
        Bson::default().d(
            "driver",
            Bson::default().s("name", "PyMongo").s("version", "4.6"),
        ),
    );
    let mut body = 0i32.to_le_bytes().to_vec();
    body.extend(b"admin.$cmd\0");
    body.extend(0i32.to_le_bytes());
    body.extend((-1i32).to_le_bytes());
    body.extend(q.build());
    let mut req = header(body.len() + 16, 11, 0, OP_QUERY);
    req.extend(body);
    let doc = Bson::default()
        .bool("ismaster", true)
        .i32("maxWireVersion", 21)
        .f64("ok", 1.0);
    let mut rb = 0i32.to_le_bytes().to_vec();
    rb.extend(0i64.to_le_bytes());
    rb.extend(0i32.to_le_bytes());
    rb.extend(1i32.to_le_bytes());
    rb.extend(doc.build());
    let mut rep = header(rb.len() + 16, 77, 11, OP_REPLY);
    rep.extend(rb);
    assert!(looks_like_message(&req));
    let (ops, p) = run(&[(C, &req), (S, &rep)]);
    assert_eq!(ops.len(), 1);
    let op = &ops[0];
    assert_eq!(op.name, "isMaster");
    assert_eq!(attr(op, "db.name"), "admin");
    assert!(!op.attributes.contains_key("db.mongodb.collection"));
    assert_eq!(
        attr(op, "db.statement"),
        r#"{"isMaster": 1, "helloOk": true, "client": {"driver": {"name": "PyMongo", "version": "4.6"}}}"#
    );
    assert_eq!(op.status, StatusCode::Unset);
    assert_eq!(p.unparsed(), 0);
    // The same reply with QueryFailure set is an error.
    let mut fail = rep.clone();
    fail[16] = 2;
    let (ops, _) = run(&[(C, &req), (S, &fail)]);
    assert_eq!(ops[0].status, StatusCode::Error);
}

#[test]
fn more_to_come_request_needs_no_reply() {
    let req = op_msg(
        21,
        0,
        MORE_TO_COME,
        &Bson::default().s("insert", "logs").s("$db", "app"),
        Some(("documents", vec![Bson::default().i32("a", 1)])),
    );
    let (ops, p) = run(&[(C, &req)]);
    assert_eq!(ops.len(), 1);
    assert_eq!(
        (ops[0].name.as_str(), ops[0].start_ts, ops[0].end_ts),
        ("insert", 10, 10)
    );
    assert!(p.pending.is_empty());
}

#[test]
fn checksum_flag_is_skipped() {
    let req = op_msg(
        31,
        0,
        CHECKSUM_PRESENT,
        &Bson::default().i32("ping", 1).s("$db", "admin"),
        None,
    );
    let rep = op_msg(32, 31, CHECKSUM_PRESENT, &ok(), None);
    let (ops, p) = run(&[(C, &req), (S, &rep)]);
    assert_eq!(ops.len(), 1);
    assert_eq!(
        attr(&ops[0], "db.statement"),
        r#"{"ping": 1, "$db": "admin"}"#
    );
    assert_eq!(p.unparsed(), 0);
}

#[test]
fn exhaust_replies_after_the_first_are_not_ops() {
    let req = op_msg(
        41,
        0,
        1 << 16,
        &Bson::default().i32("hello", 1).s("$db", "admin"),
        None,
    );
    let r1 = op_msg(42, 41, MORE_TO_COME, &ok(), None);
    let r2 = op_msg(43, 42, MORE_TO_COME, &ok(), None);
    let (ops, p) = run(&[(C, &req), (S, &r1), (S, &r2)]);
    assert_eq!(ops.len(), 1);
    assert_eq!(p.unparsed(), 0);
}

#[test]
fn credentials_are_not_rendered() {
    let req = op_msg(
        1,
        0,
        0,
        &Bson::default()
            .s("createUser", "bob")
            .s("pwd", "hunter2")
            .arr("roles", vec![])
            .s("$db", "admin"),
        None,
    );
    let (ops, _) = run(&[(C, &req), (S, &op_msg(2, 1, 0, &ok(), None))]);
    assert_eq!(
        attr(&ops[0], "db.statement"),
        r#"{"createUser": "bob", "$db": "admin"}"#
    );
    let hello = Bson::default()
        .i32("hello", 1)
        .d(
            "speculativeAuthenticate",
            Bson::default().i32("saslStart", 1),
        )
        .s("$db", "admin");
    let (ops, _) = run(&[
        (C, &op_msg(3, 0, 0, &hello, None)),
        (S, &op_msg(4, 3, 0, &ok(), None)),
    ]);
    assert_eq!(
        attr(&ops[0], "db.statement"),
        r#"{"hello": 1, "$db": "admin"}"#
    );
}

#[test]
fn compressed_messages_are_framed_not_decoded() {
    let mut body = OP_MSG.to_le_bytes().to_vec();
    body.extend(100i32.to_le_bytes());
    body.push(1);
    body.extend([9u8; 30]);
    let mut req = header(body.len() + 16, 61, 0, OP_COMPRESSED);
    req.extend(&body);
    let mut rep = header(body.len() + 16, 62, 61, OP_COMPRESSED);
    rep.extend(&body);
    let (req2, rep2) = find_pair();
    let (ops, p) = run(&[(C, &req), (S, &rep), (C, &req2), (S, &rep2)]);
    let names: Vec<_> = ops.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["compressed", "find"]);
    assert!(!ops[0].attributes.contains_key("db.statement"));
    assert_eq!(p.unparsed(), 0);
}

#[test]
fn close_reports_requests_without_reply() {
    let (req, _) = find_pair();
    let mut p = MongoParser::new(ParserConfig::default());
    let mut out = Vec::new();
    p.feed(C, &req, 5, &mut out);
    p.close(9, &mut out);
    assert_eq!(
        (out.len(), out[0].end_ts, out[0].status),
        (1, 9, StatusCode::Unset)
    );
}

#[test]
fn gap_inside_a_message_skips_it() {
    // The gap falls in the documents of an insert: the command is still known.
    let big = "z".repeat(2000);
    let req = op_msg(
        1,
        0,
        0,
        &Bson::default().s("insert", "c").s("$db", "d"),
        Some(("documents", vec![Bson::default().s("v", &big)])),
    );
    let rep = op_msg(2, 1, 0, &Bson::default().i32("n", 1).f64("ok", 1.0), None);
    let (find, find_rep) = find_pair();
    let mut p = MongoParser::new(ParserConfig::default());
    let mut out = Vec::new();
    p.feed(C, &req[..100], 1, &mut out);
    p.gap(C, 1500, 2, &mut out);
    p.feed(C, &req[1600..], 3, &mut out);
    p.feed(S, &rep, 4, &mut out);
    // A gap inside a reply: paired, outcome unknown.
    p.feed(C, &find, 5, &mut out);
    p.feed(S, &find_rep[..30], 6, &mut out);
    p.gap(S, (find_rep.len() - 30) as u64, 7, &mut out);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].name, "insert");
    assert_eq!(attr(&out[0], "db.name"), "d");
    assert!(attr(&out[0], "db.statement")
        .as_str()
        .unwrap()
        .ends_with(r#""documents": [{...}]}"#));
    assert_eq!(attr(&out[0], "db.rowcount"), 1);
    assert_eq!((out[1].name.as_str(), out[1].end_ts), ("find", 7));
    // Framing continues after both gaps.
    let (ops, _) = {
        let (r, s) = find_pair();
        p.feed(C, &r, 8, &mut out);
        p.feed(S, &s, 9, &mut out);
        (out, ())
    };
    assert_eq!(ops.len(), 3);
    assert_eq!(attr(&ops[2], "db.rowcount"), 2);
}

/// Another find and its reply: requestID and responseTo 8.
fn second_pair() -> (Vec<u8>, Vec<u8>) {
    let (mut q, mut r) = find_pair();
    q[4] = 8;
    r[8] = 8;
    (q, r)
}

#[test]
fn gap_between_messages_resynchronises_at_the_next_piece() {
    let (req, rep) = find_pair();
    let (req2, rep2) = second_pair();
    let mut p = MongoParser::new(ParserConfig::default());
    let mut out = Vec::new();
    p.feed(C, &req, 1, &mut out);
    p.gap(C, 40, 2, &mut out);
    p.feed(C, &req2, 3, &mut out);
    // The request held before the gap still gets its reply, and the one after it too.
    p.feed(S, &rep, 4, &mut out);
    p.feed(S, &rep2, 5, &mut out);
    let got: Vec<_> = out.iter().map(|o| (o.start_ts, o.end_ts)).collect();
    assert_eq!(got, [(1, 4), (3, 5)]);
    assert_eq!(p.losses().get(Loss::Gap), 1);
    // A gap between the server's messages: the next reply resynchronises.
    p.feed(C, &req, 6, &mut out);
    p.gap(S, 10, 7, &mut out);
    p.feed(S, &rep[..20], 8, &mut out);
    p.feed(C, &req2, 9, &mut out);
    p.feed(S, &rep2, 10, &mut out);
    // The reply to the request before the gap was lost in it: that request ends at the
    // gap, marked, once a later request's reply shows the server answered past it.
    let got: Vec<_> = out[2..]
        .iter()
        .map(|o| {
            (
                o.start_ts,
                o.end_ts,
                o.attributes.contains_key("db.response_truncated"),
            )
        })
        .collect();
    assert_eq!(got, [(6, 7, true), (9, 10, false)]);
    assert_eq!(p.losses().get(Loss::Gap), 2);
    assert_eq!(p.losses().total(), 2);
}

#[test]
fn a_stream_watched_from_a_message_middle_resynchronises_and_counts_what_it_dropped() {
    let (req, rep) = find_pair();
    let mut p = MongoParser::new(ParserConfig::default());
    let mut out = Vec::new();
    // The tail of a request, then of a reply: neither starts a message.
    p.feed(C, &req[30..], 1, &mut out);
    p.feed(S, &rep[30..], 2, &mut out);
    assert_eq!(p.losses().get(Loss::Malformed), 2);
    // The reply to the request whose tail was dropped: that exchange was counted then,
    // not again now.
    p.feed(S, &rep, 3, &mut out);
    assert_eq!(p.losses().get(Loss::Unpaired), 0);
    // The next exchange is whole, its reply read as PyMongo reads it: header first.
    p.feed(C, &req, 4, &mut out);
    p.feed(S, &rep[..16], 5, &mut out);
    p.feed(S, &rep[16..], 6, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].name.as_str(), out[0].start_ts, out[0].end_ts),
        ("find", 4, 6)
    );
    assert_eq!(attr(&out[0], "db.rowcount"), 2);
    assert_eq!(p.losses().total(), 2);
    // A reply whose request came before watching began, and no request lost since:
    // unpaired, counted.
    p.feed(S, &rep, 7, &mut out);
    assert_eq!(p.losses().get(Loss::Unpaired), 1);
}

#[test]
fn a_request_lost_to_a_gap_is_counted_once_not_again_when_its_reply_comes() {
    let (req, rep) = find_pair();
    let mut p = MongoParser::new(ParserConfig::default());
    let mut out = Vec::new();
    // The capture cut the request's header: its requestID is lost with it.
    p.feed(C, &req[..10], 1, &mut out);
    p.gap(C, (req.len() - 10) as u64, 1, &mut out);
    p.feed(S, &rep, 2, &mut out);
    assert!(out.is_empty());
    assert_eq!(p.losses().get(Loss::Gap), 1);
    assert_eq!(p.losses().total(), 1, "{:?}", p.losses());
}

#[test]
fn pieces_that_merely_look_like_headers_are_not_taken_for_messages() {
    let (req, _) = find_pair();
    // A known opcode and a sane length, but flag bits no driver sets, a section kind
    // that does not exist, or a body document longer than the message.
    let mut bad_flags = req.clone();
    bad_flags[17] = 0x10;
    let mut bad_kind = req.clone();
    bad_kind[20] = 7;
    let mut bad_doc = req.clone();
    bad_doc[21..25].copy_from_slice(&1000i32.to_le_bytes());
    let mut reply_op = req.clone();
    reply_op[12..16].copy_from_slice(&OP_REPLY.to_le_bytes());
    for bad in [&bad_flags, &bad_kind, &bad_doc, &reply_op] {
        assert_eq!(judge(C, bad), Verdict::Not);
    }
    assert_eq!(judge(C, &req), Verdict::Starts);
    assert_eq!(judge(C, &req[..20]), Verdict::More);
    // A reply is not a request, and a request not a reply.
    assert_eq!(judge(S, &req), Verdict::Not);
    let (_, rep) = find_pair();
    assert_eq!(judge(S, &rep), Verdict::Starts);
    assert_eq!(judge(C, &rep), Verdict::Not);
}

#[test]
fn oversized_message_is_cut_but_still_paired() {
    let big: Vec<Bson> = (0..100)
        .map(|i| Bson::default().s("v", &"q".repeat(100)).i32("i", i))
        .collect();
    let req = op_msg(
        1,
        0,
        0,
        &Bson::default().s("insert", "c").s("$db", "d"),
        Some(("documents", big)),
    );
    let rep = op_msg(2, 1, 0, &Bson::default().i32("n", 100).f64("ok", 1.0), None);
    let mut p = MongoParser::new(ParserConfig {
        max_buffer: 1024,
        max_statement: 100,
        ..ParserConfig::default()
    });
    let mut out = Vec::new();
    p.feed(C, &req, 1, &mut out);
    p.feed(S, &rep, 2, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].name, "insert");
    assert!(attr(&out[0], "db.statement")
        .as_str()
        .unwrap()
        .ends_with("...[truncated]"));
    assert!(p.client.frames.kept_capacity() <= 1024);
    assert_eq!(p.unparsed(), 0);
}

#[test]
fn bytes_that_do_not_frame_are_counted_once_until_a_message_starts() {
    let (req, rep) = find_pair();
    let (ops, p) = run(&[(C, &[0xff; 40]), (C, &[0x00; 40]), (C, &req), (S, &rep)]);
    assert_eq!(ops.len(), 1);
    assert_eq!(p.losses().get(Loss::Malformed), 1);
    assert_eq!(p.losses().total(), 1);
    // In sync, a header that is not one: counted, and framing resumes at the next piece.
    let (ops, p) = run(&[
        (C, &[&req[..], &[0xff; 20]].concat()),
        (S, &rep),
        (C, &req),
        (S, &rep),
    ]);
    assert_eq!(ops.len(), 2);
    assert_eq!(p.losses().get(Loss::Malformed), 1);
}

#[test]
fn exhaust_streams_are_followed_and_stray_replies_counted() {
    let req = op_msg(
        41,
        0,
        EXHAUST_ALLOWED,
        &Bson::default().i32("hello", 1).s("$db", "admin"),
        None,
    );
    let r1 = op_msg(42, 41, MORE_TO_COME, &ok(), None);
    let r2 = op_msg(43, 42, MORE_TO_COME, &ok(), None);
    let r3 = op_msg(44, 43, 0, &ok(), None);
    let stray = op_msg(45, 999, 0, &ok(), None);
    let (ops, p) = run(&[(C, &req), (S, &r1), (S, &r2), (S, &r3), (S, &stray)]);
    assert_eq!(ops.len(), 1);
    assert_eq!(p.losses().get(Loss::Unpaired), 1);
    assert_eq!(p.losses().total(), 1);
    // Watched from the middle of an exhaust stream: its first reply seen is counted, not
    // the ones after it.
    let (ops, p) = run(&[(S, &r2), (S, &r3)]);
    assert!(ops.is_empty());
    assert_eq!(p.losses().get(Loss::Unpaired), 1);
}

/// The PyMongo recording (see `recorded_pymongo_session_gives_expected_ops`) as a script,
/// one message a piece; `split`: each reply read as PyMongo reads it (its 16-byte header,
/// then the body, the larger bodies over two reads) and each request of more than 100
/// bytes written in two.
fn pymongo_script(split: bool) -> scripts::Script {
    let seed = include_bytes!("../../../fuzz/seeds/mongo/pymongo_session");
    let mut rest = &seed[1..];
    let mut s = scripts::Script::new();
    while let Some(h) = Header::parse(rest) {
        let (msg, next) = rest.split_at(h.len as usize);
        let side = if h.response_to == 0 { C } else { S };
        let cuts: Vec<usize> = match (split, side) {
            (false, _) => vec![],
            (true, S) if msg.len() > 100 => vec![16, 16 + (msg.len() - 16) / 2],
            (true, S) => vec![16],
            (true, C) if msg.len() > 100 => vec![msg.len() / 3],
            (true, C) => vec![],
        };
        let mut at = 0;
        for cut in cuts.into_iter().chain([msg.len()]) {
            let ts = s.len() as u64 + 1;
            s.push((side, msg[at..cut].to_vec(), ts));
            at = cut;
        }
        rest = next;
    }
    s
}

#[test]
fn a_recorded_session_watched_from_any_byte_offset_yields_every_later_exchange_paired_right() {
    for split in [false, true] {
        let s = pymongo_script(split);
        let checked = scripts::every_offset(Protocol::Mongo, &s, scripts::Cut::Start);
        assert!(checked > 0);
    }
}

/// One side captured before the other at the start of a connection watched from its
/// middle (the TLS probes attaching): no reply is paired with another's request.
#[test]
fn a_recorded_session_with_one_side_captured_first_never_pairs_wrongly() {
    for split in [false, true] {
        let s = pymongo_script(split);
        assert!(
            scripts::one_side_first(Protocol::Mongo, &s, scripts::First::Server, |_, _| {}) > 0
        );
    }
}

/// The same with the client side captured first: replies name their requests.
#[test]
fn a_recorded_session_with_the_client_side_captured_first_never_pairs_wrongly() {
    for split in [false, true] {
        let s = pymongo_script(split);
        assert!(
            scripts::one_side_first(Protocol::Mongo, &s, scripts::First::Either, |_, _| {}) > 0
        );
    }
}

#[test]
fn a_capture_gap_at_any_byte_offset_of_a_recorded_session_loses_only_what_it_cuts() {
    for split in [false, true] {
        let s = pymongo_script(split);
        let checked = scripts::every_offset(Protocol::Mongo, &s, scripts::Cut::Gap);
        assert!(checked > 0);
    }
}

#[test]
fn bson_values_render_as_relaxed_extended_json() {
    let mut dec = [0u8; 16];
    // 1.5 = 15 × 10^-1: coefficient 15, biased exponent 6175.
    let v: u128 = (6175u128 << 113) | 15;
    dec.copy_from_slice(&v.to_le_bytes());
    let d = Bson::default()
        .f64("d", 1.0)
        .f64("inf", f64::INFINITY)
        .el(0x05, "bin", &[2, 0, 0, 0, 0, 0xff, 0xfe])
        .el(0x06, "u", &[])
        .el(0x09, "date", &1_700_000_000_123i64.to_le_bytes())
        .el(0x09, "old", &(-1i64).to_le_bytes())
        .el(0x0A, "n", &[])
        .el(0x0B, "re", b"^a\0i\0")
        .el(0x0D, "code", &[2, 0, 0, 0, b'x', 0])
        .el(0x11, "ts", &[2, 0, 0, 0, 1, 0, 0, 0])
        .i64("l", -5)
        .el(0x13, "dec", &dec)
        .el(0xFF, "min", &[])
        .el(0x7F, "max", &[])
        .s("esc", "a\"b\\c\n")
        .el(
            0x04,
            "arr",
            &Bson::default().i32("0", 1).s("1", "x").build(),
        );
    let bytes = d.build();
    let (doc, rest) = doc_at(&bytes).unwrap();
    assert!(rest.is_empty());
    let mut out = ExtJson::new(10_000);
    out.doc(doc, 0, &|_, _| true);
    assert_eq!(
        out.s,
        concat!(
            r#"{"d": 1.0, "inf": {"$numberDouble": "Infinity"}, "bin": {"$binary": {"base64": "//4=", "subType": "00"}}, "#,
            r#""u": {"$undefined": true}, "date": {"$date": "2023-11-14T22:13:20.123Z"}, "old": {"$date": {"$numberLong": "-1"}}, "#,
            r#""n": null, "re": {"$regularExpression": {"pattern": "^a", "options": "i"}}, "code": {"$code": "x"}, "#,
            r#""ts": {"$timestamp": {"t": 1, "i": 2}}, "l": -5, "dec": {"$numberDecimal": "1.5"}, "#,
            r#""min": {"$minKey": 1}, "max": {"$maxKey": 1}, "esc": "a\"b\\c\n", "arr": [1, "x"]}"#
        )
    );
    assert_eq!(decimal128(&((6176u128 << 113) | 1).to_le_bytes()), "1");
    assert_eq!(decimal128(&((6173u128 << 113) | 1).to_le_bytes()), "0.001");
    assert_eq!(decimal128(&((6179u128 << 113) | 1).to_le_bytes()), "1E+3");
    assert_eq!(
        decimal128(&((1u128 << 127) | (6176u128 << 113)).to_le_bytes()),
        "-0"
    );
    assert_eq!(decimal128(&(0x1eu128 << 122).to_le_bytes()), "Infinity");
}

/// A document encoded by PyMongo 4.20 (`bson.encode`), and PyMongo's
/// `json_util.dumps(…, RELAXED_JSON_OPTIONS)` of it, except that non-ASCII stays
/// unescaped and floats use Rust's exponent spelling (`1.5e300`, not `1.5e+300`).
#[test]
fn bson_rendering_matches_pymongo_relaxed_json() {
    let hex = [
            "ad010000075f696400655f1c0001020304050607080266696e6400060000007573657273000366696c74657200570000",
            "000361676500130000000124677465000000000000803540000b6e616d65005e612e2a00690004746167730027000000",
            "0230000200000078001031000100000012320000000000000100000a330008340001000009617400ff834ff78d010000",
            "096f6c640018fcffffffffffff0562696e0008000000000001fe68656c6c6f0575756964001000000004000102030405",
            "060708090a0b0c0d0e0f1364656300393000000000000000000000000026b0136465633200396c760e4fc986a2a39f1a",
            "950f003e30136465633300000000000a5bc138938d44c64d31fe5f117473000700000000f153650f636f646500210000",
            "000d00000066756e6374696f6e28297b7d000c0000001061000100000000ff6d696e007f6d61780002657363001e0000",
            "0071756f746522206261636b5c206e6c0a20746162092063746c0120c3a900016e656700000000000000008001626967",
            "00355800662deb417e01736d616c6c0048afbc9af2d77a3e106900000000800224646200040000006170700000",
        ]
        .concat();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let (doc, rest) = doc_at(&bytes).unwrap();
    assert!(rest.is_empty());
    let mut out = ExtJson::new(10_000);
    out.doc(doc, 0, &|_, _| true);
    let expected = r#"{"_id": {"$oid": "655f1c000102030405060708"}, "find": "users", "filter": {"age": {"$gte": 21.5}, "name": {"$regularExpression": {"pattern": "^a.*", "options": "i"}}, "tags": ["x", 1, 1099511627776, null, true]}, "at": {"$date": "2024-02-29T23:59:59.999Z"}, "old": {"$date": {"$numberLong": "-1000"}}, "bin": {"$binary": {"base64": "AAH+aGVsbG8=", "subType": "00"}}, "uuid": {"$binary": {"base64": "AAECAwQFBgcICQoLDA0ODw==", "subType": "04"}}, "dec": {"$numberDecimal": "-1.2345E-9"}, "dec2": {"$numberDecimal": "123456789012345678901234567890.5"}, "dec3": {"$numberDecimal": "1.000000000000000000000000000000000E+6144"}, "ts": {"$timestamp": {"t": 1700000000, "i": 7}}, "code": {"$code": "function(){}", "$scope": {"a": 1}}, "min": {"$minKey": 1}, "max": {"$maxKey": 1}, "esc": "quote\" back\\ nl\n tab\t ctl\u0001 é", "neg": -0.0, "big": 1.5e300, "small": 1e-7, "i": -2147483648, "$db": "app"}"#;
    assert_eq!(out.s, expected);
}

/// Encodings and strings from PyMongo's `bson.Decimal128` (`.bid`, `str()`).
#[test]
fn decimal128_strings_match_pymongo() {
    let cases = [
        ("00000000000000000000000000004030", "0"),
        ("000000000000000000000000000040b0", "-0"),
        ("01000000000000000000000000003430", "0.000001"),
        ("01000000000000000000000000003230", "1E-7"),
        ("00000000000000000000000000002c30", "0E-10"),
        ("00000000000000000000000000000078", "Infinity"),
        ("000000000000000000000000000000f8", "-Infinity"),
        ("0000000000000000000000000000007c", "NaN"),
        ("7b000000000000000000000000008c30", "1.23E+40"),
        (
            "f2af967ed05c82de3297ff6fde3c4030",
            "1234567890123456789012345678901234",
        ),
        ("64000000000000000000000000004030", "100"),
        ("01000000000000000000000000004430", "1E+2"),
        ("0f000000000000000000000000003eb0", "-1.5"),
        ("d2040000000000000000000000003430", "0.001234"),
        ("01000000000000000000000000000000", "1E-6176"),
        (
            "ffffffff638e8d37c087adbe09edff5f",
            "9.999999999999999999999999999999999E+6144",
        ),
        ("7d000000000000000000000000003830", "0.0125"),
    ];
    for (hex, want) in cases {
        let bytes: Vec<u8> = (0..32)
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(decimal128(&bytes), want, "{hex}");
    }
}

/// A PyMongo 4.20 session recorded through a proxy against FerretDB 1.24 (the fuzz
/// seed, after its split byte). Messages frame themselves, and requests are the
/// messages with `responseTo == 0`, so the recording needs no side markers.
#[test]
fn recorded_pymongo_session_gives_expected_ops() {
    let seed = include_bytes!("../../../fuzz/seeds/mongo/pymongo_session");
    let mut rest = &seed[1..];
    let mut pieces: Vec<(Side, &[u8])> = Vec::new();
    while let Some(h) = Header::parse(rest) {
        let (msg, next) = rest.split_at(h.len as usize);
        pieces.push((if h.response_to == 0 { C } else { S }, msg));
        rest = next;
    }
    let (ops, p) = run(&pieces);
    let got: Vec<_> = ops
        .iter()
        .map(|o| {
            (
                o.name.as_str(),
                o.status == StatusCode::Error,
                attr(o, "db.rowcount").as_i64(),
                attr(o, "db.error.code").as_i64(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("ismaster", false, None, None),
            ("drop", false, None, None),
            ("insert", false, Some(5), None),
            ("find", false, Some(3), None),
            ("find", false, Some(2), None),
            ("getMore", false, Some(2), None),
            ("getMore", false, Some(1), None),
            ("update", false, Some(2), None),
            ("delete", false, Some(1), None),
            ("insert", true, Some(0), Some(11000)),
            ("nosuchcommand", true, None, Some(59)),
            ("aggregate", false, Some(1), None),
            ("aggregate", false, Some(1), None),
            ("endSessions", true, None, Some(59)),
        ]
    );
    assert_eq!(p.unparsed(), 0);
    let find = &ops[3];
    assert_eq!(
        attr(find, "db.statement"),
        r#"{"find": "users", "filter": {"age": {"$gte": 22}}, "$db": "app"}"#
    );
    assert_eq!(attr(find, "db.mongodb.collection"), "users");
    assert_eq!(attr(find, "db.name"), "app");
    assert_eq!(attr(&ops[5], "db.mongodb.collection"), "users");
    assert!(ops[9]
        .status_description
        .as_deref()
        .unwrap()
        .starts_with("E11000 duplicate key error"));
    assert_eq!(run_bytewise(&pieces), ops);
}

#[test]
fn deeply_nested_documents_render_bounded() {
    let mut d = Bson::default().i32("x", 1);
    for _ in 0..60 {
        d = Bson::default().d("a", d);
    }
    let bytes = Bson::default()
        .s("find", "c")
        .d("filter", d)
        .s("$db", "x")
        .build();
    let (doc, _) = doc_at(&bytes).unwrap();
    let mut out = ExtJson::new(100_000);
    out.doc(doc, 0, &|_, _| true);
    assert!(out.s.contains("{...}"));
}

#[test]
fn random_garbage_never_panics() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (req, rep) = find_pair();
    for round in 0..3000 {
        // Mutations of valid traffic reach deep into the decoder; pure noise tests framing.
        let mut bytes: Vec<u8> = if round % 2 == 0 {
            [req.clone(), rep.clone()].concat()
        } else {
            (0..next() % 400).map(|_| next() as u8).collect()
        };
        for _ in 0..(next() % 8) {
            if !bytes.is_empty() {
                let i = (next() as usize) % bytes.len();
                bytes[i] = next() as u8;
            }
        }
        super::super::fuzz_one(Protocol::Mongo, &bytes);
        super::super::fuzz_resync(Protocol::Mongo, &bytes);
        let mut p = MongoParser::new(ParserConfig::default());
        let mut out = Vec::new();
        let (a, b) = bytes.split_at(bytes.len().min(req.len()));
        p.feed(C, a, 1, &mut out);
        p.feed(S, b, 2, &mut out);
        p.gap(S, next() % 64, 3, &mut out);
        p.close(4, &mut out);
    }
}

#[test]
fn a_short_request_tail_and_its_reply_seen_first_are_counted_once() {
    let (req, rep) = find_pair();
    let (req2, rep2) = second_pair();
    let mut p = MongoParser::new(ParserConfig::default());
    let mut out = Vec::new();
    // Watching began five bytes before the request's end: too short to judge, held.
    p.feed(C, &req[req.len() - 5..], 1, &mut out);
    // Its reply answers nothing seen: counted once, as unpaired.
    p.feed(S, &rep, 2, &mut out);
    // The next request shows the held bytes did not start a message: dropped, not
    // counted again.
    p.feed(C, &req2, 3, &mut out);
    p.feed(S, &rep2, 4, &mut out);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(p.losses().total(), 1, "{:?}", p.losses());
}
