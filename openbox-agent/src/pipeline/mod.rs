//! The capture pipeline, one stage per module:
//!
//! kernel programs (`openbox-ebpf`) → ring buffer → [`capture::event::decode`] →
//! [`conn::Tracker`] (descriptors, streams, TLS linking; records out, kernel-map
//! actions back) → [`span::SpanBuilder`] (protocol detection and parsers) → [`Sink`]s
//! (the `trace` printer, the daemon's attribution, exporters).
//!
//! A [`Session`] owns every stage after the ring buffer and the loaded programs; the
//! [`Ring`] is kept apart so a command's event loop can wait on it while it also
//! borrows the session for other work (hook requests, signals).
//!
//! [`capture::event::decode`]: crate::capture::event::decode
//! [`conn::Tracker`]: crate::conn::Tracker
//! [`span::SpanBuilder`]: crate::span::SpanBuilder

pub mod drain;
pub mod position;
pub mod sink;

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{anyhow, Result};
use aya::maps::{MapData, RingBuf};
use openbox_common::{FD_FILE, FD_NO_PAYLOAD, FD_QUIET, FD_SOCKET};
use serde::Serialize;

pub use self::{
    position::{Mark, RingOrder},
    sink::{Collect, Sink},
};
use crate::{
    capture::{
        clock::{now_mono, Clock},
        event, pause, tls, Capture, CaptureConfig, Counters,
    },
    conn::{Action, Pid, ProcEnv, Record, SkipPaths, Tracker},
    procfs::{self, FdTarget, Procfs},
    span::{Span, SpanBuilder, SpanConfig},
    workload::Workload,
};

/// What a session makes of the records.
#[derive(Debug, Clone)]
pub enum Output {
    /// Spans, through the protocol parsers (records are still shown to the sinks).
    Spans(SpanConfig),
    /// Capture records only: every byte stays copied, no parser runs.
    Records,
}

/// The user-space side's own counts, beside the kernel's [`Counters`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Ring-buffer records read.
    pub records_received: u64,
    /// Records that did not decode (a kernel/agent layout mismatch; never expected).
    pub unparsed_records: u64,
    /// Protocol messages the parsers could not make sense of (closed connections).
    pub unparsed_messages: u64,
    /// The same, by protocol (`http`, `postgres`, …; protocols without losses absent).
    pub unparsed_by_protocol: std::collections::BTreeMap<&'static str, u64>,
    /// The same again, by protocol and then by reason (`malformed`, `gap`, `unpaired`,
    /// `oversize`; see `protocol::Loss`).
    pub parser_losses:
        std::collections::BTreeMap<&'static str, std::collections::BTreeMap<&'static str, u64>>,
    /// Connections of no known protocol.
    pub unrecognised_connections: u64,
    /// Processes resumed once the TLS probes of the libssl they opened were attached.
    pub resumed: u64,
    /// Paused processes the agent could not resume (each also logged at error level).
    pub resume_failures: u64,
    /// Processes an earlier agent left stopped when it ended without resuming them (a
    /// crash), resumed at this one's start.
    pub resumed_at_start: u64,
    /// The libssl probes, attached per watched process.
    pub tls_probes: tls::TlsProbeStats,
    /// Memory-BIO plaintext that could not be linked to its socket exactly.
    pub tls_links: crate::conn::TlsLinks,
    /// The queue between the ring buffer's drain thread and the session.
    pub ring_queue: drain::QueueStats,
}

pub struct Session<S: Sink> {
    cap: Capture,
    tracker: Tracker,
    clock: Clock,
    spans: Option<SpanBuilder>,
    sink: S,
    records_received: u64,
    unparsed_records: u64,
    resumed: u64,
    resume_failures: u64,
    /// The ring's queue, as of the last drain.
    queue: drain::QueueStats,
    /// The container (and pod) of each process that made a span, read once per process
    /// and forgotten when it exits.
    workloads: HashMap<Pid, Workload>,
    /// Test-only (`OPENBOX_TEST_HOLD_PAUSED`, see `capture::pause::HOLD_ENV`): paused
    /// processes stay stopped until the agent ends.
    hold_paused: bool,
    /// Test-only ([`STALL_ENV`]): the session's thread sleeps this long at its first
    /// record, as it would waiting for a CPU on a busy node.
    stall: Option<Duration>,
}

