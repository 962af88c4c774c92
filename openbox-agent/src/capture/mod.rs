//! Loading and attaching the kernel programs, and reading what they report.

pub mod background;
pub mod btf;
pub mod clock;
pub mod detach;
pub mod event;
pub mod load;
pub mod mode;
pub mod pause;
pub mod tls;
pub mod tracefs;

use std::{collections::HashSet, path::Path};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
use openbox_common::*;

use self::load::How;
use crate::preflight;

/// bpf_map_update_elem flag: fail when the key exists.
const BPF_NOEXIST: u64 = 1;

/// The kernel object, built by `cargo xtask build-ebpf` and embedded by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("OPENBOX_EBPF_OBJECT"));

/// The exit program of the data syscalls (read, write, readv, writev, recvfrom, sendto,
/// recvmsg, sendmsg). The kernel object has one copy per syscall (`sys_exit_*`, made by
/// the same macro as their entries), all the same code: the call's kind comes from what
/// its entry kept, not from the tracepoint. Each copy is ~740 instructions and is the
/// longest for the verifier (27 000 instructions verified, 10–60 ms; 76 000 and 90–250
/// ms before its payload loop was made branch-free, see `openbox-ebpf/src/emit.rs`), so
/// this one is loaded and attached to the eight tracepoints; the others are never loaded.
const DATA_EXIT: &str = "sys_exit_read";

/// The exit program of sendmmsg and recvmmsg (the same code, as for [`DATA_EXIT`]): it
/// tail-calls [`MMSG_MESSAGE`] for each message of the batch.
const MMSG_EXIT: &str = "sys_exit_sendmmsg";

/// Reports one message of a sendmmsg/recvmmsg batch, then tail-calls itself for the
/// next: never attached, set in the kernel object's `MMSG_MESSAGE` program array before
/// [`MMSG_EXIT`] is attached. Verified as one message's work (35 000 instructions,
/// ~14 ms) where a loop over the batch's 16 messages in the exit program was walked
/// for each (293 000, 110–250 ms per program, and there were two: the longest part of
/// start-up).
const MMSG_MESSAGE: (&str, &str) = ("MMSG_MESSAGE", "sys_mmsg_message");

/// Copies 64 of a new child's descriptors, then tail-calls itself for the next (up to
/// 1024), then sends the fork's record: never attached, set in `FORK_FDS` before
/// `task_newtask` is attached. Its loop over all 1024 descriptors in `task_newtask`
/// was walked for each number by the verifier (152 000 instructions, 40–100 ms).
const FORK_FDS: (&str, &str) = ("FORK_FDS", "task_newtask_fds");

