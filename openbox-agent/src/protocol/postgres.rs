//! PostgreSQL frontend/backend protocol v3 parser.
//!
//! Framing (PostgreSQL docs, "Message Formats"): the client's first message is untyped —
//! int32 length (counting itself) then int32 code (StartupMessage, SSLRequest,
//! GSSENCRequest, CancelRequest). Every later message on either side is a type byte then
//! an int32 length that counts itself but not the type byte. The server answers SSLRequest
//! and GSSENCRequest with one bare byte, not a message.
//!
//! Pairing: the client's messages queue up expected responses ([`Pending`]) and the
//! server's messages resolve them in order, which is how the server processes them.
//! A simple Query ends at ReadyForQuery; an Execute ends at CommandComplete,
//! EmptyQueryResponse, PortalSuspended or ErrorResponse; after an error in extended mode
//! the server discards messages up to Sync, so everything queued before that Sync fails
//! with the same error ("Extended Query", error handling).
//!
//! Resynchronisation. A gap inside a message of known length is skipped. Anywhere else
//! (a gap between messages, bytes that do not frame, a connection watched from its
//! middle) that side has lost its message boundaries, and finds them again as follows.
//!
//! - Server: the requests waiting for the lost response end there (UNSET,
//!   `db.response_truncated`, no `db.rowcount`), and the server side resumes at the
//!   client's next request: its bytes until then are the rest of that response and are
//!   discarded. This is exact for clients that wait for the response (ReadyForQuery, or
//!   the answer to a Flush) before they send again — libpq, psycopg2, asyncpg outside
//!   pipelines; COPY too, whose client sends its next request after the copy's
//!   ReadyForQuery. Where the client evidently does not wait (several Syncs
//!   outstanding, requests queued after the one being answered), where the server is
//!   in that response cannot be known: the connection is given up.
//! - Client: its bytes are dropped until a captured piece starts with a request whose
//!   every message frames exactly ([`starts_request`]: a simple Query, Parse or Bind,
//!   then only well-formed messages). The requests lost meanwhile are answered by the
//!   server all the same; those answers come after the answers to requests seen before
//!   the loss, so a request seen after it is paired only when nothing seen before is
//!   still waiting (a client that waits has had every earlier answer by then).
//!   Otherwise it is dropped, counted `unpaired`, never given another's answer.
//! - A response to a request never seen (sent before watching began: its CommandComplete,
//!   ERROR or ReadyForQuery arrives with no Query or Execute waiting) is framed,
//!   dropped and counted `unpaired`, once per response.
//! - A connection open before watching began ([`Parser::watched_midstream`]) starts
//!   *unsure*, as HTTP/1.1's parser does: while the TLS probes attach one libssl
//!   function after another, a request may be captured without its response, with
//!   nothing to say so. So the first response is paired only when the requests waiting
//!   were all sent in one write (a client that waits for its answers has had every
//!   earlier one by then); requests from several writes are all dropped, counted
//!   `unpaired`, and the server side resumes at the client's next request.
//!
//! Every loss is counted by reason ([`Loss`]).

use std::{collections::VecDeque, sync::Arc};

use super::{
    bytes::{be_u32, cstr, cstr_or_rest, lossy},
    framing::FrameReader,
    sql::{finish_op, new_op, Dialect, ServerError, Statement, MAX_PENDING, MAX_STATEMENTS},
    Loss, Losses, Op, Parser, ParserConfig, Protocol, Side,
};
use crate::bounded::BoundedMap;

/// `int32 80877103`: "the SSL request code" (1234 << 16 | 5679).
const SSL_REQUEST: u32 = 80_877_103;
/// `int32 80877104`: GSSENCRequest (1234 << 16 | 5680).
const GSSENC_REQUEST: u32 = 80_877_104;
/// `int32 80877102`: CancelRequest (1234 << 16 | 5678).
const CANCEL_REQUEST: u32 = 80_877_102;
/// The StartupMessage protocol number's major half: 3 (3.0 = 196608; 3.2 exists since 18).
const PROTOCOL_MAJOR_3: u32 = 3;
/// Bound on an untyped startup-phase message; a real StartupMessage is a few hundred
/// bytes (libpq itself refuses startup packets over 10 000 bytes).
const MAX_STARTUP_LEN: u32 = 10_000;
/// Bind carries parameter values after the two names we need; keep only its head.
const BIND_KEEP: usize = 4096;

/// Whether these first client bytes start PostgreSQL: an SSLRequest, GSSENCRequest,
/// CancelRequest, or a StartupMessage for protocol 3.x with a plausible length.
pub fn looks_like_startup(first: &[u8]) -> bool {
    let (Some(len), Some(code)) = (be_u32(first, 0), be_u32(first, 4)) else {
        return false;
    };
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return false;
    }
    match code {
        SSL_REQUEST | GSSENC_REQUEST => len == 8,
        CANCEL_REQUEST => len == 16,
        // A StartupMessage holds at least the final NUL of its parameter list; its first
        // parameter name ("user", "database", …) is printable text.
        c if c >> 16 == PROTOCOL_MAJOR_3 && (c & 0xffff) < 100 => {
            len > 8 && first.get(8).is_none_or(|&b| b == 0 || b.is_ascii_graphic())
        }
        _ => false,
    }
}

/// Whether these client bytes are exactly an SSLRequest.
pub fn is_ssl_request(b: &[u8]) -> bool {
    b.len() == 8 && be_u32(b, 0) == Some(8) && be_u32(b, 4) == Some(SSL_REQUEST)
}