/// Test-only: milliseconds the session's thread is held up at its first record (the
/// ring buffer must still be emptied meanwhile).
pub const STALL_ENV: &str = "OPENBOX_TEST_STALL_MS";

/// Loads the kernel programs, checks the libssl copies named on the command line (they
/// are probed in each watched process that maps them, as the ones named libssl are),
/// and opens the ring buffer. The start of both `trace` and `run`.
pub fn start<S: Sink>(
    capture: &CaptureConfig,
    tls_libs: &[PathBuf],
    skip: SkipPaths,
    output: Output,
    sink: S,
) -> Result<(Session<S>, Ring)> {
    let mut cap = Capture::load(capture)?;
    for lib in tls_libs {
        cap.name_tls_lib(lib).map_err(|e| anyhow!("{e}"))?;
    }
    let ring = Ring::new(cap.events()?, capture.queue_bytes)?;
    Ok((Session::new(cap, skip, output, sink), ring))
}

impl<S: Sink> Session<S> {
    pub fn new(cap: Capture, skip: SkipPaths, output: Output, sink: S) -> Self {
        let clock = Clock::new();
        let spans = match output {
            Output::Spans(cfg) => Some(SpanBuilder::new(cfg, clock)),
            Output::Records => None,
        };
        Session {
            cap,
            tracker: Tracker::new(skip),
            clock,
            spans,
            sink,
            records_received: 0,
            unparsed_records: 0,
            resumed: 0,
            resume_failures: 0,
            queue: Default::default(),
            workloads: HashMap::new(),
            hold_paused: std::env::var_os(pause::HOLD_ENV).is_some(),
            stall: std::env::var(STALL_ENV)
                .ok()
                .and_then(|ms| ms.parse().ok())
                .map(Duration::from_millis),
        }
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    pub fn capture(&self) -> &Capture {
        &self.cap
    }

    pub fn capture_mut(&mut self) -> &mut Capture {
        &mut self.cap
    }

    pub fn sink(&self) -> &S {
        &self.sink
    }

    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    pub fn spans_enabled(&self) -> bool {
        self.spans.is_some()
    }

    pub fn stats(&self) -> Stats {
        let (unparsed_by_protocol, unrecognised_connections) = self
            .spans
            .as_ref()
            .map(|b| (b.unparsed.clone(), b.unknown_conns))
            .unwrap_or_default();
        let mut parser_losses = std::collections::BTreeMap::new();
        for ((protocol, why), n) in self.spans.iter().flat_map(|b| b.lost.iter()) {
            parser_losses
                .entry(*protocol)
                .or_insert_with(std::collections::BTreeMap::new)
                .insert(*why, *n);
        }
        Stats {
            records_received: self.records_received,
            unparsed_records: self.unparsed_records,
            unparsed_messages: unparsed_by_protocol.values().sum(),
            unparsed_by_protocol,
            parser_losses,
            unrecognised_connections,
            resumed: self.resumed,
            resume_failures: self.resume_failures + self.cap.recovered().failures,
            resumed_at_start: self.cap.recovered().resumed,
            tls_probes: self.cap.tls_stats(),
            tls_links: self.tracker.tls_links,
            ring_queue: self.queue,
        }
    }

    pub fn counters(&self) -> Counters {
        self.cap.counters()
    }

    /// Starts watching a process: the kernel filters on it from now on, its open
    /// descriptors are learnt from /proc, and the libssl copies it maps are probed.
    pub fn watch(&mut self, pid: Pid) -> Result<()> {
        self.cap.watch(pid)?;
        self.seed(pid, None);
        self.scan_tls(pid);
        Ok(())
    }

    /// Starts watching a process that has not run its command yet (`trace -- CMD`'s
    /// child, stopped between fork and exec): its libraries are looked at after its exec,
    /// as every exec's are. Scanning them now would read the agent's own executable,
    /// which the child still maps: 80 MB with debug information, a quarter of a second
    /// of `trace`'s start-up.
    pub fn watch_before_exec(&mut self, pid: Pid) -> Result<()> {
        self.cap.watch(pid)?;
        // Only what the exec keeps: the rest are the agent's own descriptors (its
        // signal sockets among them, and looking a socket up reads /proc/net/tcp*,
        // 25–75 ms on a busy node, between the programs' attach and the command's start).
        self.seed_from(pid, None, procfs::fds_kept_across_exec(pid));
        Ok(())
    }

    /// One ring-buffer record through every stage.
    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        if let Some(stall) = self.stall.take() {
            tracing::warn!(
                "{STALL_ENV} is set (tests only): the session's thread sleeps {} ms",
                stall.as_millis()
            );
            std::thread::sleep(stall);
        }
        self.records_received += 1;
        let ev = match event::decode(bytes) {
            Ok(ev) => ev,
            Err(e) => {
                self.unparsed_records += 1;
                tracing::debug!("undecodable record: {e}");
                // A process stopped for its TLS probes must run on, whatever the record.
                if let Some(pid) = event::paused_tgid(bytes) {
                    self.resume(pid);
                }
                return;
            }
        };
        let (mut records, mut actions) = (Vec::new(), Vec::new());
        self.tracker.handle(ev, &Procfs, &mut records, &mut actions);
        for r in &records {
            self.output(r);
        }
        for a in actions {
            self.act(a);
        }
    }

