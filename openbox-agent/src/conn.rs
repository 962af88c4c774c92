//! Descriptor tables, connection streams and their reassembly, and the linking of TLS
//! plaintext to the socket that carries it.
//!
//! [`Tracker`] is a state machine over decoded kernel events: it owns no I/O. What it
//! needs from the system (a process's cwd, a socket's peer) it asks through [`ProcEnv`];
//! what the caller must do to the kernel maps it returns as [`Action`]s; what a user
//! sees it returns as [`Record`]s.

use std::collections::VecDeque;

use hashbrown::HashMap;

use openbox_common::*;

use crate::{
    capture::event::{Addr, Body, Data, Event, Transfer},
    protocol,
};

pub type Pid = u32;
type FdKey = (Pid, i32);

/// What the tracker asks of the system.
pub trait ProcEnv {
    /// Current working directory of a process.
    fn cwd(&self, pid: Pid) -> Option<String>;
    /// The path a descriptor refers to (readlink of /proc/PID/fd/FD).
    fn fd_path(&self, pid: Pid, fd: i32) -> Option<String>;
    /// Local and remote address of a socket descriptor.
    fn socket_addrs(&self, pid: Pid, fd: i32) -> (Option<Addr>, Option<Addr>);
}

/// What the caller must do to the kernel state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Stop copying payload for this incarnation (generation) of a descriptor: TLS
    /// ciphertext.
    NoPayload(Pid, i32, u64),
    /// Stop reporting this incarnation of a descriptor: a noise path.
    Quiet(Pid, i32, u64),
    /// The descriptor closed: drop the flags set on that incarnation.
    ClearFlags(Pid, i32, u64),
    /// Forget these descriptors in the kernel unless recreated after `before` (the
    /// process exited).
    ForgetFds {
        pid: Pid,
        fds: Vec<i32>,
        before: u64,
    },
    /// A TLS library was opened: attach uprobes to it, then resume `paused` if set.
    AttachTls {
        pid: Pid,
        path: String,
        paused: bool,
    },
    /// The process replaced its image at `at`: re-read its descriptors and libraries.
    Resync { pid: Pid, at: u64 },
    /// A new child process, forked at `at`: seed the descriptors it inherited (and, if
    /// its parent has TLS probes, probe the libssl copies it maps).
    Seed { child: Pid, parent: Pid, at: u64 },
    /// A forked child stopped itself until it has TLS probes of its own: attach them,
    /// then resume it.
    ProbeTls(Pid),
    /// The process exited: remove it from the watched set.
    Unwatch(Pid),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Egress,
    Ingress,
}

impl Direction {
    fn from_raw(d: u32) -> Direction {
        if d == DIR_EGRESS {
            Direction::Egress
        } else {
            Direction::Ingress
        }
    }
    fn idx(&self) -> usize {
        match self {
            Direction::Egress => 0,
            Direction::Ingress => 1,
        }
    }
}

/// Which worker activity a record belongs to, as the kernel saw it: the worker
/// (`owner`, host tgid) and the token its hook published for the running activity.
/// Zero means no exact evidence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Attribution {
    pub owner: u32,
    pub activity: u64,
}

impl Attribution {
    pub fn of(h: &openbox_common::EventHeader) -> Attribution {
        if h.owner == 0 || h.activity == 0 {
            return Attribution::default();
        }
        Attribution {
            owner: h.owner,
            activity: h.activity,
        }
    }
    pub fn is_some(&self) -> bool {
        self.activity != 0
    }
}

/// What the user sees.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Exec {
        ts: u64,
        pid: Pid,
        path: String,
        comm: String,
    },
    Fork {
        ts: u64,
        pid: Pid,
        child: Pid,
    },
    Exit {
        ts: u64,
        pid: Pid,
        comm: String,
    },
    Connect {
        ts: u64,
        accept: bool,
        pid: Pid,
        tid: u32,
        fd: i32,
        conn: String,
        peer: Option<Addr>,
        local: Option<Addr>,
        attr: Attribution,
    },
    Data {
        ts: u64,
        pid: Pid,
        tid: u32,
        fd: i32,
        conn: Option<String>,
        peer: Option<Addr>,
        tls: bool,
        direction: Direction,
        /// The syscall or libssl function that moved the bytes.
        via: &'static str,
        seq: u64,
        truncated: u64,
        data: Vec<u8>,
        attr: Attribution,
        /// The bytes were moved by the kernel from this file (sendfile, splice): none
        /// were copied, `truncated` says how many. "pipe" when the source is not a file
        /// the agent follows.
        from_file: Option<String>,
        /// The connection was open before watching began: its first bytes may be the
        /// middle of an exchange, and requests may have gone unseen.
        midstream: bool,
    },
    Close {
        ts: u64,
        pid: Pid,
        fd: i32,
        conn: String,
        peer: Option<Addr>,
        bytes_sent: u64,
        bytes_received: u64,
        tls: bool,
    },
    FileOpen {
        ts: u64,
        pid: Pid,
        fd: i32,
        path: String,
        mode: &'static str,
        attr: Attribution,
    },
    /// One read or write call on a reported file (for file.read/file.write spans; not
    /// printed as a record of its own).
    FileIo {
        ts: u64,
        pid: Pid,
        fd: i32,
        direction: Direction,
        bytes: u64,
        attr: Attribution,
    },
    FileClose {
        ts: u64,
        pid: Pid,
        fd: i32,
        path: String,
        mode: &'static str,
        bytes_read: u64,
        bytes_written: u64,
        reads: u64,
        writes: u64,
    },
}

#[derive(Debug, Default, Clone, Copy)]
struct Stream {
    /// Stream offset where the next call starts.
    next_seq: u64,
    /// Stream offset where the call in progress started.
    call_base: u64,
}

#[derive(Debug)]
struct Conn {
    id: String,
    peer: Option<Addr>,
    /// The socket carries TLS: its raw bytes are ciphertext and never reported.
    tls: bool,
    /// The egress stream began with a PostgreSQL SSLRequest: TLS may start after it.
    starttls: bool,
    /// [plaintext-or-cleartext index: 0 socket, 1 TLS plaintext][direction]
    streams: [[Stream; 2]; 2],
    sock_bytes: [u64; 2],
    /// A connect/accept record was printed for it.
    announced: bool,
    /// Generation of the descriptor in the kernel's table, when known.
    gen: Option<u64>,
    /// Flags were set on that generation (to clear at close).
    flagged: bool,
    /// Open before watching began: its first bytes seen are mid-stream.
    midstream: bool,
    /// The SSL object whose plaintext it carries, once linked: a memory-BIO SSL object
    /// is only ever linked to a TLS socket no other SSL object owns.
    ssl: Option<u64>,
}

#[derive(Debug)]
struct File {
    path: String,
    mode: &'static str,
    ignored: bool,
    bytes: [u64; 2],
    calls: [u64; 2],
    gen: Option<u64>,
}

/// A second number for an open connection or file (dup, dup2, dup3, fcntl F_DUPFD):
/// its bytes go to the stream of the descriptor it copies.
#[derive(Debug, Clone, Copy)]
struct Alias {
    /// The descriptor whose entry in `conns` or `files` holds the state.
    primary: FdKey,
    /// Generation of the copy in the kernel's table.
    gen: Option<u64>,
    /// Flags were set on that generation (the kernel copies the original's at the dup).
    flagged: bool,
}

#[derive(Debug, Default)]
struct Thread {
    /// The TLS socket this thread last read ciphertext from (memory-BIO TLS reads it,
    /// then decrypts with SSL_read on the same thread).
    last_tls_ingress: Option<FdKey>,
    /// SSL objects whose SSL_write had no socket yet (memory BIO), oldest first. The
    /// next ciphertext this thread writes to a TLS socket that no SSL object owns is
    /// theirs — when there is exactly one of them: with two or more (an event loop
    /// interleaving connections), which one it is would be a guess, so none is linked by
    /// it and their reads link them instead.
    unlinked_writers: VecDeque<u64>,
}

/// Plaintext of an SSL object not yet linked to a socket, kept bounded.
const PENDING_LIMIT: usize = 256 * 1024;

