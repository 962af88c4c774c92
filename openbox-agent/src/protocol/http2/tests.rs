use super::*;
use crate::protocol::scripts::{self, Script};

/// Two REST exchanges on one connection, recorded from the `h2` library (record.py):
/// a POST with a padded JSON body and a response in two DATA frames, then a GET whose
/// headers the encoder sends as dynamic-table references.
const REST: &str = include_str!("rest.rec");
/// gRPC on one connection (record.py): a unary call, a server-streaming call whose
/// messages straddle DATA frames, and a call failing with grpc-status 5.
const GRPC: &str = include_str!("grpc.rec");
/// `Upgrade: h2c` (record.py): an HTTP/1.1 GET asking to switch, `101 Switching
/// Protocols` followed in the same write by the server's SETTINGS and its HTTP/2 answer
/// on stream 1, then the client's preface and a POST on stream 3.
const H2C: &str = include_str!("h2c.rec");

fn run(rec: &str) -> Vec<Op> {
    scripts::run(Protocol::Http2, &scripts::recording(rec))
}

fn run_raw(script: &Script) -> (Vec<Op>, u64) {
    scripts::run_with(Protocol::Http2, ParserConfig::default(), script, false)
}

fn headers(h: &Option<Vec<(String, String)>>) -> Vec<(&str, &str)> {
    h.iter()
        .flatten()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect()
}

#[test]
fn streams_pair_with_http_attributes_headers_and_bodies() {
    let ops = run(REST);
    assert_eq!(ops.len(), 2);
    let post = &ops[0];
    assert_eq!(post.name, "POST");
    assert_eq!(post.attributes["http.method"], "POST");
    assert_eq!(post.attributes["http.target"], "/v1/chat?key=secret");
    // Huffman-coded on the wire.
    assert_eq!(post.attributes["http.host"], "api.example");
    assert_eq!(post.attributes["http.flavor"], "2.0");
    assert_eq!(post.attributes["http.status_code"], 200);
    assert_eq!(
        headers(&post.request_headers),
        [
            ("content-type", "application/json"),
            ("authorization", "Bearer sk-secret"),
            ("user-agent", "python-httpx/0.28.1"),
        ]
    );
    assert_eq!(
        headers(&post.response_headers),
        [("content-type", "application/json")]
    );
    // The request's DATA frame is padded: the padding is not body.
    assert_eq!(
        post.request_body.as_deref(),
        Some(&b"{\"q\":\"hello\"}"[..])
    );
    assert_eq!(post.response_body.as_deref(), Some(&b"{\"a\":\"hi\"}"[..]));
    assert_eq!(post.status, StatusCode::Unset);
    // First byte of the request's HEADERS, last response frame.
    assert_eq!((post.start_ts, post.end_ts), (4, 7));

    let second = &ops[1];
    assert_eq!(second.attributes["http.method"], "POST");
    assert_eq!(second.attributes["http.target"], "/missing");
    // Sent as indices into the dynamic table the first request filled.
    assert_eq!(second.attributes["http.host"], "api.example");
    assert_eq!(
        headers(&second.request_headers),
        [("user-agent", "python-httpx/0.28.1")]
    );
    assert_eq!(second.attributes["http.status_code"], 404);
    assert_eq!(second.status, StatusCode::Error);
    assert_eq!(second.status_description.as_deref(), Some("HTTP 404"));
    assert_eq!(second.request_body, None);
    assert_eq!(second.response_body.as_deref(), Some(&b"not found"[..]));
}