    /// Finishes the spans of connections and files still open (the end of a session).
    pub fn finish(&mut self) {
        if let Some(builder) = self.spans.as_mut() {
            let mut spans = Vec::new();
            builder.finish(now_mono(), &mut spans);
            for span in spans {
                self.emit(span);
            }
        }
        self.sink.flush();
    }

    fn output(&mut self, r: &Record) {
        if let Some(builder) = self.spans.as_mut() {
            let mut spans = Vec::new();
            builder.handle(r, &mut spans);
            let given_up = std::mem::take(&mut builder.given_up);
            for span in spans {
                self.emit(span);
            }
            // Span mode only: records mode shows every byte, so it keeps copying them.
            for conn in given_up {
                for action in self.tracker.stop_payload(&conn) {
                    self.act(action);
                }
            }
        }
        self.sink.record(r, &self.clock);
        if let Record::Exit { pid, .. } = r {
            self.workloads.remove(pid);
        }
    }

    /// A span to the sink, with its process's container and pod as resource attributes
    /// (`container.id`, `k8s.pod.uid`, `k8s.pod.name`, `k8s.namespace.name`).
    fn emit(&mut self, mut span: Span) {
        self.workloads
            .entry(span.pid)
            .or_insert_with(|| Workload::of(span.pid))
            .annotate(&mut span.attributes);
        self.sink.span(span);
    }

    /// Attaches TLS probes for `pid` to the libssl copies it maps now (its executable
    /// included, and the libraries named with `--tls-lib`).
    fn scan_tls(&mut self, pid: Pid) {
        let exe = procfs::exe(pid);
        let Ok(files) = procfs::mapped_files(pid) else {
            return;
        };
        let mut seen = std::collections::HashSet::new();
        for f in files {
            if !seen.insert(f.path.clone()) {
                continue;
            }
            let path = procfs::in_root(pid, &f.path);
            if !tls::may_hold_libssl(&f.path, exe.as_deref()) && !self.cap.is_named_tls_lib(&path) {
                continue;
            }
            if f.deleted {
                // The name now leads to another file (an upgraded package) or none:
                // probing it would watch the wrong code.
                tracing::warn!(pid, lib = %f.path, "a libssl copy this process maps was replaced or deleted on disk since: its TLS plaintext is not captured");
                continue;
            }
            if self.cap.has_tls_lib(pid, &path) {
                continue;
            }
            match self.cap.attach_tls(pid, &path) {
                Ok(n) if n > 0 => {
                    tracing::info!(pid, lib = %f.path, opened = %path.display(), probes = n, "attached TLS probes")
                }
                Ok(_) => {}
                // An executable without libssl symbols is the common case: stay quiet.
                Err(tls::AttachError::NoSymbols { .. }) if Some(&f.path) == exe.as_ref() => {}
                Err(e) => tracing::warn!(pid, "{e}"),
            }
        }
    }