/// Whether these first client bytes, seen on a connection that was already open when
/// watching began (a pool opened before the worker registered), start a PostgreSQL
/// request: a simple Query, or a Parse or Bind of the extended protocol, with a
/// plausible length and the text fields such a message starts with.
pub fn looks_like_request_midstream(first: &[u8]) -> bool {
    let (Some(&kind), Some(len)) = (first.first(), be_u32(first, 1)) else {
        return false;
    };
    if !(5..=(1 << 24)).contains(&len) {
        return false;
    }
    let body = &first[5..first.len().min(1 + len as usize)];
    let text = |b: &[u8]| {
        b.iter()
            .all(|&c| c >= 0x20 || c == b'\t' || c == b'\n' || c == b'\r')
    };
    // Names (statement, portal) are short identifiers; asyncpg's are `__asyncpg_stmt_N__`.
    let name = |b: &[u8]| b.len() <= 63 && b.iter().all(|c| c.is_ascii_graphic());
    match kind {
        b'Q' => {
            let end = body.iter().position(|&c| c == 0).unwrap_or(body.len());
            end > 0 && text(&body[..end]) && body[..end].iter().any(|c| c.is_ascii_alphabetic())
        }
        b'P' => match body.iter().position(|&c| c == 0) {
            Some(n) if name(&body[..n]) => {
                let query = &body[n + 1..];
                let end = query.iter().position(|&c| c == 0).unwrap_or(query.len());
                end > 0
                    && text(&query[..end])
                    && query[..end].iter().any(|c| c.is_ascii_alphabetic())
            }
            _ => false,
        },
        b'B' => {
            let mut parts = body.splitn(3, |&c| c == 0);
            let (Some(portal), Some(stmt), Some(_)) = (parts.next(), parts.next(), parts.next())
            else {
                return false;
            };
            name(portal) && name(stmt)
        }
        _ => false,
    }
}

/// Whether a captured client piece starts a request, checked strongly enough to resume
/// a lost stream on: it begins with a simple Query, a Parse or a Bind, and every message
/// it holds whole frames exactly (each field where its length says, names and text
/// where the message's layout puts them); a last message running past the piece must
/// start like a request ([`looks_like_request_midstream`]).
fn starts_request(piece: &[u8]) -> bool {
    if !matches!(piece.first(), Some(b'Q' | b'P' | b'B')) {
        return false;
    }
    let mut rest = piece;
    let mut first = true;
    while !rest.is_empty() {
        let (Some(&kind), Some(len)) = (rest.first(), be_u32(rest, 1)) else {
            // A header cut by the end of the piece: only the first message must be whole
            // enough to judge.
            return !first;
        };
        let Some(end) = (len as usize).checked_add(1).filter(|&e| e <= rest.len()) else {
            return first && looks_like_request_midstream(rest)
                || !first && client_type_known(kind) && (4..=i32::MAX as u32).contains(&len);
        };
        let Some(body) = rest.get(5..end) else {
            return false;
        };
        if !message_frames(kind, body) {
            return false;
        }
        if first && !looks_like_request_midstream(&rest[..end]) {
            return false;
        }
        first = false;
        rest = &rest[end..];
    }
    true
}

