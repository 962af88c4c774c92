//! Spans in the in-process SDK's JSON format (openbox-core-protocol.md §3.1): protocol
//! operations of each connection, and file.open spans with file.read/file.write children.
//!
//! [`SpanBuilder`] consumes the tracker's [`Record`]s: it detects each connection's
//! protocol from its first bytes, feeds both directions to that protocol's parser, and
//! turns the parser's [`Op`]s into [`Span`]s with the SDK's attribute names.

use std::collections::{BTreeMap, VecDeque};

use hashbrown::HashMap;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::{
    capture::{clock::Clock, event::Addr},
    conn::{Attribution, Direction, Pid, Record},
    protocol::{
        self, http::header, Loss, Losses, Op, Parser, ParserConfig, Protocol, Side, StatusCode,
    },
    redact::Redactor,
};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    pub code: StatusCode,
    pub description: Option<String>,
}

/// One span, serialised exactly as the SDK sends it inside ActivityCompleted.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Span {
    pub span_id: String,
    pub trace_id: String,
    pub parent_span_id: Option<String>,
    pub name: String,
    pub kind: &'static str,
    pub start_time: u64,
    pub end_time: u64,
    pub duration_ns: Option<u64>,
    pub attributes: Map<String, Value>,
    pub status: Status,
    pub events: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activity_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<Map<String, Value>>,
    /// Which process made it (not part of the SDK's JSON; used for attribution).
    #[serde(skip)]
    pub pid: Pid,
    #[serde(skip)]
    pub tid: u32,
    /// The activity whose request (or file open) made it, as the kernel saw it.
    #[serde(skip)]
    pub attr: Attribution,
}

impl Span {
    /// Appends the span's JSON (the same object as its `Serialize`, field for field and
    /// in the same order) to `out`, without serde's per-field machinery: `trace --json`
    /// writes every span this way (README "Benchmark": agent CPU per span).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"span_id\":");
        json_str(out, &self.span_id);
        out.extend_from_slice(b",\"trace_id\":");
        json_str(out, &self.trace_id);
        out.extend_from_slice(b",\"parent_span_id\":");
        json_opt_str(out, self.parent_span_id.as_deref());
        out.extend_from_slice(b",\"name\":");
        json_str(out, &self.name);
        out.extend_from_slice(b",\"kind\":");
        json_str(out, self.kind);
        out.extend_from_slice(b",\"start_time\":");
        json_u64(out, self.start_time);
        out.extend_from_slice(b",\"end_time\":");
        json_u64(out, self.end_time);
        out.extend_from_slice(b",\"duration_ns\":");
        match self.duration_ns {
            Some(n) => json_u64(out, n),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"attributes\":");
        json_map(out, &self.attributes);
        out.extend_from_slice(b",\"status\":{\"code\":\"");
        out.extend_from_slice(match self.status.code {
            StatusCode::Unset => b"UNSET".as_slice(),
            StatusCode::Ok => b"OK",
            StatusCode::Error => b"ERROR",
        });
        out.extend_from_slice(b"\",\"description\":");
        json_opt_str(out, self.status.description.as_deref());
        out.extend_from_slice(b"},\"events\":[");
        for (i, e) in self.events.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_value(out, e);
        }
        out.push(b']');
        for (name, value) in [
            (&b",\"activity_id\":"[..], &self.activity_id),
            (b",\"request_body\":", &self.request_body),
            (b",\"response_body\":", &self.response_body),
        ] {
            if let Some(v) = value {
                out.extend_from_slice(name);
                json_str(out, v);
            }
        }
        for (name, value) in [
            (&b",\"request_headers\":"[..], &self.request_headers),
            (b",\"response_headers\":", &self.response_headers),
        ] {
            if let Some(m) = value {
                out.extend_from_slice(name);
                json_map(out, m);
            }
        }
        out.push(b'}');
    }
}

/// A JSON string, escaped as serde_json escapes it (writing into a `Vec` cannot fail).
/// Most strings of a span need no escape (serde_json escapes `"`, `\\` and control
/// characters below U+0020, nothing else): those are copied between quotes without
/// serde's writer calls per piece.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if !needs_escape(s.as_bytes()) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Whether serde_json would escape a byte of `b` (`"`, `\\`, below 0x20), eight bytes
/// at a time (a byte loop cost about what serde's escaper did).
fn needs_escape(b: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Some byte of `x` is below `n` (n ≤ 0x80): its lane borrows in the subtraction while
    // its high bit was clear. A borrow only starts at such a byte, so the answer is exact.
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH != 0;
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let x = u64::from_le_bytes(c.try_into().unwrap_or_default());
        if below(x, 0x20)
            || below(x ^ (ONES * u64::from(b'"')), 1)
            || below(x ^ (ONES * u64::from(b'\\')), 1)
        {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&c| c < 0x20 || c == b'"' || c == b'\\')
}

fn json_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn json_u64(out: &mut Vec<u8>, n: u64) {
    let _ = serde_json::to_writer(&mut *out, &n);
}

fn json_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::String(s) => json_str(out, s),
        // Numbers keep serde_json's own formatting (floats especially).
        v => {
            let _ = serde_json::to_writer(&mut *out, v);
        }
    }
}

fn json_map(out: &mut Vec<u8>, m: &Map<String, Value>) {
    out.push(b'{');
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_str(out, k);
        out.push(b':');
        json_value(out, v);
    }
    out.push(b'}');
}

#[derive(Debug, Clone, Default)]
pub struct SpanConfig {
    pub parser: ParserConfig,
    /// Which header, URL, body and statement values are replaced by `[REDACTED]`.
    pub redact: Redactor,
    /// One file.read/file.write span per call instead of one per burst.
    pub every_file_call: bool,
}

/// Which end of a connection the watched process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Client,
    Server,
    Unknown,
}

/// Bytes held per direction while a connection's protocol is not yet recognisable.
const DETECT_BYTES: usize = 64;

struct ConnState {
    role: Role,
    peer: Option<Addr>,
    pid: Pid,
    tid: u32,
    tls: bool,
    parser: Option<Box<dyn Parser>>,
    /// No known protocol: stop looking.
    unknown: bool,
    /// First bytes per direction [egress, ingress] kept for detection, with their ts.
    held: [Vec<Held>; 2],
    /// Bytes in `held`, per direction.
    held_bytes: [usize; 2],
    /// Per direction, the first held piece detection must still look from: from each
    /// piece before it, the 64 bytes detection reads (or the bytes up to a gap) were
    /// all there and showed no known protocol, so they never will.
    detect_from: [usize; 2],
    /// Open before watching began: its parser starts out of step (see
    /// [`Parser::watched_midstream`]).
    midstream: bool,
    /// The parser's losses already added to the builder's counts.
    counted: Losses,
    /// Next expected stream offset per [plaintext-or-cleartext][direction].
    next_seq: [[u64; 2]; 2],
    /// Attribution changes of the bytes per direction: (ts of the first record with
    /// this attribution, attribution). An operation belongs to whoever sent the first
    /// byte of its request, whoever reads the response (a pooled connection's reply is
    /// often read by the event loop's callback, outside any activity).
    attrs: [VecDeque<(u64, Attribution)>; 2],
    /// Bytes the kernel sent from a file (sendfile, splice) per direction, not yet
    /// told on a span: (ts, file, bytes).
    from_files: [VecDeque<(u64, String, u64)>; 2],
}