    /// After an exec: releases the probes on libraries the new image does not map, and
    /// attaches to those it does.
    fn rescan_tls(&mut self, pid: Pid) {
        let mapped = procfs::mapped_files(pid)
            .map(|files| {
                files
                    .iter()
                    .filter(|f| !f.deleted)
                    .filter_map(|f| tls::file_id(&procfs::in_root(pid, &f.path)).ok())
                    .collect()
            })
            .unwrap_or_default();
        self.cap.retain_tls(pid, &mapped);
        self.scan_tls(pid);
    }

    /// Registers the descriptors a process has now, in the tracker and the kernel. After
    /// an exec at `exec_ts`, descriptors that vanished (O_CLOEXEC) are closed.
    fn seed(&mut self, pid: Pid, exec_ts: Option<u64>) {
        self.seed_from(pid, exec_ts, procfs::fds(pid));
    }

    /// [`Session::seed`] with `now`, the process's descriptors read from /proc.
    fn seed_from(&mut self, pid: Pid, exec_ts: Option<u64>, now: Vec<(i32, FdTarget)>) {
        if let Some(at) = exec_ts {
            for fd in self.tracker.fds_of(pid) {
                if !now.iter().any(|(f, _)| *f == fd) {
                    self.cap.forget_fd_before(pid, fd, at);
                    let (mut records, mut actions) = (Vec::new(), Vec::new());
                    self.tracker
                        .close_vanished(pid, fd, at, &mut records, &mut actions);
                    for r in &records {
                        self.output(r);
                    }
                    for a in actions {
                        self.act(a);
                    }
                }
            }
        }
        for (fd, target) in now {
            match target {
                FdTarget::Socket(_) => {
                    let gen = self.cap.seed_fd(pid, fd, FD_SOCKET);
                    let (_, remote) = Procfs.socket_addrs(pid, fd);
                    self.tracker.seed_socket(pid, fd, remote, gen);
                }
                FdTarget::File(path) => {
                    let gen = self.cap.seed_fd(pid, fd, FD_FILE);
                    if !self.tracker.seed_file(pid, fd, path, gen) {
                        self.cap.set_fd_flags(pid, fd, gen, FD_QUIET);
                    }
                }
                FdTarget::Other => {}
            }
        }
    }

    /// Carries out what the tracker asked of the kernel side.
    fn act(&mut self, action: Action) {
        match action {
            Action::NoPayload(pid, fd, gen) => self.cap.set_fd_flags(pid, fd, gen, FD_NO_PAYLOAD),
            Action::Quiet(pid, fd, gen) => self.cap.set_fd_flags(pid, fd, gen, FD_QUIET),
            Action::ClearFlags(pid, fd, gen) => self.cap.clear_fd_flags(pid, fd, gen),
            Action::ForgetFds { pid, fds, before } => {
                for fd in fds {
                    self.cap.forget_fd_before(pid, fd, before);
                }
            }
            Action::AttachTls { pid, path, paused } => {
                let p = procfs::in_root(pid, &path);
                match self.cap.attach_tls(pid, &p) {
                    Ok(n) if n > 0 => {
                        tracing::info!(pid, lib = %path, opened = %p.display(), probes = n, "attached TLS probes")
                    }
                    Ok(_) => {}
                    Err(tls::AttachError::NoSymbols { .. }) => {}
                    Err(e) => tracing::warn!(pid, "{e}"),
                }
                if paused {
                    self.resume(pid);
                }
            }
            Action::Resync { pid, at } => {
                self.seed(pid, Some(at));
                self.rescan_tls(pid);
            }
            Action::Seed { child, parent, at } => {
                // The kernel gave the child copies of its parent's tracked descriptors
                // at the fork; those it closed since without a close() (close_range,
                // or an exec that closed O_CLOEXEC ones) are forgotten, newer ones kept.
                let now = procfs::fds(child);
                for fd in self.tracker.fds_of(parent) {
                    if !now.iter().any(|(f, _)| *f == fd) {
                        self.cap.forget_fd_before(child, fd, at);
                    }
                }
                self.seed(child, None);
                // A forked child runs its parent's libssl, but the parent's probes do
                // not fire in it.
                if self.cap.has_tls_probes(parent) {
                    self.scan_tls(child);
                }
            }
            Action::ProbeTls(pid) => {
                self.scan_tls(pid);
                self.resume(pid);
            }
            Action::Unwatch(pid) => self.cap.unwatch(pid),
        }
    }
}

