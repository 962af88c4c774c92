//! Enforcement before the operation (`run --enforce`): a BLOCK or HALT at a hook event's
//! `started` stops the operation before its first byte leaves or its file is opened.
//!
//! This kernel has neither BPF LSM nor kprobes (see `check`), so the agent holds an
//! operation with **seccomp user notification**: the worker hook installs, on each thread
//! the first time it runs a governed activity (an executor thread for a sync activity,
//! the event-loop thread for an async one: its slot shows the activity of the running
//! step, so the attribution is exact), a seccomp filter (no TSYNC: Temporal's own
//! threads are untouched) that turns `connect`, `sendto`, `sendmsg`, `sendmmsg`, `write`
//! and `writev` on descriptors above 2, and opens that may write or create (`open`,
//! `openat` with a write flag, `openat2`, `creat`) into notifications, and hands the
//! listener descriptor to the agent (`enforce` request). The kernel parks the calling
//! thread until the agent answers `CONTINUE` or an error. The filter is inherited by the
//! threads and processes the thread starts afterwards and survives `exec`, so a `curl`
//! the activity started is held by the same listener: this is what makes HALT sticky.
//!
//! For each notification a supervisor thread (one per listener) finds the activity the
//! caller works for — the slot of a registered worker thread, read from the worker's
//! memory, else the kernel's `INHERIT` record of a process an activity started — and:
//! - no governed activity, or nothing the agent can name (a pipe, a file the SDK's skip
//!   list ignores, TLS bytes not sent from inside an `SSL_write`): `CONTINUE` at once;
//! - the activity was halted: denied (`EPERM`, `ECONNREFUSED` for `connect`), counted;
//! - a plain-HTTP request head, a PostgreSQL simple query (either also as the plaintext
//!   of the `SSL_write` a held socket write is part of: [`Enforcer::read_tls_calls`]),
//!   or an open for writing: its
//!   `started` hook event goes to Core ([`Decide`], answered by the daemon) and the call
//!   waits for the verdict (the governance timeout and the failure policy bound the
//!   wait); BLOCK/HALT deny it. Verdicts are remembered per activity and operation
//!   (method and URL, statement, path and mode), so the same operation again costs no
//!   Core round trip.
//!
//! Arguments are read from the caller's memory with `process_vm_readv`, then the
//! notification is checked still valid (`SECCOMP_IOCTL_NOTIF_ID_VALID`): a caller that
//! died or was interrupted meanwhile could otherwise have its id reused.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
};

use openbox_common::{UnsentKey, UnsentWrite};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::registry::{ActivityKey, HookState};
use crate::{
    conn::{open_mode, Pid, SkipPaths},
    governance::Verdict,
};

// struct seccomp_data / seccomp_notif / seccomp_notif_resp (linux/seccomp.h).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct SeccompData {
    pub nr: i32,
    pub arch: u32,
    pub instruction_pointer: u64,
    pub args: [u64; 6],
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Notif {
    pub id: u64,
    /// The caller's host tid.
    pub pid: u32,
    pub flags: u32,
    pub data: SeccompData,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct NotifResp {
    id: u64,
    val: i64,
    error: i32,
    flags: u32,
}

// _IOWR('!', 0, struct seccomp_notif), _IOWR('!', 1, struct seccomp_notif_resp),
// _IOW('!', 2, __u64).
const NOTIF_RECV: libc::c_ulong = 0xc050_2100;
const NOTIF_SEND: libc::c_ulong = 0xc018_2101;
const NOTIF_ID_VALID: libc::c_ulong = 0x4008_2102;
const USER_NOTIF_FLAG_CONTINUE: u32 = 1;

const _: () = assert!(std::mem::size_of::<Notif>() == 0x50);
const _: () = assert!(std::mem::size_of::<NotifResp>() == 0x18);

/// What a held call is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Continue,
    /// Fails with this errno.
    Deny(i32),
}

/// A seccomp listener descriptor taken from a worker.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
}

/// A copy of descriptor `fd` of process `pid` (`pidfd_getfd`).
fn take_fd(pid: Pid, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain syscalls; each result is checked before use.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0);
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as RawFd);
        let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(got as RawFd))
    }
}

/// A denied query leaves its client waiting for an answer the server never gets to
/// give: libpq (PostgreSQL 12+) keeps reading after a failed send, for the server's error
/// message. The connection is shut down (both ways) so the client sees it end.
fn end_connection(pid: Pid, fd: RawFd) {
    match take_fd(pid, fd) {
        // SAFETY: a descriptor we own.
        Ok(sock) => unsafe {
            libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR);
        },
        Err(e) => tracing::warn!(pid, fd, "ending the connection of a denied query: {e}"),
    }
}

enum Ready {
    Notification,
    Idle,
    /// Every task the filter applies to has exited.
    Gone,
}

impl Listener {
    /// Takes descriptor `fd` of process `pid` (`pidfd_getfd`: the caller needs ptrace
    /// rights over it, which a root agent has).
    pub fn take(pid: Pid, fd: RawFd) -> io::Result<Listener> {
        Ok(Listener {
            fd: take_fd(pid, fd)?,
        })
    }

    fn wait(&self, timeout_ms: i32) -> io::Result<Ready> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(Ready::Idle)
            } else {
                Err(e)
            };
        }
        Ok(if p.revents & libc::POLLIN != 0 {
            Ready::Notification
        } else if p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            Ready::Gone
        } else {
            Ready::Idle
        })
    }

    /// The next notification (the kernel wants the buffer zeroed).
    fn recv(&self) -> io::Result<Notif> {
        let mut n = Notif::default();
        // SAFETY: the buffer has the kernel's struct seccomp_notif layout.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), NOTIF_RECV, &mut n) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n)
    }

    /// Whether the held call `id` still waits (its caller neither died nor was
    /// interrupted): checked after reading its arguments.
    pub fn valid(&self, id: u64) -> bool {
        // SAFETY: a u64 argument, as the ioctl expects.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), NOTIF_ID_VALID, &id) == 0 }
    }

    /// Answers the held call `id`. An id no longer valid fails with ENOENT: its caller is
    /// gone and nothing is lost.
    pub fn answer(&self, id: u64, answer: Answer) -> io::Result<()> {
        let resp = match answer {
            Answer::Continue => NotifResp {
                id,
                val: 0,
                error: 0,
                flags: USER_NOTIF_FLAG_CONTINUE,
            },
            Answer::Deny(errno) => NotifResp {
                id,
                val: 0,
                error: -errno,
                flags: 0,
            },
        };
        // SAFETY: the buffer has the kernel's struct seccomp_notif_resp layout.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), NOTIF_SEND, &resp) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// What a held call is about to do, as far as governance cares.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    /// An open that may write or create.
    File { path: String, flags: u32 },
    /// A plain-HTTP request head in the buffer being sent.
    Http {
        method: String,
        url: String,
        target: String,
        host: String,
        headers: Map<String, Value>,
    },
    /// A PostgreSQL simple query (`Q` message) on a plain connection.
    Sql { statement: String },
    /// A TLS send whose plaintext the agent cannot name exactly (see [`Carried`]): the
    /// failure policy decides it, never a guess.
    Unnamed { why: &'static str },
}

impl Operation {
    /// What its verdict is remembered by, within one activity.
    pub fn key(&self) -> String {
        match self {
            Operation::File { path, flags } => format!("file {} {path}", open_mode(*flags)),
            Operation::Http { method, url, .. } => format!("http {method} {url}"),
            Operation::Sql { statement } => format!("sql {statement}"),
            Operation::Unnamed { why } => format!("unnamed {why}"),
        }
    }
}

/// The same key for an operation the capture saw (a `file.open` or HTTP client span).
pub fn span_key(span: &crate::span::Span) -> Option<String> {
    let a = |k: &str| span.attributes.get(k).and_then(Value::as_str);
    if span.name == "file.open" {
        return Some(format!("file {} {}", a("file.mode")?, a("file.path")?));
    }
    if a("db.system") == Some("postgresql") {
        return Some(format!("sql {}", a("db.statement")?));
    }
    Some(format!("http {} {}", a("http.method")?, a("http.url")?))
}

/// One governed activity as the supervisors see it.
#[derive(Debug, Default)]
pub struct Gate {
    pub hooks: Arc<HookState>,
    /// Calls denied in the kernel.
    pub denied: AtomicU64,
    /// Verdicts by [`Operation::key`]: true = allowed.
    cache: Mutex<HashMap<String, bool>>,
    /// Span ids of `started` hook events sent while the call was held, by key: the
    /// captured operation then sends only its `completed`, with that span id.
    preflight: Mutex<HashMap<String, Vec<String>>>,
}

impl Gate {
    pub fn new(hooks: Arc<HookState>) -> Gate {
        Gate {
            hooks,
            ..Gate::default()
        }
    }

    fn halted(&self) -> bool {
        self.hooks
            .stopped()
            .is_some_and(|s| s.verdict == Verdict::Halt)
    }

    pub fn remember(&self, key: String, allowed: bool) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, allowed);
    }

    fn cached(&self, key: &str) -> Option<bool> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
    }

    pub fn add_preflight(&self, key: String, span_id: String) {
        self.preflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .push(span_id);
    }

    /// The span id a held call's `started` went out with, for the captured operation.
    pub fn take_preflight(&self, key: &str) -> Option<String> {
        let mut p = self.preflight.lock().unwrap_or_else(|p| p.into_inner());
        let ids = p.get_mut(key)?;
        if ids.is_empty() {
            return None;
        }
        Some(ids.remove(0))
    }
}

