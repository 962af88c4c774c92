//! MySQL / MariaDB client/server protocol parser.
//!
//! Framing (MySQL source docs, "MySQL Packets"): every packet is a 3-byte little-endian
//! payload length and a 1-byte sequence id; a payload of exactly 0xFFFFFF continues in
//! the next packet, so logical payloads are reassembled before they are looked at.
//!
//! Conversation: the server greets (protocol 10), the client answers with
//! HandshakeResponse41 (after an SSLRequest, inside TLS, whose plaintext we are fed),
//! authentication runs until the server's OK or ERR, then the client sends commands,
//! each starting a new sequence (id 0), and the server answers each in turn. Which
//! packets make up an answer depends on the command and on the negotiated capability
//! flags (CLIENT_DEPRECATE_EOF, CLIENT_OPTIONAL_RESULTSET_METADATA, …), so both are
//! tracked here.

use std::{collections::VecDeque, sync::Arc};

use super::{
    postgres::{
        new_op, sql_operation, BoundedMap, Dialect, Statement, MAX_PENDING, MAX_STATEMENTS,
    },
    truncate_statement, Op, Parser, ParserConfig, Protocol, Side, StatusCode,
};

// Capability flags ("Capabilities Flags" in the MySQL protocol docs). MariaDB's own
// flags travel in four extra bytes and are kept here in the upper 32 bits.
/// MySQL's CLIENT_LONG_PASSWORD; MariaDB clears it ("CLIENT_MYSQL") to announce its
/// extended capabilities.
const CLIENT_MYSQL: u64 = 1;
const CLIENT_CONNECT_WITH_DB: u64 = 1 << 3;
const CLIENT_COMPRESS: u64 = 1 << 5;
const CLIENT_PROTOCOL_41: u64 = 1 << 9;
const CLIENT_SSL: u64 = 1 << 11;
const CLIENT_TRANSACTIONS: u64 = 1 << 13;
const CLIENT_SECURE_CONNECTION: u64 = 1 << 15;
const CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA: u64 = 1 << 21;
const CLIENT_DEPRECATE_EOF: u64 = 1 << 24;
const CLIENT_OPTIONAL_RESULTSET_METADATA: u64 = 1 << 25;
const CLIENT_ZSTD_COMPRESSION_ALGORITHM: u64 = 1 << 26;
const CLIENT_QUERY_ATTRIBUTES: u64 = 1 << 27;
/// MARIADB_CLIENT_CACHE_METADATA: a binary result set may omit its column definitions.
const MARIADB_CLIENT_CACHE_METADATA: u64 = 1 << (32 + 4);

/// SERVER_MORE_RESULTS_EXISTS: another result set follows in the same response.
const SERVER_MORE_RESULTS_EXISTS: u16 = 0x0008;
/// SERVER_STATUS_CURSOR_EXISTS: rows of this execute come by COM_STMT_FETCH.
const SERVER_STATUS_CURSOR_EXISTS: u16 = 0x0040;

const MAX_PACKET: usize = 0xFF_FFFF;
/// Bytes of a row or definition packet worth keeping: enough for the OK/EOF/ERR that
/// may stand in its place (error messages are at most 512 bytes).
const ROW_KEEP: usize = 1024;
/// MariaDB progress reports come as ERR packets with this code and end nothing.
const PROGRESS_REPORT: u16 = 0xFFFF;
/// Largest integer JSON readers agree on (RFC 8259 §6: ±(2^53 − 1)); row counts are clamped.
const MAX_JSON_INT: u64 = (1 << 53) - 1;

// Command bytes ("Text Protocol", "Prepared Statements", "Utility Commands").
const COM_QUIT: u8 = 0x01;
const COM_INIT_DB: u8 = 0x02;
const COM_QUERY: u8 = 0x03;
const COM_FIELD_LIST: u8 = 0x04;
const COM_STATISTICS: u8 = 0x09;
const COM_CHANGE_USER: u8 = 0x11;
const COM_BINLOG_DUMP: u8 = 0x12;
const COM_STMT_PREPARE: u8 = 0x16;
const COM_STMT_EXECUTE: u8 = 0x17;
const COM_STMT_SEND_LONG_DATA: u8 = 0x18;
const COM_STMT_CLOSE: u8 = 0x19;
const COM_STMT_FETCH: u8 = 0x1c;
const COM_BINLOG_DUMP_GTID: u8 = 0x1e;
/// MariaDB's COM_STMT_BULK_EXECUTE: a prepared statement run over many parameter rows.
const COM_STMT_BULK_EXECUTE: u8 = 0xfa;

/// Whether these first server bytes are a MySQL/MariaDB greeting: a packet with
/// sequence id 0 and a plausible length whose payload is protocol version 10 followed
/// by a printable, NUL-terminated server version ("8.0.36", "5.5.5-10.11.6-MariaDB").
pub fn looks_like_greeting(first: &[u8]) -> bool {
    let Some(&[l0, l1, l2, seq, version]) = first.get(..5) else {
        return false;
    };
    let len = u32::from_le_bytes([l0, l1, l2, 0]);
    if seq != 0 || !(18..=1024).contains(&len) || version != 0x0a {
        return false;
    }
    let rest = first.get(5..).unwrap_or_default();
    let Some(end) = rest.iter().position(|&b| b == 0) else {
        return false;
    };
    let server = rest.get(..end).unwrap_or_default();
    (1..=64).contains(&server.len())
        && server.first().is_some_and(u8::is_ascii_digit)
        && server.iter().all(|b| b.is_ascii_graphic() || *b == b' ')
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the server's greeting.
    Greeting,
    /// Waiting for the client's HandshakeResponse (an SSLRequest keeps us here).
    HandshakeResponse,
    /// Authentication exchange (also after COM_CHANGE_USER) until the server's OK/ERR.
    Auth,
    Command,
}

pub struct MysqlParser {
    cfg: ParserConfig,
    unparsed: u64,
    client: Reader,
    server: Reader,
    phase: Phase,
    server_caps: u64,
    /// Capabilities both sides announced: these decide the packet layouts.
    caps: u64,
    user: Option<String>,
    database: Option<String>,
    statements: BoundedMap<u32, Arc<Statement>>,
    /// MariaDB lets COM_STMT_EXECUTE name statement id 0xFFFFFFFF, "the statement just
    /// prepared", and sends it before the prepare's answer: the last COM_STMT_PREPARE sent.
    last_prepare_sent: Option<Arc<Statement>>,
    pending: VecDeque<Pending>,
    /// Where the answer to `pending.front()` has got to.
    resp: Resp,
    /// Nothing more can be parsed (compressed, replication stream, server side lost).
    stopped: bool,
}

#[derive(Debug)]
struct Running {
    op: Op,
    /// Result sets (or OKs) finished so far: only the first gives the row count, as
    /// `cursor.rowcount` right after `execute()` reports in PyMySQL and mysqlclient.
    results: u32,
    rows: u64,
    rowcount: Option<u64>,
    error: Option<(u16, String)>,
}

#[derive(Debug)]
enum Kind {
    /// COM_QUERY; `use_db` is the schema a `USE db` statement switches to.
    Query { use_db: Option<String> },
    /// COM_STMT_EXECUTE, COM_STMT_BULK_EXECUTE.
    Execute,
    /// COM_INIT_DB: switches the schema when it succeeds.
    InitDb(String),
    /// COM_STMT_PREPARE: no op unless it fails; remembers the statement by id.
    Prepare(Arc<Statement>),
    /// COM_STMT_FETCH: rows then EOF, no column count.
    Fetch,
    /// COM_FIELD_LIST: definitions then EOF.
    FieldList,
    /// COM_STATISTICS: one packet of bare text.
    Statistics,
    /// Anything else: OK, ERR, EOF or a result set.
    Other,
}

#[derive(Debug)]
struct Pending {
    kind: Kind,
    run: Box<Running>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resp {
    /// The first packet of a (further) result: OK, ERR, EOF, LOCAL INFILE, column count.
    Start,
    Columns {
        left: u64,
    },
    /// The EOF after the column definitions (without CLIENT_DEPRECATE_EOF).
    ColumnsEof,
    Rows,
    /// Parameter and column definitions after COM_STMT_PREPARE_OK, and their EOFs.
    PrepareDefs {
        defs: u64,
        eofs: u8,
    },
}

impl MysqlParser {
    pub fn new(cfg: ParserConfig) -> Self {
        Self {
            cfg,
            unparsed: 0,
            client: Reader::default(),
            server: Reader::default(),
            phase: Phase::Greeting,
            server_caps: 0,
            caps: 0,
            user: None,
            database: None,
            statements: BoundedMap::new(MAX_STATEMENTS),
            last_prepare_sent: None,
            pending: VecDeque::new(),
            resp: Resp::Start,
            stopped: false,
        }
    }

    fn feed_client(&mut self, mut data: &[u8], ts: u64, out: &mut Vec<Op>) {
        while !data.is_empty() && !self.client.dead && !self.stopped {
            match self.client.pull(&mut data, ts, self.cfg.max_buffer) {
                Some(frame) => self.on_client(frame, out),
                None => break,
            }
        }
    }

    fn feed_server(&mut self, mut data: &[u8], ts: u64, out: &mut Vec<Op>) {
        while !data.is_empty() && !self.server.dead && !self.stopped {
            // Rows are only counted: keep just enough of them to recognise a terminator.
            let keep = match self.resp {
                Resp::Start => self.cfg.max_buffer,
                _ => ROW_KEEP.min(self.cfg.max_buffer),
            };
            match self.server.pull(&mut data, ts, keep) {
                Some(frame) => self.on_server(frame, ts, out),
                None => break,
            }
        }
    }

    fn on_client(&mut self, f: Frame, out: &mut Vec<Op>) {
        match self.phase {
            Phase::HandshakeResponse => self.on_handshake_response(&f.body),
            Phase::Command if f.seq == 0 => self.on_command(&f, out),
            // Before the greeting, during authentication, and packets continuing a
            // command (LOAD DATA LOCAL contents have sequence ids after 0): nothing to do.
            _ => {}
        }
        self.client.recycle(f.body);
    }

    fn on_server(&mut self, f: Frame, ts: u64, out: &mut Vec<Op>) {
        match self.phase {
            Phase::Greeting => self.on_greeting(&f.body),
            Phase::HandshakeResponse => {}
            Phase::Auth => match f.body.first() {
                Some(0x00) => {
                    self.phase = Phase::Command;
                    if self.caps & (CLIENT_COMPRESS | CLIENT_ZSTD_COMPRESSION_ALGORITHM) != 0 {
                        // Compression starts after the handshake's OK: not parsed.
                        self.unparsed += 1;
                        self.stop(ts, out);
                    }
                }
                // Failed authentication (the server closes) or COM_CHANGE_USER refused.
                Some(0xff) => self.phase = Phase::Command,
                // AuthSwitchRequest 0xFE, AuthMoreData 0x01: the exchange goes on.
                _ => {}
            },
            Phase::Command => self.on_response(&f, ts, out),
        }
        self.server.recycle(f.body);
    }