#[test]
fn grpc_calls_get_rpc_attributes_counts_and_status_from_trailers() {
    let ops = run(GRPC);
    assert_eq!(ops.len(), 3);
    let unary = &ops[0];
    assert_eq!(unary.name, "helloworld.Greeter/SayHello");
    assert_eq!(unary.attributes["rpc.system"], "grpc");
    assert_eq!(unary.attributes["rpc.service"], "helloworld.Greeter");
    assert_eq!(unary.attributes["rpc.method"], "SayHello");
    assert_eq!(unary.attributes["rpc.grpc.status_code"], 0);
    assert_eq!(unary.attributes["http.status_code"], 200);
    assert_eq!(unary.attributes["rpc.grpc.request.message_count"], 1);
    assert_eq!(unary.attributes["rpc.grpc.request.message_bytes"], 7);
    assert_eq!(unary.attributes["rpc.grpc.response.message_count"], 1);
    assert_eq!(unary.attributes["rpc.grpc.response.message_bytes"], 13);
    assert_eq!(unary.status, StatusCode::Unset);
    // The messages as sent, length prefixes included.
    assert_eq!(
        unary.request_body.as_deref(),
        Some(&b"\0\0\0\0\x07\n\x05world"[..])
    );
    assert_eq!(
        unary.response_body.as_deref(),
        Some(&b"\0\0\0\0\x0d\n\x0bHello world"[..])
    );
    // Trailers follow the response headers.
    assert_eq!(
        headers(&unary.response_headers),
        [
            ("content-type", "application/grpc"),
            ("grpc-status", "0"),
            ("grpc-message", "")
        ]
    );

    let stream = &ops[1];
    assert_eq!(stream.attributes["rpc.method"], "SayHelloStream");
    assert_eq!(stream.attributes["rpc.grpc.response.message_count"], 3);
    assert_eq!(
        stream.attributes["rpc.grpc.response.message_bytes"],
        3 + 4 + 5
    );
    assert!(!stream
        .attributes
        .contains_key("rpc.grpc.response.messages_incomplete"));
    assert_eq!(
        stream.response_body.as_ref().map(Vec::len),
        Some(5 * 3 + 12)
    );

    let fail = &ops[2];
    assert_eq!(fail.attributes["rpc.method"], "Fail");
    assert_eq!(fail.attributes["rpc.grpc.status_code"], 5);
    assert_eq!(fail.attributes["rpc.grpc.request.message_count"], 1);
    assert_eq!(fail.attributes["rpc.grpc.request.message_bytes"], 0);
    assert_eq!(fail.attributes["rpc.grpc.response.message_count"], 0);
    assert_eq!(fail.status, StatusCode::Error);
    assert_eq!(
        fail.status_description.as_deref(),
        Some("gRPC status 5 (NOT_FOUND): no such greeting")
    );
}

/// Every way of cutting the recording into two pieces per direction gives the same ops
/// (byte-at-a-time feeding, in `scripts::run`, covers one-byte pieces).
#[test]
fn every_split_of_a_piece_gives_the_same_ops() {
    for rec in [REST, GRPC] {
        let script = scripts::recording(rec);
        let (want, _) = run_raw(&script);
        for (i, (_, data, _)) in script.iter().enumerate() {
            for cut in 1..data.len() {
                let mut split = script.clone();
                let (side, bytes, ts) = split.remove(i);
                split.insert(i, (side, bytes[cut..].to_vec(), ts));
                split.insert(i, (side, bytes[..cut].to_vec(), ts));
                let (got, unparsed) = run_raw(&split);
                assert_eq!((&got, unparsed), (&want, 0), "piece {i} cut at {cut}");
            }
        }
    }
}

#[test]
fn bodies_are_kept_up_to_max_body() {
    let cfg = ParserConfig {
        max_body: 4,
        ..Default::default()
    };
    let (ops, unparsed) = scripts::run_with(Protocol::Http2, cfg, &scripts::recording(REST), false);
    assert_eq!(unparsed, 0);
    assert_eq!(ops[0].request_body.as_deref(), Some(&b"{\"q\""[..]));
    assert_eq!(ops[0].attributes["http.request_body_truncated"], true);
    assert_eq!(ops[0].attributes["http.response_body_truncated"], true);
}