/// A held call that waits for Core: the daemon sends its `started` hook event and
/// answers it.
#[derive(Debug)]
pub struct Decide {
    pub listener: Arc<Listener>,
    pub id: u64,
    pub activity: ActivityKey,
    pub gate: Arc<Gate>,
    pub operation: Operation,
    pub pid: Pid,
    pub tid: u32,
    /// The syscall, for the errno of a denial.
    pub nr: i64,
    /// Its descriptor (the socket, for a denied query).
    pub fd: RawFd,
    /// The memory-BIO plaintext this send carries, taken once it is answered.
    pub taken: Option<Taken>,
    /// The enforcer's counters (a denial counts there too).
    pub stats: Arc<Stats>,
}

impl Decide {
    pub fn answer(&self, allowed: bool) {
        let answer = if allowed {
            Answer::Continue
        } else {
            self.gate.denied.fetch_add(1, Relaxed);
            self.stats.denied.fetch_add(1, Relaxed);
            if matches!(self.operation, Operation::Sql { .. }) {
                end_connection(self.pid, self.fd);
            }
            Answer::Deny(deny_errno(self.nr))
        };
        answer_taking(&self.listener, self.id, answer, self.taken.as_ref());
    }
}

type UnsentMap = aya::maps::HashMap<aya::maps::MapData, UnsentKey, UnsentWrite>;

/// The kernel's record of a memory-BIO SSL object's unsent plaintext that a held send
/// carries: removed once the send is answered (let through or denied), so no later send
/// is named by it. A call that was interrupted meanwhile keeps it for its retry.
#[derive(Debug, Clone)]
pub struct Taken {
    unsent: Arc<Mutex<UnsentMap>>,
    key: UnsentKey,
}

/// Answers held call `id`; once the answer reached it, takes the plaintext it carried.
fn answer_taking(listener: &Listener, id: u64, answer: Answer, taken: Option<&Taken>) {
    if listener.answer(id, answer).is_ok() {
        if let Some(t) = taken {
            let _ = t
                .unsent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&t.key);
        }
    }
}

fn deny_errno(nr: i64) -> i32 {
    if nr == libc::SYS_connect {
        libc::ECONNREFUSED
    } else {
        libc::EPERM
    }
}

/// Counters of `/metrics` and the summary.
#[derive(Debug, Default)]
pub struct Stats {
    pub listeners: AtomicU64,
    pub held: AtomicU64,
    pub continued: AtomicU64,
    pub asked: AtomicU64,
    pub cached: AtomicU64,
    pub denied: AtomicU64,
    pub tls_named: AtomicU64,
    pub tls_unnamed: AtomicU64,
    pub outside_step: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            listeners: self.listeners.load(Relaxed),
            held: self.held.load(Relaxed),
            continued: self.continued.load(Relaxed),
            asked: self.asked.load(Relaxed),
            cached: self.cached.load(Relaxed),
            denied: self.denied.load(Relaxed),
            tls_named: self.tls_named.load(Relaxed),
            tls_unnamed: self.tls_unnamed.load(Relaxed),
            outside_step: self.outside_step.load(Relaxed),
        }
    }
}

/// [`Stats`] at one moment: the `enforcement` object of the summary and the
/// `openbox_enforce_*` metrics.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct StatsSnapshot {
    /// Seccomp listeners the agent holds (one per filtered thread).
    pub listeners: u64,
    /// Calls the kernel held for the agent.
    pub held: u64,
    /// Held calls let through at once (no governed activity, nothing to name).
    pub continued: u64,
    /// Held calls that waited for Core's answer to their `started` hook event.
    pub asked: u64,
    /// Held calls answered by a verdict remembered for their activity and operation.
    pub cached: u64,
    /// Held calls denied (BLOCK, HALT, or the failure policy).
    pub denied: u64,
    /// Held TLS sends outside libssl (asyncio's memory-BIO TLS) whose ciphertext the
    /// agent matched to the plaintext its SSL object encrypted.
    pub tls_named: u64,
    /// Held TLS sends outside libssl whose plaintext could not be told exactly (two SSL
    /// objects of the thread waiting for a socket none owns, or a request head longer
    /// than the bytes kept): decided by the failure policy.
    pub tls_unnamed: u64,
    /// Held TLS sends outside libssl carrying what an activity's step encrypted, made
    /// outside that step (asyncio's event loop sending a buffered remainder between the
    /// activity's steps, or during another's): governed by the activity that wrote them.
    pub outside_step: u64,
}

/// Where a registered thread publishes its activity.
#[derive(Debug, Clone, Copy)]
struct ThreadPlace {
    worker: Pid,
    slot_addr: u64,
}

type InheritMap = aya::maps::HashMap<aya::maps::MapData, u32, openbox_common::Inherited>;
type SslArgsMap = aya::maps::HashMap<aya::maps::MapData, u64, openbox_common::SslArgs>;

/// The state the supervisors share with the daemon.
pub struct Enforcer {
    threads: Mutex<HashMap<u32, ThreadPlace>>,
    gates: Mutex<HashMap<ActivityKey, Arc<Gate>>>,
    inherit: Option<Mutex<InheritMap>>,
    /// The libssl calls in flight (`SSL_ARGS`): what a thread held in a socket write
    /// inside `SSL_write` is encrypting ([`Enforcer::read_tls_calls`]).
    ssl_calls: std::sync::OnceLock<Mutex<SslArgsMap>>,
    /// What memory-BIO SSL objects encrypted and did not send yet (`TLS_UNSENT`): what
    /// a thread held in a TLS send outside libssl is sending ([`Enforcer::carried`]).
    unsent: std::sync::OnceLock<Arc<Mutex<UnsentMap>>>,
    /// Which SSL object each TLS socket carries, learned at held sends.
    bio: Mutex<MemoryBio>,
    /// When each thread that handed a listener was filtered (CLOCK_MONOTONIC ns): a
    /// `TLS_UNSENT` entry it wrote before then was sent unheld, and is stale.
    filtered_at: Mutex<HashMap<u32, u64>>,
    decide: mpsc::UnboundedSender<Decide>,
    skip: SkipPaths,
    pub stats: Arc<Stats>,
}

