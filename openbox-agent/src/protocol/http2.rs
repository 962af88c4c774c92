//! HTTP/2 (RFC 9113) parser: the client's connection preface, then frames both ways;
//! each stream's request (HEADERS + CONTINUATION, DATA) is paired with its response by
//! stream id, and the op is made when both ends have sent END_STREAM (or the stream was
//! reset). Header blocks are HPACK-decoded (RFC 7541) with one decoder per direction,
//! whose dynamic table lives as long as the connection. gRPC calls (see `grpc`) get
//! their `rpc.*` attributes on top of the HTTP ones.
//!
//! What cannot be recovered: HPACK has no resynchronisation point. A header block that
//! does not decode, or bytes lost anywhere but inside a DATA payload (whose length the
//! frame header gave), leave the dynamic table unknown and the frame boundaries too, so
//! that direction is given up: counted once (as a gap, or as malformed), and the streams it leaves
//! open are reported at close with what was seen. For the same reason a connection
//! seen from its middle (no preface) is not recognised as HTTP/2 at all.

use std::collections::BTreeMap;

use loona_hpack::Decoder;

use super::grpc::{self, Messages};
use super::http::header;
use super::{Loss, Losses, Op, Parser, ParserConfig, Protocol, Side, StatusCode};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Most streams open at once before the oldest is given up (a peer's
/// SETTINGS_MAX_CONCURRENT_STREAMS is usually 100–1000).
const MAX_STREAMS: usize = 1024;

/// Whether a client's first bytes are the HTTP/2 connection preface (prior knowledge
/// over cleartext, or ALPN `h2` under TLS: the plaintext starts the same way).
pub fn looks_like_preface(first: &[u8]) -> bool {
    first.starts_with(PREFACE)
}

#[derive(Debug, Clone, Copy)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

/// A header block being gathered across HEADERS/PUSH_PROMISE and CONTINUATION frames.
#[derive(Debug)]
struct Block {
    stream: u32,
    end_stream: bool,
    /// PUSH_PROMISE: the stream the server promises (its request headers are this block).
    promised: Option<u32>,
    bytes: Vec<u8>,
}

/// One direction's frame reader and HPACK decoder.
struct Dir {
    /// Preface bytes still expected (the client's direction only).
    preface_left: usize,
    head: [u8; 9],
    head_len: usize,
    frame: Option<FrameHead>,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// Payload of a non-DATA frame, gathered whole.
    payload: Vec<u8>,
    /// DATA: the pad length has been read (or the frame is not padded).
    pad_known: bool,
    /// DATA: data bytes (before the padding) still to come.
    data_left: usize,
    /// Timestamp of the piece that held the current frame's first byte.
    frame_ts: u64,
    block: Option<Block>,
    hpack: Decoder<'static>,
    /// Frame boundaries or the HPACK table are lost: nothing more is read.
    dead: bool,
}

impl Dir {
    fn new(preface_left: usize) -> Self {
        Self {
            preface_left,
            head: [0; 9],
            head_len: 0,
            frame: None,
            left: 0,
            payload: Vec::new(),
            pad_known: false,
            data_left: 0,
            frame_ts: 0,
            block: None,
            hpack: Decoder::new(),
            dead: false,
        }
    }
}

/// One side's half of a stream.
#[derive(Debug, Default)]
struct Half {
    headers: Option<Vec<(String, String)>>,
    /// Pseudo-header fields (`:method`, `:path`, `:status` …), without the colon.
    pseudo: Vec<(String, String)>,
    trailers: Vec<(String, String)>,
    body: Vec<u8>,
    /// False once body bytes were cut (over `max_body`) or lost.
    body_complete: bool,
    /// DATA bytes received (kept, cut or lost).
    body_len: u64,
    messages: Messages,
    ended: bool,
}

impl Half {
    fn pseudo(&self, name: &str) -> Option<&str> {
        header(&self.pseudo, name)
    }

    /// Every body byte its `content-length` announced has come: the message is whole
    /// even if its END_STREAM never arrives.
    fn has_announced_body(&self) -> bool {
        self.headers
            .as_deref()
            .and_then(|h| header(h, "content-length"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n == self.body_len)
    }
}

#[derive(Debug, Default)]
struct Stream {
    start_ts: u64,
    end_ts: u64,
    req: Half,
    resp: Half,
    grpc: bool,
    /// RST_STREAM: who sent it and its error code.
    reset: Option<(Side, u32)>,
}

pub struct Http2Parser {
    cfg: ParserConfig,
    client: Dir,
    server: Dir,
    streams: BTreeMap<u32, Stream>,
    losses: Losses,
}

/// The HTTP/1.1 request of an `Upgrade: h2c` exchange (RFC 7540 §3.2), which the server
/// answers on stream 1 once it has switched.
pub(super) struct Upgraded {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub body_complete: bool,
    pub start_ts: u64,
}

impl Http2Parser {
    pub fn new(cfg: ParserConfig) -> Self {
        Self {
            cfg,
            client: Dir::new(PREFACE.len()),
            server: Dir::new(0),
            streams: BTreeMap::new(),
            losses: Losses::default(),
        }
    }

    /// A connection switched from HTTP/1.1 by `101 Switching Protocols` to an
    /// `Upgrade: h2c` request: that request is stream 1, sent whole (half-closed by the
    /// client); the server's frames follow its 101 at once, and the client sends its
    /// connection preface on receiving the 101.
    pub(super) fn upgraded(cfg: ParserConfig, req: Upgraded) -> Self {
        let mut p = Self::new(cfg);
        let mut s = p.new_stream(req.start_ts);
        s.req.pseudo = vec![("method".into(), req.method), ("path".into(), req.target)];
        s.req.headers = Some(req.headers);
        s.req.body = req.body;
        s.req.body_complete = req.body_complete;
        s.req.ended = true;
        p.streams.insert(1, s);
        p
    }

    fn dir(&mut self, side: Side) -> &mut Dir {
        match side {
            Side::Client => &mut self.client,
            Side::Server => &mut self.server,
        }
    }

    /// Gives up a direction (see the module doc): counted once, under `why`.
    fn lose(&mut self, side: Side, why: Loss) {
        let d = self.dir(side);
        if !d.dead {
            d.dead = true;
            d.payload = Vec::new();
            d.block = None;
            self.losses.add(why);
        }
    }

    fn read(&mut self, side: Side, mut data: &[u8], ts: u64, out: &mut Vec<Op>) {
        let max_buffer = self.cfg.max_buffer;
        while !data.is_empty() {
            let d = self.dir(side);
            if d.dead {
                return;
            }
            if d.preface_left > 0 {
                let at = PREFACE.len() - d.preface_left;
                let take = d.preface_left.min(data.len());
                if data.get(..take) != PREFACE.get(at..at + take) {
                    self.lose(side, Loss::Malformed);
                    return;
                }
                d.preface_left -= take;
                data = data.get(take..).unwrap_or_default();
                continue;
            }
            let Some(f) = d.frame else {
                if d.head_len == 0 {
                    d.frame_ts = ts;
                }
                let take = (9 - d.head_len).min(data.len());
                if let (Some(dst), Some(src)) = (
                    d.head.get_mut(d.head_len..d.head_len + take),
                    data.get(..take),
                ) {
                    dst.copy_from_slice(src);
                }
                d.head_len += take;
                data = data.get(take..).unwrap_or_default();
                if d.head_len < 9 {
                    return;
                }
                d.head_len = 0;
                let h = d.head;
                let f = FrameHead {
                    len: usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]),
                    kind: h[3],
                    flags: h[4],
                    stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
                };
                if f.kind != DATA && f.len > max_buffer {
                    // A header block this large cannot be kept, and without it the
                    // HPACK table is lost; other control frames are never this large.
                    self.lose(side, Loss::Oversize);
                    return;
                }
                let d = self.dir(side);
                d.frame = Some(f);
                d.left = f.len;
                d.payload.clear();
                d.pad_known = f.flags & PADDED == 0;
                d.data_left = if d.pad_known { f.len } else { 0 };
                if f.len == 0 {
                    self.end_frame(side, ts, out);
                }
                continue;
            };
            if f.kind == DATA {
                if !d.pad_known {
                    let pad = usize::from(data[0]);
                    data = &data[1..];
                    d.left -= 1;
                    d.pad_known = true;
                    if pad > d.left {
                        self.lose(side, Loss::Malformed);
                        return;
                    }
                    d.data_left = d.left - pad;
                } else if d.data_left > 0 {
                    let take = d.data_left.min(data.len());
                    let (chunk, rest) = data.split_at(take);
                    d.data_left -= take;
                    d.left -= take;
                    data = rest;
                    self.body(side, f.stream, Some(chunk), take as u64);
                } else {
                    let take = d.left.min(data.len());
                    d.left -= take;
                    data = &data[take..];
                }
            } else {
                let take = d.left.min(data.len());
                d.payload.extend_from_slice(&data[..take]);
                d.left -= take;
                data = &data[take..];
            }
            if self.dir(side).left == 0 {
                self.end_frame(side, ts, out);
            }
        }
    }

    /// DATA bytes of a stream, or `n` of them lost (`chunk` None).
    fn body(&mut self, side: Side, stream: u32, chunk: Option<&[u8]>, n: u64) {
        let max_body = self.cfg.max_body;
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        let grpc = s.grpc;
        let half = match side {
            Side::Client => &mut s.req,
            Side::Server => &mut s.resp,
        };
        half.body_len += n;
        match chunk {
            Some(data) => {
                if half.body_complete {
                    let room = max_body.saturating_sub(half.body.len());
                    if data.len() > room {
                        half.body_complete = false;
                    }
                    half.body.extend_from_slice(&data[..data.len().min(room)]);
                }
                if grpc {
                    half.messages.feed(data);
                }
            }
            None => {
                half.body_complete = false;
                if grpc {
                    half.messages.gap(n);
                }
            }
        }
    }

    fn end_frame(&mut self, side: Side, ts: u64, out: &mut Vec<Op>) {
        let d = self.dir(side);
        let Some(f) = d.frame.take() else {
            return;
        };
        let payload = std::mem::take(&mut d.payload);
        let frame_ts = d.frame_ts;
        // A header block in progress admits only its CONTINUATION frames (§6.10).
        if d.block.as_ref().is_some_and(|b| b.stream != f.stream)
            || d.block.is_some() && f.kind != CONTINUATION
        {
            self.lose(side, Loss::Malformed);
            return;
        }
        match f.kind {
            DATA => {
                if f.flags & END_STREAM != 0 {
                    self.end_stream(side, f.stream, ts, out);
                } else if side == Side::Server {
                    self.touch(f.stream, ts);
                }
            }
            HEADERS | PUSH_PROMISE => {
                let mut b: &[u8] = &payload;
                if f.flags & PADDED != 0 {
                    let Some((&pad, rest)) = b.split_first() else {
                        self.lose(side, Loss::Malformed);
                        return;
                    };
                    let Some(cut) = rest.len().checked_sub(usize::from(pad)) else {
                        self.lose(side, Loss::Malformed);
                        return;
                    };
                    b = &rest[..cut];
                }
                let mut promised = None;
                if f.kind == HEADERS && f.flags & PRIORITY != 0 {
                    let Some(rest) = b.get(5..) else {
                        self.lose(side, Loss::Malformed);
                        return;
                    };
                    b = rest;
                } else if f.kind == PUSH_PROMISE {
                    let (Some(id), Some(rest)) = (super::bytes::be_u32(b, 0), b.get(4..)) else {
                        self.lose(side, Loss::Malformed);
                        return;
                    };
                    promised = Some(id & 0x7fff_ffff);
                    b = rest;
                }
                let block = Block {
                    stream: f.stream,
                    end_stream: f.kind == HEADERS && f.flags & END_STREAM != 0,
                    promised,
                    bytes: b.to_vec(),
                };
                if f.flags & END_HEADERS != 0 {
                    self.header_block(side, block, frame_ts, ts, out);
                } else {
                    self.dir(side).block = Some(block);
                }
            }
            CONTINUATION => {
                let d = self.dir(side);
                let Some(mut block) = d.block.take() else {
                    self.lose(side, Loss::Malformed);
                    return;
                };
                if block.bytes.len() + payload.len() > self.cfg.max_buffer {
                    self.lose(side, Loss::Oversize);
                    return;
                }
                block.bytes.extend_from_slice(&payload);
                if f.flags & END_HEADERS != 0 {
                    self.header_block(side, block, frame_ts, ts, out);
                } else {
                    self.dir(side).block = Some(block);
                }
            }
            RST_STREAM => {
                let code = super::bytes::be_u32(&payload, 0).unwrap_or(0);
                if let Some(mut s) = self.streams.remove(&f.stream) {
                    // A client that has every byte the response's content-length
                    // announced may close the stream before the server's END_STREAM
                    // arrives (curl resets it with STREAM_CLOSED when the transfer is
                    // done): the response is whole, as the client saw it.
                    let whole = side == Side::Client && s.resp.has_announced_body();
                    if whole {
                        s.resp.ended = true;
                    } else {
                        s.reset = Some((side, code));
                        s.end_ts = ts;
                    }
                    out.push(self.op(s));
                }
            }
            // SETTINGS, PING, GOAWAY, WINDOW_UPDATE, PRIORITY and extension frames carry
            // nothing a span shows. Table size changes arrive inside header blocks, so
            // SETTINGS_HEADER_TABLE_SIZE need not be followed.
            _ => {}
        }
    }

    fn header_block(
        &mut self,
        side: Side,
        block: Block,
        start_ts: u64,
        ts: u64,
        out: &mut Vec<Op>,
    ) {
        let mut fields = Vec::new();
        // Decoded even for a stream we do not follow: every block updates the table.
        let decoded = self.dir(side).hpack.decode_with_cb(&block.bytes, |n, v| {
            fields.push((
                String::from_utf8_lossy(&n).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            ));
        });
        if decoded.is_err() {
            self.lose(side, Loss::Malformed);
            return;
        }
        let (pseudo, regular): (Vec<_>, Vec<_>) =
            fields.into_iter().partition(|(n, _)| n.starts_with(':'));
        let pseudo: Vec<(String, String)> = pseudo
            .into_iter()
            .map(|(n, v)| (n[1..].to_string(), v))
            .collect();
        match (side, block.promised) {
            (Side::Server, Some(promised)) => {
                // A pushed response: the server states the request it answers.
                let mut s = self.new_stream(start_ts);
                s.req.headers = Some(regular);
                s.req.pseudo = pseudo;
                s.req.ended = true;
                self.insert(promised, s);
            }
            (Side::Client, _) => {
                if let Some(s) = self.streams.get_mut(&block.stream) {
                    if s.req.headers.is_some() {
                        s.req.trailers.extend(regular);
                    }
                } else {
                    let mut s = self.new_stream(start_ts);
                    s.grpc = grpc::is_grpc(&regular);
                    s.req.headers = Some(regular);
                    s.req.pseudo = pseudo;
                    self.insert(block.stream, s);
                }
                if block.end_stream {
                    self.end_stream(side, block.stream, ts, out);
                }
            }
            (Side::Server, None) => {
                let Some(s) = self.streams.get_mut(&block.stream) else {
                    // A response on a stream whose request we did not see; once the
                    // client's direction is given up that is expected, and counted.
                    if !self.client.dead {
                        self.losses.add(Loss::Unpaired);
                    }
                    return;
                };
                let interim =
                    header(&pseudo, "status").is_some_and(|c| c.starts_with('1') && c.len() == 3);
                if s.resp.headers.is_some() {
                    s.resp.trailers.extend(regular);
                } else if !interim {
                    s.resp.headers = Some(regular);
                    s.resp.pseudo = pseudo;
                }
                s.end_ts = ts;
                if block.end_stream {
                    self.end_stream(side, block.stream, ts, out);
                }
            }
        }
    }

    fn new_stream(&self, start_ts: u64) -> Stream {
        let mut s = Stream {
            start_ts,
            end_ts: start_ts,
            ..Default::default()
        };
        s.req.body_complete = true;
        s.resp.body_complete = true;
        s
    }

    fn insert(&mut self, id: u32, s: Stream) {
        if self.streams.len() >= MAX_STREAMS {
            // Streams left open forever (a peer that never answers): drop the oldest.
            self.streams.pop_first();
            self.losses.add(Loss::Oversize);
        }
        self.streams.insert(id, s);
    }

    fn touch(&mut self, id: u32, ts: u64) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.end_ts = ts;
        }
    }

    fn end_stream(&mut self, side: Side, id: u32, ts: u64, out: &mut Vec<Op>) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        match side {
            Side::Client => s.req.ended = true,
            Side::Server => {
                s.resp.ended = true;
                s.end_ts = ts;
            }
        }
        if s.req.ended && s.resp.ended {
            if let Some(s) = self.streams.remove(&id) {
                out.push(self.op(s));
            }
        }
    }

    fn op(&self, mut s: Stream) -> Op {
        let method = s.req.pseudo("method").unwrap_or("").to_string();
        let path = s.req.pseudo("path").unwrap_or("").to_string();
        let authority = s.req.pseudo("authority").map(str::to_string);
        let status: Option<u16> = s.resp.pseudo("status").and_then(|c| c.parse().ok());
        let req_headers = s.req.headers.take().unwrap_or_default();
        let mut op = Op {
            name: method.clone(),
            start_ts: s.start_ts,
            end_ts: s.end_ts.max(s.start_ts),
            ..Default::default()
        };
        op.attr("http.method", method);
        op.attr("http.target", path.clone());
        op.attr("http.flavor", "2.0");
        if let Some(host) = authority.or_else(|| header(&req_headers, "host").map(str::to_string)) {
            op.attr("http.host", host);
        }
        if !s.req.body_complete {
            op.attr("http.request_body_truncated", true);
        }
        op.request_headers = Some(req_headers);
        op.request_body = Some(s.req.body).filter(|b| !b.is_empty());
        let mut response = Vec::new();
        if let Some(headers) = s.resp.headers {
            if let Some(code) = status {
                op.attr("http.status_code", code);
                if code >= 400 {
                    op.status = StatusCode::Error;
                    op.status_description = Some(format!("HTTP {code}"));
                }
            }
            if !s.resp.body_complete || !s.resp.ended {
                op.attr("http.response_body_truncated", true);
            }
            response = headers;
            response.extend(s.resp.trailers);
            op.response_body = Some(s.resp.body).filter(|b| !b.is_empty());
            op.response_headers = Some(response.clone());
        }
        if s.grpc {
            grpc::annotate(&mut op, &path, &response, &s.req.messages, &s.resp.messages);
        }
        if let Some((by, code)) = s.reset {
            if code != 0 || !s.resp.ended {
                op.status = StatusCode::Error;
                let by = match by {
                    Side::Client => "client",
                    Side::Server => "server",
                };
                op.status_description = Some(format!(
                    "HTTP/2 stream reset by the {by}: {}",
                    error_name(code)
                ));
            }
        }
        op
    }
}

