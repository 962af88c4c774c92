//! MongoDB wire protocol parser: OP_MSG (all current drivers), OP_QUERY/OP_REPLY (the
//! legacy handshake), OP_COMPRESSED (framed, not decompressed).
//!
//! Every message starts with a 16-byte little-endian header whose first field is the
//! whole message's length, so framing never depends on the body: a message is buffered
//! (at most `max_buffer` bytes of it) and decoded when its last byte arrives. Replies
//! name the request they answer (`responseTo == requestID`), so pairing is by id, not
//! order. The BSON reader below borrows from the message bytes and never recurses deeper
//! than `MAX_DEPTH`.
//!
//! Resynchronisation. Watching may begin in a message's middle, a capture gap may fall
//! between messages, and a header may not parse: that side's framing is then lost,
//! counted once (`malformed` or `gap`), and found again at the next captured piece that
//! starts a plausible message (see [`judge`]): drivers write a message in one call and
//! read its header first, so pieces start messages. Nothing is paired by a guess: a
//! reply pairs only with the request its `responseTo` names; one that names no request
//! seen is counted `unpaired` (except an exhaust stream's later replies, which answer
//! the reply before them). The server answers a connection's requests one at a time, in
//! order, so when a request's reply pairs, earlier requests still waiting whose replies
//! fell in bytes the server side lost are reported then, ending where the loss was, with
//! `db.response_truncated`.

use std::collections::VecDeque;

use base64::Engine as _;

use super::{
    bytes::{cstr, le_i32, le_i64, le_u32, lossy},
    framing::FrameReader,
    truncate_statement, Loss, Losses, Op, Parser, ParserConfig, Protocol, Side, StatusCode,
};

const HEADER: usize = 16;
/// The server's default `maxMessageSizeBytes` (48 MB); anything longer is not MongoDB.
const MAX_MESSAGE: u32 = 48_000_000;
/// Requests waiting for their reply; beyond this the oldest is reported without one.
const MAX_PENDING: usize = 4096;
/// Nested documents rendered; deeper ones show as `{...}`.
const MAX_DEPTH: usize = 32;

const OP_REPLY: i32 = 1;
const OP_QUERY: i32 = 2004;
const OP_COMPRESSED: i32 = 2012;
const OP_MSG: i32 = 2013;
/// Opcodes removed in MongoDB 5.1/6.0 (OP_UPDATE, OP_INSERT, OP_GET_MORE, OP_DELETE,
/// OP_KILL_CURSORS): framed and skipped.
const LEGACY_OPS: [i32; 5] = [2001, 2002, 2005, 2006, 2007];

/// OP_MSG flagBits (wire spec "OP_MSG"): a CRC-32C follows the sections; no reply will
/// follow this message.
const CHECKSUM_PRESENT: u32 = 1;
const MORE_TO_COME: u32 = 1 << 1;
/// The client accepts an exhaust stream of replies (requests only).
const EXHAUST_ALLOWED: u32 = 1 << 16;
/// OP_REPLY responseFlags defined (CursorNotFound, QueryFailure, ShardConfigStale,
/// AwaitCapable); OP_QUERY flags defined (bit 0 is reserved, must be 0).
const REPLY_FLAGS: i32 = 0xf;
const QUERY_FLAGS: i32 = 0xfe;
/// Bytes from a piece's start enough to judge whether it starts a message (the longest
/// need: an OP_QUERY's namespace, then its skip/return counts and query length).
const JUDGE_BYTES: usize = HEADER + 4 + MAX_NAMESPACE + 1 + 12;
/// A namespace (`db.collection`) is at most 255 bytes on current servers.
const MAX_NAMESPACE: usize = 255;
/// Exhaust streams followed at once (their last reply's id).
const MAX_EXHAUST: usize = 16;
/// OP_REPLY responseFlags.
const CURSOR_NOT_FOUND: i32 = 1;
const QUERY_FAILURE: i32 = 1 << 1;

/// Top-level fields of a command left out of `db.statement`: session id and cluster
/// gossip added by drivers, not part of what the application asked.
const DROPPED_FIELDS: [&[u8]; 3] = [b"lsid", b"$clusterTime", b"$readPreference"];
/// Commands whose body carries credentials. PyMongo's command monitoring (what the SDK
/// instruments) replaces their body by `{}`; we keep only the command element and `$db`.
const SENSITIVE: [&str; 9] = [
    "authenticate",
    "saslstart",
    "saslcontinue",
    "getnonce",
    "createuser",
    "updateuser",
    "copydbgetnonce",
    "copydbsaslstart",
    "copydb",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    len: u32,
    request_id: i32,
    response_to: i32,
    op: i32,
}

impl Header {
    fn parse(b: &[u8]) -> Option<Header> {
        Some(Header {
            len: u32::try_from(le_i32(b, 0)?).ok()?,
            request_id: le_i32(b, 4)?,
            response_to: le_i32(b, 8)?,
            op: le_i32(b, 12)?,
        })
    }

    fn known_op(&self) -> bool {
        matches!(self.op, OP_REPLY | OP_QUERY | OP_COMPRESSED | OP_MSG)
            || LEGACY_OPS.contains(&self.op)
    }
}

/// Whether these first bytes can start this protocol: a client's first message header
/// with a plausible length, a request opcode, and no `responseTo`.
pub fn looks_like_message(first: &[u8]) -> bool {
    let Some(h) = Header::parse(first) else {
        return false;
    };
    // 21 = header + flagBits + section kind + the smallest document (OP_MSG); the other
    // request opcodes are longer still.
    (21..=MAX_MESSAGE).contains(&h.len)
        && matches!(h.op, OP_MSG | OP_QUERY | OP_COMPRESSED)
        && h.response_to == 0
}

// ---------------------------------------------------------------------------------------
// BSON reader (bsonspec.org 1.1)
// ---------------------------------------------------------------------------------------

/// A document's element bytes (after the int32 size, before the final 0x00). `complete`
/// is false for the prefix of a document cut by the buffer limit: its elements are read
/// until the first one that does not fit.
#[derive(Clone, Copy, Debug)]
struct Doc<'a> {
    elems: &'a [u8],
    complete: bool,
}

