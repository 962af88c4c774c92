use super::*;

fn cfg() -> ParserConfig {
    ParserConfig::default()
}

/// A command as clients send it: an array of bulk strings.
fn cmd(args: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    v
}
fn bulk(s: &str) -> String {
    format!("${}\r\n{s}\r\n", s.len())
}

/// Feeds whole pieces in order; returns the ops and the parser.
fn run(pieces: &[(Side, &[u8])]) -> (Vec<Op>, RedisParser) {
    let mut p = RedisParser::new(cfg());
    let mut out = Vec::new();
    for (i, (side, data)) in pieces.iter().enumerate() {
        p.feed(*side, data, 10 * (i as u64 + 1), &mut out);
    }
    (out, p)
}

/// Same, 1 byte at a time (timestamps per piece preserved).
fn run_bytewise(pieces: &[(Side, &[u8])]) -> Vec<Op> {
    let mut p = RedisParser::new(cfg());
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

fn stmt(op: &Op) -> &str {
    op.attributes["db.statement"].as_str().unwrap()
}

use crate::protocol::scripts;
use Side::{Client as C, Server as S};

#[test]
fn set_then_get_become_two_ops() {
    let set = cmd(&["SET", "k", "v"]);
    let get = cmd(&["GET", "k"]);
    let (ops, p) = run(&[(C, &set), (S, b"+OK\r\n"), (C, &get), (S, b"$1\r\nv\r\n")]);
    assert_eq!(ops.len(), 2);
    assert_eq!(ops[0].name, "SET");
    assert_eq!(ops[0].attributes["db.operation"], "SET");
    assert_eq!(stmt(&ops[0]), "SET k v");
    assert_eq!(ops[0].attributes["db.redis.database_index"], 0);
    assert_eq!(ops[0].attributes["db.redis.args_length"], 3);
    assert_eq!((ops[0].start_ts, ops[0].end_ts), (10, 20));
    assert_eq!(ops[0].status, StatusCode::Unset);
    assert_eq!(ops[1].name, "GET");
    assert_eq!(stmt(&ops[1]), "GET k");
    assert_eq!((ops[1].start_ts, ops[1].end_ts), (30, 40));
    assert!(!ops[0].attributes.contains_key("db.system"));
    assert_eq!(p.unparsed(), 0);
}

fn pipeline() -> (Vec<u8>, Vec<u8>) {
    let mut c = cmd(&["SET", "a", "1"]);
    c.extend(cmd(&["LPUSH", "a", "x"]));
    c.extend(cmd(&["INCR", "a"]));
    c.extend(cmd(&["MGET", "a", "b"]));
    let s = format!(
            "+OK\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n:2\r\n*2\r\n{}$-1\r\n",
            bulk("2")
        );
    (c, s.into_bytes())
}

#[test]
fn pipelined_commands_pair_in_order_with_error_in_the_middle() {
    let (c, s) = pipeline();
    let (ops, p) = run(&[(C, &c), (S, &s)]);
    let names: Vec<_> = ops.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["SET", "LPUSH", "INCR", "MGET"]);
    assert_eq!(ops[1].status, StatusCode::Error);
    assert_eq!(
        ops[1].status_description.as_deref(),
        Some("WRONGTYPE Operation against a key holding the wrong kind of value")
    );
    assert_eq!(ops[0].status, StatusCode::Unset);
    assert_eq!(ops[2].status, StatusCode::Unset);
    assert_eq!(ops[3].status, StatusCode::Unset);
    assert!(ops.iter().all(|o| o.end_ts == 20 && o.start_ts == 10));
    assert_eq!(p.unparsed(), 0);
}

#[test]
fn bytewise_feeding_gives_the_same_ops() {
    let (c, s) = pipeline();
    let pieces: &[(Side, &[u8])] = &[(C, &c), (S, &s), (C, b"PING\r\n"), (S, b"+PONG\r\n")];
    let (whole, _) = run(pieces);
    assert_eq!(whole.len(), 5);
    assert_eq!(run_bytewise(pieces), whole);
}