/// SSL objects remembered per thread as written to but not linked (beyond that, the
/// oldest is forgotten: its plaintext still links by its reads).
const UNLINKED_WRITERS: usize = 8;

/// How plaintext found (or did not find) its socket.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TlsLinks {
    /// Ciphertext written to a TLS socket no SSL object owned yet, by a thread with
    /// two or more SSL objects waiting for one: not linked, as it could not be exact.
    pub ambiguous: u64,
    /// libssl calls whose plaintext was reported without a connection (never linked
    /// before the bound on waiting plaintext was reached or the process exited): no
    /// parser sees them.
    pub unlinked_calls: u64,
}

#[derive(Default)]
pub struct Tracker {
    conns: HashMap<FdKey, Conn>,
    files: HashMap<FdKey, File>,
    /// Copies of descriptors in `conns` and `files`.
    aliases: HashMap<FdKey, Alias>,
    ssl_links: HashMap<(Pid, u64), FdKey>,
    threads: HashMap<(Pid, u32), Thread>,
    pending: HashMap<(Pid, u64), VecDeque<(Event, Data)>>,
    pending_bytes: HashMap<(Pid, u64), usize>,
    /// Counts of plaintext that could not be linked exactly.
    pub tls_links: TlsLinks,
    next_conn: u64,
    /// Path prefixes, substrings and suffixes never reported as files.
    pub skip: SkipPaths,
}

#[derive(Debug, Clone)]
pub struct SkipPaths {
    pub prefixes: Vec<String>,
    pub contains: Vec<String>,
    pub suffixes: Vec<String>,
    /// (directory part, suffix): skipped when the path contains the first and ends with
    /// the second — Python's own sources, which its import system reads.
    pub sources: Vec<(String, String)>,
}

impl Default for SkipPaths {
    /// The in-process SDK's skip list: /dev/, /proc/, /sys/, __pycache__, .pyc, .pyo,
    /// .so, .dylib — and versioned shared objects (libssl.so.3), plus the C library's
    /// own configuration and locale reads.
    fn default() -> Self {
        Self {
            prefixes: [
                "/dev/",
                "/proc/",
                "/sys/",
                // What the C library and libssl read for any program (locale data,
                // name-service configuration, the OpenSSL configuration): a subprocess
                // such as curl reads them all before doing the activity's work.
                "/usr/lib/locale/",
                "/usr/share/locale/",
                "/usr/lib/ssl/openssl.cnf",
                "/etc/ld.so.cache",
                "/etc/nsswitch.conf",
                "/etc/passwd",
                "/etc/group",
                "/etc/host.conf",
                "/etc/localtime",
            ]
            .map(String::from)
            .to_vec(),
            contains: vec!["__pycache__".into(), ".so.".into(), "/gconv/".into()],
            suffixes: vec![".pyc".into(), ".pyo".into(), ".so".into(), ".dylib".into()],
            // The SDK patches open() and so never sees the import system read modules;
            // we see every read, and these are not the activity's.
            sources: vec![
                ("/lib/python".into(), ".py".into()),
                ("/lib/python".into(), ".pth".into()),
            ],
        }
    }
}

impl SkipPaths {
    pub fn none() -> Self {
        Self {
            prefixes: vec![],
            contains: vec![],
            suffixes: vec![],
            sources: vec![],
        }
    }
    pub fn skips(&self, path: &str) -> bool {
        self.prefixes.iter().any(|p| path.starts_with(p.as_str()))
            || self.contains.iter().any(|p| path.contains(p.as_str()))
            || self.suffixes.iter().any(|p| path.ends_with(p.as_str()))
            || self
                .sources
                .iter()
                .any(|(d, s)| path.contains(d.as_str()) && path.ends_with(s.as_str()))
    }
}

/// The mode string Python's open() would have used for these flags.
pub fn open_mode(flags: u32) -> &'static str {
    let acc = flags & libc::O_ACCMODE as u32;
    let append = flags & libc::O_APPEND as u32 != 0;
    let trunc = flags & libc::O_TRUNC as u32 != 0;
    let excl =
        flags & (libc::O_EXCL | libc::O_CREAT) as u32 == (libc::O_EXCL | libc::O_CREAT) as u32;
    match acc {
        0 => "r",
        1 if append => "a",
        1 if excl => "x",
        1 => "w",
        _ if append => "a+",
        _ if trunc => "w+",
        _ if excl => "x+",
        _ => "r+",
    }
}

/// The name of a `SRC_*` value.
pub fn source_name(source: u32) -> &'static str {
    match source {
        SRC_READ => "read",
        SRC_WRITE => "write",
        SRC_READV => "readv",
        SRC_WRITEV => "writev",
        SRC_RECVFROM => "recvfrom",
        SRC_SENDTO => "sendto",
        SRC_RECVMSG => "recvmsg",
        SRC_SENDMSG => "sendmsg",
        SRC_SSL_READ => "SSL_read",
        SRC_SSL_READ_EX => "SSL_read_ex",
        SRC_SSL_WRITE => "SSL_write",
        SRC_SSL_WRITE_EX => "SSL_write_ex",
        SRC_PREAD64 => "pread64",
        SRC_PWRITE64 => "pwrite64",
        SRC_PREADV => "preadv",
        SRC_PWRITEV => "pwritev",
        SRC_PREADV2 => "preadv2",
        SRC_PWRITEV2 => "pwritev2",
        SRC_RECVMMSG => "recvmmsg",
        SRC_SENDMMSG => "sendmmsg",
        SRC_SENDFILE => "sendfile",
        SRC_SPLICE => "splice",
        SRC_COPY_FILE_RANGE => "copy_file_range",
        _ => "unknown",
    }
}

/// The first bytes of a TLS record carrying a handshake or alert (RFC 8446 §5.1):
/// content type 21/22, legacy version 3.x.
/// A TLS record of any content type (handshake, alert, change-cipher-spec, application
/// data) with a plausible length: how a connection that was already open when watching
/// began shows it carries TLS.
fn looks_like_tls_record(b: &[u8]) -> bool {
    b.len() >= 5
        && (0x14..=0x17).contains(&b[0])
        && b[1] == 0x03
        && b[2] <= 0x04
        && u16::from_be_bytes([b[3], b[4]]) <= 16384 + 2048
}

fn looks_like_tls(b: &[u8]) -> bool {
    b.len() >= 3 && (b[0] == 0x16 || b[0] == 0x15) && b[1] == 0x03 && b[2] <= 0x04
}

impl Tracker {
    pub fn new(skip: SkipPaths) -> Self {
        Self {
            skip,
            ..Default::default()
        }
    }

    /// The descriptor holding the state of `key`: itself, or the one it is a copy of.
    fn primary(&self, key: FdKey) -> FdKey {
        self.aliases.get(&key).map_or(key, |a| a.primary)
    }

    /// Every number of a descriptor in the kernel's table, with its generation:
    /// `primary` and its copies.
    fn numbers_of(&self, primary: FdKey) -> Vec<(FdKey, Option<u64>)> {
        let own = self
            .conns
            .get(&primary)
            .map(|c| c.gen)
            .or_else(|| self.files.get(&primary).map(|f| f.gen))
            .flatten();
        let mut v = vec![(primary, own)];
        v.extend(
            self.aliases
                .iter()
                .filter(|(_, a)| a.primary == primary)
                .map(|(k, a)| (*k, a.gen)),
        );
        v
    }