/// A capture gap inside a DATA payload is skipped (its length is known): the stream
/// still pairs, its body marked incomplete, and the next stream is whole.
#[test]
fn a_gap_inside_data_is_skipped() {
    let mut p = Http2Parser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (side, data, ts) in scripts::recording(REST) {
        if ts == 6 {
            // The response's second DATA frame: header, 2 bytes, 3 lost.
            p.feed(side, &data[..11], ts, &mut out);
            p.gap(side, 3, ts, &mut out);
        } else {
            p.feed(side, &data, ts, &mut out);
        }
    }
    p.close(1000, &mut out);
    assert_eq!(p.unparsed(), 0);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].response_body.as_deref(), Some(&b"{\"a\":\"h"[..]));
    assert_eq!(out[0].attributes["http.response_body_truncated"], true);
    assert_eq!(out[1].attributes["http.target"], "/missing");
}

/// A gap anywhere else loses the frame boundaries and the HPACK table of that
/// direction for good: counted once, the open stream reported at close, no later
/// stream invented.
/// The REST recording with the HEADERS frame of piece `cut` cut by a gap in its header
/// block: the parser, closed, and its ops.
fn rest_with_a_header_block_gap(cut: u64) -> (Http2Parser, Vec<Op>) {
    let mut p = Http2Parser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (side, data, ts) in scripts::recording(REST) {
        if ts == cut {
            p.feed(side, &data[..12], ts, &mut out);
            p.gap(side, 5, ts, &mut out);
            p.feed(side, &data[17..], ts, &mut out);
        } else {
            p.feed(side, &data, ts, &mut out);
        }
    }
    p.close(1000, &mut out);
    (p, out)
}

#[test]
fn a_gap_in_a_header_block_gives_the_direction_up() {
    // The second request's HEADERS frame.
    let (p, out) = rest_with_a_header_block_gap(8);
    assert_eq!(p.unparsed(), 1);
    // Counted as what it is: bytes the capture did not deliver.
    assert_eq!(p.losses().get(Loss::Gap), 1);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].attributes["http.target"], "/v1/chat?key=secret");
}

/// A gap in a response's header block: the server's direction is given up, counted
/// once; the request it answered is reported (its outcome unknown), not counted again,
/// and so is the later request whose response can no longer be read.
#[test]
fn a_gap_in_a_response_header_block_is_counted_once() {
    // The first response's HEADERS frame.
    let (p, out) = rest_with_a_header_block_gap(5);
    assert_eq!(p.losses().get(Loss::Gap), 1);
    assert_eq!(p.losses().total(), 1, "{:?}", p.losses());
    assert_eq!(out.len(), 2, "{out:?}");
}

#[test]
fn malformed_input_is_counted_never_a_panic() {
    let script = scripts::recording(REST);
    // A header block that does not decode (index 0x7f past both tables).
    let mut bad = script.clone();
    let preface_and_settings = bad[0].1.clone();
    bad.insert(
        1,
        (
            Side::Client,
            vec![0, 0, 2, 1, 5, 0, 0, 0, 0x63, 0xff, 0x7f],
            1,
        ),
    );
    bad[0].1 = preface_and_settings;
    let (ops, unparsed) = run_raw(&bad);
    assert_eq!(unparsed, 1);
    // The client's direction is given up: no request after it is seen.
    assert!(ops.is_empty(), "{ops:?}");

    // No preface.
    let (ops, unparsed) = run_raw(&vec![(Side::Client, b"GET / HTTP/1.1\r\n\r\n".to_vec(), 1)]);
    assert_eq!((ops.len(), unparsed), (0, 1));

    // Every single-byte corruption of both recordings: no panic.
    for rec in [REST, GRPC] {
        let script = scripts::recording(rec);
        for i in 0..script.len() {
            for j in 0..script[i].1.len() {
                let mut s = script.clone();
                s[i].1[j] ^= 0xa5;
                run_raw(&s);
            }
        }
    }
}

