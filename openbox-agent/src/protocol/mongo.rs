//! MongoDB wire protocol parser: OP_MSG (all current drivers), OP_QUERY/OP_REPLY (the
//! legacy handshake), OP_COMPRESSED (framed, not decompressed).
//!
//! Every message starts with a 16-byte little-endian header whose first field is the
//! whole message's length, so framing never depends on the body: a message is buffered
//! (at most `max_buffer` bytes of it) and decoded when its last byte arrives. Replies
//! name the request they answer (`responseTo == requestID`), so pairing is by id, not
//! order. The BSON reader below borrows from the message bytes and never recurses deeper
//! than `MAX_DEPTH`.

use std::collections::VecDeque;

use base64::Engine as _;

use super::{truncate_statement, Op, Parser, ParserConfig, Protocol, Side, StatusCode};

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

fn rd<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}
fn rd_i32(b: &[u8], at: usize) -> Option<i32> {
    rd(b, at).map(i32::from_le_bytes)
}
fn rd_u32(b: &[u8], at: usize) -> Option<u32> {
    rd(b, at).map(u32::from_le_bytes)
}
fn rd_i64(b: &[u8], at: usize) -> Option<i64> {
    rd(b, at).map(i64::from_le_bytes)
}

impl Header {
    fn parse(b: &[u8]) -> Option<Header> {
        Some(Header {
            len: u32::try_from(rd_i32(b, 0)?).ok()?,
            request_id: rd_i32(b, 4)?,
            response_to: rd_i32(b, 8)?,
            op: rd_i32(b, 12)?,
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

#[derive(Clone, Copy, Debug)]
enum Bv<'a> {
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
    let size = usize::try_from(rd_i32(b, 0)?).ok()?;
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
    let size = usize::try_from(rd_i32(b, 0)?).ok()?;
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

fn cstring(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = b.iter().position(|&c| c == 0)?;
    Some((b.get(..nul)?, b.get(nul + 1..)?))
}

/// BSON `string`: int32 length (including the trailing NUL), bytes, NUL.
fn bson_string(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::try_from(rd_i32(b, 0)?).ok()?;
    let end = len.checked_add(4)?;
    let (&nul, s) = b.get(4..end)?.split_last()?;
    (nul == 0).then_some((s, b.get(end..)?))
}

fn fixed(b: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
    Some((b.get(..n)?, b.get(n..)?))
}

fn element(b: &[u8]) -> Option<(&[u8], Bv<'_>, &[u8])> {
    let (&ty, rest) = b.split_first()?;
    let (name, r) = cstring(rest)?;
    let (v, r) = match ty {
        0x01 => {
            let (x, r) = fixed(r, 8)?;
            (Bv::Double(f64::from_le_bytes(x.try_into().ok()?)), r)
        }
        0x02 | 0x0D | 0x0E => {
            let (s, r) = bson_string(r)?;
            (
                match ty {
                    0x02 => Bv::Str(s),
                    0x0D => Bv::Code(s),
                    _ => Bv::Symbol(s),
                },
                r,
            )
        }
        0x03 | 0x04 => {
            let (d, r) = doc_at(r)?;
            (if ty == 0x03 { Bv::Doc(d) } else { Bv::Array(d) }, r)
        }
        0x05 => {
            let len = usize::try_from(rd_i32(r, 0)?).ok()?;
            let subtype = *r.get(4)?;
            let (data, r) = fixed(r.get(5..)?, len)?;
            (Bv::Binary(subtype, data), r)
        }
        0x06 => (Bv::Undefined, r),
        0x07 => {
            let (oid, r) = fixed(r, 12)?;
            (Bv::ObjectId(oid), r)
        }
        0x08 => {
            let (&x, r) = r.split_first()?;
            (Bv::Bool(x != 0), r)
        }
        0x09 => (Bv::DateTime(rd_i64(r, 0)?), r.get(8..)?),
        0x0A => (Bv::Null, r),
        0x0B => {
            let (pattern, r) = cstring(r)?;
            let (options, r) = cstring(r)?;
            (Bv::Regex(pattern, options), r)
        }
        0x0C => {
            let (ns, r) = bson_string(r)?;
            let (oid, r) = fixed(r, 12)?;
            (Bv::DbPointer(ns, oid), r)
        }
        0x0F => {
            // int32 total length, string code, document scope.
            let total = usize::try_from(rd_i32(r, 0)?).ok()?;
            let (whole, after) = fixed(r, total)?;
            let (code, s) = bson_string(whole.get(4..)?)?;
            let (scope, _) = doc_at(s)?;
            (Bv::CodeWithScope(code, scope), after)
        }
        0x10 => (Bv::Int32(rd_i32(r, 0)?), r.get(4..)?),
        // uint64: increment in the low 32 bits, seconds in the high 32 bits.
        0x11 => (Bv::Timestamp(rd_u32(r, 4)?, rd_u32(r, 0)?), r.get(8..)?),
        0x12 => (Bv::Int64(rd_i64(r, 0)?), r.get(8..)?),
        0x13 => {
            let (d, r) = fixed(r, 16)?;
            (Bv::Decimal128(d), r)
        }
        0xFF => (Bv::MinKey, r),
        0x7F => (Bv::MaxKey, r),
        _ => return None,
    };
    Some((name, v, r))
}

/// Elements in order; a malformed element (or the cut of an incomplete document) ends
/// the iteration.
struct Elems<'a>(&'a [u8]);

impl<'a> Iterator for Elems<'a> {
    type Item = (&'a [u8], Bv<'a>);
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
    fn get(self, key: &str) -> Option<Bv<'a>> {
        self.iter()
            .find(|(k, _)| *k == key.as_bytes())
            .map(|(_, v)| v)
    }
    fn first(self) -> Option<(&'a [u8], Bv<'a>)> {
        self.iter().next()
    }
}

impl<'a> Bv<'a> {
    fn number(self) -> Option<f64> {
        match self {
            Bv::Double(x) => Some(x),
            Bv::Int32(n) => Some(f64::from(n)),
            Bv::Int64(n) => Some(n as f64),
            Bv::Bool(b) => Some(if b { 1.0 } else { 0.0 }),
            _ => None,
        }
    }
    fn int(self) -> Option<i64> {
        match self {
            Bv::Int32(n) => Some(i64::from(n)),
            Bv::Int64(n) => Some(n),
            Bv::Double(x) if x.fract() == 0.0 && x.abs() < 9.0e15 => Some(x as i64),
            _ => None,
        }
    }
    fn str(self) -> Option<String> {
        match self {
            Bv::Str(s) => Some(String::from_utf8_lossy(s).into_owned()),
            _ => None,
        }
    }
    fn doc(self) -> Option<Doc<'a>> {
        match self {
            Bv::Doc(d) | Bv::Array(d) => Some(d),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Rendering as relaxed Extended JSON (MongoDB Extended JSON v2, relaxed mode)
// ---------------------------------------------------------------------------------------

/// Output bounded in characters: once past `max`, further pushes are dropped and the
/// caller's `truncate_statement` marks the cut.
struct Out {
    s: String,
    chars: usize,
    max: usize,
}

impl Out {
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

    fn value(&mut self, v: Bv<'_>, depth: usize) {
        match v {
            Bv::Double(x) => {
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
            Bv::Str(s) => self.string(s),
            Bv::Doc(d) => self.doc(d, depth + 1, &|_, _| true),
            Bv::Array(d) => self.array(d, depth + 1),
            Bv::Binary(sub, data) => {
                let data = data.get(..self.budget()).unwrap_or(data);
                let b64 = base64::engine::general_purpose::STANDARD.encode(data);
                self.push(&format!(
                    "{{\"$binary\": {{\"base64\": \"{b64}\", \"subType\": \"{sub:02x}\"}}}}"
                ));
            }
            Bv::Undefined => self.push("{\"$undefined\": true}"),
            Bv::ObjectId(oid) => {
                self.push("{\"$oid\": \"");
                self.hex(oid);
                self.push("\"}");
            }
            Bv::Bool(b) => self.push(if b { "true" } else { "false" }),
            Bv::DateTime(ms) => match iso_date(ms) {
                Some(iso) => self.push(&format!("{{\"$date\": \"{iso}\"}}")),
                None => self.push(&format!("{{\"$date\": {{\"$numberLong\": \"{ms}\"}}}}")),
            },
            Bv::Null => self.push("null"),
            Bv::Regex(p, o) => {
                self.push("{\"$regularExpression\": {\"pattern\": ");
                self.string(p);
                self.push(", \"options\": ");
                self.string(o);
                self.push("}}");
            }
            Bv::DbPointer(ns, oid) => {
                self.push("{\"$dbPointer\": {\"$ref\": ");
                self.string(ns);
                self.push(", \"$id\": {\"$oid\": \"");
                self.hex(oid);
                self.push("\"}}}");
            }
            Bv::Code(c) => {
                self.push("{\"$code\": ");
                self.string(c);
                self.push("}");
            }
            Bv::Symbol(s) => {
                self.push("{\"$symbol\": ");
                self.string(s);
                self.push("}");
            }
            Bv::CodeWithScope(c, scope) => {
                self.push("{\"$code\": ");
                self.string(c);
                self.push(", \"$scope\": ");
                self.doc(scope, depth + 1, &|_, _| true);
                self.push("}");
            }
            Bv::Int32(n) => self.push(&n.to_string()),
            Bv::Timestamp(t, i) => {
                self.push(&format!("{{\"$timestamp\": {{\"t\": {t}, \"i\": {i}}}}}"))
            }
            Bv::Int64(n) => self.push(&n.to_string()),
            Bv::Decimal128(d) => {
                self.push(&format!("{{\"$numberDecimal\": \"{}\"}}", decimal128(d)))
            }
            Bv::MinKey => self.push("{\"$minKey\": 1}"),
            Bv::MaxKey => self.push("{\"$maxKey\": 1}"),
        }
    }

    /// `{"k": v, …}` with the elements `keep(index, name)` accepts; `extra` renders more
    /// fields (an OP_MSG document sequence) before the closing brace.
    fn doc_with(
        &mut self,
        d: Doc<'_>,
        depth: usize,
        keep: &dyn Fn(usize, &[u8]) -> bool,
        extra: &dyn Fn(&mut Out, bool),
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

#[derive(Default)]
struct Stream {
    hdr: Vec<u8>,
    header: Option<Header>,
    body: Vec<u8>,
    /// Body bytes seen of the current message (kept or not).
    got: u64,
    /// Some body bytes were not kept: over the buffer limit, or lost in a gap.
    cut: bool,
    start_ts: u64,
    dead: bool,
}

impl Stream {
    fn mid_message(&self) -> bool {
        !self.hdr.is_empty() || self.header.is_some()
    }

    /// The next complete message, `Ok(None)` when more bytes are needed, `Err` when the
    /// bytes are not a message header.
    fn step(
        &mut self,
        data: &[u8],
        pos: &mut usize,
        ts: u64,
        keep: usize,
    ) -> Result<Option<Message>, ()> {
        loop {
            match self.header {
                None => {
                    let rest = data.get(*pos..).unwrap_or_default();
                    if rest.is_empty() {
                        return Ok(None);
                    }
                    if self.hdr.is_empty() {
                        self.start_ts = ts;
                    }
                    let take = (HEADER - self.hdr.len()).min(rest.len());
                    self.hdr
                        .extend_from_slice(rest.get(..take).unwrap_or_default());
                    *pos += take;
                    if self.hdr.len() < HEADER {
                        return Ok(None);
                    }
                    let h = Header::parse(&self.hdr).ok_or(())?;
                    if !(HEADER as u32..=MAX_MESSAGE).contains(&h.len) || !h.known_op() {
                        return Err(());
                    }
                    self.hdr.clear();
                    self.header = Some(h);
                    self.body.clear();
                    self.got = 0;
                    self.cut = false;
                }
                Some(h) => {
                    let need = u64::from(h.len) - HEADER as u64 - self.got;
                    if need == 0 {
                        self.header = None;
                        return Ok(Some(Message {
                            header: h,
                            body: std::mem::take(&mut self.body),
                            cut: self.cut,
                            start_ts: self.start_ts,
                            end_ts: ts,
                        }));
                    }
                    let rest = data.get(*pos..).unwrap_or_default();
                    if rest.is_empty() {
                        return Ok(None);
                    }
                    let take = rest.len().min(usize::try_from(need).unwrap_or(usize::MAX));
                    // Keep a prefix up to the limit; after a gap nothing more is kept, as
                    // later bytes would sit at wrong offsets.
                    let room = if self.cut {
                        0
                    } else {
                        keep.saturating_sub(self.body.len()).min(take)
                    };
                    self.body
                        .extend_from_slice(rest.get(..room).unwrap_or_default());
                    if room < take {
                        self.cut = true;
                    }
                    self.got += take as u64;
                    *pos += take;
                }
            }
        }
    }

    /// `n` bytes lost: skippable only inside a message whose length we know.
    fn skip(&mut self, n: u64) -> bool {
        let Some(h) = self.header else { return false };
        let need = u64::from(h.len) - HEADER as u64 - self.got;
        if n > need {
            return false;
        }
        self.got += n;
        self.cut = true;
        true
    }
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
    let flags = rd_u32(&m.body, 0)?;
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
                let size = usize::try_from(rd_i32(rest, 0)?).ok()?;
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

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
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
        ("getMore", _) => body.get("collection").and_then(Bv::str),
        (_, v) => v.str(),
    };
    if let Some(c) = collection {
        op.attr("db.mongodb.collection", c);
    }
    let db = db.or_else(|| body.get("$db").and_then(Bv::str));
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
    let mut out = Out::new(max);
    let extra = |out: &mut Out, empty: bool| {
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
                Some((b"$query" | b"query", Bv::Doc(inner))) => inner,
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
            let mut out = Out::new(max);
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
    let err = |v: Option<Bv<'_>>| -> (Option<String>, Option<i64>) {
        let Some(e) = v.and_then(Bv::doc) else {
            return (None, None);
        };
        (
            e.get("errmsg").and_then(Bv::str),
            e.get("code").and_then(Bv::int),
        )
    };
    let (message, code) = if d.get("ok").and_then(Bv::number) == Some(0.0) {
        let msg = d
            .get("errmsg")
            .and_then(Bv::str)
            .or_else(|| d.get("codeName").and_then(Bv::str));
        (
            Some(msg.unwrap_or_else(|| "command failed".into())),
            d.get("code").and_then(Bv::int),
        )
    } else if let Some((_, first)) = d.get("writeErrors").and_then(Bv::doc).and_then(Doc::first) {
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
        "insert" | "update" | "delete" => d.get("n").and_then(Bv::int),
        "find" | "aggregate" | "getMore" => {
            let batch = if command == "getMore" {
                "nextBatch"
            } else {
                "firstBatch"
            };
            d.get("cursor")
                .and_then(Bv::doc)
                .and_then(|c| c.get(batch))
                .and_then(Bv::doc)
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
            let Some(flags) = rd_i32(&m.body, 0) else {
                return false;
            };
            let returned = rd_i32(&m.body, 16);
            let first = m.body.get(20..).and_then(doc_prefix);
            if flags & QUERY_FAILURE != 0 {
                op.status = StatusCode::Error;
                let msg = first.and_then(|d| d.get("$err")).and_then(Bv::str);
                op.status_description = Some(msg.unwrap_or_else(|| "query failure".into()));
                if let Some(c) = first.and_then(|d| d.get("code")).and_then(Bv::int) {
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
}

pub struct MongoParser {
    cfg: ParserConfig,
    unparsed: u64,
    client: Stream,
    server: Stream,
    pending: VecDeque<Pending>,
}

impl MongoParser {
    pub fn new(cfg: ParserConfig) -> Self {
        Self {
            cfg,
            unparsed: 0,
            client: Stream::default(),
            server: Stream::default(),
            pending: VecDeque::new(),
        }
    }

    fn drive(&mut self, side: Side, data: &[u8], ts: u64, out: &mut Vec<Op>) {
        let keep = self.cfg.max_buffer.saturating_sub(HEADER);
        let mut pos = 0;
        loop {
            let stream = match side {
                Side::Client => &mut self.client,
                Side::Server => &mut self.server,
            };
            if stream.dead {
                return;
            }
            match stream.step(data, &mut pos, ts, keep) {
                Ok(None) => return,
                Err(()) => return self.give_up(side, ts, out),
                Ok(Some(m)) => match side {
                    Side::Client => self.request(&m, out),
                    Side::Server => self.reply(&m, out),
                },
            }
        }
    }

    fn request(&mut self, m: &Message, out: &mut Vec<Op>) {
        let Some(mut req) = decode_request(m, self.cfg.max_statement) else {
            // Undecodable, a legacy opcode, or a reply opcode from the client.
            self.unparsed += 1;
            return;
        };
        req.op.start_ts = m.start_ts;
        req.op.end_ts = m.end_ts;
        if req.no_reply || self.server.dead {
            // moreToCome: the server sends nothing back (e.g. w:0 writes).
            out.push(req.op);
            return;
        }
        if self.pending.len() >= MAX_PENDING {
            if let Some(old) = self.pending.pop_front() {
                out.push(old.req.op);
            }
        }
        self.pending.push_back(Pending {
            request_id: m.header.request_id,
            req,
        });
    }

    fn reply(&mut self, m: &Message, out: &mut Vec<Op>) {
        // Replies answering no request we hold are normal for exhaust cursors and
        // streaming hello (each later reply answers the previous reply), so not counted.
        let Some(i) = self
            .pending
            .iter()
            .position(|p| p.request_id == m.header.response_to)
        else {
            return;
        };
        let Some(p) = self.pending.remove(i) else {
            return;
        };
        let mut op = p.req.op;
        op.end_ts = m.end_ts;
        if !decode_reply(&mut op, &p.req.command, p.req.legacy_query, m) {
            self.unparsed += 1;
        }
        out.push(op);
    }

    /// This side's framing is lost. Counted once. Client side: requests already held still
    /// get their replies (pairing is by id). Server side: waiting requests are reported
    /// now without a reply, later ones as they come.
    fn give_up(&mut self, side: Side, ts: u64, out: &mut Vec<Op>) {
        self.unparsed += 1;
        match side {
            Side::Client => self.client.dead = true,
            Side::Server => {
                self.server.dead = true;
                self.flush(ts, out);
            }
        }
    }

    fn flush(&mut self, ts: u64, out: &mut Vec<Op>) {
        for p in self.pending.drain(..) {
            let mut op = p.req.op;
            op.end_ts = ts;
            out.push(op);
        }
    }
}

impl Parser for MongoParser {
    fn protocol(&self) -> Protocol {
        Protocol::Mongo
    }

    fn feed(&mut self, side: Side, data: &[u8], ts: u64, out: &mut Vec<Op>) {
        self.drive(side, data, ts, out);
    }

    fn gap(&mut self, side: Side, n: u64, ts: u64, out: &mut Vec<Op>) {
        let stream = match side {
            Side::Client => &mut self.client,
            Side::Server => &mut self.server,
        };
        if stream.dead || n == 0 {
            return;
        }
        if stream.skip(n) {
            // The gap may have been the message's end: finish it.
            self.drive(side, &[], ts, out);
        } else {
            self.give_up(side, ts, out);
        }
    }

    fn close(&mut self, ts: u64, out: &mut Vec<Op>) {
        if (!self.client.dead && self.client.mid_message())
            || (!self.server.dead && self.server.mid_message())
        {
            self.unparsed += 1;
        }
        self.flush(ts, out);
        self.client.dead = true;
        self.server.dead = true;
    }

    fn unparsed(&self) -> u64 {
        self.unparsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Side::{Client as C, Server as S};

    /// BSON document builder for tests.
    #[derive(Default, Clone)]
    struct B(Vec<u8>);

    impl B {
        fn el(mut self, ty: u8, k: &str, v: &[u8]) -> Self {
            self.0.push(ty);
            self.0.extend_from_slice(k.as_bytes());
            self.0.push(0);
            self.0.extend_from_slice(v);
            self
        }
        fn s(self, k: &str, v: &str) -> Self {
            let mut b = ((v.len() + 1) as i32).to_le_bytes().to_vec();
            b.extend_from_slice(v.as_bytes());
            b.push(0);
            self.el(0x02, k, &b)
        }
        fn i32(self, k: &str, v: i32) -> Self {
            self.el(0x10, k, &v.to_le_bytes())
        }
        fn i64(self, k: &str, v: i64) -> Self {
            self.el(0x12, k, &v.to_le_bytes())
        }
        fn f64(self, k: &str, v: f64) -> Self {
            self.el(0x01, k, &v.to_le_bytes())
        }
        fn bool(self, k: &str, v: bool) -> Self {
            self.el(0x08, k, &[u8::from(v)])
        }
        fn d(self, k: &str, d: B) -> Self {
            self.el(0x03, k, &d.build())
        }
        fn arr(self, k: &str, items: Vec<B>) -> Self {
            let mut a = B::default();
            for (i, d) in items.into_iter().enumerate() {
                a = a.d(&i.to_string(), d);
            }
            self.el(0x04, k, &a.build())
        }
        fn build(&self) -> Vec<u8> {
            let mut v = ((self.0.len() + 5) as i32).to_le_bytes().to_vec();
            v.extend_from_slice(&self.0);
            v.push(0);
            v
        }
    }

    fn header(len: usize, id: i32, to: i32, op: i32) -> Vec<u8> {
        let mut v = (len as i32).to_le_bytes().to_vec();
        v.extend(id.to_le_bytes());
        v.extend(to.to_le_bytes());
        v.extend(op.to_le_bytes());
        v
    }

    fn op_msg(id: i32, to: i32, flags: u32, body: &B, seq: Option<(&str, Vec<B>)>) -> Vec<u8> {
        let mut b = flags.to_le_bytes().to_vec();
        b.push(0);
        b.extend(body.build());
        if let Some((ident, docs)) = seq {
            let docs: Vec<u8> = docs.iter().flat_map(B::build).collect();
            b.push(1);
            b.extend(((4 + ident.len() + 1 + docs.len()) as i32).to_le_bytes());
            b.extend(ident.as_bytes());
            b.push(0);
            b.extend(docs);
        }
        if flags & CHECKSUM_PRESENT != 0 {
            b.extend([0xde, 0xad, 0xbe, 0xef]);
        }
        let mut m = header(b.len() + 16, id, to, OP_MSG);
        m.extend(b);
        m
    }

    fn ok() -> B {
        B::default().f64("ok", 1.0)
    }

    fn run(pieces: &[(Side, &[u8])]) -> (Vec<Op>, MongoParser) {
        let mut p = MongoParser::new(ParserConfig::default());
        let mut out = Vec::new();
        for (i, (side, data)) in pieces.iter().enumerate() {
            p.feed(*side, data, 10 * (i as u64 + 1), &mut out);
        }
        (out, p)
    }

    fn run_bytewise(pieces: &[(Side, &[u8])]) -> Vec<Op> {
        let mut p = MongoParser::new(ParserConfig::default());
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

    fn attr<'a>(op: &'a Op, k: &str) -> &'a serde_json::Value {
        op.attributes.get(k).unwrap_or(&serde_json::Value::Null)
    }

    fn find_pair() -> (Vec<u8>, Vec<u8>) {
        let lsid = B::default().el(
            0x05,
            "id",
            &[
                16, 0, 0, 0, 4, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
            ],
        );
        let find = B::default()
            .s("find", "users")
            .d("filter", B::default().s("name", "ann"))
            .d("lsid", lsid)
            .d(
                "$clusterTime",
                B::default().el(0x11, "clusterTime", &[1, 0, 0, 0, 2, 0, 0, 0]),
            )
            .s("$db", "app");
        let oid = [0x65, 0x5f, 0x1c, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        let reply = B::default()
            .d(
                "cursor",
                B::default()
                    .arr(
                        "firstBatch",
                        vec![
                            B::default().el(0x07, "_id", &oid).s("name", "ann"),
                            B::default().s("name", "ann"),
                        ],
                    )
                    .i64("id", 0)
                    .s("ns", "app.users"),
            )
            .f64("ok", 1.0);
        (
            op_msg(7, 0, 0, &find, None),
            op_msg(100, 7, 0, &reply, None),
        )
    }

    #[test]
    fn op_msg_find_gives_collection_db_statement_and_rowcount() {
        let (req, rep) = find_pair();
        let (ops, p) = run(&[(C, &req), (S, &rep)]);
        assert_eq!(ops.len(), 1);
        let op = &ops[0];
        assert_eq!(op.name, "find");
        assert_eq!(attr(op, "db.operation"), "find");
        assert_eq!(attr(op, "db.mongodb.collection"), "users");
        assert_eq!(attr(op, "db.name"), "app");
        assert_eq!(
            attr(op, "db.statement"),
            r#"{"find": "users", "filter": {"name": "ann"}, "$db": "app"}"#
        );
        assert_eq!(attr(op, "db.rowcount"), 2);
        assert_eq!(
            (op.start_ts, op.end_ts, op.status),
            (10, 20, StatusCode::Unset)
        );
        assert!(!op.attributes.contains_key("db.system"));
        assert_eq!(p.unparsed(), 0);
        assert!(looks_like_message(&req));
        assert!(!looks_like_message(&rep));
        assert!(!looks_like_message(b"GET / HTTP/1.1\r\nHost: x\r\n"));
    }

    #[test]
    fn bytewise_feeding_gives_the_same_ops() {
        let (req, rep) = find_pair();
        let ins = op_msg(
            8,
            0,
            0,
            &B::default().s("insert", "c").s("$db", "app"),
            Some(("documents", vec![B::default().i32("a", 1)])),
        );
        let ins_rep = op_msg(101, 8, 0, &B::default().i32("n", 1).f64("ok", 1.0), None);
        let pieces: &[(Side, &[u8])] = &[(C, &req), (S, &rep), (C, &ins), (S, &ins_rep)];
        let (whole, _) = run(pieces);
        assert_eq!(whole.len(), 2);
        assert_eq!(run_bytewise(pieces), whole);
    }

    #[test]
    fn insert_with_document_sequence_shows_documents_and_n() {
        let body = B::default()
            .s("insert", "users")
            .bool("ordered", true)
            .s("$db", "app");
        let docs = vec![
            B::default().s("name", "ann").i32("age", 30),
            B::default().s("name", "bob").i32("age", 41),
        ];
        let req = op_msg(9, 0, 0, &body, Some(("documents", docs)));
        let rep = op_msg(200, 9, 0, &B::default().i32("n", 2).f64("ok", 1.0), None);
        let (ops, p) = run(&[(C, &req), (S, &rep)]);
        let op = &ops[0];
        assert_eq!(op.name, "insert");
        assert_eq!(attr(op, "db.mongodb.collection"), "users");
        assert_eq!(
            attr(op, "db.statement"),
            r#"{"insert": "users", "ordered": true, "$db": "app", "documents": [{"name": "ann", "age": 30}, {"name": "bob", "age": 41}]}"#
        );
        assert_eq!(attr(op, "db.rowcount"), 2);
        assert_eq!(op.status, StatusCode::Unset);
        assert_eq!(p.unparsed(), 0);
    }

    #[test]
    fn ok_zero_reply_is_an_error_with_code() {
        let req = op_msg(
            3,
            0,
            0,
            &B::default().s("drop", "nope").s("$db", "app"),
            None,
        );
        let rep = op_msg(
            4,
            3,
            0,
            &B::default()
                .f64("ok", 0.0)
                .s("errmsg", "ns not found")
                .i32("code", 26)
                .s("codeName", "NamespaceNotFound"),
            None,
        );
        let (ops, _) = run(&[(C, &req), (S, &rep)]);
        assert_eq!(ops[0].status, StatusCode::Error);
        assert_eq!(ops[0].status_description.as_deref(), Some("ns not found"));
        assert_eq!(attr(&ops[0], "db.error.code"), 26);
    }

    #[test]
    fn write_errors_make_an_error_status() {
        let req = op_msg(
            5,
            0,
            0,
            &B::default().s("insert", "users").s("$db", "app"),
            Some(("documents", vec![B::default().i32("_id", 1)])),
        );
        let we = B::default()
            .i32("index", 0)
            .i32("code", 11000)
            .s("errmsg", "E11000 duplicate key error");
        let rep = op_msg(
            6,
            5,
            0,
            &B::default()
                .i32("n", 0)
                .arr("writeErrors", vec![we])
                .f64("ok", 1.0),
            None,
        );
        let (ops, _) = run(&[(C, &req), (S, &rep)]);
        assert_eq!(ops[0].status, StatusCode::Error);
        assert_eq!(
            ops[0].status_description.as_deref(),
            Some("E11000 duplicate key error")
        );
        assert_eq!(attr(&ops[0], "db.error.code"), 11000);
        assert_eq!(attr(&ops[0], "db.rowcount"), 0);
    }

    #[test]
    fn out_of_order_replies_pair_by_response_to() {
        let a = op_msg(1, 0, 0, &B::default().s("find", "a").s("$db", "x"), None);
        let b = op_msg(2, 0, 0, &B::default().s("count", "b").s("$db", "x"), None);
        let rb = op_msg(50, 2, 0, &B::default().i32("n", 5).f64("ok", 1.0), None);
        let ra = op_msg(
            51,
            1,
            0,
            &B::default().f64("ok", 0.0).s("errmsg", "boom"),
            None,
        );
        let (ops, p) = run(&[(C, &a), (C, &b), (S, &rb), (S, &ra)]);
        assert_eq!(ops.len(), 2);
        assert_eq!(
            (
                ops[0].name.as_str(),
                ops[0].start_ts,
                ops[0].end_ts,
                ops[0].status
            ),
            ("count", 20, 30, StatusCode::Unset)
        );
        assert_eq!(
            (
                ops[1].name.as_str(),
                ops[1].start_ts,
                ops[1].end_ts,
                ops[1].status
            ),
            ("find", 10, 40, StatusCode::Error)
        );
        assert_eq!(p.unparsed(), 0);
    }

    #[test]
    fn op_query_handshake_pairs_with_op_reply() {
        let q = B::default().i32("isMaster", 1).bool("helloOk", true).d(
            "client",
            B::default().d(
                "driver",
                B::default().s("name", "PyMongo").s("version", "4.6"),
            ),
        );
        let mut body = 0i32.to_le_bytes().to_vec();
        body.extend(b"admin.$cmd\0");
        body.extend(0i32.to_le_bytes());
        body.extend((-1i32).to_le_bytes());
        body.extend(q.build());
        let mut req = header(body.len() + 16, 11, 0, OP_QUERY);
        req.extend(body);
        let doc = B::default()
            .bool("ismaster", true)
            .i32("maxWireVersion", 21)
            .f64("ok", 1.0);
        let mut rb = 0i32.to_le_bytes().to_vec();
        rb.extend(0i64.to_le_bytes());
        rb.extend(0i32.to_le_bytes());
        rb.extend(1i32.to_le_bytes());
        rb.extend(doc.build());
        let mut rep = header(rb.len() + 16, 77, 11, OP_REPLY);
        rep.extend(rb);
        assert!(looks_like_message(&req));
        let (ops, p) = run(&[(C, &req), (S, &rep)]);
        assert_eq!(ops.len(), 1);
        let op = &ops[0];
        assert_eq!(op.name, "isMaster");
        assert_eq!(attr(op, "db.name"), "admin");
        assert!(!op.attributes.contains_key("db.mongodb.collection"));
        assert_eq!(
            attr(op, "db.statement"),
            r#"{"isMaster": 1, "helloOk": true, "client": {"driver": {"name": "PyMongo", "version": "4.6"}}}"#
        );
        assert_eq!(op.status, StatusCode::Unset);
        assert_eq!(p.unparsed(), 0);
        // The same reply with QueryFailure set is an error.
        let mut fail = rep.clone();
        fail[16] = 2;
        let (ops, _) = run(&[(C, &req), (S, &fail)]);
        assert_eq!(ops[0].status, StatusCode::Error);
    }

    #[test]
    fn more_to_come_request_needs_no_reply() {
        let req = op_msg(
            21,
            0,
            MORE_TO_COME,
            &B::default().s("insert", "logs").s("$db", "app"),
            Some(("documents", vec![B::default().i32("a", 1)])),
        );
        let (ops, p) = run(&[(C, &req)]);
        assert_eq!(ops.len(), 1);
        assert_eq!(
            (ops[0].name.as_str(), ops[0].start_ts, ops[0].end_ts),
            ("insert", 10, 10)
        );
        assert!(p.pending.is_empty());
    }

    #[test]
    fn checksum_flag_is_skipped() {
        let req = op_msg(
            31,
            0,
            CHECKSUM_PRESENT,
            &B::default().i32("ping", 1).s("$db", "admin"),
            None,
        );
        let rep = op_msg(32, 31, CHECKSUM_PRESENT, &ok(), None);
        let (ops, p) = run(&[(C, &req), (S, &rep)]);
        assert_eq!(ops.len(), 1);
        assert_eq!(
            attr(&ops[0], "db.statement"),
            r#"{"ping": 1, "$db": "admin"}"#
        );
        assert_eq!(p.unparsed(), 0);
    }

    #[test]
    fn exhaust_replies_after_the_first_are_not_ops() {
        let req = op_msg(
            41,
            0,
            1 << 16,
            &B::default().i32("hello", 1).s("$db", "admin"),
            None,
        );
        let r1 = op_msg(42, 41, MORE_TO_COME, &ok(), None);
        let r2 = op_msg(43, 42, MORE_TO_COME, &ok(), None);
        let (ops, p) = run(&[(C, &req), (S, &r1), (S, &r2)]);
        assert_eq!(ops.len(), 1);
        assert_eq!(p.unparsed(), 0);
    }

    #[test]
    fn credentials_are_not_rendered() {
        let req = op_msg(
            1,
            0,
            0,
            &B::default()
                .s("createUser", "bob")
                .s("pwd", "hunter2")
                .arr("roles", vec![])
                .s("$db", "admin"),
            None,
        );
        let (ops, _) = run(&[(C, &req), (S, &op_msg(2, 1, 0, &ok(), None))]);
        assert_eq!(
            attr(&ops[0], "db.statement"),
            r#"{"createUser": "bob", "$db": "admin"}"#
        );
        let hello = B::default()
            .i32("hello", 1)
            .d("speculativeAuthenticate", B::default().i32("saslStart", 1))
            .s("$db", "admin");
        let (ops, _) = run(&[
            (C, &op_msg(3, 0, 0, &hello, None)),
            (S, &op_msg(4, 3, 0, &ok(), None)),
        ]);
        assert_eq!(
            attr(&ops[0], "db.statement"),
            r#"{"hello": 1, "$db": "admin"}"#
        );
    }

    #[test]
    fn compressed_messages_are_framed_not_decoded() {
        let mut body = OP_MSG.to_le_bytes().to_vec();
        body.extend(100i32.to_le_bytes());
        body.push(1);
        body.extend([9u8; 30]);
        let mut req = header(body.len() + 16, 61, 0, OP_COMPRESSED);
        req.extend(&body);
        let mut rep = header(body.len() + 16, 62, 61, OP_COMPRESSED);
        rep.extend(&body);
        let (req2, rep2) = find_pair();
        let (ops, p) = run(&[(C, &req), (S, &rep), (C, &req2), (S, &rep2)]);
        let names: Vec<_> = ops.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["compressed", "find"]);
        assert!(!ops[0].attributes.contains_key("db.statement"));
        assert_eq!(p.unparsed(), 0);
    }

    #[test]
    fn close_reports_requests_without_reply() {
        let (req, _) = find_pair();
        let mut p = MongoParser::new(ParserConfig::default());
        let mut out = Vec::new();
        p.feed(C, &req, 5, &mut out);
        p.close(9, &mut out);
        assert_eq!(
            (out.len(), out[0].end_ts, out[0].status),
            (1, 9, StatusCode::Unset)
        );
    }

    #[test]
    fn gap_inside_a_message_skips_it() {
        // The gap falls in the documents of an insert: the command is still known.
        let big = "z".repeat(2000);
        let req = op_msg(
            1,
            0,
            0,
            &B::default().s("insert", "c").s("$db", "d"),
            Some(("documents", vec![B::default().s("v", &big)])),
        );
        let rep = op_msg(2, 1, 0, &B::default().i32("n", 1).f64("ok", 1.0), None);
        let (find, find_rep) = find_pair();
        let mut p = MongoParser::new(ParserConfig::default());
        let mut out = Vec::new();
        p.feed(C, &req[..100], 1, &mut out);
        p.gap(C, 1500, 2, &mut out);
        p.feed(C, &req[1600..], 3, &mut out);
        p.feed(S, &rep, 4, &mut out);
        // A gap inside a reply: paired, outcome unknown.
        p.feed(C, &find, 5, &mut out);
        p.feed(S, &find_rep[..30], 6, &mut out);
        p.gap(S, (find_rep.len() - 30) as u64, 7, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].name, "insert");
        assert_eq!(attr(&out[0], "db.name"), "d");
        assert!(attr(&out[0], "db.statement")
            .as_str()
            .unwrap()
            .ends_with(r#""documents": [{...}]}"#));
        assert_eq!(attr(&out[0], "db.rowcount"), 1);
        assert_eq!((out[1].name.as_str(), out[1].end_ts), ("find", 7));
        // Framing continues after both gaps.
        let (ops, _) = {
            let (r, s) = find_pair();
            p.feed(C, &r, 8, &mut out);
            p.feed(S, &s, 9, &mut out);
            (out, ())
        };
        assert_eq!(ops.len(), 3);
        assert_eq!(attr(&ops[2], "db.rowcount"), 2);
    }

    #[test]
    fn gap_between_messages_gives_up_on_that_side() {
        let (req, rep) = find_pair();
        let mut p = MongoParser::new(ParserConfig::default());
        let mut out = Vec::new();
        p.feed(C, &req, 1, &mut out);
        p.gap(C, 40, 2, &mut out);
        p.feed(C, &req, 3, &mut out);
        // The request held before the gap still gets its reply.
        p.feed(S, &rep, 4, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(p.unparsed(), 1);
        p.gap(S, 10, 5, &mut out);
        assert_eq!(p.unparsed(), 2);
    }

    #[test]
    fn oversized_message_is_cut_but_still_paired() {
        let big: Vec<B> = (0..100)
            .map(|i| B::default().s("v", &"q".repeat(100)).i32("i", i))
            .collect();
        let req = op_msg(
            1,
            0,
            0,
            &B::default().s("insert", "c").s("$db", "d"),
            Some(("documents", big)),
        );
        let rep = op_msg(2, 1, 0, &B::default().i32("n", 100).f64("ok", 1.0), None);
        let mut p = MongoParser::new(ParserConfig {
            max_buffer: 1024,
            max_statement: 100,
            ..ParserConfig::default()
        });
        let mut out = Vec::new();
        p.feed(C, &req, 1, &mut out);
        p.feed(S, &rep, 2, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].name, "insert");
        assert!(attr(&out[0], "db.statement")
            .as_str()
            .unwrap()
            .ends_with("...[truncated]"));
        assert!(p.client.body.capacity() <= 1024);
        assert_eq!(p.unparsed(), 0);
    }

    #[test]
    fn malformed_header_stops_that_side_once() {
        let (ops, p) = run(&[(C, &[0xff; 40]), (C, &[0x00; 40])]);
        assert!(ops.is_empty());
        assert_eq!(p.unparsed(), 1);
    }

    #[test]
    fn bson_values_render_as_relaxed_extended_json() {
        let mut dec = [0u8; 16];
        // 1.5 = 15 × 10^-1: coefficient 15, biased exponent 6175.
        let v: u128 = (6175u128 << 113) | 15;
        dec.copy_from_slice(&v.to_le_bytes());
        let d = B::default()
            .f64("d", 1.0)
            .f64("inf", f64::INFINITY)
            .el(0x05, "bin", &[2, 0, 0, 0, 0, 0xff, 0xfe])
            .el(0x06, "u", &[])
            .el(0x09, "date", &1_700_000_000_123i64.to_le_bytes())
            .el(0x09, "old", &(-1i64).to_le_bytes())
            .el(0x0A, "n", &[])
            .el(0x0B, "re", b"^a\0i\0")
            .el(0x0D, "code", &[2, 0, 0, 0, b'x', 0])
            .el(0x11, "ts", &[2, 0, 0, 0, 1, 0, 0, 0])
            .i64("l", -5)
            .el(0x13, "dec", &dec)
            .el(0xFF, "min", &[])
            .el(0x7F, "max", &[])
            .s("esc", "a\"b\\c\n")
            .el(0x04, "arr", &B::default().i32("0", 1).s("1", "x").build());
        let bytes = d.build();
        let (doc, rest) = doc_at(&bytes).unwrap();
        assert!(rest.is_empty());
        let mut out = Out::new(10_000);
        out.doc(doc, 0, &|_, _| true);
        assert_eq!(
            out.s,
            concat!(
                r#"{"d": 1.0, "inf": {"$numberDouble": "Infinity"}, "bin": {"$binary": {"base64": "//4=", "subType": "00"}}, "#,
                r#""u": {"$undefined": true}, "date": {"$date": "2023-11-14T22:13:20.123Z"}, "old": {"$date": {"$numberLong": "-1"}}, "#,
                r#""n": null, "re": {"$regularExpression": {"pattern": "^a", "options": "i"}}, "code": {"$code": "x"}, "#,
                r#""ts": {"$timestamp": {"t": 1, "i": 2}}, "l": -5, "dec": {"$numberDecimal": "1.5"}, "#,
                r#""min": {"$minKey": 1}, "max": {"$maxKey": 1}, "esc": "a\"b\\c\n", "arr": [1, "x"]}"#
            )
        );
        assert_eq!(decimal128(&((6176u128 << 113) | 1).to_le_bytes()), "1");
        assert_eq!(decimal128(&((6173u128 << 113) | 1).to_le_bytes()), "0.001");
        assert_eq!(decimal128(&((6179u128 << 113) | 1).to_le_bytes()), "1E+3");
        assert_eq!(
            decimal128(&((1u128 << 127) | (6176u128 << 113)).to_le_bytes()),
            "-0"
        );
        assert_eq!(decimal128(&(0x1eu128 << 122).to_le_bytes()), "Infinity");
    }

    /// A document encoded by PyMongo 4.20 (`bson.encode`), and PyMongo's
    /// `json_util.dumps(…, RELAXED_JSON_OPTIONS)` of it, except that non-ASCII stays
    /// unescaped and floats use Rust's exponent spelling (`1.5e300`, not `1.5e+300`).
    #[test]
    fn bson_rendering_matches_pymongo_relaxed_json() {
        let hex = [
            "ad010000075f696400655f1c0001020304050607080266696e6400060000007573657273000366696c74657200570000",
            "000361676500130000000124677465000000000000803540000b6e616d65005e612e2a00690004746167730027000000",
            "0230000200000078001031000100000012320000000000000100000a330008340001000009617400ff834ff78d010000",
            "096f6c640018fcffffffffffff0562696e0008000000000001fe68656c6c6f0575756964001000000004000102030405",
            "060708090a0b0c0d0e0f1364656300393000000000000000000000000026b0136465633200396c760e4fc986a2a39f1a",
            "950f003e30136465633300000000000a5bc138938d44c64d31fe5f117473000700000000f153650f636f646500210000",
            "000d00000066756e6374696f6e28297b7d000c0000001061000100000000ff6d696e007f6d61780002657363001e0000",
            "0071756f746522206261636b5c206e6c0a20746162092063746c0120c3a900016e656700000000000000008001626967",
            "00355800662deb417e01736d616c6c0048afbc9af2d77a3e106900000000800224646200040000006170700000",
        ]
        .concat();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let (doc, rest) = doc_at(&bytes).unwrap();
        assert!(rest.is_empty());
        let mut out = Out::new(10_000);
        out.doc(doc, 0, &|_, _| true);
        let expected = r#"{"_id": {"$oid": "655f1c000102030405060708"}, "find": "users", "filter": {"age": {"$gte": 21.5}, "name": {"$regularExpression": {"pattern": "^a.*", "options": "i"}}, "tags": ["x", 1, 1099511627776, null, true]}, "at": {"$date": "2024-02-29T23:59:59.999Z"}, "old": {"$date": {"$numberLong": "-1000"}}, "bin": {"$binary": {"base64": "AAH+aGVsbG8=", "subType": "00"}}, "uuid": {"$binary": {"base64": "AAECAwQFBgcICQoLDA0ODw==", "subType": "04"}}, "dec": {"$numberDecimal": "-1.2345E-9"}, "dec2": {"$numberDecimal": "123456789012345678901234567890.5"}, "dec3": {"$numberDecimal": "1.000000000000000000000000000000000E+6144"}, "ts": {"$timestamp": {"t": 1700000000, "i": 7}}, "code": {"$code": "function(){}", "$scope": {"a": 1}}, "min": {"$minKey": 1}, "max": {"$maxKey": 1}, "esc": "quote\" back\\ nl\n tab\t ctl\u0001 é", "neg": -0.0, "big": 1.5e300, "small": 1e-7, "i": -2147483648, "$db": "app"}"#;
        assert_eq!(out.s, expected);
    }

    /// Encodings and strings from PyMongo's `bson.Decimal128` (`.bid`, `str()`).
    #[test]
    fn decimal128_strings_match_pymongo() {
        let cases = [
            ("00000000000000000000000000004030", "0"),
            ("000000000000000000000000000040b0", "-0"),
            ("01000000000000000000000000003430", "0.000001"),
            ("01000000000000000000000000003230", "1E-7"),
            ("00000000000000000000000000002c30", "0E-10"),
            ("00000000000000000000000000000078", "Infinity"),
            ("000000000000000000000000000000f8", "-Infinity"),
            ("0000000000000000000000000000007c", "NaN"),
            ("7b000000000000000000000000008c30", "1.23E+40"),
            (
                "f2af967ed05c82de3297ff6fde3c4030",
                "1234567890123456789012345678901234",
            ),
            ("64000000000000000000000000004030", "100"),
            ("01000000000000000000000000004430", "1E+2"),
            ("0f000000000000000000000000003eb0", "-1.5"),
            ("d2040000000000000000000000003430", "0.001234"),
            ("01000000000000000000000000000000", "1E-6176"),
            (
                "ffffffff638e8d37c087adbe09edff5f",
                "9.999999999999999999999999999999999E+6144",
            ),
            ("7d000000000000000000000000003830", "0.0125"),
        ];
        for (hex, want) in cases {
            let bytes: Vec<u8> = (0..32)
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            assert_eq!(decimal128(&bytes), want, "{hex}");
        }
    }

    /// A PyMongo 4.20 session recorded through a proxy against FerretDB 1.24 (the fuzz
    /// seed, after its split byte). Messages frame themselves, and requests are the
    /// messages with `responseTo == 0`, so the recording needs no side markers.
    #[test]
    fn recorded_pymongo_session_gives_expected_ops() {
        let seed = include_bytes!("../../fuzz/seeds/mongo/pymongo_session");
        let mut rest = &seed[1..];
        let mut pieces: Vec<(Side, &[u8])> = Vec::new();
        while let Some(h) = Header::parse(rest) {
            let (msg, next) = rest.split_at(h.len as usize);
            pieces.push((if h.response_to == 0 { C } else { S }, msg));
            rest = next;
        }
        let (ops, p) = run(&pieces);
        let got: Vec<_> = ops
            .iter()
            .map(|o| {
                (
                    o.name.as_str(),
                    o.status == StatusCode::Error,
                    attr(o, "db.rowcount").as_i64(),
                    attr(o, "db.error.code").as_i64(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("ismaster", false, None, None),
                ("drop", false, None, None),
                ("insert", false, Some(5), None),
                ("find", false, Some(3), None),
                ("find", false, Some(2), None),
                ("getMore", false, Some(2), None),
                ("getMore", false, Some(1), None),
                ("update", false, Some(2), None),
                ("delete", false, Some(1), None),
                ("insert", true, Some(0), Some(11000)),
                ("nosuchcommand", true, None, Some(59)),
                ("aggregate", false, Some(1), None),
                ("aggregate", false, Some(1), None),
                ("endSessions", true, None, Some(59)),
            ]
        );
        assert_eq!(p.unparsed(), 0);
        let find = &ops[3];
        assert_eq!(
            attr(find, "db.statement"),
            r#"{"find": "users", "filter": {"age": {"$gte": 22}}, "$db": "app"}"#
        );
        assert_eq!(attr(find, "db.mongodb.collection"), "users");
        assert_eq!(attr(find, "db.name"), "app");
        assert_eq!(attr(&ops[5], "db.mongodb.collection"), "users");
        assert!(ops[9]
            .status_description
            .as_deref()
            .unwrap()
            .starts_with("E11000 duplicate key error"));
        assert_eq!(run_bytewise(&pieces), ops);
    }

    #[test]
    fn deeply_nested_documents_render_bounded() {
        let mut d = B::default().i32("x", 1);
        for _ in 0..60 {
            d = B::default().d("a", d);
        }
        let bytes = B::default()
            .s("find", "c")
            .d("filter", d)
            .s("$db", "x")
            .build();
        let (doc, _) = doc_at(&bytes).unwrap();
        let mut out = Out::new(100_000);
        out.doc(doc, 0, &|_, _| true);
        assert!(out.s.contains("{...}"));
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (req, rep) = find_pair();
        for round in 0..3000 {
            // Mutations of valid traffic reach deep into the decoder; pure noise tests framing.
            let mut bytes: Vec<u8> = if round % 2 == 0 {
                [req.clone(), rep.clone()].concat()
            } else {
                (0..next() % 400).map(|_| next() as u8).collect()
            };
            for _ in 0..(next() % 8) {
                if !bytes.is_empty() {
                    let i = (next() as usize) % bytes.len();
                    bytes[i] = next() as u8;
                }
            }
            super::super::fuzz_one(Protocol::Mongo, &bytes);
            let mut p = MongoParser::new(ParserConfig::default());
            let mut out = Vec::new();
            let (a, b) = bytes.split_at(bytes.len().min(req.len()));
            p.feed(C, a, 1, &mut out);
            p.feed(S, b, 2, &mut out);
            p.gap(S, next() % 64, 3, &mut out);
            p.close(4, &mut out);
        }
    }
}
