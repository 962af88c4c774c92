//! Redis RESP2/RESP3 parser.
//!
//! The client sends commands as RESP arrays of bulk strings (or, from telnet-like tools,
//! inline lines); the server answers each command with exactly one reply, in order, so
//! requests pair with replies FIFO. Exceptions handled here: RESP3 `>` pushes and RESP2
//! pub/sub `message` arrays are out-of-band (no request), `|` attributes precede a reply
//! without being one, and (UN)SUBSCRIBE gets one acknowledgement per channel.
//!
//! Replies are never buffered whole: a streaming reader walks the RESP grammar keeping
//! only a stack of aggregate counts (bounded depth) and the few leading bytes of each
//! scalar that an op needs, so a 500 MB bulk string costs no memory.

use std::collections::VecDeque;

use super::{truncate_statement, Op, Parser, ParserConfig, Protocol, Side, StatusCode};

/// Most nested aggregates we follow; deeper is treated as malformed.
const MAX_DEPTH: usize = 32;
/// Most commands waiting for their reply; more are counted, not kept (see `Pending::Skip`).
const MAX_PENDING: usize = 4096;
/// The OTel redis instrumentation cuts each argument at 100 characters, marking it `...`.
const ARG_CHARS: usize = 100;
/// Bytes of an argument kept: 100 characters are at most 400 bytes of UTF-8.
const ARG_KEEP: usize = 4 * ARG_CHARS + 4;
/// Bytes of a reply scalar kept (error messages, `+OK`, pub/sub kinds).
const REPLY_KEEP: usize = 4096;
/// A type line such as `*3` or `$1048576` is short; a longer one is not RESP.
const HEADER_MAX: usize = 24;
/// Redis refuses bulk strings above 512 MB (`proto-max-bulk-len`); allow some slack.
const MAX_BULK: i64 = 1 << 32;
/// Leading elements of a reply aggregate we look at (pub/sub kind, channel, count).
const REPLY_ITEMS: usize = 3;

/// Command words accepted at the start of an inline command (`PING\r\n`).
const INLINE_WORDS: &[&str] = &[
    "PING",
    "HELLO",
    "AUTH",
    "SELECT",
    "GET",
    "SET",
    "DEL",
    "EXISTS",
    "INCR",
    "DECR",
    "EXPIRE",
    "TTL",
    "KEYS",
    "SCAN",
    "MGET",
    "MSET",
    "HGET",
    "HSET",
    "HGETALL",
    "LPUSH",
    "RPUSH",
    "LPOP",
    "RPOP",
    "LRANGE",
    "SADD",
    "SMEMBERS",
    "ZADD",
    "ZRANGE",
    "INFO",
    "QUIT",
    "CLIENT",
    "CONFIG",
    "FLUSHDB",
    "FLUSHALL",
    "DBSIZE",
    "SUBSCRIBE",
    "PUBLISH",
    "MULTI",
    "EXEC",
    "ECHO",
    "COMMAND",
    "MONITOR",
    "TYPE",
];

/// Whether these first bytes can start this protocol: a RESP array header followed by a
/// bulk string (`*<digits>\r\n$`), or a complete inline line starting with a known
/// command word. The inline form requires the whole line so that a partial HTTP request
/// line (`GET /…`) is not mistaken for Redis.
pub fn looks_like_command(first: &[u8]) -> bool {
    if let Some(rest) = first.strip_prefix(b"*") {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        return (1..=7).contains(&digits) && rest.get(digits..digits + 3) == Some(&b"\r\n$"[..]);
    }
    let Some(nl) = first.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let line = first.get(..nl).unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.windows(5).any(|w| w == b"HTTP/") {
        return false;
    }
    let word_len = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let word = line.get(..word_len).unwrap_or_default();
    INLINE_WORDS
        .iter()
        .any(|w| w.as_bytes().eq_ignore_ascii_case(word))
}

// ---------------------------------------------------------------------------------------
// Streaming RESP reader
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    /// Expecting the type byte of a value.
    Type,
    /// Reading the rest of a line that began with type byte `.0`.
    Line(u8),
    /// Reading a bulk payload of type `.0`; `.1` counts payload bytes plus the CRLF.
    Bulk(u8, u64),
    /// Client only: an inline command line.
    Inline,
}

#[derive(Clone, Copy, Debug)]
struct Frame {
    ty: u8,
    /// Elements still to come (maps and attributes count keys and values).
    left: u64,
    /// RESP3 `|` attribute: metadata before a value, not itself an element.
    attr: bool,
}