impl Enforcer {
    pub fn new(
        inherit: Option<InheritMap>,
        skip: SkipPaths,
    ) -> (Arc<Enforcer>, mpsc::UnboundedReceiver<Decide>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Enforcer {
                threads: Mutex::default(),
                gates: Mutex::default(),
                inherit: inherit.map(Mutex::new),
                ssl_calls: std::sync::OnceLock::new(),
                unsent: std::sync::OnceLock::new(),
                bio: Mutex::default(),
                filtered_at: Mutex::default(),
                decide: tx,
                skip,
                stats: Arc::default(),
            }),
            rx,
        )
    }

    pub fn thread(&self, tid: u32, worker: Pid, slot_addr: u64) {
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tid, ThreadPlace { worker, slot_addr });
    }

    pub fn forget_thread(&self, tid: u32) {
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&tid);
    }

    pub fn open_gate(&self, key: ActivityKey, gate: Arc<Gate>) {
        self.gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, gate);
    }

    pub fn gate(&self, key: &ActivityKey) -> Option<Arc<Gate>> {
        self.gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    pub fn close_gate(&self, key: &ActivityKey) -> Option<Arc<Gate>> {
        self.gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key)
    }

    /// Serves `listener` on a thread of its own until every task its filter applies to
    /// has exited.
    pub fn supervise(
        self: &Arc<Self>,
        listener: Listener,
        worker: Pid,
        tid: u32,
    ) -> io::Result<()> {
        let me = self.clone();
        let listener = Arc::new(listener);
        self.stats.listeners.fetch_add(1, Relaxed);
        self.filtered_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tid, monotonic_ns());
        std::thread::Builder::new()
            .name(format!("enforce-{tid}"))
            .spawn(move || {
                loop {
                    match listener.wait(1000) {
                        Ok(Ready::Notification) => {}
                        Ok(Ready::Idle) => continue,
                        Ok(Ready::Gone) | Err(_) => break,
                    }
                    let n = match listener.recv() {
                        Ok(n) => n,
                        // The caller went away between poll and receive.
                        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINTR)) => {
                            continue
                        }
                        Err(e) => {
                            tracing::error!(worker, tid, "seccomp listener: {e}");
                            break;
                        }
                    };
                    me.stats.held.fetch_add(1, Relaxed);
                    me.first_look(&listener, n);
                }
                me.stats.listeners.fetch_sub(1, Relaxed);
                tracing::debug!(worker, tid, "seccomp listener closed: its threads exited");
            })?;
        Ok(())
    }

    /// Answers a held call at once, or hands it to the daemon to ask Core.
    fn first_look(&self, listener: &Arc<Listener>, n: Notif) {
        let nr = i64::from(n.data.nr);
        let current = self.activity_of(n.pid);
        // A memory-BIO send carries what it carries, which no later send may be named
        // by; and the activity whose step encrypted it governs it, whichever step (if
        // any) the thread is in now: asyncio's event loop sends a transport's buffered
        // remainder from its own callbacks. (Only the writes of registered threads and of
        // processes an activity started are kept: `note_unsent`.)
        let sent = current
            .map(|(_, pid)| pid)
            .or_else(|| self.worker_of(n.pid))
            .and_then(|tgid| Some((tgid, self.memory_bio_send(tgid, n.pid, &n.data)?)));
        let writer = sent.as_ref().and_then(|(tgid, s)| Some((s.writer?, *tgid)));
        let taken = sent.as_ref().and_then(|(_, s)| s.carried.taken(self));
        let carried = sent.map(|(_, s)| s.carried);
        if writer.is_some_and(|(w, _)| current.map(|(c, _)| c) != Some(w)) {
            self.stats.outside_step.fetch_add(1, Relaxed);
        }
        let governed = writer
            .or(current)
            .and_then(|(activity, pid)| Some((activity, pid, self.gate(&activity)?)));
        let Some((activity, pid, gate)) = governed else {
            // Nothing to govern (or what it carries belongs to an activity that ended).
            self.stats.continued.fetch_add(1, Relaxed);
            return answer_taking(listener, n.id, Answer::Continue, taken.as_ref());
        };
        let answer = |a: Answer| answer_taking(listener, n.id, a, taken.as_ref());
        if gate.halted() {
            gate.denied.fetch_add(1, Relaxed);
            self.stats.denied.fetch_add(1, Relaxed);
            return answer(Answer::Deny(deny_errno(nr)));
        }
        let operation = match carried {
            Some(c) => c.operation(&self.stats),
            None => self.operation(pid, n.pid, &n.data),
        };
        // Read from the caller's memory: still the same call? (TOCTOU)
        if !listener.valid(n.id) {
            return;
        }
        let Some(operation) = operation else {
            self.stats.continued.fetch_add(1, Relaxed);
            return answer(Answer::Continue);
        };
        match gate.cached(&operation.key()) {
            Some(true) => {
                self.stats.cached.fetch_add(1, Relaxed);
                answer(Answer::Continue)
            }
            Some(false) => {
                gate.denied.fetch_add(1, Relaxed);
                self.stats.denied.fetch_add(1, Relaxed);
                if matches!(operation, Operation::Sql { .. }) {
                    end_connection(pid, n.data.args[0] as RawFd);
                }
                answer(Answer::Deny(deny_errno(nr)))
            }
            None => {
                self.stats.asked.fetch_add(1, Relaxed);
                let d = Decide {
                    listener: listener.clone(),
                    id: n.id,
                    activity,
                    gate,
                    operation,
                    pid,
                    tid: n.pid,
                    nr,
                    fd: n.data.args[0] as RawFd,
                    taken,
                    stats: self.stats.clone(),
                };
                if let Err(e) = self.decide.send(d) {
                    // The daemon is stopping: nothing can ask Core any more.
                    e.0.answer(true);
                }
            }
        }
    }

    /// Governs TLS requests too: a socket write of a thread inside `SSL_write` is read as
    /// the plaintext that call encrypts (`SSL_ARGS`, kept by the libssl entry probe).
    pub fn read_tls_calls(&self, ssl_args: SslArgsMap) {
        let _ = self.ssl_calls.set(Mutex::new(ssl_args));
    }

    /// Governs asyncio's TLS requests too: a TLS send of a thread outside libssl is read
    /// as the plaintext its socket's memory-BIO SSL object encrypted and did not send yet
    /// (`TLS_UNSENT`, kept by the `SSL_write` return probe).
    pub fn read_unsent_tls(&self, unsent: UnsentMap) {
        let _ = self.unsent.set(Arc::new(Mutex::new(unsent)));
    }

    /// What held call `d` of thread `tid` (of process `tgid`) carries when it is a TLS
    /// send made outside libssl (memory-BIO TLS: the event loop sending what `SSL_write`
    /// encrypted earlier); `None` for any other call.
    ///
    /// Each TLS socket carries one SSL object. The socket's SSL object is known once a
    /// send linked them; a socket with none yet takes the one SSL object of this thread
    /// whose plaintext waits for a socket (none owned by a live socket) — as the capture
    /// links them — when its first record can carry application data (a `ClientHello`
    /// or another plain handshake record comes before any `SSL_write` of its
    /// connection). Two or more waiting would make it a guess: [`Carried::Ambiguous`].
    fn memory_bio_send(&self, tgid: Pid, tid: u32, d: &SeccompData) -> Option<BioSend> {
        if let Some(call) = self.tls_call(tgid, tid, d) {
            self.mark_socket_io(tgid, tid, call);
            return None;
        }
        let unsent = self.unsent.get()?;
        let record = sent_bytes(tid, d, 6)?;
        let content_type = tls_record_type(&record);
        let fd = d.args[0] as RawFd;
        let mut bio = self.bio.lock().unwrap_or_else(|p| p.into_inner());
        // Bytes that start no record continue one — the rest of a send the transport
        // deferred or cut short: TLS only on a socket a send linked already.
        if content_type.is_none() && !bio.linked_fd(tgid, fd) {
            return None;
        }
        let ino = socket_inode(tid, fd)?;
        let mut map = unsent.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&ssl) = bio.owners.get(&(tgid, ino)) {
            let key = UnsentKey { tgid, _pad: 0, ssl };
            return Some(match map.get(&key, 0) {
                Ok(w) => bio.written(tgid, Carried::Write(key, Box::new(w))),
                // The rest of what its last write encrypted, or a record of its own.
                Err(_) => BioSend {
                    carried: Carried::Nothing,
                    writer: bio.writers.get(&(tgid, ssl)).copied(),
                },
            });
        }
        let content_type = content_type?;
        if content_type == TLS_HANDSHAKE || content_type == TLS_ALERT {
            return Some(BioSend::nothing());
        }
        let since = self
            .filtered_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&tid)
            .copied()
            .unwrap_or(0);
        let (mut waiting, mut stale) = (Vec::new(), Vec::new());
        for (key, w) in map.iter().flatten() {
            if key.tgid != tgid || w.tid != tid {
                continue;
            }
            if w.at_ns < since {
                stale.push(key);
                continue;
            }
            let owned = bio
                .sockets
                .get(&(tgid, key.ssl))
                .is_some_and(|&(fd, ino)| socket_inode(tid, fd) == Some(ino));
            if !owned {
                waiting.push((key, w));
            }
        }
        for key in stale {
            let _ = map.remove(&key);
        }
        Some(match waiting.len() {
            0 => BioSend::nothing(),
            1 => {
                let (key, w) = waiting.remove(0);
                bio.link(tgid, key.ssl, fd, ino);
                bio.written(tgid, Carried::Write(key, Box::new(w)))
            }
            _ => BioSend {
                carried: Carried::Ambiguous,
                writer: None,
            },
        })
    }

    /// Socket `fd` of process `tgid` was closed (the capture's close record): the SSL
    /// object a held send linked to it is forgotten, unless the descriptor names that
    /// same socket still (a new socket took the number and was linked meanwhile).
    pub fn socket_closed(&self, tgid: Pid, fd: RawFd) {
        let mut bio = self.bio.lock().unwrap_or_else(|p| p.into_inner());
        if bio.linked_fd(tgid, fd) {
            bio.closed(tgid, fd, socket_inode(tgid, fd));
        }
    }

    /// Process `tgid` exited: what held sends learned of its sockets goes.
    pub fn process_exited(&self, tgid: Pid) {
        self.bio
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .exited(tgid);
    }

    /// What held call `d` of thread `tid` (of process `tgid`) is about to do. A send
    /// while the thread is inside a libssl call carries ciphertext: the operation is then
    /// the plaintext `SSL_write` is encrypting, never the bytes on the socket.
    fn operation(&self, tgid: Pid, tid: u32, d: &SeccompData) -> Option<Operation> {
        match self.tls_call(tgid, tid, d) {
            Some(call) => tls_operation(tid, d, &call),
            None => read_operation(tid, d, &self.skip),
        }
    }

    /// The libssl call thread `tid` is inside, when `d` is a send on a socket.
    fn tls_call(&self, tgid: Pid, tid: u32, d: &SeccompData) -> Option<openbox_common::SslArgs> {
        sent_buffer(d)?;
        let map = self.ssl_calls.get()?;
        let key = (u64::from(tgid) << 32) | u64::from(tid);
        map.lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key, 0)
            .ok()
    }

    /// The worker host thread `tid` is a registered thread of.
    fn worker_of(&self, tid: u32) -> Option<Pid> {
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&tid)
            .map(|p| p.worker)
    }

    /// Flags the libssl call thread `tid` is held in as one that sends on a socket itself
    /// (a socket BIO), so its return probe keeps nothing of it as unsent: the kernel
    /// flags it only when the send moved bytes, and a send denied here moves none —
    /// while libpq, for one, then tells OpenSSL the write succeeded. The thread is
    /// parked, so its entry cannot change meanwhile; only an existing one is updated.
    fn mark_socket_io(&self, tgid: Pid, tid: u32, call: openbox_common::SslArgs) {
        use openbox_common::SSL_CALL_SOCKET_IO;
        if call.flags & SSL_CALL_SOCKET_IO != 0 {
            return;
        }
        let Some(map) = self.ssl_calls.get() else {
            return;
        };
        let key = (u64::from(tgid) << 32) | u64::from(tid);
        let marked = openbox_common::SslArgs {
            flags: call.flags | SSL_CALL_SOCKET_IO,
            ..call
        };
        const BPF_EXIST: u64 = 2;
        if let Err(e) = map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, marked, BPF_EXIST)
        {
            tracing::debug!(tgid, tid, "flagging a libssl call as a socket BIO's: {e}");
        }
    }

    /// The activity host thread `tid` works for, and its process: a registered thread's
    /// slot, else what the kernel recorded when an activity started its process.
    fn activity_of(&self, tid: u32) -> Option<(ActivityKey, Pid)> {
        let place = self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&tid)
            .copied();
        if let Some(ThreadPlace { worker, slot_addr }) = place {
            let mut token = [0u8; 8];
            read_memory(worker, slot_addr, &mut token).ok()?;
            let token = u64::from_ne_bytes(token);
            return (token != 0).then_some(((worker, token), worker));
        }
        let tgid = crate::procfs::tgid_of(tid)?;
        let inherit = self.inherit.as_ref()?;
        let got = inherit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&tgid, 0)
            .ok()?;
        (got.activity != 0).then_some(((got.owner, got.activity), tgid))
    }
}