#[test]
fn resp3_map_set_attribute_and_push_are_handled() {
    let mut c = cmd(&["HELLO", "3"]);
    c.extend(cmd(&["HGETALL", "h"]));
    c.extend(cmd(&["SMEMBERS", "s"]));
    c.extend(cmd(&["GET", "k"]));
    c.extend(cmd(&["GET", "missing"]));
    let s = concat!(
        "%2\r\n+server\r\n+redis\r\n+proto\r\n:3\r\n",
        // a push (client-side caching invalidation) between replies: not a reply
        ">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n",
        "%1\r\n$1\r\nf\r\n*2\r\n,1.5\r\n#t\r\n",
        "~2\r\n$1\r\na\r\n(12345678901234567890\r\n",
        // an attribute before the reply belongs to it, is not one
        "|1\r\n+key-popularity\r\n%1\r\n$1\r\nk\r\n,0.19\r\n$1\r\nv\r\n",
        "_\r\n",
    );
    let (ops, p) = run(&[(C, &c), (S, s.as_bytes())]);
    let names: Vec<_> = ops.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["HELLO", "HGETALL", "SMEMBERS", "GET", "GET"]);
    assert!(ops.iter().all(|o| o.status == StatusCode::Unset));
    assert_eq!(p.unparsed(), 0);
    assert!(p.pending.is_empty());
}

