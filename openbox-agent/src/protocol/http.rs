//! HTTP/1.1 (RFC 9112) parser: requests paired with responses on keep-alive and
//! pipelined connections; Content-Length, chunked and close-delimited bodies; interim
//! 1xx responses; HEAD, 204 and 304 without bodies. An `Upgrade: h2c` answered by
//! `101 Switching Protocols` hands the connection to the HTTP/2 parser, the upgrading
//! request becoming its stream 1 (RFC 7540 §3.2); other upgrades (WebSocket …) and
//! CONNECT tunnels turn the connection into an opaque stream.
//!
//! Resynchronisation. A side that meets bytes it cannot frame (watching began in the
//! middle of a message, a capture gap outside a body of known length, a malformed head)
//! drops them and waits for a captured piece that starts a message: a request line on
//! the client side, a status line on the server side. Pairing by order is then no
//! longer trusted (requests may have gone unseen, responses may have been lost), so the
//! parser is *unsure* until it re-pairs: a response pairs with the one waiting request
//! sent before the response began, when there is exactly one. None: it answers a
//! request we never saw, and is framed (Content-Length, chunked) and dropped. Several:
//! which one it answers cannot be known (pipelining across a loss), and all of them are
//! dropped. This relies on time order only where order is ambiguous: a client that does
//! not pipeline sends its next request after reading the previous response, so a
//! response that began before a request cannot be that request's. Every drop is counted
//! by reason ([`Loss`]).

use std::collections::VecDeque;

use super::{
    genai,
    http2::{Http2Parser, Upgraded},
    Loss, Losses, Op, Parser, ParserConfig, Protocol, Side, StatusCode,
};

pub mod coding;
pub mod events;

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];
/// Most bytes of a start line plus header section.
const MAX_HEAD: usize = 64 * 1024;
/// Most requests waiting for their responses.
const MAX_PENDING: usize = 1024;

/// Whether these first bytes can start an HTTP/1.x request.
pub fn looks_like_request(first: &[u8]) -> bool {
    METHODS.iter().any(|m| first.starts_with(m))
}

/// Whether these bytes can start a status line.
fn looks_like_response(first: &[u8]) -> bool {
    first.starts_with(b"HTTP/1.")
}