/// Whether a whole client message of type `kind` has exactly the layout its type gives
/// ("Message Formats"); types whose bodies are free-form only need a known type.
fn message_frames(kind: u8, body: &[u8]) -> bool {
    let i16_at = |at: usize| {
        body.get(at..at + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .filter(|&n| n >= 0)
            .map(|n| n as usize)
    };
    let named = |at: usize| cstr(body, at).map(|(_, next)| next);
    match kind {
        // String query, exactly.
        b'Q' => body.iter().position(|&c| c == 0) == Some(body.len().wrapping_sub(1)),
        // String name, String query, Int16 n, Int32[n] type OIDs.
        b'P' => (|| {
            let at = named(named(0)?)?;
            let n = i16_at(at)?;
            Some(at + 2 + 4 * n == body.len())
        })()
        .unwrap_or(false),
        // String portal, String statement, Int16 n formats (Int16 each), Int16 n values
        // (Int32 length, -1 for NULL, then the bytes), Int16 n result formats.
        b'B' => (|| {
            let mut at = named(named(0)?)?;
            at += 2 + 2 * i16_at(at)?;
            let values = i16_at(at)?;
            at += 2;
            for _ in 0..values {
                let len = be_u32(body, at)?;
                at += 4;
                if len != u32::MAX {
                    at = at.checked_add(len as usize)?;
                }
            }
            at += 2 + 2 * i16_at(at)?;
            Some(at == body.len())
        })()
        .unwrap_or(false),
        // String portal, Int32 row limit.
        b'E' => named(0).is_some_and(|at| at + 4 == body.len()),
        // Byte1 'S' or 'P', String name.
        b'D' | b'C' => matches!(body.first(), Some(b'S' | b'P')) && named(1) == Some(body.len()),
        b'S' | b'H' | b'X' | b'c' => body.is_empty(),
        other => client_type_known(other),
    }
}

pub struct PostgresParser {
    cfg: ParserConfig,
    losses: Losses,
    client: Reader,
    server: Reader,
    /// The client's next message is untyped (startup phase: before and between
    /// SSLRequest/GSSENCRequest and the StartupMessage).
    client_startup: bool,
    /// One-byte answers ('S'/'N'/'G') the server owes for SSLRequest/GSSENCRequest.
    ssl_answers: u8,
    /// The first ReadyForQuery after a StartupMessage ends the startup, not a request.
    startup_ready_due: bool,
    user: Option<String>,
    database: Option<String>,
    statements: BoundedMap<String, Arc<Statement>>,
    portals: BoundedMap<String, Arc<Statement>>,
    pending: VecDeque<Pending>,
    /// Start of the first message (Parse/Bind/Describe) leading up to the next Execute.
    batch_start: Option<u64>,
    /// Error of the current extended-query batch: Executes the client queued before the
    /// Sync are skipped by the server and fail with it.
    batch_error: Option<ServerError>,
    /// Nothing more can be parsed on this connection (encrypted, or the server side lost).
    stopped: bool,
    /// A gap cut the server's stream between messages: its bytes are the tail of a
    /// response already reported and are discarded until the client's next request.
    server_resync: bool,
    /// The server is in COPY (CopyIn/CopyOut/CopyBothResponse seen, not yet ended):
    /// data flows without requests, so a lost server stream cannot be resynchronised.
    copy: bool,
    /// The client's last message was a Flush: it waits for the answers so far.
    client_flushed: bool,
    /// Nothing of the client's stream was seen yet: its first piece must start a
    /// connection (a startup-phase message) or a request, or it is from a message's
    /// middle.
    client_fresh: bool,
    /// The client's stream lost messages since the last request seen: their answers
    /// come after the answers to the requests still waiting from before the loss.
    client_gap: bool,
    /// No request has framed exactly since watching began or the client side was lost:
    /// the message being read may be framed on bytes from another's middle.
    client_unconfirmed: bool,
    /// The server's stream reached a ReadyForQuery since watching began or resumed:
    /// its framing is its own.
    server_confirmed: bool,
    /// The response being read answers no request seen, and was counted `unpaired`.
    orphan_counted: bool,
    /// That answer came while the client's first bytes, too few to judge, were still
    /// being framed: they are the rest of the request it answers, and when they turn out
    /// not to be a message, that exchange is not counted again.
    client_cut_answered: bool,
    /// No message framed on either side yet, and one side's first bytes were the middle
    /// of a message (counted): when the other side's first bytes are too, they are the
    /// exchange in flight when watching began (a COPY's data and its response), not
    /// counted again.
    start_loss: Option<Side>,
    /// A message was framed exactly on either side since watching began.
    framed: bool,
    /// Watched from the connection's middle and no response paired yet: requests may
    /// have been captured without their responses (see the module doc).
    unsure: bool,
    /// While unsure: how many client writes (pieces) the waiting requests came in, and
    /// the last one's timestamp.
    unsure_writes: u32,
    unsure_last_write: Option<u64>,
}

/// A request on its way to becoming an op.
#[derive(Debug)]
struct Running {
    op: Op,
    /// DataRows seen for the current statement: the fallback row count.
    rows: u64,
    rowcount: Option<u64>,
    error: Option<ServerError>,
}

/// What the server still owes, in the order the client asked.
#[derive(Debug)]
enum Pending {
    /// Simple Query: ends at ReadyForQuery.
    Query(Box<Running>),
    /// Execute: ends at CommandComplete / EmptyQueryResponse / PortalSuspended / error.
    Execute(Box<Running>),
    /// Parse: ParseComplete. Kept so that a failed Parse with no Execute still shows.
    Parse {
        stmt: Arc<Statement>,
        start_ts: u64,
    },
    Bind,
    Describe,
    Close,
    /// Sync and FunctionCall end at ReadyForQuery.
    Sync,
    FunctionCall,
}

impl PostgresParser {
    pub fn new(cfg: ParserConfig) -> Self {
        Self {
            cfg,
            losses: Losses::default(),
            client: Reader::default(),
            server: Reader::default(),
            client_startup: true,
            ssl_answers: 0,
            startup_ready_due: false,
            user: None,
            database: None,
            statements: BoundedMap::new(MAX_STATEMENTS),
            portals: BoundedMap::new(MAX_STATEMENTS),
            pending: VecDeque::new(),
            batch_start: None,
            batch_error: None,
            stopped: false,
            server_resync: false,
            copy: false,
            client_flushed: false,
            client_fresh: true,
            client_gap: false,
            client_unconfirmed: true,
            server_confirmed: false,
            orphan_counted: false,
            client_cut_answered: false,
            start_loss: None,
            framed: false,
            unsure: false,
            unsure_writes: 0,
            unsure_last_write: None,
        }
    }

    fn feed_client(&mut self, mut data: &[u8], ts: u64, out: &mut Vec<Op>) {
        if self.stopped || data.is_empty() {
            return;
        }
        // Watching may have begun after the connection was set up: its first bytes must
        // then start a request, or they are the middle of one. (A first piece too short
        // to tell is framed as it comes.)
        if self.client_fresh
            && data.len() >= 8
            && !looks_like_startup(data)
            && !starts_request(data)
        {
            self.client_lost(Loss::Malformed);
        }
        self.client_fresh = false;
        if self.client.frames.dead {
            // A captured piece that starts a request ends the loss: a client writes a
            // request (a simple query, an extended batch) in one call when it can.
            if !starts_request(data) {
                return;
            }
            self.client.restart();
            self.client_startup = false;
        } else if (self.client_unconfirmed && !self.client.at_boundary()
            || self.client.mid_header())
            && starts_request(data)
        {
            // What is being framed began with bytes cut from a message's middle (too
            // few to judge alone), and a request follows instead of the rest.
            self.client_lost(Loss::Malformed);
            self.client.restart();
            self.client_startup = false;
        }
        while !data.is_empty() && !self.client.frames.dead && !self.stopped {
            if self.client_startup && self.client.at_boundary() {
                // A capture that starts mid-connection begins with a typed message; as a
                // startup length its first byte would mean ≥ 0x43000000 bytes, so the two
                // cannot be confused.
                if data
                    .first()
                    .is_some_and(|&b| b != 0 && client_type_known(b))
                {
                    self.client_startup = false;
                }
            }
            let rules = if self.client_startup {
                Rules::STARTUP
            } else {
                Rules::CLIENT
            };
            match self.client.pull(&mut data, ts, &rules, self.cfg.max_buffer) {
                Pulled::More => break,
                Pulled::Frame(frame) => self.on_client(frame, out),
                Pulled::Bad => self.client_lost(Loss::Malformed),
            }
        }
    }

    fn feed_server(&mut self, mut data: &[u8], ts: u64, out: &mut Vec<Op>) {
        if self.server_resync {
            // The rest of a response already reported; the client has not asked again.
            return;
        }
        while !data.is_empty() && !self.server.frames.dead && !self.stopped {
            if self.ssl_answers > 0 && self.server.at_boundary() {
                match data.first() {
                    Some(b'S' | b'N') => {
                        // 'S': TLS follows and we are fed its plaintext; 'N': cleartext.
                        // Either way the client's next message is untyped again.
                        self.ssl_answers -= 1;
                        data = data.get(1..).unwrap_or_default();
                        continue;
                    }
                    Some(b'G') => {
                        // GSSAPI encryption: the rest is wrapped tokens we cannot read.
                        self.losses.add(Loss::Malformed);
                        self.stopped = true;
                        break;
                    }
                    // A server too old for SSL answers with an ErrorResponse instead.
                    _ => self.ssl_answers = 0,
                }
            }
            match self
                .server
                .pull(&mut data, ts, &Rules::SERVER, self.cfg.max_buffer)
            {
                Pulled::More => break,
                Pulled::Frame(frame) => self.on_server(frame, ts, out),
                Pulled::Bad => self.server_desync(Loss::Malformed, ts, out),
            }
        }
    }

    fn on_client(&mut self, f: Frame, out: &mut Vec<Op>) {
        if f.untyped || !f.truncated && message_frames(f.typ, &f.body) {
            self.client_unconfirmed = false;
            self.client_cut_answered = false;
            self.framed = true;
            self.start_loss = None;
        }
        if f.untyped {
            self.on_startup(&f);
            self.client.recycle(f.body);
            return;
        }
        let body = f.body.as_slice();
        match f.typ {
            b'Q' => {
                let sql = String::from_utf8_lossy(cstr_or_rest(body, 0));
                let stmt = Statement::new(&sql, self.cfg.max_statement, Dialect::Postgres);
                let run = self.start_op(Some(&stmt), "QUERY", f.start_ts);
                self.push(Pending::Query(run), f.start_ts, out);
            }
            b'P' => {
                let start_ts = *self.batch_start.get_or_insert(f.start_ts);
                // Parse: String name, String query, Int16 count, Int32[] type OIDs.
                match cstr(body, 0) {
                    Some((name, next)) => {
                        let sql = String::from_utf8_lossy(cstr_or_rest(body, next));
                        let stmt = Arc::new(Statement::new(
                            &sql,
                            self.cfg.max_statement,
                            Dialect::Postgres,
                        ));
                        self.statements.insert(lossy(name), Arc::clone(&stmt));
                        self.push(Pending::Parse { stmt, start_ts }, f.start_ts, out);
                    }
                    // Cut by a capture gap: counted as what it is.
                    None if f.truncated => self.losses.add(Loss::Gap),
                    None => self.losses.add(Loss::Malformed),
                }
            }
            b'B' => {
                self.batch_start.get_or_insert(f.start_ts);
                // Bind: String portal, String statement, then formats and values.
                match cstr(body, 0).and_then(|(portal, next)| Some((portal, cstr(body, next)?.0))) {
                    Some((portal, stmt)) => match self.statements.get(&lossy(stmt)).cloned() {
                        Some(s) => self.portals.insert(lossy(portal), s),
                        // Prepared before the capture began: forget any stale mapping.
                        None => {
                            self.portals.remove(&lossy(portal));
                        }
                    },
                    None => self.losses.add(Loss::Malformed),
                }
                self.push(Pending::Bind, f.start_ts, out);
            }
            b'D' => {
                self.batch_start.get_or_insert(f.start_ts);
                self.push(Pending::Describe, f.start_ts, out);
            }
            b'E' => {
                let start_ts = self.batch_start.take().unwrap_or(f.start_ts);
                let stmt =
                    cstr(body, 0).and_then(|(portal, _)| self.portals.get(&lossy(portal)).cloned());
                let run = self.start_op(stmt.as_deref(), "EXECUTE", start_ts);
                self.push(Pending::Execute(run), f.start_ts, out);
            }
            b'C' => {
                // Close: Byte1 'S' (statement) or 'P' (portal), String name.
                if let Some((name, _)) = cstr(body, 1) {
                    match body.first() {
                        Some(b'S') => {
                            self.statements.remove(&lossy(name));
                        }
                        Some(b'P') => {
                            self.portals.remove(&lossy(name));
                        }
                        _ => self.losses.add(Loss::Malformed),
                    }
                }
                self.push(Pending::Close, f.start_ts, out);
            }
            b'S' => {
                self.batch_start = None;
                self.push(Pending::Sync, f.start_ts, out);
            }
            b'F' => self.push(Pending::FunctionCall, f.start_ts, out),
            // Flush, Terminate, password/SASL, COPY data/done/fail: nothing is answered
            // (Flush only asks the server to send what it has).
            _ => {}
        }
        self.client_flushed = f.typ == b'H';
        self.client.recycle(f.body);
    }

    fn on_startup(&mut self, f: &Frame) {
        let body = f.body.as_slice();
        match be_u32(body, 0) {
            Some(SSL_REQUEST | GSSENC_REQUEST) => {
                self.ssl_answers = self.ssl_answers.saturating_add(1)
            }
            Some(CANCEL_REQUEST) => {
                // A cancel connection carries nothing else.
                self.stopped = true;
            }
            Some(code) if code >> 16 == PROTOCOL_MAJOR_3 => {
                // StartupMessage: pairs of NUL-terminated name and value, then a NUL.
                let mut pos = 4;
                while let Some((key, next)) = cstr(body, pos) {
                    if key.is_empty() {
                        break;
                    }
                    let Some((value, after)) = cstr(body, next) else {
                        break;
                    };
                    match key {
                        b"user" => self.user = Some(lossy(value)),
                        b"database" => self.database = Some(lossy(value)),
                        _ => {}
                    }
                    pos = after;
                }
                // "database: defaults to the user name." Unless the message was cut
                // before its database parameter.
                if self.database.is_none() && !f.truncated {
                    self.database = self.user.clone();
                }
                self.client_startup = false;
                self.startup_ready_due = true;
            }
            _ => self.client_lost(Loss::Malformed),
        }
    }

    fn on_server(&mut self, f: Frame, ts: u64, out: &mut Vec<Op>) {
        // ParameterStatus, NoticeResponse and NotificationResponse come unasked.
        if self.unsure && !self.pending.is_empty() && !matches!(f.typ, b'S' | b'N' | b'A') {
            if self.unsure_writes > 1 {
                self.server.recycle(f.body);
                return self.drop_unsure(ts, out);
            }
            self.unsure = false;
        }
        match f.typ {
            // CopyIn/CopyOut/CopyBothResponse start COPY; it ends with CommandComplete or
            // ErrorResponse (both handled below), ReadyForQuery at the latest.
            b'G' | b'H' | b'W' => self.copy = true,
            b'C' | b'E' | b'Z' => self.copy = false,
            _ => {}
        }
        match f.typ {
            b'Z' => {
                self.server_confirmed = true;
                self.ready(ts, out)
            }
            b'C' => {
                // CommandComplete tag, e.g. "SELECT 5", "INSERT 0 3", "UPDATE 2". A tag whose
                // tail was lost to a gap would give a wrong number.
                let count = if f.truncated {
                    None
                } else {
                    tag_rowcount(cstr_or_rest(&f.body, 0))
                };
                self.complete(Completion::Command(count), ts, out);
            }
            b'I' => self.complete(Completion::Empty, ts, out),
            b's' => self.complete(Completion::Suspended, ts, out),
            b'E' => {
                let err = parse_error(&f.body);
                if self.pending.is_empty() && severity_is_error(&f.body) {
                    // An ERROR (not a FATAL: those end the connection, asked or not)
                    // answers a request, here one never seen.
                    self.orphan_answer();
                }
                self.error(err, ts, out);
            }
            b'D' => {
                if let Some(run) = self.front_running() {
                    run.rows = run.rows.saturating_add(1);
                }
            }
            b'1' => self.pop_if(|p| matches!(p, Pending::Parse { .. })),
            b'2' => self.pop_if(|p| matches!(p, Pending::Bind)),
            b'3' => self.pop_if(|p| matches!(p, Pending::Close)),
            // RowDescription/NoData answer a Describe; in a simple query a RowDescription
            // is part of the Query's response and leaves it queued.
            b'T' | b'n' => self.pop_if(|p| matches!(p, Pending::Describe)),
            // Authentication, ParameterStatus, BackendKeyData, notices, notifications,
            // ParameterDescription, COPY responses and data, FunctionCallResponse,
            // NegotiateProtocolVersion: consumed.
            _ => {}
        }
        self.server.recycle(f.body);
    }

    /// Index of the Query/Execute the server is answering: the first one, past
    /// Parse/Bind/Describe/Close entries whose answers (if any) are done with.
    fn front_index(&self) -> Option<usize> {
        for (i, p) in self.pending.iter().enumerate() {
            match p {
                Pending::Query(_) | Pending::Execute(_) => return Some(i),
                Pending::Parse { .. } | Pending::Bind | Pending::Describe | Pending::Close => {}
                Pending::Sync | Pending::FunctionCall => return None,
            }
        }
        None
    }

    fn front_running(&mut self) -> Option<&mut Running> {
        let i = self.front_index()?;
        match self.pending.get_mut(i) {
            Some(Pending::Query(run) | Pending::Execute(run)) => Some(run),
            _ => None,
        }
    }

    fn pop_if(&mut self, pred: impl Fn(&Pending) -> bool) {
        if self.pending.front().is_some_and(pred) {
            self.pending.pop_front();
        }
    }

    /// The server answers a request never seen (sent before watching began, or a lone
    /// Sync seen after the Execute it ends): its messages are framed and dropped,
    /// counted once per response. A loss of the client's stream, counted already,
    /// accounts for the answers to what it lost.
    fn orphan_answer(&mut self) {
        if !self.client_gap && !self.orphan_counted {
            self.losses.add(Loss::Unpaired);
            self.orphan_counted = true;
            self.client_cut_answered = self.client_unconfirmed && !self.client.at_boundary();
        }
    }

    fn complete(&mut self, how: Completion, ts: u64, out: &mut Vec<Op>) {
        let Some(i) = self.front_index() else {
            // A command completed that no Query or Execute seen asked for.
            return self.orphan_answer();
        };
        let Some(run) = (match self.pending.get_mut(i) {
            Some(Pending::Query(run) | Pending::Execute(run)) => Some(run),
            _ => None,
        }) else {
            return;
        };
        // Row count from the tag; DataRows counted as the fallback (PortalSuspended, or
        // a tag without a count).
        let fallback = (run.rows > 0).then_some(run.rows);
        run.rowcount = match how {
            Completion::Command(count) => count.or(fallback),
            Completion::Suspended => fallback,
            Completion::Empty => None,
        };
        run.rows = 0;
        if matches!(self.pending.get(i), Some(Pending::Execute(_))) {
            // The Parse/Bind/Describe before it were answered; the Execute is done.
            let mut done = self.pending.drain(..=i);
            if let Some(Pending::Execute(run)) = done.next_back() {
                drop(done);
                out.push(finish(run, ts));
            }
        }
    }

    fn error(&mut self, err: ServerError, ts: u64, out: &mut Vec<Op>) {
        match self.pending.front_mut() {
            // Errors with nothing asked (FATAL at startup, shutdown notices) or during a
            // function call belong to no op.
            None | Some(Pending::FunctionCall) => return,
            // Simple query: the rest of the string is abandoned; ReadyForQuery ends it.
            Some(Pending::Query(run)) => {
                run.error = Some(err);
                return;
            }
            _ => {}
        }
        // Extended query: "the backend discards messages until a Sync is reached", so
        // every Execute queued before that Sync fails with this error.
        let mut failed_execute = false;
        let mut failed_parse = None;
        let mut first = true;
        while let Some(p) = self.pending.front() {
            if matches!(p, Pending::Sync | Pending::Query(_) | Pending::FunctionCall) {
                break;
            }
            match self.pending.pop_front() {
                Some(Pending::Execute(mut run)) => {
                    run.error = Some(err.clone());
                    out.push(finish(run, ts));
                    failed_execute = true;
                }
                // The first unanswered message is the one that failed.
                Some(Pending::Parse { stmt, start_ts }) if first => {
                    failed_parse = Some((stmt, start_ts))
                }
                _ => {}
            }
            first = false;
        }
        // A Parse that fails with no Execute after it (asyncpg prepares with
        // Parse/Describe/Sync) would otherwise leave no trace of the failed statement.
        match (failed_execute, failed_parse) {
            (false, Some((stmt, start_ts))) => {
                let mut run = self.start_op(Some(&stmt), "PARSE", start_ts);
                run.error = Some(err.clone());
                out.push(finish(run, ts));
            }
            // No op seen failed: the failed message was sent before watching began (a
            // Describe or Sync seen alone).
            (false, None) => self.orphan_answer(),
            _ => {}
        }
        self.batch_error = Some(err);
    }

    fn ready(&mut self, ts: u64, out: &mut Vec<Op>) {
        if std::mem::take(&mut self.startup_ready_due) {
            return;
        }
        if self.pending.is_empty() {
            // The end of a response to a request never seen.
            self.orphan_answer();
        }
        self.orphan_counted = false;
        while let Some(p) = self.pending.pop_front() {
            match p {
                Pending::Query(run) => {
                    out.push(finish(run, ts));
                    break;
                }
                Pending::Sync | Pending::FunctionCall => break,
                // Queued after an error and skipped by the server up to this Sync.
                Pending::Execute(mut run) if self.batch_error.is_some() || run.error.is_some() => {
                    run.error = run.error.or_else(|| self.batch_error.clone());
                    out.push(finish(run, ts));
                }
                // No error, and no completion: its answer was not captured (a connection
                // watched from its middle whose server side was captured from a later
                // read than the client's). It ends here, its result unknown.
                Pending::Execute(mut run) => {
                    self.losses.add(Loss::Gap);
                    run.rowcount = None;
                    let mut op = finish(run, ts);
                    op.attr("db.response_truncated", true);
                    out.push(op);
                }
                Pending::Parse { .. } | Pending::Bind | Pending::Describe | Pending::Close => {}
            }
        }
        self.batch_error = None;
    }

    fn push(&mut self, p: Pending, ts: u64, out: &mut Vec<Op>) {
        if self.client_gap {
            if self.pending.is_empty() {
                // Every answer the client waited for has come: what the server sends
                // next answers this request.
                self.client_gap = false;
            } else {
                // Answers to the requests lost in between come before this one's.
                self.losses.add(Loss::Unpaired);
                return;
            }
        }
        // The client asks only after the startup's ReadyForQuery: when it was not seen
        // (the server side captured later than the client's), it is not the next one.
        self.startup_ready_due = false;
        if self.server_resync {
            self.resume_server();
        } else if !self.server_confirmed
            && self.pending.is_empty()
            && !self.copy
            && !self.server.at_boundary()
        {
            // Nothing was waiting, so the server had finished answering: a message it
            // is still in the middle of, framed since watching began or resumed, was
            // framed from bytes that are not one.
            self.losses.add(Loss::Malformed);
            self.server.restart();
        }
        if self.unsure {
            if self.pending.is_empty() {
                self.unsure_writes = 0;
                self.unsure_last_write = None;
            }
            if self.unsure_last_write != Some(ts) {
                self.unsure_writes = self.unsure_writes.saturating_add(1);
                self.unsure_last_write = Some(ts);
            }
        }
        if self.pending.len() >= MAX_PENDING {
            // The server's answers are not reaching us: give up the oldest request.
            self.losses.add(Loss::Oversize);
            if let Some(Pending::Query(run) | Pending::Execute(run)) = self.pending.pop_front() {
                out.push(finish(run, ts));
            }
        }
        self.pending.push_back(p);
    }

    fn start_op(&self, stmt: Option<&Statement>, fallback: &str, start_ts: u64) -> Box<Running> {
        Box::new(Running {
            op: new_op(
                stmt,
                fallback,
                self.database.as_deref(),
                self.user.as_deref(),
                start_ts,
            ),
            rows: 0,
            rowcount: None,
            error: None,
        })
    }

    /// The server's stream lost its message boundaries (`why`). If the client waits for
    /// this response before it asks again, the response ends here and the server side
    /// resynchronises at the client's next request. Otherwise the requests waiting are
    /// reported now (UNSET) and the connection is not parsed further: without the
    /// server's answers new ops would carry made-up end times, or another's.
    fn server_desync(&mut self, why: Loss, ts: u64, out: &mut Vec<Op>) {
        self.server_desync_as(Some(why), ts, out);
    }

    /// A loss of `side`'s framing, counted, unless it is the other half of the exchange
    /// whose middle the other side began with ([`Self::start_loss`]).
    fn count_start(&mut self, side: Side, why: Loss) {
        match self.start_loss {
            Some(first) if first != side && why == Loss::Malformed => self.start_loss = None,
            _ => {
                self.losses.add(why);
                if why == Loss::Malformed && !self.framed {
                    self.start_loss = Some(side);
                }
            }
        }
    }

    /// [`Self::server_desync`], counted under `why` (`None`: counted already).
    fn server_desync_as(&mut self, why: Option<Loss>, ts: u64, out: &mut Vec<Op>) {
        if let Some(why) = why {
            self.count_start(Side::Server, why);
        }
        let resync = self.can_resync();
        self.server_confirmed = false;
        self.end_response(ts, out);
        self.server.frames.dead = true;
        if resync {
            self.server_resync = true;
        } else {
            self.stopped = true;
        }
    }

    /// Whether everything the client has sent belongs to the one request cycle being
    /// answered, so that its next request starts the server's next response.
    fn can_resync(&self) -> bool {
        let ends_cycle =
            |p: &Pending| matches!(p, Pending::Query(_) | Pending::Sync | Pending::FunctionCall);
        let waiting = match self.pending.iter().filter(|p| ends_cycle(p)).count() {
            // Answers to Parse/Bind/Describe/Execute come before a Sync only when the
            // client flushed; otherwise the server's buffer overflowed mid-batch and the
            // client's next messages continue that batch.
            0 => self.pending.is_empty() || self.client_flushed,
            // Nothing queued after the cycle's end: the client waits for ReadyForQuery.
            1 => self.pending.back().is_some_and(ends_cycle),
            // A pipeline: the server's position in it is unknown.
            _ => false,
        };
        // A client in the middle of a message has not sent its next request yet; a
        // client whose stream is lost sends it when it resynchronises; a client in COPY
        // sends its next request after the copy's ReadyForQuery.
        waiting && self.ssl_answers == 0
    }

    /// Unsure, a response began while requests from several writes waited: which one it
    /// answers is not known (the others' responses were missed), so they are all
    /// dropped, each op counted `unpaired` once, and the server side skips the rest of
    /// this response until the client's next request (see the module doc).
    fn drop_unsure(&mut self, ts: u64, out: &mut Vec<Op>) {
        let ops = self
            .pending
            .drain(..)
            .filter(|p| matches!(p, Pending::Query(_) | Pending::Execute(_)))
            .count();
        for _ in 0..ops.max(1) {
            self.losses.add(Loss::Unpaired);
        }
        self.batch_error = None;
        self.server_desync_as(None, ts, out);
    }

    /// The client's next request after a resync: the server's next byte starts the
    /// response to it.
    fn resume_server(&mut self) {
        self.server_resync = false;
        self.server.restart();
        // The client asks only after the startup's ReadyForQuery, lost or not.
        self.startup_ready_due = false;
        self.batch_error = None;
        self.copy = false;
    }

    /// The client's stream can no longer be framed (`why`). The server still answers
    /// what was asked; requests resume at the next piece that starts one.
    fn client_lost(&mut self, why: Loss) {
        self.client_lost_as(Some(why));
    }

    /// [`Self::client_lost`], counted under `why` (`None`: counted already).
    fn client_lost_as(&mut self, why: Option<Loss>) {
        let answered = std::mem::take(&mut self.client_cut_answered);
        match why {
            Some(Loss::Malformed) if answered => {}
            Some(why) => self.count_start(Side::Client, why),
            None => {}
        }
        self.client.frames.dead = true;
        self.client_gap = true;
        self.client_unconfirmed = true;
        // A batch cut short: the next Parse or Bind starts another.
        self.batch_start = None;
    }

    /// The response to the requests waiting was not seen to its end: they are reported
    /// now, without a row count (what was counted is not the final count) and without a
    /// status unless an error was seen.
    fn end_response(&mut self, ts: u64, out: &mut Vec<Op>) {
        for p in self.pending.drain(..) {
            if let Pending::Query(mut run) | Pending::Execute(mut run) = p {
                // After an error the server skips to the Sync: those Executes failed.
                if run.error.is_none() {
                    run.error = self.batch_error.clone();
                }
                run.rowcount = None;
                let mut op = finish(run, ts);
                op.attr("db.response_truncated", true);
                out.push(op);
            }
        }
        self.batch_error = None;
    }

    fn flush(&mut self, ts: u64, out: &mut Vec<Op>) {
        for p in self.pending.drain(..) {
            if let Pending::Query(run) | Pending::Execute(run) = p {
                out.push(finish(run, ts));
            }
        }
    }
}

enum Completion {
    Command(Option<u64>),
    Empty,
    Suspended,
}

impl Parser for PostgresParser {
    fn protocol(&self) -> Protocol {
        Protocol::Postgres
    }

    fn feed(&mut self, side: Side, data: &[u8], ts: u64, out: &mut Vec<Op>) {
        match side {
            Side::Client => self.feed_client(data, ts, out),
            Side::Server => self.feed_server(data, ts, out),
        }
    }

    fn gap(&mut self, side: Side, n: u64, ts: u64, out: &mut Vec<Op>) {
        if self.stopped || n == 0 {
            return;
        }
        let reader = match side {
            Side::Client => &mut self.client,
            Side::Server => &mut self.server,
        };
        // A dead reader has no framing to lose; this includes the server side while it
        // waits to resynchronise (one loss per resync, not per gap).
        if reader.frames.dead {
            return;
        }
        let (frame, lost) = reader.skip(n);
        let before = self.losses;
        if let Some(frame) = frame {
            match side {
                Side::Client => self.on_client(frame, out),
                Side::Server => self.on_server(frame, ts, out),
            }
        }
        if lost {
            // Bytes between messages are gone: no length to frame the rest on. The
            // message the gap cut was counted already when it could not be read: the
            // gap is one loss.
            let why = (self.losses == before).then_some(Loss::Gap);
            match side {
                Side::Client => self.client_lost_as(why),
                Side::Server => self.server_desync_as(why, ts, out),
            }
        }
    }

    fn close(&mut self, ts: u64, out: &mut Vec<Op>) {
        self.flush(ts, out);
    }

    /// Pairing starts unsure: the first response pairs only with requests sent in one
    /// write (see the module doc).
    fn watched_midstream(&mut self) {
        self.unsure = true;
    }

    fn unparsed(&self) -> u64 {
        self.losses.total()
    }

    fn losses(&self) -> Losses {
        self.losses
    }
}

fn finish(run: Box<Running>, end_ts: u64) -> Op {
    let Running {
        op,
        rowcount,
        error,
        ..
    } = *run;
    finish_op(op, end_ts, rowcount, error)
}

/// ErrorResponse's fields: Byte1 code + String value, ended by a zero byte.
fn error_fields(body: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        let field = *body.get(pos).filter(|&&f| f != 0)?;
        let value = cstr_or_rest(body, pos + 1);
        pos = pos.saturating_add(value.len()).saturating_add(2);
        Some((field, value))
    })
}

