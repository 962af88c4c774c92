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
//!
//! Resynchronisation. A gap inside a packet is skipped (its length is known). Anywhere
//! else a side loses its packet boundaries, and finds them again as PostgreSQL's parser
//! does: the client side at the next captured piece that starts with a command packet
//! checked strongly ([`starts_command`]: sequence id 0, a known command, a length that
//! fits); the server side at the client's next command when the client was waiting for
//! the lost answer (one command outstanding), its first packet required to carry
//! sequence id 1 as every answer's first packet does. A command seen after a loss of the
//! client's stream while earlier ones still wait is dropped (`unpaired`): the answers to
//! the lost commands come before its own. A connection watched from its middle (no
//! greeting) starts at the first command: the capability flags the handshake would
//! have given are inferred from the answers (an EOF after the column definitions or
//! not, a metadata flag after the column count or not).
//!
//! A connection open before watching began ([`Parser::watched_midstream`]) starts
//! *unsure*, as HTTP/1.1's parser does: while the TLS probes attach one libssl function
//! after another, a command may be captured without its answer, with nothing to say so.
//! The first answer is paired only when one command waits (a client waits for each
//! answer before it sends again); with several, which one it answers is not known:
//! they are dropped, counted `unpaired`, and the server side resumes at the client's
//! next command. A command seen where the handshake response was expected (sequence id
//! 0: the response was missed, as on a TLS connection opened while the probes attach)
//! ends the handshake, its capability flags inferred from the answers.

use std::{collections::VecDeque, sync::Arc};

use super::{
    bytes::{cstr, le_u16, le_u32, lenenc_int, lossy},
    framing::FrameReader,
    sql::{self, finish_op, new_op, Dialect, ServerError, Statement, MAX_PENDING, MAX_STATEMENTS},
    truncate_statement, Loss, Losses, Op, Parser, ParserConfig, Protocol, Side,
};
use crate::bounded::BoundedMap;

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

// Command bytes ("Text Protocol", "Prepared Statements", "Utility Commands").
const COM_QUIT: u8 = 0x01;
const COM_INIT_DB: u8 = 0x02;
const COM_QUERY: u8 = 0x03;
const COM_FIELD_LIST: u8 = 0x04;
const COM_PING: u8 = 0x0e;
const COM_STATISTICS: u8 = 0x09;
const COM_CHANGE_USER: u8 = 0x11;
const COM_BINLOG_DUMP: u8 = 0x12;
const COM_STMT_PREPARE: u8 = 0x16;
const COM_STMT_EXECUTE: u8 = 0x17;
const COM_STMT_SEND_LONG_DATA: u8 = 0x18;
const COM_STMT_CLOSE: u8 = 0x19;
const COM_STMT_RESET: u8 = 0x1a;
const COM_SET_OPTION: u8 = 0x1b;
const COM_STMT_FETCH: u8 = 0x1c;
const COM_BINLOG_DUMP_GTID: u8 = 0x1e;
const COM_RESET_CONNECTION: u8 = 0x1f;
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

/// Whether these client bytes, seen on a connection already open when watching began,
/// start a command: a packet with sequence id 0 holding COM_QUERY or COM_STMT_PREPARE and
/// statement text (printable, with a letter in it), whole or cut by the end of `first`.
pub fn looks_like_command_midstream(first: &[u8]) -> bool {
    let Some(&[l0, l1, l2, seq, cmd]) = first.get(..5) else {
        return false;
    };
    let len = u32::from_le_bytes([l0, l1, l2, 0]) as usize;
    if seq != 0 || len < 2 || !matches!(cmd, COM_QUERY | COM_STMT_PREPARE) {
        return false;
    }
    let text = first.get(5..first.len().min(4 + len)).unwrap_or_default();
    text.iter()
        .all(|&c| c >= 0x20 || c == b'\t' || c == b'\n' || c == b'\r')
        && text.iter().any(u8::is_ascii_alphabetic)
}