/// The data path of tracepoint mode (see [`mode`]): (program, category, tracepoint).
const SYSCALL_TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("sys_enter_read", "syscalls", "sys_enter_read"),
    (DATA_EXIT, "syscalls", "sys_exit_read"),
    ("sys_enter_write", "syscalls", "sys_enter_write"),
    (DATA_EXIT, "syscalls", "sys_exit_write"),
    ("sys_enter_readv", "syscalls", "sys_enter_readv"),
    (DATA_EXIT, "syscalls", "sys_exit_readv"),
    ("sys_enter_writev", "syscalls", "sys_enter_writev"),
    (DATA_EXIT, "syscalls", "sys_exit_writev"),
    ("sys_enter_recvfrom", "syscalls", "sys_enter_recvfrom"),
    (DATA_EXIT, "syscalls", "sys_exit_recvfrom"),
    ("sys_enter_sendto", "syscalls", "sys_enter_sendto"),
    (DATA_EXIT, "syscalls", "sys_exit_sendto"),
    ("sys_enter_recvmsg", "syscalls", "sys_enter_recvmsg"),
    (DATA_EXIT, "syscalls", "sys_exit_recvmsg"),
    ("sys_enter_sendmsg", "syscalls", "sys_enter_sendmsg"),
    (DATA_EXIT, "syscalls", "sys_exit_sendmsg"),
    ("sys_enter_connect", "syscalls", "sys_enter_connect"),
    ("sys_exit_connect", "syscalls", "sys_exit_connect"),
    ("sys_enter_accept", "syscalls", "sys_enter_accept"),
    ("sys_exit_accept", "syscalls", "sys_exit_accept"),
    ("sys_enter_accept4", "syscalls", "sys_enter_accept4"),
    ("sys_exit_accept4", "syscalls", "sys_exit_accept4"),
    ("sys_enter_socket", "syscalls", "sys_enter_socket"),
    ("sys_exit_socket", "syscalls", "sys_exit_socket"),
    ("sys_enter_socketpair", "syscalls", "sys_enter_socketpair"),
    ("sys_exit_socketpair", "syscalls", "sys_exit_socketpair"),
    ("sys_enter_close", "syscalls", "sys_enter_close"),
    ("sys_enter_openat", "syscalls", "sys_enter_openat"),
    ("sys_exit_openat", "syscalls", "sys_exit_openat"),
    ("sys_enter_openat2", "syscalls", "sys_enter_openat2"),
    // The same code as sys_exit_openat (~90 ms of verifier each): loaded once.
    ("sys_exit_openat", "syscalls", "sys_exit_openat2"),
    ("sys_enter_pread64", "syscalls", "sys_enter_pread64"),
    (DATA_EXIT, "syscalls", "sys_exit_pread64"),
    ("sys_enter_pwrite64", "syscalls", "sys_enter_pwrite64"),
    (DATA_EXIT, "syscalls", "sys_exit_pwrite64"),
    ("sys_enter_preadv", "syscalls", "sys_enter_preadv"),
    (DATA_EXIT, "syscalls", "sys_exit_preadv"),
    ("sys_enter_pwritev", "syscalls", "sys_enter_pwritev"),
    (DATA_EXIT, "syscalls", "sys_exit_pwritev"),
    ("sys_enter_preadv2", "syscalls", "sys_enter_preadv2"),
    (DATA_EXIT, "syscalls", "sys_exit_preadv2"),
    ("sys_enter_pwritev2", "syscalls", "sys_enter_pwritev2"),
    (DATA_EXIT, "syscalls", "sys_exit_pwritev2"),
    ("sys_enter_sendmmsg", "syscalls", "sys_enter_sendmmsg"),
    (MMSG_EXIT, "syscalls", "sys_exit_sendmmsg"),
    ("sys_enter_recvmmsg", "syscalls", "sys_enter_recvmmsg"),
    (MMSG_EXIT, "syscalls", "sys_exit_recvmmsg"),
    ("sys_enter_dup", "syscalls", "sys_enter_dup"),
    ("sys_exit_dup", "syscalls", "sys_exit_dup"),
    ("sys_enter_dup2", "syscalls", "sys_enter_dup2"),
    ("sys_exit_dup2", "syscalls", "sys_exit_dup2"),
    ("sys_enter_dup3", "syscalls", "sys_enter_dup3"),
    ("sys_exit_dup3", "syscalls", "sys_exit_dup3"),
    ("sys_enter_fcntl", "syscalls", "sys_enter_fcntl"),
    ("sys_exit_fcntl", "syscalls", "sys_exit_fcntl"),
    ("sys_enter_sendfile64", "syscalls", "sys_enter_sendfile64"),
    ("sys_exit_sendfile64", "syscalls", "sys_exit_sendfile64"),
    ("sys_enter_splice", "syscalls", "sys_enter_splice"),
    ("sys_exit_splice", "syscalls", "sys_exit_splice"),
    (
        "sys_enter_copy_file_range",
        "syscalls",
        "sys_enter_copy_file_range",
    ),
    (
        "sys_exit_copy_file_range",
        "syscalls",
        "sys_exit_copy_file_range",
    ),
];

/// Process lifecycle, in both modes: these tracepoints are not on the syscall path.
const PROCESS_TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("task_newtask", "task", "task_newtask"),
    ("sched_process_exec", "sched", "sched_process_exec"),
    ("sched_process_exit", "sched", "sched_process_exit"),
];

/// libssl functions probed: (function, entry program).
pub const SSL_FUNCTIONS: &[(&str, &str)] = &[
    ("SSL_write", "ssl_write"),
    ("SSL_write_ex", "ssl_write_ex"),
    ("SSL_read", "ssl_read"),
    ("SSL_read_ex", "ssl_read_ex"),
];
pub const SSL_RET_PROGRAM: &str = "ssl_ret";

#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// Payload bytes captured per call.
    pub capture_limit: u32,
    /// Stop a watched process that opens a TLS library until its uprobes are attached.
    pub pause_on_tls_lib: bool,
    /// Ring-buffer size in bytes (a power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// Most bytes of records copied out of the ring and not parsed yet (the
    /// pipeline's drain queue).
    pub queue_bytes: usize,
    /// fentry/fexit or syscall tracepoints for sockets and files.
    pub mode: mode::ModeChoice,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            capture_limit: DEFAULT_CAPTURE_LIMIT,
            pause_on_tls_lib: true,
            ring_bytes: 16 << 20,
            queue_bytes: crate::pipeline::drain::QUEUE_BYTES,
            mode: mode::ModeChoice::Auto,
        }
    }
}