#[test]
fn a_stream_reset_ends_its_op() {
    let mut script = scripts::recording(REST);
    // After the first request, the client cancels it (RST_STREAM, CANCEL) instead of
    // waiting for the response.
    script.truncate(4);
    script.push((Side::Client, vec![0, 0, 4, 3, 0, 0, 0, 0, 1, 0, 0, 0, 8], 9));
    let (ops, unparsed) = run_raw(&script);
    assert_eq!(unparsed, 0);
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].status, StatusCode::Error);
    assert_eq!(
        ops[0].status_description.as_deref(),
        Some("HTTP/2 stream reset by the client: CANCEL")
    );
    assert_eq!(ops[0].end_ts, 9);
}

#[test]
fn a_request_without_response_is_reported_at_close() {
    let mut script = scripts::recording(GRPC);
    script.truncate(4);
    let (ops, unparsed) = run_raw(&script);
    assert_eq!(unparsed, 0);
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].attributes["rpc.method"], "SayHello");
    assert!(!ops[0].attributes.contains_key("http.status_code"));
    assert!(!ops[0].attributes.contains_key("rpc.grpc.status_code"));
}

#[test]
fn an_h2c_upgrade_hands_the_connection_to_http2_with_the_request_as_stream_1() {
    // Fed to the HTTP/1.1 parser, as detection sees a request line first.
    let script = scripts::recording(H2C);
    let ops = scripts::run(Protocol::Http, &script);
    assert_eq!(ops.len(), 2, "{ops:#?}");
    let first = &ops[0];
    assert_eq!(first.name, "GET");
    assert_eq!(first.attributes["http.method"], "GET");
    assert_eq!(first.attributes["http.target"], "/first?x=1");
    assert_eq!(first.attributes["http.host"], "h2c.example:8080");
    assert_eq!(first.attributes["http.flavor"], "2.0");
    assert_eq!(first.attributes["http.status_code"], 200);
    // The headers the client sent with its HTTP/1.1 request, the answer's from HTTP/2.
    let sent = headers(&first.request_headers);
    assert_eq!(sent.len(), 7);
    assert_eq!(sent[0], ("Host", "h2c.example:8080"));
    assert_eq!(sent[4], ("Upgrade", "h2c"));
    assert_eq!(sent[6], ("Authorization", "Bearer up-secret"));
    assert_eq!(
        headers(&first.response_headers),
        [("content-type", "text/plain")]
    );
    assert_eq!(first.response_body.as_deref(), Some(&b"first answer"[..]));
    assert_eq!((first.start_ts, first.end_ts), (1, 2));

    let second = &ops[1];
    assert_eq!(second.attributes["http.method"], "POST");
    assert_eq!(second.attributes["http.target"], "/second");
    assert_eq!(second.attributes["http.status_code"], 201);
    assert_eq!(second.request_body.as_deref(), Some(&b"second body"[..]));
    assert_eq!(second.response_body.as_deref(), Some(&b"second answer"[..]));

    // Every split of every piece (the 101 and the first frames apart, the preface cut)
    // gives the same spans.
    for i in 0..script.len() {
        for at in 1..script[i].1.len() {
            let mut split = script.clone();
            let (side, data, ts) = split.remove(i);
            split.insert(i, (side, data[at..].to_vec(), ts));
            split.insert(i, (side, data[..at].to_vec(), ts));
            assert_eq!(
                scripts::run(Protocol::Http, &split),
                ops,
                "piece {i} split at {at}"
            );
        }
    }
}

#[test]
fn an_upgrade_to_something_else_than_h2c_stays_opaque() {
    let mut script = scripts::recording(H2C);
    let (_, switching, _) = &mut script[1];
    let at = switching.windows(3).position(|w| w == b"h2c").unwrap();
    switching[at..at + 3].copy_from_slice(b"xyz");
    let (ops, unparsed) =
        scripts::run_with(Protocol::Http, ParserConfig::default(), &script, false);
    // The 101 itself is the one span; what follows is not read as HTTP at all.
    assert_eq!(ops.len(), 1, "{ops:#?}");
    assert_eq!(ops[0].attributes["http.status_code"], 101);
    assert_eq!(unparsed, 0);
}