/// Whether a head in progress can still become a message of `side`: checked on its
/// first bytes, so that bytes from the middle of a message are dropped at once instead
/// of being buffered up to the next blank line (which would swallow the next head).
fn plausible_start(side: Side, buf: &[u8]) -> bool {
    match side {
        Side::Server => {
            let n = buf.len().min(7);
            buf[..n] == b"HTTP/1."[..n]
        }
        Side::Client => match buf.iter().position(|b| !b.is_ascii_uppercase()) {
            Some(k) => k > 0 && buf[k] == b' ',
            // The longest method token registered is 17 characters.
            None => buf.len() <= 20,
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body.
    None,
    /// This many bytes remain.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// This many data bytes remain in the chunk.
    Data(u64),
    /// The CRLF after chunk data.
    DataEnd,
    /// Trailer lines until an empty one.
    Trailer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body,
    /// Out of sync: bytes are dropped until a captured piece starts a message.
    Lost,
    /// An upgraded (WebSocket …) or tunnelled (CONNECT) stream: not HTTP any more.
    Opaque,
}

/// One direction's message in progress.
#[derive(Debug)]
struct Stream {
    state: State,
    buf: Vec<u8>,
    framing: Framing,
    chunk: Chunk,
    body: Vec<u8>,
    body_complete: bool,
    /// Body bytes the message carried (kept or not), for a coded body's size.
    body_len: u64,
    first_ts: u64,
}

impl Stream {
    fn new() -> Self {
        Self {
            state: State::Head,
            buf: Vec::new(),
            framing: Framing::None,
            chunk: Chunk::Size,
            body: Vec::new(),
            body_complete: true,
            body_len: 0,
            first_ts: 0,
        }
    }

    /// Moves the first `n` buffered bytes into the body (see [`keep`]); a streamed LLM
    /// answer reads every byte, kept or not.
    fn take_body(&mut self, n: usize, max: usize, llm: Option<&mut genai::Stream>) {
        let data = &self.buf[..n];
        self.body_len += n as u64;
        if let Some(llm) = llm {
            llm.feed(data);
        }
        keep(&mut self.body, data, max, &mut self.body_complete);
        self.buf.drain(..n);
    }
}

#[derive(Debug, Clone)]
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    body_complete: bool,
    /// How a content-coded body was decoded (the body above is the decoded one).
    body_coding: Option<coding::BodyCoding>,
    start_ts: u64,
    /// Still receiving its body when the response began (e.g. after 100 Continue).
    complete: bool,
}

#[derive(Debug, Clone)]
struct Response {
    code: u16,
    reason: String,
    headers: Vec<(String, String)>,
    /// A streamed LLM answer, reassembled as it arrives.
    llm: Option<genai::Stream>,
}

pub struct HttpParser {
    cfg: ParserConfig,
    req: Stream,
    resp: Stream,
    /// Requests sent and not yet answered, oldest first.
    pending: VecDeque<Request>,
    /// The request whose response is being read, and the response head; `None` while
    /// a response whose request was not seen is being skipped.
    answering: Option<(Request, Response)>,
    /// Sync was lost on a side since the last response paired by time: order alone no
    /// longer says which request a response answers.
    unsure: bool,
    /// The client side starts a message for the first time, or again after a loss: only
    /// a request line with a registered method ends it (a cut line such as `ET / …`
    /// must not pass for a request).
    req_fresh: bool,
    /// An exchange was counted lost since the last paired response (the client side
    /// lost bytes, or the server side lost the start of the oldest request's answer):
    /// the first response that then finds no request answers what was lost, and is not
    /// counted again (each lost exchange is counted once).
    request_loss_counted: bool,
    losses: Losses,
    /// The connection switched to HTTP/2 (`Upgrade: h2c`): every byte goes there.
    h2: Option<Box<Http2Parser>>,
    /// No request seen yet, and one side's first bytes were the middle of a message
    /// (counted): when the other side's first bytes are too, they are the same exchange,
    /// the one in flight when watching began (HTTP/1.1 has one at a time), not counted
    /// again.
    start_loss: Option<Side>,
    /// A request head was parsed on this connection.
    seen_request: bool,
}

impl HttpParser {
    pub fn new(cfg: ParserConfig) -> Self {
        Self {
            cfg,
            req: Stream::new(),
            resp: Stream::new(),
            pending: VecDeque::new(),
            answering: None,
            unsure: false,
            req_fresh: true,
            request_loss_counted: false,
            losses: Losses::default(),
            h2: None,
            start_loss: None,
            seen_request: false,
        }
    }

    /// `side` is out of sync at `ts`: what it holds is dropped, counted under `why`,
    /// and the side waits for the start of its next message.
    fn lose(&mut self, side: Side, why: Loss, ts: u64) {
        match self.start_loss {
            Some(first) if first != side => self.start_loss = None,
            _ => {
                self.losses.add(why);
                if why == Loss::Malformed && !self.seen_request {
                    self.start_loss = Some(side);
                }
            }
        }
        self.unsure = true;
        let s = match side {
            Side::Client => {
                self.req_fresh = true;
                self.request_loss_counted = true;
                &mut self.req
            }
            Side::Server => {
                if self.resp.state == State::Head
                    && self.answering.is_none()
                    && self.pending.front().is_some_and(|r| r.start_ts <= ts)
                {
                    // The lost bytes began the oldest request's response: whatever
                    // status line comes next is not its. The exchange is lost, counted
                    // once, under `why`: the rest of its answer (a final response after
                    // a lost interim one) is not counted again.
                    self.pending.pop_front();
                    self.request_loss_counted = true;
                }
                // The response being read is lost with the stream.
                self.answering = None;
                &mut self.resp
            }
        };
        s.state = State::Lost;
        s.buf = Vec::new();
        s.body = Vec::new();
        s.body_complete = true;
        s.framing = Framing::None;
        s.chunk = Chunk::Size;
    }

    /// The response being read is complete: its op (unless it was being skipped), and
    /// the server side waits for the next head.
    fn finish_response(&mut self, ts: u64, out: &mut Vec<Op>) {
        self.emit_response(ts, out);
        self.resp.state = State::Head;
        self.resp.framing = Framing::None;
    }

    /// The request a final response that began at `ts` answers. In sync: the oldest
    /// waiting. Unsure: the only request sent before the response began, if there is
    /// exactly one; otherwise none (see the module's note), with the drop counted.
    fn request_for_response(&mut self, ts: u64) -> Option<Request> {
        if !self.unsure {
            let req = self.pending.pop_front();
            match req {
                Some(_) => self.request_loss_counted = false,
                None => self.orphan_response(),
            }
            return req;
        }
        let before = self.pending.iter().take_while(|r| r.start_ts <= ts).count();
        match before {
            0 => {
                self.orphan_response();
                None
            }
            1 => {
                self.unsure = false;
                self.request_loss_counted = false;
                self.pending.pop_front()
            }
            n => {
                for _ in 0..n {
                    self.pending.pop_front();
                    self.losses.add(Loss::Unpaired);
                }
                None
            }
        }
    }

    /// A response whose request was not seen: counted, unless it answers a request the
    /// client side lost, which was counted then.
    fn orphan_response(&mut self) {
        if !std::mem::take(&mut self.request_loss_counted) {
            self.losses.add(Loss::Unpaired);
        }
    }

    /// The response's op, leaving the framing to finish: an event stream that reached
    /// its end event is whole before its chunked terminator, which a client that closes
    /// right after `data: [DONE]` never reads.
    fn emit_response(&mut self, ts: u64, out: &mut Vec<Op>) {
        let body = std::mem::take(&mut self.resp.body);
        let body_complete = std::mem::replace(&mut self.resp.body_complete, true);
        let body_len = std::mem::take(&mut self.resp.body_len);
        let Some((req, resp)) = self.answering.take() else {
            return;
        };
        out.push(self.op(req, Some((resp, body, body_complete, body_len)), ts));
    }

    fn op(&self, req: Request, resp: Option<(Response, Vec<u8>, bool, u64)>, end_ts: u64) -> Op {
        let mut op = Op {
            name: req.method.clone(),
            start_ts: req.start_ts,
            end_ts,
            ..Default::default()
        };
        op.attr("http.method", req.method.clone());
        op.attr("http.target", req.target.clone());
        if let Some(host) = header(&req.headers, "host") {
            op.attr("http.host", host.to_string());
        }
        if !req.body_complete {
            op.attr("http.request_body_truncated", true);
        }
        if let Some(c) = &req.body_coding {
            c.attributes("http.request.body", &mut op.attributes);
        }
        let call = genai::recognise(
            &req.method,
            &req.target,
            header(&req.headers, "host"),
            &req.body,
        );
        if let Some(call) = &call {
            call.request_attributes(&req.body, &mut op.attributes);
        }
        op.request_headers = Some(req.headers);
        op.request_body = if req.body.is_empty() {
            None
        } else {
            Some(req.body)
        };
        if let Some((resp, body, complete, body_len)) = resp {
            let max = self.cfg.max_body;
            let (body, complete) =
                match coding::decode_body(&resp.headers, body, complete, body_len, max) {
                    (body, complete, Some(c)) => {
                        c.attributes("http.response.body", &mut op.attributes);
                        (body, complete)
                    }
                    (body, complete, None) => (body, complete),
                };
            match (&resp.llm, &call) {
                (Some(stream), _) => stream.attributes(&mut op.attributes),
                (None, Some(call)) => call.response_attributes(
                    header(&resp.headers, "content-type"),
                    &body,
                    max,
                    &mut op.attributes,
                ),
                (None, None) => {}
            }
            op.attr("http.status_code", resp.code);
            if resp.code >= 400 {
                op.status = StatusCode::Error;
                op.status_description = Some(
                    format!("HTTP {} {}", resp.code, resp.reason)
                        .trim_end()
                        .to_string(),
                );
            }
            if !complete {
                op.attr("http.response_body_truncated", true);
            }
            op.response_headers = Some(resp.headers);
            op.response_body = if body.is_empty() { None } else { Some(body) };
        }
        op
    }

    /// Consumes body bytes of `side` from the front of its buffer; returns true when the
    /// body is complete.
    fn body(&mut self, side: Side) -> Result<bool, ()> {
        let max_body = self.cfg.max_body;
        let (s, mut llm) = match side {
            Side::Client => (&mut self.req, None),
            Side::Server => (
                &mut self.resp,
                self.answering.as_mut().and_then(|(_, r)| r.llm.as_mut()),
            ),
        };
        loop {
            match s.framing {
                Framing::None => return Ok(true),
                Framing::Length(0) => return Ok(true),
                Framing::Length(n) => {
                    if s.buf.is_empty() {
                        return Ok(false);
                    }
                    let take = (n as usize).min(s.buf.len());
                    s.take_body(take, max_body, llm.as_deref_mut());
                    s.framing = Framing::Length(n - take as u64);
                }
                Framing::Close => {
                    s.take_body(s.buf.len(), max_body, llm.as_deref_mut());
                    return Ok(false);
                }
                Framing::Chunked => match s.chunk {
                    Chunk::Size | Chunk::Trailer | Chunk::DataEnd => {
                        let Some(end) = find(&s.buf, b"\r\n") else {
                            if s.buf.len() > 4096 {
                                return Err(());
                            }
                            return Ok(false);
                        };
                        let line: Vec<u8> = s.buf.drain(..end + 2).take(end).collect();
                        match s.chunk {
                            Chunk::Size => {
                                // chunk-size [ chunk-ext ] CRLF (RFC 9112 §7.1)
                                let hex = line.split(|&b| b == b';').next().unwrap_or(&[]);
                                let hex = std::str::from_utf8(hex).map_err(|_| ())?.trim();
                                let size = u64::from_str_radix(hex, 16).map_err(|_| ())?;
                                s.chunk = if size == 0 {
                                    Chunk::Trailer
                                } else {
                                    Chunk::Data(size)
                                };
                            }
                            Chunk::DataEnd => {
                                if !line.is_empty() {
                                    return Err(());
                                }
                                s.chunk = Chunk::Size;
                            }
                            _ => {
                                if line.is_empty() {
                                    s.chunk = Chunk::Size;
                                    s.framing = Framing::None;
                                    return Ok(true);
                                }
                            }
                        }
                    }
                    Chunk::Data(n) => {
                        if s.buf.is_empty() {
                            return Ok(false);
                        }
                        let take = (n as usize).min(s.buf.len());
                        s.take_body(take, max_body, llm.as_deref_mut());
                        s.chunk = if n - take as u64 == 0 {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(n - take as u64)
                        };
                    }
                },
            }
        }
    }

    fn feed_client(&mut self, ts: u64) {
        loop {
            match self.req.state {
                State::Lost | State::Opaque => {
                    self.req.buf.clear();
                    return;
                }
                State::Head => {
                    // Stray CRLFs between requests are allowed (RFC 9112 §2.2).
                    while self.req.buf.starts_with(b"\r\n") {
                        self.req.buf.drain(..2);
                    }
                    if self.req.buf.is_empty() {
                        return;
                    }
                    if !plausible_start(Side::Client, &self.req.buf) {
                        self.lose(Side::Client, Loss::Malformed, ts);
                        return;
                    }
                    let Some(end) = find(&self.req.buf, b"\r\n\r\n") else {
                        if self.req.buf.len() > MAX_HEAD {
                            self.lose(Side::Client, Loss::Oversize, ts);
                        }
                        return;
                    };
                    let parsed = parse_head(&self.req.buf[..end]);
                    self.req.buf.drain(..end + 4);
                    let Some((start, headers)) = parsed else {
                        self.lose(Side::Client, Loss::Malformed, ts);
                        return;
                    };
                    let mut parts = start.splitn(3, ' ');
                    let (Some(method), Some(target), Some(version)) =
                        (parts.next(), parts.next(), parts.next())
                    else {
                        self.lose(Side::Client, Loss::Malformed, ts);
                        return;
                    };
                    if !version.starts_with("HTTP/1.")
                        || !method.bytes().all(|b| b.is_ascii_uppercase())
                        || self.req_fresh && !looks_like_request(start.as_bytes())
                    {
                        self.lose(Side::Client, Loss::Malformed, ts);
                        return;
                    }
                    let framing = if is_chunked(&headers) {
                        Framing::Chunked
                    } else {
                        match content_length(&headers) {
                            Ok(Some(n)) => Framing::Length(n),
                            Ok(None) => Framing::None,
                            Err(()) => {
                                self.lose(Side::Client, Loss::Malformed, ts);
                                return;
                            }
                        }
                    };
                    if self.pending.len() >= MAX_PENDING {
                        // Its response can no longer be paired by order.
                        self.pending.pop_front();
                        self.losses.add(Loss::Oversize);
                        self.unsure = true;
                    }
                    self.req_fresh = false;
                    self.start_loss = None;
                    self.seen_request = true;
                    self.pending.push_back(Request {
                        method: method.to_string(),
                        target: target.to_string(),
                        headers,
                        body: Vec::new(),
                        body_complete: true,
                        body_coding: None,
                        start_ts: self.req.first_ts,
                        complete: false,
                    });
                    self.req.framing = framing;
                    self.req.chunk = Chunk::Size;
                    self.req.state = State::Body;
                }
                State::Body => match self.body(Side::Client) {
                    Ok(true) => {
                        let body = std::mem::take(&mut self.req.body);
                        let complete = std::mem::replace(&mut self.req.body_complete, true);
                        let body_len = std::mem::take(&mut self.req.body_len);
                        if let Some(r) = self.pending.back_mut() {
                            let (body, complete, coding) = coding::decode_body(
                                &r.headers,
                                body,
                                complete,
                                body_len,
                                self.cfg.max_body,
                            );
                            r.body = body;
                            r.body_complete = complete;
                            r.body_coding = coding;
                            r.complete = true;
                        }
                        self.req.state = State::Head;
                        self.req.first_ts = ts;
                        if self.req.buf.is_empty() {
                            return;
                        }
                    }
                    Ok(false) => return,
                    Err(()) => {
                        self.lose(Side::Client, Loss::Malformed, ts);
                        return;
                    }
                },
            }
        }
    }

    fn feed_server(&mut self, ts: u64, out: &mut Vec<Op>) {
        loop {
            match self.resp.state {
                State::Lost | State::Opaque => {
                    self.resp.buf.clear();
                    return;
                }
                State::Head => {
                    if self.resp.buf.is_empty() {
                        return;
                    }
                    if !plausible_start(Side::Server, &self.resp.buf) {
                        self.lose(Side::Server, Loss::Malformed, ts);
                        return;
                    }
                    let Some(end) = find(&self.resp.buf, b"\r\n\r\n") else {
                        if self.resp.buf.len() > MAX_HEAD {
                            self.lose(Side::Server, Loss::Oversize, ts);
                        }
                        return;
                    };
                    let parsed = parse_head(&self.resp.buf[..end]);
                    self.resp.buf.drain(..end + 4);
                    let Some((start, headers)) = parsed else {
                        self.lose(Side::Server, Loss::Malformed, ts);
                        return;
                    };
                    let mut parts = start.splitn(3, ' ');
                    let version = parts.next().unwrap_or("");
                    let code: Option<u16> = parts.next().and_then(|c| c.parse().ok());
                    let reason = parts.next().unwrap_or("").to_string();
                    let Some(code) = code.filter(|c| (100..1000).contains(c)) else {
                        self.lose(Side::Server, Loss::Malformed, ts);
                        return;
                    };
                    if !version.starts_with("HTTP/1.") {
                        self.lose(Side::Server, Loss::Malformed, ts);
                        return;
                    }
                    if (100..200).contains(&code) && code != 101 {
                        // Interim response (100 Continue, 103 Early Hints): the final one follows.
                        self.resp.first_ts = ts;
                        continue;
                    }
                    let req = match self.request_for_response(self.resp.first_ts) {
                        Some(req) if code == 101 && is_h2c_upgrade(&req, &headers) => {
                            self.switch_to_h2(req, ts, out);
                            return;
                        }
                        req => req,
                    };
                    if code == 101 {
                        // Switching Protocols (WebSocket …): what follows is not HTTP.
                        if let Some(req) = req {
                            let resp = Response {
                                code,
                                reason,
                                headers,
                                llm: None,
                            };
                            out.push(self.op(req, Some((resp, Vec::new(), true, 0)), ts));
                        }
                        self.opaque();
                        return;
                    }
                    let method = req.as_ref().map(|r| r.method.as_str());
                    let no_body = method == Some("HEAD") || code == 204 || code == 304;
                    let connect_ok = method == Some("CONNECT") && (200..300).contains(&code);
                    let framing = if no_body || connect_ok {
                        Framing::None
                    } else if is_chunked(&headers) {
                        Framing::Chunked
                    } else {
                        match content_length(&headers) {
                            Ok(Some(n)) => Framing::Length(n),
                            // A response being skipped that runs to the close: wait for
                            // the next status line instead.
                            Ok(None) if req.is_none() => {
                                self.resp.state = State::Lost;
                                self.resp.buf.clear();
                                self.unsure = true;
                                return;
                            }
                            Ok(None) => Framing::Close,
                            Err(()) => {
                                self.lose(Side::Server, Loss::Malformed, ts);
                                return;
                            }
                        }
                    };
                    let llm = req
                        .as_ref()
                        .and_then(|r| llm_stream(r, &headers, self.cfg.max_body));
                    self.answering = req.map(|req| {
                        (
                            req,
                            Response {
                                code,
                                reason,
                                headers,
                                llm,
                            },
                        )
                    });
                    self.resp.framing = framing;
                    self.resp.chunk = Chunk::Size;
                    self.resp.state = State::Body;
                    if connect_ok {
                        self.finish_response(ts, out);
                        self.opaque();
                        return;
                    }
                }
                State::Body => match self.body(Side::Server) {
                    Ok(true) => {
                        self.finish_response(ts, out);
                        self.resp.first_ts = ts;
                        if self.resp.buf.is_empty() {
                            return;
                        }
                    }
                    Ok(false) => {
                        let llm_done = self
                            .answering
                            .as_ref()
                            .and_then(|(_, r)| r.llm.as_ref())
                            .is_some_and(genai::Stream::done);
                        if llm_done {
                            self.emit_response(ts, out);
                        }
                        return;
                    }
                    Err(()) => {
                        self.lose(Side::Server, Loss::Malformed, ts);
                        return;
                    }
                },
            }
        }
    }

    /// The server accepted `Upgrade: h2c`: from the byte after its 101 on, both sides
    /// speak HTTP/2, and the upgrading request is answered on stream 1.
    fn switch_to_h2(&mut self, req: Request, ts: u64, out: &mut Vec<Op>) {
        let mut h2 = Http2Parser::upgraded(
            self.cfg.clone(),
            Upgraded {
                method: req.method,
                target: req.target,
                headers: req.headers,
                body: req.body,
                // A body still on its way when the server switched is not recovered:
                // it comes before the client's preface, which the HTTP/2 side then
                // does not find (counted there).
                body_complete: req.body_complete && req.complete,
                start_ts: req.start_ts,
            },
        );
        // Whatever came with the 101 in the same piece is HTTP/2 already.
        let after = std::mem::take(&mut self.resp.buf);
        if !after.is_empty() {
            h2.feed(Side::Server, &after, ts, out);
        }
        let before = std::mem::take(&mut self.req.buf);
        if !before.is_empty() {
            h2.feed(Side::Client, &before, ts, out);
        }
        self.h2 = Some(Box::new(h2));
    }

    /// The connection was upgraded or tunnelled: neither side is HTTP any more.
    fn opaque(&mut self) {
        self.req.state = State::Opaque;
        self.resp.state = State::Opaque;
        self.req.buf.clear();
        self.resp.buf.clear();
    }
}

/// The reassembler of a streamed LLM answer, when the request is an LLM call and the
/// response an uncoded event stream (a coded one is decoded and replayed once whole).
fn llm_stream(req: &Request, headers: &[(String, String)], max: usize) -> Option<genai::Stream> {
    if coding::codings(header(headers, "content-encoding")).is_some() {
        return None;
    }
    genai::recognise(
        &req.method,
        &req.target,
        header(&req.headers, "host"),
        &req.body,
    )?
    .stream(header(headers, "content-type"), max)
}

/// Appends to a body kept up to `max` bytes, noting when bytes are cut. Once bytes were
/// cut or lost, nothing more is appended: the kept body is always an exact prefix,
/// never bytes from after a hole spliced onto bytes from before it.
fn keep(body: &mut Vec<u8>, data: &[u8], max: usize, complete: &mut bool) {
    if !*complete {
        return;
    }
    let room = max.saturating_sub(body.len());
    if data.len() > room {
        *complete = false;
    }
    body.extend_from_slice(&data[..data.len().min(room)]);
}

/// Whether a 101 switches the connection to HTTP/2 over cleartext: the request asked
/// for `h2c` among its upgrade tokens and the server named it (RFC 7540 §3.2).
fn is_h2c_upgrade(req: &Request, response: &[(String, String)]) -> bool {
    let h2c = |headers: &[(String, String)]| {
        header(headers, "upgrade")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("h2c")))
    };
    h2c(&req.headers) && h2c(response)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Start line and header fields of a message head (without the final CRLFCRLF).
