use super::*;
use crate::protocol::scripts;

fn run(pieces: &[(Side, &[u8])]) -> (Vec<Op>, u64) {
    let mut p = HttpParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (i, (side, data)) in pieces.iter().enumerate() {
        p.feed(*side, data, i as u64 + 1, &mut out);
    }
    p.close(1000, &mut out);
    (out, p.unparsed())
}

fn bytewise(pieces: &[(Side, &[u8])]) -> Vec<Op> {
    let mut p = HttpParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (side, data) in pieces {
        for b in data.iter() {
            p.feed(*side, std::slice::from_ref(b), 1, &mut out);
        }
    }
    p.close(1000, &mut out);
    out
}

const REQ: &[u8] = b"POST /v1/chat HTTP/1.1\r\nHost: api.example\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"q\":\"hello\"}";
const RESP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\":\"hi\"}\n";

#[test]
fn request_pairs_with_its_response_with_headers_and_bodies() {
    let (ops, unparsed) = run(&[(Side::Client, REQ), (Side::Server, RESP)]);
    assert_eq!(unparsed, 0);
    assert_eq!(ops.len(), 1);
    let op = &ops[0];
    assert_eq!(op.name, "POST");
    assert_eq!(op.attributes["http.method"], "POST");
    assert_eq!(op.attributes["http.target"], "/v1/chat");
    assert_eq!(op.attributes["http.host"], "api.example");
    assert_eq!(op.attributes["http.status_code"], 200);
    assert_eq!(op.request_body.as_deref(), Some(&b"{\"q\":\"hello\"}"[..]));
    assert_eq!(op.response_body.as_deref(), Some(&b"{\"a\":\"hi\"}\n"[..]));
    assert_eq!((op.start_ts, op.end_ts), (1, 2));
    assert_eq!(op.status, StatusCode::Unset);
    assert_eq!(
        bytewise(&[(Side::Client, REQ), (Side::Server, RESP)]).len(),
        1
    );
}

