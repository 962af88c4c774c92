//! Protocol parsers: pure, incremental functions of a connection's two byte streams.
//!
//! A parser sees the client's bytes and the server's bytes in stream order, in pieces of
//! any size, and returns one [`Op`] per request paired with its response. It does no
//! I/O, reads no clock (timestamps come in with the bytes) and keeps no globals, so it
//! can be unit-tested and fuzzed alone. Memory per connection is bounded: a message that
//! does not fit [`ParserConfig::max_buffer`] is skipped and counted as unparsed. Any
//! input, however malformed, must never panic: it becomes an `unparsed` count.
//!
//! One file per protocol, its unit tests beside it in `<name>/tests.rs`. What parsers
//! share lives in its own module: `framing` (the reader of length-prefixed messages:
//! PostgreSQL, MySQL, MongoDB), `bytes` (field readers: integers, C strings, MySQL's
//! length-encoded integers) and `sql` (statement text, operation keyword by dialect, the
//! database op's attributes). HTTP and Redis frame by lines and delimiters, not by a
//! length header, and keep their own readers. `http::coding` decodes compressed bodies,
//! `http::events` splits streamed ones into events, and `genai` recognises LLM calls in
//! HTTP exchanges (the `gen_ai.*` attributes).

mod bytes;
mod framing;
pub mod genai;
mod grpc;
pub mod http;
pub mod http2;
pub mod mongo;
pub mod mysql;
pub mod postgres;
pub mod redis;
mod sql;

use serde_json::{Map, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Http2,
    Postgres,
    Mysql,
    Redis,
    Mongo,
}

impl Protocol {
    pub const ALL: [Protocol; 6] = [
        Protocol::Http,
        Protocol::Http2,
        Protocol::Postgres,
        Protocol::Mysql,
        Protocol::Redis,
        Protocol::Mongo,
    ];

    /// Its name in counters and metric labels (the serialized form).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Postgres => "postgres",
            Protocol::Mysql => "mysql",
            Protocol::Redis => "redis",
            Protocol::Mongo => "mongo",
        }
    }

    /// `db.system` of the SDK's database spans.
    pub fn db_system(self) -> Option<&'static str> {
        match self {
            Protocol::Http | Protocol::Http2 => None,
            Protocol::Postgres => Some("postgresql"),
            Protocol::Mysql => Some("mysql"),
            Protocol::Redis => Some("redis"),
            Protocol::Mongo => Some("mongodb"),
        }
    }
}

/// Which end of the connection sent the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// Bytes the client sent: requests, queries, commands.
    Client,
    /// Bytes the server sent: responses, results, replies.
    Server,
}

impl Side {
    pub fn opposite(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

/// Span status, as the SDK reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum StatusCode {
    #[default]
    Unset,
    Ok,
    Error,
}

/// One request and its response, as the parser understood them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Op {
    /// Span name: `POST`, `SELECT`, `GET`, `find` …
    pub name: String,
    /// OTel attributes under the SDK's names (`http.method`, `db.statement`,
    /// `db.operation`, `db.name`, `db.user` …). Connection-level attributes (`net.peer.*`,
    /// `db.system`) are added by the span builder.
    pub attributes: Map<String, Value>,
    /// HTTP only: headers in the order they came (names as sent).
    pub request_headers: Option<Vec<(String, String)>>,
    pub response_headers: Option<Vec<(String, String)>>,
    /// HTTP only: body bytes as captured, at most `max_body`; `*_body_complete` is false
    /// when bytes were cut or lost.
    pub request_body: Option<Vec<u8>>,
    pub response_body: Option<Vec<u8>>,
    pub status: StatusCode,
    /// Why the status is ERROR (the server's message), when it is.
    pub status_description: Option<String>,
    /// Kernel timestamps (CLOCK_MONOTONIC ns) of the first request byte and of the last
    /// response byte.
    pub start_ts: u64,
    pub end_ts: u64,
}