/// What the reader found. Scalar bytes (at most `keep`) are in `Reader::scalar`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// All input consumed, value incomplete.
    More,
    /// A direct element of the top-level aggregate completed. `scalar` is false for a
    /// nested aggregate; `len` is the scalar's full length.
    Child { ty: u8, scalar: bool, len: u64 },
    /// The top-level value completed; for a scalar its bytes are in `scalar`. Nulls
    /// (`$-1`, `*-1`, `_`) come as type `_`.
    End { ty: u8, scalar: bool, len: u64 },
    /// Client only: an inline command line (without CRLF) is in `scalar`.
    Inline { len: u64 },
    /// Not RESP.
    Bad,
}

struct Reader {
    client: bool,
    st: St,
    keep: usize,
    inline_max: usize,
    /// Header line being read (kept ≤ `HEADER_MAX`, else bad) or, for simple types, the
    /// kept prefix of the line.
    line: Vec<u8>,
    line_len: u64,
    /// Kept bytes of the last scalar.
    scalar: Vec<u8>,
    scalar_len: u64,
    /// Bytes of the current bulk payload were lost: keep nothing more of it, as later
    /// bytes would not follow the kept ones.
    lost: bool,
    stack: Vec<Frame>,
    /// A top-level `End` owed after the `Child` just returned.
    end_owed: Option<u8>,
    /// Some byte of the current top-level value was seen; `start_ts` is its piece's ts.
    in_msg: bool,
    start_ts: u64,
}

fn is_scalar_line(ty: u8) -> bool {
    matches!(ty, b'+' | b'-' | b':' | b',' | b'(' | b'#' | b'_')
}
fn is_bulk(ty: u8) -> bool {
    matches!(ty, b'$' | b'!' | b'=')
}
fn is_aggregate(ty: u8) -> bool {
    matches!(ty, b'*' | b'%' | b'~' | b'>' | b'|')
}