    /// Protocol::HandshakeV10.
    fn on_greeting(&mut self, b: &[u8]) {
        match b.first() {
            Some(0x0a) => {}
            // The server refused the connection ("Host … is blocked"): nothing follows.
            Some(0xff) => {
                self.stopped = true;
                return;
            }
            _ => {
                self.unparsed += 1;
                self.stopped = true;
                return;
            }
        }
        // Version string, connection id (4), auth-plugin-data part 1 (8), filler (1).
        let Some(pos) = cstr(b, 1).map(|(_, next)| next + 4 + 8 + 1) else {
            self.unparsed += 1;
            self.stopped = true;
            return;
        };
        let lower = le_u16(b, pos).unwrap_or(0);
        // Then charset (1), status flags (2), upper capabilities (2), auth data length
        // (1) and 10 reserved bytes, of which MariaDB uses the last 4 for its flags.
        let upper = le_u16(b, pos + 2 + 1 + 2).unwrap_or(0);
        let mut caps = u64::from(lower) | u64::from(upper) << 16;
        if caps & CLIENT_MYSQL == 0 {
            caps |= u64::from(le_u32(b, pos + 2 + 1 + 2 + 2 + 1 + 6).unwrap_or(0)) << 32;
        }
        self.server_caps = caps;
        self.phase = Phase::HandshakeResponse;
    }

    /// Protocol::HandshakeResponse41 (or 320), or an SSLRequest.
    fn on_handshake_response(&mut self, b: &[u8]) {
        let lower = u64::from(le_u16(b, 0).unwrap_or(0));
        let user_at;
        let client_caps;
        if lower & CLIENT_PROTOCOL_41 != 0 {
            let mut caps = u64::from(le_u32(b, 0).unwrap_or(0));
            if b.len() == 32 && caps & CLIENT_SSL != 0 {
                // SSLRequest: the full response follows inside TLS.
                return;
            }
            // Capabilities (4), max packet (4), charset (1), 19 filler bytes and 4 bytes
            // that are MariaDB's extended capabilities when CLIENT_MYSQL is clear.
            if caps & CLIENT_MYSQL == 0 && self.server_caps & CLIENT_MYSQL == 0 {
                caps |= u64::from(le_u32(b, 28).unwrap_or(0)) << 32;
            }
            client_caps = caps;
            user_at = 32;
        } else {
            // HandshakeResponse320: capabilities (2), max packet (3).
            if b.len() == 5 && lower & CLIENT_SSL != 0 {
                return;
            }
            client_caps = lower;
            user_at = 5;
        }
        self.caps = self.server_caps & client_caps;
        self.phase = Phase::Auth;
        let Some((user, mut pos)) = cstr(b, user_at) else {
            self.unparsed += 1;
            return;
        };
        self.user = Some(lossy(user));
        if client_caps & CLIENT_PROTOCOL_41 == 0 {
            // 320: NUL-terminated auth response, then the database if CONNECT_WITH_DB.
            if client_caps & CLIENT_CONNECT_WITH_DB != 0 {
                if let Some((db, _)) = cstr(b, pos).and_then(|(_, next)| cstr(b, next)) {
                    self.set_database(db);
                }
            }
            return;
        }
        // Auth response: length-encoded, 1-byte length, or NUL-terminated.
        pos = if client_caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
            match lenenc(b, pos) {
                Some((n, next)) => next.saturating_add(usize::try_from(n).unwrap_or(usize::MAX)),
                None => return,
            }
        } else if client_caps & CLIENT_SECURE_CONNECTION != 0 {
            match b.get(pos) {
                Some(&n) => pos + 1 + usize::from(n),
                None => return,
            }
        } else {
            match cstr(b, pos) {
                Some((_, next)) => next,
                None => return,
            }
        };
        if client_caps & CLIENT_CONNECT_WITH_DB != 0 {
            if let Some((db, _)) = cstr(b, pos) {
                self.set_database(db);
            }
        }
        // The plugin name and connection attributes that may follow are not needed.
    }

    fn set_database(&mut self, db: &[u8]) {
        self.database = (!db.is_empty()).then(|| lossy(db));
    }

    fn on_command(&mut self, f: &Frame, out: &mut Vec<Op>) {
        let b = f.body.as_slice();
        let Some((&cmd, args)) = b.split_first() else {
            self.unparsed += 1;
            return;
        };
        let kind = match cmd {
            COM_QUERY => {
                let sql = query_text(args, self.caps & CLIENT_QUERY_ATTRIBUTES != 0);
                let stmt = sql
                    .as_deref()
                    .map(|s| Statement::new(s, self.cfg.max_statement, Dialect::Mysql));
                let use_db = match (&stmt, sql_operation_is_use(stmt.as_ref())) {
                    (Some(_), true) => sql.as_deref().and_then(use_target),
                    _ => None,
                };
                let run = self.start_op(stmt.as_ref(), "QUERY", f.start_ts);
                if stmt.is_none() {
                    self.unparsed += 1;
                }
                return self.push(
                    Pending {
                        kind: Kind::Query { use_db },
                        run,
                    },
                    f.start_ts,
                    out,
                );
            }
            COM_INIT_DB => {
                let db = lossy(args);
                let stmt = Statement {
                    text: truncate_statement(&format!("USE {db}"), self.cfg.max_statement),
                    operation: Some("INIT_DB".to_string()),
                };
                let run = self.start_op(Some(&stmt), "INIT_DB", f.start_ts);
                return self.push(
                    Pending {
                        kind: Kind::InitDb(db),
                        run,
                    },
                    f.start_ts,
                    out,
                );
            }
            COM_STMT_PREPARE => {
                let sql = String::from_utf8_lossy(args);
                let stmt = Arc::new(Statement::new(&sql, self.cfg.max_statement, Dialect::Mysql));
                self.last_prepare_sent = Some(Arc::clone(&stmt));
                Kind::Prepare(stmt)
            }
            COM_STMT_EXECUTE | COM_STMT_BULK_EXECUTE => {
                let stmt = match le_u32(args, 0) {
                    Some(u32::MAX) => self.last_prepare_sent.clone(),
                    Some(id) => self.statements.get(&id).cloned(),
                    None => None,
                };
                let run = self.start_op(stmt.as_deref(), "EXECUTE", f.start_ts);
                return self.push(
                    Pending {
                        kind: Kind::Execute,
                        run,
                    },
                    f.start_ts,
                    out,
                );
            }
            COM_STMT_CLOSE => {
                if let Some(id) = le_u32(args, 0) {
                    self.statements.remove(&id);
                }
                return; // no response
            }
            COM_QUIT | COM_STMT_SEND_LONG_DATA => return, // no response
            COM_STMT_FETCH => Kind::Fetch,
            COM_FIELD_LIST => Kind::FieldList,
            COM_STATISTICS => Kind::Statistics,
            COM_CHANGE_USER => {
                // user NUL, auth response (1-byte length or NUL-terminated), schema NUL.
                if let Some((user, pos)) = cstr(args, 0) {
                    self.user = Some(lossy(user));
                    let after_auth = if self.caps & CLIENT_SECURE_CONNECTION != 0 {
                        args.get(pos).map(|&n| pos + 1 + usize::from(n))
                    } else {
                        cstr(args, pos).map(|(_, next)| next)
                    };
                    if let Some((db, _)) = after_auth.and_then(|p| cstr(args, p)) {
                        self.set_database(db);
                    }
                }
                self.phase = Phase::Auth;
                return;
            }
            COM_BINLOG_DUMP | COM_BINLOG_DUMP_GTID => {
                // A replication stream: events until the connection ends.
                self.unparsed += 1;
                self.stopped = true;
                return;
            }
            _ => Kind::Other,
        };
        let run = self.start_op(None, "", f.start_ts);
        self.push(Pending { kind, run }, f.start_ts, out);
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
            results: 0,
            rows: 0,
            rowcount: None,
            error: None,
        })
    }

    fn push(&mut self, p: Pending, ts: u64, out: &mut Vec<Op>) {
        if self.pending.len() >= MAX_PENDING {
            // Answers are not reaching us: give up the oldest request.
            self.unparsed += 1;
            self.pop_front(ts, out, false);
        }
        if self.pending.is_empty() {
            self.resp = initial_resp(&p.kind);
        }
        self.pending.push_back(p);
    }

    /// Ends the answer to the front command; `answered` is false when the answer was
    /// never seen (the op is then reported as it stands, status UNSET).
    fn pop_front(&mut self, ts: u64, out: &mut Vec<Op>, answered: bool) {
        let Some(Pending { kind, run }) = self.pending.pop_front() else {
            return;
        };
        self.resp = self
            .pending
            .front()
            .map_or(Resp::Start, |p| initial_resp(&p.kind));
        let ok = answered && run.error.is_none();
        match kind {
            Kind::Query { use_db } => {
                if let (true, Some(db)) = (ok, use_db) {
                    self.database = Some(db);
                }
                out.push(finish(run, ts));
            }
            Kind::InitDb(db) => {
                // Its OK's "affected rows" is always 0 and means nothing here.
                let mut run = run;
                run.rowcount = None;
                if ok {
                    self.database = (!db.is_empty()).then_some(db);
                }
                out.push(finish(run, ts));
            }
            Kind::Execute => out.push(finish(run, ts)),
            Kind::Prepare(stmt) => {
                // A failed prepare never gets executed: report it, or it leaves no trace.
                if run.error.is_some() {
                    let mut failed = self.start_op(Some(&stmt), "PREPARE", run.op.start_ts);
                    failed.error = run.error;
                    out.push(finish(failed, ts));
                }
            }
            Kind::Fetch | Kind::FieldList | Kind::Statistics | Kind::Other => {}
        }
    }

    fn on_response(&mut self, f: &Frame, ts: u64, out: &mut Vec<Op>) {
        // A packet that does not belong to a prepare's definitions ends that answer and is
        // then looked at again as the start of the next one.
        for _ in 0..2 {
            let Some(front) = self.pending.front_mut() else {
                return;
            }; // unsolicited
            let b = f.body.as_slice();
            let first = b.first().copied();
            let eof = first == Some(0xfe) && f.len < 9;
            if matches!(front.kind, Kind::Statistics) {
                return self.pop_front(ts, out, true);
            }
            match self.resp {
                Resp::PrepareDefs { defs, eofs } => {
                    let (defs, eofs) = if eof && eofs > 0 {
                        (defs, eofs - 1)
                    } else if defs > 0
                        && (b.starts_with(b"\x03def") || self.caps & CLIENT_PROTOCOL_41 == 0)
                    {
                        (defs - 1, eofs)
                    } else {
                        self.pop_front(ts, out, true);
                        continue;
                    };
                    self.resp = Resp::PrepareDefs { defs, eofs };
                    if defs == 0 && eofs == 0 {
                        self.pop_front(ts, out, true);
                    }
                }
                Resp::Start => match first {
                    Some(0x00) => {
                        if let Kind::Prepare(stmt) = &front.kind {
                            // COM_STMT_PREPARE_OK: statement id (4), columns (2), params (2).
                            let (Some(id), Some(cols), Some(params)) =
                                (le_u32(b, 1), le_u16(b, 5), le_u16(b, 7))
                            else {
                                self.unparsed += 1;
                                return self.pop_front(ts, out, true);
                            };
                            self.statements.insert(id, Arc::clone(stmt));
                            let eofs = if self.caps & CLIENT_DEPRECATE_EOF != 0 {
                                0
                            } else {
                                u8::from(cols > 0) + u8::from(params > 0)
                            };
                            let defs = u64::from(cols) + u64::from(params);
                            self.resp = Resp::PrepareDefs { defs, eofs };
                            if defs == 0 && eofs == 0 {
                                self.pop_front(ts, out, true);
                            }
                            return;
                        }
                        let (affected, status) = parse_ok(b, self.caps);
                        self.end_result(affected, status, ts, out);
                    }
                    Some(0xff) => self.on_err(b, ts, out),
                    Some(0xfe) if eof => {
                        let status = parse_eof(b, self.caps);
                        self.end_result(None, status, ts, out);
                    }
                    // LOCAL INFILE request: the client sends the file, then OK or ERR.
                    Some(0xfb) => {}
                    _ => self.on_column_count(b),
                },
                Resp::Columns { left } => {
                    if first == Some(0xff) {
                        return self.on_err(b, ts, out);
                    }
                    self.resp = match left.saturating_sub(1) {
                        0 => self.after_columns(),
                        left => Resp::Columns { left },
                    };
                }
                Resp::ColumnsEof => {
                    if first == Some(0xff) {
                        return self.on_err(b, ts, out);
                    }
                    if !eof {
                        // Not the expected EOF: take it as the first row.
                        self.resp = Resp::Rows;
                        continue;
                    }
                    let status = parse_eof(b, self.caps);
                    if status & SERVER_STATUS_CURSOR_EXISTS != 0
                        && matches!(front.kind, Kind::Execute)
                    {
                        // A cursor was opened: its rows are fetched by COM_STMT_FETCH.
                        return self.end_result(
                            None,
                            status & !SERVER_MORE_RESULTS_EXISTS,
                            ts,
                            out,
                        );
                    }
                    self.resp = Resp::Rows;
                }
                Resp::Rows => {
                    if first == Some(0xff) {
                        return self.on_err(b, ts, out);
                    }
                    // The terminator: EOF (payload under 9 bytes: a row starting 0xFE would
                    // hold an 8-byte length) or, with CLIENT_DEPRECATE_EOF, an OK packet with
                    // the 0xFE header, which always fits one packet.
                    let deprecate = self.caps & CLIENT_DEPRECATE_EOF != 0;
                    if first == Some(0xfe) && (eof || (deprecate && f.len < MAX_PACKET)) {
                        let status = if eof {
                            parse_eof(b, self.caps)
                        } else {
                            parse_ok(b, self.caps).1
                        };
                        let rows = front.run.rows;
                        return self.end_result(Some(rows), status, ts, out);
                    }
                    front.run.rows = front.run.rows.saturating_add(1);
                }
            }
            return;
        }
    }

    /// A result set's first packet: the column count (and, when metadata is optional,
    /// whether the column definitions follow).
    fn on_column_count(&mut self, b: &[u8]) {
        let Some((count, next)) = lenenc(b, 0) else {
            self.unparsed += 1;
            return;
        };
        let binary = self
            .pending
            .front()
            .is_some_and(|p| matches!(p.kind, Kind::Execute));
        let optional = if binary {
            self.caps & (CLIENT_OPTIONAL_RESULTSET_METADATA | MARIADB_CLIENT_CACHE_METADATA) != 0
        } else {
            self.caps & CLIENT_OPTIONAL_RESULTSET_METADATA != 0
        };
        // "metadata_follows": RESULTSET_METADATA_NONE (0) skips the definitions.
        let metadata = !optional || b.get(next).is_none_or(|&m| m != 0);
        self.resp = if metadata && count > 0 {
            Resp::Columns { left: count }
        } else {
            self.after_columns()
        };
    }

    fn after_columns(&self) -> Resp {
        if self.caps & CLIENT_DEPRECATE_EOF != 0 {
            Resp::Rows
        } else {
            Resp::ColumnsEof
        }
    }

    /// One result ended (OK, EOF or the rows' terminator); more may follow.
    fn end_result(&mut self, count: Option<u64>, status: u16, ts: u64, out: &mut Vec<Op>) {
        let Some(front) = self.pending.front_mut() else {
            return;
        };
        let run = &mut front.run;
        if run.results == 0 {
            run.rowcount = count;
        }
        run.results = run.results.saturating_add(1);
        run.rows = 0;
        if status & SERVER_MORE_RESULTS_EXISTS != 0 {
            self.resp = Resp::Start;
        } else {
            self.pop_front(ts, out, true);
        }
    }

    /// ERR_Packet: code (2), '#' and SQLSTATE (5) under CLIENT_PROTOCOL_41, message.
    /// It ends the whole answer, further results included.
    fn on_err(&mut self, b: &[u8], ts: u64, out: &mut Vec<Op>) {
        let code = le_u16(b, 1).unwrap_or(0);
        if code == PROGRESS_REPORT {
            return;
        }
        let msg_at = if b.get(3) == Some(&b'#') { 9 } else { 3 };
        let message = lossy(b.get(msg_at..).unwrap_or_default());
        if let Some(front) = self.pending.front_mut() {
            front.run.error = Some((code, message));
        }
        self.pop_front(ts, out, true);
    }

    /// Reports what is still waiting and parses nothing more.
    fn stop(&mut self, ts: u64, out: &mut Vec<Op>) {
        while !self.pending.is_empty() {
            self.pop_front(ts, out, false);
        }
        self.stopped = true;
    }
}