impl Op {
    pub fn attr(&mut self, key: &str, value: impl Into<Value>) {
        self.attributes.insert(key.to_string(), value.into());
    }
}

#[derive(Clone, Debug)]
pub struct ParserConfig {
    /// Most body bytes kept per HTTP message.
    pub max_body: usize,
    /// Most characters kept of a statement or command (`db.statement`).
    pub max_statement: usize,
    /// Most bytes buffered per direction while a message is incomplete.
    pub max_buffer: usize,
}

impl Default for ParserConfig {
    fn default() -> Self {
        Self {
            max_body: 64 * 1024,
            max_statement: 4096,
            max_buffer: 1 << 20,
        }
    }
}

/// Why a parser lost messages. Every loss is counted under exactly one reason, per
/// protocol, and shown in the summaries and `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Loss {
    /// Bytes that do not parse as the protocol: malformed, or the middle of a message
    /// (watching began mid-stream). The parser skips to the next message it can frame.
    Malformed,
    /// Bytes the capture did not deliver (the payload limit cut a call, the ring buffer
    /// dropped a record) where the message boundaries were not known.
    Gap,
    /// A response whose request was not seen (it was sent before watching began, or lost),
    /// or a request whose response could not be told apart from another's: dropped
    /// rather than paired by a guess.
    Unpaired,
    /// A message over the parser's buffer limit, or more requests waiting than it keeps.
    Oversize,
}

impl Loss {
    pub const ALL: [Loss; 4] = [Loss::Malformed, Loss::Gap, Loss::Unpaired, Loss::Oversize];

    /// Its name in counters and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Loss::Malformed => "malformed",
            Loss::Gap => "gap",
            Loss::Unpaired => "unpaired",
            Loss::Oversize => "oversize",
        }
    }
}

/// A parser's losses so far, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Losses([u64; 4]);

impl Losses {
    pub fn add(&mut self, why: Loss) {
        self.0[why as usize] += 1;
    }

    /// Adds another parser's losses (a connection that changed protocol midway).
    pub fn add_all(&mut self, other: &Losses) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
    }

    pub fn get(&self, why: Loss) -> u64 {
        self.0[why as usize]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Losses in `self` not yet in `before` (a parser's counts only grow).
    pub fn since(&self, before: &Losses) -> impl Iterator<Item = (Loss, u64)> + '_ {
        let before = *before;
        Loss::ALL
            .into_iter()
            .map(move |l| (l, self.get(l).saturating_sub(before.get(l))))
            .filter(|(_, n)| *n > 0)
    }
}

pub trait Parser: Send {
    fn protocol(&self) -> Protocol;
    /// Bytes of one direction, in stream order. `ts` is the kernel timestamp of the call
    /// that moved them.
    fn feed(&mut self, side: Side, data: &[u8], ts: u64, out: &mut Vec<Op>);
    /// `n` bytes of this direction were not captured (the capture limit cut a call):
    /// the parser skips them, or resynchronises, or gives up on the connection.
    fn gap(&mut self, side: Side, n: u64, ts: u64, out: &mut Vec<Op>);
    /// The connection closed: finish what can be finished (a close-delimited HTTP body,
    /// a request that never got its response).
    fn close(&mut self, ts: u64, out: &mut Vec<Op>);
    /// The connection was open before watching began, told before the first byte is
    /// fed: requests may have gone unseen and each side may start in a message's middle,
    /// so the parser must not take the first response it meets for the answer to the
    /// first request it sees. MongoDB's parser, which pairs by request id, leaves it.
    fn watched_midstream(&mut self) {}
    /// Messages that could not be parsed (malformed, truncated, out of sync).
    fn unparsed(&self) -> u64;
    /// The same losses, by reason. Parsers that do not tell reasons apart report them
    /// all as malformed.
    fn losses(&self) -> Losses {
        let mut l = Losses::default();
        l.0[Loss::Malformed as usize] = self.unparsed();
        l
    }
}