    /// Stops payload copies on every number of a connection (TLS ciphertext).
    fn no_payload_everywhere(&mut self, primary: FdKey, actions: &mut Vec<Action>) {
        for (key, gen) in self.numbers_of(primary) {
            let Some(gen) = gen else { continue };
            if key == primary {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.flagged = true;
                }
            } else if let Some(a) = self.aliases.get_mut(&key) {
                a.flagged = true;
            }
            actions.push(Action::NoPayload(key.0, key.1, gen));
        }
    }

    fn new_conn(&mut self, key: FdKey, peer: Option<Addr>, gen: Option<u64>) -> &mut Conn {
        // A number reused for a new connection is no longer a copy of another.
        self.aliases.remove(&key);
        self.next_conn += 1;
        let id = format!("{}:{}:{}", key.0, key.1, self.next_conn);
        self.conns.insert(
            key,
            Conn {
                id,
                peer,
                tls: false,
                starttls: false,
                streams: Default::default(),
                sock_bytes: [0; 2],
                announced: false,
                gen,
                flagged: false,
                midstream: false,
                ssl: None,
            },
        );
        self.conns.get_mut(&key).unwrap()
    }

    /// Registers a descriptor that existed before watching began (from /proc).
    pub fn seed_socket(&mut self, pid: Pid, fd: i32, peer: Option<Addr>, gen: u64) {
        if !self.conns.contains_key(&(pid, fd)) && !self.aliases.contains_key(&(pid, fd)) {
            self.new_conn((pid, fd), peer, Some(gen)).midstream = true;
        }
    }

    /// Registers a file open before watching began; false when it is a noise path.
    pub fn seed_file(&mut self, pid: Pid, fd: i32, path: String, gen: u64) -> bool {
        if let Some(f) = self.files.get(&self.primary((pid, fd))) {
            return !f.ignored;
        }
        let ignored = self.skip.skips(&path);
        self.files.insert(
            (pid, fd),
            File {
                path,
                mode: "r",
                ignored,
                bytes: [0; 2],
                calls: [0; 2],
                gen: Some(gen),
            },
        );
        !ignored
    }

    /// No parser can use this connection's bytes: stop the kernel copying them (when the
    /// descriptor's generation is known, so the flag can only hit this connection).
    pub fn stop_payload(&mut self, conn_id: &str) -> Vec<Action> {
        let Some(key) = self
            .conns
            .iter()
            .find(|(_, c)| c.id == conn_id)
            .map(|(k, _)| *k)
        else {
            return Vec::new();
        };
        let mut actions = Vec::new();
        self.no_payload_everywhere(key, &mut actions);
        actions
    }

    /// A descriptor that vanished without close() (exec closed it): report it closed.
    pub fn close_vanished(
        &mut self,
        pid: Pid,
        fd: i32,
        ts: u64,
        out: &mut Vec<Record>,
        actions: &mut Vec<Action>,
    ) {
        self.close(pid, fd, ts, out, actions);
    }

    /// Descriptors the tracker knows for a process.
    pub fn fds_of(&self, pid: Pid) -> Vec<i32> {
        let mut v: Vec<i32> = self
            .conns
            .keys()
            .chain(self.files.keys())
            .chain(self.aliases.keys())
            .filter(|(p, _)| *p == pid)
            .map(|(_, fd)| *fd)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn handle(
        &mut self,
        ev: Event,
        env: &dyn ProcEnv,
        out: &mut Vec<Record>,
        actions: &mut Vec<Action>,
    ) {
        let h = ev.hdr;
        let (pid, tid, ts) = (h.tgid, h.tid, h.ts_ns);
        match &ev.body {
            Body::Connect(c) | Body::Accept(c) => {
                let accept = matches!(ev.body, Body::Accept(_));
                let (local, remote) = env.socket_addrs(pid, c.fd);
                let peer = match &c.peer {
                    Addr::Unknown(_) => remote,
                    a => Some(a.clone()),
                };
                let conn = self.new_conn((pid, c.fd), peer.clone(), Some(ts));
                conn.announced = true;
                out.push(Record::Connect {
                    ts,
                    accept,
                    pid,
                    tid,
                    fd: c.fd,
                    conn: conn.id.clone(),
                    peer,
                    local,
                    attr: Attribution::of(&h),
                });
            }
            Body::Socket(c) => {
                self.new_conn((pid, c.fd), None, Some(ts));
                if c.ret >= 0 {
                    // socketpair: the second end.
                    self.new_conn((pid, c.ret), None, Some(ts));
                }
            }
            Body::SockData(d) => self.sock_data(&ev, d, env, out, actions),
            Body::TlsData(d) => self.tls_data(&ev, d.clone(), out),
            Body::Close { fd } => self.close(pid, *fd, ts, out, actions),
            Body::FileOpen(f) => {
                let path = self.resolve(pid, f.dirfd, &f.path, env);
                let paused = h.flags & FLAG_PAUSED != 0;
                if paused
                    || path
                        .rsplit('/')
                        .next()
                        .is_some_and(|b| b.contains("libssl"))
                {
                    actions.push(Action::AttachTls {
                        pid,
                        path: path.clone(),
                        paused,
                    });
                }
                let mode = open_mode(f.open_flags);
                // Opening a directory (to list it, or as a dirfd) moves no file bytes.
                let directory = f.open_flags & libc::O_DIRECTORY as u32 != 0;
                let ignored = directory || self.skip.skips(&path);
                if ignored {
                    actions.push(Action::Quiet(pid, f.fd, ts));
                } else {
                    out.push(Record::FileOpen {
                        ts,
                        pid,
                        fd: f.fd,
                        path: path.clone(),
                        mode,
                        attr: Attribution::of(&h),
                    });
                }
                self.aliases.remove(&(pid, f.fd));
                self.files.insert(
                    (pid, f.fd),
                    File {
                        path,
                        mode,
                        ignored,
                        bytes: [0; 2],
                        calls: [0; 2],
                        gen: Some(ts),
                    },
                );
            }
            Body::FileIo(io) => {
                let key = self.primary((pid, io.fd));
                if let Some(file) = self.files.get_mut(&key) {
                    let dir = Direction::from_raw(io.direction);
                    // bytes[0] = written, bytes[1] = read (egress, ingress).
                    file.bytes[dir.idx()] += io.bytes;
                    file.calls[dir.idx()] += 1;
                    if !file.ignored {
                        out.push(Record::FileIo {
                            ts,
                            pid,
                            fd: io.fd,
                            direction: dir,
                            bytes: io.bytes,
                            attr: Attribution::of(&h),
                        });
                    }
                }
            }
            Body::Dup(d) => self.dup(&ev, d.oldfd, d.newfd, d.fd_kind, env, out, actions),
            Body::Transfer(t) => self.transfer(&ev, t, out),
            Body::Exec(p) => {
                out.push(Record::Exec {
                    ts,
                    pid,
                    path: p.path.clone(),
                    comm: p.comm.clone(),
                });
                // Descriptors with O_CLOEXEC vanished without close(): re-read them.
                actions.push(Action::Resync { pid, at: ts });
            }
            Body::Fork(p) => {
                out.push(Record::Fork {
                    ts,
                    pid,
                    child: p.other,
                });
                actions.push(Action::Seed {
                    child: p.other,
                    parent: pid,
                    at: ts,
                });
            }
            Body::TlsWait(_) => actions.push(Action::ProbeTls(pid)),
            Body::Exit(p) => {
                self.flush_pending(pid, out);
                let fds = self.fds_of(pid);
                for fd in &fds {
                    self.close(pid, *fd, ts, out, actions);
                }
                self.threads.retain(|(p, _), _| *p != pid);
                self.ssl_links.retain(|(p, _), _| *p != pid);
                out.push(Record::Exit {
                    ts,
                    pid,
                    comm: p.comm.clone(),
                });
                actions.push(Action::ForgetFds {
                    pid,
                    fds,
                    before: ts,
                });
                actions.push(Action::Unwatch(pid));
            }
        }
    }

    fn resolve(&self, pid: Pid, dirfd: i32, path: &str, env: &dyn ProcEnv) -> String {
        if path.starts_with('/') {
            return path.to_string();
        }
        let base = if dirfd == -100 {
            env.cwd(pid)
        } else {
            env.fd_path(pid, dirfd)
        };
        match base {
            Some(b) => format!(
                "{}/{}",
                b.trim_end_matches('/'),
                path.trim_start_matches("./")
            ),
            None => path.to_string(),
        }
    }

    fn sock_data(
        &mut self,
        ev: &Event,
        d: &Data,
        env: &dyn ProcEnv,
        out: &mut Vec<Record>,
        actions: &mut Vec<Action>,
    ) {
        let h = ev.hdr;
        let key = self.primary((h.tgid, d.fd));
        if !self.conns.contains_key(&key) {
            let (_, remote) = env.socket_addrs(h.tgid, d.fd);
            // Its generation is unknown: no kernel flags will be set on it.
            self.new_conn(key, remote, None).midstream = true;
        }
        let dir = Direction::from_raw(d.direction);
        let i = dir.idx();
        let in_ssl = h.flags & FLAG_IN_SSL != 0;
        let thread = self.threads.entry((h.tgid, h.tid)).or_default();
        let conn = self.conns.get_mut(&key).unwrap();
        let mut became_tls = false;
        let first = d.offset == 0;
        if first {
            conn.sock_bytes[i] += d.call_len;
            let s = &mut conn.streams[0][i];
            s.call_base = s.next_seq;
            if !conn.tls && !in_ssl {
                let at_start = s.call_base == 0;
                // A pooled TLS connection opened before the worker registered shows
                // only application-data records: without this its ciphertext would be
                // taken for cleartext and its plaintext never linked to it.
                if (at_start || conn.starttls) && looks_like_tls(&d.payload)
                    || conn.midstream && looks_like_tls_record(&d.payload)
                {
                    conn.tls = true;
                    became_tls = true;
                } else if at_start
                    && dir == Direction::Egress
                    && protocol::asks_for_tls_upgrade(&d.payload)
                {
                    conn.starttls = true;
                }
            }
        }
        let mut newly_linked = None;
        if in_ssl {
            if !conn.tls {
                conn.tls = true;
                became_tls = true;
            }
            newly_linked = Some(d.ssl);
        } else if conn.tls {
            match dir {
                // Ciphertext of an SSL object already linked here takes no other.
                Direction::Egress if conn.ssl.is_none() && first => {
                    match thread.unlinked_writers.len() {
                        0 => {}
                        1 => newly_linked = thread.unlinked_writers.pop_front(),
                        _ => self.tls_links.ambiguous += 1,
                    }
                }
                Direction::Egress => {}
                Direction::Ingress => thread.last_tls_ingress = Some(key),
            }
        }
        let s = &mut conn.streams[0][i];
        let seq = s.call_base + d.offset;
        if h.flags & FLAG_LAST != 0 {
            s.next_seq = s.call_base + d.call_len;
        }
        if !conn.tls && h.flags & FLAG_NO_PAYLOAD == 0 {
            let truncated = if h.flags & FLAG_LAST != 0 {
                d.call_len.saturating_sub(d.offset + d.payload.len() as u64)
            } else {
                0
            };
            out.push(Record::Data {
                ts: h.ts_ns,
                pid: h.tgid,
                tid: h.tid,
                fd: d.fd,
                conn: Some(conn.id.clone()),
                peer: conn.peer.clone(),
                tls: false,
                direction: dir,
                via: source_name(d.source),
                seq,
                truncated,
                data: d.payload.clone(),
                attr: Attribution::of(&h),
                from_file: None,
                midstream: conn.midstream,
            });
        }
        if became_tls {
            self.no_payload_everywhere(key, actions);
        }
        if let Some(ssl) = newly_linked {
            self.link(h.tgid, ssl, key, out);
        }
    }

    /// Links SSL object `ssl` to socket `key` and reports the plaintext that waited
    /// for it.
    fn link(&mut self, pid: Pid, ssl: u64, key: FdKey, out: &mut Vec<Record>) {
        if ssl == 0 {
            return;
        }
        let before = self.ssl_links.insert((pid, ssl), key);
        if before == Some(key) {
            return;
        }
        if let Some(old) = before.and_then(|k| self.conns.get_mut(&k)) {
            if old.ssl == Some(ssl) {
                old.ssl = None;
            }
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.ssl = Some(ssl);
        }
        self.forget_writer(pid, ssl);
        self.flush_ssl(pid, ssl, out);
    }

    /// `ssl` no longer waits for a socket on any thread of `pid`.
    fn forget_writer(&mut self, pid: Pid, ssl: u64) {
        for ((p, _), t) in self.threads.iter_mut() {
            if *p == pid {
                t.unlinked_writers.retain(|s| *s != ssl);
            }
        }
    }

    /// `newfd` is now a copy of `oldfd` (dup, dup2, dup3, fcntl F_DUPFD*).
    #[expect(clippy::too_many_arguments, reason = "one event's fields")]
    fn dup(
        &mut self,
        ev: &Event,
        oldfd: i32,
        newfd: i32,
        kind: u32,
        env: &dyn ProcEnv,
        out: &mut Vec<Record>,
        actions: &mut Vec<Action>,
    ) {
        let (pid, ts) = (ev.hdr.tgid, ev.hdr.ts_ns);
        // dup2/dup3 closed whatever `newfd` was (the kernel reported it only when it
        // tracked it; the tracker may know it from seeding).
        self.close(pid, newfd, ts, out, actions);
        let mut primary = self.primary((pid, oldfd));
        if !self.conns.contains_key(&primary) && !self.files.contains_key(&primary) {
            // The kernel tracks the original but the tracker missed its start (it was
            // seeded after this copy was made): follow it from here.
            primary = (pid, oldfd);
            match kind {
                FD_SOCKET => {
                    let (_, remote) = env.socket_addrs(pid, oldfd);
                    self.new_conn(primary, remote, None).midstream = true;
                }
                FD_FILE => {
                    let Some(path) = env.fd_path(pid, oldfd) else {
                        return;
                    };
                    let ignored = self.skip.skips(&path);
                    self.files.insert(
                        primary,
                        File {
                            path,
                            mode: "r",
                            ignored,
                            bytes: [0; 2],
                            calls: [0; 2],
                            gen: None,
                        },
                    );
                }
                _ => return,
            }
        }
        // The kernel copied the original's flags to the copy at the dup.
        let flagged = self
            .conns
            .get(&primary)
            .map(|c| c.flagged)
            .or_else(|| self.files.get(&primary).map(|f| f.ignored))
            .unwrap_or(false);
        self.aliases.insert(
            (pid, newfd),
            Alias {
                primary,
                gen: Some(ts),
                flagged,
            },
        );
    }

    /// The original of copied descriptors closed: one copy takes its place, so the
    /// connection or file stays open under its other numbers. Returns false when
    /// `key` has no copies.
    fn promote_copy(&mut self, key: FdKey, actions: &mut Vec<Action>) -> bool {
        let Some(heir) = self
            .aliases
            .iter()
            .filter(|(_, a)| a.primary == key)
            .map(|(k, _)| *k)
            .min()
        else {
            return false;
        };
        let a = self.aliases.remove(&heir).expect("found above");
        for other in self.aliases.values_mut() {
            if other.primary == key {
                other.primary = heir;
            }
        }
        if let Some(mut c) = self.conns.remove(&key) {
            if let (true, Some(gen)) = (c.flagged, c.gen) {
                actions.push(Action::ClearFlags(key.0, key.1, gen));
            }
            c.gen = a.gen;
            c.flagged = a.flagged;
            self.conns.insert(heir, c);
            for k in self.ssl_links.values_mut() {
                if *k == key {
                    *k = heir;
                }
            }
            for t in self.threads.values_mut() {
                if t.last_tls_ingress == Some(key) {
                    t.last_tls_ingress = Some(heir);
                }
            }
        }
        if let Some(mut f) = self.files.remove(&key) {
            if let (true, Some(gen)) = (f.ignored, f.gen) {
                actions.push(Action::ClearFlags(key.0, key.1, gen));
            }
            f.gen = a.gen;
            self.files.insert(heir, f);
        }
        true
    }

    /// Bytes the kernel moved between two descriptors (sendfile, splice,
    /// copy_file_range): counted on a file, and a gap of that length on a connection's
    /// stream, marked with where the bytes came from.
    fn transfer(&mut self, ev: &Event, t: &Transfer, out: &mut Vec<Record>) {
        let h = ev.hdr;
        let pid = h.tgid;
        let in_key = self.primary((pid, t.in_fd));
        let out_key = self.primary((pid, t.out_fd));
        let source_path = self
            .files
            .get(&in_key)
            .map(|f| f.path.clone())
            .unwrap_or_else(|| "pipe".into());
        for (key, fd, dir) in [
            (in_key, t.in_fd, Direction::Ingress),
            (out_key, t.out_fd, Direction::Egress),
        ] {
            if let Some(file) = self.files.get_mut(&key) {
                file.bytes[dir.idx()] += t.bytes;
                file.calls[dir.idx()] += 1;
                if !file.ignored {
                    out.push(Record::FileIo {
                        ts: h.ts_ns,
                        pid,
                        fd,
                        direction: dir,
                        bytes: t.bytes,
                        attr: Attribution::of(&h),
                    });
                }
                continue;
            }
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let i = dir.idx();
            let egress = dir == Direction::Egress;
            conn.sock_bytes[i] += t.bytes;
            let s = &mut conn.streams[0][i];
            s.call_base = s.next_seq;
            s.next_seq += t.bytes;
            if conn.tls {
                // kTLS: the file's bytes are encrypted by the kernel; nothing to say
                // about the plaintext stream.
                continue;
            }
            out.push(Record::Data {
                ts: h.ts_ns,
                pid,
                tid: h.tid,
                fd,
                conn: Some(conn.id.clone()),
                peer: conn.peer.clone(),
                tls: false,
                direction: dir,
                via: source_name(t.source),
                seq: s.call_base,
                truncated: t.bytes,
                data: Vec::new(),
                attr: Attribution::of(&h),
                from_file: egress.then(|| source_path.clone()),
                midstream: conn.midstream,
            });
        }
    }

    fn tls_data(&mut self, ev: &Event, d: Data, out: &mut Vec<Record>) {
        let h = ev.hdr;
        let link = (h.tgid, d.ssl);
        if !self.ssl_links.contains_key(&link) && d.direction == DIR_INGRESS {
            // Memory-BIO TLS: the ciphertext this thread just read is what it decrypts
            // (unless another SSL object owns that socket).
            if let Some(key) = self
                .threads
                .get(&(h.tgid, h.tid))
                .and_then(|t| t.last_tls_ingress)
            {
                if self.conns.get(&key).is_some_and(|c| c.ssl.is_none()) {
                    self.link(h.tgid, d.ssl, key, out);
                }
            }
        }
        if self.ssl_links.contains_key(&link) && !self.pending.contains_key(&link) {
            self.emit_tls(ev, &d, out);
            return;
        }
        if d.direction == DIR_EGRESS && d.offset == 0 && d.ssl != 0 {
            let writers = &mut self
                .threads
                .entry((h.tgid, h.tid))
                .or_default()
                .unlinked_writers;
            if !writers.contains(&d.ssl) {
                if writers.len() == UNLINKED_WRITERS {
                    writers.pop_front();
                }
                writers.push_back(d.ssl);
            }
        }
        let size = self.pending_bytes.entry(link).or_default();
        *size += d.payload.len();
        let over = *size > PENDING_LIMIT;
        self.pending
            .entry(link)
            .or_default()
            .push_back((ev.clone(), d));
        if over {
            // Never linked within the bound: report it without a connection.
            self.flush_ssl(h.tgid, link.1, out);
        }
    }

    /// Emits the plaintext kept for an SSL object, on its connection if now known.
    fn flush_ssl(&mut self, pid: Pid, ssl: u64, out: &mut Vec<Record>) {
        self.pending_bytes.remove(&(pid, ssl));
        if let Some(q) = self.pending.remove(&(pid, ssl)) {
            if !self.ssl_links.contains_key(&(pid, ssl)) {
                self.tls_links.unlinked_calls +=
                    q.iter().filter(|(_, d)| d.offset == 0).count() as u64;
                // Reported without a socket: it waits for none any more.
                self.forget_writer(pid, ssl);
            }
            for (ev, d) in q {
                self.emit_tls(&ev, &d, out);
            }
        }
    }

    fn flush_pending(&mut self, pid: Pid, out: &mut Vec<Record>) {
        let keys: Vec<(Pid, u64)> = self
            .pending
            .keys()
            .filter(|(p, _)| *p == pid)
            .copied()
            .collect();
        for (p, ssl) in keys {
            self.flush_ssl(p, ssl, out);
        }
    }

    fn emit_tls(&mut self, ev: &Event, d: &Data, out: &mut Vec<Record>) {
        let h = ev.hdr;
        let dir = Direction::from_raw(d.direction);
        let i = dir.idx();
        let key = self.ssl_links.get(&(h.tgid, d.ssl)).copied();
        let conn = key.and_then(|k| self.conns.get_mut(&k));
        let truncated = if h.flags & FLAG_LAST != 0 {
            d.call_len.saturating_sub(d.offset + d.payload.len() as u64)
        } else {
            0
        };
        let (conn_id, peer, fd, seq, midstream) = match conn {
            Some(c) => {
                let s = &mut c.streams[1][i];
                if d.offset == 0 {
                    s.call_base = s.next_seq;
                }
                let seq = s.call_base + d.offset;
                if h.flags & FLAG_LAST != 0 {
                    s.next_seq = s.call_base + d.call_len;
                }
                (
                    Some(c.id.clone()),
                    c.peer.clone(),
                    key.map(|k| k.1).unwrap_or(-1),
                    seq,
                    c.midstream,
                )
            }
            None => (None, None, -1, d.offset, false),
        };
        out.push(Record::Data {
            ts: h.ts_ns,
            pid: h.tgid,
            tid: h.tid,
            fd,
            conn: conn_id,
            peer,
            tls: true,
            direction: dir,
            via: source_name(d.source),
            seq,
            truncated,
            data: d.payload.clone(),
            attr: Attribution::of(&h),
            from_file: None,
            midstream,
        });
    }

    fn close(
        &mut self,
        pid: Pid,
        fd: i32,
        ts: u64,
        out: &mut Vec<Record>,
        actions: &mut Vec<Action>,
    ) {
        let key = (pid, fd);
        if let Some(a) = self.aliases.remove(&key) {
            // One number of several closed: the connection or file lives on.
            if let (true, Some(gen)) = (a.flagged, a.gen) {
                actions.push(Action::ClearFlags(pid, fd, gen));
            }
            return;
        }
        if self.promote_copy(key, actions) {
            return;
        }
        if self.conns.contains_key(&key) {
            // Plaintext still waiting for this socket goes out before it closes.
            let ssls: Vec<u64> = self
                .ssl_links
                .iter()
                .filter(|(_, k)| **k == key)
                .map(|((_, s), _)| *s)
                .collect();
            for s in ssls {
                self.flush_ssl(pid, s, out);
            }
            let c = self.conns.remove(&key).expect("checked above");
            if let (true, Some(gen)) = (c.flagged, c.gen) {
                actions.push(Action::ClearFlags(pid, fd, gen));
            }
            self.ssl_links.retain(|_, k| *k != key);
            for t in self.threads.values_mut() {
                if t.last_tls_ingress == Some(key) {
                    t.last_tls_ingress = None;
                }
            }
            // A socket that never connected nor carried a byte (a failed lookup, an
            // unused socketpair) is not worth a line.
            let silent = c.peer.is_none() && c.sock_bytes == [0, 0] && !c.announced;
            if !silent {
                out.push(Record::Close {
                    ts,
                    pid,
                    fd,
                    conn: c.id,
                    peer: c.peer,
                    bytes_sent: c.sock_bytes[0],
                    bytes_received: c.sock_bytes[1],
                    tls: c.tls,
                });
            }
        }
        if let Some(f) = self.files.remove(&key) {
            if let (true, Some(gen)) = (f.ignored, f.gen) {
                actions.push(Action::ClearFlags(pid, fd, gen));
            }
            if !f.ignored {
                out.push(Record::FileClose {
                    ts,
                    pid,
                    fd,
                    path: f.path,
                    mode: f.mode,
                    bytes_read: f.bytes[1],
                    bytes_written: f.bytes[0],
                    reads: f.calls[1],
                    writes: f.calls[0],
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::event::{Conn as ConnBody, FileIo, FileOpen, Proc};

    struct FakeEnv;
    impl ProcEnv for FakeEnv {
        fn cwd(&self, _: Pid) -> Option<String> {
            Some("/work".into())
        }
        fn fd_path(&self, _: Pid, _: i32) -> Option<String> {
            None
        }
        fn socket_addrs(&self, _: Pid, _: i32) -> (Option<Addr>, Option<Addr>) {
            (None, None)
        }
    }

    fn ev(kind: u32, flags: u32, tid: u32, body: Body) -> Event {
        Event {
            hdr: EventHeader {
                kind,
                flags,
                ts_ns: 1,
                tgid: 10,
                tid,
                ..Default::default()
            },
            body,
        }
    }

    fn data(fd: i32, dir: u32, ssl: u64, call_len: u64, offset: u64, payload: &[u8]) -> Data {
        Data {
            fd,
            source: SRC_WRITE,
            ssl,
            call_len,
            offset,
            direction: dir,
            payload: payload.to_vec(),
        }
    }

    fn run(t: &mut Tracker, events: Vec<Event>) -> (Vec<Record>, Vec<Action>) {
        let (mut out, mut actions) = (Vec::new(), Vec::new());
        for e in events {
            t.handle(e, &FakeEnv, &mut out, &mut actions);
        }
        (out, actions)
    }

    fn connect(fd: i32) -> Event {
        let peer = Addr::Inet("127.0.0.1:443".parse().unwrap());
        ev(
            EV_CONNECT,
            0,
            11,
            Body::Connect(ConnBody { fd, ret: 0, peer }),
        )
    }

    fn stream(out: &[Record], tls: bool, want: Direction) -> Vec<u8> {
        let mut segs: Vec<(u64, Vec<u8>)> = out
            .iter()
            .filter_map(|r| match r {
                Record::Data {
                    tls: t,
                    direction,
                    seq,
                    data,
                    ..
                } if *t == tls && *direction == want => Some((*seq, data.clone())),
                _ => None,
            })
            .collect();
        segs.sort_by_key(|s| s.0);
        segs.into_iter().flat_map(|s| s.1).collect()
    }

    #[test]
    fn chunked_calls_reassemble_with_stream_offsets() {
        let mut t = Tracker::new(SkipPaths::default());
        let (out, _) = run(
            &mut t,
            vec![
                connect(3),
                ev(
                    EV_SOCK_DATA,
                    0,
                    11,
                    Body::SockData(data(3, DIR_EGRESS, 0, 6, 0, b"abc")),
                ),
                ev(
                    EV_SOCK_DATA,
                    FLAG_LAST,
                    11,
                    Body::SockData(data(3, DIR_EGRESS, 0, 6, 3, b"def")),
                ),
                ev(
                    EV_SOCK_DATA,
                    FLAG_LAST,
                    11,
                    Body::SockData(data(3, DIR_EGRESS, 0, 2, 0, b"gh")),
                ),
            ],
        );
        assert_eq!(stream(&out, false, Direction::Egress), b"abcdefgh");
        let seqs: Vec<u64> = out
            .iter()
            .filter_map(|r| {
                if let Record::Data { seq, .. } = r {
                    Some(*seq)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(seqs, vec![0, 3, 6]);
    }

    #[test]
    fn a_tls_connection_open_before_watching_began_is_recognised_and_linked() {
        // A pooled TLS connection (asyncpg) opened before the worker registered: the
        // agent only ever sees application-data records on it.
        let mut t = Tracker::new(SkipPaths::default());
        t.seed_socket(10, 6, None, 3);
        let record = [0x17, 0x03, 0x03, 0x00, 0x19, 9, 9, 9, 9, 9];
        let (out, actions) = run(
            &mut t,
            vec![
                ev(
                    EV_TLS_DATA,
                    FLAG_LAST,
                    11,
                    Body::TlsData(data(-1, DIR_EGRESS, 0xdef, 8, 0, b"Q\0\0\0\x07;\0")),
                ),
                ev(
                    EV_SOCK_DATA,
                    FLAG_LAST,
                    11,
                    Body::SockData(data(6, DIR_EGRESS, 0, 10, 0, &record)),
                ),
            ],
        );
        assert!(actions.contains(&Action::NoPayload(10, 6, 3)));
        assert!(stream(&out, false, Direction::Egress).is_empty(), "{out:?}");
        assert_eq!(stream(&out, true, Direction::Egress), b"Q\0\0\0\x07;\0");
    }

    #[test]
    fn ciphertext_is_never_reported_and_memory_bio_plaintext_links_to_its_socket() {
        let mut t = Tracker::new(SkipPaths::default());
        let hello = [0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5];
        let (out, actions) = run(
            &mut t,
            vec![
                connect(5),
                ev(
                    EV_SOCK_DATA,
                    FLAG_LAST,
                    11,
                    Body::SockData(data(5, DIR_EGRESS, 0, 10, 0, &hello)),
                ),
                // SSL_write into a memory BIO, then the transport writes the ciphertext.
                ev(
                    EV_TLS_DATA,
                    FLAG_LAST,
                    11,
                    Body::TlsData(data(-1, DIR_EGRESS, 0xabc, 5, 0, b"GET /")),
                ),
                ev(
                    EV_SOCK_DATA,
                    FLAG_LAST,
                    11,
                    Body::SockData(data(5, DIR_EGRESS, 0, 30, 0, &[0x17; 30])),
                ),
                // Ciphertext read, then SSL_read on the same thread.
                ev(
                    EV_SOCK_DATA,
                    FLAG_LAST,
                    11,
                    Body::SockData(data(5, DIR_INGRESS, 0, 40, 0, &[0x17; 40])),
                ),
                ev(
                    EV_TLS_DATA,
                    FLAG_LAST,
                    11,
                    Body::TlsData(data(-1, DIR_INGRESS, 0xabc, 8, 0, b"HTTP/1.1")),
                ),
            ],
        );
        assert!(actions.contains(&Action::NoPayload(10, 5, 1)));
        assert!(
            stream(&out, false, Direction::Egress).is_empty(),
            "ciphertext reported: {out:?}"
        );
        assert!(stream(&out, false, Direction::Ingress).is_empty());
        assert_eq!(stream(&out, true, Direction::Egress), b"GET /");
        assert_eq!(stream(&out, true, Direction::Ingress), b"HTTP/1.1");
        for r in &out {
            if let Record::Data { conn, fd, .. } = r {
                assert_eq!(conn.as_deref(), Some("10:5:1"));
                assert_eq!(*fd, 5);
            }
        }
    }

    /// The plaintext stream of one direction of connection `id`.
    fn conn_stream(out: &[Record], id: &str, want: Direction) -> Vec<u8> {
        let mut segs: Vec<(u64, Vec<u8>)> = out
            .iter()
            .filter_map(|r| match r {
                Record::Data {
                    conn: Some(c),
                    tls: true,
                    direction,
                    seq,
                    data,
                    ..
                } if c == id && *direction == want => Some((*seq, data.clone())),
                _ => None,
            })
            .collect();
        segs.sort_by_key(|s| s.0);
        segs.into_iter().flat_map(|s| s.1).collect()
    }

    fn ssl_call(dir: u32, ssl: u64, bytes: &[u8]) -> Event {
        let d = data(-1, dir, ssl, bytes.len() as u64, 0, bytes);
        ev(EV_TLS_DATA, FLAG_LAST, 11, Body::TlsData(d))
    }

    fn ciphertext(fd: i32, dir: u32, len: u64) -> Event {
        let d = data(fd, dir, 0, len, 0, &[0x17, 0x03, 0x03, 0, 1]);
        ev(EV_SOCK_DATA, FLAG_LAST, 11, Body::SockData(d))
    }

    /// `then` on two TLS connections (sockets 5 and 6, ClientHello seen) with no SSL
    /// object linked yet: the tracker and the records `then` made.
    fn on_two_fresh_tls_connections(then: Vec<Event>) -> (Tracker, Vec<Record>) {
        let mut t = Tracker::new(SkipPaths::default());
        let hello = [0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5];
        let mut events = Vec::new();
        for fd in [5, 6] {
            events.push(connect(fd));
            let d = data(fd, DIR_EGRESS, 0, 10, 0, &hello);
            events.push(ev(EV_SOCK_DATA, FLAG_LAST, 11, Body::SockData(d)));
        }
        run(&mut t, events);
        let (out, _) = run(&mut t, then);
        (t, out)
    }

    #[test]
    fn an_event_loop_interleaving_two_memory_bio_connections_keeps_each_ones_plaintext() {
        // One asyncio thread: both SSL_writes into their memory BIOs, then the loop
        // writes both ciphertexts out, then reads both replies.
        let (t, out) = on_two_fresh_tls_connections(vec![
            ssl_call(DIR_EGRESS, 0xa, b"GET /a"),
            ssl_call(DIR_EGRESS, 0xb, b"GET /b"),
            ciphertext(5, DIR_EGRESS, 40),
            ciphertext(6, DIR_EGRESS, 40),
            ciphertext(5, DIR_INGRESS, 50),
            ssl_call(DIR_INGRESS, 0xa, b"HTTP a"),
            ciphertext(6, DIR_INGRESS, 50),
            ssl_call(DIR_INGRESS, 0xb, b"HTTP b"),
            ssl_call(DIR_EGRESS, 0xa, b"GET /a2"),
            ssl_call(DIR_EGRESS, 0xb, b"GET /b2"),
        ]);
        let (a, b) = ("10:5:1", "10:6:2");
        assert_eq!(conn_stream(&out, a, Direction::Egress), b"GET /aGET /a2");
        assert_eq!(conn_stream(&out, a, Direction::Ingress), b"HTTP a");
        assert_eq!(conn_stream(&out, b, Direction::Egress), b"GET /bGET /b2");
        assert_eq!(conn_stream(&out, b, Direction::Ingress), b"HTTP b");
        // Each request went out with its connection, before its reply.
        let order: Vec<&[u8]> = out
            .iter()
            .filter_map(|r| match r {
                Record::Data {
                    tls: true, data, ..
                } => Some(data.as_slice()),
                _ => None,
            })
            .collect();
        let expected: [&[u8]; 6] = [
            b"GET /a", b"HTTP a", b"GET /b", b"HTTP b", b"GET /a2", b"GET /b2",
        ];
        assert_eq!(order, expected);
        assert_eq!(t.tls_links.ambiguous, 2, "both writes had two candidates");
        assert_eq!(t.tls_links.unlinked_calls, 0);
    }

    #[test]
    fn ciphertext_of_a_linked_connection_never_takes_another_ssl_objects_plaintext() {
        let (t, out) = on_two_fresh_tls_connections(vec![
            // SSL object 0xa is linked to socket 5 by its first request.
            ssl_call(DIR_EGRESS, 0xa, b"GET /a"),
            ciphertext(5, DIR_EGRESS, 40),
            // Its next request is written after SSL object 0xb's, whose ciphertext
            // then goes to socket 6.
            ssl_call(DIR_EGRESS, 0xa, b"GET /a2"),
            ssl_call(DIR_EGRESS, 0xb, b"GET /b"),
            ciphertext(5, DIR_EGRESS, 40),
            ciphertext(6, DIR_EGRESS, 40),
        ]);
        assert_eq!(
            conn_stream(&out, "10:5:1", Direction::Egress),
            b"GET /aGET /a2"
        );
        assert_eq!(conn_stream(&out, "10:6:2", Direction::Egress), b"GET /b");
        assert_eq!(t.tls_links.ambiguous, 0);
    }

    #[test]
    fn plaintext_that_never_finds_its_socket_is_counted() {
        let mut t = Tracker::new(SkipPaths::default());
        let exit = ev(
            EV_EXIT,
            0,
            11,
            Body::Exit(Proc {
                other: 0,
                path: String::new(),
                comm: "python".into(),
            }),
        );
        let (out, _) = run(
            &mut t,
            vec![
                ssl_call(DIR_EGRESS, 0xa, b"GET /a"),
                ssl_call(DIR_EGRESS, 0xa, b"GET /b"),
                exit,
            ],
        );
        assert_eq!(stream(&out, true, Direction::Egress), b"GET /aGET /b");
        assert_eq!(t.tls_links.unlinked_calls, 2);
    }

    #[test]
    fn fd_bio_tls_links_by_the_syscall_inside_the_ssl_call() {
        let mut t = Tracker::new(SkipPaths::default());
        let (out, _) = run(
            &mut t,
            vec![
                connect(7),
                ev(
                    EV_SOCK_DATA,
                    FLAG_LAST | FLAG_IN_SSL | FLAG_NO_PAYLOAD,
                    11,
                    Body::SockData(data(7, DIR_EGRESS, 0x99, 50, 0, b"")),
                ),
                ev(
                    EV_TLS_DATA,
                    FLAG_LAST,
                    11,
                    Body::TlsData(data(-1, DIR_EGRESS, 0x99, 4, 0, b"PING")),
                ),
            ],
        );
        assert_eq!(stream(&out, true, Direction::Egress), b"PING");
        assert!(out
            .iter()
            .any(|r| matches!(r, Record::Data { conn: Some(c), tls: true, .. } if c == "10:7:1")));
    }

    #[test]
    fn postgres_ssl_request_is_cleartext_and_what_follows_is_not() {
        // SSLRequest: length 8, code 80877103.
        const PG_SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        let mut t = Tracker::new(SkipPaths::default());
        let (out, _) = run(
            &mut t,
            vec![
                connect(4),
                ev(
                    EV_SOCK_DATA,
                    FLAG_LAST,
                    11,
                    Body::SockData(data(4, DIR_EGRESS, 0, 8, 0, &PG_SSL_REQUEST)),
                ),
                ev(
                    EV_SOCK_DATA,
                    FLAG_LAST,
                    11,
                    Body::SockData(data(4, DIR_INGRESS, 0, 1, 0, b"S")),
                ),
                ev(
                    EV_SOCK_DATA,
                    FLAG_LAST,
                    11,
                    Body::SockData(data(4, DIR_EGRESS, 0, 6, 0, &[0x16, 3, 1, 0, 1, 9])),
                ),
            ],
        );
        assert_eq!(stream(&out, false, Direction::Egress), PG_SSL_REQUEST);
    }

    #[test]
    fn truncated_call_reports_the_bytes_not_captured() {
        let mut t = Tracker::new(SkipPaths::default());
        let (out, _) = run(
            &mut t,
            vec![
                connect(3),
                ev(
                    EV_SOCK_DATA,
                    FLAG_LAST | FLAG_TRUNCATED,
                    11,
                    Body::SockData(data(3, DIR_EGRESS, 0, 100, 0, b"0123456789")),
                ),
                ev(
                    EV_SOCK_DATA,
                    FLAG_LAST,
                    11,
                    Body::SockData(data(3, DIR_EGRESS, 0, 1, 0, b"x")),
                ),
            ],
        );
        let recs: Vec<(u64, u64)> = out
            .iter()
            .filter_map(|r| {
                if let Record::Data { seq, truncated, .. } = r {
                    Some((*seq, *truncated))
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(recs, vec![(0, 90), (100, 0)]);
    }

    #[test]
    fn files_report_mode_and_totals_and_skip_noise_paths() {
        let mut t = Tracker::new(SkipPaths::default());
        let open = |fd, path: &str, flags| {
            ev(
                EV_FILE_OPEN,
                0,
                11,
                Body::FileOpen(FileOpen {
                    fd,
                    open_flags: flags,
                    dirfd: -100,
                    path: path.into(),
                }),
            )
        };
        let io = |fd, dir, bytes| {
            ev(
                EV_FILE_IO,
                0,
                11,
                Body::FileIo(FileIo {
                    fd,
                    direction: dir,
                    bytes,
                }),
            )
        };
        let close = |fd| ev(EV_CLOSE, 0, 11, Body::Close { fd });
        let wflags = (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC) as u32;
        let (out, actions) = run(
            &mut t,
            vec![
                open(3, "out.txt", wflags),
                io(3, DIR_EGRESS, 100),
                io(3, DIR_EGRESS, 23),
                close(3),
                open(4, "/proc/self/status", 0),
                close(4),
                open(5, "/x/__pycache__/m.cpython-311.pyc", 0),
            ],
        );
        assert!(actions.contains(&Action::Quiet(10, 4, 1)));
        let files: Vec<&Record> = out
            .iter()
            .filter(|r| matches!(r, Record::FileOpen { .. } | Record::FileClose { .. }))
            .collect();
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(matches!(
            files[1],
            Record::FileClose { path, mode: "w", bytes_written: 123, writes: 2, bytes_read: 0, .. } if path == "/work/out.txt"
        ));
    }

    #[test]
    fn interpreter_sources_and_directories_are_not_file_io() {
        let skip = SkipPaths::default();
        assert!(skip.skips("/usr/lib/python3.11/json/__init__.py"));
        assert!(skip.skips("/opt/venv/lib/python3.11/site-packages/distutils-precedence.pth"));
        assert!(
            !skip.skips("/srv/app/lib/report.py"),
            "the application's own files stay"
        );
        assert!(!skip.skips("/opt/venv/lib/python3.11/site-packages/pkg/data.json"));
        let mut t = Tracker::new(skip);
        let flags = (libc::O_RDONLY | libc::O_DIRECTORY) as u32;
        let (out, actions) = run(
            &mut t,
            vec![ev(
                EV_FILE_OPEN,
                0,
                11,
                Body::FileOpen(FileOpen {
                    fd: 3,
                    open_flags: flags,
                    dirfd: -100,
                    path: "/data".into(),
                }),
            )],
        );
        assert!(out.is_empty(), "{out:?}");
        assert!(actions.contains(&Action::Quiet(10, 3, 1)));
    }

    #[test]
    fn open_modes_match_python() {
        use libc::*;
        assert_eq!(open_mode(O_RDONLY as u32), "r");
        assert_eq!(open_mode((O_WRONLY | O_CREAT | O_TRUNC) as u32), "w");
        assert_eq!(open_mode((O_WRONLY | O_CREAT | O_APPEND) as u32), "a");
        assert_eq!(open_mode(O_RDWR as u32), "r+");
        assert_eq!(open_mode((O_RDWR | O_CREAT | O_TRUNC) as u32), "w+");
        assert_eq!(open_mode((O_RDWR | O_CREAT | O_APPEND) as u32), "a+");
        assert_eq!(open_mode((O_WRONLY | O_CREAT | O_EXCL) as u32), "x");
    }

    #[test]
    fn exit_closes_everything_and_unwatches() {
        let mut t = Tracker::new(SkipPaths::default());
        let (out, actions) = run(
            &mut t,
            vec![
                connect(3),
                ev(
                    EV_EXIT,
                    0,
                    10,
                    Body::Exit(Proc {
                        other: 0,
                        comm: "x".into(),
                        path: String::new(),
                    }),
                ),
            ],
        );
        assert!(out.iter().any(|r| matches!(r, Record::Close { fd: 3, .. })));
        assert!(actions.contains(&Action::Unwatch(10)));
        assert!(t.conns.is_empty());
    }

    fn dup(oldfd: i32, newfd: i32, replaced_kind: u32, ts: u64) -> Event {
        let mut e = ev(
            EV_DUP,
            0,
            11,
            Body::Dup(crate::capture::event::Dup {
                oldfd,
                newfd,
                fd_kind: FD_SOCKET,
                replaced_kind,
            }),
        );
        e.hdr.ts_ns = ts;
        e
    }

    fn write(fd: i32, bytes: &[u8]) -> Event {
        let n = bytes.len() as u64;
        ev(
            EV_SOCK_DATA,
            FLAG_LAST,
            11,
            Body::SockData(data(fd, DIR_EGRESS, 0, n, 0, bytes)),
        )
    }

    fn close(fd: i32) -> Event {
        ev(EV_CLOSE, 0, 11, Body::Close { fd })
    }

    fn data_conns(out: &[Record]) -> Vec<(i32, String)> {
        out.iter()
            .filter_map(|r| match r {
                Record::Data { fd, conn, .. } => Some((*fd, conn.clone().unwrap())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn writes_through_a_copy_continue_the_stream_and_the_connection_closes_once() {
        let mut t = Tracker::new(SkipPaths::default());
        let (out, _) = run(
            &mut t,
            vec![
                connect(3),
                write(3, b"abc"),
                dup(3, 7, 0, 5),
                write(7, b"def"),
                // The original closes first: the copy carries on.
                close(3),
                write(7, b"gh"),
                close(7),
            ],
        );
        assert_eq!(stream(&out, false, Direction::Egress), b"abcdefgh");
        let conns = data_conns(&out);
        assert_eq!(
            conns.iter().map(|(fd, _)| *fd).collect::<Vec<_>>(),
            [3, 7, 7]
        );
        assert!(conns.iter().all(|(_, c)| *c == conns[0].1), "{conns:?}");
        let closes: Vec<_> = out
            .iter()
            .filter_map(|r| match r {
                Record::Close {
                    fd,
                    conn,
                    bytes_sent,
                    ..
                } => Some((*fd, conn.clone(), *bytes_sent)),
                _ => None,
            })
            .collect();
        assert_eq!(closes, [(7, conns[0].1.clone(), 8)]);
        assert!(t.conns.is_empty() && t.aliases.is_empty());
    }

    #[test]
    fn tls_seen_through_a_copy_stops_payload_on_every_number() {
        let mut t = Tracker::new(SkipPaths::default());
        let hello = [0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5];
        let (_, actions) = run(&mut t, vec![connect(3), dup(3, 7, 0, 5), write(7, &hello)]);
        let mut flagged: Vec<_> = actions
            .iter()
            .filter_map(|a| match a {
                Action::NoPayload(pid, fd, gen) => Some((*pid, *fd, *gen)),
                _ => None,
            })
            .collect();
        flagged.sort_unstable();
        assert_eq!(flagged, [(10, 3, 1), (10, 7, 5)]);
        // Closing both numbers clears both incarnations' flags.
        let (_, actions) = run(&mut t, vec![close(3), close(7)]);
        let mut cleared: Vec<_> = actions
            .iter()
            .filter_map(|a| match a {
                Action::ClearFlags(_, fd, gen) => Some((*fd, *gen)),
                _ => None,
            })
            .collect();
        cleared.sort_unstable();
        assert_eq!(cleared, [(3, 1), (7, 5)]);
    }

    #[test]
    fn dup2_over_a_tracked_connection_closes_that_connection() {
        let mut t = Tracker::new(SkipPaths::default());
        let (out, _) = run(
            &mut t,
            vec![
                connect(3),
                connect(4),
                write(4, b"old"),
                dup(3, 4, FD_SOCKET, 5),
                write(4, b"new"),
            ],
        );
        let closed: Vec<_> = out
            .iter()
            .filter_map(|r| match r {
                Record::Close { conn, .. } => Some(conn.clone()),
                _ => None,
            })
            .collect();
        let conns = data_conns(&out);
        assert_eq!(closed, [conns[0].1.clone()], "the replaced connection");
        assert_ne!(conns[1].1, conns[0].1, "4 now writes on 3's connection");
        assert_eq!(conns[1].1, "10:3:1");
    }

    #[test]
    fn sendfile_from_a_file_is_a_counted_gap_marked_with_the_file() {
        let mut t = Tracker::new(SkipPaths::default());
        let open = ev(
            EV_FILE_OPEN,
            0,
            11,
            Body::FileOpen(FileOpen {
                fd: 5,
                open_flags: 0,
                dirfd: -100,
                path: "/data/body.bin".into(),
            }),
        );
        let transfer = ev(
            EV_TRANSFER,
            0,
            11,
            Body::Transfer(Transfer {
                source: SRC_SENDFILE,
                in_fd: 5,
                in_kind: FD_FILE,
                out_fd: 3,
                out_kind: FD_SOCKET,
                bytes: 100,
            }),
        );
        let (out, _) = run(
            &mut t,
            vec![
                open,
                connect(3),
                write(3, b"HEAD"),
                transfer,
                write(3, b"x"),
            ],
        );
        let data: Vec<_> = out
            .iter()
            .filter_map(|r| match r {
                Record::Data {
                    seq,
                    truncated,
                    data,
                    from_file,
                    via,
                    ..
                } => Some((*seq, *truncated, data.len(), from_file.clone(), *via)),
                _ => None,
            })
            .collect();
        assert_eq!(
            data,
            [
                (0, 0, 4, None, "write"),
                (4, 100, 0, Some("/data/body.bin".into()), "sendfile"),
                (104, 0, 1, None, "write"),
            ]
        );
        assert!(out.iter().any(|r| matches!(
            r,
            Record::FileIo {
                fd: 5,
                direction: Direction::Ingress,
                bytes: 100,
                ..
            }
        )));
    }
}
