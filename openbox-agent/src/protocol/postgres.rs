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
//! Lost server bytes: a gap inside a message of known length is skipped. A gap that runs
//! past a message's end leaves no length to frame on; the requests waiting for that
//! response end there (UNSET, `db.response_truncated`, no `db.rowcount`), and the server
//! side is resynchronised at the client's next request: its bytes until then are the
//! rest of that response and are discarded. This is exact for clients that wait for
//! the response (ReadyForQuery, or the answer to a Flush) before they send again —
//! libpq, psycopg2, asyncpg outside pipelines. Where the client evidently does not wait
//! (several Syncs outstanding, requests queued after the one being answered, COPY), or
//! the client's own stream is lost, the connection is given up instead.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

use super::{truncate_statement, Op, Parser, ParserConfig, Protocol, Side, StatusCode};

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
/// Most prepared statements / portals remembered per connection (oldest evicted first).
pub(super) const MAX_STATEMENTS: usize = 256;
/// Most requests waiting for a response; beyond this the server side is evidently not
/// being seen, and the oldest request is given up.
pub(super) const MAX_PENDING: usize = 1024;
/// Bind carries parameter values after the two names we need; keep only its head.
const BIND_KEEP: usize = 4096;
/// Largest integer JSON readers agree on (RFC 8259 §6: ±(2^53 − 1)); row counts are clamped.
const MAX_JSON_INT: u64 = (1 << 53) - 1;

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
    let text = |b: &[u8]| b.iter().all(|&c| c >= 0x20 || c == b'\t' || c == b'\n' || c == b'\r');
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
                end > 0 && text(&query[..end]) && query[..end].iter().any(|c| c.is_ascii_alphabetic())
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

pub struct PostgresParser {
    cfg: ParserConfig,
    unparsed: u64,
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
}

/// A statement as remembered: text already cut to `max_statement`, and its operation.
#[derive(Debug)]
pub(super) struct Statement {
    pub(super) text: String,
    pub(super) operation: Option<String>,
}

impl Statement {
    pub(super) fn new(sql: &str, max: usize, dialect: Dialect) -> Self {
        Self {
            text: truncate_statement(sql, max),
            operation: sql_operation(sql, dialect),
        }
    }
}