/// Kernel counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Counters {
    pub events: u64,
    pub ringbuf_drops: u64,
    pub truncated_calls: u64,
    pub truncated_bytes: u64,
    pub unwatched_hits: u64,
    pub watched_hits: u64,
    pub read_failures: u64,
    pub map_full: u64,
    pub captured_bytes: u64,
    pub slot_read_failures: u64,
    pub scratch_failures: u64,
    pub kernel_read_failures: u64,
    pub pause_failures: u64,
    /// Processes stopped while their TLS probes were attached.
    pub paused: u64,
    /// Runs of the libssl entry programs for watched processes.
    pub tls_watched_hits: u64,
    /// io_uring requests submitted by watched processes: not captured (see
    /// `openbox-ebpf/src/probes/io_uring.rs`).
    #[serde(rename = "io_uring_ops_not_captured")]
    pub io_uring_ops: u64,
    /// Of those, the requests that move bytes (read, write, send, recv…).
    #[serde(rename = "io_uring_data_ops_not_captured")]
    pub io_uring_data_ops: u64,
    /// The same for processes not watched (0 unless a process's probes outlived its
    /// watch for a moment: they are attached per watched process).
    pub tls_unwatched_hits: u64,
}

/// Where this agent pins its record of paused processes, when processes that load a
/// libssl may be paused until its probes are attached; `None`: no pausing. Resuming a
/// process of another user needs CAP_KILL, and a process stopped when the agent crashes
/// is resumed by the next start only from a record in bpffs: without either, a paused
/// process could stay stopped, so the agent does not pause at all and says what that
/// costs.
fn pause_pin(wanted: bool, bpffs: &Result<()>) -> Option<std::path::PathBuf> {
    if !wanted {
        return None;
    }
    const COST: &str = "processes that load a libssl after watching began are not paused while its TLS probes attach, so their first TLS calls may not be captured";
    if !preflight::has_cap(preflight::effective_caps(), preflight::CAP_KILL) {
        tracing::warn!(
            "CAP_KILL is missing: {COST}; grant CAP_KILL (or run as root) to close that gap"
        );
        return None;
    }
    if let Err(e) = bpffs {
        tracing::warn!("{e:#}: {COST}");
        return None;
    }
    match pause::create_pin_dir().and_then(|()| pause::own_pin()) {
        Ok(pin) => Some(pin),
        Err(e) => {
            tracing::warn!(
                "cannot keep the record of paused processes in {}: {e}: {COST}",
                pause::PIN_DIR
            );
            None
        }
    }
}

/// The loaded programs and their maps.
pub struct Capture {
    programs: background::Programs,
    /// The ring buffer's map, until [`Capture::events`] takes it.
    ring: Option<aya::maps::Map>,
    chosen: mode::Chosen,
    watched: BpfHashMap<MapData, u32, u32>,
    fds: BpfHashMap<MapData, u64, FdState>,
    fd_flags: BpfHashMap<MapData, FdFlagKey, u32>,
    threads: BpfHashMap<MapData, u32, ThreadSlot>,
    inherit: BpfHashMap<MapData, u32, Inherited>,
    /// The INHERIT map's kernel id, for a second handle (enforcement's supervisors).
    inherit_id: Option<u32>,
    /// The id of the `SSL_ARGS` map (the libssl calls in flight), for `--enforce`.
    ssl_args_id: Option<u32>,
    /// The id of the `TLS_UNSENT` map (memory-BIO plaintext not sent yet), likewise.
    tls_unsent_id: Option<u32>,
    /// Generations for descriptors the agent seeds: small numbers, below any kernel
    /// timestamp, so they never collide with the kernel's.
    next_seed_gen: u64,
    counters: PerCpuArray<MapData, u64>,
    /// The libssl uprobes, per watched process.
    tls: tls::TlsProbes,
    io_uring: IoUringCount,
    /// Last field, dropped after `ebpf` (fields drop in declaration order): the
    /// programs are detached, or (`hand_off_detach`) watch nobody any more, so no
    /// process can be stopped after it resumed them all.
    pauses: pause::Pauses,
}