/// Traffic recorded from redis-py 8.1.0 against redis-server 7.0.15 through a proxy:
/// a RESP2 pipeline and transaction, RESP2 pub/sub, RESP3 pub/sub (acks as pushes).
const PIPELINE: &[(Side, &[u8])] = &[
            (C, b"*4\r\n$6\r\nCLIENT\r\n$7\r\nSETINFO\r\n$8\r\nLIB-NAME\r\n$8\r\nredis-py\r\n"),
            (S, b"-ERR unknown subcommand 'SETINFO'. Try CLIENT HELP.\r\n"),
            (C, b"*4\r\n$6\r\nCLIENT\r\n$7\r\nSETINFO\r\n$7\r\nLIB-VER\r\n$5\r\n8.1.0\r\n"),
            (S, b"-ERR unknown subcommand 'SETINFO'. Try CLIENT HELP.\r\n"),
            (C, b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\n1\r\n*3\r\n$5\r\nLPUSH\r\n$1\r\na\r\n$1\r\nx\r\n*3\r\n$6\r\nINCRBY\r\n$1\r\na\r\n$1\r\n1\r\n*3\r\n$4\r\nMGET\r\n$1\r\na\r\n$1\r\nb\r\n"),
            (S, b"+OK\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n:2\r\n*2\r\n$1\r\n2\r\n$-1\r\n"),
            (C, b"*1\r\n$5\r\nMULTI\r\n*3\r\n$6\r\nINCRBY\r\n$1\r\nn\r\n$1\r\n1\r\n*2\r\n$3\r\nGET\r\n$1\r\nn\r\n*1\r\n$4\r\nEXEC\r\n"),
            (S, b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:1\r\n$1\r\n1\r\n"),
];
const RESP2_PUBSUB: &[(Side, &[u8])] = &[
            (C, b"*4\r\n$6\r\nCLIENT\r\n$7\r\nSETINFO\r\n$8\r\nLIB-NAME\r\n$8\r\nredis-py\r\n"),
            (S, b"-ERR unknown subcommand 'SETINFO'. Try CLIENT HELP.\r\n"),
            (C, b"*4\r\n$6\r\nCLIENT\r\n$7\r\nSETINFO\r\n$7\r\nLIB-VER\r\n$5\r\n8.1.0\r\n"),
            (S, b"-ERR unknown subcommand 'SETINFO'. Try CLIENT HELP.\r\n"),
            (C, b"*3\r\n$9\r\nSUBSCRIBE\r\n$3\r\nch1\r\n$3\r\nch2\r\n"),
            (S, b"*3\r\n$9\r\nsubscribe\r\n$3\r\nch1\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$3\r\nch2\r\n:2\r\n"),
            (S, b"*3\r\n$7\r\nmessage\r\n$3\r\nch1\r\n$5\r\nhello\r\n"),
            (C, b"*1\r\n$4\r\nPING\r\n"),
            (S, b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"),
            (C, b"*1\r\n$11\r\nUNSUBSCRIBE\r\n"),
            (S, b"*3\r\n$11\r\nunsubscribe\r\n$3\r\nch1\r\n:1\r\n*3\r\n$11\r\nunsubscribe\r\n$3\r\nch2\r\n:0\r\n"),
];
const RESP3_PUBSUB: &[(Side, &[u8])] = &[
            (C, b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n"),
            (S, b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$6\r\n7.0.15\r\n$5\r\nproto\r\n:3\r\n$2\r\nid\r\n:10\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n"),
            (C, b"*5\r\n$6\r\nCLIENT\r\n$19\r\nMAINT_NOTIFICATIONS\r\n$2\r\nON\r\n$20\r\nmoving-endpoint-type\r\n$13\r\ninternal-fqdn\r\n"),
            (S, b"-ERR unknown subcommand 'MAINT_NOTIFICATIONS'. Try CLIENT HELP.\r\n"),
            (C, b"*4\r\n$6\r\nCLIENT\r\n$7\r\nSETINFO\r\n$8\r\nLIB-NAME\r\n$8\r\nredis-py\r\n"),
            (S, b"-ERR unknown subcommand 'SETINFO'. Try CLIENT HELP.\r\n"),
            (C, b"*4\r\n$6\r\nCLIENT\r\n$7\r\nSETINFO\r\n$7\r\nLIB-VER\r\n$5\r\n8.1.0\r\n"),
            (S, b"-ERR unknown subcommand 'SETINFO'. Try CLIENT HELP.\r\n"),
            (C, b"*3\r\n$9\r\nSUBSCRIBE\r\n$3\r\nch1\r\n$3\r\nch2\r\n"),
            (S, b">3\r\n$9\r\nsubscribe\r\n$3\r\nch1\r\n:1\r\n>3\r\n$9\r\nsubscribe\r\n$3\r\nch2\r\n:2\r\n"),
            (S, b">3\r\n$7\r\nmessage\r\n$3\r\nch1\r\n$5\r\nhello\r\n"),
            (C, b"*1\r\n$4\r\nPING\r\n"),
            (S, b"+PONG\r\n"),
            (C, b"*1\r\n$11\r\nUNSUBSCRIBE\r\n"),
            (S, b">3\r\n$11\r\nunsubscribe\r\n$3\r\nch1\r\n:1\r\n>3\r\n$11\r\nunsubscribe\r\n$3\r\nch2\r\n:0\r\n"),
];

#[test]
fn recorded_redis_py_sessions_pair_correctly() {
    let (pipeline, resp2_pubsub, resp3_pubsub) = (PIPELINE, RESP2_PUBSUB, RESP3_PUBSUB);
    let expect: [&[(&str, bool)]; 3] = [
        &[
            ("CLIENT", true),
            ("CLIENT", true),
            ("SET", false),
            ("LPUSH", true),
            ("INCRBY", false),
            ("MGET", false),
            ("MULTI", false),
            ("INCRBY", false),
            ("GET", false),
            ("EXEC", false),
        ],
        &[
            ("CLIENT", true),
            ("CLIENT", true),
            ("SUBSCRIBE", false),
            ("PING", false),
            ("UNSUBSCRIBE", false),
        ],
        &[
            ("HELLO", false),
            ("CLIENT", true),
            ("CLIENT", true),
            ("CLIENT", true),
            ("SUBSCRIBE", false),
            ("PING", false),
            ("UNSUBSCRIBE", false),
        ],
    ];
    for (pieces, expect) in [pipeline, resp2_pubsub, resp3_pubsub]
        .into_iter()
        .zip(expect)
    {
        let (ops, p) = run(pieces);
        let got: Vec<_> = ops
            .iter()
            .map(|o| (o.name.as_str(), o.status == StatusCode::Error))
            .collect();
        assert_eq!(got, expect);
        assert_eq!(p.unparsed(), 0);
        assert!(p.pending.is_empty());
        assert_eq!(run_bytewise(pieces), ops);
    }
}

#[test]
fn resp3_bulk_error_is_an_error_status() {
    let (ops, _) = run(&[
        (C, &cmd(&["EVAL", "x", "0"])),
        (S, b"!21\r\nSYNTAX invalid syntax\r\n"),
    ]);
    assert_eq!(ops[0].status, StatusCode::Error);
    assert_eq!(
        ops[0].status_description.as_deref(),
        Some("SYNTAX invalid syntax")
    );
}

#[test]
fn select_changes_the_database_index_of_later_commands() {
    let mut c = cmd(&["SELECT", "2"]);
    c.extend(cmd(&["GET", "k"]));
    let mut c2 = cmd(&["SELECT", "x"]);
    c2.extend(cmd(&["GET", "k"]));
    let (ops, _) = run(&[
        (C, &cmd(&["GET", "k"])),
        (S, b"$-1\r\n"),
        (C, &c),
        (S, b"+OK\r\n$-1\r\n"),
        (C, &c2),
        (
            S,
            b"-ERR value is not an integer or out of range\r\n$-1\r\n",
        ),
    ]);
    let dbs: Vec<_> = ops
        .iter()
        .map(|o| o.attributes["db.redis.database_index"].as_i64().unwrap())
        .collect();
    // GET before; SELECT itself ran on db 0; GET pipelined behind it runs on 2; a
    // failed SELECT changes nothing.
    assert_eq!(dbs, [0, 0, 2, 2, 2]);
    assert_eq!(ops[3].status, StatusCode::Error);
}

#[test]
fn inline_command_is_parsed_and_detected() {
    let (ops, _) = run(&[
        (C, &cmd(&["HELLO", "2"])),
        (S, b"*0\r\n"),
        (C, b"PING\r\n"),
        (S, b"+PONG\r\n"),
        (C, b"set  k   v\r\n"),
        (S, b"+OK\r\n"),
    ]);
    assert_eq!(ops.len(), 3);
    assert_eq!(ops[1].name, "PING");
    assert_eq!(stmt(&ops[1]), "PING");
    assert_eq!(ops[2].name, "SET");
    assert_eq!(stmt(&ops[2]), "set k v");
    assert_eq!(ops[2].attributes["db.redis.args_length"], 3);
    // As a connection's first bytes an inline line is not taken: a piece of an array
    // command cut anywhere reads as one (`SUBSCRIBE\r\n` from `…$11\r\nUNSUBSCRIBE\r\n`).
    let (ops, p) = run(&[(C, b"SUBSCRIBE\r\n"), (S, b"*3\r\n$11\r\nunsubscribe\r\n")]);
    assert!(ops.is_empty());
    assert_eq!(p.losses().get(Loss::Unpaired), 1);
    assert!(looks_like_command(b"PING\r\n"));
    assert!(looks_like_command(b"get k\r\n"));
    assert!(looks_like_command(b"*3\r\n$3\r\nSET\r\n"));
    assert!(!looks_like_command(b"GET / HTTP/1.1\r\n"));
    assert!(!looks_like_command(b"GET /"));
    assert!(!looks_like_command(b"*\r\n$"));
    assert!(!looks_like_command(b"FOO bar\r\n"));
}

#[test]
fn long_arguments_are_cut_at_100_characters() {
    let long = "x".repeat(150);
    let ops = run(&[(C, &cmd(&["SET", "k", &long])), (S, b"+OK\r\n")]).0;
    assert_eq!(stmt(&ops[0]), format!("SET k {}...", "x".repeat(100)));
    // Multi-byte characters count as characters, invalid bytes render lossily.
    let uni = "é".repeat(101);
    let ops = run(&[(C, &cmd(&["GET", &uni])), (S, b"$-1\r\n")]).0;
    assert_eq!(stmt(&ops[0]), format!("GET {}...", "é".repeat(100)));
    let ops = run(&[
        (C, b"*2\r\n$3\r\nGET\r\n$2\r\n\xff\xfe\r\n"),
        (S, b"$-1\r\n"),
    ])
    .0;
    assert_eq!(stmt(&ops[0]), "GET \u{fffd}\u{fffd}");
    // The whole statement is cut at max_statement.
    let mut p = RedisParser::new(ParserConfig {
        max_statement: 20,
        ..cfg()
    });
    let mut out = Vec::new();
    let args: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
    let mut all = vec!["DEL"];
    all.extend(args.iter().map(String::as_str));
    p.feed(C, &cmd(&all), 1, &mut out);
    p.feed(S, b":0\r\n", 2, &mut out);
    assert_eq!(stmt(&out[0]), "DEL k0 k1 k2 k3 k4 k...[truncated]");
    assert_eq!(out[0].attributes["db.redis.args_length"], 51);
}

#[test]
fn auth_credentials_are_not_recorded() {
    let (ops, _) = run(&[
        (C, &cmd(&["AUTH", "user", "s3cret"])),
        (S, b"+OK\r\n"),
        (
            C,
            &cmd(&["HELLO", "3", "AUTH", "user", "s3cret", "SETNAME", "app"]),
        ),
        (S, b"%0\r\n"),
    ]);
    assert_eq!(stmt(&ops[0]), "AUTH ? ?");
    assert_eq!(stmt(&ops[1]), "HELLO 3 AUTH ? ? SETNAME app");
}

#[test]
fn multi_exec_commands_are_each_an_op() {
    let mut c = cmd(&["MULTI"]);
    c.extend(cmd(&["INCR", "a"]));
    c.extend(cmd(&["GET", "a"]));
    c.extend(cmd(&["EXEC"]));
    c.extend(cmd(&["PING"]));
    let s = format!(
        "+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:1\r\n{}+PONG\r\n",
        bulk("1")
    );
    let (ops, p) = run(&[(C, &c), (S, s.as_bytes())]);
    let names: Vec<_> = ops.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["MULTI", "INCR", "GET", "EXEC", "PING"]);
    assert_eq!(p.unparsed(), 0);
}

#[test]
fn resp2_subscribe_mode_does_not_desync() {
    let sub = |kind: &str, ch: &str, n: i64| format!("*3\r\n{}{}:{n}\r\n", bulk(kind), bulk(ch));
    let msg = |ch: &str, m: &str| format!("*3\r\n{}{}{}", bulk("message"), bulk(ch), bulk(m));
    let server = [
        sub("subscribe", "a", 1),
        sub("subscribe", "b", 2),
        msg("a", "hi"),
        "*2\r\n$4\r\npong\r\n$0\r\n\r\n".to_string(),
        msg("b", "subscribe"),
        sub("unsubscribe", "a", 1),
        sub("unsubscribe", "b", 0),
    ]
    .concat();
    let mut c = cmd(&["SUBSCRIBE", "a", "b"]);
    c.extend(cmd(&["PING"]));
    c.extend(cmd(&["UNSUBSCRIBE"]));
    let (ops, p) = run(&[
        (C, &c),
        (S, server.as_bytes()),
        (C, &cmd(&["GET", "k"])),
        (S, b"$1\r\nv\r\n"),
    ]);
    let names: Vec<_> = ops.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["SUBSCRIBE", "PING", "UNSUBSCRIBE", "GET"]);
    assert_eq!(stmt(&ops[0]), "SUBSCRIBE a b");
    assert!(!p.sub_mode);
    assert_eq!(p.unparsed(), 0);
}

#[test]
fn resp3_subscribe_acks_are_pushes() {
    let c = cmd(&["SUBSCRIBE", "a"]);
    let s = concat!(
        ">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n",
        ">3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n"
    );
    let (ops, p) = run(&[
        (C, &c),
        (S, s.as_bytes()),
        (C, &cmd(&["PING"])),
        (S, b"+PONG\r\n"),
    ]);
    let names: Vec<_> = ops.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["SUBSCRIBE", "PING"]);
    assert_eq!(p.unparsed(), 0);
}

#[test]
fn close_reports_commands_without_reply() {
    let mut p = RedisParser::new(cfg());
    let mut out = Vec::new();
    p.feed(C, &cmd(&["BLPOP", "q", "0"]), 5, &mut out);
    assert!(out.is_empty());
    p.close(99, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].start_ts, out[0].end_ts, out[0].status),
        (5, 99, StatusCode::Unset)
    );
}