/// Reads `buf.len()` bytes at `addr` in process (or thread) `pid`; returns how many.
fn read_memory(pid: u32, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: one local iovec over `buf`; the remote one is only read by the kernel.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Most bytes of a buffer read to recognise a request head.
const HEAD_BYTES: usize = 4096;

/// What the held call `d` of thread `tid` is about to do, when it is an operation the
/// agent governs before it happens.
fn read_operation(tid: u32, d: &SeccompData, skip: &SkipPaths) -> Option<Operation> {
    let nr = i64::from(d.nr);
    let a = d.args;
    let (dirfd, path_addr, flags) = match nr {
        libc::SYS_open => (libc::AT_FDCWD, a[0], a[1] as u32),
        libc::SYS_creat => (
            libc::AT_FDCWD,
            a[0],
            (libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC) as u32,
        ),
        libc::SYS_openat => (a[0] as i32, a[1], a[2] as u32),
        libc::SYS_openat2 => {
            // struct open_how { u64 flags; u64 mode; u64 resolve; }
            let mut how = [0u8; 8];
            read_memory(tid, a[2], &mut how).ok()?;
            (a[0] as i32, a[1], u64::from_ne_bytes(how) as u32)
        }
        _ => return request(&sent_bytes(tid, d, HEAD_BYTES)?),
    };
    let writes = flags
        & (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u32;
    if writes == 0 {
        return None;
    }
    let path = read_c_string(tid, path_addr)?;
    let path = resolve(tid, dirfd, &path)?;
    if skip.skips(&path) {
        return None;
    }
    Some(Operation::File { path, flags })
}

/// Where a send's bytes are, by syscall: the buffer itself, the first iovec, or the
/// first iovec of the (first) message.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Sent {
    Buffer { addr: u64, len: u64 },
    Iovec { iov: u64, count: u64 },
    Message { msg: u64 },
}

/// Where held call `d` takes the bytes it sends; `None` for a call that sends nothing.
fn sent_buffer(d: &SeccompData) -> Option<Sent> {
    let a = d.args;
    match i64::from(d.nr) {
        libc::SYS_write | libc::SYS_sendto => Some(Sent::Buffer {
            addr: a[1],
            len: a[2],
        }),
        libc::SYS_writev => Some(Sent::Iovec {
            iov: a[1],
            count: a[2],
        }),
        libc::SYS_sendmsg => Some(Sent::Message { msg: a[1] }),
        // struct mmsghdr starts with its struct msghdr.
        libc::SYS_sendmmsg if a[2] > 0 => Some(Sent::Message { msg: a[1] }),
        _ => None,
    }
}

/// The first (at most `max`) bytes held call `d` of thread `tid` sends.
fn sent_bytes(tid: u32, d: &SeccompData, max: usize) -> Option<Vec<u8>> {
    match sent_buffer(d)? {
        Sent::Buffer { addr, len } => read_bytes(tid, addr, len, max),
        Sent::Iovec { iov, count } => first_iovec(tid, iov, count, max),
        Sent::Message { msg } => first_msg_iovec(tid, msg, max),
    }
}

fn read_bytes(tid: u32, addr: u64, len: u64, max: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX).min(max)];
    let n = read_memory(tid, addr, &mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// The operation of a send made inside libssl call `call`: the request at the start of
/// the plaintext an `SSL_write` encrypts, when the bytes on the socket are that
/// plaintext's first record (TLS application data). Anything else — a send inside
/// `SSL_read` (a key update, an alert), a handshake record — is not an operation.
fn tls_operation(tid: u32, d: &SeccompData, call: &openbox_common::SslArgs) -> Option<Operation> {
    use openbox_common::{SRC_SSL_WRITE, SRC_SSL_WRITE_EX};
    if !matches!(call.source, SRC_SSL_WRITE | SRC_SSL_WRITE_EX) {
        return None;
    }
    let record = sent_bytes(tid, d, 3)?;
    if !is_application_data(&record) {
        return None;
    }
    let plaintext = read_bytes(tid, call.buf, call.num, HEAD_BYTES)?;
    tls_request(&plaintext)
}

/// Whether `buf` starts a TLS application-data record (content type 23, version 3.x).
fn is_application_data(buf: &[u8]) -> bool {
    tls_record_type(buf) == Some(TLS_APPLICATION_DATA)
}

const TLS_ALERT: u8 = 21;
const TLS_HANDSHAKE: u8 = 22;
const TLS_APPLICATION_DATA: u8 = 23;

/// The content type of the TLS record `buf` starts (change_cipher_spec, alert,
/// handshake or application data, version 3.x), when it starts one.
fn tls_record_type(buf: &[u8]) -> Option<u8> {
    match buf {
        [t @ 20..=23, 3, _, ..] => Some(*t),
        _ => None,
    }
}

/// The inode of socket `fd` of thread (or process) `tid`: what names a socket for as
/// long as it is open (a descriptor number is reused).
fn socket_inode(tid: u32, fd: RawFd) -> Option<u64> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(format!("/proc/{tid}/fd/{fd}")).ok()?;
    m.file_type().is_socket().then(|| m.ino())
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: one valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Which SSL object each TLS socket of a process carries (memory-BIO TLS), as held
/// sends linked them. A link lasts until its socket closes (the capture's close record,
/// [`MemoryBio::closed`]), another link takes its descriptor or its socket, or its
/// process exits ([`MemoryBio::exited`]): a long-lived worker's connections come and go
/// without it growing.
#[derive(Debug, Default)]
struct MemoryBio {
    /// (process, SSL object) → its socket: descriptor and inode.
    sockets: HashMap<(Pid, u64), (RawFd, u64)>,
    /// (process, socket inode) → its SSL object.
    owners: HashMap<(Pid, u64), u64>,
    /// (process, SSL object) → the activity whose step made its last write a send
    /// carried (absent: none): the writer of what its socket sends until then.
    writers: HashMap<(Pid, u64), ActivityKey>,
    /// (process, descriptor) → the SSL objects `sockets` links by that descriptor: the
    /// index a held send that starts no record is checked against (never empty).
    by_fd: HashMap<(Pid, RawFd), Vec<u64>>,
}

impl MemoryBio {
    fn link(&mut self, tgid: Pid, ssl: u64, fd: RawFd, ino: u64) {
        // Whatever else this descriptor linked was another socket, closed since (its
        // close record not read yet, or lost): nothing can send on it any more.
        for other in self.linked_elsewhere(tgid, fd, Some(ino)) {
            if other != ssl {
                self.unlink(tgid, other);
            }
        }
        if let Some((_, old)) = self.set_socket(tgid, ssl, fd, ino) {
            self.owners.remove(&(tgid, old));
        }
        if let Some(old) = self.owners.insert((tgid, ino), ssl) {
            if old != ssl {
                self.remove_socket(tgid, old);
                self.writers.remove(&(tgid, old));
            }
        }
    }

    /// Whether a link names descriptor `fd` of process `tgid`.
    fn linked_fd(&self, tgid: Pid, fd: RawFd) -> bool {
        self.by_fd.contains_key(&(tgid, fd))
    }

    /// Descriptor `fd` of process `tgid` was closed; `live` is the inode of the socket
    /// it names now, if any (a new socket may have taken the number, and been linked,
    /// before the close record was read). Every link by that descriptor to another
    /// socket goes.
    fn closed(&mut self, tgid: Pid, fd: RawFd, live: Option<u64>) {
        for ssl in self.linked_elsewhere(tgid, fd, live) {
            self.unlink(tgid, ssl);
        }
    }

    /// The SSL objects linked by descriptor `fd` of process `tgid` to a socket other
    /// than `live`.
    fn linked_elsewhere(&self, tgid: Pid, fd: RawFd, live: Option<u64>) -> Vec<u64> {
        self.by_fd
            .get(&(tgid, fd))
            .into_iter()
            .flatten()
            .copied()
            .filter(|&ssl| self.sockets.get(&(tgid, ssl)).map(|&(_, ino)| ino) != live)
            .collect()
    }

    /// Process `tgid` exited: every link of it goes.
    fn exited(&mut self, tgid: Pid) {
        self.sockets.retain(|&(pid, _), _| pid != tgid);
        self.owners.retain(|&(pid, _), _| pid != tgid);
        self.writers.retain(|&(pid, _), _| pid != tgid);
        self.by_fd.retain(|&(pid, _), _| pid != tgid);
    }

    /// Forgets SSL object `ssl` of process `tgid`: its socket, that socket's owner, its
    /// writer.
    fn unlink(&mut self, tgid: Pid, ssl: u64) {
        if let Some((_, ino)) = self.remove_socket(tgid, ssl) {
            if self.owners.get(&(tgid, ino)) == Some(&ssl) {
                self.owners.remove(&(tgid, ino));
            }
        }
        self.writers.remove(&(tgid, ssl));
    }

    /// `sockets`' insert, keeping `by_fd` its index.
    fn set_socket(&mut self, tgid: Pid, ssl: u64, fd: RawFd, ino: u64) -> Option<(RawFd, u64)> {
        let old = self.sockets.insert((tgid, ssl), (fd, ino));
        if let Some((old_fd, _)) = old {
            self.unindex(tgid, ssl, old_fd);
        }
        self.by_fd.entry((tgid, fd)).or_default().push(ssl);
        old
    }

    /// `sockets`' remove, keeping `by_fd` its index.
    fn remove_socket(&mut self, tgid: Pid, ssl: u64) -> Option<(RawFd, u64)> {
        let old = self.sockets.remove(&(tgid, ssl));
        if let Some((fd, _)) = old {
            self.unindex(tgid, ssl, fd);
        }
        old
    }

    fn unindex(&mut self, tgid: Pid, ssl: u64, fd: RawFd) {
        if let Some(list) = self.by_fd.get_mut(&(tgid, fd)) {
            list.retain(|&s| s != ssl);
            if list.is_empty() {
                self.by_fd.remove(&(tgid, fd));
            }
        }
    }

    /// A send carrying `carried` (a write): its writer is now its SSL object's.
    fn written(&mut self, tgid: Pid, carried: Carried) -> BioSend {
        let writer = match &carried {
            Carried::Write(key, w) => {
                let writer = (w.activity != 0).then_some((w.owner, w.activity));
                match writer {
                    None => self.writers.remove(&(tgid, key.ssl)),
                    Some(a) => self.writers.insert((tgid, key.ssl), a),
                };
                writer
            }
            _ => None,
        };
        BioSend { carried, writer }
    }
}

/// A held TLS send outside libssl ([`Enforcer::memory_bio_send`]): what it carries, and
/// the activity whose step encrypted that (none, or not known).
#[derive(Debug)]
struct BioSend {
    carried: Carried,
    writer: Option<ActivityKey>,
}

impl BioSend {
    fn nothing() -> BioSend {
        BioSend {
            carried: Carried::Nothing,
            writer: None,
        }
    }
}

/// What a held TLS send outside libssl carries ([`Enforcer::memory_bio_send`]).
#[derive(Debug)]
enum Carried {
    /// No plaintext waits for this socket: a handshake record, an alert, the rest of an
    /// earlier send.
    Nothing,
    /// The plaintext its SSL object encrypted since its socket last sent (the first
    /// write's first bytes, and how many writes).
    Write(UnsentKey, Box<UnsentWrite>),
    /// Two or more SSL objects of the thread wait for a socket none owns yet.
    Ambiguous,
}

impl Carried {
    fn taken(&self, e: &Enforcer) -> Option<Taken> {
        match self {
            Carried::Write(key, _) => Some(Taken {
                unsent: e.unsent.get()?.clone(),
                key: *key,
            }),
            _ => None,
        }
    }

    /// The operation the send starts: the request at the start of the first unsent
    /// write (a write that starts no request — a body's continuation — is none), or
    /// [`Operation::Unnamed`] when that cannot be told exactly.
    fn operation(self, stats: &Stats) -> Option<Operation> {
        let op = match self {
            Carried::Nothing => return None,
            Carried::Ambiguous => Some(Operation::Unnamed {
                why: "two or more SSL objects of the thread wait for a socket",
            }),
            Carried::Write(_, w) => unsent_operation(&w),
        };
        match &op {
            Some(Operation::Unnamed { .. }) => stats.tls_unnamed.fetch_add(1, Relaxed),
            _ => stats.tls_named.fetch_add(1, Relaxed),
        };
        op
    }
}

/// The request at the start of a memory-BIO SSL object's first unsent write: named as
/// [`tls_request`] names it when its head is within the kept bytes; a head cut by them
/// (or bytes the kernel could not read) cannot be named exactly.
fn unsent_operation(w: &UnsentWrite) -> Option<Operation> {
    let kept = (w.head_len as usize).min(w.head.len());
    if kept == 0 && w.len > 0 {
        return Some(Operation::Unnamed {
            why: "the plaintext could not be read",
        });
    }
    let head = &w.head[..kept];
    let all = kept as u64 >= w.len;
    let cut = Some(Operation::Unnamed {
        why: "a request longer than the bytes kept",
    });
    match tls_request(head) {
        Some(Operation::Http { .. }) if !all && !head.windows(4).any(|x| x == b"\r\n\r\n") => cut,
        Some(op) => Some(op),
        // A request line or a query cut by the kept bytes.
        None if !all && starts_request(head) => cut,
        None => None,
    }
}

const METHODS: [&str; 9] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
];