impl Capture {
    /// Loads every program and attaches the tracepoints. Fails with a message that says
    /// what is missing and how to fix it.
    pub fn load(cfg: &CaptureConfig) -> Result<Capture> {
        if EBPF_OBJECT.is_empty() {
            bail!("this openbox-agent was built without its kernel programs (the kernel object was missing at build time, see build.rs): build it with `cargo xtask build`");
        }
        preflight::require_privileges()?;
        preflight::ensure_tracefs()?;
        let live = live_threads()?;
        preflight::raise_memlock();
        let bpffs = preflight::ensure_bpffs();
        // Processes an agent that crashed left stopped run again, whatever this one does.
        let recovered = if bpffs.is_ok() {
            pause::recover()
        } else {
            pause::Recovery::default()
        };
        let pin = pause_pin(cfg.pause_on_tls_lib, &bpffs);
        // The object (its maps) is made on another thread while this one reads the BTF
        // and checks the tracepoints: see `background`. No program is loaded there.
        let object = background::load_object(background::Object {
            capture_limit: cfg.capture_limit.min(MAX_CAPTURE_LIMIT),
            pause_on_tls_lib: pin.is_some().into(),
            live,
            ring_bytes: cfg.ring_bytes,
            pin: pin.clone(),
        });
        let checked = (|| {
            // The vmlinux BTF is parsed only when fentry may be used (it takes ~0.1 s).
            let btf = match cfg.mode {
                mode::ModeChoice::Tracepoint => Err(anyhow!("--capture-mode tracepoint")),
                mode::ModeChoice::Fentry => Ok(mode::fentry_prerequisites().context(
                    "--capture-mode fentry: fentry/fexit cannot be used on this kernel; use --capture-mode auto or tracepoint",
                )?),
                mode::ModeChoice::Auto => mode::fentry_prerequisites(),
            };
            // Before any program is loaded: a program must never read a field that moved.
            tracefs::check_kernel(btf.is_err())?;
            Ok(btf)
        })();
        let loaded = object
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let btf = match checked {
            Ok(btf) => btf,
            Err(e) => {
                drop(loaded);
                if let Some(pin) = &pin {
                    let _ = std::fs::remove_file(pin);
                }
                return Err(e);
            }
        };
        let mut ebpf = match loaded {
            Ok(ebpf) => ebpf,
            Err(e) => {
                if let Some(pin) = &pin {
                    let _ = std::fs::remove_file(pin);
                }
                bail!("loading the kernel programs failed: {e}. Run `openbox-agent check` to see what this kernel lacks.");
            }
        };
        // Owns the pin from here, so every error below removes it. Nothing is watched
        // yet, so nothing can be paused before `Capture` holds it.
        let pauses = pause::Pauses::new(
            BpfHashMap::try_from(ebpf.take_map(pause::MAP).context("map PAUSED")?)?,
            pin,
            recovered,
        );
        // fentry/fexit when its first program loads: a kernel that refuses the type
        // says so at once, before the verifier's time is spent on the others.
        let mut fentry = match btf {
            Err(e) => Fentry::Unavailable(e),
            Ok(btf) => match mode::load_first(&mut ebpf, &btf) {
                Ok(()) => Fentry::Usable(btf),
                Err(e) => Fentry::Failed(e),
            },
        };
        // Every program needed, loaded from several threads at once (the verifier is
        // most of start-up, see `load`), then attached.
        let started = std::time::Instant::now();
        // The data path first: its exit program is the longest to verify, and `load_all`
        // starts the jobs in this order.
        let mut jobs: Vec<(&str, How<'_>)> = Vec::new();
        let syscalls_loaded = !matches!(fentry, Fentry::Usable(_));
        match &fentry {
            Fentry::Usable(btf) => jobs.extend(
                mode::fentry_jobs(btf)
                    .into_iter()
                    .filter(|(p, _)| *p != mode::FIRST),
            ),
            _ => jobs.extend(syscall_programs()),
        }
        jobs.extend(process_programs());
        let mut fentry_refused = None;
        for o in load::load_all(&mut ebpf, &jobs)? {
            let Err(e) = o.result else { continue };
            if mode::is_fentry_program(o.program) {
                if fentry_refused.is_none() {
                    fentry_refused = Some(mode::fentry_error(o.program, &e));
                }
            } else {
                return Err(load::rejected(o.program, e));
            }
        }
        drop(jobs);
        let loaded = started.elapsed();
        set_tail_call(&mut ebpf, FORK_FDS)?;
        attach_tracepoints(&mut ebpf, PROCESS_TRACEPOINTS)?;
        let io_uring = attach_io_uring(&mut ebpf);
        if let Fentry::Usable(_) = fentry {
            let attached = match fentry_refused {
                Some(e) => Err(e),
                None => mode::attach_loaded(&mut ebpf),
            };
            if let Err(e) = attached {
                fentry = Fentry::Failed(e);
            }
        }
        let chosen = match fentry {
            Fentry::Usable(_) => mode::Chosen {
                mode: mode::Mode::Fentry,
                reason: match cfg.mode {
                    mode::ModeChoice::Fentry => "--capture-mode fentry".into(),
                    _ => "auto: BTF and fentry/fexit trampolines available".into(),
                },
            },
            Fentry::Failed(e) if cfg.mode == mode::ModeChoice::Auto => {
                mode::unload(&mut ebpf);
                tracing::warn!(
                    error = %format!("{e:#}"),
                    "fentry/fexit programs could not be attached; capturing with syscall tracepoints instead, which slow every syscall of every process on the node"
                );
                tracefs::check_kernel(true)?;
                if !syscalls_loaded {
                    let syscalls: Vec<(&str, How<'_>)> = syscall_programs().collect();
                    load::load_or_fail(&mut ebpf, &syscalls, load::rejected)?;
                }
                mode::Chosen {
                    mode: mode::Mode::Tracepoint,
                    reason: format!("auto: fentry/fexit failed: {e:#}"),
                }
            }
            Fentry::Failed(e) => {
                return Err(e.context(
                    "--capture-mode fentry: attaching the fentry/fexit programs failed; use --capture-mode auto or tracepoint",
                ))
            }
            Fentry::Unavailable(e) => mode::Chosen {
                mode: mode::Mode::Tracepoint,
                reason: match cfg.mode {
                    mode::ModeChoice::Tracepoint => "--capture-mode tracepoint".into(),
                    _ => format!("auto: {e:#}"),
                },
            },
        };
        if chosen.mode == mode::Mode::Tracepoint {
            set_tail_call(&mut ebpf, MMSG_MESSAGE)?;
            attach_tracepoints(&mut ebpf, SYSCALL_TRACEPOINTS)?;
        }
        tracing::info!(
            mode = %chosen.mode,
            reason = %chosen.reason,
            load_ms = loaded.as_secs_f64() * 1e3,
            attach_ms = (started.elapsed() - loaded).as_secs_f64() * 1e3,
            "capture mode"
        );
        let watched = BpfHashMap::try_from(ebpf.take_map("WATCHED").context("map WATCHED")?)?;
        let fds = BpfHashMap::try_from(ebpf.take_map("FDS").context("map FDS")?)?;
        let fd_flags = BpfHashMap::try_from(ebpf.take_map("FD_FLAGS").context("map FD_FLAGS")?)?;
        let threads = BpfHashMap::try_from(ebpf.take_map("THREADS").context("map THREADS")?)?;
        let inherit_map = ebpf.take_map("INHERIT").context("map INHERIT")?;
        let inherit_id = match &inherit_map {
            aya::maps::Map::HashMap(data) => data.info().ok().map(|i| i.id()),
            _ => None,
        };
        let inherit = BpfHashMap::try_from(inherit_map)?;
        let ssl_args_id = match ebpf.map("SSL_ARGS") {
            Some(aya::maps::Map::HashMap(data)) => data.info().ok().map(|i| i.id()),
            _ => None,
        };
        let tls_unsent_id = match ebpf.map("TLS_UNSENT") {
            Some(aya::maps::Map::LruHashMap(data)) => data.info().ok().map(|i| i.id()),
            _ => None,
        };
        let counters = PerCpuArray::try_from(ebpf.take_map("COUNTERS").context("map COUNTERS")?)?;
        let ring = Some(ebpf.take_map("EVENTS").context("map EVENTS")?);
        // The libssl programs: no watched process needs them before it maps a libssl,
        // and its TLS attach waits for them, so the command need not.
        let programs = background::Programs::load_later(
            ebpf,
            SSL_FUNCTIONS
                .iter()
                .map(|(_, p)| *p)
                .chain([SSL_RET_PROGRAM])
                .collect(),
            "TLS calls (libssl) are not captured",
        )?;
        Ok(Capture {
            programs,
            ring,
            chosen,
            watched,
            fds,
            fd_flags,
            threads,
            inherit,
            inherit_id,
            ssl_args_id,
            tls_unsent_id,
            next_seed_gen: 1,
            counters,
            tls: tls::TlsProbes::default(),
            io_uring,
            pauses,
        })
    }

    /// Whether io_uring requests of watched processes are counted, and if not why.
    pub fn io_uring(&self) -> &IoUringCount {
        &self.io_uring
    }

    /// The capture mode in use, and why.
    pub fn mode(&self) -> &mode::Chosen {
        &self.chosen
    }

    /// Resumes a process the kernel paused while its TLS probes were attached, and
    /// forgets its record. `Ok(false)`: the process is gone.
    pub fn resume(&mut self, pid: u32) -> std::io::Result<bool> {
        self.pauses.resume(pid)
    }

    /// Processes an earlier agent left stopped (it crashed) that this one resumed at
    /// its start.
    pub fn recovered(&self) -> pause::Recovery {
        self.pauses.recovered
    }

    /// The ring buffer.
    pub fn events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ring.take().context("map EVENTS, taken already")?;
        Ok(RingBuf::try_from(map)?)
    }

    pub fn watch(&mut self, tgid: u32) -> Result<()> {
        let flags = if self.tls.has_any(tgid) {
            WATCH_ON | WATCH_TLS_PROBED
        } else {
            WATCH_ON
        };
        self.watched
            .insert(tgid, flags, 0)
            .with_context(|| format!("adding process {tgid} to the watched set"))
    }

    /// Stops watching a process and releases its TLS probes (it exited).
    pub fn unwatch(&mut self, tgid: u32) {
        let _ = self.watched.remove(&tgid);
        let _ = self.inherit.remove(&tgid);
        self.tls.release(tgid);
    }

    /// Ends capture and lets the programs detach after this process has exited (see
    /// [`detach`]): first nothing is watched any more, so in those seconds the programs
    /// record nothing and stop nobody (a process the command left running included).
    pub fn hand_off_detach(&mut self) {
        let watched: Vec<u32> = self.watched.keys().flatten().collect();
        for tgid in watched {
            // The TLS probes stay attached: closing them is part of the detach.
            let _ = self.watched.remove(&tgid);
            let _ = self.inherit.remove(&tgid);
        }
        let threads: Vec<u32> = self.threads.keys().flatten().collect();
        for tid in threads {
            self.unregister_thread(tid);
        }
        self.programs.abandon();
        detach::hand_off();
    }

    /// Tells the kernel where thread `tid` (host id) of worker `owner` publishes the
    /// activity it runs: the u64 at `addr` in the worker's memory.
    pub fn register_thread(&mut self, tid: u32, owner: u32, addr: u64) -> Result<()> {
        self.threads
            .insert(
                tid,
                ThreadSlot {
                    addr,
                    owner,
                    _pad: 0,
                },
                0,
            )
            .with_context(|| format!("registering thread {tid} of worker {owner}"))
    }

    /// A read handle on the kernel's record of which activity started each process
    /// (`INHERIT`), for threads other than the one that owns this capture.
    pub fn inherit_reader(&self) -> Result<BpfHashMap<MapData, u32, Inherited>> {
        second_handle(self.inherit_id, "INHERIT")
    }

    /// A reader of the libssl calls in flight, by pid_tgid (the programs keep writing
    /// the map: this is a second handle on it).
    pub fn ssl_args_reader(&self) -> Result<BpfHashMap<MapData, u64, SslArgs>> {
        second_handle(self.ssl_args_id, "SSL_ARGS")
    }

    /// A reader (and remover) of the plaintext memory-BIO SSL objects encrypted and
    /// did not send yet (`TLS_UNSENT`), for `--enforce`.
    pub fn tls_unsent_reader(&self) -> Result<BpfHashMap<MapData, UnsentKey, UnsentWrite>> {
        second_handle_as(self.tls_unsent_id, "TLS_UNSENT", aya::maps::Map::LruHashMap)
    }

    pub fn unregister_thread(&mut self, tid: u32) {
        let _ = self.threads.remove(&tid);
    }

    /// Registers a descriptor found in /proc, unless the kernel already tracks it (its
    /// entry is newer than our look at /proc). Returns the generation in force.
    pub fn seed_fd(&mut self, tgid: u32, fd: i32, kind: u32) -> u64 {
        let key = fd_key(tgid, fd);
        let gen = self.next_seed_gen;
        match self
            .fds
            .insert(key, FdState { kind, _pad: 0, gen }, BPF_NOEXIST)
        {
            Ok(()) => {
                self.next_seed_gen += 1;
                gen
            }
            Err(_) => self.fds.get(&key, 0).map(|s| s.gen).unwrap_or(0),
        }
    }

    /// Sets flags on one incarnation of a descriptor; a newer descriptor with the same
    /// number is never affected.
    pub fn set_fd_flags(&mut self, tgid: u32, fd: i32, gen: u64, flags: u32) {
        let _ = self.fd_flags.insert(
            FdFlagKey {
                fd_key: fd_key(tgid, fd),
                gen,
            },
            flags,
            0,
        );
    }

    pub fn clear_fd_flags(&mut self, tgid: u32, fd: i32, gen: u64) {
        let _ = self.fd_flags.remove(&FdFlagKey {
            fd_key: fd_key(tgid, fd),
            gen,
        });
    }

    /// Forgets a descriptor the kernel never saw closed (exec closed it, or the process
    /// exited), unless the kernel's entry was created at or after `before` (a new
    /// descriptor reusing the number).
    pub fn forget_fd_before(&mut self, tgid: u32, fd: i32, before: u64) {
        let key = fd_key(tgid, fd);
        if let Ok(state) = self.fds.get(&key, 0) {
            if state.gen < before {
                let _ = self.fds.remove(&key);
                let _ = self.fd_flags.remove(&FdFlagKey {
                    fd_key: key,
                    gen: state.gen,
                });
            }
        }
    }

    pub fn counters(&self) -> Counters {
        let sum = |idx: u32| -> u64 {
            self.counters
                .get(&idx, 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        };
        Counters {
            events: sum(CNT_EVENTS),
            ringbuf_drops: sum(CNT_RINGBUF_DROPS),
            truncated_calls: sum(CNT_TRUNCATED_CALLS),
            truncated_bytes: sum(CNT_TRUNCATED_BYTES),
            unwatched_hits: sum(CNT_UNWATCHED),
            watched_hits: sum(CNT_WATCHED),
            read_failures: sum(CNT_READ_FAILURES),
            map_full: sum(CNT_MAP_FULL),
            captured_bytes: sum(CNT_CAPTURED_BYTES),
            slot_read_failures: sum(CNT_SLOT_READ_FAILURES),
            scratch_failures: sum(CNT_SCRATCH_FAILURES),
            kernel_read_failures: sum(CNT_KERNEL_READ_FAILURES),
            pause_failures: sum(CNT_PAUSE_FAILURES),
            paused: sum(CNT_PAUSED),
            tls_watched_hits: sum(CNT_TLS_WATCHED),
            tls_unwatched_hits: sum(CNT_TLS_UNWATCHED),
            io_uring_ops: sum(CNT_IO_URING_OPS),
            io_uring_data_ops: sum(CNT_IO_URING_DATA_OPS),
        }
    }

    /// Whether `pid` has TLS probes on the file at `path`.
    pub fn has_tls_lib(&self, pid: u32, path: &Path) -> bool {
        tls::file_id(path).is_ok_and(|id| self.tls.has(pid, id))
    }

    /// Whether `pid` has TLS probes.
    pub fn has_tls_probes(&self, pid: u32) -> bool {
        self.tls.has_any(pid)
    }

    /// Whether the file at `path` was named with `--tls-lib`.
    pub fn is_named_tls_lib(&self, path: &Path) -> bool {
        tls::file_id(path).is_ok_and(|id| self.tls.is_named(id))
    }

    /// Checks a library named with `--tls-lib`: it is probed in every watched process
    /// that maps it.
    pub fn name_tls_lib(&mut self, path: &Path) -> Result<(), tls::AttachError> {
        self.tls.name(path)
    }

    /// Attaches the libssl probes of `path` for process `pid` (see
    /// [`tls::TlsProbes::attach`]), and marks it so that the children it forks wait for
    /// their own.
    pub fn attach_tls(&mut self, pid: u32, path: &Path) -> Result<usize, tls::AttachError> {
        let result = self.tls.attach(&mut self.programs, pid, path);
        if self.tls.has_any(pid) && self.watched.get(&pid, 0).is_ok() {
            // Clears WATCH_TLS_PENDING too: with its probes attached, a forked child
            // has no reason to stop.
            let _ = self.watched.insert(pid, WATCH_ON | WATCH_TLS_PROBED, 0);
        }
        result
    }

    /// Releases the probes of a process on the libraries it no longer maps (after an
    /// exec).
    pub fn retain_tls(&mut self, pid: u32, mapped: &HashSet<tls::FileId>) {
        self.tls.retain(pid, mapped);
    }

    pub fn tls_stats(&self) -> tls::TlsProbeStats {
        self.tls.stats()
    }
}

/// Whether fentry mode works here, the way `auto` finds out: the kernel's BTF is read,
/// and every fentry/fexit program is loaded and attached (then detached at once), so
/// a missing function, a verifier refusal or missing trampolines all show. For `check`,
/// with what each program cost the verifier.
pub fn probe_fentry() -> Result<Vec<load::Cost>> {
    if EBPF_OBJECT.is_empty() {
        bail!("this openbox-agent was built without its kernel programs");
    }
    let btf = mode::fentry_prerequisites()?;
    preflight::raise_memlock();
    let mut ebpf = EbpfLoader::new()
        .btf(None)
        // The smallest ring: nothing is recorded.
        .map_max_entries("EVENTS", 4096)
        .load(EBPF_OBJECT)
        .context("loading the kernel object")?;
    mode::attach_fentry(&mut ebpf, &btf)
}

/// Where the exit program learns that a process ended: zeros for the record's
/// `group_dead`, else the offsets of `task_struct.signal` and `signal_struct.live`
/// (kernels before `group_dead` was added to `sched_process_exit`, such as Debian's
/// 6.1 and 6.12).
pub fn live_threads() -> Result<btf::LiveThreads> {
    if tracefs::exit_has_group_dead()? {
        return Ok(btf::LiveThreads {
            task_signal: 0,
            signal_live: 0,
        });
    }
    let live = btf::Btf::from_sys_fs()
        .and_then(|btf| btf::LiveThreads::find(&btf))
        .context("tracepoint sched:sched_process_exit has no group_dead field on this kernel, so openbox-agent reads the count of a process's live threads from the kernel's task structures instead, and could not find where they are; it needs a kernel with BTF (CONFIG_DEBUG_INFO_BTF=y, /sys/kernel/btf/vmlinux)")?;
    tracing::info!(
        task_signal = live.task_signal,
        signal_live = live.signal_live,
        "sched_process_exit has no group_dead: process exits are told by task->signal->live"
    );
    Ok(live)
}

/// [`MMSG_MESSAGE`]'s program (the longest to verify, so first: `load_all` starts the
/// jobs in order), then the programs of [`SYSCALL_TRACEPOINTS`], each once.
fn syscall_programs<'a>() -> impl Iterator<Item = (&'static str, How<'a>)> {
    [(MMSG_MESSAGE.1, How::Plain)].into_iter().chain(
        SYSCALL_TRACEPOINTS
            .iter()
            .enumerate()
            .filter(|(i, (p, _, _))| !SYSCALL_TRACEPOINTS[..*i].iter().any(|(q, _, _)| q == p))
            .map(|(_, (p, _, _))| (*p, How::Plain)),
    )
}

/// The programs of [`PROCESS_TRACEPOINTS`] and [`FORK_FDS`]'s.
fn process_programs<'a>() -> impl Iterator<Item = (&'static str, How<'a>)> {
    PROCESS_TRACEPOINTS
        .iter()
        .map(|(p, _, _)| (*p, How::Plain))
        .chain([(FORK_FDS.1, How::Plain)])
}