fn parse_int(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

impl Reader {
    fn new(client: bool, keep: usize, inline_max: usize) -> Self {
        Self {
            client,
            st: St::Type,
            keep,
            inline_max,
            line: Vec::new(),
            line_len: 0,
            scalar: Vec::new(),
            scalar_len: 0,
            lost: false,
            stack: Vec::new(),
            end_owed: None,
            in_msg: false,
            start_ts: 0,
        }
    }

    /// Inside a value (for `close()` accounting).
    fn mid_value(&self) -> bool {
        self.in_msg
    }

    /// `n` bytes were lost. Only a bulk payload has a known length to skip; anything else
    /// leaves the reader lost in the stream (returns false).
    fn skip(&mut self, n: u64) -> bool {
        if let St::Bulk(ty, left) = self.st {
            if n <= left {
                self.st = St::Bulk(ty, left - n);
                // The kept prefix stays shorter than `scalar_len`: the argument shows as cut.
                self.lost = true;
                return true;
            }
        }
        false
    }

    fn step(&mut self, data: &[u8], pos: &mut usize, ts: u64) -> Step {
        if let Some(ty) = self.end_owed.take() {
            return self.end(ty, false, 0);
        }
        loop {
            match self.st {
                St::Type => {
                    let Some(&b) = data.get(*pos) else {
                        return Step::More;
                    };
                    *pos += 1;
                    if !self.in_msg {
                        self.in_msg = true;
                        self.start_ts = ts;
                    }
                    if self.client {
                        // Redis reads a client line not starting with `*` as an inline
                        // command; inside a command only bulk strings are allowed.
                        if self.stack.is_empty() && b != b'*' {
                            if b == b'\n' {
                                // Empty inline line: Redis ignores it, no reply.
                                self.in_msg = false;
                                continue;
                            }
                            self.scalar.clear();
                            self.scalar.push(b);
                            self.scalar_len = 1;
                            self.st = St::Inline;
                            continue;
                        }
                        if !self.stack.is_empty() && b != b'$' {
                            return Step::Bad;
                        }
                    }
                    if is_scalar_line(b) || is_bulk(b) || is_aggregate(b) {
                        self.line.clear();
                        self.line_len = 0;
                        self.st = St::Line(b);
                    } else {
                        return Step::Bad;
                    }
                }
                St::Line(ty) => {
                    let rest = data.get(*pos..).unwrap_or_default();
                    let nl = rest.iter().position(|&b| b == b'\n');
                    let chunk = rest.get(..nl.unwrap_or(rest.len())).unwrap_or_default();
                    let cap = if is_scalar_line(ty) {
                        self.keep
                    } else {
                        HEADER_MAX
                    };
                    let room = cap.saturating_sub(self.line.len());
                    self.line
                        .extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or_default());
                    self.line_len = self.line_len.saturating_add(chunk.len() as u64);
                    if !is_scalar_line(ty) && self.line_len > HEADER_MAX as u64 {
                        return Step::Bad;
                    }
                    let Some(nl) = nl else {
                        *pos = data.len();
                        return Step::More;
                    };
                    *pos += nl + 1;
                    // RESP lines end in CRLF; the CR is part of what we read.
                    if self.line_len as usize == self.line.len() && self.line.last() == Some(&b'\r')
                    {
                        self.line.pop();
                    }
                    self.line_len = self.line_len.saturating_sub(1);
                    self.st = St::Type;
                    if let Some(step) = self.finish_line(ty) {
                        return step;
                    }
                }
                St::Bulk(ty, left) => {
                    if left == 0 {
                        self.st = St::Type;
                        let len = self.scalar_len;
                        if let Some(step) = self.value_done(ty, true, len) {
                            return step;
                        }
                    } else if left > 2 {
                        let rest = data.get(*pos..).unwrap_or_default();
                        if rest.is_empty() {
                            return Step::More;
                        }
                        let take = rest
                            .len()
                            .min(usize::try_from(left - 2).unwrap_or(usize::MAX));
                        let room = if self.lost {
                            0
                        } else {
                            self.keep.saturating_sub(self.scalar.len()).min(take)
                        };
                        self.scalar
                            .extend_from_slice(rest.get(..room).unwrap_or_default());
                        *pos += take;
                        self.st = St::Bulk(ty, left - take as u64);
                    } else {
                        let Some(&b) = data.get(*pos) else {
                            return Step::More;
                        };
                        let want = if left == 2 { b'\r' } else { b'\n' };
                        if b != want {
                            return Step::Bad;
                        }
                        *pos += 1;
                        self.st = St::Bulk(ty, left - 1);
                    }
                }
                St::Inline => {
                    let rest = data.get(*pos..).unwrap_or_default();
                    let nl = rest.iter().position(|&b| b == b'\n');
                    let chunk = rest.get(..nl.unwrap_or(rest.len())).unwrap_or_default();
                    let room = self
                        .inline_max
                        .saturating_sub(self.scalar.len())
                        .min(chunk.len());
                    self.scalar
                        .extend_from_slice(chunk.get(..room).unwrap_or_default());
                    self.scalar_len = self.scalar_len.saturating_add(chunk.len() as u64);
                    let Some(nl) = nl else {
                        *pos = data.len();
                        return Step::More;
                    };
                    *pos += nl + 1;
                    // A line longer than the buffer keeps its prefix and reports its
                    // full length, so the cut shows; otherwise drop the CR of the CRLF.
                    if self.scalar_len == self.scalar.len() as u64
                        && self.scalar.last() == Some(&b'\r')
                    {
                        self.scalar.pop();
                        self.scalar_len -= 1;
                    }
                    self.st = St::Type;
                    self.in_msg = false;
                    return Step::Inline {
                        len: self.scalar_len,
                    };
                }
            }
        }
    }

    /// A type line is complete. Returns a step to report, or None to keep reading.
    fn finish_line(&mut self, ty: u8) -> Option<Step> {
        if is_scalar_line(ty) {
            std::mem::swap(&mut self.scalar, &mut self.line);
            self.scalar_len = self.line_len;
            if ty == b'#' && !matches!(self.scalar.as_slice(), b"t" | b"f") {
                return Some(Step::Bad);
            }
            return self.value_done(ty, true, self.scalar_len);
        }
        let Some(n) = parse_int(&self.line) else {
            return Some(Step::Bad);
        };
        if n == -1 && matches!(ty, b'$' | b'*') {
            // RESP2 null bulk string / null array.
            self.scalar.clear();
            self.scalar_len = 0;
            return self.value_done(b'_', true, 0);
        }
        if is_bulk(ty) {
            if !(0..=MAX_BULK).contains(&n) {
                return Some(Step::Bad);
            }
            self.scalar.clear();
            self.scalar_len = n as u64;
            self.lost = false;
            self.st = St::Bulk(ty, n as u64 + 2);
            return None;
        }
        // Aggregate. Maps and attributes hold key/value pairs: twice as many values.
        let Ok(n) = u64::try_from(n) else {
            return Some(Step::Bad);
        };
        let Some(count) = n.checked_mul(if matches!(ty, b'%' | b'|') { 2 } else { 1 }) else {
            return Some(Step::Bad);
        };
        if self.client && self.stack.is_empty() && count == 0 {
            // `*0`: Redis ignores an empty command without replying.
            self.in_msg = false;
            return None;
        }
        if count == 0 {
            return self.value_done(ty, false, 0);
        }
        if self.stack.len() >= MAX_DEPTH {
            return Some(Step::Bad);
        }
        self.stack.push(Frame {
            ty,
            left: count,
            attr: ty == b'|',
        });
        None
    }

    /// A value of type `ty` completed (a scalar, or an empty aggregate).
    fn value_done(&mut self, ty: u8, scalar: bool, len: u64) -> Option<Step> {
        if self.stack.is_empty() {
            if ty == b'|' {
                // An empty top-level attribute: the reply still follows.
                return None;
            }
            return Some(self.end(ty, scalar, len));
        }
        let mut child = match self.stack.as_slice() {
            [f] if !f.attr => Some(Step::Child { ty, scalar, len }),
            _ => None,
        };
        while let Some(f) = self.stack.last_mut() {
            f.left = f.left.saturating_sub(1);
            if f.left > 0 {
                break;
            }
            let Some(done) = self.stack.pop() else { break };
            if self.stack.is_empty() {
                // The top-level aggregate completed, unless it was an attribute, which
                // only precedes the real reply (RESP3 spec: "attribute type").
                if !done.attr {
                    self.end_owed = Some(done.ty);
                }
                break;
            }
            if done.attr {
                // A nested attribute is not an element of its parent.
                break;
            }
            if let [f] = self.stack.as_slice() {
                if !f.attr {
                    child = Some(Step::Child {
                        ty: done.ty,
                        scalar: false,
                        len: 0,
                    });
                }
            }
        }
        if let Some(c) = child {
            return Some(c);
        }
        self.end_owed.take().map(|ty| self.end(ty, false, 0))
    }

    fn end(&mut self, ty: u8, scalar: bool, len: u64) -> Step {
        self.in_msg = false;
        Step::End { ty, scalar, len }
    }
}