/// ErrorResponse: 'C' is the SQLSTATE, 'M' the primary message.
fn parse_error(body: &[u8]) -> ServerError {
    let mut err = ServerError {
        code: None,
        message: String::new(),
    };
    for (field, value) in error_fields(body) {
        match field {
            b'C' => err.code = Some(lossy(value).into()),
            b'M' => err.message = lossy(value),
            _ => {}
        }
    }
    err
}

/// Whether an ErrorResponse's severity ('V', not localized; 'S' from servers before
/// 9.6) is ERROR, the severity of a failed request.
fn severity_is_error(body: &[u8]) -> bool {
    let mut severity = None;
    for (field, value) in error_fields(body) {
        match field {
            b'V' => return value == b"ERROR",
            b'S' => severity = Some(value),
            _ => {}
        }
    }
    severity == Some(&b"ERROR"[..])
}

/// The row count at the end of a CommandComplete tag: "SELECT 5", "INSERT 0 3",
/// "UPDATE 2", "DELETE 1", "MERGE 4", "FETCH 7", "MOVE 1", "COPY 9". Other tags
/// ("CREATE TABLE", "BEGIN") carry none.
fn tag_rowcount(tag: &[u8]) -> Option<u64> {
    let tag = std::str::from_utf8(tag).ok()?;
    let mut words = tag.split(' ');
    let command = words.next()?;
    if !matches!(
        command,
        "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "FETCH" | "MOVE" | "COPY"
    ) {
        return None;
    }
    words.next_back()?.parse().ok()
}