/// Puts a loaded program where others tail-call it: (program array, program) at index
/// 0, before those are attached (until then their tail calls fail and are counted as
/// scratch failures).
fn set_tail_call(ebpf: &mut Ebpf, (map, program): (&str, &str)) -> Result<()> {
    set_tail_call_at(ebpf, map, 0, program)
}

/// [`set_tail_call`] at `index`.
pub(crate) fn set_tail_call_at(
    ebpf: &mut Ebpf,
    map: &str,
    index: u32,
    program: &str,
) -> Result<()> {
    let fd = ebpf
        .program(program)
        .with_context(|| format!("program {program} missing from the kernel object"))?
        .fd()
        .with_context(|| format!("program {program} is not loaded"))?
        .try_clone()
        .context("duplicating a program descriptor")?;
    let mut array = ProgramArray::try_from(
        ebpf.map_mut(map)
            .with_context(|| format!("map {map} missing from the kernel object"))?,
    )?;
    array
        .set(index, &fd, 0)
        .with_context(|| format!("setting program {program} in map {map} at {index}"))
}

/// Whether fentry mode can be used, as found while loading.
enum Fentry {
    /// Not tried: forced off, or no BTF.
    Unavailable(anyhow::Error),
    /// Its programs loaded so far.
    Usable(aya::Btf),
    /// A program was refused, or would not attach.
    Failed(anyhow::Error),
}

