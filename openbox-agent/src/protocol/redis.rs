//! Redis RESP2/RESP3 parser.
//!
//! The client sends commands as RESP arrays of bulk strings (or, from telnet-like tools,
//! inline lines); the server answers each command with exactly one reply, in order, so
//! requests pair with replies FIFO. Exceptions handled here: RESP3 `>` pushes and RESP2
//! pub/sub `message` arrays are out-of-band (no request), `|` attributes precede a reply
//! without being one, and (UN)SUBSCRIBE gets one acknowledgement per channel.
//!
//! Resynchronisation. A gap inside a bulk string (whose length is known) is skipped.
//! Anywhere else — bytes that are not RESP, a gap between values, a connection watched
//! from its middle — that side has lost its place, and finds it again as follows.
//!
//! - Client: its bytes are dropped until a captured piece starts with an array command
//!   whose every element parses (`*<n>` then bulk strings, to the piece's end). Not at
//!   an inline command: a piece of an array command cut anywhere can read as one
//!   (`SUBSCRIBE\r\n` out of `…$11\r\nUNSUBSCRIBE\r\n`), so a connection seen from an
//!   inline command on is followed from its next array command (every client library
//!   and redis-cli send arrays; inline commands come from telnet-like tools).
//! - Server: a reply stream has no marks saying which command it answers, so after a
//!   loss on either side its bytes are dropped, and pairing is off, until the client
//!   sends a command while every command seen before has had its reply: a client that
//!   waits for its replies (redis-py, and pipelines, which send their batch whole) has
//!   read the rest of the old replies by then, so the server's next byte starts this
//!   command's reply. A command sent while earlier ones still wait is dropped, counted
//!   `unpaired`, never paired with another's reply.
//! - The first batch after that is held until the server's piece that answers its last
//!   command ends: a reply more than the batch's commands means the batch's first
//!   piece was not the start of what the client sent (the reply of a command we did
//!   not see came first), and the batch's ops are dropped, counted `unpaired`, instead
//!   of being paired one reply off.
//! - A connection open before watching began ([`Parser::watched_midstream`]): while the
//!   TLS probes attach one libssl function after another, a command may be captured
//!   without its reply, with nothing to say so, and the first batch's replies then be
//!   one short. So a reply to the batch on probation is paired only while the commands
//!   waiting were all sent in one write (a client that waits for its replies has had
//!   them all before it writes again); commands from several writes are all dropped,
//!   counted `unpaired`, and pairing waits to be re-armed as after a loss.
//!
//! Every loss is counted by reason ([`Loss`]).
//!
//! Replies are never buffered whole: a streaming reader walks the RESP grammar keeping
//! only a stack of aggregate counts (bounded depth) and the few leading bytes of each
//! scalar that an op needs, so a 500 MB bulk string costs no memory.

use std::collections::VecDeque;