// --- framing -----------------------------------------------------------------------

/// How one side's messages are framed and which of their bytes are worth keeping.
struct Rules {
    /// Type byte before the length (everything except the startup phase).
    typed: bool,
    valid: fn(u8) -> bool,
    /// Most body bytes of a message of this type worth buffering.
    keep: fn(u8) -> usize,
}

impl Rules {
    const STARTUP: Rules = Rules {
        typed: false,
        valid: |_| true,
        keep: |_| MAX_STARTUP_LEN as usize,
    };
    const CLIENT: Rules = Rules {
        typed: true,
        valid: client_type_known,
        keep: client_keep,
    };
    const SERVER: Rules = Rules {
        typed: true,
        valid: server_type_known,
        keep: server_keep,
    };
}

fn client_type_known(t: u8) -> bool {
    matches!(
        t,
        b'Q' | b'P'
            | b'B'
            | b'E'
            | b'D'
            | b'C'
            | b'S'
            | b'H'
            | b'F'
            | b'X'
            | b'p'
            | b'd'
            | b'c'
            | b'f'
    )
}

fn server_type_known(t: u8) -> bool {
    matches!(
        t,
        b'R' | b'K'
            | b'S'
            | b'Z'
            | b'E'
            | b'N'
            | b'A'
            | b'C'
            | b'I'
            | b'T'
            | b'D'
            | b'1'
            | b'2'
            | b'3'
            | b'n'
            | b't'
            | b's'
            | b'G'
            | b'H'
            | b'W'
            | b'd'
            | b'c'
            | b'V'
            | b'v'
    )
}