/// File transfers kept per connection direction until a span claims them.
const FROM_FILES_KEPT: usize = 64;

/// Attribution changes kept per connection direction: enough for deep pipelining; an
/// operation whose request began before the oldest kept change is left unattributed.
const ATTR_HISTORY: usize = 256;

impl ConnState {
    /// What was held for detection, leaving nothing held.
    fn take_held(&mut self) -> [Vec<Held>; 2] {
        self.held_bytes = [0; 2];
        self.detect_from = [0; 2];
        std::mem::take(&mut self.held)
    }

    /// The file bytes the kernel sent on direction `d` between `start` and `end` (an
    /// operation's time), summed, with the file they came from (the first, if
    /// several); forgets older ones.
    fn take_from_files(&mut self, d: usize, start: u64, end: u64) -> Option<(String, u64)> {
        let kept = &mut self.from_files[d];
        while kept.front().is_some_and(|(ts, _, _)| *ts < start) {
            kept.pop_front();
        }
        let mut found: Option<(String, u64)> = None;
        while let Some((ts, path, bytes)) = kept.front() {
            if *ts > end {
                break;
            }
            match &mut found {
                Some((_, total)) => *total += bytes,
                None => found = Some((path.clone(), *bytes)),
            }
            kept.pop_front();
        }
        found
    }

    fn note_attr(&mut self, d: usize, ts: u64, attr: Attribution) {
        let h = &mut self.attrs[d];
        if h.back().map(|(_, a)| *a) != Some(attr) {
            if h.len() == ATTR_HISTORY {
                h.pop_front();
            }
            h.push_back((ts, attr));
        }
    }

    /// The attribution of the request bytes at `ts`; forgets older changes (operations
    /// complete in request order on one connection).
    fn attr_at(&mut self, ts: u64) -> Attribution {
        let d = if self.role == Role::Server { 1 } else { 0 };
        let h = &mut self.attrs[d];
        let Some(i) = h.iter().rposition(|(t, _)| *t <= ts) else {
            return Attribution::default();
        };
        h.drain(..i);
        h[0].1
    }
}

struct FileState {
    span_id: String,
    path: String,
    mode: &'static str,
    open_ts: u64,
    pid: Pid,
    attr: Attribution,
    /// The burst in progress: (direction, first ts, last ts, bytes, calls).
    burst: Option<(Direction, u64, u64, u64, u64)>,
    children: Vec<Span>,
}

/// Small non-cryptographic generator for span and trace ids (splitmix64).
struct Ids(u64);

impl Ids {
    fn new() -> Self {
        let mut seed = [0u8; 8];
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            use std::io::Read;
            let _ = f.read_exact(&mut seed);
        }
        Ids(u64::from_ne_bytes(seed) ^ std::process::id() as u64)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn span_id(&mut self) -> String {
        let mut id = String::with_capacity(16);
        push_hex(&mut id, self.next());
        id
    }
    fn trace_id(&mut self) -> String {
        format!("{:016x}{:016x}", self.next(), self.next())
    }
}

/// `format!("{:016x}")` without the formatting machinery (one id per span).
fn push_hex(out: &mut String, n: u64) {
    for shift in (0..16).rev() {
        out.push(char::from(
            b"0123456789abcdef"[(n >> (shift * 4)) as usize & 0xf],
        ));
    }
}

pub struct SpanBuilder {
    cfg: SpanConfig,
    clock: Clock,
    ids: Ids,
    trace_id: String,
    conns: HashMap<String, ConnState>,
    files: HashMap<(Pid, i32), FileState>,
    /// Operations the parsers could not make sense of, by protocol (counted as they
    /// happen, open connections included).
    pub unparsed: BTreeMap<&'static str, u64>,
    /// The same, by protocol and reason ([`protocol::Loss`]).
    pub lost: BTreeMap<(&'static str, &'static str), u64>,
    /// Connections whose protocol was not recognised.
    pub unknown_conns: u64,
    /// Connections found, since the caller last took them, to be of no known protocol:
    /// their payload need not be copied any more.
    pub given_up: Vec<String>,
}

impl SpanBuilder {
    pub fn new(cfg: SpanConfig, clock: Clock) -> Self {
        let mut ids = Ids::new();
        let trace_id = ids.trace_id();
        Self {
            cfg,
            clock,
            ids,
            trace_id,
            conns: HashMap::new(),
            files: HashMap::new(),
            unparsed: BTreeMap::new(),
            lost: BTreeMap::new(),
            unknown_conns: 0,
            given_up: Vec::new(),
        }
    }

    fn conn(&mut self, id: &str, pid: Pid, tid: u32, peer: &Option<Addr>) -> &mut ConnState {
        // Looked up first so a known connection (nearly every record) costs no key copy.
        if !self.conns.contains_key(id) {
            self.insert_conn(id, pid, tid, peer);
        }
        self.conns.get_mut(id).expect("inserted above")
    }

    fn insert_conn(&mut self, id: &str, pid: Pid, tid: u32, peer: &Option<Addr>) {
        self.conns.insert(
            id.to_string(),
            ConnState {
                role: Role::Unknown,
                peer: peer.clone(),
                pid,
                tid,
                tls: false,
                parser: None,
                unknown: false,
                held: [Vec::new(), Vec::new()],
                held_bytes: [0; 2],
                detect_from: [0; 2],
                midstream: false,
                counted: Losses::default(),
                next_seq: [[0; 2]; 2],
                attrs: [VecDeque::new(), VecDeque::new()],
                from_files: [VecDeque::new(), VecDeque::new()],
            },
        );
    }

