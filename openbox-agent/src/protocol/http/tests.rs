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

#[test]
fn pipelined_requests_pair_in_order() {
    let reqs = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\nHEAD /c HTTP/1.1\r\nHost: h\r\n\r\n";
    let resps = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 404 Not Found\r\nContent-Length: 1\r\n\r\nbHTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n";
    let (ops, _) = run(&[(Side::Client, reqs), (Side::Server, resps)]);
    let got: Vec<(String, u64)> = ops
        .iter()
        .map(|o| {
            (
                o.attributes["http.target"].as_str().unwrap().to_string(),
                o.attributes["http.status_code"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![("/a".into(), 200), ("/b".into(), 404), ("/c".into(), 200)]
    );
    assert_eq!(ops[1].status, StatusCode::Error);
    assert_eq!(
        ops[1].status_description.as_deref(),
        Some("HTTP 404 Not Found")
    );
    assert_eq!(ops[0].response_body.as_deref(), Some(&b"a"[..]));
    assert_eq!(ops[2].response_body, None, "HEAD has no body");
}

#[test]
fn chunked_bodies_are_decoded_in_any_pieces() {
    let req = b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
    let resp = b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nboom\r\n0\r\n\r\n";
    for ops in [
        run(&[(Side::Client, req), (Side::Server, resp)]).0,
        bytewise(&[(Side::Client, req), (Side::Server, resp)]),
    ] {
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].request_body.as_deref(), Some(&b"hello world"[..]));
        assert_eq!(ops[0].response_body.as_deref(), Some(&b"boom"[..]));
        assert_eq!(ops[0].status, StatusCode::Error);
    }
}

#[test]
fn close_delimited_body_ends_at_close() {
    let (ops, _) = run(&[
        (Side::Client, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"),
        (Side::Server, b"HTTP/1.0 200 OK\r\n\r\nall of it"),
    ]);
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].response_body.as_deref(), Some(&b"all of it"[..]));
    assert_eq!(ops[0].end_ts, 1000);
}

#[test]
fn continue_then_final_response_and_no_body_statuses() {
    let req = b"PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
    let (ops, _) = run(&[
        (Side::Client, req),
        (Side::Server, b"HTTP/1.1 100 Continue\r\n\r\n"),
        (Side::Client, b"abc"),
        (Side::Server, b"HTTP/1.1 204 No Content\r\n\r\n"),
        (Side::Client, b"GET /y HTTP/1.1\r\nHost: h\r\n\r\n"),
        (
            Side::Server,
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        ),
    ]);
    assert_eq!(ops.len(), 2);
    assert_eq!(ops[0].attributes["http.status_code"], 204);
    assert_eq!(ops[0].request_body.as_deref(), Some(&b"abc"[..]));
    assert_eq!(ops[1].attributes["http.status_code"], 304);
}

#[test]
fn upgrade_makes_the_rest_opaque() {
    let (ops, unparsed) = run(&[
        (
            Side::Client,
            b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        ),
        (
            Side::Server,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
        ),
        (Side::Client, b"\x81\x85garbage frames"),
    ]);
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].attributes["http.status_code"], 101);
    assert_eq!(unparsed, 0);
}

#[test]
fn a_gap_inside_a_body_is_skipped_and_marked() {
    let mut p = HttpParser::new(ParserConfig::default());
    let mut out = Vec::new();
    p.feed(
        Side::Client,
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\nabc",
        1,
        &mut out,
    );
    p.gap(Side::Client, 997, 1, &mut out);
    p.feed(
        Side::Client,
        b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n",
        2,
        &mut out,
    );
    p.feed(
        Side::Server,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        3,
        &mut out,
    );
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].attributes["http.request_body_truncated"], true);
    assert_eq!(out[1].attributes["http.target"], "/next");
}

#[test]
fn a_body_with_a_hole_is_kept_as_the_prefix_before_the_hole() {
    let mut p = HttpParser::new(ParserConfig::default());
    let mut out = Vec::new();
    p.feed(
        Side::Client,
        b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
        1,
        &mut out,
    );
    p.feed(
        Side::Server,
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        2,
        &mut out,
    );
    p.gap(Side::Server, 4, 2, &mut out);
    p.feed(Side::Server, b"xyz", 3, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].response_body.as_deref(), Some(&b"abc"[..]));
    assert_eq!(out[0].attributes["http.response_body_truncated"], true);
}

#[test]
fn garbage_is_counted_not_panicked_on() {
    let (ops, unparsed) = run(&[
        (Side::Client, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"),
        (Side::Server, b"\x00\x01garbage\r\n\r\n"),
    ]);
    assert!(unparsed >= 1);
    assert!(ops.is_empty());
    let (_, unparsed) = run(&[(
        Side::Client,
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    )]);
    assert_eq!(unparsed, 1, "conflicting Content-Length");
}

#[test]
fn bodies_are_kept_up_to_the_limit() {
    let mut p = HttpParser::new(ParserConfig {
        max_body: 4,
        ..Default::default()
    });
    let mut out = Vec::new();
    p.feed(
        Side::Client,
        b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789",
        1,
        &mut out,
    );
    p.feed(
        Side::Server,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        2,
        &mut out,
    );
    assert_eq!(out[0].request_body.as_deref(), Some(&b"0123"[..]));
    assert_eq!(out[0].attributes["http.request_body_truncated"], true);
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
    let checked = scripts::every_offset(Protocol::Http, &s, scripts::Cut::StartAt);
    assert!(checked > 0);
}

#[test]
fn a_capture_gap_at_any_byte_offset_loses_only_the_exchange_it_cuts() {
    let s = keep_alive_session();
    let checked = scripts::every_offset(Protocol::Http, &s, scripts::Cut::GapAt);
    assert!(checked > 0);
}

#[test]
fn a_response_to_a_request_never_seen_is_dropped_counted_and_skipped_by_its_length() {
    let mut p = HttpParser::new(ParserConfig::default());
    let mut out = Vec::new();
    // The in-flight response of a request sent before watching began.
    p.feed(
        Side::Server,
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
        1,
        &mut out,
    );
    p.feed(Side::Server, b"cde", 2, &mut out);
    p.feed(Side::Client, b"GET /next HTTP/1.1\r\n\r\n", 3, &mut out);
    p.feed(
        Side::Server,
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext",
        4,
        &mut out,
    );
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].attributes["http.target"], "/next");
    assert_eq!(out[0].response_body.as_deref(), Some(&b"next"[..]));
    assert_eq!(p.losses().get(Loss::Unpaired), 1);
}

#[test]
fn pipelined_requests_after_a_loss_are_dropped_rather_than_guessed() {
    let mut p = HttpParser::new(ParserConfig::default());
    let mut out = Vec::new();
    // The middle of some body: the server side is lost.
    p.feed(Side::Server, b"tail of a body", 1, &mut out);
    // Two requests in flight at once: the next response could answer either (the
    // first one's may have been lost), so neither is paired.
    p.feed(
        Side::Client,
        b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
        2,
        &mut out,
    );
    p.feed(
        Side::Server,
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb",
        3,
        &mut out,
    );
    assert!(out.is_empty(), "{out:?}");
    // Then one at a time again: paired.
    p.feed(Side::Client, b"GET /c HTTP/1.1\r\n\r\n", 4, &mut out);
    p.feed(
        Side::Server,
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nc",
        5,
        &mut out,
    );
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].attributes["http.target"], "/c");
    assert_eq!(out[0].response_body.as_deref(), Some(&b"c"[..]));
    let l = p.losses();
    assert_eq!((l.get(Loss::Malformed), l.get(Loss::Unpaired)), (1, 2));
}