// ---------------------------------------------------------------------------------------
// Pairing
// ---------------------------------------------------------------------------------------

/// A pub/sub command: its acknowledgements come one per channel.
#[derive(Clone, Debug)]
struct Sub {
    /// Kind word of the acknowledgement (`subscribe`, `punsubscribe` …).
    ack: &'static str,
    /// Acks still expected; None: UNSUBSCRIBE without channels (until the count is 0).
    left: Option<u64>,
    acks: u64,
}

#[derive(Clone, Debug)]
struct Cmd {
    name: String,
    statement: String,
    argc: u64,
    db: i64,
    start_ts: u64,
    end_ts: u64,
    /// `SELECT n`: the index to switch to once the reply is `+OK`.
    select: Option<i64>,
    sub: Option<Sub>,
}

#[derive(Clone, Debug)]
enum Pending {
    Cmd(Box<Cmd>),
    /// Commands that did not fit the queue: their replies are consumed unseen, so that
    /// later commands still pair with the right replies.
    Skip(u64),
}

/// A client command being read.
#[derive(Default)]
struct Building {
    name: String,
    argc: u64,
    statement: String,
    chars: usize,
    arg1: Vec<u8>,
    /// Arguments still to hide (credentials of AUTH / HELLO … AUTH).
    redact: u64,
}

impl Building {
    fn add_arg(&mut self, arg: &[u8], len: u64, max_statement: usize) {
        let index = self.argc;
        self.argc += 1;
        if index == 0 {
            let name = String::from_utf8_lossy(arg.get(..64).unwrap_or(arg));
            self.name = name.to_ascii_uppercase();
            if self.name == "AUTH" {
                self.redact = u64::MAX;
            }
        } else if index == 1 {
            self.arg1 = arg.to_vec();
        }
        let text = if index > 0 && self.redact > 0 {
            self.redact -= 1;
            "?".to_string()
        } else {
            if self.name == "HELLO" && index >= 2 && arg.eq_ignore_ascii_case(b"AUTH") {
                // `HELLO 3 AUTH <user> <password>`
                self.redact = 2;
            }
            render_arg(arg, len)
        };
        // Stop collecting once over the limit; `truncate_statement` marks the cut.
        if self.chars > max_statement {
            return;
        }
        if index > 0 {
            self.statement.push(' ');
            self.chars += 1;
        }
        self.chars += text.chars().count();
        self.statement.push_str(&text);
    }
}