fn client_keep(t: u8) -> usize {
    match t {
        b'Q' | b'P' | b'E' | b'D' | b'C' => usize::MAX,
        b'B' => BIND_KEEP,
        // COPY data, passwords and function arguments are not needed.
        _ => 0,
    }
}

fn server_keep(t: u8) -> usize {
    match t {
        b'E' | b'C' => usize::MAX,
        // Rows, descriptions, authentication, COPY data: only counted or skipped.
        _ => 0,
    }
}

struct Frame {
    typ: u8,
    untyped: bool,
    body: Vec<u8>,
    /// Some body bytes were not kept (over the keep limit, or lost to a gap).
    truncated: bool,
    /// Timestamp of the piece that held the message's first byte.
    start_ts: u64,
}

enum Pulled {
    More,
    Frame(Frame),
    /// Impossible header: the stream is out of sync; the reader is now dead.
    Bad,
}

/// One direction's message reader: a type byte (not in the startup phase) and an Int32
/// length that counts itself, then the body, of which at most `keep` bytes are kept.
#[derive(Default)]
struct Reader {
    frames: FrameReader<5>,
    typ: u8,
    untyped: bool,
}

impl Reader {
    fn at_boundary(&self) -> bool {
        self.frames.at_boundary()
    }

    /// Some bytes of a header read, not all.
    fn mid_header(&self) -> bool {
        !self.frames.at_boundary() && !self.frames.in_body()
    }