use super::{
    truncate_statement, Loss, Losses, Op, Parser, ParserConfig, Protocol, Side, StatusCode,
};

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
enum ReadState {
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
    state: ReadState,
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
            state: ReadState::Type,
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
        if let ReadState::Bulk(ty, left) = self.state {
            if n <= left {
                self.state = ReadState::Bulk(ty, left - n);
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
            match self.state {
                ReadState::Type => {
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
                            self.state = ReadState::Inline;
                            continue;
                        }
                        if !self.stack.is_empty() && b != b'$' {
                            return Step::Bad;
                        }
                    }
                    if is_scalar_line(b) || is_bulk(b) || is_aggregate(b) {
                        self.line.clear();
                        self.line_len = 0;
                        self.state = ReadState::Line(b);
                    } else {
                        return Step::Bad;
                    }
                }
                ReadState::Line(ty) => {
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
                    self.state = ReadState::Type;
                    if let Some(step) = self.finish_line(ty) {
                        return step;
                    }
                }
                ReadState::Bulk(ty, left) => {
                    if left == 0 {
                        self.state = ReadState::Type;
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
                        self.state = ReadState::Bulk(ty, left - take as u64);
                    } else {
                        let Some(&b) = data.get(*pos) else {
                            return Step::More;
                        };
                        let want = if left == 2 { b'\r' } else { b'\n' };
                        if b != want {
                            return Step::Bad;
                        }
                        *pos += 1;
                        self.state = ReadState::Bulk(ty, left - 1);
                    }
                }
                ReadState::Inline => {
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
                    self.state = ReadState::Type;
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
            self.state = ReadState::Bulk(ty, n as u64 + 2);
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

/// Whether a captured piece starts a command the client side can resume at: an array
/// whose elements (and whatever follows in the piece) parse as commands.
fn starts_command(piece: &[u8]) -> bool {
    if piece.first() != Some(&b'*') {
        return false;
    }
    let mut r = Reader::new(true, 0, 0);
    let mut pos = 0;
    loop {
        match r.step(piece, &mut pos, 0) {
            Step::More => return true,
            Step::Bad | Step::Inline { .. } => return false,
            Step::End { ty, .. } if ty != b'*' && ty != b'_' => return false,
            Step::Child { .. } | Step::End { .. } => {}
        }
    }
}

pub struct RedisParser {
    cfg: ParserConfig,
    losses: Losses,
    client: Reader,
    server: Reader,
    /// The client's place in its stream is lost (or not yet found): its bytes are dropped
    /// until a piece starts a command ([`starts_command`]).
    client_lost: bool,
    /// The server's bytes are dropped until a command re-arms pairing.
    server_lost: bool,
    /// Server bytes were dropped before any command was seen (counted once).
    server_orphans_counted: bool,
    /// Order alone does not say which command a reply answers (see the module doc).
    unsure: bool,
    /// Ops of the first batch after pairing was re-armed, held until the batch is known
    /// to be answered reply for command.
    probation: Option<Vec<Op>>,
    /// The client lost commands since pairing was re-armed: replies that answer nothing
    /// held are theirs, not a sign that the batch on probation is one reply off.
    orphans_expected: bool,
    /// Lost exchanges counted already whose replies are still to come: the client's lost
    /// bytes (one, however many commands they held: the replies beyond the first are
    /// counted as they come) and each command dropped while pairing was unsure. A reply
    /// that answers nothing held takes one of these rather than being counted again.
    counted_ahead: u64,
    /// The connection was open before watching began: the batch on probation must have
    /// been sent in one write (see the module doc).
    midstream: bool,
    /// The connection closed.
    closed: bool,
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
    /// The last reply was an acknowledgement of this kind answering no command held:
    /// the acknowledgements that follow it are the same lost command's.
    orphan_ack: Option<&'static str>,
}

impl RedisParser {
    pub fn new(cfg: ParserConfig) -> Self {
        let inline_max = cfg.max_buffer.max(64);
        Self {
            client: Reader::new(true, ARG_KEEP, inline_max),
            server: Reader::new(false, REPLY_KEEP, 0),
            cfg,
            losses: Losses::default(),
            client_lost: true,
            server_lost: true,
            server_orphans_counted: false,
            unsure: true,
            probation: None,
            orphans_expected: false,
            counted_ahead: 0,
            midstream: false,
            closed: false,
            building: Building::default(),
            pending: VecDeque::new(),
            items: Vec::new(),
            db: 0,
            sub_mode: false,
            monitor: false,
            orphan_ack: None,
        }
    }

    /// A captured piece of `side`: where a lost side resumes (see the module doc).
    fn piece(&mut self, side: Side, data: &[u8], ts: u64, out: &mut Vec<Op>) {
        if self.closed || data.is_empty() {
            return;
        }
        match side {
            Side::Client => {
                if self.probation.is_some() && self.pending.is_empty() {
                    // Every reply of the batch came, and no more: it was paired right.
                    self.confirm(out);
                }
                if self.client_lost {
                    if !starts_command(data) {
                        return;
                    }
                    self.client_lost = false;
                    self.client = Reader::new(true, ARG_KEEP, self.cfg.max_buffer.max(64));
                    self.building = Building::default();
                }
            }
            Side::Server => {
                if self.server_lost {
                    if !self.server_orphans_counted && self.losses.total() == 0 {
                        // Replies to commands sent before watching began.
                        self.server_orphans_counted = true;
                        self.losses.add(Loss::Unpaired);
                    }
                    return;
                }
            }
        }
        self.drive(side, data, ts, out);
        if side == Side::Server && self.probation.is_some() && self.pending.is_empty() {
            self.confirm(out);
        }
    }

    /// The batch on probation was answered reply for command: its ops go out.
    fn confirm(&mut self, out: &mut Vec<Op>) {
        if let Some(ops) = self.probation.take() {
            out.extend(ops);
        }
    }

    /// An op paired by order: held while its batch is on probation.
    fn emit(&mut self, op: Op, out: &mut Vec<Op>) {
        match self.probation.as_mut() {
            Some(held) => held.push(op),
            None => out.push(op),
        }
    }

    fn drive(&mut self, side: Side, data: &[u8], ts: u64, out: &mut Vec<Op>) {
        let mut pos = 0;
        loop {
            match side {
                Side::Client => {
                    if self.client_lost || self.closed {
                        return;
                    }
                    match self.client.step(data, &mut pos, ts) {
                        Step::More => return,
                        Step::Bad => return self.give_up(Side::Client, Loss::Malformed, ts, out),
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
                                return self.give_up(Side::Client, Loss::Malformed, ts, out);
                            }
                            self.command_done(ts);
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
                            self.command_done(ts);
                        }
                    }
                }
                Side::Server => {
                    if self.server_lost || self.closed {
                        return;
                    }
                    match self.server.step(data, &mut pos, ts) {
                        Step::More => return,
                        Step::Bad => return self.give_up(Side::Server, Loss::Malformed, ts, out),
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
                        Step::Inline { .. } => {
                            return self.give_up(Side::Server, Loss::Malformed, ts, out)
                        }
                    }
                }
            }
        }
    }

    fn command_done(&mut self, ts: u64) {
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
        if self.unsure {
            if !self.pending.is_empty() || !self.server_lost && self.server.mid_value() {
                // Replies to commands we did not see may come before this one's. Its own
                // reply, when it comes, answers nothing held: counted now, not then.
                self.losses.add(Loss::Unpaired);
                self.counted_ahead += 1;
                return;
            }
            // The server's next byte starts this command's reply (see the module doc).
            self.unsure = false;
            self.server_lost = false;
            self.server = Reader::new(false, REPLY_KEEP, 0);
            self.items.clear();
            self.probation = Some(Vec::new());
            self.orphans_expected = false;
            self.counted_ahead = 0;
        }
        if self.pending.len() >= MAX_PENDING - 1 {
            // Keep FIFO pairing exact: remember how many replies to pass over.
            self.losses.add(Loss::Oversize);
            match self.pending.back_mut() {
                Some(Pending::Skip(n)) => *n += 1,
                _ => self.pending.push_back(Pending::Skip(1)),
            }
            return;
        }
        self.pending.push_back(Pending::Cmd(Box::new(cmd)));
    }

    fn reply_done(&mut self, ty: u8, scalar: bool, ts: u64, out: &mut Vec<Op>) {
        if self.midstream && self.probation.is_some() && self.waiting_writes() > 1 {
            return self.drop_unsure();
        }
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
        let orphan_ack = std::mem::take(&mut self.orphan_ack);
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
                if self.pending.is_empty() {
                    // An acknowledgement of a (un)subscribe we did not see: one per
                    // channel, all of that one command, which is lost once.
                    if let Some(c) = count {
                        self.sub_mode = c > 0;
                    }
                    self.orphan_ack = Some(k);
                    if orphan_ack == Some(k) {
                        return;
                    }
                }
            }
            // A message while a subscription waits for its acknowledgements (which can
            // only come first) follows acknowledgements that were not captured.
            if (self.sub_mode || self.head_is_sub())
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
            // A reply to a command we did not see (lost on the client side), or, on
            // probation, proof that the batch was paired one reply off.
            if self.counted_ahead > 0 {
                self.counted_ahead -= 1;
            } else {
                self.losses.add(Loss::Unpaired);
            }
            if self.orphans_expected {
                return;
            }
            if let Some(held) = self.probation.take() {
                for _ in held {
                    self.losses.add(Loss::Unpaired);
                }
                self.server_lost = true;
                self.unsure = true;
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
        self.emit(build_op(&cmd, error), out);
    }

    /// How many client writes (pieces) the commands waiting were sent in.
    fn waiting_writes(&self) -> usize {
        let mut starts = self.pending.iter().filter_map(|p| match p {
            Pending::Cmd(c) => Some(c.start_ts),
            Pending::Skip(_) => None,
        });
        let Some(mut last) = starts.next() else {
            return 0;
        };
        let mut writes = 1;
        for ts in starts {
            if ts != last {
                writes += 1;
                last = ts;
            }
        }
        writes
    }

    /// A reply came while the batch on probation waited behind commands from several
    /// writes: replies were missed, and which command this one answers cannot be known.
    /// The batch and the commands after it are dropped, each counted `unpaired` once
    /// (this reply, and the rest of the stream until pairing is re-armed, answer them),
    /// and the server side waits to be re-armed (see the module doc).
    fn drop_unsure(&mut self) {
        let held = self.probation.take().map_or(0, |h| h.len() as u64);
        let waiting: u64 = self
            .pending
            .drain(..)
            .map(|p| match p {
                Pending::Cmd(_) => 1,
                Pending::Skip(n) => n,
            })
            .sum();
        for _ in 0..held + waiting {
            self.losses.add(Loss::Unpaired);
        }
        self.items.clear();
        self.orphan_ack = None;
        self.server_lost = true;
        self.unsure = true;
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
                        self.emit(build_op(&c, None), out);
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
                self.emit(build_op(&c, None), out);
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
                self.emit(build_op(&c, None), out);
            }
        }
    }

    /// This side lost its place in the stream (see the module doc), counted under `why`.
    fn give_up(&mut self, side: Side, why: Loss, ts: u64, out: &mut Vec<Op>) {
        self.losses.add(why);
        self.unsure = true;
        match side {
            Side::Client => {
                // Commands already queued still get their replies (sent before the lost
                // bytes, answered before theirs); replies to the lost commands come
                // after and answer nothing we hold.
                self.client_lost = true;
                self.orphans_expected = true;
                self.counted_ahead += 1;
                self.building = Building::default();
            }
            Side::Server => {
                // How many replies were lost is unknown: the waiting commands end here
                // without one, and the batch on probation cannot be vouched for.
                self.server_lost = true;
                if let Some(held) = self.probation.take() {
                    for _ in held {
                        self.losses.add(Loss::Unpaired);
                    }
                }
                self.flush(ts, true, out);
            }
        }
    }

    /// Reports the waiting commands without a reply (`truncated`: it was lost).
    fn flush(&mut self, ts: u64, truncated: bool, out: &mut Vec<Op>) {
        for p in self.pending.drain(..) {
            if let Pending::Cmd(mut c) = p {
                c.end_ts = ts;
                let mut op = build_op(&c, None);
                if truncated {
                    op.attr("db.response_truncated", true);
                }
                out.push(op);
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
        self.piece(side, data, ts, out);
    }

    fn gap(&mut self, side: Side, n: u64, ts: u64, out: &mut Vec<Op>) {
        if self.closed || n == 0 {
            return;
        }
        let (reader, lost) = match side {
            Side::Client => (&mut self.client, self.client_lost),
            Side::Server => (&mut self.server, self.server_lost),
        };
        if lost {
            return;
        }
        // A command whose name is cut cannot be told (nor how many replies it gets).
        let name_cut = side == Side::Client && self.building.argc == 0;
        if !name_cut && reader.skip(n) {
            // Inside a bulk string of known length: skip, then finish it if the gap ended it.
            self.drive(side, &[], ts, out);
        } else {
            self.give_up(side, Loss::Gap, ts, out);
        }
    }

    /// The batch that re-arms pairing must have been sent in one write (see the module
    /// doc).
    fn watched_midstream(&mut self) {
        self.midstream = true;
    }

    fn close(&mut self, ts: u64, out: &mut Vec<Op>) {
        if self.closed {
            return;
        }
        if (!self.client_lost && self.client.mid_value())
            || (!self.server_lost && self.server.mid_value())
        {
            // A message cut by the close.
            self.losses.add(Loss::Gap);
        }
        // Nothing contradicted the batch on probation.
        self.confirm(out);
        self.flush(ts, false, out);
        self.closed = true;
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