#[test]
fn gap_inside_a_bulk_string_is_skipped() {
    let mut p = RedisParser::new(cfg());
    let mut out = Vec::new();
    let big = format!("{}{}", "a".repeat(50), "b".repeat(950));
    let c = cmd(&["SET", "k", &big]);
    // Lose 900 bytes of the value on the client side, after its first 50.
    let cut = c.len() - 2 - 950;
    p.feed(C, &c[..cut], 1, &mut out);
    p.gap(C, 900, 2, &mut out);
    p.feed(C, &c[cut + 900..], 3, &mut out);
    // And lose bytes of a bulk reply on the server side.
    let reply = format!("${}\r\n{}\r\n", big.len(), big);
    p.feed(S, b"+OK\r\n", 4, &mut out);
    p.feed(C, &cmd(&["GET", "k"]), 5, &mut out);
    p.feed(S, &reply.as_bytes()[..10], 6, &mut out);
    p.gap(S, 900, 7, &mut out);
    p.feed(S, &reply.as_bytes()[910..], 8, &mut out);
    p.feed(C, &cmd(&["PING"]), 9, &mut out);
    p.feed(S, b"+PONG\r\n", 10, &mut out);
    let names: Vec<_> = out.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["SET", "GET", "PING"]);
    assert_eq!(out[1].end_ts, 8);
    // Only the bytes before the gap are shown, marked as cut.
    assert_eq!(stmt(&out[0]), format!("SET k {}...", "a".repeat(50)));
    assert_eq!(p.unparsed(), 0);
}