fn parse_head(head: &[u8]) -> Option<(String, Vec<(String, String)>)> {
    // Heads are ASCII but for the odd byte: std's validation is faster than the lossy
    // decoder's, which only runs when it fails.
    let text = match std::str::from_utf8(head) {
        Ok(t) => t.into(),
        Err(_) => String::from_utf8_lossy(head),
    };
    let mut lines = crlf_lines(&text);
    let start = lines.next()?.to_string();
    let mut headers = Vec::with_capacity(8);
    for line in lines {
        let (name, value) = line.split_once(':')?;
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return None;
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    Some((start, headers))
}

/// `text.split("\r\n")`, without building a substring searcher for every message head
/// (it showed in the agent's profile under load): each `\r` is found by memchr.
fn crlf_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let r = rest?;
        let mut from = 0;
        while let Some(i) = memchr::memchr(b'\r', &r.as_bytes()[from..]).map(|i| from + i) {
            if r.as_bytes().get(i + 1) == Some(&b'\n') {
                rest = Some(&r[i + 2..]);
                return Some(&r[..i]);
            }
            from = i + 1;
        }
        rest = None;
        Some(r)
    })
}

pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    header(headers, "transfer-encoding")
        .map(|v| {
            v.split(',')
                .any(|c| c.trim().eq_ignore_ascii_case("chunked"))
        })
        .unwrap_or(false)
}