/// Whether the io_uring requests of watched processes are counted (never captured:
/// see `openbox-ebpf/src/probes/io_uring.rs`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IoUringCount {
    pub counted: bool,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Attaches the io_uring counter when this kernel has its tracepoint with the layout
/// the program reads. Its absence does not stop the agent (a kernel without io_uring
/// has nothing to count); it is logged and shown in the summaries.
fn attach_io_uring(ebpf: &mut Ebpf) -> IoUringCount {
    let attached = tracefs::check_io_uring().and_then(|present| {
        if !present {
            bail!("this kernel has no io_uring:io_uring_submit_req tracepoint (built without io_uring, or older than 5.19)");
        }
        load::load_or_fail(
            ebpf,
            &[("io_uring_submit_req", How::Plain)],
            load::rejected,
        )?;
        attach_tracepoints(
            ebpf,
            &[("io_uring_submit_req", "io_uring", "io_uring_submit_req")],
        )
    });
    match attached {
        Ok(()) => IoUringCount {
            counted: true,
            reason: None,
        },
        Err(e) => {
            let reason = format!("{e:#}");
            tracing::warn!(
                error = %reason,
                "io_uring requests of watched processes are not counted: I/O done through io_uring is neither captured nor visible in the summaries"
            );
            IoUringCount {
                counted: false,
                reason: Some(reason),
            }
        }
    }
}