#[test]
fn gap_outside_a_bulk_string_loses_the_side_until_the_next_command() {
    // Server side: waiting commands end without a reply; the rest of the lost reply is
    // dropped; the client's next command pairs again.
    let mut p = RedisParser::new(cfg());
    let mut out = Vec::new();
    p.feed(C, &cmd(&["GET", "a"]), 1, &mut out);
    p.feed(C, &cmd(&["GET", "b"]), 2, &mut out);
    p.gap(S, 7, 3, &mut out);
    p.feed(S, b"$1\r\nx\r\n", 4, &mut out);
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|o| o.status == StatusCode::Unset
        && o.end_ts == 3
        && o.attributes["db.response_truncated"] == true));
    p.feed(C, &cmd(&["GET", "c"]), 5, &mut out);
    p.feed(S, b"$1\r\nc\r\n", 6, &mut out);
    assert_eq!(out.len(), 3);
    assert_eq!((stmt(&out[2]), out[2].end_ts), ("GET c", 6));
    assert!(!out[2].attributes.contains_key("db.response_truncated"));
    assert_eq!(p.losses().get(Loss::Gap), 1);
    assert_eq!(p.unparsed(), 1);
    // Client side: queued commands still get their replies, nothing wrong after.
    let mut p = RedisParser::new(cfg());
    let mut out = Vec::new();
    p.feed(C, &cmd(&["GET", "a"]), 1, &mut out);
    p.gap(C, 30, 2, &mut out);
    p.feed(C, &cmd(&["GET", "z"]), 3, &mut out);
    p.feed(S, b"$1\r\n1\r\n$1\r\n2\r\n$1\r\n3\r\n", 4, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(stmt(&out[0]), "GET a");
    assert_eq!(p.losses().get(Loss::Gap), 1);
    // GET z came while GET a waited: dropped, counted once; replies 2 and 3 answer
    // nothing held: the lost command's (counted as the gap) and GET z's.
    assert_eq!(p.losses().get(Loss::Unpaired), 1);
}