/// One argument as the OTel redis instrumentation shows it: at most 100 characters, then
/// `...`; bytes that are not UTF-8 are rendered lossily.
fn render_arg(arg: &[u8], len: u64) -> String {
    let s = String::from_utf8_lossy(arg);
    match s.char_indices().nth(ARG_CHARS) {
        Some((i, _)) => format!("{}...", s.get(..i).unwrap_or_default()),
        None if (arg.len() as u64) < len => format!("{s}..."),
        None => s.into_owned(),
    }
}

#[derive(Clone, Debug)]
enum Item {
    Str(Vec<u8>),
    Int(i64),
    Other,
}

fn ack_kind(word: &[u8]) -> Option<&'static str> {
    [
        "subscribe",
        "psubscribe",
        "ssubscribe",
        "unsubscribe",
        "punsubscribe",
        "sunsubscribe",
    ]
    .into_iter()
    .find(|k| k.as_bytes().eq_ignore_ascii_case(word))
}

pub struct RedisParser {
    cfg: ParserConfig,
    unparsed: u64,
    client: Reader,
    server: Reader,
    client_dead: bool,
    server_dead: bool,
    building: Building,
    pending: VecDeque<Pending>,
    /// Leading elements of the reply being read.
    items: Vec<Item>,
    /// Database index for commands sent from now on (`SELECT` moves it).
    db: i64,
    /// RESP2 subscribe mode: arrays `message`/`pmessage`/`smessage` are pushes.
    sub_mode: bool,
    /// After MONITOR, the server streams `+<timestamp> …` lines that answer nothing.
    monitor: bool,
}

impl RedisParser {
    pub fn new(cfg: ParserConfig) -> Self {
        let inline_max = cfg.max_buffer.max(64);
        Self {
            client: Reader::new(true, ARG_KEEP, inline_max),
            server: Reader::new(false, REPLY_KEEP, 0),
            cfg,
            unparsed: 0,
            client_dead: false,
            server_dead: false,
            building: Building::default(),
            pending: VecDeque::new(),
            items: Vec::new(),
            db: 0,
            sub_mode: false,
            monitor: false,
        }
    }

    fn drive(&mut self, side: Side, data: &[u8], ts: u64, out: &mut Vec<Op>) {
        let mut pos = 0;
        loop {
            match side {
                Side::Client => {
                    if self.client_dead {
                        return;
                    }
                    match self.client.step(data, &mut pos, ts) {
                        Step::More => return,
                        Step::Bad => return self.give_up(Side::Client, ts, out),
                        Step::Child { len, .. } => {
                            let arg = std::mem::take(&mut self.client.scalar);
                            self.building.add_arg(&arg, len, self.cfg.max_statement);
                            self.client.scalar = arg;
                        }
                        Step::End { ty, scalar, .. } => {
                            if ty == b'_' {
                                // `*-1`: no command, no reply.
                                continue;
                            }
                            if scalar || ty != b'*' {
                                // Only an array can be a command (the reader allows no other).
                                return self.give_up(Side::Client, ts, out);
                            }
                            self.command_done(ts, out);
                        }
                        Step::Inline { len } => {
                            let line = std::mem::take(&mut self.client.scalar);
                            let over = (line.len() as u64) < len;
                            let mut words = line
                                .split(|b| b.is_ascii_whitespace())
                                .filter(|w| !w.is_empty())
                                .peekable();
                            if words.peek().is_none() {
                                // Blank line: Redis ignores it.
                                self.client.scalar = line;
                                continue;
                            }
                            while let Some(w) = words.next() {
                                // A line cut at the buffer limit cuts its last word.
                                let wlen = if over && words.peek().is_none() {
                                    u64::MAX
                                } else {
                                    w.len() as u64
                                };
                                self.building.add_arg(w, wlen, self.cfg.max_statement);
                            }
                            self.client.scalar = line;
                            self.command_done(ts, out);
                        }
                    }
                }
                Side::Server => {
                    if self.server_dead {
                        return;
                    }
                    match self.server.step(data, &mut pos, ts) {
                        Step::More => return,
                        Step::Bad => return self.give_up(Side::Server, ts, out),
                        Step::Child { scalar, .. } => {
                            if self.items.len() < REPLY_ITEMS {
                                let s = &self.server.scalar;
                                let item = if !scalar {
                                    Item::Other
                                } else if let Some(n) = parse_int(s) {
                                    Item::Int(n)
                                } else {
                                    Item::Str(s.get(..64).unwrap_or(s).to_vec())
                                };
                                self.items.push(item);
                            }
                        }
                        Step::End { ty, scalar, .. } => self.reply_done(ty, scalar, ts, out),
                        Step::Inline { .. } => return self.give_up(Side::Server, ts, out),
                    }
                }
            }
        }
    }