/// Whether `buf` starts like a request the agent governs (an HTTP method and a space, a
/// PostgreSQL query message), whole or not.
fn starts_request(buf: &[u8]) -> bool {
    buf.first() == Some(&b'Q')
        || METHODS.iter().any(|m| {
            buf.strip_prefix(m.as_bytes())
                .is_some_and(|rest| rest.first() == Some(&b' '))
        })
}

/// The request at the start of an `SSL_write`'s plaintext, named as the capture names a
/// TLS stream's: an HTTP URL with scheme `https`.
pub fn tls_request(plaintext: &[u8]) -> Option<Operation> {
    match request(plaintext)? {
        Operation::Http {
            method,
            url,
            target,
            host,
            headers,
        } => Some(Operation::Http {
            method,
            url: match url.strip_prefix("http://") {
                Some(rest) if !target.starts_with("http://") => format!("https://{rest}"),
                _ => url,
            },
            target,
            host,
            headers,
        }),
        other => Some(other),
    }
}

fn first_iovec(tid: u32, iov: u64, count: u64, max: usize) -> Option<Vec<u8>> {
    if count == 0 {
        return None;
    }
    let mut raw = [0u8; 16];
    read_memory(tid, iov, &mut raw).ok()?;
    let base = u64::from_ne_bytes(raw[..8].try_into().ok()?);
    let len = u64::from_ne_bytes(raw[8..].try_into().ok()?);
    read_bytes(tid, base, len, max)
}