#[test]
fn a_command_lost_to_a_gap_is_counted_once_not_again_when_its_reply_comes() {
    let mut p = RedisParser::new(cfg());
    let mut out = Vec::new();
    p.feed(C, &cmd(&["GET", "a"]), 1, &mut out);
    p.feed(S, b"$1\r\na\r\n", 2, &mut out);
    // The capture cut the next command's name: it is lost, and so is its reply.
    p.feed(C, b"*2\r\n$3\r\nG", 3, &mut out);
    p.gap(C, 8, 3, &mut out);
    p.feed(S, b"$1\r\nx\r\n", 4, &mut out);
    p.feed(C, &cmd(&["GET", "b"]), 5, &mut out);
    p.feed(S, b"$1\r\nb\r\n", 6, &mut out);
    let got: Vec<_> = out.iter().map(|o| (stmt(o), o.end_ts)).collect();
    assert_eq!(got, [("GET a", 2), ("GET b", 6)]);
    assert_eq!(p.losses(), losses(0, 1, 0, 0));
    // A later reply to a command never seen is a loss of its own.
    p.feed(S, b"+OK\r\n", 7, &mut out);
    assert_eq!(p.losses(), losses(0, 1, 1, 0));
}

#[test]
fn a_lost_write_of_two_commands_counts_the_second_when_its_reply_shows_it() {
    let mut p = RedisParser::new(cfg());
    let mut out = Vec::new();
    p.feed(C, &cmd(&["GET", "a"]), 1, &mut out);
    p.gap(C, 40, 2, &mut out);
    p.feed(S, b"$1\r\na\r\n$1\r\nc\r\n$1\r\nd\r\n", 3, &mut out);
    assert_eq!(out.len(), 1);
    // Two exchanges lost: the gap, and the second reply that answers nothing held.
    assert_eq!(p.losses(), losses(0, 1, 1, 0));
}

/// Losses by reason: malformed, gap, unpaired, oversize.
fn losses(malformed: u64, gap: u64, unpaired: u64, oversize: u64) -> Losses {
    let mut l = Losses::default();
    for (why, n) in [
        (Loss::Malformed, malformed),
        (Loss::Gap, gap),
        (Loss::Unpaired, unpaired),
        (Loss::Oversize, oversize),
    ] {
        for _ in 0..n {
            l.add(why);
        }
    }
    l
}

#[test]
fn malformed_server_bytes_are_counted_once_and_pairing_resumes() {
    let (ops, p) = run(&[
        (C, &cmd(&["GET", "a"])),
        (S, b"?garbage\r\n"),
        (S, b"more garbage\r\n"),
        (C, &cmd(&["GET", "b"])),
        (S, b"$1\r\nb\r\n"),
    ]);
    assert_eq!(ops.len(), 2);
    assert_eq!(ops[0].end_ts, 20);
    assert_eq!((stmt(&ops[1]), ops[1].end_ts), ("GET b", 50));
    assert_eq!(p.losses().get(Loss::Malformed), 1);
    assert_eq!(p.unparsed(), 1);
}