pub fn new_parser(protocol: Protocol, cfg: &ParserConfig) -> Box<dyn Parser> {
    match protocol {
        Protocol::Http => Box::new(http::HttpParser::new(cfg.clone())),
        Protocol::Http2 => Box::new(http2::Http2Parser::new(cfg.clone())),
        Protocol::Postgres => Box::new(postgres::PostgresParser::new(cfg.clone())),
        Protocol::Mysql => Box::new(mysql::MysqlParser::new(cfg.clone())),
        Protocol::Redis => Box::new(redis::RedisParser::new(cfg.clone())),
        Protocol::Mongo => Box::new(mongo::MongoParser::new(cfg.clone())),
    }
}

/// Recognises a protocol from the first bytes one side sent — by content, not by port.
/// MySQL is recognised from the server's greeting (the server speaks first); the others
/// from the client's first message. `None`: not (yet) recognisable.
pub fn detect(side: Side, first: &[u8]) -> Option<Protocol> {
    match side {
        Side::Client => {
            if http::looks_like_request(first) {
                Some(Protocol::Http)
            } else if http2::looks_like_preface(first) {
                Some(Protocol::Http2)
            } else if postgres::looks_like_startup(first) {
                Some(Protocol::Postgres)
            } else if redis::looks_like_command(first) {
                Some(Protocol::Redis)
            } else if mongo::looks_like_message(first) {
                Some(Protocol::Mongo)
            } else if postgres::looks_like_request_midstream(first) {
                // Last: only a connection seen from its middle starts with a typed message
                // (PostgreSQL) or a command packet (MySQL, whose greeting was missed).
                Some(Protocol::Postgres)
            } else if mysql::looks_like_command_midstream(first) {
                Some(Protocol::Mysql)
            } else {
                None
            }
        }
        Side::Server => {
            if mysql::looks_like_greeting(first) {
                Some(Protocol::Mysql)
            } else {
                None
            }
        }
    }
}

/// Whether a client's first write asks the server to switch the connection to TLS
/// in-band (PostgreSQL's SSLRequest): the answer is cleartext, and what follows it on
/// the socket is the TLS handshake, however it looks.
pub fn asks_for_tls_upgrade(first: &[u8]) -> bool {
    postgres::is_ssl_request(first)
}

/// Truncates a statement to `max` characters on a character boundary, marking the cut.
pub fn truncate_statement(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...[truncated]", &s[..i]),
        None => s.to_string(),
    }
}

/// The parser the fuzz drivers feed: small limits, so inputs reach them.
fn fuzz_parser(protocol: Protocol) -> Box<dyn Parser> {
    new_parser(
        protocol,
        &ParserConfig {
            max_body: 4096,
            max_statement: 256,
            max_buffer: 64 * 1024,
        },
    )
}

/// How the fuzz drivers lay out `rest`: pieces `(i, start, end, side, size)` whose sizes
/// and sides the seed byte chooses (`end` is cut at `len`, `size` is not).
fn fuzz_pieces(seed: u8, len: usize) -> impl Iterator<Item = (u64, usize, usize, Side, usize)> {
    let mut pos = 0;
    let mut i = 0u64;
    std::iter::from_fn(move || {
        if pos >= len {
            return None;
        }
        let size = 1
            + ((seed as usize)
                .wrapping_mul(31)
                .wrapping_add(i as usize * 7)
                % 97);
        let end = (pos + size).min(len);
        let side = if (seed >> (i % 8)) & 1 == 0 {
            Side::Client
        } else {
            Side::Server
        };
        let piece = (i, pos, end, side, size);
        pos = end;
        i += 1;
        Some(piece)
    })
}