fn initial_resp(kind: &Kind) -> Resp {
    match kind {
        // Rows (or definitions) straight away, up to an EOF.
        Kind::Fetch | Kind::FieldList => Resp::Rows,
        _ => Resp::Start,
    }
}

impl Parser for MysqlParser {
    fn protocol(&self) -> Protocol {
        Protocol::Mysql
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
            // Bytes between packets are gone: no length to resynchronise on.
            self.unparsed += 1;
            match side {
                // Commands already seen can still be answered.
                Side::Client => self.client.dead = true,
                // Without the server's answers new ops would carry made-up end times.
                Side::Server => {
                    self.server.dead = true;
                    self.stop(ts, out);
                }
            }
        }
    }

    fn close(&mut self, ts: u64, out: &mut Vec<Op>) {
        while !self.pending.is_empty() {
            self.pop_front(ts, out, false);
        }
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
    if let Some((code, message)) = error {
        op.status = StatusCode::Error;
        op.status_description = Some(message);
        op.attr("db.error.code", code);
    }
    op
}

fn sql_operation_is_use(stmt: Option<&Statement>) -> bool {
    stmt.and_then(|s| s.operation.as_deref()) == Some("USE")
}

/// The schema named by `USE db` / "USE `db`".
fn use_target(sql: &str) -> Option<String> {
    let at = sql.to_ascii_uppercase().find("USE")?;
    let rest = sql.get(at + 3..)?.trim_start();
    let name = match rest.strip_prefix('`') {
        Some(quoted) => quoted.split('`').next()?,
        None => rest.split(|c: char| c.is_whitespace() || c == ';').next()?,
    };
    (!name.is_empty() && sql_operation(sql, Dialect::Mysql).as_deref() == Some("USE"))
        .then(|| name.to_string())
}

/// COM_QUERY's text. With CLIENT_QUERY_ATTRIBUTES a parameter count and a parameter
/// set count (and, for a non-zero count, a NULL bitmap, types, names and binary
/// values) come first.
fn query_text(args: &[u8], attributes: bool) -> Option<String> {
    let mut pos = 0;
    if attributes {
        let (count, next) = lenenc(args, 0)?;
        let (_sets, next) = lenenc(args, next)?;
        pos = next;
        if count > 0 {
            let count = usize::try_from(count).ok()?;
            let nulls_at = pos;
            pos = pos.checked_add(count.div_ceil(8))?;
            // new_params_bind_flag: always 1 for COM_QUERY (types are not remembered).
            if args.get(pos) != Some(&1) {
                return None;
            }
            pos += 1;
            let mut types = Vec::with_capacity(count.min(64));
            for _ in 0..count {
                types.push(le_u16(args, pos)?);
                let (name_len, next) = lenenc(args, pos.checked_add(2)?)?;
                pos = next.checked_add(usize::try_from(name_len).ok()?)?;
            }
            for (i, ty) in types.into_iter().enumerate() {
                let null = args
                    .get(nulls_at + i / 8)
                    .is_some_and(|&m| m & (1 << (i % 8)) != 0);
                if !null {
                    pos = skip_binary_value(args, pos, ty & 0xff)?;
                }
            }
        }
    }
    Some(lossy(args.get(pos..)?))
}

/// Skips one value of the binary protocol ("Binary Protocol Value").
fn skip_binary_value(b: &[u8], pos: usize, ty: u16) -> Option<usize> {
    let fixed = match ty {
        0x06 => 0,               // NULL
        0x01 => 1,               // TINY
        0x02 | 0x0d => 2,        // SHORT, YEAR
        0x03 | 0x09 | 0x04 => 4, // LONG, INT24, FLOAT
        0x08 | 0x05 => 8,        // LONGLONG, DOUBLE
        0x07 | 0x0a | 0x0b | 0x0c => {
            // TIMESTAMP, DATE, TIME, DATETIME: a length byte, then that many bytes.
            return pos.checked_add(1)?.checked_add(usize::from(*b.get(pos)?));
        }
        // Strings, decimals, blobs, JSON, BIT, ENUM, SET, GEOMETRY: length-encoded.
        _ => {
            let (n, next) = lenenc(b, pos)?;
            return next.checked_add(usize::try_from(n).ok()?);
        }
    };
    let end = pos.checked_add(fixed)?;
    (end <= b.len()).then_some(end)
}

/// OK_Packet: header, affected rows (lenenc), last insert id (lenenc), then status
/// flags under CLIENT_PROTOCOL_41 or CLIENT_TRANSACTIONS.
fn parse_ok(b: &[u8], caps: u64) -> (Option<u64>, u16) {
    let Some((affected, next)) = lenenc(b, 1) else {
        return (None, 0);
    };
    let status = match lenenc(b, next) {
        Some((_, at)) if caps & (CLIENT_PROTOCOL_41 | CLIENT_TRANSACTIONS) != 0 => {
            le_u16(b, at).unwrap_or(0)
        }
        _ => 0,
    };
    (Some(affected), status)
}

/// EOF_Packet: header, then warnings (2) and status flags (2) under CLIENT_PROTOCOL_41.
fn parse_eof(b: &[u8], caps: u64) -> u16 {
    if caps & CLIENT_PROTOCOL_41 != 0 {
        le_u16(b, 3).unwrap_or(0)
    } else {
        0
    }
}

// --- framing -----------------------------------------------------------------------

struct Frame {
    /// Sequence id of the payload's first packet.
    seq: u8,
    /// The payload's first bytes (at most the keep limit).
    body: Vec<u8>,
    /// The payload's full length.
    len: usize,
    /// Timestamp of the piece that held the payload's first byte.
    start_ts: u64,
}