#[test]
fn deep_nesting_is_bounded() {
    let deep = "*1\r\n".repeat(100);
    let (_, p) = run(&[(C, &cmd(&["GET", "a"])), (S, deep.as_bytes())]);
    assert_eq!(p.unparsed(), 1);
    assert!(p.server.stack.len() <= MAX_DEPTH);
}

#[test]
fn pending_queue_is_bounded_but_pairing_stays_exact() {
    let mut p = RedisParser::new(cfg());
    let mut out = Vec::new();
    let n = MAX_PENDING + 10;
    let mut c = Vec::new();
    for i in 0..n {
        c.extend(cmd(&["GET", &i.to_string()]));
    }
    p.feed(C, &c, 1, &mut out);
    assert!(p.pending.len() <= MAX_PENDING);
    assert_eq!(p.unparsed(), 11);
    let s = b"$-1\r\n".repeat(n);
    p.feed(S, &s, 3, &mut out);
    assert_eq!(out.len(), MAX_PENDING - 1);
    assert!(p.pending.is_empty());
    p.feed(C, &cmd(&["PING"]), 4, &mut out);
    p.feed(S, b"+PONG\r\n", 5, &mut out);
    assert_eq!(out.last().unwrap().name, "PING");
    assert_eq!(out.len(), MAX_PENDING);
}

#[test]
fn random_garbage_never_panics() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let alphabet = b"*$+-:_,#!=(%~|>\r\n0123456789-abc";
    for _ in 0..2000 {
        let len = (next() % 300) as usize;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                let r = next();
                if r % 3 == 0 {
                    r as u8
                } else {
                    alphabet[(r >> 8) as usize % alphabet.len()]
                }
            })
            .collect();
        super::super::fuzz_one(Protocol::Redis, &bytes);
        let mut p = RedisParser::new(cfg());
        let mut out = Vec::new();
        p.feed(S, &bytes, 1, &mut out);
        p.feed(C, &bytes, 2, &mut out);
        p.gap(S, next() % 50, 3, &mut out);
        p.close(4, &mut out);
    }
}

/// A command whose name a gap cut shows the part that came (its args then are lost too).
fn name_cut(got: &Op, want: &mut Op) {
    if got.name != want.name && want.name.starts_with(&got.name) {
        want.name.clone_from(&got.name);
        for key in ["db.operation", "db.statement"] {
            if let Some(v) = got.attributes.get(key) {
                want.attributes.insert(key.to_string(), v.clone());
            }
        }
    }
}

/// A recorded session as a script: piece i stamped i + 1.
fn script(pieces: &[(Side, &[u8])]) -> scripts::Script {
    pieces
        .iter()
        .enumerate()
        .map(|(i, (side, data))| (*side, data.to_vec(), i as u64 + 1))
        .collect()
}

#[test]
fn recorded_sessions_watched_from_any_byte_offset_yield_every_later_exchange_paired_right() {
    for rec in [PIPELINE, RESP2_PUBSUB, RESP3_PUBSUB] {
        for cut in [scripts::Cut::Start, scripts::Cut::Midstream] {
            let checked = scripts::every_offset_with(Protocol::Redis, &script(rec), cut, name_cut);
            assert!(checked > 0, "{cut:?}");
        }
    }
}

/// One side captured before the other at the start of a connection watched from its
/// middle (the TLS probes attaching): no reply is paired with another's command.
#[test]
fn recorded_sessions_with_one_side_captured_first_never_pair_wrongly() {
    for rec in [PIPELINE, RESP2_PUBSUB, RESP3_PUBSUB] {
        assert!(
            scripts::one_side_first(
                Protocol::Redis,
                &script(rec),
                scripts::First::Server,
                name_cut
            ) > 0
        );
    }
}

/// The same with the client side captured first.
#[test]
fn recorded_sessions_with_the_client_side_captured_first_never_pair_wrongly() {
    for rec in [PIPELINE, RESP2_PUBSUB, RESP3_PUBSUB] {
        assert!(
            scripts::one_side_first(
                Protocol::Redis,
                &script(rec),
                scripts::First::Either,
                name_cut
            ) > 0
        );
    }
}