/// Fuzzing driver shared by the cargo-fuzz targets: the input's first byte chooses
/// piece sizes, the rest is split into alternating client and server pieces (with an
/// occasional gap) and fed to a fresh parser. Must never panic.
pub fn fuzz_one(protocol: Protocol, input: &[u8]) -> usize {
    let Some((&seed, rest)) = input.split_first() else {
        return 0;
    };
    let mut p = fuzz_parser(protocol);
    let mut out = Vec::new();
    let mut pieces = 0;
    for (i, pos, end, side, size) in fuzz_pieces(seed, rest.len()) {
        if seed % 13 == 0 && i % 5 == 4 {
            p.gap(side, size as u64, i, &mut out);
        } else {
            p.feed(side, &rest[pos..end], i, &mut out);
        }
        pieces = i + 1;
    }
    p.close(pieces, &mut out);
    let _ = p.unparsed();
    out.len()
}

/// The pieces [`fuzz_one`] lays out, fed as capture feeds a parser that began watching
/// mid-stream and loses bytes: from a byte offset on, and with every n-th piece's tail
/// lost to a capture gap; half the time told the connection was open before watching
/// began ([`Parser::watched_midstream`]), as the agent tells it. Where, and whether, a
/// hash of the whole input chooses, so the fuzzer's mutations move them while a seed's
/// pieces (its sides) stay as laid out. Must never panic.
pub fn fuzz_resync(protocol: Protocol, input: &[u8]) -> usize {
    let Some((&seed, rest)) = input.split_first() else {
        return 0;
    };
    // FNV-1a.
    let h = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let start = (h % (rest.len() as u64 + 1)) as usize;
    let gap_every = 2 + (h >> 32) % 7;
    let mut p = fuzz_parser(protocol);
    if (h >> 48) & 1 == 1 {
        p.watched_midstream();
    }
    let mut out = Vec::new();
    let mut pieces = 0;
    for (i, pos, end, side, _) in fuzz_pieces(seed, rest.len()) {
        let from = pos.max(start);
        if from < end {
            if i % gap_every == gap_every - 1 {
                let cut = from + (end - from) / 2;
                p.feed(side, &rest[from..cut], i, &mut out);
                p.gap(side, (end - cut) as u64, i, &mut out);
            } else {
                p.feed(side, &rest[from..end], i, &mut out);
            }
        }
        pieces = i + 1;
    }
    p.close(pieces, &mut out);
    let _ = p.losses();
    out.len()
}

/// Scripts for the parsers' unit tests: (side, bytes, timestamp) pieces fed in order.
#[cfg(test)]
pub(crate) mod scripts {
    use super::*;

    pub type Script = Vec<(Side, Vec<u8>, u64)>;

    /// When the scripts' connections close.
    const CLOSED_AT: u64 = 1000;

    /// Feeds a script to a fresh parser, whole pieces or one byte at a time, then closes
    /// it: the ops and the unparsed count.
    pub fn run_with(
        protocol: Protocol,
        cfg: ParserConfig,
        script: &Script,
        byte_at_a_time: bool,
    ) -> (Vec<Op>, u64) {
        let mut p = new_parser(protocol, &cfg);
        let mut out = Vec::new();
        for (side, data, ts) in script {
            if byte_at_a_time {
                for b in data {
                    p.feed(*side, std::slice::from_ref(b), *ts, &mut out);
                }
            } else {
                p.feed(*side, data, *ts, &mut out);
            }
        }
        p.close(1000, &mut out);
        (out, p.unparsed())
    }

    /// Runs the script whole and one byte at a time; both must agree and parse cleanly.
    pub fn run(protocol: Protocol, script: &Script) -> Vec<Op> {
        let (whole, unparsed) = run_with(protocol, ParserConfig::default(), script, false);
        let (bytes, unparsed_bytes) = run_with(protocol, ParserConfig::default(), script, true);
        assert_eq!(
            whole, bytes,
            "byte-at-a-time feeding must give the same ops"
        );
        assert_eq!((unparsed, unparsed_bytes), (0, 0));
        whole
    }