impl<S: Sink> Session<S> {
    /// Resumes a process the kernel stopped when it loaded a libssl, whatever became of
    /// the attach. A failure is loud and counted: the process would stay stopped (until
    /// the agent exits, which tries again).
    fn resume(&mut self, pid: Pid) {
        if self.hold_paused {
            tracing::warn!(
                pid,
                "{} is set (tests only): process {pid} stays stopped until the agent exits",
                pause::HOLD_ENV
            );
            return;
        }
        match self.cap.resume(pid) {
            Ok(true) => self.resumed += 1,
            // It is gone: nothing is left stopped.
            Ok(false) => {}
            Err(err) => {
                self.resume_failures += 1;
                tracing::error!(
                    pid,
                    "could not resume process {pid}, which the kernel paused while TLS probes were attached: {err}. It stays stopped until resumed: run `kill -CONT {pid}` (the agent needs CAP_KILL to resume other users' processes)"
                );
            }
        }
    }
}

/// The ring buffer: its records are copied out by a thread of their own
/// ([`drain`]) and handled here when it has queued some. No tick of its own: each batch
/// the thread queues wakes the session (a wake-up while it is busy is kept for its next
/// wait), and nothing else is timed here — an idle agent's session thread sleeps.
pub struct Ring {
    drain: drain::Drain,
    positions: Arc<position::Positions>,
    /// The consumer position after the last record handled (records copied into the
    /// queue but not yet handled are not read, for [`RingOrder`]).
    handled: usize,
}

impl Ring {
    fn new(ring: RingBuf<MapData>, queue_bytes: usize) -> Result<Ring> {
        let positions = Arc::new(position::Positions::new(&ring)?);
        let handled = positions.consumer();
        let drain = drain::Drain::start(ring, positions.clone(), queue_bytes)?;
        Ok(Ring {
            drain,
            positions,
            handled,
        })
    }

    /// Bytes of records handled so far (the consumer position of the last one).
    pub fn read_bytes(&self) -> u64 {
        self.handled as u64
    }

    /// Waits until the drain thread has queued records. Cancel-safe: use it in
    /// `select!`, then [`Ring::drain`].
    pub async fn ready(&mut self) -> Result<()> {
        self.drain.ready().await;
        Ok(())
    }

    /// Copies what the ring holds now into the queue, without waiting for the drain
    /// thread's next wake-up (see [`drain::Drain::copy_now`]); [`Ring::drain`] then
    /// handles it.
    pub fn copy_now(&self) {
        self.drain.copy_now();
    }

    /// Passes every record queued through the session, then flushes its sink.
    pub fn drain<S: Sink>(&mut self, session: &mut Session<S>) {
        while let Some(batch) = self.drain.pop() {
            for record in batch.records() {
                session.handle_bytes(record);
            }
            self.handled = batch.end;
            self.drain.recycle(batch);
        }
        session.queue = self.drain.stats();
        session.sink.flush();
    }

    /// At the end: stops the drain thread, then passes what it queued and every record
    /// still in the ring through the session.
    pub fn drain_all<S: Sink>(&mut self, session: &mut Session<S>) {
        self.drain.stop();
        self.drain(session);
        self.handled = self.drain.rest(|record| session.handle_bytes(record));
        session.sink.flush();
    }
}

impl RingOrder for Ring {
    fn mark(&self) -> Mark {
        self.positions.mark()
    }

    fn read_past(&self, mark: Mark) -> bool {
        position::reached(self.handled, mark)
    }
}