/// One direction's packet reader, reassembling payloads split at 0xFFFFFF bytes.
#[derive(Default)]
struct Reader {
    hdr: [u8; 4],
    hdr_len: usize,
    in_body: bool,
    /// Bytes of the current packet still to come.
    remaining: usize,
    packet_len: usize,
    /// The payload goes on in the next packet.
    continued: bool,
    seq: u8,
    len: usize,
    keep: usize,
    body: Vec<u8>,
    start_ts: u64,
    dead: bool,
}

impl Reader {
    fn recycle(&mut self, mut body: Vec<u8>) {
        body.clear();
        if self.body.capacity() == 0 && body.capacity() <= 64 * 1024 {
            self.body = body;
        }
    }

    fn pull(&mut self, data: &mut &[u8], ts: u64, keep: usize) -> Option<Frame> {
        loop {
            if !self.in_body {
                if data.is_empty() {
                    return None;
                }
                if self.hdr_len == 0 && !self.continued {
                    self.start_ts = ts;
                }
                let take = (4 - self.hdr_len).min(data.len());
                let (head, rest) = data.split_at(take);
                if let Some(dst) = self.hdr.get_mut(self.hdr_len..self.hdr_len + take) {
                    dst.copy_from_slice(head);
                }
                self.hdr_len += take;
                *data = rest;
                if self.hdr_len < 4 {
                    return None;
                }
                self.hdr_len = 0;
                let [l0, l1, l2, seq] = self.hdr;
                if !self.continued {
                    self.seq = seq;
                    self.len = 0;
                    self.keep = keep;
                    self.body.clear();
                }
                self.packet_len = u32::from_le_bytes([l0, l1, l2, 0]) as usize;
                self.remaining = self.packet_len;
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
                return None;
            }
            if let Some(frame) = self.end_packet() {
                return Some(frame);
            }
        }
    }

    /// The current packet is complete: the payload too, unless it continues.
    fn end_packet(&mut self) -> Option<Frame> {
        self.in_body = false;
        self.len = self.len.saturating_add(self.packet_len);
        self.continued = self.packet_len == MAX_PACKET;
        if self.continued {
            return None;
        }
        Some(Frame {
            seq: self.seq,
            body: std::mem::take(&mut self.body),
            len: self.len,
            start_ts: self.start_ts,
        })
    }

    /// `n` bytes were lost. Inside a packet they are skipped (a payload completed this
    /// way is returned with what was kept); anywhere else the stream is `lost`.
    fn skip(&mut self, n: u64) -> (Option<Frame>, bool) {
        if !self.in_body {
            self.dead = true;
            return (None, true);
        }
        // Bytes after the hole would land at the wrong offset: keep no more.
        self.keep = self.body.len();
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n < self.remaining {
            self.remaining -= n;
            return (None, false);
        }
        let lost = n > self.remaining;
        self.remaining = 0;
        let frame = self.end_packet();
        if lost {
            self.dead = true;
        }
        (frame, lost)
    }
}