/// HTTP/2 error codes (RFC 9113 §7).
fn error_name(code: u32) -> String {
    let name = match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x5 => "STREAM_CLOSED",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0xb => "ENHANCE_YOUR_CALM",
        _ => return format!("error code {code:#x}"),
    };
    name.to_string()
}

impl Parser for Http2Parser {
    fn protocol(&self) -> Protocol {
        Protocol::Http2
    }

    fn feed(&mut self, side: Side, data: &[u8], ts: u64, out: &mut Vec<Op>) {
        self.read(side, data, ts, out);
    }

    fn gap(&mut self, side: Side, n: u64, ts: u64, out: &mut Vec<Op>) {
        let d = self.dir(side);
        if d.dead {
            return;
        }
        // Only DATA payload bytes can be skipped: the frame header gave their number,
        // and the HPACK table does not depend on them.
        let Some(f) = d.frame.filter(|f| f.kind == DATA && d.pad_known) else {
            self.lose(side, Loss::Gap);
            return;
        };
        let Ok(n) = usize::try_from(n) else {
            self.lose(side, Loss::Gap);
            return;
        };
        if n > d.left {
            self.lose(side, Loss::Gap);
            return;
        }
        let lost_data = n.min(d.data_left);
        d.data_left -= lost_data;
        d.left -= n;
        let done = d.left == 0;
        if lost_data > 0 {
            self.body(side, f.stream, None, lost_data as u64);
        }
        if done {
            self.end_frame(side, ts, out);
        }
    }

    fn close(&mut self, ts: u64, out: &mut Vec<Op>) {
        for (_, mut s) in std::mem::take(&mut self.streams) {
            if s.req.headers.is_some() {
                if !s.resp.ended {
                    s.end_ts = ts;
                }
                out.push(self.op(s));
            }
        }
    }

    fn unparsed(&self) -> u64 {
        self.losses.total()
    }

    fn losses(&self) -> Losses {
        self.losses
    }
}

#[cfg(test)]
mod tests;