/// One element's value, borrowing from the message bytes (bsonspec.org "element").
#[derive(Clone, Copy, Debug)]
enum BsonValue<'a> {
    Double(f64),
    Str(&'a [u8]),
    Doc(Doc<'a>),
    Array(Doc<'a>),
    Binary(u8, &'a [u8]),
    Undefined,
    ObjectId(&'a [u8]),
    Bool(bool),
    DateTime(i64),
    Null,
    Regex(&'a [u8], &'a [u8]),
    DbPointer(&'a [u8], &'a [u8]),
    Code(&'a [u8]),
    Symbol(&'a [u8]),
    CodeWithScope(&'a [u8], Doc<'a>),
    Int32(i32),
    Timestamp(u32, u32),
    Int64(i64),
    Decimal128(&'a [u8]),
    MinKey,
    MaxKey,
}

/// A whole document at the start of `b`, and the bytes after it.
fn doc_at(b: &[u8]) -> Option<(Doc<'_>, &[u8])> {
    let size = usize::try_from(le_i32(b, 0)?).ok()?;
    if size < 5 {
        return None;
    }
    let whole = b.get(..size)?;
    let (&last, body) = whole.split_last()?;
    if last != 0 {
        return None;
    }
    Some((
        Doc {
            elems: body.get(4..)?,
            complete: true,
        },
        b.get(size..)?,
    ))
}

/// A document at the start of `b`, or the part of it that `b` holds.
fn doc_prefix(b: &[u8]) -> Option<Doc<'_>> {
    let size = usize::try_from(le_i32(b, 0)?).ok()?;
    if size < 5 {
        return None;
    }
    if size <= b.len() {
        return doc_at(b).map(|(d, _)| d);
    }
    Some(Doc {
        elems: b.get(4..)?,
        complete: false,
    })
}

/// BSON `cstring` at the start of `b`, and the bytes after its NUL.
fn cstring(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (s, next) = cstr(b, 0)?;
    Some((s, b.get(next..)?))
}

/// BSON `string`: int32 length (including the trailing NUL), bytes, NUL.
fn bson_string(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::try_from(le_i32(b, 0)?).ok()?;
    let end = len.checked_add(4)?;
    let (&nul, s) = b.get(4..end)?.split_last()?;
    (nul == 0).then_some((s, b.get(end..)?))
}

fn fixed(b: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
    Some((b.get(..n)?, b.get(n..)?))
}

fn element(b: &[u8]) -> Option<(&[u8], BsonValue<'_>, &[u8])> {
    let (&ty, rest) = b.split_first()?;
    let (name, r) = cstring(rest)?;
    let (v, r) = match ty {
        0x01 => {
            let (x, r) = fixed(r, 8)?;
            (BsonValue::Double(f64::from_le_bytes(x.try_into().ok()?)), r)
        }
        0x02 | 0x0D | 0x0E => {
            let (s, r) = bson_string(r)?;
            (
                match ty {
                    0x02 => BsonValue::Str(s),
                    0x0D => BsonValue::Code(s),
                    _ => BsonValue::Symbol(s),
                },
                r,
            )
        }
        0x03 | 0x04 => {
            let (d, r) = doc_at(r)?;
            (
                if ty == 0x03 {
                    BsonValue::Doc(d)
                } else {
                    BsonValue::Array(d)
                },
                r,
            )
        }
        0x05 => {
            let len = usize::try_from(le_i32(r, 0)?).ok()?;
            let subtype = *r.get(4)?;
            let (data, r) = fixed(r.get(5..)?, len)?;
            (BsonValue::Binary(subtype, data), r)
        }
        0x06 => (BsonValue::Undefined, r),
        0x07 => {
            let (oid, r) = fixed(r, 12)?;
            (BsonValue::ObjectId(oid), r)
        }
        0x08 => {
            let (&x, r) = r.split_first()?;
            (BsonValue::Bool(x != 0), r)
        }
        0x09 => (BsonValue::DateTime(le_i64(r, 0)?), r.get(8..)?),
        0x0A => (BsonValue::Null, r),
        0x0B => {
            let (pattern, r) = cstring(r)?;
            let (options, r) = cstring(r)?;
            (BsonValue::Regex(pattern, options), r)
        }
        0x0C => {
            let (ns, r) = bson_string(r)?;
            let (oid, r) = fixed(r, 12)?;
            (BsonValue::DbPointer(ns, oid), r)
        }
        0x0F => {
            // int32 total length, string code, document scope.
            let total = usize::try_from(le_i32(r, 0)?).ok()?;
            let (whole, after) = fixed(r, total)?;
            let (code, s) = bson_string(whole.get(4..)?)?;
            let (scope, _) = doc_at(s)?;
            (BsonValue::CodeWithScope(code, scope), after)
        }
        0x10 => (BsonValue::Int32(le_i32(r, 0)?), r.get(4..)?),
        // uint64: increment in the low 32 bits, seconds in the high 32 bits.
        0x11 => (
            BsonValue::Timestamp(le_u32(r, 4)?, le_u32(r, 0)?),
            r.get(8..)?,
        ),
        0x12 => (BsonValue::Int64(le_i64(r, 0)?), r.get(8..)?),
        0x13 => {
            let (d, r) = fixed(r, 16)?;
            (BsonValue::Decimal128(d), r)
        }
        0xFF => (BsonValue::MinKey, r),
        0x7F => (BsonValue::MaxKey, r),
        _ => return None,
    };
    Some((name, v, r))
}

/// Elements in order; a malformed element (or the cut of an incomplete document) ends
/// the iteration.
struct Elems<'a>(&'a [u8]);

impl<'a> Iterator for Elems<'a> {
    type Item = (&'a [u8], BsonValue<'a>);
    fn next(&mut self) -> Option<Self::Item> {
        match element(self.0) {
            Some((name, v, rest)) => {
                self.0 = rest;
                Some((name, v))
            }
            None => {
                self.0 = &[];
                None
            }
        }
    }
}

impl<'a> Doc<'a> {
    fn iter(self) -> Elems<'a> {
        Elems(self.elems)
    }
    fn get(self, key: &str) -> Option<BsonValue<'a>> {
        self.iter()
            .find(|(k, _)| *k == key.as_bytes())
            .map(|(_, v)| v)
    }
    fn first(self) -> Option<(&'a [u8], BsonValue<'a>)> {
        self.iter().next()
    }
}

impl<'a> BsonValue<'a> {
    fn number(self) -> Option<f64> {
        match self {
            BsonValue::Double(x) => Some(x),
            BsonValue::Int32(n) => Some(f64::from(n)),
            BsonValue::Int64(n) => Some(n as f64),
            BsonValue::Bool(b) => Some(if b { 1.0 } else { 0.0 }),
            _ => None,
        }
    }
    fn int(self) -> Option<i64> {
        match self {
            BsonValue::Int32(n) => Some(i64::from(n)),
            BsonValue::Int64(n) => Some(n),
            BsonValue::Double(x) if x.fract() == 0.0 && x.abs() < 9.0e15 => Some(x as i64),
            _ => None,
        }
    }
    fn str(self) -> Option<String> {
        match self {
            BsonValue::Str(s) => Some(String::from_utf8_lossy(s).into_owned()),
            _ => None,
        }
    }
    fn doc(self) -> Option<Doc<'a>> {
        match self {
            BsonValue::Doc(d) | BsonValue::Array(d) => Some(d),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Rendering as relaxed Extended JSON (MongoDB Extended JSON v2, relaxed mode)
// ---------------------------------------------------------------------------------------

/// Extended JSON text bounded in characters: once past `max`, further pushes are dropped
/// and the caller's `truncate_statement` marks the cut.
struct ExtJson {
    s: String,
    chars: usize,
    max: usize,
}

impl ExtJson {
    fn new(max: usize) -> Self {
        Self {
            s: String::new(),
            chars: 0,
            max,
        }
    }
    fn full(&self) -> bool {
        self.chars > self.max
    }
    fn push(&mut self, t: &str) {
        if !self.full() {
            self.chars += t.chars().count();
            self.s.push_str(t);
        }
    }
    /// Bytes worth keeping of a long value: enough for the characters still allowed.
    fn budget(&self) -> usize {
        self.max
            .saturating_sub(self.chars)
            .saturating_add(2)
            .saturating_mul(4)
    }
    fn string(&mut self, b: &[u8]) {
        let b = b.get(..self.budget()).unwrap_or(b);
        let mut q = String::with_capacity(b.len() + 2);
        q.push('"');
        for c in String::from_utf8_lossy(b).chars() {
            match c {
                '"' => q.push_str("\\\""),
                '\\' => q.push_str("\\\\"),
                '\n' => q.push_str("\\n"),
                '\r' => q.push_str("\\r"),
                '\t' => q.push_str("\\t"),
                c if (c as u32) < 0x20 => q.push_str(&format!("\\u{:04x}", c as u32)),
                c => q.push(c),
            }
        }
        q.push('"');
        self.push(&q);
    }
    fn hex(&mut self, b: &[u8]) {
        let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
        self.push(&h);
    }

    fn value(&mut self, v: BsonValue<'_>, depth: usize) {
        match v {
            BsonValue::Double(x) => {
                if x.is_finite() {
                    self.push(&format!("{x:?}"));
                } else {
                    let s = if x.is_nan() {
                        "NaN"
                    } else if x > 0.0 {
                        "Infinity"
                    } else {
                        "-Infinity"
                    };
                    self.push(&format!("{{\"$numberDouble\": \"{s}\"}}"));
                }
            }
            BsonValue::Str(s) => self.string(s),
            BsonValue::Doc(d) => self.doc(d, depth + 1, &|_, _| true),
            BsonValue::Array(d) => self.array(d, depth + 1),
            BsonValue::Binary(sub, data) => {
                let data = data.get(..self.budget()).unwrap_or(data);
                let b64 = base64::engine::general_purpose::STANDARD.encode(data);
                self.push(&format!(
                    "{{\"$binary\": {{\"base64\": \"{b64}\", \"subType\": \"{sub:02x}\"}}}}"
                ));
            }
            BsonValue::Undefined => self.push("{\"$undefined\": true}"),
            BsonValue::ObjectId(oid) => {
                self.push("{\"$oid\": \"");
                self.hex(oid);
                self.push("\"}");
            }
            BsonValue::Bool(b) => self.push(if b { "true" } else { "false" }),
            BsonValue::DateTime(ms) => match iso_date(ms) {
                Some(iso) => self.push(&format!("{{\"$date\": \"{iso}\"}}")),
                None => self.push(&format!("{{\"$date\": {{\"$numberLong\": \"{ms}\"}}}}")),
            },
            BsonValue::Null => self.push("null"),
            BsonValue::Regex(p, o) => {
                self.push("{\"$regularExpression\": {\"pattern\": ");
                self.string(p);
                self.push(", \"options\": ");
                self.string(o);
                self.push("}}");
            }
            BsonValue::DbPointer(ns, oid) => {
                self.push("{\"$dbPointer\": {\"$ref\": ");
                self.string(ns);
                self.push(", \"$id\": {\"$oid\": \"");
                self.hex(oid);
                self.push("\"}}}");
            }
            BsonValue::Code(c) => {
                self.push("{\"$code\": ");
                self.string(c);
                self.push("}");
            }
            BsonValue::Symbol(s) => {
                self.push("{\"$symbol\": ");
                self.string(s);
                self.push("}");
            }
            BsonValue::CodeWithScope(c, scope) => {
                self.push("{\"$code\": ");
                self.string(c);
                self.push(", \"$scope\": ");
                self.doc(scope, depth + 1, &|_, _| true);
                self.push("}");
            }
            BsonValue::Int32(n) => self.push(&n.to_string()),
            BsonValue::Timestamp(t, i) => {
                self.push(&format!("{{\"$timestamp\": {{\"t\": {t}, \"i\": {i}}}}}"))
            }
            BsonValue::Int64(n) => self.push(&n.to_string()),
            BsonValue::Decimal128(d) => {
                self.push(&format!("{{\"$numberDecimal\": \"{}\"}}", decimal128(d)))
            }
            BsonValue::MinKey => self.push("{\"$minKey\": 1}"),
            BsonValue::MaxKey => self.push("{\"$maxKey\": 1}"),
        }
    }

    /// `{"k": v, …}` with the elements `keep(index, name)` accepts; `extra` renders more
    /// fields (an OP_MSG document sequence) before the closing brace.
    fn doc_with(
        &mut self,
        d: Doc<'_>,
        depth: usize,
        keep: &dyn Fn(usize, &[u8]) -> bool,
        extra: &dyn Fn(&mut ExtJson, bool),
    ) {
        if depth > MAX_DEPTH {
            return self.push("{...}");
        }
        self.push("{");
        let mut first = true;
        for (i, (k, v)) in d.iter().enumerate() {
            if self.full() {
                return;
            }
            if !keep(i, k) {
                continue;
            }
            if !first {
                self.push(", ");
            }
            first = false;
            self.string(k);
            self.push(": ");
            self.value(v, depth);
        }
        extra(self, first);
        if !d.complete {
            self.push(if first { "..." } else { ", ..." });
        }
        self.push("}");
    }

    fn doc(&mut self, d: Doc<'_>, depth: usize, keep: &dyn Fn(usize, &[u8]) -> bool) {
        self.doc_with(d, depth, keep, &|_, _| {});
    }

    fn array(&mut self, d: Doc<'_>, depth: usize) {
        if depth > MAX_DEPTH {
            return self.push("[...]");
        }
        self.push("[");
        for (i, (_, v)) in d.iter().enumerate() {
            if self.full() {
                return;
            }
            if i > 0 {
                self.push(", ");
            }
            self.value(v, depth);
        }
        self.push("]");
    }
}

/// Relaxed Extended JSON shows dates from 1970 to 9999 as ISO-8601 with milliseconds.
fn iso_date(ms: i64) -> Option<String> {
    if !(0..253_402_300_800_000).contains(&ms) {
        return None;
    }
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant, "chrono-compatible low-level date
    // algorithms"), for the non-negative range checked above.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    Some(format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        ms.rem_euclid(1000)
    ))
}

/// IEEE 754-2008 decimal128 (BID encoding) to its string form, as the BSON decimal128
/// spec describes ("To string representation").
fn decimal128(b: &[u8]) -> String {
    let Some(bytes) = b.get(..16).and_then(|x| <[u8; 16]>::try_from(x).ok()) else {
        return "NaN".into();
    };
    let v = u128::from_le_bytes(bytes);
    let negative = v >> 127 == 1;
    let sign = if negative { "-" } else { "" };
    let combination = (v >> 122) & 0x1f;
    if combination == 0x1e {
        return format!("{sign}Infinity");
    }
    if combination == 0x1f {
        return "NaN".into();
    }
    let (biased, coefficient) = if (v >> 125) & 0b11 == 0b11 {
        // "11" form: the significand would exceed 10^34 - 1, so it is non-canonical: 0.
        (((v >> 111) & 0x3fff) as i64, 0u128)
    } else {
        (((v >> 113) & 0x3fff) as i64, v & ((1u128 << 113) - 1))
    };
    // At most 34 digits; a larger significand is non-canonical and means 0.
    let coefficient = if coefficient >= 10u128.pow(34) {
        0
    } else {
        coefficient
    };
    let exponent = biased - 6176;
    let digits = coefficient.to_string();
    let n = digits.len() as i64;
    let adjusted = exponent + n - 1;
    if exponent <= 0 && adjusted >= -6 {
        if exponent == 0 {
            return format!("{sign}{digits}");
        }
        let point = n + exponent;
        if point > 0 {
            let (int, frac) = digits.split_at(point as usize);
            format!("{sign}{int}.{frac}")
        } else {
            format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let dot = if rest.is_empty() { "" } else { "." };
        let esign = if adjusted >= 0 { "+" } else { "" };
        format!("{sign}{first}{dot}{rest}E{esign}{adjusted}")
    }
}

// ---------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------

/// A whole message, possibly with the tail of its body not kept (`cut`).
struct Message {
    header: Header,
    body: Vec<u8>,
    cut: bool,
    start_ts: u64,
    end_ts: u64,
}

impl Message {
    /// Body bytes a message section region ends at (its full length, as sent).
    fn body_len(&self) -> usize {
        (self.header.len as usize).saturating_sub(HEADER)
    }
}

/// One direction's message reader: the 16-byte header, then the body it announces.
struct Stream {
    frames: FrameReader<HEADER>,
    /// Header of the message whose body is being read.
    header: Option<Header>,
    /// Message boundaries unknown: since watching began, or since bytes were lost or did
    /// not parse. Framing resumes at a captured piece that starts a message.
    lost: bool,
    /// The current loss is counted (a stream begins lost but not counted: its first
    /// piece may well start a message).
    counted: bool,
    /// Pieces held while the first of them might start a message but is too short to
    /// tell (a header read on its own): timestamp and bytes.
    held: Vec<(u64, Vec<u8>)>,
}

impl Default for Stream {
    fn default() -> Self {
        Self {
            frames: FrameReader::default(),
            header: None,
            lost: true,
            counted: false,
            held: Vec::new(),
        }
    }
}

impl Stream {
    fn mid_message(&self) -> bool {
        !self.lost && !self.frames.at_boundary()
    }

    /// The next complete message, `Ok(None)` when more bytes are needed, `Err` when the
    /// bytes are not a message header.
    fn step(&mut self, data: &mut &[u8], ts: u64, keep: usize) -> Result<Option<Message>, ()> {
        if self.header.is_none() {
            let Some(bytes) = self.frames.read_header(data, ts, HEADER, true) else {
                return Ok(None);
            };
            let h = Header::parse(&bytes).ok_or(())?;
            if !(HEADER as u32..=MAX_MESSAGE).contains(&h.len) || !h.known_op() {
                return Err(());
            }
            self.header = Some(h);
            self.frames.start_body(h.len as usize - HEADER, keep);
        }
        if !self.frames.read_body(data) {
            return Ok(None);
        }
        Ok(self.take_message(ts))
    }

    fn take_message(&mut self, end_ts: u64) -> Option<Message> {
        let header = self.header.take()?;
        let (body, cut) = self.frames.take_body();
        Some(Message {
            header,
            body,
            cut,
            start_ts: self.frames.start_ts,
            end_ts,
        })
    }

    /// `n` bytes lost: skipped inside a message whose length we know. Returns the message
    /// they ended (cut), and whether bytes after its end, or between messages, were lost.
    fn skip(&mut self, n: u64, ts: u64) -> (Option<Message>, bool) {
        let (ended, lost) = self.frames.skip(n);
        let m = if ended { self.take_message(ts) } else { None };
        (m, lost)
    }

    /// Forgets the message in progress: framing is lost, and the loss counted.
    fn lose(&mut self) {
        self.frames.restart();
        self.header = None;
        self.held.clear();
        self.lost = true;
        self.counted = true;
    }

    /// The first bytes held from the piece at `i` on, at most [`JUDGE_BYTES`].
    fn held_prefix(&self, i: usize) -> Vec<u8> {
        let mut b = Vec::new();
        for (_, d) in self.held.get(i..).unwrap_or_default() {
            let room = JUDGE_BYTES - b.len();
            b.extend_from_slice(d.get(..room).unwrap_or(d));
            if b.len() == JUDGE_BYTES {
                break;
            }
        }
        b
    }
}

/// Whether a captured piece that begins with `b` begins a message.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Starts,
    Not,
    /// Too few bytes to tell.
    More,
}

/// Judges whether the bytes at a captured piece's start begin a message this side sends:
/// its length within the protocol's limits and at least its opcode's smallest, a current
/// opcode this side sends (requests name no `responseTo`, replies do), flag bits that are
/// defined, and the start of the body consistent with the length (OP_MSG: the first
/// section's kind and its document's or sequence's size, and the document's first
/// element type; OP_QUERY: a namespace and the query's size; OP_REPLY: the count and the
/// first document's size; OP_COMPRESSED: the original opcode and compressor).
fn judge(side: Side, b: &[u8]) -> Verdict {
    use Verdict::{More, Not, Starts};
    if b.len() < HEADER {
        return More;
    }
    let Some(h) = Header::parse(b) else {
        return Not;
    };
    let ok_op = match side {
        Side::Client => matches!(h.op, OP_MSG | OP_QUERY | OP_COMPRESSED) && h.response_to == 0,
        Side::Server => matches!(h.op, OP_MSG | OP_REPLY | OP_COMPRESSED) && h.response_to != 0,
    };
    let min = match h.op {
        OP_MSG => HEADER + 4 + 1 + 5,
        OP_REPLY => HEADER + 20,
        OP_QUERY => HEADER + 4 + 4 + 8 + 5,
        _ => HEADER + 9 + 1,
    };
    if !ok_op || !(min as u32..=MAX_MESSAGE).contains(&h.len) {
        return Not;
    }
    let len = h.len as usize;
    // Reads an i32 at `at` if the message holds it: `None` (need more) or the value.
    let need = |at: usize| -> Result<i32, Verdict> {
        if at + 4 > len {
            return Err(Not);
        }
        le_i32(b, at).ok_or(More)
    };
    let size_fits =
        |size: i32, at: usize| usize::try_from(size).is_ok_and(|s| s >= 5 && at + s <= len);
    let verdict = (|| -> Result<Verdict, Verdict> {
        match h.op {
            OP_MSG => {
                let flags = need(HEADER)? as u32;
                let allowed = CHECKSUM_PRESENT
                    | MORE_TO_COME
                    | if side == Side::Client {
                        EXHAUST_ALLOWED
                    } else {
                        0
                    };
                if flags & !allowed != 0 {
                    return Ok(Not);
                }
                let end = if flags & CHECKSUM_PRESENT != 0 {
                    len - 4
                } else {
                    len
                };
                let kind = *b.get(HEADER + 4).ok_or(More)?;
                let size = need(HEADER + 5)?;
                let at = HEADER + 5;
                let fits = usize::try_from(size).is_ok_and(|s| s >= 5 && at + s <= end);
                if !fits {
                    return Ok(Not);
                }
                let next = *b.get(at + 4).ok_or(More)?;
                let first_ok = match kind {
                    // Body document: its first element's type, or its end when empty.
                    0 => (size == 5) == (next == 0) && (next == 0 || bson_type(next)),
                    // Document sequence: an identifier (a field name) after its size.
                    1 => next.is_ascii_alphabetic(),
                    _ => false,
                };
                Ok(if first_ok { Starts } else { Not })
            }
            OP_REPLY => {
                let flags = need(HEADER)?;
                let from = need(HEADER + 12)?;
                let returned = need(HEADER + 16)?;
                if flags & !REPLY_FLAGS != 0 || from < 0 || returned < 0 {
                    return Ok(Not);
                }
                if returned == 0 {
                    return Ok(if len == HEADER + 20 { Starts } else { Not });
                }
                let size = need(HEADER + 20)?;
                Ok(if size_fits(size, HEADER + 20) {
                    Starts
                } else {
                    Not
                })
            }
            OP_QUERY => {
                let flags = need(HEADER)?;
                if flags & !QUERY_FLAGS != 0 {
                    return Ok(Not);
                }
                let ns_at = HEADER + 4;
                let ns_max = (len - ns_at).min(MAX_NAMESPACE + 1);
                let window = b.get(ns_at..).unwrap_or_default();
                let window = window.get(..ns_max).unwrap_or(window);
                let Some(nul) = window.iter().position(|&c| c == 0) else {
                    return Err(if window.len() < ns_max { More } else { Not });
                };
                let ns = &window[..nul];
                let plausible = ns.iter().all(|c| c.is_ascii_graphic())
                    && ns.iter().position(|&c| c == b'.').is_some_and(|i| i > 0);
                if !plausible {
                    return Ok(Not);
                }
                let at = ns_at + nul + 1 + 8;
                let size = need(at)?;
                Ok(if size_fits(size, at) { Starts } else { Not })
            }
            _ => {
                // OP_COMPRESSED: originalOpcode, uncompressedSize, compressorId (noop,
                // snappy, zlib, zstd).
                let original = need(HEADER)?;
                let size = need(HEADER + 4)?;
                let compressor = *b.get(HEADER + 8).ok_or(More)?;
                let ok = match side {
                    Side::Client => matches!(original, OP_MSG | OP_QUERY),
                    Side::Server => matches!(original, OP_MSG | OP_REPLY),
                } && (0..=MAX_MESSAGE as i32).contains(&size)
                    && compressor <= 3;
                Ok(if ok { Starts } else { Not })
            }
        }
    })();
    verdict.unwrap_or_else(|v| v)
}

/// A BSON element type byte (bsonspec.org 1.1, deprecated types included).
fn bson_type(t: u8) -> bool {
    matches!(t, 0x01..=0x13 | 0x7F | 0xFF)
}

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

/// The sections of an OP_MSG: the body document and document sequences.
struct MsgParts<'a> {
    flags: u32,
    body: Option<Doc<'a>>,
    seqs: Vec<(&'a [u8], Vec<Doc<'a>>)>,
}

/// `max_docs`: documents of a sequence worth listing (each renders as at least 4
/// characters, so more would be cut from the statement anyway).
fn op_msg_parts(m: &Message, max_docs: usize) -> Option<MsgParts<'_>> {
    let flags = le_u32(&m.body, 0)?;
    // The checksum, when present, is the message's last 4 bytes.
    let end = if flags & CHECKSUM_PRESENT != 0 {
        m.body_len().saturating_sub(4)
    } else {
        m.body_len()
    };
    let mut s = m.body.get(4..end.min(m.body.len()))?;
    let mut parts = MsgParts {
        flags,
        body: None,
        seqs: Vec::new(),
    };
    while let Some((&kind, rest)) = s.split_first() {
        match kind {
            0 => match doc_at(rest) {
                Some((d, r)) => {
                    parts.body.get_or_insert(d);
                    s = r;
                }
                None if m.cut => {
                    parts.body = parts.body.or_else(|| doc_prefix(rest));
                    break;
                }
                None => return None,
            },
            1 => {
                // int32 size (including itself), cstring identifier, documents.
                let size = usize::try_from(le_i32(rest, 0)?).ok()?;
                let (seq, after) = match rest.get(..size) {
                    Some(seq) => (seq, rest.get(size..).unwrap_or_default()),
                    None if m.cut => (rest, &[][..]),
                    None => return None,
                };
                let (ident, mut docs) = cstring(seq.get(4..)?)?;
                let mut list = Vec::new();
                while !docs.is_empty() && list.len() < max_docs {
                    match doc_at(docs) {
                        Some((d, r)) => {
                            list.push(d);
                            docs = r;
                        }
                        None if m.cut => {
                            // The document the cut fell in: show what it holds.
                            list.extend(doc_prefix(docs));
                            break;
                        }
                        None => return None,
                    }
                }
                parts.seqs.push((ident, list));
                s = after;
            }
            // Kind 2 is internal to the server; anything else is not OP_MSG.
            _ => return None,
        }
    }
    Some(parts)
}

/// What a request becomes before its reply.
struct Request {
    op: Op,
    /// Command name, for reading the reply (row counts).
    command: String,
    /// A legacy OP_QUERY on a collection (not `$cmd`): its reply's documents are rows.
    legacy_query: bool,
    no_reply: bool,
}

/// Builds the op of a command document (OP_MSG body or OP_QUERY `$cmd` query).
fn command_op(
    body: Doc<'_>,
    seqs: &[(&[u8], Vec<Doc<'_>>)],
    db: Option<String>,
    max: usize,
) -> Option<Request> {
    let (name, first) = body.first()?;
    let command = lossy(name);
    let mut op = Op {
        name: command.clone(),
        ..Op::default()
    };
    op.attr("db.operation", command.clone());
    let collection = match (command.as_str(), first) {
        ("getMore", _) => body.get("collection").and_then(BsonValue::str),
        (_, v) => v.str(),
    };
    if let Some(c) = collection {
        op.attr("db.mongodb.collection", c);
    }
    let db = db.or_else(|| body.get("$db").and_then(BsonValue::str));
    if let Some(db) = db {
        op.attr("db.name", db);
    }
    let lower = command.to_ascii_lowercase();
    let sensitive = SENSITIVE.contains(&lower.as_str());
    let handshake = matches!(lower.as_str(), "hello" | "ismaster");
    let keep = |i: usize, k: &[u8]| {
        if sensitive {
            return i == 0 || k == b"$db";
        }
        // A handshake may carry a first authentication step (speculativeAuthenticate).
        let secret = handshake && k == b"speculativeAuthenticate";
        !(secret || DROPPED_FIELDS.contains(&k))
    };
    let mut out = ExtJson::new(max);
    let extra = |out: &mut ExtJson, empty: bool| {
        if sensitive {
            return;
        }
        // Document sequences are fields of the command (OP_MSG spec: "the identifier
        // … is the name of the field"); PyMongo's events show them that way.
        let mut empty = empty;
        for (ident, docs) in seqs {
            if !empty {
                out.push(", ");
            }
            empty = false;
            out.string(ident);
            out.push(": [");
            for (i, d) in docs.iter().enumerate() {
                if out.full() {
                    break;
                }
                if i > 0 {
                    out.push(", ");
                }
                out.doc(*d, 1, &|_, _| true);
            }
            out.push("]");
        }
    };
    out.doc_with(body, 0, &keep, &extra);
    op.attr("db.statement", truncate_statement(&out.s, max));
    Some(Request {
        op,
        command,
        legacy_query: false,
        no_reply: false,
    })
}

fn decode_request(m: &Message, max: usize) -> Option<Request> {
    match m.header.op {
        OP_MSG => {
            let parts = op_msg_parts(m, max / 4 + 2)?;
            let mut req = command_op(parts.body?, &parts.seqs, None, max)?;
            req.no_reply = parts.flags & MORE_TO_COME != 0;
            Some(req)
        }
        OP_QUERY => {
            // flags, fullCollectionName, numberToSkip, numberToReturn, query.
            let (ns, r) = cstring(m.body.get(4..)?)?;
            let query = if m.cut {
                doc_prefix(r.get(8..)?)?
            } else {
                doc_at(r.get(8..)?)?.0
            };
            let ns = lossy(ns);
            let (db, coll) = ns.split_once('.').unwrap_or((ns.as_str(), ""));
            // Legacy wrapped form: {$query: {...}, $readPreference: ...}.
            let query = match query.first() {
                Some((b"$query" | b"query", BsonValue::Doc(inner))) => inner,
                _ => query,
            };
            if coll == "$cmd" {
                return command_op(query, &[], Some(db.to_string()), max);
            }
            // A pre-3.2 query on a collection: a find.
            let mut op = Op {
                name: "find".into(),
                ..Op::default()
            };
            op.attr("db.operation", "find");
            op.attr("db.mongodb.collection", coll);
            op.attr("db.name", db);
            let mut out = ExtJson::new(max);
            out.doc(query, 0, &|_, k| !DROPPED_FIELDS.contains(&k));
            op.attr("db.statement", truncate_statement(&out.s, max));
            Some(Request {
                op,
                command: "find".into(),
                legacy_query: true,
                no_reply: false,
            })
        }
        OP_COMPRESSED => {
            // The payload is snappy/zlib/zstd: not decoded. The op still shows the round
            // trip's timing; without a command name it is called "compressed".
            Some(Request {
                op: Op {
                    name: "compressed".into(),
                    ..Op::default()
                },
                command: String::new(),
                legacy_query: false,
                no_reply: false,
            })
        }
        _ => None,
    }
}

/// Reads a reply document into the op: error status, error code, row count.
fn apply_reply(op: &mut Op, command: &str, d: Doc<'_>) {
    let err = |v: Option<BsonValue<'_>>| -> (Option<String>, Option<i64>) {
        let Some(e) = v.and_then(BsonValue::doc) else {
            return (None, None);
        };
        (
            e.get("errmsg").and_then(BsonValue::str),
            e.get("code").and_then(BsonValue::int),
        )
    };
    let (message, code) = if d.get("ok").and_then(BsonValue::number) == Some(0.0) {
        let msg = d
            .get("errmsg")
            .and_then(BsonValue::str)
            .or_else(|| d.get("codeName").and_then(BsonValue::str));
        (
            Some(msg.unwrap_or_else(|| "command failed".into())),
            d.get("code").and_then(BsonValue::int),
        )
    } else if let Some((_, first)) = d
        .get("writeErrors")
        .and_then(BsonValue::doc)
        .and_then(Doc::first)
    {
        let (m, c) = err(Some(first));
        (Some(m.unwrap_or_else(|| "write error".into())), c)
    } else if d.get("writeConcernError").is_some() {
        let (m, c) = err(d.get("writeConcernError"));
        (Some(m.unwrap_or_else(|| "write concern error".into())), c)
    } else {
        (None, None)
    };
    if let Some(m) = message {
        op.status = StatusCode::Error;
        op.status_description = Some(m);
        if let Some(c) = code {
            op.attr("db.error.code", c);
        }
    }
    let rows = match command {
        "insert" | "update" | "delete" => d.get("n").and_then(BsonValue::int),
        "find" | "aggregate" | "getMore" => {
            let batch = if command == "getMore" {
                "nextBatch"
            } else {
                "firstBatch"
            };
            d.get("cursor")
                .and_then(BsonValue::doc)
                .and_then(|c| c.get(batch))
                .and_then(BsonValue::doc)
                .filter(|b| b.complete)
                .map(|b| b.iter().count() as i64)
        }
        _ => None,
    };
    if let Some(n) = rows {
        op.attr("db.rowcount", n);
    }
}

/// Applies a reply message to its request's op. False when its body was unreadable.
fn decode_reply(op: &mut Op, req_command: &str, legacy_query: bool, m: &Message) -> bool {
    match m.header.op {
        OP_MSG => {
            let Some(body) = op_msg_parts(m, 0).and_then(|p| p.body) else {
                return false;
            };
            apply_reply(op, req_command, body);
            true
        }
        OP_REPLY => {
            // responseFlags, cursorID, startingFrom, numberReturned, documents.
            let Some(flags) = le_i32(&m.body, 0) else {
                return false;
            };
            let returned = le_i32(&m.body, 16);
            let first = m.body.get(20..).and_then(doc_prefix);
            if flags & QUERY_FAILURE != 0 {
                op.status = StatusCode::Error;
                let msg = first.and_then(|d| d.get("$err")).and_then(BsonValue::str);
                op.status_description = Some(msg.unwrap_or_else(|| "query failure".into()));
                if let Some(c) = first.and_then(|d| d.get("code")).and_then(BsonValue::int) {
                    op.attr("db.error.code", c);
                }
            } else if flags & CURSOR_NOT_FOUND != 0 {
                op.status = StatusCode::Error;
                op.status_description = Some("cursor not found".into());
            } else if legacy_query {
                if let Some(n) = returned {
                    op.attr("db.rowcount", i64::from(n));
                }
            } else if let Some(d) = first {
                apply_reply(op, req_command, d);
            } else {
                return false;
            }
            true
        }
        // Compressed: the round trip is known, its outcome is not.
        OP_COMPRESSED => true,
        _ => false,
    }
}

struct Pending {
    request_id: i32,
    req: Request,
    /// The server side lost bytes (at this timestamp) while this request waited: its
    /// reply may have been among them.
    reply_lost_at: Option<u64>,
}

pub struct MongoParser {
    cfg: ParserConfig,
    losses: Losses,
    client: Stream,
    server: Stream,
    pending: VecDeque<Pending>,
    /// Last reply of each exhaust stream followed (sent with moreToCome): the server's
    /// next reply on it answers that reply, not a request.
    exhaust: VecDeque<i32>,
    /// Requests the client side lost, counted then, whose replies may still come: a
    /// reply that answers no request seen takes one of these rather than being counted
    /// again (each lost exchange is counted once).
    counted_ahead: u64,
    closed: bool,
}

impl MongoParser {
    pub fn new(cfg: ParserConfig) -> Self {
        Self {
            cfg,
            losses: Losses::default(),
            client: Stream::default(),
            server: Stream::default(),
            pending: VecDeque::new(),
            exhaust: VecDeque::new(),
            counted_ahead: 0,
            closed: false,
        }
    }

    fn stream(&mut self, side: Side) -> &mut Stream {
        match side {
            Side::Client => &mut self.client,
            Side::Server => &mut self.server,
        }
    }

    /// A captured piece. While this side's framing is lost it resumes only at a piece
    /// that starts a message; the pieces that do not are dropped.
    fn drive(&mut self, side: Side, data: &[u8], ts: u64, out: &mut Vec<Op>) {
        if self.closed || data.is_empty() {
            return;
        }
        let st = self.stream(side);
        if st.lost {
            if st.held.is_empty() {
                match judge(side, data) {
                    Verdict::Starts => st.lost = false,
                    Verdict::Not => return self.dropped(side, ts),
                    Verdict::More => return st.held.push((ts, data.to_vec())),
                }
            } else {
                // Each held piece's start is judged in turn, with the bytes after it.
                st.held.push((ts, data.to_vec()));
                loop {
                    let st = self.stream(side);
                    match judge(side, &st.held_prefix(0)) {
                        Verdict::More => return,
                        Verdict::Not => {
                            let (t, _) = st.held.remove(0);
                            let empty = st.held.is_empty();
                            self.dropped(side, t);
                            if empty {
                                return;
                            }
                        }
                        Verdict::Starts => {
                            let held = std::mem::take(&mut st.held);
                            st.lost = false;
                            for (t, d) in held {
                                self.drive(side, &d, t, out);
                            }
                            return;
                        }
                    }
                }
            }
        }
        self.frame(side, data, ts, out);
    }

    /// Frames the messages of an in-sync stream.
    fn frame(&mut self, side: Side, mut data: &[u8], ts: u64, out: &mut Vec<Op>) {
        let keep = self.cfg.max_buffer.saturating_sub(HEADER);
        while !data.is_empty() {
            match self.stream(side).step(&mut data, ts, keep) {
                Ok(None) => return,
                // Not a header: the rest of this piece is not framed.
                Err(()) => return self.lose(side, Loss::Malformed, ts),
                Ok(Some(m)) => self.dispatch(side, &m, out),
            }
        }
    }

    /// A piece that does not start a message, on a side whose framing is lost: counted
    /// once per loss (a stream watched from a message's middle is counted here).
    fn dropped(&mut self, side: Side, ts: u64) {
        let st = self.stream(side);
        if !st.counted {
            st.counted = true;
            self.count(side, Loss::Malformed);
        }
        if side == Side::Server {
            self.server_lost_at(ts);
        }
    }

    /// A loss on `side`, counted once. On the client side it stands for the lost
    /// request's whole exchange: its reply is not counted again.
    fn count(&mut self, side: Side, why: Loss) {
        self.losses.add(why);
        if side == Side::Client {
            self.counted_ahead += 1;
        }
    }

    /// This side's framing is lost (`why`): counted, and resumed at a piece that starts
    /// a message.
    fn lose(&mut self, side: Side, why: Loss, ts: u64) {
        self.count(side, why);
        self.stream(side).lose();
        if side == Side::Server {
            self.server_lost_at(ts);
        }
    }

    /// The server's bytes at `ts` were not read: the replies of the requests waiting
    /// since before them may have been among them.
    fn server_lost_at(&mut self, ts: u64) {
        for p in self.pending.iter_mut().filter(|p| p.req.op.start_ts <= ts) {
            p.reply_lost_at.get_or_insert(ts);
        }
    }

    fn dispatch(&mut self, side: Side, m: &Message, out: &mut Vec<Op>) {
        match side {
            Side::Client => self.request(m, out),
            Side::Server => self.reply(m, out),
        }
    }

    fn request(&mut self, m: &Message, out: &mut Vec<Op>) {
        let Some(mut req) = decode_request(m, self.cfg.max_statement) else {
            // Undecodable, a legacy opcode, or a reply opcode from the client.
            self.count(Side::Client, Loss::Malformed);
            return;
        };
        req.op.start_ts = m.start_ts;
        req.op.end_ts = m.end_ts;
        if req.no_reply {
            // moreToCome: the server sends nothing back (e.g. w:0 writes).
            out.push(req.op);
            return;
        }
        if self.pending.len() >= MAX_PENDING {
            // Replies are not reaching us: the oldest request is reported without one.
            self.losses.add(Loss::Oversize);
            if let Some(old) = self.pending.pop_front() {
                out.push(unanswered(old, m.start_ts));
            }
        }
        self.pending.push_back(Pending {
            request_id: m.header.request_id,
            req,
            reply_lost_at: None,
        });
    }

    fn reply(&mut self, m: &Message, out: &mut Vec<Op>) {
        let more =
            m.header.op == OP_MSG && le_u32(&m.body, 0).is_some_and(|f| f & MORE_TO_COME != 0);
        let to = m.header.response_to;
        let Some(i) = self.pending.iter().position(|p| p.request_id == to) else {
            // A later reply of an exhaust stream (a cursor, a streaming hello) answers
            // the reply before it; anything else answers a request not seen.
            match self.exhaust.iter().position(|&id| id == to) {
                Some(j) => {
                    self.exhaust.remove(j);
                }
                None if self.counted_ahead > 0 => self.counted_ahead -= 1,
                None => {
                    self.losses.add(Loss::Unpaired);
                    if self.client.lost && !self.client.held.is_empty() {
                        // The client's bytes held to be judged (too short to tell) are
                        // the rest of this reply's request: dropped later, not counted
                        // again.
                        self.client.counted = true;
                    }
                }
            }
            if more {
                self.follow_exhaust(m.header.request_id);
            }
            return;
        };
        // The server answers in order: requests asked before this one and still
        // waiting had their replies in bytes the server side lost.
        let mut j = 0;
        let mut i = i;
        while j < i {
            if self.pending[j].reply_lost_at.is_some() {
                if let Some(p) = self.pending.remove(j) {
                    let end = p.reply_lost_at.unwrap_or(m.start_ts);
                    out.push(unanswered(p, end));
                }
                i -= 1;
            } else {
                j += 1;
            }
        }
        let Some(p) = self.pending.remove(i) else {
            return;
        };
        let mut op = p.req.op;
        op.end_ts = m.end_ts;
        if !decode_reply(&mut op, &p.req.command, p.req.legacy_query, m) {
            self.losses.add(Loss::Malformed);
        }
        out.push(op);
        if more {
            self.follow_exhaust(m.header.request_id);
        }
    }

    fn follow_exhaust(&mut self, reply_id: i32) {
        if self.exhaust.len() >= MAX_EXHAUST {
            self.exhaust.pop_front();
        }
        self.exhaust.push_back(reply_id);
    }
}

/// A request whose reply was not seen, reported ending at `end_ts` (where the server's
/// bytes were lost, or when it was given up): outcome unknown.
fn unanswered(p: Pending, end_ts: u64) -> Op {
    let mut op = p.req.op;
    op.end_ts = end_ts;
    if p.reply_lost_at.is_some() {
        op.attr("db.response_truncated", true);
    }
    op
}

impl Parser for MongoParser {
    fn protocol(&self) -> Protocol {
        Protocol::Mongo
    }

    fn feed(&mut self, side: Side, data: &[u8], ts: u64, out: &mut Vec<Op>) {
        self.drive(side, data, ts, out);
    }

    fn gap(&mut self, side: Side, n: u64, ts: u64, out: &mut Vec<Op>) {
        if self.closed || n == 0 {
            return;
        }
        let st = self.stream(side);
        if st.lost {
            // Nothing framed to lose; a piece held to be judged is followed by a hole.
            st.held.clear();
            if !st.counted {
                st.counted = true;
                self.count(side, Loss::Gap);
            }
            if side == Side::Server {
                self.server_lost_at(ts);
            }
            return;
        }
        let (m, lost) = st.skip(n, ts);
        if let Some(m) = m {
            self.dispatch(side, &m, out);
        }
        if lost {
            // Bytes between messages are gone: no length to frame the rest on.
            self.lose(side, Loss::Gap, ts);
        }
    }

    fn close(&mut self, ts: u64, out: &mut Vec<Op>) {
        if self.closed {
            return;
        }
        if self.client.mid_message() || self.server.mid_message() {
            // Cut by the close: never completed.
            self.losses.add(Loss::Malformed);
        }
        for p in std::mem::take(&mut self.pending) {
            let end = p.reply_lost_at.unwrap_or(ts);
            out.push(unanswered(p, end));
        }
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