    /// How a stream that began at a byte offset is fed: whole, from there on (watching
    /// began mid-stream), the same with the parser told the connection was open before
    /// ([`Parser::watched_midstream`], as the agent tells it), or with the rest of that
    /// piece lost (a capture gap).
    #[derive(Clone, Copy, Debug)]
    pub enum Cut {
        Start,
        Midstream,
        Gap,
    }

    /// For every byte offset of `script` (its pieces laid end to end): the stream cut
    /// there as `cut` says, fed whole-piece to a fresh parser. Every op of the clean run
    /// whose request began in a later piece must come out the same (same request, same
    /// response: nothing paired wrongly, nothing missing), and no op may come out that
    /// the clean run does not have — except one whose request began in the piece that
    /// was cut. Ops are told apart by their start timestamp (and, within one piece, by
    /// their order). Returns how many exchanges were checked in all.
    pub fn every_offset(protocol: Protocol, script: &Script, cut: Cut) -> usize {
        every_offset_with(protocol, script, cut, |_, _| {})
    }

    /// [`every_offset`], where a parser cut off from the stream's start cannot know
    /// everything the clean run learnt there (the user and database named at login, the
    /// text of a statement prepared before the cut): `unknowable(got, want)` erases from
    /// the clean run's op what the cut run's op could not know, before they are compared.
    /// What pairs the exchange (its timestamps, status, row count, error) must still be
    /// the same.
    pub fn every_offset_with(
        protocol: Protocol,
        script: &Script,
        cut: Cut,
        unknowable: fn(&Op, &mut Op),
    ) -> usize {
        let (clean, _) = run_with(protocol, ParserConfig::default(), script, false);
        let by_start: std::collections::HashMap<(u64, usize), &Op> =
            keyed(&clean).into_iter().zip(&clean).collect();
        let total: usize = script.iter().map(|(_, b, _)| b.len()).sum();
        let mut checked = 0;
        for k in 0..total {
            // The piece holding offset k, and where in it k falls.
            let (mut i, mut at) = (0, k);
            while at >= script[i].1.len() {
                at -= script[i].1.len();
                i += 1;
            }
            let cut_ts = script[i].2;
            let mut p = new_parser(protocol, &ParserConfig::default());
            let mut out = Vec::new();
            match cut {
                Cut::Start | Cut::Midstream => {
                    if matches!(cut, Cut::Midstream) {
                        p.watched_midstream();
                    }
                    let (side, data, ts) = &script[i];
                    p.feed(*side, &data[at..], *ts, &mut out);
                }
                Cut::Gap => {
                    for (side, data, ts) in &script[..i] {
                        p.feed(*side, data, *ts, &mut out);
                    }
                    let (side, data, ts) = &script[i];
                    p.feed(*side, &data[..at], *ts, &mut out);
                    p.gap(*side, (data.len() - at) as u64, *ts, &mut out);
                }
            }
            for (side, data, ts) in &script[i + 1..] {
                p.feed(*side, data, *ts, &mut out);
            }
            p.close(1000, &mut out);
            let clean_start = at == 0 && !matches!(cut, Cut::Gap);
            let mut seen = std::collections::HashSet::new();
            for (key, op) in keyed(&out).into_iter().zip(&out) {
                let partial = op.start_ts == cut_ts && !clean_start
                    || matches!(cut, Cut::Gap) && op.start_ts <= cut_ts;
                if partial {
                    // Cut through, or answered across the hole: it may be partial, but
                    // never another exchange's.
                    if let Some(want) = by_start.get(&key) {
                        let mut want = (*want).clone();
                        unknowable(op, &mut want);
                        // Its end may have been lost (status unknown, reported early),
                        // but an error or an end after its own is another's.
                        assert!(
                            op.name == want.name
                                && (op.status == want.status || op.status == StatusCode::Unset)
                                && op.end_ts <= want.end_ts,
                            "offset {k} ({cut:?}): a cut op answered by another's response: \
                             {op:?}\nwant: {want:?}"
                        );
                    }
                    continue;
                }
                let Some(want) = by_start.get(&key) else {
                    // An exchange that began before the cut (an extended query's Parse)
                    // seen from its later messages on: it must end as that one ended.
                    let seen_from_its_middle = clean.iter().any(|w| {
                        w.start_ts <= cut_ts
                            && w.start_ts < op.start_ts
                            && w.end_ts == op.end_ts
                            && (w.status == op.status || op.status == StatusCode::Unset)
                    });
                    assert!(
                        seen_from_its_middle,
                        "offset {k} ({cut:?}): an op the clean run does not have: {op:?}"
                    );
                    continue;
                };
                let mut want = (*want).clone();
                unknowable(op, &mut want);
                assert_eq!(
                    *op, want,
                    "offset {k} ({cut:?}): op differs from the clean run's (paired wrongly?)"
                );
                seen.insert(key);
            }
            // Nothing lost silently: when an exchange the clean run reports is missing
            // here (not even seen from its middle), and some of its bytes were fed, or
            // lost to the gap, the parser counted a loss.
            let out_keys: std::collections::HashSet<_> = keyed(&out).into_iter().collect();
            let missing = keyed(&clean).into_iter().zip(&clean).find(|(key, w)| {
                let touched = match cut {
                    Cut::Start | Cut::Midstream => w.end_ts > cut_ts,
                    Cut::Gap => w.end_ts >= cut_ts,
                };
                touched
                    && !out_keys.contains(key)
                    && !out
                        .iter()
                        .any(|o| o.end_ts == w.end_ts && o.start_ts >= w.start_ts)
            });
            if let Some((_, w)) = missing {
                assert!(
                    p.losses().total() > 0,
                    "offset {k} ({cut:?}): an exchange was lost and no loss counted: {w:?}"
                );
            }
            // Nothing counted twice: each exchange of the clean run the cut lost is
            // counted once, under one reason; a cut that lost no whole exchange (bytes
            // between messages, part of a body) is counted at most once.
            let lost = keyed(&clean)
                .into_iter()
                .zip(&clean)
                .filter(|(key, w)| w.end_ts >= cut_ts && !out_keys.contains(key))
                .count() as u64;
            assert!(
                p.losses().total() <= lost.max(1),
                "offset {k} ({cut:?}): {lost} exchange(s) lost, counted {} times: {:?}",
                p.losses().total(),
                p.losses()
            );
            for (key, op) in keyed(&clean).into_iter().zip(&clean) {
                if op.start_ts > cut_ts || clean_start && op.start_ts == cut_ts {
                    assert!(
                        seen.contains(&key),
                        "offset {k} ({cut:?}): a later exchange is missing: {op:?}\ngot: {out:?}"
                    );
                    checked += 1;
                }
            }
        }
        checked
    }