/// One step of a table case: bytes one side sent, or bytes of one side the capture lost.
/// Each piece has the next timestamp (1, 2, …); a gap has the timestamp of the piece
/// before it (the same call, cut).
#[derive(Clone, Copy)]
enum Step {
    C(&'static [u8]),
    S(&'static [u8]),
    GapC(u64),
    GapS(u64),
}

/// What a case expects of one op.
struct Want {
    target: &'static str,
    /// The status code; None: no response (reported at close).
    status: Option<u64>,
    req_body: Option<&'static [u8]>,
    resp_body: Option<&'static [u8]>,
    req_cut: bool,
    resp_cut: bool,
    /// `status_description` of an ERROR span; None: status UNSET.
    error: Option<&'static str>,
    end_ts: u64,
}

const fn ok(
    target: &'static str,
    status: u64,
    resp_body: Option<&'static [u8]>,
    end_ts: u64,
) -> Want {
    Want {
        target,
        status: Some(status),
        req_body: None,
        resp_body,
        req_cut: false,
        resp_cut: false,
        error: None,
        end_ts,
    }
}

struct Case {
    name: &'static str,
    max_body: Option<usize>,
    steps: &'static [Step],
    want: &'static [Want],
    /// Losses by reason: malformed, gap, unpaired, oversize.
    losses: [u64; 4],
}

use Step::{GapC, GapS, C, S};

/// Exchanges that differ only in their bytes: framing, interim and bodiless responses,
/// upgrades, gaps, limits, losses and what resynchronises after them.
const CASES: &[Case] = &[
    Case {
        name: "pipelined requests pair in order; HEAD has no body",
        max_body: None,
        steps: &[
            C(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\nHEAD /c HTTP/1.1\r\nHost: h\r\n\r\n"),
            S(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 404 Not Found\r\nContent-Length: 1\r\n\r\nbHTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"),
        ],
        want: &[
            ok("/a", 200, Some(b"a"), 2),
            Want { error: Some("HTTP 404 Not Found"), ..ok("/b", 404, Some(b"b"), 2) },
            ok("/c", 200, None, 2),
        ],
        losses: [0; 4],
    },
    Case {
        name: "chunked bodies (extensions, trailers) are decoded",
        max_body: None,
        steps: &[
            C(b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"),
            S(b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nboom\r\n0\r\n\r\n"),
        ],
        want: &[Want {
            req_body: Some(b"hello world"),
            error: Some("HTTP 500 Internal Server Error"),
            ..ok("/up", 500, Some(b"boom"), 2)
        }],
        losses: [0; 4],
    },
    Case {
        name: "a close-delimited body ends at close",
        max_body: None,
        steps: &[
            C(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"),
            S(b"HTTP/1.0 200 OK\r\n\r\nall of it"),
        ],
        want: &[ok("/", 200, Some(b"all of it"), 1000)],
        losses: [0; 4],
    },
    Case {
        name: "100 Continue then the final response; 204 and 304 have no body",
        max_body: None,
        steps: &[
            C(b"PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"),
            S(b"HTTP/1.1 100 Continue\r\n\r\n"),
            C(b"abc"),
            S(b"HTTP/1.1 204 No Content\r\n\r\n"),
            C(b"GET /y HTTP/1.1\r\nHost: h\r\n\r\n"),
            S(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
        ],
        want: &[
            Want { req_body: Some(b"abc"), ..ok("/x", 204, None, 4) },
            ok("/y", 304, None, 6),
        ],
        losses: [0; 4],
    },
    Case {
        name: "an upgrade (not h2c) makes the rest opaque",
        max_body: None,
        steps: &[
            C(b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
            S(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello"),
            C(b"\x81\x85garbage frames"),
        ],
        want: &[ok("/ws", 101, None, 2)],
        losses: [0; 4],
    },
    Case {
        name: "a gap inside a body is skipped and marked",
        max_body: None,
        steps: &[
            C(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\nabc"),
            GapC(997),
            C(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n"),
            S(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        ],
        want: &[
            Want { req_body: Some(b"abc"), req_cut: true, ..ok("/", 200, None, 3) },
            ok("/next", 200, None, 3),
        ],
        losses: [0; 4],
    },
    Case {
        name: "a body with a hole is kept as the prefix before the hole",
        max_body: None,
        steps: &[
            C(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"),
            S(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"),
            GapS(4),
            S(b"xyz"),
        ],
        want: &[Want { resp_cut: true, ..ok("/", 200, Some(b"abc"), 3) }],
        losses: [0; 4],
    },
    Case {
        name: "bodies are kept up to the limit",
        max_body: Some(4),
        steps: &[
            C(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789"),
            S(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        ],
        want: &[Want { req_body: Some(b"0123"), req_cut: true, ..ok("/", 200, None, 2) }],
        losses: [0; 4],
    },
    Case {
        name: "garbage is counted, not panicked on",
        max_body: None,
        steps: &[
            C(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"),
            // The answer to that one request: the same lost exchange, counted once.
            S(b"\x00\x01garbage\r\n\r\n"),
        ],
        want: &[],
        losses: [1, 0, 0, 0],
    },
    Case {
        name: "watched from inside an exchange with an interim reply, it is counted once",
        max_body: None,
        steps: &[
            // Watching began inside the 100 Continue; the client's first bytes are the
            // body it then sent, the final response follows.
            S(b"Continue\r\n\r\n"),
            C(b"five!!"),
            S(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            C(b"GET /b HTTP/1.1\r\n\r\n"),
            S(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"),
        ],
        want: &[ok("/b", 200, Some(b"b"), 5)],
        losses: [1, 0, 0, 0],
    },
    Case {
        name: "conflicting Content-Length is malformed",
        max_body: None,
        steps: &[C(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")],
        want: &[],
        losses: [1, 0, 0, 0],
    },
    Case {
        name: "a response to a request never seen is dropped, counted and skipped by its length",
        max_body: None,
        steps: &[
            // The in-flight response of a request sent before watching began.
            S(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"),
            S(b"cde"),
            C(b"GET /next HTTP/1.1\r\n\r\n"),
            S(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"),
        ],
        want: &[ok("/next", 200, Some(b"next"), 4)],
        losses: [0, 0, 1, 0],
    },
    Case {
        name: "a request lost to a gap is counted once, not again when its reply comes",
        max_body: None,
        steps: &[
            // The capture cut the request's head: its boundaries are lost.
            C(b"GET /lost HTTP/1.1\r\nHo"),
            GapC(10),
            S(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlost"),
            C(b"GET /next HTTP/1.1\r\n\r\n"),
            S(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"),
            // A later reply to a request never seen is a loss of its own.
            S(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        ],
        want: &[ok("/next", 200, Some(b"next"), 4)],
        losses: [0, 1, 1, 0],
    },
    Case {
        name: "a reply lost to a gap is counted once, not again for its request",
        max_body: None,
        steps: &[
            C(b"GET /a HTTP/1.1\r\n\r\n"),
            // The capture cut the reply's head.
            S(b"HTTP/1.1 200 OK\r\nConte"),
            GapS(30),
            C(b"GET /b HTTP/1.1\r\n\r\n"),
            S(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"),
        ],
        want: &[ok("/b", 200, Some(b"b"), 4)],
        losses: [0, 1, 0, 0],
    },
    Case {
        name: "an interim reply lost to a gap is counted once, not again when the final one comes",
        max_body: None,
        steps: &[
            C(b"PUT /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"),
            // The capture cut the 100 Continue.
            S(b"HTTP/1.1 10"),
            GapS(14),
            C(b"a"),
            S(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            C(b"GET /b HTTP/1.1\r\n\r\n"),
            S(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"),
        ],
        want: &[ok("/b", 200, Some(b"b"), 6)],
        losses: [0, 1, 0, 0],
    },
    Case {
        name: "pipelined requests after a loss are dropped rather than guessed",
        max_body: None,
        steps: &[
            // The middle of some body: the server side is lost.
            S(b"tail of a body"),
            // Two requests in flight at once: the next response could answer either
            // (the first one's may have been lost), so neither is paired.
            C(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"),
            S(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"),
            // Then one at a time again: paired.
            C(b"GET /c HTTP/1.1\r\n\r\n"),
            S(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nc"),
        ],
        want: &[ok("/c", 200, Some(b"c"), 5)],
        losses: [1, 0, 2, 0],
    },
];

/// Runs a case's steps on a fresh parser, whole pieces or one byte at a time (each
/// byte with its piece's timestamp).
fn run_case(case: &Case, byte_at_a_time: bool) -> (Vec<Op>, Losses) {
    let mut cfg = ParserConfig::default();
    if let Some(max) = case.max_body {
        cfg.max_body = max;
    }
    let mut p = HttpParser::new(cfg);
    let mut out = Vec::new();
    let mut ts = 0;
    for step in case.steps {
        match *step {
            C(data) | S(data) => {
                let side = if matches!(step, C(_)) {
                    Side::Client
                } else {
                    Side::Server
                };
                ts += 1;
                if byte_at_a_time {
                    for b in data {
                        p.feed(side, std::slice::from_ref(b), ts, &mut out);
                    }
                } else {
                    p.feed(side, data, ts, &mut out);
                }
            }
            GapC(n) => p.gap(Side::Client, n, ts, &mut out),
            GapS(n) => p.gap(Side::Server, n, ts, &mut out),
        }
    }
    p.close(1000, &mut out);
    (out, p.losses())
}

#[test]
fn table_of_exchanges_gives_the_expected_ops_and_losses() {
    for case in CASES {
        let name = case.name;
        let (ops, losses) = run_case(case, false);
        let got: Vec<u64> = Loss::ALL.iter().map(|l| losses.get(*l)).collect();
        assert_eq!(
            got, case.losses,
            "{name}: losses (malformed, gap, unpaired, oversize)"
        );
        assert_eq!(ops.len(), case.want.len(), "{name}: {ops:#?}");
        for (op, want) in ops.iter().zip(case.want) {
            let a = |key: &str| op.attributes.get(key).cloned();
            assert_eq!(a("http.target"), Some(want.target.into()), "{name}");
            assert_eq!(a("http.status_code"), want.status.map(Into::into), "{name}");
            assert_eq!(
                op.request_body.as_deref(),
                want.req_body,
                "{name}: request body"
            );
            assert_eq!(
                op.response_body.as_deref(),
                want.resp_body,
                "{name}: response body"
            );
            assert_eq!(
                a("http.request_body_truncated"),
                want.req_cut.then_some(true.into()),
                "{name}"
            );
            assert_eq!(
                a("http.response_body_truncated"),
                want.resp_cut.then_some(true.into()),
                "{name}"
            );
            let status = if want.error.is_some() {
                StatusCode::Error
            } else {
                StatusCode::Unset
            };
            assert_eq!(
                (op.status, op.status_description.as_deref()),
                (status, want.error),
                "{name}"
            );
            assert_eq!(op.end_ts, want.end_ts, "{name}: end_ts");
        }
        // Where nothing is lost, how the bytes are split into reads does not matter (a
        // lost side resynchronises only at the start of a captured piece, so cases with
        // losses depend on their pieces).
        if case.losses == [0; 4] && !case.steps.iter().any(|s| matches!(s, GapC(_) | GapS(_))) {
            assert_eq!(run_case(case, true).0, ops, "{name}: byte at a time");
        }
    }
}

/// A keep-alive session as a pooled client makes it (one request at a time): each
/// exchange names itself in the request target and in the response, so a response
/// paired with another's request shows. Content-Length, chunked over several reads, a
/// body split over reads, HEAD, 204, 100-continue and an error status.
fn keep_alive_session() -> scripts::Script {
    let mut pieces: Vec<(Side, Vec<u8>)> = Vec::new();
    let mut add = |side, b: &[u8]| pieces.push((side, b.to_vec()));
    add(
        Side::Client,
        b"GET /item/1 HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n",
    );
    add(
        Side::Server,
        b"HTTP/1.1 200 OK\r\nX-Id: 1\r\nContent-Length: 9\r\n\r\nitem-1-ok",
    );
    add(
        Side::Client,
        b"POST /item/2 HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n{\"n\":\"two\"}",
    );
    add(
        Side::Server,
        b"HTTP/1.1 201 Created\r\nX-Id: 2\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nitem-2\r\n",
    );
    add(Side::Server, b"4\r\n-mid\r\n");
    add(Side::Server, b"3\r\n-ok\r\n0\r\n\r\n");
    add(Side::Client, b"HEAD /item/3 HTTP/1.1\r\nHost: h\r\n\r\n");
    add(
        Side::Server,
        b"HTTP/1.1 200 OK\r\nX-Id: 3\r\nContent-Length: 500\r\n\r\n",
    );
    add(Side::Client, b"DELETE /item/4 HTTP/1.1\r\nHost: h\r\n\r\n");
    add(Side::Server, b"HTTP/1.1 204 No Content\r\nX-Id: 4\r\n\r\n");
    add(
        Side::Client,
        b"PUT /item/5 HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 6\r\n\r\n",
    );
    add(Side::Server, b"HTTP/1.1 100 Continue\r\n\r\n");
    add(Side::Client, b"five!!");
    add(
        Side::Server,
        b"HTTP/1.1 200 OK\r\nX-Id: 5\r\nContent-Length: 19\r\n\r\nitem-5-",
    );
    add(Side::Server, b"in-two-reads");
    add(Side::Client, b"GET /item/6 HTTP/1.1\r\nHost: h\r\n\r\n");
    add(
        Side::Server,
        b"HTTP/1.1 404 Not Found\r\nX-Id: 6\r\nContent-Length: 6\r\n\r\nitem-6",
    );
    add(Side::Client, b"GET /item/7 HTTP/1.1\r\nHost: h\r\n\r\n");
    add(
        Side::Server,
        b"HTTP/1.1 200 OK\r\nX-Id: 7\r\nContent-Length: 6\r\n\r\nitem-7",
    );
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, (side, b))| (side, b, i as u64 + 1))
        .collect()
}

#[test]
fn the_recorded_session_pairs_each_response_with_its_own_request() {
    let ops = scripts::run(Protocol::Http, &keep_alive_session());
    assert_eq!(ops.len(), 7);
    for op in &ops {
        let target = op.attributes["http.target"].as_str().unwrap();
        let id = header(op.response_headers.as_ref().unwrap(), "x-id").unwrap();
        assert_eq!(target, format!("/item/{id}"));
    }
}

#[test]
fn a_stream_watched_from_any_byte_offset_yields_every_later_exchange_paired_right() {
    let s = keep_alive_session();
    for cut in [scripts::Cut::Start, scripts::Cut::Midstream] {
        let checked = scripts::every_offset(Protocol::Http, &s, cut);
        assert!(checked > 0, "{cut:?}");
    }
}

/// The session as the agent sees it when it starts watching an open connection while
/// the libssl probes attach one function after another: the client's pieces from `w`
/// on, the server's from `r` on, with nothing to say the others were missed (a function
/// not yet probed leaves no gap). `midstream`: the parser is told the connection was
/// open before watching began, as the agent tells it.
fn attach_window(s: &scripts::Script, w: usize, r: usize, midstream: bool) -> (Vec<Op>, Losses) {
    let mut p = HttpParser::new(ParserConfig::default());
    if midstream {
        p.watched_midstream();
    }
    let mut out = Vec::new();
    for (i, (side, data, ts)) in s.iter().enumerate() {
        if i >= if *side == Side::Client { w } else { r } {
            p.feed(*side, data, *ts, &mut out);
        }
    }
    p.close(1000, &mut out);
    (out, p.losses())
}

/// Requests seen whose responses were not (the write side probed first), or responses
/// whose requests were not (the read side first), at the start of a connection watched
/// from its middle: no response is ever paired with another's request, every exchange
/// whose request began once both sides were captured and a status line had been seen
/// comes out whole, and whatever went missing is counted.
#[test]
fn a_connection_watched_from_its_middle_with_one_side_captured_first_never_pairs_wrongly() {
    let s = keep_alive_session();
    let clean = scripts::run(Protocol::Http, &s);
    let want = |op: &Op| clean.iter().find(|c| c.start_ts == op.start_ts).unwrap();
    let mut checked = 0;
    for w in 0..s.len() {
        for r in 0..s.len() {
            let (ops, losses) = attach_window(&s, w, r, true);
            for op in &ops {
                assert_eq!(
                    op,
                    want(op),
                    "client from piece {w}, server from {r}: paired wrongly"
                );
            }
            // The first status line the server side can resynchronise at.
            let Some(f) =
                (r..s.len()).find(|&i| s[i].0 == Side::Server && s[i].1.starts_with(b"HTTP/1."))
            else {
                continue;
            };
            let after = s[w.max(f)].2;
            for c in clean.iter().filter(|c| c.start_ts > after) {
                assert!(
                    ops.contains(c),
                    "client from piece {w}, server from {r}: missing {c:?}"
                );
                checked += 1;
            }
            let fed = |c: &Op| {
                s.iter().enumerate().any(|(i, (side, _, ts))| {
                    *ts >= c.start_ts
                        && *ts <= c.end_ts
                        && i >= if *side == Side::Client { w } else { r }
                })
            };
            if let Some(lost) = clean.iter().find(|c| fed(c) && !ops.contains(c)) {
                assert!(
                    losses.total() > 0,
                    "client from piece {w}, server from {r}: {lost:?} lost, no loss counted"
                );
            }
        }
    }
    assert!(checked > 0);
}

/// The generic form of the test above (the one every parser runs).
#[test]
fn the_session_with_one_side_captured_first_never_pairs_wrongly() {
    assert!(
        scripts::one_side_first(
            Protocol::Http,
            &keep_alive_session(),
            scripts::First::Server,
            |_, _| {}
        ) > 0
    );
}

/// The same with the client side captured first.
#[test]
fn the_session_with_the_client_side_captured_first_never_pairs_wrongly() {
    assert!(
        scripts::one_side_first(
            Protocol::Http,
            &keep_alive_session(),
            scripts::First::Either,
            |_, _| {}
        ) > 0
    );
}

/// Without being told the connection was open before watching began, the parser
/// pairs by order from the first request it sees: requests seen without their
/// responses put every later response on an earlier request.
#[test]
fn a_parser_not_told_the_connection_is_midstream_pairs_by_order_from_the_first_request() {
    let s = keep_alive_session();
    // Client from GET /item/1 on, server from the HEAD's response (piece 7) on.
    let (ops, _) = attach_window(&s, 0, 7, false);
    let head = ops
        .iter()
        .find(|op| header(op.response_headers.as_ref().unwrap(), "x-id") == Some("3"))
        .unwrap();
    assert_eq!(head.attributes["http.target"].as_str(), Some("/item/1"));
    let (ops, _) = attach_window(&s, 0, 7, true);
    assert!(ops.iter().all(|op| {
        let target = op.attributes["http.target"].as_str().unwrap();
        header(op.response_headers.as_ref().unwrap(), "x-id")
            .is_some_and(|id| target == format!("/item/{id}"))
    }));
}

#[test]
fn a_capture_gap_at_any_byte_offset_loses_only_the_exchange_it_cuts() {
    let s = keep_alive_session();
    let checked = scripts::every_offset(Protocol::Http, &s, scripts::Cut::Gap);
    assert!(checked > 0);
}

/// The head splitter cuts exactly where `split("\r\n")` does: lone `\r` and `\n` stay
/// inside a line, empty lines and a trailing CRLF give empty pieces.
#[test]
fn head_lines_split_as_str_split_does() {
    for text in [
        "",
        "GET / HTTP/1.1",
        "GET / HTTP/1.1\r\nHost: a\r\nX: b",
        "a\r\n",
        "\r\n\r\n",
        "a\rb\r\nc\nd\r",
        "\r\r\n\r",
        "é\r\nü: ß\r\n",
    ] {
        let ours: Vec<&str> = crlf_lines(text).collect();
        let std: Vec<&str> = text.split("\r\n").collect();
        assert_eq!(ours, std, "{text:?}");
    }
}