#[test]
fn a_capture_gap_at_any_byte_offset_of_a_recorded_session_loses_only_what_it_cuts() {
    for rec in [PIPELINE, RESP2_PUBSUB, RESP3_PUBSUB] {
        let checked =
            scripts::every_offset_with(Protocol::Redis, &script(rec), scripts::Cut::Gap, name_cut);
        assert!(checked > 0);
    }
}

/// Watched from its middle, the client side captured first: a command seen without its
/// reply, then another, then a reply. Which command it answers cannot be told: both are
/// dropped, counted `unpaired`, and the next exchange pairs. (Before the parser was told
/// the connection was open before watching began, the first command took the second's
/// reply.)
#[test]
fn a_command_seen_without_its_reply_on_a_connection_watched_midstream_takes_no_other_reply() {
    let op = scripts::an_answer_missed_at_a_midstream_start(
        Protocol::Redis,
        [
            &cmd(&["GET", "a"]),
            &cmd(&["GET", "b"]),
            &cmd(&["GET", "c"]),
        ],
        b"$1\r\n2\r\n",
    );
    assert_eq!(op.attributes["db.statement"], serde_json::json!("GET c"));
}

#[test]
fn a_pipeline_seen_from_its_second_command_is_not_paired_one_reply_off() {
    // Watching began inside the client's pipelined write, at LPUSH: the server answers
    // SET first. Pairing LPUSH with SET's +OK would shift every reply by one.
    let (c, s) = pipeline();
    let at = cmd(&["SET", "a", "1"]).len();
    let mut p = RedisParser::new(cfg());
    let mut out = Vec::new();
    p.feed(C, &c[at..], 1, &mut out);
    p.feed(S, &s, 2, &mut out);
    assert!(out.is_empty(), "{out:#?}");
    assert_eq!(
        p.losses().get(Loss::Unpaired),
        4,
        "three held ops and the extra reply"
    );
    // The next command pairs again.
    p.feed(C, &cmd(&["PING"]), 3, &mut out);
    p.feed(S, b"+PONG\r\n", 4, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].name.as_str(), out[0].end_ts), ("PING", 4));
}

#[test]
fn a_command_sent_while_earlier_ones_wait_after_a_loss_is_dropped_not_paired() {
    let mut p = RedisParser::new(cfg());
    let mut out = Vec::new();
    p.feed(C, &cmd(&["GET", "a"]), 1, &mut out);
    p.feed(S, b"$1\r\n1\r\n", 2, &mut out);
    p.feed(C, &cmd(&["GET", "b"]), 3, &mut out);
    // The client's next write is lost (two commands in it), then it sends another
    // before their replies came: which reply is its cannot be known.
    p.gap(C, 40, 4, &mut out);
    p.feed(C, &cmd(&["GET", "e"]), 5, &mut out);
    p.feed(
        S,
        b"$1\r\nb\r\n$1\r\nc\r\n$1\r\nd\r\n$1\r\ne\r\n",
        6,
        &mut out,
    );
    let got: Vec<_> = out.iter().map(|o| (stmt(o), o.end_ts)).collect();
    assert_eq!(got, [("GET a", 2), ("GET b", 6)]);
    assert_eq!(p.losses().get(Loss::Gap), 1);
    // Three exchanges lost, each counted once: the gap (c), d (its reply answers
    // nothing held) and GET e (dropped; its reply is not counted again).
    assert_eq!(p.losses().get(Loss::Unpaired), 2);
    // Once every command seen has its reply, the next one pairs.
    p.feed(C, &cmd(&["GET", "f"]), 7, &mut out);
    p.feed(S, b"$1\r\nf\r\n", 8, &mut out);
    p.feed(C, &cmd(&["PING"]), 9, &mut out);
    assert_eq!(out.last().map(|o| (stmt(o), o.end_ts)), Some(("GET f", 8)));
}

#[test]
fn a_subscribe_lost_to_a_gap_is_counted_once_whatever_its_acknowledgements_and_messages() {
    let mut p = RedisParser::new(cfg());
    let mut out = Vec::new();
    p.feed(C, &cmd(&["GET", "a"]), 1, &mut out);
    p.feed(S, b"$1\r\na\r\n", 2, &mut out);
    // The capture cut the SUBSCRIBE's name: the command is lost.
    p.feed(C, b"*3\r\n$9\r\nSUBS", 3, &mut out);
    p.gap(C, 26, 3, &mut out);
    // One acknowledgement per channel, then a message: all of that one command.
    p.feed(S, RESP2_PUBSUB[5].1, 4, &mut out);
    p.feed(S, RESP2_PUBSUB[6].1, 5, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(p.losses(), losses(0, 1, 0, 0));
}