    fn command_done(&mut self, ts: u64, out: &mut Vec<Op>) {
        let b = std::mem::take(&mut self.building);
        let arg1 = || parse_int(&b.arg1);
        let channels = b.argc.saturating_sub(1);
        let sub = match b.name.as_str() {
            "SUBSCRIBE" | "PSUBSCRIBE" | "SSUBSCRIBE" if channels > 0 => Some(Sub {
                ack: ack_kind(b.name.as_bytes()).unwrap_or("subscribe"),
                left: Some(channels),
                acks: 0,
            }),
            "UNSUBSCRIBE" | "PUNSUBSCRIBE" | "SUNSUBSCRIBE" => Some(Sub {
                ack: ack_kind(b.name.as_bytes()).unwrap_or("unsubscribe"),
                left: (channels > 0).then_some(channels),
                acks: 0,
            }),
            _ => None,
        };
        let cmd = Cmd {
            select: if b.name == "SELECT" { arg1() } else { None },
            statement: truncate_statement(&b.statement, self.cfg.max_statement),
            name: b.name,
            argc: b.argc,
            db: self.db,
            start_ts: self.client.start_ts,
            end_ts: ts,
            sub,
        };
        if self.server_dead {
            // Replies can no longer be read: report the command without one.
            out.push(build_op(&cmd, None));
            return;
        }
        if self.pending.len() >= MAX_PENDING - 1 {
            // Keep FIFO pairing exact: remember how many replies to pass over.
            self.unparsed += 1;
            match self.pending.back_mut() {
                Some(Pending::Skip(n)) => *n += 1,
                _ => self.pending.push_back(Pending::Skip(1)),
            }
            return;
        }
        self.pending.push_back(Pending::Cmd(Box::new(cmd)));
    }