    pub fn handle(&mut self, r: &Record, out: &mut Vec<Span>) {
        match r {
            Record::Connect {
                accept,
                pid,
                tid,
                conn,
                peer,
                ..
            } => {
                let c = self.conn(conn, *pid, *tid, peer);
                c.role = if *accept { Role::Server } else { Role::Client };
            }
            Record::Data {
                ts,
                pid,
                tid,
                conn: Some(conn),
                peer,
                tls,
                direction,
                seq,
                truncated,
                data,
                attr,
                from_file,
                midstream,
                ..
            } => {
                let cfg = self.cfg.parser.clone();
                let c = self.conn(conn, *pid, *tid, peer);
                c.tid = *tid;
                c.tls |= *tls;
                c.midstream |= *midstream;
                let (t, d) = (*tls as usize, direction_idx(direction));
                c.note_attr(d, *ts, *attr);
                if let Some(path) = from_file {
                    let kept = &mut c.from_files[d];
                    if kept.len() == FROM_FILES_KEPT {
                        kept.pop_front();
                    }
                    kept.push_back((*ts, path.clone(), *truncated));
                }
                let gap_before = seq.saturating_sub(c.next_seq[t][d]);
                c.next_seq[t][d] = seq + data.len() as u64 + truncated;
                let mut ops = Vec::new();
                let was_unknown = c.unknown;
                feed(
                    c, &cfg, direction, *ts, gap_before, data, *truncated, &mut ops,
                );
                let lost = new_losses(c);
                if c.unknown && !was_unknown {
                    self.given_up.push(conn.clone());
                }
                self.count(lost);
                self.emit_ops(conn, ops, out);
            }
            Record::Close { ts, conn, .. } => {
                if let Some(mut c) = self.conns.remove(conn) {
                    let mut ops = Vec::new();
                    if let Some(p) = c.parser.as_mut() {
                        p.close(*ts, &mut ops);
                        let lost = new_losses(&mut c);
                        self.count(lost);
                    } else if c.held.iter().any(|h| !h.is_empty()) {
                        self.unknown_conns += 1;
                    }
                    let protocol = c.parser.as_ref().map(|p| p.protocol());
                    for op in ops {
                        out.push(self.span(&mut c, protocol, op));
                    }
                }
            }
            Record::FileOpen {
                ts,
                pid,
                fd,
                path,
                mode,
                attr,
            } => {
                let span_id = self.ids.span_id();
                self.files.insert(
                    (*pid, *fd),
                    FileState {
                        span_id,
                        path: path.clone(),
                        mode,
                        open_ts: *ts,
                        pid: *pid,
                        attr: *attr,
                        burst: None,
                        children: Vec::new(),
                    },
                );
            }
            Record::FileIo {
                ts,
                pid,
                fd,
                direction,
                bytes,
                ..
            } => {
                let every = self.cfg.every_file_call;
                let Some(f) = self.files.get_mut(&(*pid, *fd)) else {
                    return;
                };
                match &mut f.burst {
                    Some((d, _, last, total, calls)) if d == direction && !every => {
                        *last = *ts;
                        *total += bytes;
                        *calls += 1;
                    }
                    _ => {
                        let done = f.burst.replace((direction.clone(), *ts, *ts, *bytes, 1));
                        if let Some(b) = done {
                            let span = self.file_io_span((*pid, *fd), b);
                            if let Some(f) = self.files.get_mut(&(*pid, *fd)) {
                                f.children.push(span);
                            }
                        }
                    }
                }
            }
            Record::FileClose {
                ts,
                pid,
                fd,
                bytes_read,
                bytes_written,
                ..
            } => {
                let key = (*pid, *fd);
                let burst = self.files.get_mut(&key).and_then(|f| f.burst.take());
                if let Some(b) = burst {
                    let span = self.file_io_span(key, b);
                    if let Some(f) = self.files.get_mut(&key) {
                        f.children.push(span);
                    }
                }
                if let Some(f) = self.files.remove(&key) {
                    let mut attributes = Map::new();
                    attributes.insert("file.path".into(), f.path.clone().into());
                    attributes.insert("file.mode".into(), f.mode.into());
                    attributes.insert("file.total_bytes_read".into(), (*bytes_read).into());
                    attributes.insert("file.total_bytes_written".into(), (*bytes_written).into());
                    let open = self.base_span(
                        f.span_id.clone(),
                        None,
                        "file.open".into(),
                        "INTERNAL",
                        f.open_ts,
                        *ts,
                        attributes,
                        f.pid,
                        0,
                    );
                    let attr = f.attr;
                    out.push(Span { attr, ..open });
                    out.extend(f.children.into_iter().map(|c| Span { attr, ..c }));
                }
            }
            _ => {}
        }
    }

    fn count(&mut self, lost: Vec<(Protocol, Loss, u64)>) {
        for (p, why, n) in lost {
            *self.unparsed.entry(p.as_str()).or_default() += n;
            *self.lost.entry((p.as_str(), why.as_str())).or_default() += n;
        }
    }