fn first_msg_iovec(tid: u32, msg: u64, max: usize) -> Option<Vec<u8>> {
    // struct msghdr: name (8), namelen (4 + 4 padding), iov (8), iovlen (8), ...
    let mut raw = [0u8; 32];
    read_memory(tid, msg, &mut raw).ok()?;
    let iov = u64::from_ne_bytes(raw[16..24].try_into().ok()?);
    let count = u64::from_ne_bytes(raw[24..32].try_into().ok()?);
    first_iovec(tid, iov, count, max)
}

fn read_c_string(tid: u32, addr: u64) -> Option<String> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // A path can end near the end of a mapping: read what is readable.
    let n = read_memory(tid, addr, &mut buf)
        .or_else(|_| read_memory(tid, addr, &mut buf[..256]))
        .ok()?;
    let end = buf[..n].iter().position(|b| *b == 0)?;
    String::from_utf8(buf[..end].to_vec()).ok()
}

/// `path` as the kernel will see it: relative to the caller's working directory or to
/// `dirfd`.
fn resolve(tid: u32, dirfd: i32, path: &str) -> Option<String> {
    if path.starts_with('/') {
        return Some(path.to_owned());
    }
    let base = if dirfd == libc::AT_FDCWD {
        std::fs::read_link(format!("/proc/{tid}/cwd")).ok()?
    } else {
        std::fs::read_link(format!("/proc/{tid}/fd/{dirfd}")).ok()?
    };
    Some(base.join(path).to_string_lossy().into_owned())
}

/// The request at the start of a buffer being sent: a plain-HTTP head or a PostgreSQL
/// simple query.
fn request(buf: &[u8]) -> Option<Operation> {
    http_head(buf).or_else(|| pg_query(buf))
}

/// A PostgreSQL simple query message (`Q`, length, statement, NUL) at the start of
/// `buf`, whole within it (a longer statement than the bytes read is not held).
pub fn pg_query(buf: &[u8]) -> Option<Operation> {
    if buf.first() != Some(&b'Q') || buf.len() < 6 {
        return None;
    }
    let len = u32::from_be_bytes(buf[1..5].try_into().ok()?) as usize;
    // The length counts itself and the NUL; the message must be in the buffer whole.
    if len < 5 || buf.len() < 1 + len || buf[len] != 0 {
        return None;
    }
    let statement = std::str::from_utf8(&buf[5..len]).ok()?;
    if statement.contains('\0') {
        return None;
    }
    Some(Operation::Sql {
        statement: statement.to_owned(),
    })
}