    fn reply_done(&mut self, ty: u8, scalar: bool, ts: u64, out: &mut Vec<Op>) {
        let items = std::mem::take(&mut self.items);
        let kind = match items.first() {
            Some(Item::Str(s)) if !scalar => s.as_slice(),
            _ => &[],
        };
        let count = match items.get(2) {
            Some(Item::Int(n)) => Some(*n),
            _ => None,
        };
        if ty == b'>' {
            // RESP3 push: out-of-band. Only (un)subscribe acknowledgements answer a command.
            if let Some(k) = ack_kind(kind) {
                self.ack(k, count, ts, out);
            }
            return;
        }
        if ty == b'*' && !scalar {
            if let Some(k) = ack_kind(kind) {
                if self.sub_mode || self.head_is_sub() {
                    self.ack(k, count, ts, out);
                    // RESP2: the connection stays in subscribe mode while the count is > 0.
                    if let Some(c) = count {
                        self.sub_mode = c > 0;
                    }
                    return;
                }
            }
            if self.sub_mode
                && [&b"message"[..], b"pmessage", b"smessage"]
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(kind))
            {
                return;
            }
        }
        let text = if scalar && matches!(ty, b'+' | b'-' | b'!') {
            String::from_utf8_lossy(&self.server.scalar).into_owned()
        } else {
            String::new()
        };
        if self.monitor && ty == b'+' && text.starts_with(|c: char| c.is_ascii_digit()) {
            return;
        }
        self.finish_acked_sub(out);
        let Some(head) = self.pending.pop_front() else {
            if !self.client_dead {
                // A reply to nothing we saw: out of sync.
                self.unparsed += 1;
            }
            return;
        };
        let mut cmd = match head {
            Pending::Cmd(c) => c,
            Pending::Skip(n) => {
                if n > 1 {
                    self.pending.push_front(Pending::Skip(n - 1));
                }
                return;
            }
        };
        cmd.end_ts = ts;
        let error = match ty {
            b'-' | b'!' => Some(text.clone()),
            _ => None,
        };
        if ty == b'+' {
            match (cmd.name.as_str(), text.as_str()) {
                ("SELECT", "OK") => {
                    if let Some(n) = cmd.select {
                        self.set_db(n);
                    }
                }
                ("RESET", "RESET") => {
                    self.set_db(0);
                    self.sub_mode = false;
                    self.monitor = false;
                }
                ("MONITOR", "OK") => self.monitor = true,
                _ => {}
            }
        }
        out.push(build_op(&cmd, error));
    }

    /// The database index changed: it applies to every command sent after the one that
    /// changed it, including those already queued behind it.
    fn set_db(&mut self, n: i64) {
        self.db = n;
        for p in &mut self.pending {
            if let Pending::Cmd(c) = p {
                c.db = n;
            }
        }
    }

    fn head_is_sub(&self) -> bool {
        matches!(self.pending.front(), Some(Pending::Cmd(c)) if c.sub.is_some())
    }

    /// A (un)subscribe acknowledgement of kind `k`, with the subscription count `count`.
    fn ack(&mut self, k: &'static str, count: Option<i64>, ts: u64, out: &mut Vec<Op>) {
        loop {
            let Some(Pending::Cmd(c)) = self.pending.front_mut() else {
                return;
            };
            let Some(sub) = c.sub.as_mut() else { return };
            if sub.ack == k {
                sub.acks += 1;
                c.end_ts = ts;
                let done = match sub.left.as_mut() {
                    Some(left) => {
                        *left = left.saturating_sub(1);
                        *left == 0
                    }
                    None => count.is_none_or(|n| n <= 0),
                };
                if done {
                    if let Some(Pending::Cmd(c)) = self.pending.pop_front() {
                        out.push(build_op(&c, None));
                    }
                }
                return;
            }
            if sub.acks == 0 {
                // Not ours (e.g. the server dropped a subscription on its own).
                return;
            }
            // A different kind while the head already had acks: the head is done.
            if let Some(Pending::Cmd(c)) = self.pending.pop_front() {
                out.push(build_op(&c, None));
            }
        }
    }

    /// UNSUBSCRIBE without channels gets one ack per subscription, a number we cannot
    /// always know; a reply of another kind means its acks are over.
    fn finish_acked_sub(&mut self, out: &mut Vec<Op>) {
        while let Some(Pending::Cmd(c)) = self.pending.front() {
            if c.sub.as_ref().is_none_or(|s| s.acks == 0) {
                return;
            }
            if let Some(Pending::Cmd(c)) = self.pending.pop_front() {
                out.push(build_op(&c, None));
            }
        }
    }

    /// This side's stream can no longer be followed (malformed, or bytes of unknown
    /// meaning lost). Counted once; the other side carries on where that stays correct.
    fn give_up(&mut self, side: Side, ts: u64, out: &mut Vec<Op>) {
        self.unparsed += 1;
        match side {
            Side::Client => {
                // Commands already queued still get their replies (FIFO), later ones are
                // unknown, so replies past the queue are dropped silently.
                self.client_dead = true;
                self.building = Building::default();
            }
            Side::Server => {
                // How many replies were lost is unknown: pairing is over. Report waiting
                // commands without a reply; later commands are reported as they come.
                self.server_dead = true;
                self.flush(ts, out);
            }
        }
    }

    fn flush(&mut self, ts: u64, out: &mut Vec<Op>) {
        for p in self.pending.drain(..) {
            if let Pending::Cmd(mut c) = p {
                c.end_ts = ts;
                out.push(build_op(&c, None));
            }
        }
    }
}

fn build_op(c: &Cmd, error: Option<String>) -> Op {
    let mut op = Op {
        name: c.name.clone(),
        start_ts: c.start_ts,
        end_ts: c.end_ts,
        ..Op::default()
    };
    op.attr("db.operation", c.name.clone());
    op.attr("db.statement", c.statement.clone());
    op.attr("db.redis.database_index", c.db);
    op.attr("db.redis.args_length", c.argc);
    if let Some(e) = error {
        op.status = StatusCode::Error;
        op.status_description = Some(e);
    }
    op
}

impl Parser for RedisParser {
    fn protocol(&self) -> Protocol {
        Protocol::Redis
    }

    fn feed(&mut self, side: Side, data: &[u8], ts: u64, out: &mut Vec<Op>) {
        self.drive(side, data, ts, out);
    }