// --- byte helpers ------------------------------------------------------------------

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    let bytes = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes(bytes.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// Length-encoded integer: < 0xFB itself, 0xFC + 2 bytes, 0xFD + 3, 0xFE + 8.
fn lenenc(b: &[u8], at: usize) -> Option<(u64, usize)> {
    let first = *b.get(at)?;
    let width = match first {
        0..=0xfa => return Some((u64::from(first), at + 1)),
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        // 0xFB is NULL in a row, 0xFF an error header: not integers.
        _ => return None,
    };
    let bytes = b.get(at + 1..at + 1 + width)?;
    let mut v = [0u8; 8];
    v.get_mut(..width)?.copy_from_slice(bytes);
    Some((u64::from_le_bytes(v), at + 1 + width))
}

/// NUL-terminated string at `at`: its bytes and the offset after the NUL.
fn cstr(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = b.get(at..)?;
    let end = rest.iter().position(|&c| c == 0)?;
    Some((rest.get(..end)?, at + end + 1))
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    // --- packet builders (MySQL source docs, "Client/Server Protocol") ---

    const CLIENT_LONG_FLAG: u64 = 1 << 2;
    const CLIENT_MULTI_STATEMENTS: u64 = 1 << 16;
    const CLIENT_MULTI_RESULTS: u64 = 1 << 17;
    const CLIENT_PLUGIN_AUTH: u64 = 1 << 19;
    /// What a current client library offers (without DEPRECATE_EOF).
    const BASE: u64 = CLIENT_MYSQL
        | CLIENT_LONG_FLAG
        | CLIENT_CONNECT_WITH_DB
        | CLIENT_PROTOCOL_41
        | CLIENT_TRANSACTIONS
        | CLIENT_SECURE_CONNECTION
        | CLIENT_MULTI_STATEMENTS
        | CLIENT_MULTI_RESULTS
        | CLIENT_PLUGIN_AUTH
        | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA;

    fn pkt(seq: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = (payload.len() as u32).to_le_bytes()[..3].to_vec();
        p.push(seq);
        p.extend_from_slice(payload);
        p
    }

    /// Consecutive packets with sequence ids from `seq`.
    fn pkts(seq: u8, payloads: &[Vec<u8>]) -> Vec<u8> {
        payloads
            .iter()
            .enumerate()
            .flat_map(|(i, p)| pkt(seq + i as u8, p))
            .collect()
    }

    fn int(n: u64) -> Vec<u8> {
        match n {
            0..=250 => vec![n as u8],
            251..=0xffff => [vec![0xfc], (n as u16).to_le_bytes().to_vec()].concat(),
            0x1_0000..=0xff_ffff => [vec![0xfd], (n as u32).to_le_bytes()[..3].to_vec()].concat(),
            _ => [vec![0xfe], n.to_le_bytes().to_vec()].concat(),
        }
    }

    fn ls(v: &str) -> Vec<u8> {
        [int(v.len() as u64), v.as_bytes().to_vec()].concat()
    }

    fn cs(v: &str) -> Vec<u8> {
        [v.as_bytes(), &[0]].concat()
    }

    fn greeting(caps: u64) -> Vec<u8> {
        let mut g = vec![0x0a];
        g.extend(cs("8.0.36"));
        g.extend(42u32.to_le_bytes());
        g.extend(b"abcdefgh\0");
        g.extend((caps as u16).to_le_bytes());
        g.push(0xff);
        g.extend(2u16.to_le_bytes());
        g.extend(((caps >> 16) as u16).to_le_bytes());
        g.push(21);
        g.extend([0; 6]);
        g.extend(((caps >> 32) as u32).to_le_bytes());
        g.extend(b"ijklmnopqrst\0");
        g.extend(cs("caching_sha2_password"));
        pkt(0, &g)
    }

    fn handshake_response(seq: u8, caps: u64, user: &str, db: Option<&str>) -> Vec<u8> {
        let caps = if db.is_some() {
            caps
        } else {
            caps & !CLIENT_CONNECT_WITH_DB
        };
        let mut r = (caps as u32).to_le_bytes().to_vec();
        r.extend(16_777_216u32.to_le_bytes());
        r.push(45);
        r.extend([0; 19]);
        r.extend(((caps >> 32) as u32).to_le_bytes());
        r.extend(cs(user));
        r.extend(ls("01234567890123456789"));
        if let Some(db) = db {
            r.extend(cs(db));
        }
        r.extend(cs("caching_sha2_password"));
        pkt(seq, &r)
    }

    fn ok(affected: u64, status: u16) -> Vec<u8> {
        [
            vec![0],
            int(affected),
            int(0),
            status.to_le_bytes().to_vec(),
            vec![0, 0],
        ]
        .concat()
    }

    /// The OK packet that ends rows under CLIENT_DEPRECATE_EOF.
    fn ok_fe(status: u16) -> Vec<u8> {
        [
            vec![0xfe],
            int(0),
            int(0),
            status.to_le_bytes().to_vec(),
            vec![0, 0],
        ]
        .concat()
    }

    fn eof(status: u16) -> Vec<u8> {
        [vec![0xfe, 0, 0], status.to_le_bytes().to_vec()].concat()
    }

    fn err(code: u16, state: &str, message: &str) -> Vec<u8> {
        [
            vec![0xff],
            code.to_le_bytes().to_vec(),
            b"#".to_vec(),
            state.as_bytes().to_vec(),
            message.as_bytes().to_vec(),
        ]
        .concat()
    }

    fn column(name: &str) -> Vec<u8> {
        let mut c = [ls("def"), ls("shop"), ls("t"), ls("t"), ls(name), ls(name)].concat();
        c.push(0x0c);
        c.extend(45u16.to_le_bytes());
        c.extend(80u32.to_le_bytes());
        c.extend([0xfd, 0, 0, 0, 0, 0]);
        c
    }

    /// A text result set's packets: count, definitions, [EOF], rows, terminator.
    fn result_set(seq: u8, caps: u64, cols: usize, rows: usize, status: u16) -> Vec<u8> {
        let mut p = vec![int(cols as u64)];
        p.extend((0..cols).map(|i| column(&format!("c{i}"))));
        let deprecate = caps & CLIENT_DEPRECATE_EOF != 0;
        if !deprecate {
            p.push(eof(0));
        }
        p.extend((0..rows).map(|r| (0..cols).flat_map(|c| ls(&format!("{r}-{c}"))).collect()));
        p.push(if deprecate {
            ok_fe(status)
        } else {
            eof(status)
        });
        pkts(seq, &p)
    }

    fn command(cmd: u8, arg: &[u8]) -> Vec<u8> {
        pkt(0, &[&[cmd], arg].concat())
    }

    fn query(sql: &str) -> Vec<u8> {
        command(COM_QUERY, sql.as_bytes())
    }

    use crate::protocol::scripts::{self, Script};

    fn connect(caps: u64, user: &str, db: Option<&str>) -> Script {
        vec![
            (
                Side::Server,
                greeting(caps | CLIENT_DEPRECATE_EOF | CLIENT_QUERY_ATTRIBUTES),
                1,
            ),
            (Side::Client, handshake_response(1, caps, user, db), 2),
            (Side::Server, pkt(2, &ok(0, 2)), 3),
        ]
    }

    fn run_with(cfg: ParserConfig, script: &Script, byte_at_a_time: bool) -> (Vec<Op>, u64) {
        scripts::run_with(Protocol::Mysql, cfg, script, byte_at_a_time)
    }

    /// Runs the script whole and one byte at a time; both must agree and parse cleanly.
    fn run(script: &Script) -> Vec<Op> {
        scripts::run(Protocol::Mysql, script)
    }

    fn attr<'a>(op: &'a Op, k: &str) -> Option<&'a Value> {
        op.attributes.get(k)
    }

    fn summary(ops: &[Op]) -> Vec<(String, Option<Value>, StatusCode, u64)> {
        ops.iter()
            .map(|o| {
                (
                    o.name.clone(),
                    attr(o, "db.rowcount").cloned(),
                    o.status,
                    o.end_ts,
                )
            })
            .collect()
    }

    #[test]
    fn handshake_records_user_and_database() {
        let mut s = connect(BASE, "alice", Some("shop"));
        s.push((Side::Client, query("SELECT 1"), 4));
        s.push((Side::Server, result_set(1, BASE, 1, 1, 2), 5));
        let ops = run(&s);
        assert_eq!(ops.len(), 1);
        assert_eq!(attr(&ops[0], "db.user"), Some(&json!("alice")));
        assert_eq!(attr(&ops[0], "db.name"), Some(&json!("shop")));
        assert!(attr(&ops[0], "db.system").is_none());
    }

    #[test]
    fn ssl_request_then_handshake_response_in_plaintext() {
        let caps = BASE | CLIENT_SSL;
        let mut ssl = (caps as u32).to_le_bytes().to_vec();
        ssl.extend(16_777_216u32.to_le_bytes());
        ssl.push(45);
        ssl.extend([0; 23]);
        let s: Script = vec![
            (Side::Server, greeting(caps), 1),
            (Side::Client, pkt(1, &ssl), 2),
            (
                Side::Client,
                handshake_response(2, caps, "bob", Some("app")),
                3,
            ),
            (Side::Server, pkt(3, &ok(0, 2)), 4),
            (Side::Client, query("DELETE FROM t"), 5),
            (Side::Server, pkt(1, &ok(4, 2)), 6),
        ];
        let ops = run(&s);
        assert_eq!(ops.len(), 1);
        assert_eq!(attr(&ops[0], "db.user"), Some(&json!("bob")));
        assert_eq!(attr(&ops[0], "db.name"), Some(&json!("app")));
        assert_eq!(attr(&ops[0], "db.rowcount"), Some(&json!(4)));
    }

    #[test]
    fn auth_switch_exchange_ends_at_ok() {
        let s: Script = vec![
            (Side::Server, greeting(BASE), 1),
            (Side::Client, handshake_response(1, BASE, "u", None), 2),
            (
                Side::Server,
                pkt(
                    2,
                    &[
                        b"\xfemysql_native_password\0".as_slice(),
                        b"01234567890123456789\0",
                    ]
                    .concat(),
                ),
                3,
            ),
            (Side::Client, pkt(3, b"01234567890123456789"), 4),
            (Side::Server, pkt(4, b"\x01\x03"), 5),
            (Side::Server, pkt(5, &ok(0, 2)), 5),
            (Side::Client, query("SELECT 1"), 6),
            (Side::Server, result_set(1, BASE, 1, 1, 2), 7),
        ];
        let ops = run(&s);
        assert_eq!(
            summary(&ops),
            [("SELECT".into(), Some(json!(1)), StatusCode::Unset, 7)]
        );
        assert!(attr(&ops[0], "db.name").is_none());
    }

    #[test]
    fn select_rows_counted_with_eof_packets() {
        let mut s = connect(BASE, "u", Some("shop"));
        s.push((Side::Client, query("SELECT id, name FROM items"), 4));
        s.push((Side::Server, result_set(1, BASE, 2, 3, 2), 5));
        let ops = run(&s);
        let op = &ops[0];
        assert_eq!(op.name, "SELECT");
        assert_eq!(
            attr(op, "db.statement"),
            Some(&json!("SELECT id, name FROM items"))
        );
        assert_eq!(attr(op, "db.operation"), Some(&json!("SELECT")));
        assert_eq!(attr(op, "db.rowcount"), Some(&json!(3)));
        assert_eq!(
            (op.start_ts, op.end_ts, op.status),
            (4, 5, StatusCode::Unset)
        );
    }

    #[test]
    fn select_rows_counted_with_deprecate_eof() {
        let caps = BASE | CLIENT_DEPRECATE_EOF;
        let mut s = connect(caps, "u", Some("shop"));
        s.push((Side::Client, query("SELECT * FROM items"), 4));
        s.push((Side::Server, result_set(1, caps, 2, 5, 2), 5));
        s.push((Side::Client, query("SELECT * FROM empty"), 6));
        s.push((Side::Server, result_set(1, caps, 1, 0, 2), 7));
        let ops = run(&s);
        assert_eq!(
            summary(&ops),
            [
                ("SELECT".into(), Some(json!(5)), StatusCode::Unset, 5),
                ("SELECT".into(), Some(json!(0)), StatusCode::Unset, 7)
            ]
        );
    }

    #[test]
    fn insert_reports_affected_rows() {
        let mut s = connect(BASE, "u", Some("shop"));
        s.push((
            Side::Client,
            query("  /* c */ INSERT INTO t VALUES (1),(2),(3)"),
            4,
        ));
        s.push((Side::Server, pkt(1, &ok(3, 2)), 5));
        let ops = run(&s);
        assert_eq!(
            summary(&ops),
            [("INSERT".into(), Some(json!(3)), StatusCode::Unset, 5)]
        );
    }

    #[test]
    fn server_error_reports_code_and_message() {
        let mut s = connect(BASE, "u", Some("shop"));
        s.push((Side::Client, query("SELECT * FROM missing"), 4));
        s.push((
            Side::Server,
            pkt(1, &err(1146, "42S02", "Table 'shop.missing' doesn't exist")),
            5,
        ));
        s.push((Side::Client, query("SELECT 1"), 6));
        s.push((Side::Server, result_set(1, BASE, 1, 1, 2), 7));
        let ops = run(&s);
        assert_eq!(ops[0].status, StatusCode::Error);
        assert_eq!(
            ops[0].status_description.as_deref(),
            Some("Table 'shop.missing' doesn't exist")
        );
        assert_eq!(attr(&ops[0], "db.error.code"), Some(&json!(1146)));
        assert!(attr(&ops[0], "db.rowcount").is_none());
        assert_eq!(ops[1].status, StatusCode::Unset);
    }

    #[test]
    fn init_db_changes_database_for_later_ops() {
        let mut s = connect(BASE, "u", Some("shop"));
        s.push((Side::Client, command(COM_INIT_DB, b"billing"), 4));
        s.push((Side::Server, pkt(1, &ok(0, 2)), 5));
        s.push((Side::Client, query("SELECT 1"), 6));
        s.push((Side::Server, result_set(1, BASE, 1, 1, 2), 7));
        s.push((Side::Client, command(COM_INIT_DB, b"nope"), 8));
        s.push((
            Side::Server,
            pkt(1, &err(1049, "42000", "Unknown database 'nope'")),
            9,
        ));
        s.push((Side::Client, query("SELECT 2"), 10));
        s.push((Side::Server, result_set(1, BASE, 1, 1, 2), 11));
        let ops = run(&s);
        assert_eq!(ops[0].name, "INIT_DB");
        assert_eq!(attr(&ops[0], "db.operation"), Some(&json!("INIT_DB")));
        assert_eq!(attr(&ops[0], "db.statement"), Some(&json!("USE billing")));
        assert_eq!(attr(&ops[1], "db.name"), Some(&json!("billing")));
        assert_eq!(ops[2].status, StatusCode::Error);
        assert_eq!(attr(&ops[3], "db.name"), Some(&json!("billing")));
    }

    #[test]
    fn use_statement_changes_database() {
        let mut s = connect(BASE, "u", None);
        s.push((Side::Client, query("use `my db`"), 4));
        s.push((Side::Server, pkt(1, &ok(0, 2)), 5));
        s.push((Side::Client, query("SELECT 1"), 6));
        s.push((Side::Server, result_set(1, BASE, 1, 1, 2), 7));
        let ops = run(&s);
        assert!(attr(&ops[0], "db.name").is_none());
        assert_eq!(ops[0].name, "USE");
        assert_eq!(attr(&ops[1], "db.name"), Some(&json!("my db")));
    }

    /// COM_STMT_PREPARE_OK and its definitions.
    fn prepare_ok(caps: u64, id: u32, cols: u16, params: u16) -> Vec<u8> {
        let mut first = vec![0];
        first.extend(id.to_le_bytes());
        first.extend(cols.to_le_bytes());
        first.extend(params.to_le_bytes());
        first.extend([0, 0, 0]);
        let mut p = vec![first];
        let deprecate = caps & CLIENT_DEPRECATE_EOF != 0;
        p.extend((0..params).map(|_| column("?")));
        if params > 0 && !deprecate {
            p.push(eof(2));
        }
        p.extend((0..cols).map(|i| column(&format!("c{i}"))));
        if cols > 0 && !deprecate {
            p.push(eof(2));
        }
        pkts(1, &p)
    }

    fn execute(id: u32, params: &[u8]) -> Vec<u8> {
        let mut e = id.to_le_bytes().to_vec();
        e.push(0);
        e.extend(1u32.to_le_bytes());
        e.extend(params);
        command(COM_STMT_EXECUTE, &e)
    }

    /// A binary result set: rows start with 0x00 and a NULL bitmap.
    fn binary_result(caps: u64, cols: usize, rows: usize) -> Vec<u8> {
        let mut p = vec![int(cols as u64)];
        p.extend((0..cols).map(|i| column(&format!("c{i}"))));
        let deprecate = caps & CLIENT_DEPRECATE_EOF != 0;
        if !deprecate {
            p.push(eof(2));
        }
        p.extend(
            (0..rows).map(|_| [vec![0, 0], (0..cols).flat_map(|_| ls("v")).collect()].concat()),
        );
        p.push(if deprecate { ok_fe(2) } else { eof(2) });
        pkts(1, &p)
    }

    fn prepare_then_execute(caps: u64) {
        let mut s = connect(caps, "u", Some("shop"));
        let sql = "SELECT id, name FROM items WHERE id > ?";
        s.push((Side::Client, command(COM_STMT_PREPARE, sql.as_bytes()), 4));
        s.push((Side::Server, prepare_ok(caps, 7, 2, 1), 5));
        // One parameter: NULL bitmap, new-params-bound flag, type LONGLONG, value.
        let params = [vec![0, 1, 8, 0], 1u64.to_le_bytes().to_vec()].concat();
        s.push((Side::Client, execute(7, &params), 6));
        s.push((Side::Server, binary_result(caps, 2, 2), 7));
        let upd = "UPDATE items SET name = ? WHERE id = ?";
        s.push((Side::Client, command(COM_STMT_PREPARE, upd.as_bytes()), 8));
        s.push((Side::Server, prepare_ok(caps, 8, 0, 2), 9));
        s.push((
            Side::Client,
            execute(
                8,
                &[
                    vec![0, 1, 0xfd, 0, 8, 0],
                    ls("x"),
                    1u64.to_le_bytes().to_vec(),
                ]
                .concat(),
            ),
            10,
        ));
        s.push((Side::Server, pkt(1, &ok(1, 2)), 11));
        s.push((
            Side::Client,
            command(COM_STMT_CLOSE, &7u32.to_le_bytes()),
            12,
        ));
        s.push((
            Side::Client,
            command(COM_STMT_RESET_FOR_TEST, &8u32.to_le_bytes()),
            13,
        ));
        s.push((Side::Server, pkt(1, &ok(0, 2)), 14));
        s.push((Side::Client, execute(7, &[]), 15));
        s.push((
            Side::Server,
            pkt(1, &err(1243, "HY000", "Unknown prepared statement handler")),
            16,
        ));
        let ops = run(&s);
        assert_eq!(
            summary(&ops),
            [
                ("SELECT".into(), Some(json!(2)), StatusCode::Unset, 7),
                ("UPDATE".into(), Some(json!(1)), StatusCode::Unset, 11),
                ("EXECUTE".into(), None, StatusCode::Error, 16),
            ]
        );
        assert_eq!(attr(&ops[0], "db.statement"), Some(&json!(sql)));
        assert_eq!(ops[0].start_ts, 6);
        assert_eq!(attr(&ops[1], "db.statement"), Some(&json!(upd)));
    }

    const COM_STMT_RESET_FOR_TEST: u8 = 0x1a;

    #[test]
    fn prepare_then_execute_without_deprecate_eof() {
        prepare_then_execute(BASE);
    }

    #[test]
    fn prepare_then_execute_with_deprecate_eof() {
        prepare_then_execute(BASE | CLIENT_DEPRECATE_EOF);
    }

    #[test]
    fn mariadb_pipelined_prepare_and_execute_of_last_statement() {
        // MariaDB Connector/J and /C send COM_STMT_PREPARE and COM_STMT_EXECUTE with
        // statement id 0xFFFFFFFF together, before the PREPARE_OK.
        let caps = BASE | CLIENT_DEPRECATE_EOF;
        let mut s = connect(caps, "u", Some("shop"));
        s.push((Side::Client, command(COM_STMT_PREPARE, b"SELECT 1"), 4));
        s.push((Side::Client, command(COM_STMT_PREPARE, b"DELETE FROM t"), 4));
        s.push((Side::Client, execute(u32::MAX, &[]), 4));
        s.push((
            Side::Server,
            [
                prepare_ok(caps, 1, 1, 0),
                prepare_ok(caps, 2, 0, 0),
                pkt(1, &ok(5, 2)),
            ]
            .concat(),
            5,
        ));
        let ops = run(&s);
        assert_eq!(
            summary(&ops),
            [("DELETE".into(), Some(json!(5)), StatusCode::Unset, 5)]
        );
    }

    #[test]
    fn failed_prepare_is_reported() {
        let mut s = connect(BASE, "u", Some("shop"));
        s.push((Side::Client, command(COM_STMT_PREPARE, b"SELEC 1"), 4));
        s.push((
            Side::Server,
            pkt(
                1,
                &err(1064, "42000", "You have an error in your SQL syntax"),
            ),
            5,
        ));
        let ops = run(&s);
        assert_eq!(
            summary(&ops),
            [("SELEC".into(), None, StatusCode::Error, 5)]
        );
        assert_eq!(attr(&ops[0], "db.statement"), Some(&json!("SELEC 1")));
    }

    #[test]
    fn multi_results_report_first_rowcount_and_later_errors() {
        let caps = BASE | CLIENT_DEPRECATE_EOF;
        let mut s = connect(caps, "u", Some("shop"));
        let more = SERVER_MORE_RESULTS_EXISTS | 2;
        s.push((
            Side::Client,
            query("SELECT * FROM a; SELECT * FROM b; UPDATE c SET x = 1"),
            4,
        ));
        let mut resp = result_set(1, caps, 1, 2, more);
        resp.extend(result_set(5, caps, 3, 4, more));
        resp.extend(pkt(12, &ok(6, 2)));
        s.push((Side::Server, resp, 5));
        s.push((Side::Client, query("CALL p()"), 6));
        let mut resp = result_set(1, caps, 1, 1, more);
        resp.extend(pkt(5, &err(1054, "42S22", "Unknown column 'z'")));
        s.push((Side::Server, resp, 7));
        // Without DEPRECATE_EOF the flag rides on the EOF packet.
        let mut s2 = connect(BASE, "u", Some("shop"));
        s2.push((Side::Client, query("SELECT 1; SELECT 2"), 4));
        s2.push((
            Side::Server,
            [
                result_set(1, BASE, 1, 1, more),
                result_set(5, BASE, 1, 1, 2),
            ]
            .concat(),
            5,
        ));
        s2.push((Side::Client, query("SELECT 3"), 6));
        s2.push((Side::Server, result_set(1, BASE, 1, 1, 2), 7));
        let ops = run(&s);
        assert_eq!(
            summary(&ops),
            [
                ("SELECT".into(), Some(json!(2)), StatusCode::Unset, 5),
                ("CALL".into(), Some(json!(1)), StatusCode::Error, 7)
            ]
        );
        assert_eq!(run(&s2).len(), 2);
    }

    #[test]
    fn optional_metadata_can_skip_column_definitions() {
        let caps = BASE | CLIENT_DEPRECATE_EOF | CLIENT_OPTIONAL_RESULTSET_METADATA;
        let mut s: Script = vec![
            (Side::Server, greeting(caps), 1),
            (Side::Client, handshake_response(1, caps, "u", None), 2),
            (Side::Server, pkt(2, &ok(0, 2)), 3),
        ];
        s.push((Side::Client, query("SELECT 1, 2"), 4));
        // Column count 2, metadata_follows = RESULTSET_METADATA_NONE, then rows.
        s.push((
            Side::Server,
            pkts(1, &[vec![2, 0], [ls("1"), ls("2")].concat(), ok_fe(2)]),
            5,
        ));
        assert_eq!(
            summary(&run(&s)),
            [("SELECT".into(), Some(json!(1)), StatusCode::Unset, 5)]
        );
    }

    #[test]
    fn query_attributes_prefix_is_skipped() {
        let caps = BASE | CLIENT_QUERY_ATTRIBUTES;
        let mut s = connect(caps, "u", Some("shop"));
        // No attributes: counts 0 and 1.
        s.push((Side::Client, command(COM_QUERY, b"\x00\x01SELECT 1"), 4));
        s.push((Side::Server, result_set(1, caps, 1, 1, 2), 5));
        // One string attribute "trace" = "abc": bitmap, bound flag, type + name, value.
        let mut q = vec![1, 1, 0, 1, 0xfe, 0];
        q.extend(ls("trace"));
        q.extend(ls("abc"));
        q.extend(b"INSERT INTO t VALUES (1)");
        s.push((Side::Client, command(COM_QUERY, &q), 6));
        s.push((Side::Server, pkt(1, &ok(1, 2)), 7));
        let ops = run(&s);
        assert_eq!(attr(&ops[0], "db.statement"), Some(&json!("SELECT 1")));
        assert_eq!(
            attr(&ops[1], "db.statement"),
            Some(&json!("INSERT INTO t VALUES (1)"))
        );
    }

    #[test]
    fn utility_commands_produce_no_ops_and_keep_sync() {
        let mut s = connect(BASE, "u", Some("shop"));
        s.push((Side::Client, command(0x0e, &[]), 4)); // COM_PING
        s.push((Side::Server, pkt(1, &ok(0, 2)), 5));
        s.push((Side::Client, command(COM_STATISTICS, &[]), 6));
        s.push((Side::Server, pkt(1, b"Uptime: 5  Threads: 1"), 7));
        s.push((Side::Client, command(COM_FIELD_LIST, b"items\0"), 8));
        s.push((
            Side::Server,
            pkts(1, &[column("id"), column("name"), eof(2)]),
            9,
        ));
        s.push((Side::Client, query("SELECT 1"), 10));
        s.push((Side::Server, result_set(1, BASE, 1, 1, 2), 11));
        s.push((Side::Client, command(COM_QUIT, &[]), 12));
        let ops = run(&s);
        assert_eq!(
            summary(&ops),
            [("SELECT".into(), Some(json!(1)), StatusCode::Unset, 11)]
        );
    }

    #[test]
    fn load_data_local_infile_keeps_sync() {
        let mut s = connect(BASE, "u", Some("shop"));
        s.push((
            Side::Client,
            query("LOAD DATA LOCAL INFILE 'x.csv' INTO TABLE t"),
            4,
        ));
        s.push((Side::Server, pkt(1, b"\xfbx.csv"), 5));
        s.push((
            Side::Client,
            [pkt(2, b"1,a\n2,b\n"), pkt(3, b"")].concat(),
            6,
        ));
        s.push((Side::Server, pkt(4, &ok(2, 2)), 7));
        let ops = run(&s);
        assert_eq!(
            summary(&ops),
            [("LOAD".into(), Some(json!(2)), StatusCode::Unset, 7)]
        );
    }

    #[test]
    fn payloads_over_16_mib_are_reassembled() {
        let mut s = connect(BASE, "u", Some("shop"));
        let sql = format!("INSERT INTO blobs VALUES ('{}')", "b".repeat(MAX_PACKET));
        let payload = [&[COM_QUERY], sql.as_bytes()].concat();
        let (a, b) = payload.split_at(MAX_PACKET);
        s.push((Side::Client, [pkt(0, a), pkt(1, b)].concat(), 4));
        s.push((Side::Server, pkt(1, &ok(1, 2)), 5));
        let cfg = ParserConfig {
            max_statement: 30,
            ..ParserConfig::default()
        };
        let (ops, unparsed) = run_with(cfg, &s, false);
        assert_eq!(unparsed, 0);
        assert_eq!(
            summary(&ops),
            [("INSERT".into(), Some(json!(1)), StatusCode::Unset, 5)]
        );
        assert_eq!(
            attr(&ops[0], "db.statement"),
            Some(&json!("INSERT INTO blobs VALUES ('bbb...[truncated]"))
        );
    }

    #[test]
    fn mariadb_progress_reports_are_not_errors() {
        let mut s = connect(BASE, "u", Some("shop"));
        s.push((Side::Client, query("ALTER TABLE t ADD c INT"), 4));
        s.push((
            Side::Server,
            [
                pkt(1, b"\xff\xff\xff\x01\x01\x00\x10\x00\x00\x05alter"),
                pkt(2, &ok(0, 2)),
            ]
            .concat(),
            5,
        ));
        let ops = run(&s);
        assert_eq!(
            summary(&ops),
            [("ALTER".into(), Some(json!(0)), StatusCode::Unset, 5)]
        );
    }

    #[test]
    fn compressed_connection_is_not_parsed() {
        let caps = BASE | CLIENT_COMPRESS;
        let mut s = connect(caps, "u", None);
        s.push((
            Side::Client,
            b"\x0d\x00\x00\x00\x00\x00\x00\x09\x00\x00\x00\x03SELECT 1".to_vec(),
            4,
        ));
        let (ops, unparsed) = run_with(ParserConfig::default(), &s, false);
        assert!(ops.is_empty());
        assert_eq!(unparsed, 1);
    }

    #[test]
    fn close_emits_requests_still_waiting() {
        let mut s = connect(BASE, "u", Some("shop"));
        s.push((Side::Client, query("SELECT SLEEP(10)"), 4));
        s.push((Side::Server, pkts(1, &[int(1), column("x"), eof(2)]), 5));
        let ops = run(&s);
        assert_eq!(
            summary(&ops),
            [("SELECT".into(), None, StatusCode::Unset, 1000)]
        );
    }

    #[test]
    fn gap_inside_packet_skips_it() {
        let mut p = MysqlParser::new(ParserConfig::default());
        let mut out = Vec::new();
        for (side, data, ts) in connect(BASE, "u", Some("shop")) {
            p.feed(side, &data, ts, &mut out);
        }
        let q = query(&format!("INSERT INTO t VALUES ('{}')", "x".repeat(400)));
        p.feed(Side::Client, &q[..60], 4, &mut out);
        p.gap(Side::Client, (q.len() - 60) as u64, 4, &mut out);
        // A row cut short in the response.
        let resp = [
            pkts(1, &[int(1), column("x"), eof(2), ls(&"y".repeat(300))]),
            pkt(5, &eof(2)),
        ]
        .concat();
        let cut = resp.len() - 9 - 100;
        p.feed(Side::Server, &resp[..cut], 5, &mut out);
        p.gap(Side::Server, 100, 5, &mut out);
        p.feed(Side::Server, &resp[cut + 100..], 6, &mut out);
        p.feed(Side::Client, &query("SELECT 2"), 7, &mut out);
        p.feed(Side::Server, &result_set(1, BASE, 1, 1, 2), 8, &mut out);
        assert_eq!(p.unparsed(), 0);
        assert_eq!(
            summary(&out),
            [
                ("INSERT".into(), Some(json!(1)), StatusCode::Unset, 6),
                ("SELECT".into(), Some(json!(1)), StatusCode::Unset, 8)
            ]
        );
        assert!(attr(&out[0], "db.statement")
            .unwrap()
            .as_str()
            .unwrap()
            .starts_with("INSERT INTO t VALUES ('xxx"));
    }

    #[test]
    fn gap_between_packets_gives_up_cleanly() {
        let mut p = MysqlParser::new(ParserConfig::default());
        let mut out = Vec::new();
        for (side, data, ts) in connect(BASE, "u", Some("shop")) {
            p.feed(side, &data, ts, &mut out);
        }
        p.feed(Side::Client, &query("SELECT 1"), 4, &mut out);
        p.gap(Side::Server, 30, 5, &mut out);
        assert_eq!((p.unparsed(), out.len()), (1, 1));
        assert_eq!((out[0].end_ts, out[0].status), (5, StatusCode::Unset));
        p.feed(Side::Client, &query("SELECT 2"), 6, &mut out);
        p.feed(Side::Server, &result_set(1, BASE, 1, 1, 2), 7, &mut out);
        p.close(8, &mut out);
        assert_eq!((p.unparsed(), out.len()), (1, 1));
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for round in 0..2000 {
            let mut input = Vec::new();
            for _ in 0..((round % 300) + 1) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                input.push(x as u8);
            }
            if round % 2 == 0 {
                // Seed 0xff feeds the first pieces to the server side.
                let mut real = vec![0xff];
                real.extend(greeting(BASE));
                real.extend(input);
                input = real;
            }
            super::super::fuzz_one(Protocol::Mysql, &input);
        }
    }

    #[test]
    fn looks_like_greeting_accepts_server_greetings_only() {
        assert!(looks_like_greeting(&greeting(BASE)));
        let mut maria = greeting(BASE);
        maria.splice(5..11, b"5.5.5-10.11.6-MariaDB-0+deb12u1".iter().copied());
        let len = (maria.len() - 4) as u32;
        maria[..3].copy_from_slice(&len.to_le_bytes()[..3]);
        assert!(looks_like_greeting(&maria));
        assert!(
            !looks_like_greeting(&greeting(BASE)[..8]),
            "version not complete yet"
        );
        let mut wrong_seq = greeting(BASE);
        wrong_seq[3] = 1;
        assert!(!looks_like_greeting(&wrong_seq));
        assert!(!looks_like_greeting(&pkt(
            0,
            b"\x0a\x01\x02\x00garbage-garbage-garbage"
        )));
        assert!(!looks_like_greeting(&pkt(
            0,
            &err(1130, "HY000", "Host is not allowed")
        )));
        assert!(!looks_like_greeting(b"HTTP/1.1 200 OK\r\n"));
        assert_eq!(
            super::super::detect(Side::Server, &greeting(BASE)),
            Some(Protocol::Mysql)
        );
    }

    #[test]
    fn fuzz_seeds_replay_their_recordings() {
        // The seeds lay the recordings above out in fuzz_one's pieces; without gaps they
        // must still give every op, so the fuzzer starts deep in real conversations.
        for (seed, ops) in [
            (
                include_bytes!("../../fuzz/seeds/mysql/pymysql-seed55.bin").as_slice(),
                11,
            ),
            (
                include_bytes!("../../fuzz/seeds/mysql/pymysql-seeda7.bin").as_slice(),
                11,
            ),
            (
                include_bytes!("../../fuzz/seeds/mysql/pymysql-seed3c.bin").as_slice(),
                11,
            ),
            (
                include_bytes!("../../fuzz/seeds/mysql/deprecate-eof-seed55.bin").as_slice(),
                11,
            ),
            (
                include_bytes!("../../fuzz/seeds/mysql/deprecate-eof-seeda7.bin").as_slice(),
                11,
            ),
            (
                include_bytes!("../../fuzz/seeds/mysql/deprecate-eof-seed3c.bin").as_slice(),
                11,
            ),
            (
                include_bytes!("../../fuzz/seeds/mysql/cache-metadata-seed55.bin").as_slice(),
                11,
            ),
            (
                include_bytes!("../../fuzz/seeds/mysql/cache-metadata-seeda7.bin").as_slice(),
                11,
            ),
            (
                include_bytes!("../../fuzz/seeds/mysql/cache-metadata-seed3c.bin").as_slice(),
                11,
            ),
        ] {
            assert_eq!(super::super::fuzz_one(Protocol::Mysql, seed), ops);
        }
        for seed in [
            include_bytes!("../../fuzz/seeds/mysql/pymysql-seed4e.bin").as_slice(),
            include_bytes!("../../fuzz/seeds/mysql/deprecate-eof-seed4e.bin").as_slice(),
            include_bytes!("../../fuzz/seeds/mysql/cache-metadata-seed4e.bin").as_slice(),
        ] {
            // Every fifth piece is lost here: the parser gives up without panicking.
            super::super::fuzz_one(Protocol::Mysql, seed);
        }
    }

    fn replay(recording: &str) -> Vec<Op> {
        run(&scripts::recording(recording))
    }

    fn names_and_counts(ops: &[Op]) -> Vec<(&str, Option<i64>, StatusCode)> {
        ops.iter()
            .map(|o| {
                (
                    o.name.as_str(),
                    attr(o, "db.rowcount").and_then(Value::as_i64),
                    o.status,
                )
            })
            .collect()
    }

    #[test]
    fn recorded_pymysql_session() {
        let ops = replay(PYMYSQL_SESSION);
        use StatusCode::{Error, Unset};
        assert_eq!(
            names_and_counts(&ops),
            [
                ("SET", Some(0), Unset),
                ("SET", Some(0), Unset),
                ("SELECT", Some(3), Unset),
                ("INSERT", Some(2), Unset),
                ("SELECT", None, Error),
                ("INIT_DB", None, Unset),
                ("SELECT", Some(1), Unset),
                ("USE", Some(0), Unset),
                ("SELECT", Some(1), Unset),
                ("CALL", Some(1), Unset),
                ("DELETE", Some(2), Unset),
            ]
        );
        assert_eq!(attr(&ops[4], "db.error.code"), Some(&json!(1146)));
        let dbs: Vec<_> = ops
            .iter()
            .map(|o| attr(o, "db.name").and_then(Value::as_str).unwrap())
            .collect();
        assert_eq!(
            dbs,
            [
                "shop", "shop", "shop", "shop", "shop", "shop", "billing", "billing", "shop",
                "shop", "shop"
            ]
        );
        assert!(ops
            .iter()
            .all(|o| attr(o, "db.user") == Some(&json!("app"))));
    }

    fn assert_raw_session(ops: &[Op]) {
        use StatusCode::{Error, Unset};
        assert_eq!(
            names_and_counts(ops),
            [
                ("SELECT", Some(3), Unset),
                ("SELECT", Some(0), Unset),
                ("INSERT", Some(2), Unset),
                ("SELECT", None, Error),
                ("SELECT", Some(1), Unset),
                ("CALL", Some(1), Unset),
                ("SELECT", Some(4), Unset),
                ("SELECT", Some(3), Unset),
                ("DELETE", Some(2), Unset),
                ("INIT_DB", None, Unset),
                ("SELECT", Some(1), Unset),
            ]
        );
        assert_eq!(
            attr(&ops[6], "db.statement"),
            Some(&json!("SELECT id, name FROM items WHERE id > ?"))
        );
        assert_eq!(attr(&ops[10], "db.name"), Some(&json!("billing")));
    }

    #[test]
    fn recorded_session_with_deprecate_eof() {
        assert_raw_session(&replay(DEPRECATE_EOF_SESSION));
    }

    #[test]
    fn recorded_session_with_mariadb_cache_metadata() {
        assert_raw_session(&replay(MARIADB_CACHE_METADATA_SESSION));
    }

    /// PyMySQL 1.2 against MariaDB 10.11 (no TLS), recorded through a proxy: EOF packets, an error, COM_INIT_DB, USE, multi-statements, CALL, COM_PING.
    const PYMYSQL_SESSION: &str = "\
S 640000000a352e352e352d31302e31312e31392d4d6172696144422d302b646562313275310005000000573d6a7d\
     5821383900fef7080200ff81150000000000001d000000516c4c742967503b7354296d006d7973716c5f6e617469\
     76655f70617373776f726400\n\
C 8a0000010da23b00ffffff002d000000000000000000000000000000000000000000000061707000146cf0666d03\
     546cc665eb1cb3666be199bb1c098273686f70006d7973716c5f6e61746976655f70617373776f726400350c5f63\
     6c69656e745f6e616d650770796d7973716c0f5f636c69656e745f76657273696f6e05312e322e34045f70696404\
     38323031\n\
S 0700000200000002000000\n\
C 1200000003534554204e414d455320757466386d6234\n\
S 0700000100000002000000\n\
C 1300000003534554204155544f434f4d4d4954203d2030\n\
S 0700000100000000000000\n\
C 270000000353454c4543542069642c206e616d652046524f4d206974656d73204f52444552204259206964\n\
S 010000010228000002036465660473686f70056974656d73056974656d730269640269640c3f000b000000030350\
     0000002c000003036465660473686f70056974656d73056974656d73046e616d65046e616d650c2d00fcff0300fc\
     100000000005000004fe00002100080000050131056170706c650900000601320662616e616e6109000007013306\
     63686572727905000008fe00002100\n\
C 2e00000003494e5345525420494e544f206974656d732056414c554553202831302c20277827292c202831312c20\
     27792729\n\
S 2e00000100020001000000265265636f7264733a203220204475706c6963617465733a203020205761726e696e67\
     733a2030\n\
C 160000000353454c454354202a2046524f4d206d697373696e67\n\
S 2b000001ff7a042334325330325461626c65202773686f702e6d697373696e672720646f65736e27742065786973\
     74\n\
C 080000000262696c6c696e67\n\
S 0700000100000001000000\n\
C 120000000353454c4543542044415441424153452829\n\
S 010000010120000002036465660000000a44415441424153452829000c2d0000010000fd000027000005000003fe\
     00000100080000040762696c6c696e6705000005fe00000100\n\
C 09000000035553452073686f70\n\
S 0700000100000001000000\n\
C 3d0000000353454c45435420313b20555044415445206974656d7320534554206e616d653d277a27205748455245\
     206964203e3d2031303b2053454c4543542032\n\
S 010000010117000002036465660000000131000c3f000100000003810000000005000003fe000009000200000401\
     3105000005fe00000900\n\
S 300000060002000900000028526f7773206d6174636865643a203220204368616e6765643a203220205761726e69\
     6e67733a2030010000070117000008036465660000000132000c3f000100000003810000000005000009fe000001\
     000200000a01320500000bfe00000100\n\
C 090000000343414c4c20702829\n\
S 010000010117000002036465660000000131000c3f000100000003810000000005000003fe000009000200000401\
     3105000005fe00000900\n\
S 010000060228000007036465660473686f70056974656d73056974656d730269640269640c3f000b000000030350\
     0000002c000008036465660473686f70056974656d73056974656d73046e616d65046e616d650c2d00fcff0300fc\
     100000000005000009fe000029000800000a0131056170706c650900000b01320662616e616e610900000c013306\
     6368657272790500000d023130017a0500000e023131017a0500000ffe00002900\n\
S 0700001000000021000000\n\
C 210000000344454c4554452046524f4d206974656d73205748455245206964203e3d203130\n\
S 0700000100020001000000\n\
C 010000000e\n\
S 0700000100000001000000\n\
C 0100000001\n\
";
    /// A raw client offering CLIENT_DEPRECATE_EOF against MariaDB 10.11, recorded through a proxy: text and binary result sets, multi-results, prepare/execute, COM_STMT_CLOSE, COM_INIT_DB, COM_PING, COM_QUIT.
    const DEPRECATE_EOF_SESSION: &str = "\
S 640000000a352e352e352d31302e31312e31392d4d6172696144422d302b6465623132753100080000003e2b5c6e\
     3660614400fef7080200ff81150000000000001d0000007233454052594943555e5b2d006d7973716c5f6e617469\
     76655f70617373776f726400\n\
C 540000010da20b01000000012d0000000000000000000000000000000000000000000000617070001403d5c16eed\
     492554f4998b44c2abdac5a627c03473686f70006d7973716c5f6e61746976655f70617373776f726400\n\
S 0700000200000002000000\n\
C 140000000353454c454354202a2046524f4d206974656d73\n\
S 010000010228000002036465660473686f70056974656d73056974656d730269640269640c3f000b000000030350\
     0000002c000003036465660473686f70056974656d73056974656d73046e616d65046e616d650c2d00fcff0300fc\
     1000000000080000040131056170706c650900000501320662616e616e6109000006013306636865727279070000\
     07fe000022000000\n\
C 230000000353454c454354202a2046524f4d206974656d73205748455245206964203e20313030\n\
S 010000010228000002036465660473686f70056974656d73056974656d730269640269640c3f000b000000030350\
     0000002c000003036465660473686f70056974656d73056974656d73046e616d65046e616d650c2d00fcff0300fc\
     100000000007000004fe000002000000\n\
C 2e00000003494e5345525420494e544f206974656d732056414c554553202833302c20277027292c202833312c20\
     27712729\n\
S 2e00000100020002000000265265636f7264733a203220204475706c6963617465733a203020205761726e696e67\
     733a2030\n\
C 160000000353454c454354202a2046524f4d206d697373696e67\n\
S 2b000001ff7a042334325330325461626c65202773686f702e6d697373696e672720646f65736e27742065786973\
     74\n\
C 3f0000000353454c45435420313b20555044415445206974656d7320534554206e616d65203d2027722720574845\
     5245206964203e3d2033303b2053454c4543542032\n\
S 010000010117000002036465660000000131000c3f000100000003810000000002000003013107000004fe00000a\
     000000\n\
S 300000050002000a00000028526f7773206d6174636865643a203220204368616e6765643a203220205761726e69\
     6e67733a2030\n\
S 010000060117000007036465660000000132000c3f000100000003810000000002000008013207000009fe000002\
     000000\n\
C 090000000343414c4c20702829\n\
S 010000010117000002036465660000000131000c3f000100000003810000000002000003013107000004fe00000a\
     000000010000050228000006036465660473686f70056974656d73056974656d730269640269640c3f000b000000\
     0303500000002c000007036465660473686f70056974656d73056974656d73046e616d65046e616d650c2d00fcff\
     0300fc1000000000080000080131056170706c650900000901320662616e616e610900000a013306636865727279\
     0500000b02333001720500000c02333101720700000dfe00002a0000000700000e00000022000000\n\
C 280000001653454c4543542069642c206e616d652046524f4d206974656d73205748455245206964203e203f\n\
S 0c0000010004000000020001000000001700000203646566000000013f000c3f0000000000068000000000280000\
     03036465660473686f70056974656d73056974656d730269640269640c3f000b0000000303500000002c00000403\
     6465660473686f70056974656d73056974656d73046e616d65046e616d650c2d00fcff0300fc1000000000\n\
C 1600000017040000000001000000000108000100000000000000\n\
S 010000010228000002036465660473686f70056974656d73056974656d730269640269640c3f000b000000030350\
     0000002c000003036465660473686f70056974656d73056974656d73046e616d65046e616d650c2d00fcff0300fc\
     10000000000d0000040000020000000662616e616e610d000005000003000000066368657272790800000600001e\
     00000001720800000700001f000000017207000008fe000002000000\n\
C 1600000017040000000001000000000108000200000000000000\n\
S 010000010228000002036465660473686f70056974656d73056974656d730269640269640c3f000b000000030350\
     0000002c000003036465660473686f70056974656d73056974656d73046e616d65046e616d650c2d00fcff0300fc\
     10000000000d000004000003000000066368657272790800000500001e00000001720800000600001f0000000172\
     07000007fe000002000000\n\
C 200000001644454c4554452046524f4d206974656d73205748455245206964203e3d203f\n\
S 0c0000010005000000000001000000001700000203646566000000013f000c3f0000000000068000000000\n\
C 1600000017050000000001000000000108001e00000000000000\n\
S 0700000100020002000000\n\
C 050000001904000000\n\
C 080000000262696c6c696e67\n\
S 0700000100000002000000\n\
C 120000000353454c4543542044415441424153452829\n\
S 010000010120000002036465660000000a44415441424153452829000c2d0000010000fd00002700000800000307\
     62696c6c696e6707000004fe000002000000\n\
C 010000000e\n\
S 0700000100000002000000\n\
C 0100000001\n\
";
    /// The same commands with MariaDB's extended capabilities (MARIADB_CLIENT_CACHE_METADATA: the second execute of a statement omits its column definitions) and EOF packets.
    const MARIADB_CACHE_METADATA_SESSION: &str = "\
S 640000000a352e352e352d31302e31312e31392d4d6172696144422d302b646562313275310009000000327a307e\
     4b3d2e6c00fef7080200ff81150000000000001d000000564c57527470594a4765497c006d7973716c5f6e617469\
     76655f70617373776f726400\n\
C 540000010ca20b00000000012d000000000000000000000000000000000000001d000000617070001419eba6058a\
     fad230d72b4da92790c989d324c60373686f70006d7973716c5f6e61746976655f70617373776f726400\n\
S 0700000200000002000000\n\
C 140000000353454c454354202a2046524f4d206974656d73\n\
S 02000001020129000002036465660473686f70056974656d73056974656d73026964026964000c3f000b00000003\
     03500000002d000003036465660473686f70056974656d73056974656d73046e616d65046e616d65000c2d00fcff\
     0300fc100000000005000004fe00002200080000050131056170706c650900000601320662616e616e6109000007\
     01330663686572727905000008fe00002200\n\
C 230000000353454c454354202a2046524f4d206974656d73205748455245206964203e20313030\n\
S 02000001020129000002036465660473686f70056974656d73056974656d73026964026964000c3f000b00000003\
     03500000002d000003036465660473686f70056974656d73056974656d73046e616d65046e616d65000c2d00fcff\
     0300fc100000000005000004fe0000020005000005fe00000200\n\
C 2e00000003494e5345525420494e544f206974656d732056414c554553202833302c20277027292c202833312c20\
     27712729\n\
S 2e00000100020002000000265265636f7264733a203220204475706c6963617465733a203020205761726e696e67\
     733a2030\n\
C 160000000353454c454354202a2046524f4d206d697373696e67\n\
S 2b000001ff7a042334325330325461626c65202773686f702e6d697373696e672720646f65736e27742065786973\
     74\n\
C 3f0000000353454c45435420313b20555044415445206974656d7320534554206e616d65203d2027722720574845\
     5245206964203e3d2033303b2053454c4543542032\n\
S 0200000101011800000203646566000000013100000c3f000100000003810000000005000003fe00000a00020000\
     04013105000005fe00000a00\n\
S 300000060002000a00000028526f7773206d6174636865643a203220204368616e6765643a203220205761726e69\
     6e67733a2030\n\
S 0200000701011800000803646566000000013200000c3f000100000003810000000005000009fe00000200020000\
     0a01320500000bfe00000200\n\
C 090000000343414c4c20702829\n\
S 0200000101011800000203646566000000013100000c3f000100000003810000000005000003fe00000a00020000\
     04013105000005fe00000a00\n\
S 02000006020129000007036465660473686f70056974656d73056974656d73026964026964000c3f000b00000003\
     03500000002d000008036465660473686f70056974656d73056974656d73046e616d65046e616d65000c2d00fcff\
     0300fc100000000005000009fe00002a000800000a0131056170706c650900000b01320662616e616e610900000c\
     0133066368657272790500000d02333001720500000e02333101720500000ffe00002a00\n\
S 0700001000000022000000\n\
C 280000001653454c4543542069642c206e616d652046524f4d206974656d73205748455245206964203e203f\n\
S 0c0000010006000000020001000000001800000203646566000000013f00000c3f00000000000680000000000500\
     0003fe0000020029000004036465660473686f70056974656d73056974656d73026964026964000c3f000b000000\
     0303500000002d000005036465660473686f70056974656d73056974656d73046e616d65046e616d65000c2d00fc\
     ff0300fc100000000005000006fe00000200\n\
C 1600000017060000000001000000000108000100000000000000\n\
S 02000001020005000002fe000002000d0000030000020000000662616e616e610d00000400000300000006636865\
     7272790800000500001e00000001720800000600001f000000017205000007fe00000200\n\
C 1600000017060000000001000000000108000200000000000000\n\
S 02000001020005000002fe000002000d000003000003000000066368657272790800000400001e00000001720800\
     000500001f000000017205000006fe00000200\n\
C 200000001644454c4554452046524f4d206974656d73205748455245206964203e3d203f\n\
S 0c0000010007000000000001000000001800000203646566000000013f00000c3f00000000000680000000000500\
     0003fe00000200\n\
C 1600000017070000000001000000000108001e00000000000000\n\
S 0700000100020002000000\n\
C 050000001906000000\n\
C 080000000262696c6c696e67\n\
S 0700000100000002000000\n\
C 120000000353454c4543542044415441424153452829\n\
S 02000001010121000002036465660000000a4441544142415345282900000c2d0000010000fd0000270000050000\
     03fe00000200080000040762696c6c696e6705000005fe00000200\n\
C 010000000e\n\
S 0700000100000002000000\n\
C 0100000001\n\
";
}