    fn file_io_span(&mut self, key: (Pid, i32), burst: (Direction, u64, u64, u64, u64)) -> Span {
        let (dir, first, last, bytes, calls) = burst;
        let (parent, path, pid) = match self.files.get(&key) {
            Some(f) => (Some(f.span_id.clone()), f.path.clone(), f.pid),
            None => (None, String::new(), key.0),
        };
        let op = if dir == Direction::Egress {
            "write"
        } else {
            "read"
        };
        let mut attributes = Map::new();
        attributes.insert("file.path".into(), path.into());
        attributes.insert("file.operation".into(), op.into());
        attributes.insert("file.bytes".into(), bytes.into());
        if calls > 1 {
            attributes.insert("file.calls".into(), calls.into());
        }
        let id = self.ids.span_id();
        self.base_span(
            id,
            parent,
            format!("file.{op}"),
            "INTERNAL",
            first,
            last,
            attributes,
            pid,
            0,
        )
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "every field of a span's skeleton"
    )]
    fn base_span(
        &self,
        span_id: String,
        parent: Option<String>,
        name: String,
        kind: &'static str,
        start_ts: u64,
        end_ts: u64,
        attributes: Map<String, Value>,
        pid: Pid,
        tid: u32,
    ) -> Span {
        let start_time = self.clock.epoch_ns(start_ts);
        let end_time = self.clock.epoch_ns(end_ts.max(start_ts));
        Span {
            span_id,
            trace_id: self.trace_id.clone(),
            parent_span_id: parent,
            name,
            kind,
            start_time,
            end_time,
            duration_ns: Some(end_time - start_time),
            attributes,
            status: Status {
                code: StatusCode::Unset,
                description: None,
            },
            events: Vec::new(),
            activity_id: None,
            request_body: None,
            response_body: None,
            request_headers: None,
            response_headers: None,
            pid,
            tid,
            attr: Attribution::default(),
        }
    }

    fn emit_ops(&mut self, conn: &str, ops: Vec<Op>, out: &mut Vec<Span>) {
        if ops.is_empty() {
            return;
        }
        // Taken out of the map (with its key, put back as it was) so `span` can use the
        // builder's ids while it holds the connection.
        let Some((key, mut c)) = self.conns.remove_entry(conn) else {
            return;
        };
        let protocol = c.parser.as_ref().map(|p| p.protocol());
        for op in ops {
            out.push(self.span(&mut c, protocol, op));
        }
        self.conns.insert(key, c);
    }

    fn span(&mut self, c: &mut ConnState, protocol: Option<Protocol>, op: Op) -> Span {
        let attr = c.attr_at(op.start_ts);
        let kind = if c.role == Role::Server {
            "SERVER"
        } else {
            "CLIENT"
        };
        let mut attributes = op.attributes;
        for (side, d) in [("request", 0), ("response", 1)] {
            // Which direction carries this side: a client sends the request.
            let d = if c.role == Role::Server { 1 - d } else { d };
            if let Some((path, bytes)) = c.take_from_files(d, op.start_ts, op.end_ts) {
                let prefix = match protocol {
                    Some(Protocol::Http | Protocol::Http2) => "http",
                    _ => "io",
                };
                attributes.insert(format!("{prefix}.{side}.body.file"), path.into());
                attributes.insert(format!("{prefix}.{side}.body.file_bytes"), bytes.into());
            }
        }
        // The address is formatted only where a span shows it: an HTTP span with a Host
        // header does not.
        let (peer_ip, peer_port) = match &c.peer {
            Some(Addr::Inet(a)) => (Some(a.ip()), Some(a.port())),
            _ => (None, None),
        };
        let peer_host = || peer_ip.map(|ip| ip.to_string());
        let id = self.ids.span_id();
        let mut span = self.base_span(
            id,
            None,
            op.name,
            kind,
            op.start_ts,
            op.end_ts,
            Map::new(),
            c.pid,
            c.tid,
        );
        if matches!(protocol, Some(Protocol::Http | Protocol::Http2)) {
            let scheme = if c.tls { "https" } else { "http" };
            let default_port = if c.tls { 443 } else { 80 };
            // Read from the parser's attributes in place; only the URL is built new.
            let (name, port, url) = {
                let host_header = attributes.get("http.host").and_then(Value::as_str);
                let (name, port) = match host_header {
                    Some(h) => split_host_port(h, default_port),
                    None => (
                        peer_host().unwrap_or_default(),
                        peer_port.unwrap_or(default_port),
                    ),
                };
                let target = attributes
                    .get("http.target")
                    .and_then(Value::as_str)
                    .unwrap_or("/");
                let url = if target.starts_with("http://") || target.starts_with("https://") {
                    target.to_string()
                } else {
                    let authority = match host_header {
                        Some(h) => h.into(),
                        None => {
                            std::borrow::Cow::Owned(format_authority(&name, port, default_port))
                        }
                    };
                    let mut url =
                        String::with_capacity(scheme.len() + 3 + authority.len() + target.len());
                    url.push_str(scheme);
                    url.push_str("://");
                    url.push_str(&authority);
                    url.push_str(target);
                    url
                };
                (name, port, url)
            };
            let target = match attributes.remove("http.target") {
                Some(Value::String(t)) => t,
                _ => "/".to_string(),
            };
            let redact = &self.cfg.redact;
            attributes.insert("http.scheme".into(), scheme.into());
            attributes.insert("http.url".into(), redact.url_owned(url).into());
            attributes.insert("http.target".into(), redact.url_owned(target).into());
            attributes
                .entry("http.host")
                .or_insert_with(|| format_authority(&name, port, default_port).into());
            attributes.insert("net.peer.name".into(), name.into());
            attributes.insert("net.peer.port".into(), port.into());
            attributes.insert("net.transport".into(), "ip_tcp".into());
            span.request_headers = op.request_headers.as_ref().map(|h| self.headers(h));
            span.response_headers = op.response_headers.as_ref().map(|h| self.headers(h));
            span.request_body = op.request_body.map(|b| {
                if binary_grpc(&op.request_headers) {
                    grpc_body(&b)
                } else {
                    redact.body_owned(text(b), content_type(&op.request_headers))
                }
            });
            let decoded = attributes.contains_key("http.response.body.decoded");
            span.response_body = match (op.response_body, &op.response_headers) {
                (Some(b), Some(_)) if binary_grpc(&op.response_headers) => Some(grpc_body(&b)),
                (Some(b), Some(h)) if textual(h, decoded) => {
                    Some(redact.body_owned(text(b), content_type(&op.response_headers)))
                }
                _ => None,
            };
            // The reassembled answer of a streamed LLM call is JSON, like the body.
            if let Some(Value::String(m)) = attributes.get_mut("gen_ai.output.messages") {
                *m = redact.json_owned(std::mem::take(m));
            }
            // The span name is the method; a parser may one day put the target in it.
            span.name = redact.url_owned(std::mem::take(&mut span.name));
        } else {
            if let Some(system) = protocol.and_then(|p| p.db_system()) {
                attributes.insert("db.system".into(), system.into());
            }
            // Redis AUTH/HELLO and MongoDB authentication commands are hidden by their
            // parsers; SQL carries passwords inside statement text.
            if matches!(protocol, Some(Protocol::Postgres | Protocol::Mysql)) {
                if let Some(Value::String(stmt)) = attributes.get_mut("db.statement") {
                    *stmt = self.cfg.redact.sql(stmt);
                }
            }
            if let Some(h) = peer_host() {
                attributes.insert("net.peer.name".into(), h.into());
            }
            if let Some(p) = peer_port {
                attributes.insert("net.peer.port".into(), p.into());
                // Stream protocols over an inet socket: TCP (the OTel value the SDK sends).
                attributes.insert("net.transport".into(), "ip_tcp".into());
            }
        }
        span.attributes = attributes;
        span.attr = attr;
        span.status = Status {
            code: op.status,
            description: op.status_description,
        };
        span
    }

    fn headers(&self, headers: &[(String, String)]) -> Map<String, Value> {
        let mut m = Map::new();
        for (name, value) in headers {
            let name = name.to_ascii_lowercase();
            let value = self.cfg.redact.header_value(&name, value);
            // Repeated headers are joined as HTTP allows (RFC 9110 §5.3).
            match m.entry(name) {
                serde_json::map::Entry::Occupied(mut prev) => match prev.get_mut() {
                    Value::String(prev) => {
                        prev.push_str(", ");
                        prev.push_str(&value);
                    }
                    other => *other = value.into(),
                },
                serde_json::map::Entry::Vacant(slot) => {
                    slot.insert(value.into());
                }
            }
        }
        m
    }

    /// Connections still open at the end: finish what their parsers hold.
    pub fn finish(&mut self, ts: u64, out: &mut Vec<Span>) {
        let ids: Vec<String> = self.conns.keys().cloned().collect();
        for conn in ids {
            self.handle(
                &Record::Close {
                    ts,
                    pid: 0,
                    fd: -1,
                    conn,
                    peer: None,
                    bytes_sent: 0,
                    bytes_received: 0,
                    tls: false,
                },
                out,
            );
        }
    }
}

/// The parser's losses since they were last counted.
fn new_losses(c: &mut ConnState) -> Vec<(Protocol, Loss, u64)> {
    let Some(p) = c.parser.as_ref() else {
        return Vec::new();
    };
    let now = p.losses();
    let new = now
        .since(&c.counted)
        .map(|(why, n)| (p.protocol(), why, n))
        .collect();
    c.counted = now;
    new
}

fn direction_idx(d: &Direction) -> usize {
    match d {
        Direction::Egress => 0,
        Direction::Ingress => 1,
    }
}

/// Routes one data segment to the connection's parser, detecting the protocol first.
#[expect(clippy::too_many_arguments, reason = "the fields of one data record")]
fn feed(
    c: &mut ConnState,
    cfg: &ParserConfig,
    dir: &Direction,
    ts: u64,
    gap_before: u64,
    data: &[u8],
    truncated: u64,
    ops: &mut Vec<Op>,
) {
    if c.unknown {
        return;
    }
    let d = direction_idx(dir);
    if c.parser.is_none() {
        detect_and_start(c, cfg, d, ts, gap_before, data, truncated, ops);
        return;
    }
    let role = c.role;
    let p = c.parser.as_mut().unwrap();
    let side = side_of(role, d);
    if gap_before > 0 {
        p.gap(side, gap_before, ts, ops);
    }
    if !data.is_empty() {
        p.feed(side, data, ts, ops);
    }
    if truncated > 0 {
        p.gap(side, truncated, ts, ops);
    }
}

/// Most bytes held while a connection's protocol is not recognised yet: a response
/// already on its way when watching began is held (and dropped by the parser) until the
/// client's next request shows the protocol.
const HELD_LIMIT: usize = 64 * 1024;
/// Most pieces held (both directions): a stream of tiny writes of no known protocol is
/// given up before it holds 64 KiB in 64 K pieces.
const HELD_RECORDS: usize = 4096;