    fn gap(&mut self, side: Side, n: u64, ts: u64, out: &mut Vec<Op>) {
        let (reader, dead) = match side {
            Side::Client => (&mut self.client, self.client_dead),
            Side::Server => (&mut self.server, self.server_dead),
        };
        if dead || n == 0 {
            return;
        }
        if reader.skip(n) {
            // Inside a bulk string of known length: skip, then finish it if the gap ended it.
            self.drive(side, &[], ts, out);
        } else {
            self.give_up(side, ts, out);
        }
    }

    fn close(&mut self, ts: u64, out: &mut Vec<Op>) {
        if (!self.client_dead && self.client.mid_value())
            || (!self.server_dead && self.server.mid_value())
        {
            // A message cut by the close.
            self.unparsed += 1;
        }
        self.flush(ts, out);
        self.client_dead = true;
        self.server_dead = true;
    }

    fn unparsed(&self) -> u64 {
        self.unparsed
    }
}

#[cfg(test)]
mod tests {
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
    #[test]
    fn recorded_redis_py_sessions_pair_correctly() {
        let pipeline: &[(Side, &[u8])] = &[
            (C, b"*4\r\n$6\r\nCLIENT\r\n$7\r\nSETINFO\r\n$8\r\nLIB-NAME\r\n$8\r\nredis-py\r\n"),
            (S, b"-ERR unknown subcommand 'SETINFO'. Try CLIENT HELP.\r\n"),
            (C, b"*4\r\n$6\r\nCLIENT\r\n$7\r\nSETINFO\r\n$7\r\nLIB-VER\r\n$5\r\n8.1.0\r\n"),
            (S, b"-ERR unknown subcommand 'SETINFO'. Try CLIENT HELP.\r\n"),
            (C, b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\n1\r\n*3\r\n$5\r\nLPUSH\r\n$1\r\na\r\n$1\r\nx\r\n*3\r\n$6\r\nINCRBY\r\n$1\r\na\r\n$1\r\n1\r\n*3\r\n$4\r\nMGET\r\n$1\r\na\r\n$1\r\nb\r\n"),
            (S, b"+OK\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n:2\r\n*2\r\n$1\r\n2\r\n$-1\r\n"),
            (C, b"*1\r\n$5\r\nMULTI\r\n*3\r\n$6\r\nINCRBY\r\n$1\r\nn\r\n$1\r\n1\r\n*2\r\n$3\r\nGET\r\n$1\r\nn\r\n*1\r\n$4\r\nEXEC\r\n"),
            (S, b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:1\r\n$1\r\n1\r\n"),
        ];
        let resp2_pubsub: &[(Side, &[u8])] = &[
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
        let resp3_pubsub: &[(Side, &[u8])] = &[
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
            (C, b"PING\r\n"),
            (S, b"+PONG\r\n"),
            (C, b"set  k   v\r\n"),
            (S, b"+OK\r\n"),
        ]);
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].name, "PING");
        assert_eq!(stmt(&ops[0]), "PING");
        assert_eq!(ops[1].name, "SET");
        assert_eq!(stmt(&ops[1]), "set k v");
        assert_eq!(ops[1].attributes["db.redis.args_length"], 3);
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
        let sub =
            |kind: &str, ch: &str, n: i64| format!("*3\r\n{}{}:{n}\r\n", bulk(kind), bulk(ch));
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
    fn gap_outside_a_bulk_string_gives_up_cleanly() {
        // Server side: waiting commands are reported without reply, pairing stops.
        let mut p = RedisParser::new(cfg());
        let mut out = Vec::new();
        p.feed(C, &cmd(&["GET", "a"]), 1, &mut out);
        p.feed(C, &cmd(&["GET", "b"]), 2, &mut out);
        p.gap(S, 7, 3, &mut out);
        p.feed(S, b"$1\r\nx\r\n", 4, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out
            .iter()
            .all(|o| o.status == StatusCode::Unset && o.end_ts == 3));
        p.feed(C, &cmd(&["GET", "c"]), 5, &mut out);
        assert_eq!(out.len(), 3);
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
        assert_eq!(p.unparsed(), 1);
    }

    #[test]
    fn malformed_server_bytes_stop_pairing_once() {
        let (ops, p) = run(&[
            (C, &cmd(&["GET", "a"])),
            (S, b"?garbage\r\n"),
            (C, &cmd(&["GET", "b"])),
        ]);
        assert_eq!(ops.len(), 2);
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
}