    /// Forgets the message in progress (and a lost stream): the next byte starts one.
    fn restart(&mut self) {
        self.frames.restart();
    }

    fn recycle(&mut self, body: Vec<u8>) {
        self.frames.recycle(body);
    }

    fn pull(&mut self, data: &mut &[u8], ts: u64, rules: &Rules, max_buffer: usize) -> Pulled {
        if !self.frames.in_body() {
            let need = if rules.typed { 5 } else { 4 };
            let Some(header) = self.frames.read_header(data, ts, need, true) else {
                return Pulled::More;
            };
            let (typ, len) = match header {
                [typ, a, b, c, d] if rules.typed => (typ, u32::from_be_bytes([a, b, c, d])),
                [a, b, c, d, _] => (0, u32::from_be_bytes([a, b, c, d])),
            };
            // The length counts itself; the protocol's Int32 is signed, so anything over
            // 2^31 − 1 (or an unknown type byte) means we are reading garbage.
            let plausible = if rules.typed {
                (4..=i32::MAX as u32).contains(&len) && (rules.valid)(typ)
            } else {
                (8..=MAX_STARTUP_LEN).contains(&len)
            };
            if !plausible {
                self.frames.dead = true;
                return Pulled::Bad;
            }
            let body_len = (len - 4) as usize;
            self.typ = typ;
            self.untyped = !rules.typed;
            let keep = (rules.keep)(typ).min(max_buffer).min(body_len);
            self.frames.start_body(body_len, keep);
        }
        if !self.frames.read_body(data) {
            return Pulled::More;
        }
        Pulled::Frame(self.take_frame())
    }

    fn take_frame(&mut self) -> Frame {
        let (body, truncated) = self.frames.take_body();
        Frame {
            typ: self.typ,
            untyped: self.untyped,
            body,
            truncated,
            start_ts: self.frames.start_ts,
        }
    }

    /// `n` bytes were lost. Inside a body of known length they are skipped (a message
    /// completed this way is returned, marked truncated); anywhere else the stream
    /// can no longer be framed (`lost`).
    fn skip(&mut self, n: u64) -> (Option<Frame>, bool) {
        let (ended, lost) = self.frames.skip(n);
        (ended.then(|| self.take_frame()), lost)
    }
}

#[cfg(test)]
mod tests;