/// Holds one data segment of a connection whose protocol is not known yet, and starts
/// its parser once the first bytes of a captured piece show which protocol it speaks.
/// Watching may begin in the middle of a connection's traffic (a pooled connection with
/// a response on its way), and bytes may be lost before the protocol is known: the
/// protocol is looked for at the start of every held piece, not only at the first, and
/// what was held before is replayed so the parser resynchronises on its own.
#[expect(clippy::too_many_arguments, reason = "the fields of one data record")]
fn detect_and_start(
    c: &mut ConnState,
    cfg: &ParserConfig,
    d: usize,
    ts: u64,
    gap_before: u64,
    data: &[u8],
    truncated: u64,
    ops: &mut Vec<Op>,
) {
    if gap_before > 0 {
        c.held[d].push(Held::Gap(ts, gap_before));
    }
    if !data.is_empty() {
        c.held[d].push(Held::Bytes(ts, data.to_vec()));
        c.held_bytes[d] += data.len();
    }
    if truncated > 0 {
        c.held[d].push(Held::Gap(ts, truncated));
    }
    // Only this direction's places to look from changed: the new piece, and the
    // earlier ones whose 64 bytes were not all there yet.
    let side_if_client = if d == 0 { Side::Client } else { Side::Server };
    let sides: &[(Side, Role)] = match c.role {
        Role::Client => &[(side_if_client, Role::Client)],
        Role::Server => &[(side_if_client.opposite(), Role::Server)],
        Role::Unknown => &[
            (side_if_client, Role::Client),
            (side_if_client.opposite(), Role::Server),
        ],
    };
    let mut detected = None;
    let mut first = Vec::with_capacity(DETECT_BYTES);
    let held = &c.held[d];
    for start in c.detect_from[d]..held.len() {
        first.clear();
        // Whether this place's window is final: 64 bytes, or cut by a gap.
        let mut whole = !matches!(held[start], Held::Bytes(..));
        if !whole {
            for h in &held[start..] {
                match h {
                    Held::Bytes(_, b) => {
                        let take = (DETECT_BYTES - first.len()).min(b.len());
                        first.extend_from_slice(&b[..take]);
                        if first.len() == DETECT_BYTES {
                            whole = true;
                            break;
                        }
                    }
                    Held::Gap(..) => {
                        whole = true;
                        break;
                    }
                }
            }
            if let Some(found) = sides
                .iter()
                .find_map(|&(side, role)| protocol::detect(side, &first).map(|p| (p, role)))
            {
                detected = Some(found);
                break;
            }
        }
        if whole && c.detect_from[d] == start {
            c.detect_from[d] = start + 1;
        }
    }
    let Some((p, role)) = detected else {
        // Both ends spoke and neither looks like a known protocol, or too much waited.
        let [egress, ingress] = c.held_bytes;
        let pieces = c.held[0].len() + c.held[1].len();
        if egress.min(ingress) >= DETECT_BYTES
            || egress + ingress >= HELD_LIMIT
            || pieces >= HELD_RECORDS
        {
            c.unknown = true;
            c.take_held();
        }
        return;
    };
    c.role = role;
    let mut parser = protocol::new_parser(p, cfg);
    if c.midstream {
        parser.watched_midstream();
    }
    // Replay what was held, in order of arrival; the parser skips what it cannot frame.
    let mut held: Vec<(u64, usize, Held)> = Vec::new();
    for (hd, items) in c.take_held().into_iter().enumerate() {
        for h in items {
            held.push((h.ts(), hd, h));
        }
    }
    held.sort_by_key(|(t, _, _)| *t);
    for (t, hd, h) in held {
        match h {
            Held::Bytes(_, b) => parser.feed(side_of(role, hd), &b, t, ops),
            Held::Gap(_, n) => parser.gap(side_of(role, hd), n, t, ops),
        }
    }
    c.parser = Some(parser);
}

/// What was captured of one direction before its connection's protocol was known.
enum Held {
    Bytes(u64, Vec<u8>),
    /// Bytes not captured.
    Gap(u64, u64),
}

impl Held {
    fn ts(&self) -> u64 {
        match self {
            Held::Bytes(t, _) | Held::Gap(t, _) => *t,
        }
    }
}

/// The protocol side of a direction: egress is the client's when we are the client.
fn side_of(role: Role, dir_idx: usize) -> Side {
    match (role, dir_idx) {
        (Role::Server, 0) | (Role::Client | Role::Unknown, 1) => Side::Server,
        _ => Side::Client,
    }
}

fn split_host_port(h: &str, default: u16) -> (String, u16) {
    if let Some(rest) = h.strip_prefix('[') {
        // [v6]:port
        if let Some((ip, port)) = rest.split_once(']') {
            let port = port
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .unwrap_or(default);
            return (ip.to_string(), port);
        }
    }
    match h.rsplit_once(':') {
        Some((name, port)) if port.parse::<u16>().is_ok() => {
            (name.to_string(), port.parse().unwrap_or(default))
        }
        _ => (h.to_string(), default),
    }
}

fn format_authority(name: &str, port: u16, default: u16) -> String {
    let name = if name.contains(':') {
        format!("[{name}]")
    } else {
        name.to_string()
    };
    if port == default {
        name
    } else {
        format!("{name}:{port}")
    }
}

fn content_type(headers: &Option<Vec<(String, String)>>) -> Option<&str> {
    headers.as_deref().and_then(|h| header(h, "content-type"))
}

/// Request bodies: UTF-8 with invalid bytes dropped, as the SDK decodes them (and any
/// U+FFFD the body held, as the SDK's decoding does). A valid body is kept, not copied.
fn text(b: Vec<u8>) -> String {
    match String::from_utf8(b) {
        Ok(s) if !s.contains('\u{FFFD}') => s,
        Ok(s) => s.replace('\u{FFFD}', ""),
        Err(e) => String::from_utf8_lossy(e.as_bytes()).replace('\u{FFFD}', ""),
    }
}

/// A content type's media type (`application/json; charset=utf-8` → `application/json`),
/// still in the case it was sent.
fn media_type(ct: &str) -> &str {
    ct.split(';').next().unwrap_or("").trim()
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// gRPC with a binary codec (protobuf, the default): `application/grpc` or
/// `application/grpc+proto`; `+json` bodies are text and are redacted as JSON.
fn binary_grpc(headers: &Option<Vec<(String, String)>>) -> bool {
    content_type(headers).is_some_and(|ct| {
        let ct = media_type(ct).as_bytes();
        ct.eq_ignore_ascii_case(b"application/grpc")
            || ct.len() >= 17
                && ct[..17].eq_ignore_ascii_case(b"application/grpc+")
                && !ct[ct.len() - 4..].eq_ignore_ascii_case(b"json")
    })
}

/// gRPC messages as sent (each a 5-byte prefix, then the message), base64: protobuf is
/// binary, and text would drop its bytes. Body redaction rules do not apply to it.
fn grpc_body(b: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "base64:{}",
        base64::engine::general_purpose::STANDARD.encode(b)
    )
}

/// Media type prefixes of the response bodies the SDK keeps.
const TEXT_TYPES: [&str; 5] = [
    "text/",
    "application/json",
    "application/xml",
    "application/javascript",
    "application/x-www-form-urlencoded",
];