/// Attaches loaded tracepoint programs: (program, category, tracepoint).
fn attach_tracepoints(ebpf: &mut Ebpf, which: &[(&str, &str, &str)]) -> Result<()> {
    for (prog, category, name) in which {
        let tp: &mut TracePoint = ebpf
            .program_mut(prog)
            .ok_or_else(|| anyhow!("program {prog} missing from the kernel object"))?
            .try_into()?;
        tp.attach(category, name).map_err(|e| {
            anyhow!("attaching to tracepoint {category}:{name} failed: {e}. The kernel needs CONFIG_FTRACE_SYSCALLS and tracefs mounted at /sys/kernel/tracing.")
        })?;
    }
    Ok(())
}

/// Another handle on the hash map with kernel id `id` (`name` for errors).
fn second_handle<K: aya::Pod, V: aya::Pod>(
    id: Option<u32>,
    name: &str,
) -> Result<BpfHashMap<MapData, K, V>> {
    second_handle_as(id, name, aya::maps::Map::HashMap)
}

/// [`second_handle`] on a map of the kind `kind` makes (a hash or an LRU hash).
fn second_handle_as<K: aya::Pod, V: aya::Pod>(
    id: Option<u32>,
    name: &str,
    kind: fn(MapData) -> aya::maps::Map,
) -> Result<BpfHashMap<MapData, K, V>> {
    let id = id.with_context(|| format!("the {name} map has no id"))?;
    let data = MapData::from_id(id).with_context(|| format!("opening the {name} map by id"))?;
    Ok(BpfHashMap::try_from(kind(data))?)
}