/// Whether a client's first captured piece is a handshake response (or SSLRequest): one
/// packet with sequence id 1, held whole, long enough for the capability flags.
fn looks_like_handshake_response(piece: &[u8]) -> bool {
    let Some(&[l0, l1, l2, seq]) = piece.get(..4) else {
        return false;
    };
    let len = u32::from_le_bytes([l0, l1, l2, 0]) as usize;
    seq == 1 && len >= 5 && piece.len() == 4 + len
}

/// Whether a captured client piece starts a command, checked strongly enough to resume
/// a lost stream on: a query or prepare ([`looks_like_command_midstream`]), a
/// COM_STMT_EXECUTE with one iteration and known cursor flags, or a command of fixed
/// length held whole (COM_PING, COM_STMT_FETCH, COM_INIT_DB …); a packet held whole must
/// be followed by nothing or by another command's header.
fn starts_command(piece: &[u8]) -> bool {
    let Some(&[l0, l1, l2, seq, cmd]) = piece.get(..5) else {
        return false;
    };
    let len = u32::from_le_bytes([l0, l1, l2, 0]) as usize;
    // Held whole and alone: a short packet followed by more bytes is too easily found
    // inside another packet.
    let whole = piece.len() == 4 + len;
    let fits = match piece.get(4 + len..) {
        None => true,
        Some(rest) => rest.is_empty() || rest.get(3) == Some(&0),
    };
    let shape = match cmd {
        COM_QUERY | COM_STMT_PREPARE => looks_like_command_midstream(piece),
        // Statement id (4), flags (1: cursor type), iteration count (4) = 1.
        COM_STMT_EXECUTE => {
            len >= 10 && piece.get(9).is_some_and(|&f| f <= 0x0f) && le_u32(piece, 10) == Some(1)
        }
        // Commands without arguments, or with fixed ones (statement id; statement id and
        // row count; an option).
        COM_PING | COM_QUIT | COM_STATISTICS | COM_RESET_CONNECTION => len == 1 && whole,
        COM_STMT_CLOSE | COM_STMT_RESET => len == 5 && whole,
        COM_STMT_FETCH => len == 9 && whole,
        COM_SET_OPTION => len == 3 && whole && piece.get(6) == Some(&0) && piece[5] <= 1,
        // A schema name: printable, no spaces.
        COM_INIT_DB => {
            (2..=257).contains(&len)
                && whole
                && piece
                    .get(5..4 + len)
                    .is_some_and(|name| name.iter().all(|&c| c > 0x20 && c != 0x7f))
        }
        _ => false,
    };
    seq == 0 && fits && shape
}

pub struct MysqlParser {
    cfg: ParserConfig,
    losses: Losses,
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
    /// The server's packet boundaries were lost while the client waited: its bytes are
    /// the rest of that answer and are skipped until the client's next command.
    server_resync: bool,
    /// The next server packet starts the answer to a command sent with nothing else
    /// waiting: its sequence id must be 1.
    expect_answer_start: bool,
    /// Nothing of the client's stream was seen yet.
    client_fresh: bool,
    /// The client's stream lost packets since: their answers come before the answers to
    /// commands seen after.
    client_gap: bool,
    /// The capability flags came from a handshake we saw; otherwise (watched from the
    /// middle) they are inferred from the answers.
    caps_known: bool,
    /// The server's framing was seen to be its own (a greeting, or an answer starting
    /// with sequence id 1) since watching began or resumed.
    server_confirmed: bool,
    /// Watched from the connection's middle and no answer paired yet: commands may have
    /// been captured without their answers (see the module doc).
    unsure: bool,
}

#[derive(Debug)]
struct Running {
    op: Op,
    /// Result sets (or OKs) finished so far: only the first gives the row count, as
    /// `cursor.rowcount` right after `execute()` reports in PyMySQL and mysqlclient.
    results: u32,
    rows: u64,
    rowcount: Option<u64>,
    error: Option<ServerError>,
}