/// curl 7.88 (`--http2` against hypercorn, `Upgrade: h2c`), captured by `trace --raw`
/// from a run where the server's END_STREAM for stream 1 (an empty DATA frame sent after
/// the body) reached curl in a later read than the body: curl, having every byte the
/// content-length announced, ends the transfer and resets stream 1 with STREAM_CLOSED
/// (on the wire, in the same write as stream 3's HEADERS), then POSTs on stream 3.
const H2C_CURL_RESET: &str = include_str!("h2c_curl_reset.rec");

#[test]
fn a_client_reset_after_the_whole_announced_body_leaves_the_response_whole() {
    let script = scripts::recording(H2C_CURL_RESET);
    let ops = scripts::run(Protocol::Http, &script);
    assert_eq!(ops.len(), 2, "{ops:#?}");
    let first = &ops[0];
    assert_eq!(first.attributes["http.target"], "/echo/upgraded?x=1");
    assert_eq!(first.attributes["http.status_code"], 200);
    assert_eq!(first.status, StatusCode::Unset, "{first:#?}");
    assert_eq!(first.status_description, None);
    assert!(!first
        .attributes
        .contains_key("http.response_body_truncated"));
    let body = first.response_body.as_deref().unwrap();
    assert_eq!(body.len(), 76);
    assert!(body.starts_with(br#"{"method": "GET""#));
    // It ends with its last body byte, as curl saw it, not with the reset.
    assert_eq!(first.end_ts, 6);
    let second = &ops[1];
    assert_eq!(second.attributes["http.target"], "/echo/second");
    assert_eq!(second.attributes["http.status_code"], 200);
    assert_eq!(second.request_body.as_deref(), Some(&b"second body"[..]));
    assert!(second
        .response_body
        .as_deref()
        .unwrap()
        .ends_with(br#""body": "second body"}"#));

    // However the reads and writes fell: every split of a piece, and the server's late
    // pieces coming in one read.
    for i in 0..script.len() {
        for at in 1..script[i].1.len() {
            let mut split = script.clone();
            let (side, data, ts) = split.remove(i);
            split.insert(i, (side, data[at..].to_vec(), ts));
            split.insert(i, (side, data[..at].to_vec(), ts));
            assert_eq!(
                scripts::run(Protocol::Http, &split),
                ops,
                "piece {i} split at {at}"
            );
        }
    }
    let mut merged = script.clone();
    let tail: Vec<u8> = merged.drain(8..).flat_map(|(_, d, _)| d).collect();
    merged.push((Side::Server, tail, 9));
    let got = scripts::run(Protocol::Http, &merged);
    assert_eq!(got[0], ops[0]);
    assert_eq!(got[1].attributes, ops[1].attributes);
    assert_eq!(got[1].response_body, ops[1].response_body);
}

#[test]
fn a_client_reset_before_the_whole_body_is_an_error_with_the_body_cut() {
    // The same run without the read that brought stream 1's body.
    let mut script = scripts::recording(H2C_CURL_RESET);
    let (_, body, _) = script.remove(5);
    assert_eq!(body.len(), 85, "the piece with stream 1's DATA");
    let (ops, _) = scripts::run_with(Protocol::Http, ParserConfig::default(), &script, false);
    let first = &ops[0];
    assert_eq!(first.attributes["http.status_code"], 200);
    assert_eq!(first.status, StatusCode::Error);
    assert_eq!(
        first.status_description.as_deref(),
        Some("HTTP/2 stream reset by the client: STREAM_CLOSED")
    );
    assert_eq!(first.attributes["http.response_body_truncated"], true);
    assert_eq!(ops[1].attributes["http.status_code"], 200);
}