/// A plain-HTTP/1.x request head at the start of `buf`: method, URL (`http://` + Host +
/// target, as the capture names it) and headers. `None` for anything else (TLS records,
/// a body, another protocol).
pub fn http_head(buf: &[u8]) -> Option<Operation> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[..line_end]).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if !METHODS.contains(&method) || !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return None;
    }
    let mut headers = Map::new();
    let rest = &buf[line_end + 2..];
    let head_end = rest
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(rest.len(), |p| p + 2);
    for h in String::from_utf8_lossy(&rest[..head_end]).split("\r\n") {
        if let Some((name, value)) = h.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().into());
        }
    }
    let host = headers
        .get("host")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let url = if target.starts_with("http://") {
        target.to_owned()
    } else {
        format!("http://{host}{target}")
    };
    Some(Operation::Http {
        method: method.to_owned(),
        url,
        target: target.to_owned(),
        host,
        headers,
    })
}

/// Whether this kernel gives seccomp user notification (`check`): a listener flag the
/// kernel knows, asked without installing anything (`SECCOMP_GET_ACTION_AVAIL`).
pub fn user_notification_available() -> bool {
    const SECCOMP_GET_ACTION_AVAIL: libc::c_ulong = 2;
    const SECCOMP_RET_USER_NOTIF: u32 = 0x7fc0_0000;
    let action = SECCOMP_RET_USER_NOTIF;
    // SAFETY: reads one u32 from our memory.
    unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_GET_ACTION_AVAIL,
            0,
            &action as *const u32,
        ) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_http_request_head_is_named_as_the_capture_names_it() {
        let op = http_head(
            b"POST /e2e/x?q=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAuthorization: b\r\n\r\n{}",
        )
        .unwrap();
        match &op {
            Operation::Http {
                method,
                url,
                headers,
                ..
            } => {
                assert_eq!(method, "POST");
                assert_eq!(url, "http://127.0.0.1:8080/e2e/x?q=1");
                assert_eq!(headers["authorization"], "b");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(op.key(), "http POST http://127.0.0.1:8080/e2e/x?q=1");
    }

    #[test]
    fn a_postgres_simple_query_is_read_whole() {
        let mut m = b"Q\0\0\0\x0eSELECT 1;\0".to_vec();
        assert_eq!(
            pg_query(&m),
            Some(Operation::Sql {
                statement: "SELECT 1;".into()
            })
        );
        m.extend_from_slice(b"X\0\0\0\x04");
        assert!(pg_query(&m).is_some(), "followed by another message");
        assert_eq!(pg_query(&m[..8]), None, "cut short");
        assert_eq!(
            pg_query(b"Q\0\0\0\x02\0"),
            None,
            "a length below its own size"
        );
    }

    #[test]
    fn tls_plaintext_is_named_with_the_https_scheme() {
        let op = tls_request(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:8443\r\n\r\n").unwrap();
        assert_eq!(op.key(), "http GET https://127.0.0.1:8443/x");
        let proxied = tls_request(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n");
        assert_eq!(
            proxied.unwrap().key(),
            "http GET http://a.example/",
            "an absolute target stays"
        );
        let q = tls_request(b"Q\0\0\0\x0eSELECT 1;\0").unwrap();
        assert_eq!(q.key(), "sql SELECT 1;");
        assert!(is_application_data(b"\x17\x03\x03\x00\x20"));
        assert!(
            !is_application_data(b"\x16\x03\x01\x02\x00"),
            "a handshake record"
        );
        assert!(!is_application_data(b"\x17"), "too short to tell");
    }

    fn unsent(first: &[u8], len: u64) -> UnsentWrite {
        let mut w = UnsentWrite {
            tid: 7,
            writes: 1,
            len,
            head_len: first.len().min(openbox_common::UNSENT_HEAD) as u32,
            ..UnsentWrite::default()
        };
        let n = w.head_len as usize;
        w.head[..n].copy_from_slice(&first[..n]);
        w
    }

    #[test]
    fn a_memory_bio_write_is_named_only_when_it_starts_a_whole_request_head() {
        let head = b"GET /blocked/x HTTP/1.1\r\nHost: 127.0.0.1:8443\r\nAccept: */*\r\n\r\n";
        let op = unsent_operation(&unsent(head, head.len() as u64)).unwrap();
        assert_eq!(op.key(), "http GET https://127.0.0.1:8443/blocked/x");
        // The head and its body in one write: the head is whole within the kept bytes.
        let mut with_body = head.to_vec();
        with_body.extend(std::iter::repeat_n(b'a', 4000));
        let op = unsent_operation(&unsent(&with_body, with_body.len() as u64)).unwrap();
        assert_eq!(op.key(), "http GET https://127.0.0.1:8443/blocked/x");
        // A body's continuation starts no request.
        assert_eq!(unsent_operation(&unsent(b"aaaa{\"x\": 1}", 12)), None);
        // A head longer than the kept bytes: its headers cannot all be read, so it is
        // not named (nor let through as "no request").
        let mut long = b"GET /x HTTP/1.1\r\nHost: h\r\nCookie: ".to_vec();
        long.extend(std::iter::repeat_n(b'c', 3000));
        long.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(
            unsent_operation(&unsent(&long, long.len() as u64)),
            Some(Operation::Unnamed { .. })
        ));
        // A request line (or a query) longer than the kept bytes.
        let mut long_url = b"GET /".to_vec();
        long_url.extend(std::iter::repeat_n(b'u', 3000));
        assert!(matches!(
            unsent_operation(&unsent(&long_url, 3100)),
            Some(Operation::Unnamed { .. })
        ));
        let mut long_query = b"Q\0\0\x0b\xc0SELECT '".to_vec();
        long_query.extend(std::iter::repeat_n(b'q', 3000));
        assert!(matches!(
            unsent_operation(&unsent(&long_query, 3009)),
            Some(Operation::Unnamed { .. })
        ));
        // Bytes the kernel could not read.
        let mut unread = unsent(b"", 0);
        unread.len = 100;
        assert!(matches!(
            unsent_operation(&unread),
            Some(Operation::Unnamed { .. })
        ));
        // A PostgreSQL query over TLS.
        let q = unsent_operation(&unsent(b"Q\0\0\0\x0eSELECT 1;\0", 15)).unwrap();
        assert_eq!(q.key(), "sql SELECT 1;");
    }

    #[test]
    fn tls_records_are_told_by_their_content_type() {
        assert_eq!(
            tls_record_type(b"\x16\x03\x01\x02\x00\x01"),
            Some(TLS_HANDSHAKE)
        );
        assert_eq!(tls_record_type(b"\x14\x03\x03\x00\x01\x01"), Some(20));
        assert_eq!(
            tls_record_type(b"\x17\x03\x03\x00\x20"),
            Some(TLS_APPLICATION_DATA)
        );
        assert_eq!(tls_record_type(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(
            tls_record_type(b"\x18\x03\x03"),
            None,
            "no such content type"
        );
        assert_eq!(tls_record_type(b"Q\0\0\0\x0e"), None);
    }

    #[test]
    fn a_socket_carries_one_ssl_object_and_relinking_forgets_the_old_pairing() {
        let mut bio = MemoryBio::default();
        bio.link(1, 0xa, 5, 100);
        assert_eq!(bio.owners[&(1, 100)], 0xa);
        // The SSL object's address reused by another object on a new socket.
        bio.link(1, 0xa, 6, 200);
        assert_eq!(bio.owners.get(&(1, 100)), None);
        assert_eq!(bio.sockets[&(1, 0xa)], (6, 200));
        // Another object on the same socket (inode) takes it over.
        bio.link(1, 0xb, 6, 200);
        assert_eq!(bio.owners[&(1, 200)], 0xb);
        assert_eq!(bio.sockets.get(&(1, 0xa)), None);
        // Processes apart.
        bio.link(2, 0xb, 6, 200);
        assert_eq!(bio.owners[&(1, 200)], 0xb);
        assert_eq!(bio.owners[&(2, 200)], 0xb);
        assert_indexed(&bio);
    }

    /// `by_fd` is exactly `sockets` indexed by descriptor, and `owners` its inverse.
    fn assert_indexed(bio: &MemoryBio) {
        let mut want: HashMap<(Pid, RawFd), Vec<u64>> = HashMap::new();
        for (&(pid, ssl), &(fd, ino)) in &bio.sockets {
            want.entry((pid, fd)).or_default().push(ssl);
            assert_eq!(bio.owners.get(&(pid, ino)), Some(&ssl), "{bio:?}");
        }
        let mut got = bio.by_fd.clone();
        for list in want.values_mut().chain(got.values_mut()) {
            list.sort_unstable();
        }
        assert_eq!(got, want, "{bio:?}");
        assert_eq!(bio.owners.len(), bio.sockets.len(), "{bio:?}");
    }

    #[test]
    fn a_linked_descriptor_is_found_by_its_index() {
        let mut bio = MemoryBio::default();
        assert!(!bio.linked_fd(1, 5));
        bio.link(1, 0xa, 5, 100);
        assert!(bio.linked_fd(1, 5));
        assert!(!bio.linked_fd(2, 5), "processes apart");
        assert!(!bio.linked_fd(1, 6));
        // The SSL object's address reused on a new socket: the index follows it.
        bio.link(1, 0xa, 6, 200);
        assert!(!bio.linked_fd(1, 5));
        assert!(bio.linked_fd(1, 6));
        // Another object takes that socket over.
        bio.link(1, 0xb, 6, 200);
        assert!(bio.linked_fd(1, 6));
        assert_eq!(bio.by_fd[&(1, 6)], vec![0xb]);
        assert_indexed(&bio);
    }

    #[test]
    fn a_closed_socket_is_forgotten_unless_its_descriptor_names_it_still() {
        let mut bio = MemoryBio::default();
        bio.link(1, 0xa, 5, 100);
        bio.link(1, 0xb, 7, 300);
        bio.written(
            1,
            Carried::Write(
                UnsentKey {
                    tgid: 1,
                    _pad: 0,
                    ssl: 0xa,
                },
                Box::new(UnsentWrite {
                    owner: 1,
                    activity: 7,
                    ..UnsentWrite::default()
                }),
            ),
        );
        // The close record read after a new socket took the number and was linked: the
        // new link stays.
        bio.closed(1, 5, Some(100));
        assert_eq!(bio.owners[&(1, 100)], 0xa);
        assert_eq!(bio.writers[&(1, 0xa)], (1, 7));
        // Closed for good: all of it goes, the other socket's link stays.
        bio.closed(1, 5, None);
        assert!(!bio.linked_fd(1, 5));
        assert_eq!(bio.owners.get(&(1, 100)), None);
        assert_eq!(bio.sockets.get(&(1, 0xa)), None);
        assert_eq!(bio.writers.get(&(1, 0xa)), None);
        assert_eq!(bio.owners[&(1, 300)], 0xb);
        // A socket the process never linked: nothing changes.
        bio.closed(1, 9, None);
        assert_indexed(&bio);
        assert_eq!(bio.sockets.len(), 1);
    }

    #[test]
    fn a_new_socket_linked_on_a_reused_descriptor_drops_the_old_link() {
        let mut bio = MemoryBio::default();
        bio.link(1, 0xa, 5, 100);
        // Socket 100 closed (its close record not read yet), a new one got descriptor 5.
        bio.link(1, 0xb, 5, 200);
        assert_eq!(bio.by_fd[&(1, 5)], vec![0xb]);
        assert_eq!(bio.owners.get(&(1, 100)), None);
        assert_eq!(bio.sockets.get(&(1, 0xa)), None);
        // The late close record finds the new socket at 5: it stays.
        bio.closed(1, 5, Some(200));
        assert_eq!(bio.owners[&(1, 200)], 0xb);
        assert_indexed(&bio);
    }

    #[test]
    fn links_do_not_outlive_their_sockets_or_their_process() {
        let mut bio = MemoryBio::default();
        // A long-lived worker's connections, one after another on the lowest free
        // descriptors, each with an SSL object of its own; every other close record lost
        // (the next link on the number drops it).
        for i in 0..10_000u64 {
            let fd = 10 + (i % 3) as RawFd;
            bio.link(1, 0x1000 + i, fd, 1_000 + i);
            if i % 2 == 0 {
                bio.closed(1, fd, None);
            }
            assert!(bio.sockets.len() <= 3, "{i}: {}", bio.sockets.len());
        }
        assert_indexed(&bio);
        bio.link(2, 0xa, 5, 100);
        bio.exited(1);
        assert!(bio.sockets.keys().all(|&(pid, _)| pid == 2));
        assert!(bio.by_fd.keys().all(|&(pid, _)| pid == 2));
        assert!(bio.owners.keys().all(|&(pid, _)| pid == 2));
        bio.exited(2);
        assert!(bio.sockets.is_empty() && bio.owners.is_empty() && bio.by_fd.is_empty());
        assert!(bio.writers.is_empty());
    }

    #[test]
    fn what_a_socket_sends_belongs_to_the_activity_whose_step_wrote_it_last() {
        let mut bio = MemoryBio::default();
        bio.link(1, 0xa, 5, 100);
        let key = UnsentKey {
            tgid: 1,
            _pad: 0,
            ssl: 0xa,
        };
        let write = |activity| {
            let mut w = unsent(b"POST /up HTTP/1.1\r\n\r\n", 23);
            (w.owner, w.activity) = (1, activity);
            Carried::Write(key, Box::new(w))
        };
        // Activity 7's step wrote it: that send, and the rest of it after, are 7's.
        assert_eq!(bio.written(1, write(7)).writer, Some((1, 7)));
        assert_eq!(bio.writers[&(1, 0xa)], (1, 7));
        // Then a write made outside any activity: its remainder is nobody's.
        assert_eq!(bio.written(1, write(0)).writer, None);
        assert_eq!(bio.writers.get(&(1, 0xa)), None);
        bio.written(1, write(9));
        // Another SSL object on that socket: the old one's writer is forgotten.
        bio.link(1, 0xb, 5, 100);
        assert_eq!(bio.writers.get(&(1, 0xa)), None);
    }

    #[test]
    fn other_bytes_are_no_request() {
        for b in [
            &b"\x16\x03\x01\x02\x00\x01"[..],
            b"GET / HTTP/2\r\n",
            b"{\"id\":1,\"op\":\"thread\"}\n",
            b"GET /",
            b"",
        ] {
            assert_eq!(http_head(b), None, "{b:?}");
        }
    }

    #[test]
    fn a_held_file_and_its_captured_span_share_a_key() {
        let op = Operation::File {
            path: "/tmp/a.txt".into(),
            flags: (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC) as u32,
        };
        let span = crate::governance::testutil::span(
            "file.open",
            serde_json::json!({"file.path": "/tmp/a.txt", "file.mode": "w"}),
        );
        assert_eq!(span_key(&span).as_deref(), Some(op.key().as_str()));
    }
}