    /// A connection watched from its middle ([`Parser::watched_midstream`]), the client
    /// side captured first: `requests[0]` seen without its answer (read before the read
    /// side was probed), `requests[1]`, then `answer`. Which one it answers cannot be
    /// told: both are dropped, each counted `unpaired`; then `requests[2]` and `answer`
    /// pair by order. Returns that op, checked to be the only one, from piece 5 to 6.
    pub fn an_answer_missed_at_a_midstream_start(
        protocol: Protocol,
        requests: [&[u8]; 3],
        answer: &[u8],
    ) -> Op {
        let mut p = new_parser(protocol, &ParserConfig::default());
        p.watched_midstream();
        let mut out = Vec::new();
        p.feed(Side::Client, requests[0], 1, &mut out);
        p.feed(Side::Client, requests[1], 3, &mut out);
        p.feed(Side::Server, answer, 4, &mut out);
        assert!(out.is_empty(), "{out:#?}");
        assert_eq!(p.losses().get(Loss::Unpaired), 2, "{:?}", p.losses());
        p.feed(Side::Client, requests[2], 5, &mut out);
        p.feed(Side::Server, answer, 6, &mut out);
        p.close(7, &mut out);
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!((out[0].start_ts, out[0].end_ts), (5, 6));
        assert_eq!(p.losses().total(), 2, "{:?}", p.losses());
        out.remove(0)
    }