/// The SDK keeps response bodies only for text content types (or none); a
/// content-coded body only once the parser has `decoded` it.
fn textual(headers: &[(String, String)], decoded: bool) -> bool {
    if !decoded
        && header(headers, "content-encoding").is_some_and(|e| !e.eq_ignore_ascii_case("identity"))
    {
        return false;
    }
    match header(headers, "content-type") {
        None => true,
        Some(ct) => {
            let ct = media_type(ct);
            TEXT_TYPES.iter().any(|p| starts_with_ignore_case(ct, p))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(conn: &str, dir: Direction, seq: u64, bytes: &[u8], ts: u64, tls: bool) -> Record {
        Record::Data {
            ts,
            pid: 10,
            tid: 11,
            fd: 3,
            conn: Some(conn.into()),
            peer: Some(Addr::Inet("127.0.0.1:8443".parse().unwrap())),
            tls,
            direction: dir,
            via: "write",
            seq,
            truncated: 0,
            data: bytes.to_vec(),
            attr: Attribution::default(),
            from_file: None,
            midstream: false,
        }
    }

    /// The record as sent in `activity`'s step (0: outside any activity).
    fn by(mut r: Record, activity: u64) -> Record {
        if let Record::Data { attr, .. } = &mut r {
            *attr = if activity == 0 {
                Attribution::default()
            } else {
                Attribution {
                    owner: 10,
                    activity,
                }
            };
        }
        r
    }

    /// Data records of one connection, in order: each direction's stream offsets follow
    /// its bytes, timestamps are 10, 20, 30 …
    fn pieces(conn: &str, tls: bool, parts: &[(Direction, &[u8])]) -> Vec<Record> {
        let mut seq = [0u64; 2];
        parts
            .iter()
            .enumerate()
            .map(|(i, (dir, bytes))| {
                let d = direction_idx(dir);
                let r = data(conn, dir.clone(), seq[d], bytes, 10 * (i as u64 + 1), tls);
                seq[d] += bytes.len() as u64;
                r
            })
            .collect()
    }

    /// A fresh builder fed `records`: its spans, and the builder for its counts.
    fn build(records: impl IntoIterator<Item = Record>) -> (SpanBuilder, Vec<Span>) {
        let mut b = SpanBuilder::new(SpanConfig::default(), Clock::new());
        let mut out = Vec::new();
        for r in records {
            b.handle(&r, &mut out);
        }
        (b, out)
    }

    use Direction::{Egress, Ingress};

    #[test]
    fn pooled_connection_operations_belong_to_whoever_sent_the_request() {
        // Keep-alive connection shared by two activities: activity 1 sends a request,
        // the event loop (no activity) reads the reply, activity 2 sends the next one,
        // and its reply is read in activity 1's step.
        let req1 = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n";
        let req2 = b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n";
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let parts = pieces(
            "c",
            false,
            &[
                (Egress, req1),
                (Ingress, resp),
                (Egress, req2),
                (Ingress, resp),
            ],
        );
        let activities = [1, 0, 2, 1];
        let (_, out) = build(
            std::iter::once(connect("c"))
                .chain(parts.into_iter().zip(activities).map(|(r, a)| by(r, a))),
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].attributes["http.target"], "/one");
        assert_eq!(out[0].attr.activity, 1);
        assert_eq!(out[1].attributes["http.target"], "/two");
        assert_eq!(out[1].attr.activity, 2);
    }

    #[test]
    fn request_sent_outside_any_activity_stays_unattributed() {
        let req = b"GET /bg HTTP/1.1\r\nHost: x\r\n\r\n";
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let parts = pieces("c", false, &[(Egress, req), (Ingress, resp)]);
        let (_, out) = build(
            std::iter::once(connect("c"))
                .chain(parts.into_iter().zip([0, 7]).map(|(r, a)| by(r, a))),
        );
        assert_eq!(out.len(), 1);
        assert!(!out[0].attr.is_some());
    }

    fn connect(conn: &str) -> Record {
        Record::Connect {
            ts: 1,
            accept: false,
            pid: 10,
            tid: 11,
            fd: 3,
            conn: conn.into(),
            peer: Some(Addr::Inet("127.0.0.1:8443".parse().unwrap())),
            local: None,
            attr: Attribution::default(),
        }
    }

    #[test]
    fn https_exchange_becomes_an_sdk_http_span() {
        let req = b"POST /v1/chat HTTP/1.1\r\nHost: api.local:8443\r\nAuthorization: Bearer sk-1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
        let resp = b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: 4\r\n\r\n[1 ]";
        let (_, out) = build(std::iter::once(connect("c1")).chain(pieces(
            "c1",
            true,
            &[(Egress, req), (Ingress, resp)],
        )));
        assert_eq!(out.len(), 1);
        let s = &out[0];
        assert_eq!(s.name, "POST");
        assert_eq!(s.kind, "CLIENT");
        assert_eq!(s.attributes["http.url"], "https://api.local:8443/v1/chat");
        assert_eq!(s.attributes["http.scheme"], "https");
        assert_eq!(s.attributes["net.peer.name"], "api.local");
        assert_eq!(s.attributes["net.peer.port"], 8443);
        assert_eq!(s.attributes["http.status_code"], 200);
        assert_eq!(
            s.request_headers.as_ref().unwrap()["authorization"],
            "[REDACTED]"
        );
        assert_eq!(s.request_body.as_deref(), Some("{}"));
        assert_eq!(s.response_body.as_deref(), Some("[1 ]"));
        assert_eq!(s.duration_ns, Some(10));
        assert_eq!(s.span_id.len(), 16);
        assert_eq!(s.trace_id.len(), 32);
        let json = serde_json::to_value(s).unwrap();
        assert_eq!(
            json["status"],
            serde_json::json!({"code": "UNSET", "description": null})
        );
        assert!(json.get("pid").is_none());
    }

    /// Feeds a recorded HTTP/2 session (`protocol/http2/*.rec`) as one connection.
    fn http2_spans(rec: &str, tls: bool) -> Vec<Span> {
        let mut b = SpanBuilder::new(SpanConfig::default(), Clock::new());
        let mut out = Vec::new();
        b.handle(&connect("h2"), &mut out);
        let mut seq = [0u64; 2];
        for (i, line) in rec.lines().enumerate() {
            let (side, hex) = line.split_once(' ').unwrap();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|j| u8::from_str_radix(&hex[j..j + 2], 16).unwrap())
                .collect();
            let (dir, d) = if side == "C" {
                (Direction::Egress, 0)
            } else {
                (Direction::Ingress, 1)
            };
            b.handle(
                &data("h2", dir, seq[d], &bytes, 10 + i as u64, tls),
                &mut out,
            );
            seq[d] += bytes.len() as u64;
        }
        b.finish(100, &mut out);
        assert!(b.unparsed.is_empty(), "{:?}", b.unparsed);
        out
    }

    #[test]
    fn http2_streams_become_the_same_http_spans_redacted() {
        let spans = http2_spans(include_str!("protocol/http2/rest.rec"), true);
        assert_eq!(spans.len(), 2);
        let s = &spans[0];
        assert_eq!(s.name, "POST");
        assert_eq!(s.kind, "CLIENT");
        assert_eq!(s.attributes["http.scheme"], "https");
        assert_eq!(s.attributes["http.host"], "api.example");
        assert_eq!(s.attributes["net.peer.name"], "api.example");
        assert_eq!(s.attributes["net.peer.port"], 443);
        assert_eq!(s.attributes["http.status_code"], 200);
        let redact = &SpanConfig::default().redact;
        assert_eq!(
            s.attributes["http.url"],
            redact.url("https://api.example/v1/chat?key=secret")
        );
        assert_ne!(
            s.attributes["http.url"],
            "https://api.example/v1/chat?key=secret"
        );
        assert_eq!(
            s.request_headers.as_ref().unwrap()["authorization"],
            "[REDACTED]"
        );
        assert_eq!(s.request_body.as_deref(), Some("{\"q\":\"hello\"}"));
        assert_eq!(s.response_body.as_deref(), Some("{\"a\":\"hi\"}"));
        // The attributes an HTTP/1.1 span has, and the version.
        let mut keys: Vec<&str> = s.attributes.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "http.flavor",
                "http.host",
                "http.method",
                "http.scheme",
                "http.status_code",
                "http.target",
                "http.url",
                "net.peer.name",
                "net.peer.port",
                "net.transport"
            ]
        );
        assert_eq!(spans[1].status.code, StatusCode::Error);
    }

    #[test]
    fn grpc_spans_carry_rpc_attributes_and_their_messages_in_base64() {
        let spans = http2_spans(include_str!("protocol/http2/grpc.rec"), false);
        assert_eq!(spans.len(), 3);
        let s = &spans[0];
        assert_eq!(s.name, "helloworld.Greeter/SayHello");
        assert_eq!(s.attributes["rpc.system"], "grpc");
        assert_eq!(s.attributes["rpc.grpc.status_code"], 0);
        assert_eq!(
            s.attributes["http.url"],
            "http://localhost:50051/helloworld.Greeter/SayHello"
        );
        use base64::Engine as _;
        let b64 = |b: &[u8]| {
            format!(
                "base64:{}",
                base64::engine::general_purpose::STANDARD.encode(b)
            )
        };
        assert_eq!(s.request_body, Some(b64(b"\0\0\0\0\x07\n\x05world")));
        assert_eq!(s.response_body, Some(b64(b"\0\0\0\0\x0d\n\x0bHello world")));
        assert_eq!(spans[2].status.code, StatusCode::Error);
    }

    #[test]
    fn binary_response_bodies_are_not_kept() {
        let h = vec![(
            "Content-Type".to_string(),
            "application/octet-stream".to_string(),
        )];
        assert!(!textual(&h, false));
        assert!(textual(&[], false));
        let gzip_text = [
            ("Content-Encoding".into(), "gzip".into()),
            ("Content-Type".into(), "text/plain".into()),
        ];
        assert!(!textual(&gzip_text, false));
        assert!(textual(&gzip_text, true));
    }

    #[test]
    fn file_bursts_coalesce_into_one_child_span() {
        let mut b = SpanBuilder::new(SpanConfig::default(), Clock::new());
        let mut out = Vec::new();
        b.handle(
            &Record::FileOpen {
                ts: 1,
                pid: 10,
                fd: 4,
                path: "/data/x".into(),
                mode: "r",
                attr: Attribution::default(),
            },
            &mut out,
        );
        for i in 0..2560 {
            b.handle(
                &Record::FileIo {
                    ts: 2 + i,
                    pid: 10,
                    fd: 4,
                    direction: Direction::Ingress,
                    bytes: 4096,
                    attr: Attribution::default(),
                },
                &mut out,
            );
        }
        b.handle(
            &Record::FileClose {
                ts: 9000,
                pid: 10,
                fd: 4,
                path: "/data/x".into(),
                mode: "r",
                bytes_read: 2560 * 4096,
                bytes_written: 0,
                reads: 2560,
                writes: 0,
            },
            &mut out,
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].name, "file.open");
        assert_eq!(out[0].attributes["file.total_bytes_read"], 2560 * 4096);
        assert_eq!(out[1].name, "file.read");
        assert_eq!(out[1].attributes["file.bytes"], 2560 * 4096);
        assert_eq!(
            out[1].parent_span_id.as_deref(),
            Some(out[0].span_id.as_str())
        );
    }

    #[test]
    fn a_connection_of_no_known_protocol_is_given_up_once() {
        let noise: &[u8] = &[0x42; 100];
        let (b, out) = build(std::iter::once(connect("c3")).chain(pieces(
            "c3",
            false,
            &[(Egress, noise), (Ingress, noise), (Egress, noise)],
        )));
        assert!(out.is_empty());
        assert_eq!(b.given_up, vec!["c3".to_string()]);
    }

    /// A stream of one-byte writes in one direction only (an AF_UNIX socketpair's end, a
    /// log pipe): neither end ever shows 64 bytes of a known protocol, and the other
    /// direction never speaks. Each held piece was a new place to look from, and each
    /// new piece made detection look again from every one of them: 20 000 one-byte
    /// writes took minutes of the agent's CPU, with the watched process held up behind
    /// it. Now the connection is given up once HELD_RECORDS pieces wait.
    #[test]
    fn a_stream_of_tiny_writes_of_no_known_protocol_is_given_up() {
        let one: &[u8] = b"x";
        let writes = vec![(Egress, one); 20_000];
        let (b, out) = build(std::iter::once(connect("c4")).chain(pieces("c4", false, &writes)));
        assert!(out.is_empty());
        assert_eq!(b.given_up, vec!["c4".to_string()]);
        let c = &b.conns["c4"];
        assert!(c.unknown && c.held.iter().all(|h| h.is_empty()));
    }

    /// Detection still finds the next request of a connection watched from its middle
    /// after a response tail that came in many one-byte pieces, the request in pieces too.
    #[test]
    fn a_request_after_a_tail_in_many_small_pieces_is_detected() {
        let one: &[u8] = b"x";
        let mut parts = vec![(Ingress, one); 1_000];
        let req = b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n";
        for chunk in req.chunks(3) {
            parts.push((Egress, chunk));
        }
        parts.push((Ingress, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"));
        let (b, out) = build(pieces("m2", false, &parts));
        assert!(b.given_up.is_empty());
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(out[0].attributes["http.target"], "/late");
        assert_eq!(out[0].attributes["http.status_code"], 200);
    }

    /// A pooled connection seen from its middle (no connect record): the tail of a
    /// response on its way, longer than detection looks at, then the next exchange.
    /// The connection is not given up, the tail is dropped and counted, the exchange is
    /// a span.
    #[test]
    fn a_connection_watched_mid_response_yields_its_next_exchange() {
        let tail = [b'x'; 300];
        // Offsets given by hand: 400 leaves a capture gap before the protocol is known,
        // which does not give it up either.
        let (b, out) = build([
            data("m1", Ingress, 0, &tail, 5, false),
            data("m1", Ingress, 400, &tail, 6, false),
            data(
                "m1",
                Egress,
                0,
                b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n",
                7,
                false,
            ),
            data(
                "m1",
                Ingress,
                700,
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                8,
                false,
            ),
        ]);
        assert!(b.given_up.is_empty());
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].attributes["http.status_code"], 200);
        assert_eq!(out[0].attributes["http.target"], "/next");
        assert_eq!(b.lost.get(&("http", "malformed")), Some(&1));
        assert_eq!(b.unparsed.get("http"), Some(&1));
    }

    /// A connection open before watching began (its records say `midstream`) whose
    /// first captured request lost its response without a gap (a libssl read function
    /// not probed yet): the next response is not paired with it, the two requests
    /// sent before that response are dropped and counted, and the next exchange pairs.
    /// The same records without `midstream` pair by order, one response off.
    #[test]
    fn a_midstream_connection_pairs_no_response_with_a_request_by_order_alone() {
        let resp = |id: &str| {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{id}",
                id.len()
            )
            .into_bytes()
        };
        let records = |midstream: bool| {
            let mut seq = [0u64; 2];
            let parts: [(Direction, Vec<u8>); 5] = [
                (Egress, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
                (Egress, b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
                (Ingress, resp("/b")),
                (Egress, b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
                (Ingress, resp("/c")),
            ];
            parts
                .into_iter()
                .enumerate()
                .map(|(i, (dir, bytes))| {
                    let d = direction_idx(&dir);
                    let mut r = data("m", dir, seq[d], &bytes, 10 * (i as u64 + 1), true);
                    seq[d] += bytes.len() as u64;
                    if let Record::Data { midstream: m, .. } = &mut r {
                        *m = midstream;
                    }
                    r
                })
                .collect::<Vec<_>>()
        };
        let (b, out) = build(records(true));
        let paired: Vec<(&str, Option<&str>)> = out
            .iter()
            .map(|s| {
                (
                    s.attributes["http.target"].as_str().unwrap(),
                    s.response_body.as_deref(),
                )
            })
            .collect();
        assert_eq!(paired, [("/c", Some("/c"))]);
        assert_eq!(b.lost.get(&("http", "unpaired")), Some(&2));
        let (_, out) = build(records(false));
        assert_eq!(out[0].attributes["http.target"], "/a");
        assert_eq!(out[0].response_body.as_deref(), Some("/b"));
    }

    #[test]
    fn protocol_is_detected_by_content_not_port() {
        let (_, out) = build(std::iter::once(connect("c2")).chain(pieces(
            "c2",
            false,
            &[
                (Egress, b"GET /x HTTP/1.1\r\nHost: h:9000\r\n\r\n"),
                (Ingress, b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"),
            ],
        )));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].attributes["http.url"], "http://h:9000/x");
        assert_eq!(out[0].status.code, StatusCode::Error);
    }

    /// Redaction reads the decoded text: a secret field inside a gzip'd JSON answer is
    /// `[REDACTED]` in the span's (decoded) response body.
    #[test]
    fn a_gzip_response_body_is_decoded_before_redaction() {
        use std::io::Write;
        let json = br#"{"api_key":"sk-live-1","ok":true}"#;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(json).unwrap();
        let coded = e.finish().unwrap();
        let resp = [
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
                coded.len()
            )
            .into_bytes(),
            coded,
        ]
        .concat();
        let req = b"GET /k HTTP/1.1\r\nHost: h\r\nAccept-Encoding: gzip\r\n\r\n";
        let (_, out) = build(std::iter::once(connect("c4")).chain(pieces(
            "c4",
            false,
            &[(Egress, req), (Ingress, &resp)],
        )));
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].response_body.as_deref(),
            Some(r#"{"api_key":"[REDACTED]","ok":true}"#)
        );
        assert_eq!(out[0].attributes["http.response.body.decoded"], "gzip");
    }

    #[test]
    fn spans_written_by_hand_are_the_json_serde_makes() {
        let req = b"POST /v1/chat?q=\"x\" HTTP/1.1\r\nHost: api.local:8443\r\nAuthorization: Bearer sk-1\r\nX-Note: tab\there \xc3\xa9\r\nX-Note: two\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"a\":\"\\u0001\"}";
        let resp = b"HTTP/1.1 503 Busy\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nline\n\"\x7f\"";
        let (_, mut spans) = build(std::iter::once(connect("c1")).chain(pieces(
            "c1",
            true,
            &[(Egress, req), (Ingress, resp)],
        )));
        spans.extend(http2_spans(include_str!("protocol/http2/grpc.rec"), false));
        let (_, files) = build([
            Record::FileOpen {
                ts: 1,
                pid: 10,
                fd: 4,
                path: "/data/\u{1}x \"y\"".into(),
                mode: "w",
                attr: Attribution::default(),
            },
            Record::FileIo {
                ts: 2,
                pid: 10,
                fd: 4,
                direction: Direction::Egress,
                bytes: 7,
                attr: Attribution::default(),
            },
            Record::FileClose {
                ts: 3,
                pid: 10,
                fd: 4,
                path: "/data/\u{1}x \"y\"".into(),
                mode: "w",
                bytes_read: 0,
                bytes_written: 7,
                reads: 0,
                writes: 1,
            },
        ]);
        spans.extend(files);
        // What only the daemon sets, and values of every JSON type.
        let mut extra = spans[0].clone();
        extra.activity_id = Some("act-1".into());
        extra.duration_ns = None;
        extra.status = Status {
            code: StatusCode::Error,
            description: Some("bad \"gateway\"".into()),
        };
        extra.events = vec![
            serde_json::json!({"name": "e", "attributes": {"n": 1.5, "b": true, "z": null, "l": [1, "x"]}}),
        ];
        extra.attributes.insert("f".into(), (-0.1f64).into());
        extra.attributes.insert("neg".into(), (-3i64).into());
        extra.request_headers = Some(Map::new());
        spans.push(extra);
        assert!(spans.len() >= 5, "{spans:#?}");
        for s in &spans {
            let mut mine = Vec::new();
            s.write_json(&mut mine);
            let serde = serde_json::to_vec(s).unwrap();
            assert_eq!(
                String::from_utf8(mine).unwrap(),
                String::from_utf8(serde).unwrap()
            );
        }
    }

    #[test]
    fn body_text_is_the_lossy_decoding_without_replacement_characters() {
        for b in [
            &b"{\"a\":1}"[..],
            b"",
            b"caf\xc3\xa9",
            b"bad \xff byte",
            b"kept \xef\xbf\xbd replacement",
            b"\xef\xbf\xbd\xff",
            b"cut \xc3",
        ] {
            assert_eq!(
                text(b.to_vec()),
                String::from_utf8_lossy(b).replace('\u{FFFD}', ""),
                "{b:?}"
            );
        }
    }

    #[test]
    fn content_types_are_matched_as_their_lowercase_media_type() {
        let lower = |ct: &str| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        };
        for ct in [
            "application/grpc",
            "Application/GRPC",
            "application/grpc+proto",
            "application/grpc+",
            "application/grpc+json",
            "application/GRPC+JSON; charset=utf-8",
            "application/grpc-web",
            "application/grp",
            " text/plain ; q=1",
            "TEXT/HTML",
            "application/json",
            "Application/Json; charset=utf-8",
            "application/x-www-form-urlencoded",
            "application/octet-stream",
            "image/png",
            "",
            "t\u{e9}xt/plain",
        ] {
            let old = lower(ct);
            let grpc = old == "application/grpc"
                || old.starts_with("application/grpc+") && !old.ends_with("json");
            let headers = Some(vec![("Content-Type".to_string(), ct.to_string())]);
            assert_eq!(binary_grpc(&headers), grpc, "{ct:?}");
            let text = TEXT_TYPES.iter().any(|p| old.starts_with(p));
            assert_eq!(textual(headers.as_deref().unwrap(), false), text, "{ct:?}");
        }
    }

    #[test]
    fn strings_needing_no_escape_are_found_eight_bytes_at_a_time() {
        let special = [
            b'"', b'\\', 0x00, 0x1f, 0x20, 0x21, 0x7f, 0x80, 0xff, b'[', b']',
        ];
        for len in 0..20 {
            for at in 0..len {
                for &c in &special {
                    let mut b = vec![b'a'; len];
                    b[at] = c;
                    let naive = b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
                    assert_eq!(needs_escape(&b), naive, "{b:?}");
                }
            }
        }
    }

    #[test]
    fn span_ids_are_sixteen_hex_digits() {
        let mut ids = Ids(7);
        for _ in 0..100 {
            let mut copy = Ids(ids.0);
            assert_eq!(ids.span_id(), format!("{:016x}", copy.next()));
        }
    }
}