/// Content-Length; conflicting values are an error (RFC 9112 §6.3).
fn content_length(headers: &[(String, String)]) -> Result<Option<u64>, ()> {
    let mut found: Option<u64> = None;
    for (n, v) in headers {
        if n.eq_ignore_ascii_case("content-length") {
            let len: u64 = v.trim().parse().map_err(|_| ())?;
            if found.is_some_and(|f| f != len) {
                return Err(());
            }
            found = Some(len);
        }
    }
    Ok(found)
}

impl Parser for HttpParser {
    fn protocol(&self) -> Protocol {
        if self.h2.is_some() {
            Protocol::Http2
        } else {
            Protocol::Http
        }
    }

    fn feed(&mut self, side: Side, data: &[u8], ts: u64, out: &mut Vec<Op>) {
        if let Some(h2) = self.h2.as_mut() {
            h2.feed(side, data, ts, out);
            return;
        }
        let max = self.cfg.max_buffer;
        let state = match side {
            Side::Client => self.req.state,
            Side::Server => self.resp.state,
        };
        match state {
            State::Opaque => return,
            // A captured piece that starts a message ends the loss: a call starts at a
            // message boundary when the peer does not pipeline, and a request or
            // status line at the very start of a piece of body is not to be expected.
            State::Lost => {
                let starts = match side {
                    Side::Client => looks_like_request(data),
                    Side::Server => looks_like_response(data),
                };
                if !starts {
                    return;
                }
                match side {
                    Side::Client => self.req.state = State::Head,
                    Side::Server => self.resp.state = State::Head,
                }
            }
            // Skipping a response whose request was not seen: its framing is a guess (an
            // answer to HEAD announces a length it does not send), so a status line
            // after a request sent since it began ends it.
            State::Body
                if side == Side::Server
                    && self.answering.is_none()
                    && looks_like_response(data)
                    && self
                        .pending
                        .iter()
                        .any(|r| r.start_ts > self.resp.first_ts && r.start_ts <= ts) =>
            {
                self.resp.buf.clear();
                self.resp.body = Vec::new();
                self.resp.body_complete = true;
                self.resp.framing = Framing::None;
                self.resp.state = State::Head;
            }
            State::Head | State::Body => {}
        }
        let s = match side {
            Side::Client => &mut self.req,
            Side::Server => &mut self.resp,
        };
        if s.state == State::Head && s.buf.is_empty() {
            s.first_ts = ts;
        }
        if s.buf.len() + data.len() > max {
            self.lose(side, Loss::Oversize, ts);
            return;
        }
        s.buf.extend_from_slice(data);
        match side {
            Side::Client => self.feed_client(ts),
            Side::Server => self.feed_server(ts, out),
        }
    }