    /// Which side of a connection watched from its middle is captured first.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum First {
        /// The server's (the client reads before it writes): the order the agent
        /// attaches the libssl probes in.
        Server,
        /// Either.
        Either,
    }

    /// A connection watched from its middle while the TLS probes attach one libssl
    /// function after another: for every pair of pieces `(w, r)` (`r <= w` when the
    /// server side is `first`), the client's pieces from `w` on and the server's from
    /// `r` on, with nothing to say the others were missed, fed to a parser told the
    /// connection was open before ([`Parser::watched_midstream`]). No op may carry
    /// another exchange's answer: each is the clean run's op of the same start (modulo
    /// `unknowable`), or that op cut short (its status unknown, an end no later than
    /// its own, or none: still unanswered at the close, or reported ended where its
    /// answer was lost). Returns how many ops were checked.
    pub fn one_side_first(
        protocol: Protocol,
        script: &Script,
        first: First,
        unknowable: fn(&Op, &mut Op),
    ) -> usize {
        let (clean, _) = run_with(protocol, ParserConfig::default(), script, false);
        let by_start: std::collections::HashMap<(u64, usize), &Op> =
            keyed(&clean).into_iter().zip(&clean).collect();
        let mut checked = 0;
        for w in 0..script.len() {
            let last_r = if first == First::Server {
                w
            } else {
                script.len() - 1
            };
            for r in 0..=last_r {
                let mut p = new_parser(protocol, &ParserConfig::default());
                p.watched_midstream();
                let mut out = Vec::new();
                for (i, (side, data, ts)) in script.iter().enumerate() {
                    if i >= if *side == Side::Client { w } else { r } {
                        p.feed(*side, data, *ts, &mut out);
                    }
                }
                p.close(CLOSED_AT, &mut out);
                for (key, op) in keyed(&out).into_iter().zip(&out) {
                    let Some(want) = by_start.get(&key) else {
                        // An exchange seen from its later messages on ends as it ended, or
                        // is still unanswered at the close (nothing of an answer on it).
                        let unanswered = op.end_ts == CLOSED_AT
                            && op.status == StatusCode::Unset
                            && !op.attributes.contains_key("db.rowcount");
                        assert!(
                            clean.iter().any(|c| c.start_ts < op.start_ts
                                && (c.end_ts == op.end_ts
                                    && (c.status == op.status || op.status == StatusCode::Unset)
                                    || unanswered)),
                            "client from piece {w}, server from {r}: an op the clean run does not have: {op:?}"
                        );
                        continue;
                    };
                    let mut want = (*want).clone();
                    unknowable(op, &mut want);
                    assert!(
                        *op == want
                            || op.name == want.name
                                && op.status == StatusCode::Unset
                                && (op.end_ts <= want.end_ts
                                    || op.end_ts == CLOSED_AT
                                    || cut_short(op)),
                        "client from piece {w}, server from {r}: paired wrongly: {op:?}\nwant: {want:?}"
                    );
                    checked += 1;
                }
            }
        }
        checked
    }

    /// An op reported as ended where its answer was lost (`db.response_truncated`),
    /// with nothing of an answer on it.
    fn cut_short(op: &Op) -> bool {
        op.attributes.get("db.response_truncated") == Some(&serde_json::Value::Bool(true))
            && !op.attributes.contains_key("db.rowcount")
    }

    /// Ops told apart by their start timestamp and, among ops that started in the same
    /// piece (a pipeline), by their order.
    fn keyed(ops: &[Op]) -> Vec<(u64, usize)> {
        let mut n = std::collections::HashMap::new();
        ops.iter()
            .map(|op| {
                let i = n.entry(op.start_ts).or_insert(0);
                *i += 1;
                (op.start_ts, *i - 1)
            })
            .collect()
    }

    /// What a SQL parser that began after the login, or after a statement was prepared,
    /// cannot know: the user and database the login named, and the prepared statement's
    /// text (its op is then named by the fallback, `EXECUTE`).
    pub fn sql_unknowable(got: &Op, want: &mut Op) {
        for key in ["db.user", "db.name"] {
            if !got.attributes.contains_key(key) {
                want.attributes.remove(key);
            }
        }
        let statement = |op: &Op| {
            op.attributes
                .get("db.statement")
                .and_then(|s| s.as_str())
                .map(str::to_owned)
        };
        // A statement cut by a gap in its own message keeps what came before the gap.
        let cut = match (statement(got), statement(want)) {
            (None, _) => true,
            (Some(g), Some(w)) => g.len() < w.len() && w.starts_with(&g),
            (Some(_), None) => false,
        };
        if cut {
            want.name.clone_from(&got.name);
            for key in ["db.statement", "db.operation"] {
                match got.attributes.get(key) {
                    Some(v) => want.attributes.insert(key.to_string(), v.clone()),
                    None => want.attributes.remove(key),
                };
            }
        }
    }

    /// A recorded session: one line per piece, `C <hex>` (client) or `S <hex>` (server),
    /// stamped 1, 2, 3 …
    pub fn recording(text: &str) -> Script {
        text.lines()
            .enumerate()
            .map(|(i, line)| {
                let (side, hex) = line.split_once(' ').unwrap();
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|j| u8::from_str_radix(&hex[j..j + 2], 16).unwrap())
                    .collect();
                let side = if side == "C" {
                    Side::Client
                } else {
                    Side::Server
                };
                (side, bytes, i as u64 + 1)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_is_by_content() {
        assert_eq!(
            detect(Side::Client, b"GET / HTTP/1.1\r\n"),
            Some(Protocol::Http)
        );
        assert_eq!(
            detect(Side::Client, b"*1\r\n$4\r\nPING\r\n"),
            Some(Protocol::Redis)
        );
        assert_eq!(
            detect(Side::Client, b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
            Some(Protocol::Postgres)
        );
        assert_eq!(
            detect(Side::Server, b"\x50\x00\x00\x00\x0a10.11.6-MariaDB\x00"),
            Some(Protocol::Mysql)
        );
        assert_eq!(
            detect(Side::Client, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04"),
            Some(Protocol::Http2)
        );
        // A MySQL connection watched after its greeting: a query packet.
        assert_eq!(
            detect(Side::Client, b"\x09\x00\x00\x00\x03SELECT 1"),
            Some(Protocol::Mysql)
        );
        // A preface still arriving: not yet recognisable, and not HTTP/1.1.
        assert_eq!(detect(Side::Client, b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(detect(Side::Client, b"hello"), None);
    }

    #[test]
    fn tls_upgrade_requests_are_recognised_exactly() {
        let ssl_request = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert!(asks_for_tls_upgrade(&ssl_request));
        // GSSENCRequest, a longer write, a cut one: not an SSLRequest.
        assert!(!asks_for_tls_upgrade(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]));
        assert!(!asks_for_tls_upgrade(&[&ssl_request[..], b"x"].concat()));
        assert!(!asks_for_tls_upgrade(&ssl_request[..7]));
    }

    #[test]
    fn statements_are_cut_on_char_boundaries() {
        assert_eq!(truncate_statement("héllo", 2), "hé...[truncated]");
        assert_eq!(truncate_statement("hi", 2), "hi");
    }

    #[test]
    fn fuzz_driver_survives_noise() {
        for p in Protocol::ALL {
            for n in 0..64u8 {
                let input: Vec<u8> = (0..300u32)
                    .map(|i| (i as u8).wrapping_mul(n).wrapping_add(n))
                    .collect();
                fuzz_one(p, &input);
                fuzz_resync(p, &input);
            }
        }
    }
}