#[derive(Clone, Debug)]
struct ServerError {
    code: Option<String>,
    message: String,
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
            unparsed: 0,
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
        }
    }

    fn feed_client(&mut self, mut data: &[u8], ts: u64, out: &mut Vec<Op>) {
        while !data.is_empty() && !self.client.dead && !self.stopped {
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
                Pulled::Bad => {
                    self.unparsed += 1;
                    self.client_lost();
                }
            }
        }
    }

    fn feed_server(&mut self, mut data: &[u8], ts: u64, out: &mut Vec<Op>) {
        if self.server_resync {
            // The rest of a response already reported; the client has not asked again.
            return;
        }
        while !data.is_empty() && !self.server.dead && !self.stopped {
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
                        self.unparsed += 1;
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
                Pulled::Bad => {
                    self.unparsed += 1;
                    self.server_lost(ts, out);
                }
            }
        }
    }

    fn on_client(&mut self, f: Frame, out: &mut Vec<Op>) {
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
                    None => self.unparsed += 1,
                }
            }
            b'B' => {
                self.batch_start.get_or_insert(f.start_ts);
                // Bind: String portal, String statement, then formats and values.
                match cstr(body, 0).and_then(|(portal, next)| Some((portal, cstr(body, next)?.0))) {
                    Some((portal, stmt)) => match self.statements.get(&lossy(stmt)).cloned() {
                        Some(s) => self.portals.insert(lossy(portal), s),
                        // Prepared before the capture began: forget any stale mapping.
                        None => self.portals.remove(&lossy(portal)),
                    },
                    None => self.unparsed += 1,
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
                        Some(b'S') => self.statements.remove(&lossy(name)),
                        Some(b'P') => self.portals.remove(&lossy(name)),
                        _ => self.unparsed += 1,
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
                self.client.dead = true;
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
                // "database: defaults to the user name."
                if self.database.is_none() {
                    self.database = self.user.clone();
                }
                self.client_startup = false;
                self.startup_ready_due = true;
            }
            _ => {
                self.unparsed += 1;
                self.client.dead = true;
            }
        }
    }

    fn on_server(&mut self, f: Frame, ts: u64, out: &mut Vec<Op>) {
        match f.typ {
            // CopyIn/CopyOut/CopyBothResponse start COPY; it ends with CommandComplete or
            // ErrorResponse (both handled below), ReadyForQuery at the latest.
            b'G' | b'H' | b'W' => self.copy = true,
            b'C' | b'E' | b'Z' => self.copy = false,
            _ => {}
        }
        match f.typ {
            b'Z' => self.ready(ts, out),
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

    fn complete(&mut self, how: Completion, ts: u64, out: &mut Vec<Op>) {
        let Some(i) = self.front_index() else { return };
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
        if let (false, Some((stmt, start_ts))) = (failed_execute, failed_parse) {
            let mut run = self.start_op(Some(&stmt), "PARSE", start_ts);
            run.error = Some(err.clone());
            out.push(finish(run, ts));
        }
        self.batch_error = Some(err);
    }

    fn ready(&mut self, ts: u64, out: &mut Vec<Op>) {
        if std::mem::take(&mut self.startup_ready_due) {
            return;
        }
        while let Some(p) = self.pending.pop_front() {
            match p {
                Pending::Query(run) => {
                    out.push(finish(run, ts));
                    break;
                }
                Pending::Sync | Pending::FunctionCall => break,
                // Queued after an error and skipped by the server up to this Sync.
                Pending::Execute(mut run) => {
                    run.error = run.error.or_else(|| self.batch_error.clone());
                    out.push(finish(run, ts));
                }
                Pending::Parse { .. } | Pending::Bind | Pending::Describe | Pending::Close => {}
            }
        }
        self.batch_error = None;
    }

    fn push(&mut self, p: Pending, ts: u64, out: &mut Vec<Op>) {
        if self.server_resync {
            self.resume_server();
        }
        if self.pending.len() >= MAX_PENDING {
            // The server's answers are not reaching us: give up the oldest request.
            self.unparsed += 1;
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

    /// The server's stream can no longer be followed: requests still waiting are
    /// reported now (UNSET), and the connection is not parsed further — without the
    /// server's answers new ops would carry made-up end times.
    fn server_lost(&mut self, ts: u64, out: &mut Vec<Op>) {
        self.end_response(ts, out);
        self.server.dead = true;
        self.stopped = true;
    }

    /// A gap ran past the end of a server message. If the client waits for this
    /// response before it asks again, the response ends here and the server side
    /// resynchronises at the client's next request; otherwise the server is lost.
    fn server_gap_lost(&mut self, ts: u64, out: &mut Vec<Op>) {
        if !self.can_resync() {
            self.server_lost(ts, out);
            return;
        }
        self.end_response(ts, out);
        self.server.dead = true;
        self.server_resync = true;
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
        waiting
            && !self.client.dead
            && self.client.at_boundary()
            && !self.client_startup
            && self.ssl_answers == 0
            && !self.copy
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

    /// The client's stream can no longer be framed. The server may still answer what
    /// was asked — unless it is waiting for the client's next request to resynchronise.
    fn client_lost(&mut self) {
        self.client.dead = true;
        if self.server_resync {
            self.stopped = true;
        }
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
        // waits to resynchronise (one `unparsed` per resync, not per gap).
        if reader.dead {
            return;
        }
        let (frame, lost) = reader.skip(n);
        if let Some(frame) = frame {
            match side {
                Side::Client => self.on_client(frame, out),
                Side::Server => self.on_server(frame, ts, out),
            }
        }
        if lost {
            // Bytes between messages are gone: no length to frame the rest on.
            self.unparsed += 1;
            match side {
                Side::Client => self.client_lost(),
                Side::Server => self.server_gap_lost(ts, out),
            }
        }
    }

    fn close(&mut self, ts: u64, out: &mut Vec<Op>) {
        self.flush(ts, out);
    }

    fn unparsed(&self) -> u64 {
        self.unparsed
    }
}

fn finish(run: Box<Running>, end_ts: u64) -> Op {
    let Running {
        mut op,
        rowcount,
        error,
        ..
    } = *run;
    op.end_ts = end_ts;
    if let Some(n) = rowcount {
        op.attr("db.rowcount", n.min(MAX_JSON_INT));
    }
    if let Some(err) = error {
        op.status = StatusCode::Error;
        op.status_description = Some(err.message);
        if let Some(code) = err.code {
            op.attr("db.error.code", code);
        }
    }
    op
}

/// An op with the SDK's database attributes; shared with the MySQL parser.
pub(super) fn new_op(
    stmt: Option<&Statement>,
    fallback: &str,
    database: Option<&str>,
    user: Option<&str>,
    start_ts: u64,
) -> Op {
    let operation = stmt.and_then(|s| s.operation.clone());
    let mut op = Op {
        name: operation.clone().unwrap_or_else(|| fallback.to_string()),
        start_ts,
        end_ts: start_ts,
        ..Op::default()
    };
    if let Some(s) = stmt {
        op.attr("db.statement", s.text.clone());
    }
    if let Some(o) = operation {
        op.attr("db.operation", o);
    }
    if let Some(d) = database {
        op.attr("db.name", d);
    }
    if let Some(u) = user {
        op.attr("db.user", u);
    }
    op
}

/// ErrorResponse: fields of Byte1 code + String value, ended by a zero byte.
/// 'C' is the SQLSTATE, 'M' the primary message.
fn parse_error(body: &[u8]) -> ServerError {
    let mut err = ServerError {
        code: None,
        message: String::new(),
    };
    let mut pos = 0;
    while let Some(&field) = body.get(pos) {
        if field == 0 {
            break;
        }
        let value = cstr_or_rest(body, pos + 1);
        match field {
            b'C' => err.code = Some(lossy(value)),
            b'M' => err.message = lossy(value),
            _ => {}
        }
        pos = pos.saturating_add(value.len()).saturating_add(2);
    }
    err
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dialect {
    Postgres,
    Mysql,
}

/// The statement's first keyword, uppercased: SELECT, INSERT, WITH, BEGIN …
/// Leading whitespace, `--` line comments and `/* */` block comments are skipped
/// (nested in PostgreSQL; `#` line comments and `/*!NNNNN …*/` version comments, whose
/// body is executed, in MySQL), as are opening parentheses and empty statements.
pub(super) fn sql_operation(sql: &str, dialect: Dialect) -> Option<String> {
    let b = sql.as_bytes();
    let mut i = 0;
    loop {
        match (b.get(i), b.get(i + 1)) {
            (Some(c), _) if c.is_ascii_whitespace() || *c == b'(' || *c == b';' => i += 1,
            (Some(b'-'), Some(b'-')) => i = skip_line(b, i),
            (Some(b'#'), _) if dialect == Dialect::Mysql => i = skip_line(b, i),
            (Some(b'/'), Some(b'*')) => {
                if dialect == Dialect::Mysql && b.get(i + 2) == Some(&b'!') {
                    // Executable comment: its content is SQL, after an optional version.
                    i += 3;
                    while b.get(i).is_some_and(u8::is_ascii_digit) {
                        i += 1;
                    }
                } else {
                    i = skip_block(b, i, dialect == Dialect::Postgres);
                }
            }
            _ => break,
        }
    }
    let rest = b.get(i..)?;
    let len = rest
        .iter()
        .take_while(|c| c.is_ascii_alphabetic() || **c == b'_')
        .count();
    let word = rest.get(..len.min(32))?;
    (!word.is_empty()).then(|| String::from_utf8_lossy(word).to_ascii_uppercase())
}

fn skip_line(b: &[u8], i: usize) -> usize {
    match b.get(i..).and_then(|r| r.iter().position(|&c| c == b'\n')) {
        Some(p) => i + p + 1,
        None => b.len(),
    }
}

fn skip_block(b: &[u8], mut i: usize, nested: bool) -> usize {
    let mut depth = 0u32;
    while i < b.len() {
        match (b.get(i), b.get(i + 1)) {
            (Some(b'/'), Some(b'*')) if depth == 0 || nested => {
                depth = depth.saturating_add(1);
                i += 2;
            }
            (Some(b'*'), Some(b'/')) => {
                depth = depth.saturating_sub(1);
                i += 2;
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    b.len()
}

/// A map that forgets its oldest entries beyond `cap`, bounding per-connection memory
/// (prepared statements and portals are created by the client, without limit).
#[derive(Debug)]
pub(super) struct BoundedMap<K, V> {
    map: BTreeMap<K, V>,
    order: VecDeque<K>,
    cap: usize,
}

impl<K: Ord + Clone, V> BoundedMap<K, V> {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            map: BTreeMap::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    pub(super) fn insert(&mut self, key: K, value: V) {
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
            if self.map.len() > self.cap {
                if let Some(oldest) = self.order.pop_front() {
                    self.map.remove(&oldest);
                }
            }
        }
    }

    pub(super) fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    pub(super) fn remove(&mut self, key: &K) {
        if self.map.remove(key).is_some() {
            self.order.retain(|k| k != key);
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
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

/// One direction's message reader: header bytes, then the body, of which at most
/// `keep` bytes are buffered.
#[derive(Default)]
struct Reader {
    hdr: [u8; 5],
    hdr_len: usize,
    in_body: bool,
    untyped: bool,
    typ: u8,
    remaining: usize,
    keep: usize,
    body: Vec<u8>,
    truncated: bool,
    start_ts: u64,
    dead: bool,
}

impl Reader {
    fn at_boundary(&self) -> bool {
        !self.in_body && self.hdr_len == 0
    }

    /// Forgets the message in progress (and a lost stream): the next byte starts one.
    fn restart(&mut self) {
        self.hdr_len = 0;
        self.in_body = false;
        self.remaining = 0;
        self.keep = 0;
        self.truncated = false;
        self.body.clear();
        self.dead = false;
    }

    fn recycle(&mut self, mut body: Vec<u8>) {
        body.clear();
        if self.body.capacity() == 0 && body.capacity() <= 64 * 1024 {
            self.body = body;
        }
    }

    fn pull(&mut self, data: &mut &[u8], ts: u64, rules: &Rules, max_buffer: usize) -> Pulled {
        if !self.in_body {
            let need: usize = if rules.typed { 5 } else { 4 };
            if self.hdr_len == 0 {
                self.start_ts = ts;
            }
            let take = need.saturating_sub(self.hdr_len).min(data.len());
            let (head, rest) = data.split_at(take);
            if let Some(dst) = self.hdr.get_mut(self.hdr_len..self.hdr_len + take) {
                dst.copy_from_slice(head);
            }
            self.hdr_len += take;
            *data = rest;
            if self.hdr_len < need {
                return Pulled::More;
            }
            self.hdr_len = 0;
            let (typ, len) = if rules.typed {
                (
                    self.hdr[0],
                    u32::from_be_bytes([self.hdr[1], self.hdr[2], self.hdr[3], self.hdr[4]]),
                )
            } else {
                (
                    0,
                    u32::from_be_bytes([self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]]),
                )
            };
            // The length counts itself; the protocol's Int32 is signed, so anything over
            // 2^31 − 1 (or an unknown type byte) means we are reading garbage.
            let plausible = if rules.typed {
                (4..=i32::MAX as u32).contains(&len) && (rules.valid)(typ)
            } else {
                (8..=MAX_STARTUP_LEN).contains(&len)
            };
            if !plausible {
                self.dead = true;
                return Pulled::Bad;
            }
            let body_len = (len - 4) as usize;
            self.typ = typ;
            self.untyped = !rules.typed;
            self.remaining = body_len;
            self.keep = (rules.keep)(typ).min(max_buffer).min(body_len);
            self.truncated = self.keep < body_len;
            self.body.clear();
            self.in_body = true;
        }
        let take = self.remaining.min(data.len());
        let (chunk, rest) = data.split_at(take);
        let room = self.keep.saturating_sub(self.body.len()).min(chunk.len());
        self.body
            .extend_from_slice(chunk.get(..room).unwrap_or_default());
        self.remaining -= take;
        *data = rest;
        if self.remaining > 0 {
            return Pulled::More;
        }
        Pulled::Frame(self.take_frame())
    }

    fn take_frame(&mut self) -> Frame {
        self.in_body = false;
        Frame {
            typ: self.typ,
            untyped: self.untyped,
            body: std::mem::take(&mut self.body),
            truncated: self.truncated,
            start_ts: self.start_ts,
        }
    }

    /// `n` bytes were lost. Inside a body of known length they are skipped (a message
    /// completed this way is returned, marked truncated); anywhere else the stream
    /// can no longer be framed (`lost`).
    fn skip(&mut self, n: u64) -> (Option<Frame>, bool) {
        if !self.in_body {
            self.dead = true;
            return (None, true);
        }
        // Bytes after the hole would land at the wrong offset: keep no more.
        self.keep = self.body.len();
        self.truncated = true;
        let n_usize = usize::try_from(n).unwrap_or(usize::MAX);
        if n_usize < self.remaining {
            self.remaining -= n_usize;
            return (None, false);
        }
        let lost = n_usize > self.remaining;
        self.remaining = 0;
        let frame = self.take_frame();
        if lost {
            self.dead = true;
        }
        (Some(frame), lost)
    }
}

// --- byte helpers ------------------------------------------------------------------

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

/// NUL-terminated string at `at`: its bytes and the offset after the NUL.
fn cstr(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = b.get(at..)?;
    let end = rest.iter().position(|&c| c == 0)?;
    Some((rest.get(..end)?, at + end + 1))
}

/// NUL-terminated string at `at`, or everything left when the NUL was cut off.
fn cstr_or_rest(b: &[u8], at: usize) -> &[u8] {
    let rest = b.get(at..).unwrap_or_default();
    match rest.iter().position(|&c| c == 0) {
        Some(end) => rest.get(..end).unwrap_or_default(),
        None => rest,
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
mod tests;