    fn gap(&mut self, side: Side, n: u64, ts: u64, out: &mut Vec<Op>) {
        if let Some(h2) = self.h2.as_mut() {
            h2.gap(side, n, ts, out);
            return;
        }
        let s = match side {
            Side::Client => &mut self.req,
            Side::Server => &mut self.resp,
        };
        if matches!(s.state, State::Lost | State::Opaque) {
            return;
        }
        // Only bytes inside a body of known length can be skipped; anything else loses
        // the message boundaries.
        let skippable = s.state == State::Body && s.buf.is_empty();
        match (skippable, s.framing, s.chunk) {
            (true, Framing::Length(left), _) if n <= left => {
                s.body_complete = false;
                s.framing = Framing::Length(left - n);
            }
            (true, Framing::Chunked, Chunk::Data(left)) if n <= left => {
                s.body_complete = false;
                s.chunk = if left == n {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - n)
                };
            }
            (true, Framing::Close, _) => s.body_complete = false,
            _ => {
                self.lose(side, Loss::Gap, ts);
                return;
            }
        }
        match side {
            Side::Client => self.feed_client(ts),
            Side::Server => self.feed_server(ts, out),
        }
    }

    fn close(&mut self, ts: u64, out: &mut Vec<Op>) {
        if let Some(h2) = self.h2.as_mut() {
            h2.close(ts, out);
        }
        if self.resp.state == State::Body && self.resp.framing == Framing::Close {
            self.finish_response(ts, out);
        } else if let Some((req, resp)) = self.answering.take() {
            let body = std::mem::take(&mut self.resp.body);
            let body_len = std::mem::take(&mut self.resp.body_len);
            out.push(self.op(req, Some((resp, body, false, body_len)), ts));
        }
        while let Some(req) = self.pending.pop_front() {
            out.push(self.op(req, None, ts));
        }
    }

    /// Pairing starts unsure: a response pairs only with the one request sent before it
    /// began (so none before the first request line seen), never by order alone.
    fn watched_midstream(&mut self) {
        self.unsure = true;
    }

    fn unparsed(&self) -> u64 {
        self.losses().total()
    }

    fn losses(&self) -> Losses {
        let mut all = self.losses;
        if let Some(h2) = &self.h2 {
            all.add_all(&h2.losses());
        }
        all
    }
}

#[cfg(test)]
mod tests;