#[derive(Debug)]
enum Kind {
    /// COM_QUERY; `use_db` is the schema a `USE db` statement switches to (empty:
    /// unknown).
    Query { use_db: Option<String> },
    /// COM_STMT_EXECUTE, COM_STMT_BULK_EXECUTE.
    Execute,
    /// COM_INIT_DB: switches the schema when it succeeds (empty: to one unknown).
    InitDb(String),
    /// COM_STMT_PREPARE: no op unless it fails; remembers the statement by id.
    Prepare(Arc<Statement>),
    /// COM_STMT_FETCH: rows then EOF (or OK under CLIENT_DEPRECATE_EOF), no column count.
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
            losses: Losses::default(),
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
            server_resync: false,
            expect_answer_start: false,
            client_fresh: true,
            client_gap: false,
            caps_known: true,
            server_confirmed: false,
            unsure: false,
        }
    }

    /// The connection was already set up when watching began: commands from here on,
    /// with the layouts every current server and client use (protocol 4.1).
    fn midstream(&mut self) {
        self.phase = Phase::Command;
        self.caps = CLIENT_PROTOCOL_41 | CLIENT_TRANSACTIONS | CLIENT_SECURE_CONNECTION;
        self.caps_known = false;
    }

    /// The client's packet boundaries are lost (`why`) until a piece starts a command.
    fn client_lost(&mut self, why: Loss) {
        self.client_lost_as(Some(why));
    }

    /// [`Self::client_lost`], counted under `why` (`None`: counted already).
    fn client_lost_as(&mut self, why: Option<Loss>) {
        self.command_lost_as(why);
        self.client.frames.dead = true;
    }

    /// Commands were sent that we do not know: their answers come before those of the
    /// commands seen next.
    fn command_lost(&mut self, why: Loss) {
        self.command_lost_as(Some(why));
    }

    fn command_lost_as(&mut self, why: Option<Loss>) {
        if let Some(why) = why {
            self.losses.add(why);
        }
        // A lost command may have switched them (COM_INIT_DB, USE, COM_CHANGE_USER):
        // unknown rather than perhaps wrong.
        self.user = None;
        self.database = None;
        self.client_gap = true;
    }

    /// The server's packet boundaries are lost (`why`). With one command waiting (the
    /// client waits for its answer before it sends again), that command ends here
    /// unanswered and the server side resumes at the client's next command; with more
    /// (a pipeline), where the server is in their answers cannot be known: stop.
    fn server_desync(&mut self, why: Loss, ts: u64, out: &mut Vec<Op>) {
        self.server_desync_as(Some(why), ts, out);
    }

    /// [`Self::server_desync`], counted under `why` (`None`: counted already).
    fn server_desync_as(&mut self, why: Option<Loss>, ts: u64, out: &mut Vec<Op>) {
        if let Some(why) = why {
            self.losses.add(why);
        }
        self.server.frames.dead = true;
        self.server_confirmed = false;
        if self.pending.len() > 1 {
            self.stop(ts, out);
            return;
        }
        while !self.pending.is_empty() {
            self.pop_front(ts, out, false);
        }
        self.server_resync = true;
    }

    /// Unsure, an answer began while several commands waited: the others' answers were
    /// missed and which one this is cannot be known. They are dropped, each with an op
    /// counted `unpaired` once, and the server side skips the rest of this answer until
    /// the client's next command (see the module doc).
    fn drop_unsure(&mut self, ts: u64, out: &mut Vec<Op>) {
        let ops = self
            .pending
            .drain(..)
            .filter(|p| {
                matches!(
                    p.kind,
                    Kind::Query { .. } | Kind::Execute | Kind::InitDb(_) | Kind::Fetch
                )
            })
            .count();
        for _ in 0..ops.max(1) {
            self.losses.add(Loss::Unpaired);
        }
        self.resp = Resp::Start;
        self.server_desync_as(None, ts, out);
    }

    /// The handshake response (or the rest of the authentication) was missed: a command
    /// means the server accepted the login. The capability flags the response would
    /// have settled are inferred from the answers.
    fn handshake_missed(&mut self) {
        if self.phase == Phase::HandshakeResponse {
            self.caps = self.server_caps
                & (CLIENT_PROTOCOL_41 | CLIENT_TRANSACTIONS | CLIENT_SECURE_CONNECTION);
            self.caps_known = false;
        }
        self.phase = Phase::Command;
    }

    fn feed_client(&mut self, mut data: &[u8], ts: u64, out: &mut Vec<Op>) {
        if self.stopped || data.is_empty() {
            return;
        }
        if std::mem::take(&mut self.client_fresh) && self.phase == Phase::Greeting {
            // No greeting seen: the connection was set up before watching began, unless
            // the greeting is still to come (the client speaks only after it).
            // (A handshake response, sequence id 1 and held whole, means the greeting is
            // on its way.) Anything else is the rest of a packet: clients write a
            // packet's header and payload in one call.
            if starts_command(data) {
                self.midstream();
            } else if !looks_like_handshake_response(data) {
                self.client_lost(Loss::Malformed);
            }
        }
        if self.client.frames.dead {
            // A captured piece that starts a command ends the loss: a client writes a
            // command packet in one call.
            if !starts_command(data) {
                return;
            }
            self.client.restart();
            match self.phase {
                Phase::Greeting => self.midstream(),
                Phase::HandshakeResponse | Phase::Auth => self.handshake_missed(),
                Phase::Command => {}
            }
        }
        while !data.is_empty() && !self.client.frames.dead && !self.stopped {
            match self.client.pull(&mut data, ts, self.cfg.max_buffer) {
                Some(frame) => self.on_client(frame, out),
                None => break,
            }
        }
    }

    fn feed_server(&mut self, mut data: &[u8], ts: u64, out: &mut Vec<Op>) {
        if self.server_resync {
            // The rest of an answer already reported; the client has not asked again.
            return;
        }
        while !data.is_empty() && !self.server.frames.dead && !self.stopped {
            // Rows are only counted: keep just enough of them to recognise a terminator.
            let keep = match self.resp {
                Resp::Start => self.cfg.max_buffer,
                _ => ROW_KEEP.min(self.cfg.max_buffer),
            };
            match self.server.pull(&mut data, ts, keep) {
                Some(frame) => {
                    if self.phase == Phase::Command && self.unsure && !self.pending.is_empty() {
                        if self.pending.len() > 1 {
                            self.server.recycle(frame.body);
                            self.drop_unsure(ts, out);
                            break;
                        }
                        self.unsure = false;
                    }
                    if self.phase == Phase::Command
                        && std::mem::take(&mut self.expect_answer_start)
                        && frame.seq != 1
                    {
                        // Not the first packet of an answer: framed on bytes that are
                        // not packets (the rest of an earlier answer, or noise).
                        self.server_desync(Loss::Malformed, ts, out);
                        break;
                    }
                    if self.phase == Phase::Command && frame.seq == 1 {
                        self.server_confirmed = true;
                    }
                    self.on_server(frame, ts, out)
                }
                None => break,
            }
        }
    }

    fn on_client(&mut self, f: Frame, out: &mut Vec<Op>) {
        match self.phase {
            // A handshake response continues the greeting's sequence (id 1, or 2 after
            // an SSLRequest); a packet starting one is a command: the response was missed.
            Phase::HandshakeResponse if f.seq == 0 && !self.compressed() => {
                self.handshake_missed();
                self.on_command(&f, out);
            }
            Phase::HandshakeResponse => self.on_handshake_response(&f.body),
            Phase::Command if f.seq == 0 => self.on_command(&f, out),
            // A command while authenticating: the server's OK was lost (authentication
            // packets continue a sequence, never start one).
            Phase::Auth if f.seq == 0 && !self.compressed() => {
                self.phase = Phase::Command;
                self.on_command(&f, out);
            }
            // The greeting was missed (lost, or sent before watching began): a packet
            // starting a sequence is a command.
            Phase::Greeting if f.seq == 0 && !self.stopped => {
                self.midstream();
                self.on_command(&f, out);
            }
            // Before the greeting, during authentication, and packets continuing a
            // command (LOAD DATA LOCAL contents have sequence ids after 0): nothing to do.
            _ => {}
        }
        self.client.recycle(f.body);
    }

    fn on_server(&mut self, f: Frame, ts: u64, out: &mut Vec<Op>) {
        match self.phase {
            Phase::Greeting => self.on_greeting(f.seq, &f.body),
            Phase::HandshakeResponse => {}
            Phase::Auth => match f.body.first() {
                Some(0x00) => {
                    self.phase = Phase::Command;
                    if self.compressed() {
                        // Compression starts after the handshake's OK: not parsed.
                        self.losses.add(Loss::Malformed);
                        self.stop(ts, out);
                    }
                }
                // Failed authentication (the server closes) or COM_CHANGE_USER refused.
                Some(0xff) => self.phase = Phase::Command,
                // AuthSwitchRequest 0xFE, AuthMoreData 0x01: the exchange goes on.
                _ => {}
            },
            // A packet a gap cut into, where its kind or status decides what follows:
            // its first byte lost (an OK, an ERR, a row or a result's start?), or an
            // OK/EOF/ERR whose status flags (more results? a cursor?) or error may be
            // gone, or a prepare's definition.
            Phase::Command
                if f.cut
                    && (f.body.is_empty()
                        || matches!(f.body.first(), Some(0xfe | 0xff))
                        || matches!(self.resp, Resp::Start | Resp::PrepareDefs { .. })) =>
            {
                self.server_desync(Loss::Gap, ts, out);
            }
            Phase::Command => self.on_response(&f, ts, out),
        }
        self.server.recycle(f.body);
    }

    /// Compression starts after the handshake's OK: not parsed.
    fn compressed(&self) -> bool {
        self.caps & (CLIENT_COMPRESS | CLIENT_ZSTD_COMPRESSION_ALGORITHM) != 0
    }

    /// Protocol::HandshakeV10.
    fn on_greeting(&mut self, seq: u8, b: &[u8]) {
        match b.first() {
            Some(0x0a) if seq == 0 => {}
            // The server refused the connection ("Host … is blocked"): nothing follows.
            // (An ERR with another sequence id answers a command: watched mid-stream.)
            Some(0xff) if seq == 0 => {
                self.stopped = true;
                return;
            }
            _ => {
                // Not a greeting: the connection was watched from its middle. The
                // server side waits for the client's first command. When the client's
                // first bytes were the rest of a command, counted then, these answer it:
                // the exchange is not counted again.
                if !self.client_gap {
                    self.losses.add(Loss::Malformed);
                }
                self.server.frames.dead = true;
                self.server_resync = true;
                return;
            }
        }
        // Version string, connection id (4), auth-plugin-data part 1 (8), filler (1).
        self.server_confirmed = true;
        match greeting_caps(b) {
            Some(caps) => self.server_caps = caps,
            None => {
                // Cut by a gap before the flags end: they are inferred from the answers.
                self.server_caps = CLIENT_PROTOCOL_41
                    | CLIENT_TRANSACTIONS
                    | CLIENT_SECURE_CONNECTION
                    | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
                    | CLIENT_CONNECT_WITH_DB;
                self.caps_known = false;
            }
        }
        self.phase = Phase::HandshakeResponse;
    }

    /// Protocol::HandshakeResponse41 (or 320), or an SSLRequest.
    fn on_handshake_response(&mut self, b: &[u8]) {
        if b.len() < 4 {
            // Cut by a gap before the client's flags: they are inferred from the answers.
            self.caps = self.server_caps
                & (CLIENT_PROTOCOL_41 | CLIENT_TRANSACTIONS | CLIENT_SECURE_CONNECTION);
            self.caps_known = false;
            self.phase = Phase::Auth;
            return;
        }
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
                match le_u32(b, 28) {
                    Some(extended) => caps |= u64::from(extended) << 32,
                    // Cut by a gap: MariaDB's metadata caching is inferred.
                    None => self.caps_known = false,
                }
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
            self.losses.add(Loss::Malformed);
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
            match lenenc_int(b, pos) {
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
            // Its command byte was lost in a gap (a command is never empty).
            self.command_lost(Loss::Gap);
            return;
        };
        let kind = match cmd {
            COM_QUERY => {
                let sql = query_text(args, self.caps & CLIENT_QUERY_ATTRIBUTES != 0);
                let stmt = sql
                    .as_deref()
                    .map(|s| Statement::new(s, self.cfg.max_statement, Dialect::Mysql));
                let operation = stmt.as_ref().and_then(|s| s.operation.as_deref());
                let use_db = if f.truncated {
                    // Cut by a gap: a USE whose name (or first word) was cut switches to
                    // a schema we cannot know.
                    operation
                        .is_none_or(|op| "USE".starts_with(op))
                        .then(String::new)
                } else if operation == Some("USE") {
                    sql.as_deref().and_then(use_target)
                } else {
                    None
                };
                let run = self.start_op(stmt.as_ref(), "QUERY", f.start_ts);
                if stmt.is_none() {
                    self.losses.add(Loss::Malformed);
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
                // Cut by a gap: which schema is unknown.
                let target = if f.truncated {
                    String::new()
                } else {
                    db.clone()
                };
                let stmt = Statement {
                    text: truncate_statement(&format!("USE {db}"), self.cfg.max_statement),
                    operation: Some("INIT_DB".to_string()),
                };
                let run = self.start_op(Some(&stmt), "INIT_DB", f.start_ts);
                return self.push(
                    Pending {
                        kind: Kind::InitDb(target),
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
            COM_STMT_FETCH => {
                // Rows of the cursor an execute opened: an op of its own, named by the
                // statement (as PostgreSQL's Execute of a suspended portal), counting
                // the rows this fetch returned.
                let stmt = le_u32(args, 0).and_then(|id| self.statements.get(&id).cloned());
                let run = self.start_op(stmt.as_deref(), "FETCH", f.start_ts);
                return self.push(
                    Pending {
                        kind: Kind::Fetch,
                        run,
                    },
                    f.start_ts,
                    out,
                );
            }
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
                self.losses.add(Loss::Malformed);
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
        if self.client_gap {
            if self.pending.is_empty() {
                self.client_gap = false;
            } else {
                // Answers to the commands lost in between come before this one's.
                self.losses.add(Loss::Unpaired);
                return;
            }
        }
        if self.server_resync {
            self.server_resync = false;
            self.server.restart();
        } else if !self.server_confirmed && self.pending.is_empty() && !self.server.at_boundary() {
            // Nothing was waiting, so the server had finished answering: a packet it is
            // still in the middle of was framed from bytes that are not one.
            self.losses.add(Loss::Malformed);
            self.server.restart();
        }
        if self.pending.is_empty() && !self.server_confirmed {
            self.expect_answer_start = true;
        }
        if self.pending.len() >= MAX_PENDING {
            // Answers are not reaching us: give up the oldest request.
            self.losses.add(Loss::Oversize);
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
                if let Some(db) = use_db {
                    self.switch_database(answered, ok, db);
                }
                out.push(finish(run, ts));
            }
            Kind::InitDb(db) => {
                // Its OK's "affected rows" is always 0 and means nothing here.
                let mut run = run;
                run.rowcount = None;
                self.switch_database(answered, ok, db);
                out.push(finish(run, ts));
            }
            Kind::Execute | Kind::Fetch => out.push(finish(run, ts)),
            Kind::Prepare(stmt) => {
                // A failed prepare never gets executed: report it, or it leaves no trace.
                if run.error.is_some() {
                    let mut failed = self.start_op(Some(&stmt), "PREPARE", run.op.start_ts);
                    failed.error = run.error;
                    out.push(finish(failed, ts));
                }
            }
            Kind::FieldList | Kind::Statistics | Kind::Other => {}
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
                                self.losses.add(Loss::Malformed);
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
                    _ => {
                        if !self.on_column_count(b) {
                            // Cut by a gap: the result's shape is unknown.
                            self.server_desync(Loss::Gap, ts, out);
                        }
                    }
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
                    // An EOF packet is 5 bytes under CLIENT_PROTOCOL_41; the OK packet
                    // that ends rows under CLIENT_DEPRECATE_EOF (0xFE too) 7 or more.
                    let columns_eof = eof && (self.caps_known || f.len == 5);
                    if !columns_eof {
                        // Not the expected EOF: take it as the first row, or as the end
                        // of no rows.
                        if !self.caps_known {
                            self.caps |= CLIENT_DEPRECATE_EOF;
                        }
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
                    // Flags unknown: a row cannot start with 0xFE in a packet this short
                    // (a length-encoded field that long would not fit).
                    let deprecate = self.caps & CLIENT_DEPRECATE_EOF != 0 || !self.caps_known;
                    if first == Some(0xfe) && (eof || (deprecate && f.len < MAX_PACKET)) {
                        let status = if eof {
                            parse_eof(b, self.caps)
                        } else {
                            parse_ok(b, self.caps).1
                        };
                        // An execute that opened a cursor (its OK under DEPRECATE_EOF
                        // stands where the columns' EOF would): its rows come by fetch.
                        let cursor = status & SERVER_STATUS_CURSOR_EXISTS != 0
                            && matches!(front.kind, Kind::Execute);
                        let rows = (!cursor).then_some(front.run.rows);
                        return self.end_result(rows, status, ts, out);
                    }
                    front.run.rows = front.run.rows.saturating_add(1);
                }
            }
            return;
        }
    }

    /// A result set's first packet: the column count (and, when metadata is optional,
    /// whether the column definitions follow). False when it holds no count.
    fn on_column_count(&mut self, b: &[u8]) -> bool {
        let Some((count, next)) = lenenc_int(b, 0) else {
            return false;
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
        // Flags unknown: the count is followed by the metadata flag exactly when the
        // packet holds one more byte.
        let optional = if self.caps_known {
            optional
        } else {
            b.len() == next + 1
        };
        // "metadata_follows": RESULTSET_METADATA_NONE (0) skips the definitions.
        let metadata = !optional || b.get(next).is_none_or(|&m| m != 0);
        self.resp = if metadata && count > 0 {
            Resp::Columns { left: count }
        } else {
            self.after_columns()
        };
        true
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
            front.run.error = Some(ServerError {
                code: Some(code.into()),
                message,
            });
        }
        self.pop_front(ts, out, true);
    }

    /// A command switching the schema to `db` (empty: unknown) ended: `ok`, or failed,
    /// or its answer was never seen (`answered` false: whether it switched is unknown).
    fn switch_database(&mut self, answered: bool, ok: bool, db: String) {
        if ok || !answered {
            self.database = (ok && !db.is_empty()).then_some(db);
        }
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
            // Bytes between packets are gone: no length to frame the rest on. The packet
            // the gap cut was counted already when it could not be read: the gap is one
            // loss.
            let why = (self.losses == before).then_some(Loss::Gap);
            match side {
                // Commands already seen can still be answered.
                Side::Client => self.client_lost_as(why),
                Side::Server => self.server_desync_as(why, ts, out),
            }
        }
    }

    /// Pairing starts unsure: the first answer pairs only with a command waiting alone
    /// (see the module doc).
    fn watched_midstream(&mut self) {
        self.unsure = true;
    }

    fn close(&mut self, ts: u64, out: &mut Vec<Op>) {
        while !self.pending.is_empty() {
            self.pop_front(ts, out, false);
        }
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

/// The schema named by `USE db` / "USE `db`".
fn use_target(sql: &str) -> Option<String> {
    let at = sql.to_ascii_uppercase().find("USE")?;
    let rest = sql.get(at + 3..)?.trim_start();
    let name = match rest.strip_prefix('`') {
        Some(quoted) => quoted.split('`').next()?,
        None => rest.split(|c: char| c.is_whitespace() || c == ';').next()?,
    };
    (!name.is_empty() && sql::operation(sql, Dialect::Mysql).as_deref() == Some("USE"))
        .then(|| name.to_string())
}

/// COM_QUERY's text. With CLIENT_QUERY_ATTRIBUTES a parameter count and a parameter
/// set count (and, for a non-zero count, a NULL bitmap, types, names and binary
/// values) come first.
fn query_text(args: &[u8], attributes: bool) -> Option<String> {
    let mut pos = 0;
    if attributes {
        let (count, next) = lenenc_int(args, 0)?;
        let (_sets, next) = lenenc_int(args, next)?;
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
                let (name_len, next) = lenenc_int(args, pos.checked_add(2)?)?;
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
            let (n, next) = lenenc_int(b, pos)?;
            return next.checked_add(usize::try_from(n).ok()?);
        }
    };
    let end = pos.checked_add(fixed)?;
    (end <= b.len()).then_some(end)
}

/// The server's capability flags from its greeting, or None when the greeting was cut
/// before they end: after the version string, connection id (4), auth-plugin-data part
/// 1 (8) and a filler (1), the lower flags (2), then charset (1), status flags (2), upper
/// flags (2), auth data length (1) and 10 reserved bytes, of which MariaDB uses the last
/// 4 for its own flags.
fn greeting_caps(b: &[u8]) -> Option<u64> {
    let pos = cstr(b, 1)?.1 + 4 + 8 + 1;
    let lower = le_u16(b, pos)?;
    let upper = le_u16(b, pos + 2 + 1 + 2)?;
    let mut caps = u64::from(lower) | u64::from(upper) << 16;
    if caps & CLIENT_MYSQL == 0 {
        caps |= u64::from(le_u32(b, pos + 2 + 1 + 2 + 2 + 1 + 6)?) << 32;
    }
    Some(caps)
}

/// OK_Packet: header, affected rows (lenenc), last insert id (lenenc), then status
/// flags under CLIENT_PROTOCOL_41 or CLIENT_TRANSACTIONS.
fn parse_ok(b: &[u8], caps: u64) -> (Option<u64>, u16) {
    let Some((affected, next)) = lenenc_int(b, 1) else {
        return (None, 0);
    };
    let status = match lenenc_int(b, next) {
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
    /// Some of its bytes were not kept (over the keep limit, or lost to a gap).
    truncated: bool,
    /// A gap took some of its bytes.
    cut: bool,
    /// Timestamp of the piece that held the payload's first byte.
    start_ts: u64,
}

/// One direction's packet reader, reassembling payloads split at 0xFFFFFF bytes.
#[derive(Default)]
struct Reader {
    frames: FrameReader<4>,
    /// Length of the current packet.
    packet_len: usize,
    /// The payload goes on in the next packet.
    continued: bool,
    /// Sequence id of the payload's first packet.
    seq: u8,
    /// The payload's length so far.
    len: usize,
    /// A gap took bytes of the payload in progress.
    cut: bool,
}

impl Reader {
    fn recycle(&mut self, body: Vec<u8>) {
        self.frames.recycle(body);
    }

    /// Between payloads.
    fn at_boundary(&self) -> bool {
        self.frames.at_boundary() && !self.continued
    }

    /// Forgets the payload in progress (and a lost stream): the next byte starts one.
    fn restart(&mut self) {
        self.frames.restart();
        self.continued = false;
        self.len = 0;
        self.cut = false;
    }

    fn pull(&mut self, data: &mut &[u8], ts: u64, keep: usize) -> Option<Frame> {
        loop {
            if !self.frames.in_body() {
                let [l0, l1, l2, seq] = self.frames.read_header(data, ts, 4, !self.continued)?;
                self.packet_len = u32::from_le_bytes([l0, l1, l2, 0]) as usize;
                if self.continued {
                    self.frames.continue_body(self.packet_len);
                } else {
                    self.seq = seq;
                    self.len = 0;
                    self.frames.start_body(self.packet_len, keep);
                }
            }
            if !self.frames.read_body(data) {
                return None;
            }
            if let Some(frame) = self.end_packet() {
                return Some(frame);
            }
        }
    }

    /// The current packet is complete: the payload too, unless it continues.
    fn end_packet(&mut self) -> Option<Frame> {
        self.len = self.len.saturating_add(self.packet_len);
        self.continued = self.packet_len == MAX_PACKET;
        if self.continued {
            return None;
        }
        let (body, truncated) = self.frames.take_body();
        Some(Frame {
            seq: self.seq,
            body,
            truncated,
            cut: std::mem::take(&mut self.cut),
            len: self.len,
            start_ts: self.frames.start_ts,
        })
    }

    /// `n` bytes were lost. Inside a packet they are skipped (a payload completed this
    /// way is returned with what was kept); anywhere else the stream is `lost`.
    fn skip(&mut self, n: u64) -> (Option<Frame>, bool) {
        let (ended, lost) = self.frames.skip(n);
        self.cut = !lost;
        let frame = if ended { self.end_packet() } else { None };
        (frame, lost)
    }
}

#[cfg(test)]
mod tests;
