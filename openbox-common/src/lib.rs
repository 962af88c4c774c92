//! Plain data shared by the kernel programs (`openbox-ebpf`) and the agent.
//!
//! Every type is `#[repr(C)]` with fixed-size fields and explicit padding. Flags and
//! kinds are integers, never `bool` or Rust enums: a bad value coming from the kernel
//! must not be undefined behaviour on the user side. The agent decodes records with
//! `read_unaligned` after checking their length.
#![no_std]

/// Payload bytes carried by one ring-buffer data record.
pub const MAX_CHUNK: usize = 4096;
/// Most data records emitted for one call; with [`MAX_CHUNK`] this bounds the
/// configurable per-call capture limit.
pub const MAX_RECORDS_PER_CALL: u32 = 64;
/// Largest per-call capture limit the kernel programs honour (256 KiB).
pub const MAX_CAPTURE_LIMIT: u32 = MAX_RECORDS_PER_CALL * MAX_CHUNK as u32;
/// Default per-call capture limit.
pub const DEFAULT_CAPTURE_LIMIT: u32 = 16 * 1024;
/// Most iovec entries walked per readv/writev/sendmsg/recvmsg call.
pub const MAX_IOVECS: u32 = 64;
/// Descriptor numbers below this a forked child gets tracked from its parent by the
/// kernel at the fork; higher ones are seeded by the agent from /proc a little later.
pub const INHERITED_FDS_COPIED: i32 = 1024;
/// Bytes of a path kept from openat/openat2 and exec.
pub const MAX_PATH: usize = 256;
/// Bytes of a task name (TASK_COMM_LEN).
pub const COMM_LEN: usize = 16;

// ---- event kinds (EventHeader::kind) ----
/// Socket payload seen by a syscall ([`DataEvent`]).
pub const EV_SOCK_DATA: u32 = 1;
/// TLS plaintext seen by a libssl uprobe ([`DataEvent`], `ssl` set).
pub const EV_TLS_DATA: u32 = 2;
/// connect() returned ([`ConnEvent`]).
pub const EV_CONNECT: u32 = 3;
/// accept()/accept4() returned a new socket ([`ConnEvent`]).
pub const EV_ACCEPT: u32 = 4;
/// A tracked descriptor was closed ([`CloseEvent`]).
pub const EV_CLOSE: u32 = 5;
/// openat()/openat2() succeeded ([`FileOpenEvent`]).
pub const EV_FILE_OPEN: u32 = 6;
/// read/write on a tracked file descriptor ([`FileIoEvent`]).
pub const EV_FILE_IO: u32 = 7;
/// A watched process called execve ([`ProcEvent`], `path` = new image).
pub const EV_EXEC: u32 = 8;
/// A watched process created a child process ([`ProcEvent`], `other` = child).
pub const EV_FORK: u32 = 9;
/// A watched process exited ([`ProcEvent`]).
pub const EV_EXIT: u32 = 10;
/// socket()/socketpair() created socket descriptors ([`ConnEvent`], family only).
pub const EV_SOCKET: u32 = 11;
/// A child forked by a process with TLS probes stopped itself (SIGSTOP, flag
/// [`FLAG_PAUSED`]) at its first watched call, until the agent has attached the probes
/// of its own ([`ProcEvent`]): the parent's uprobes do not fire in the child.
pub const EV_TLS_WAIT: u32 = 12;
/// dup/dup2/dup3/fcntl(F_DUPFD*) copied a tracked descriptor ([`DupEvent`]): the new
/// number refers to the same connection or file.
pub const EV_DUP: u32 = 13;
/// sendfile/splice/copy_file_range moved bytes between two descriptors inside the
/// kernel, at least one of them tracked ([`TransferEvent`]): no user buffer holds them,
/// so they are counted, not copied.
pub const EV_TRANSFER: u32 = 14;

// ---- WATCHED values (flags) ----
/// The process is watched (every entry has it).
pub const WATCH_ON: u32 = 1 << 0;
/// The agent attached TLS probes for this process: its forked children need their own.
pub const WATCH_TLS_PROBED: u32 = 1 << 1;
/// Set at fork on a child of a [`WATCH_TLS_PROBED`] process that has a memory of its
/// own (not CLONE_VM), when pausing is enabled: the child stops at its first watched
/// call (see [`EV_TLS_WAIT`]) unless the agent attached its probes first.
pub const WATCH_TLS_PENDING: u32 = 1 << 2;

// ---- DataEvent::direction / FileIoEvent::direction ----
/// Bytes leaving the process (write, send, SSL_write).
pub const DIR_EGRESS: u32 = 1;
/// Bytes entering the process (read, recv, SSL_read).
pub const DIR_INGRESS: u32 = 2;

// ---- EventHeader::flags ----
/// The call moved more bytes than were captured (capture limit or chunk budget).
pub const FLAG_TRUNCATED: u32 = 1 << 0;
/// Last record of this call.
pub const FLAG_LAST: u32 = 1 << 1;
/// A socket syscall made while a libssl call was active on the same thread: the bytes
/// are ciphertext; `ssl` names the SSL object. No payload is copied.
pub const FLAG_IN_SSL: u32 = 1 << 2;
/// Payload was not copied (descriptor marked `FD_NO_PAYLOAD` or ciphertext).
pub const FLAG_NO_PAYLOAD: u32 = 1 << 3;
/// A bpf_probe_read_user failed: the record holds fewer bytes than promised.
pub const FLAG_READ_FAILED: u32 = 1 << 4;
/// The process was stopped (SIGSTOP) after opening a TLS library so the agent can
/// attach its uprobes before the library runs; the agent sends SIGCONT.
pub const FLAG_PAUSED: u32 = 1 << 5;

// ---- syscall / probe that produced a record (DataEvent::source, FileIoEvent::source) ----
pub const SRC_READ: u32 = 1;
pub const SRC_WRITE: u32 = 2;
pub const SRC_READV: u32 = 3;
pub const SRC_WRITEV: u32 = 4;
pub const SRC_RECVFROM: u32 = 5;
pub const SRC_SENDTO: u32 = 6;
pub const SRC_RECVMSG: u32 = 7;
pub const SRC_SENDMSG: u32 = 8;
pub const SRC_SSL_READ: u32 = 9;
pub const SRC_SSL_READ_EX: u32 = 10;
pub const SRC_SSL_WRITE: u32 = 11;
pub const SRC_SSL_WRITE_EX: u32 = 12;
pub const SRC_PREAD64: u32 = 13;
pub const SRC_PWRITE64: u32 = 14;
pub const SRC_PREADV: u32 = 15;
pub const SRC_PWRITEV: u32 = 16;
pub const SRC_PREADV2: u32 = 17;
pub const SRC_PWRITEV2: u32 = 18;
/// One message of a recvmmsg/sendmmsg batch: one data call per message, in order.
pub const SRC_RECVMMSG: u32 = 19;
pub const SRC_SENDMMSG: u32 = 20;
/// [`TransferEvent::source`].
pub const SRC_SENDFILE: u32 = 21;
pub const SRC_SPLICE: u32 = 22;
pub const SRC_COPY_FILE_RANGE: u32 = 23;

/// Most messages of one sendmmsg/recvmmsg call copied; the rest of the batch goes out
/// as one record without payload, so the stream's offsets stay exact.
pub const MAX_MMSG: u32 = 16;
/// Most messages of one sendmmsg/recvmmsg call whose lengths are summed (the kernel's
/// own limit, UIO_MAXIOV).
pub const MAX_MMSG_LENS: u32 = 1024;

// ---- FdState::kind ----
pub const FD_SOCKET: u32 = 1;
pub const FD_FILE: u32 = 2;
/// Tracked but uninteresting (a noise path): no events except close.
pub const FD_IGNORED: u32 = 3;
// ---- FD_FLAGS values ----
/// Do not copy payload for this descriptor (the agent knows it carries TLS ciphertext).
pub const FD_NO_PAYLOAD: u32 = 1 << 0;
/// Report nothing for this descriptor but its close (a noise path).
pub const FD_QUIET: u32 = 1 << 1;

// ---- load-time settings: globals of the kernel object, set with EbpfLoader::set_global ----
/// u32: payload bytes captured per call, at most [`MAX_CAPTURE_LIMIT`].
pub const GLOBAL_CAPTURE_LIMIT: &str = "CAPTURE_LIMIT";
/// u32: when 1, stop a watched process with SIGSTOP when it opens a file whose name
/// contains "libssl", so uprobes are attached before its first TLS call.
pub const GLOBAL_PAUSE_ON_TLS_LIB: &str = "PAUSE_ON_TLS_LIB";
/// u32: offset of `task_struct.signal` on this kernel, from its BTF, for kernels whose
/// `sched_process_exit` record has no `group_dead`; 0: read `group_dead` from the
/// record.
pub const GLOBAL_EXIT_TASK_SIGNAL: &str = "EXIT_TASK_SIGNAL";
/// u32: offset of `signal_struct.live` (atomic_t) on this kernel, with
/// [`GLOBAL_EXIT_TASK_SIGNAL`].
pub const GLOBAL_EXIT_SIGNAL_LIVE: &str = "EXIT_SIGNAL_LIVE";

// ---- indices of the per-CPU COUNTERS array ----
/// Records written to the ring buffer.
pub const CNT_EVENTS: u32 = 0;
/// Ring-buffer reservations/outputs that failed: events lost.
pub const CNT_RINGBUF_DROPS: u32 = 1;
/// Calls whose payload was cut by the capture limit.
pub const CNT_TRUNCATED_CALLS: u32 = 2;
/// Payload bytes not captured because of the capture limit.
pub const CNT_TRUNCATED_BYTES: u32 = 3;
/// Probe hits from processes that are not watched (filtered before any copy).
pub const CNT_UNWATCHED: u32 = 4;
/// Probe hits from watched processes.
pub const CNT_WATCHED: u32 = 5;
/// bpf_probe_read_user failures.
pub const CNT_READ_FAILURES: u32 = 6;
/// Map insertions that failed (map full): state lost.
pub const CNT_MAP_FULL: u32 = 7;
/// Payload bytes captured.
pub const CNT_CAPTURED_BYTES: u32 = 8;
/// Reads of a thread's activity slot (worker memory) that failed: unattributed.
pub const CNT_SLOT_READ_FAILURES: u32 = 9;
/// Data records not made for want of scratch space: the per-thread TLS scratch map
/// was full (or a per-CPU scratch lookup failed, which cannot happen but the verifier
/// makes the programs check), or a sendmmsg/recvmmsg batch whose tail call to the
/// program reporting its messages failed (the agent sets it before attaching).
pub const CNT_SCRATCH_FAILURES: u32 = 10;
/// bpf_probe_read_kernel failures (the exec tracepoint's file name): the record went
/// out without it.
pub const CNT_KERNEL_READ_FAILURES: u32 = 11;
/// A watched process that opened a TLS library could not be stopped (bpf_send_signal
/// failed): its first TLS calls may run before the uprobes exist.
pub const CNT_PAUSE_FAILURES: u32 = 12;
/// Watched processes stopped (SIGSTOP) while the agent attached TLS probes to a libssl
/// they opened; each is recorded in `PAUSED` until the agent resumes it.
pub const CNT_PAUSED: u32 = 13;
/// Runs of the libssl entry programs for watched processes.
pub const CNT_TLS_WATCHED: u32 = 14;
/// Runs of the libssl entry programs for processes that are not watched. The probes
/// are attached per watched process, so this stays 0 but for a process that stopped
/// being watched while its probes were being released.
pub const CNT_TLS_UNWATCHED: u32 = 15;
/// io_uring requests submitted by watched processes (`io_uring:io_uring_submit_req`):
/// their I/O is done by the kernel on the ring's behalf, without the syscalls the
/// programs see, so none of it is captured.
pub const CNT_IO_URING_OPS: u32 = 16;
/// Of those, requests that move bytes (read, write, send, recv and their vectored,
/// fixed-buffer and zero-copy forms): what is missing from the capture.
pub const CNT_IO_URING_DATA_OPS: u32 = 17;
pub const NUM_COUNTERS: u32 = 18;

// ---- tracepoint record layouts the kernel programs assume ----
// Each is read at a fixed offset of the raw record; the agent checks every one against
// the tracepoint's tracefs `format` at load (openbox-agent/src/capture/tracefs.rs) and
// refuses to start on a kernel whose layout differs.

/// Where a kernel program reads one field of a tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawField {
    /// Byte offset from the start of the record (the common fields included).
    pub offset: usize,
    /// Bytes read.
    pub size: usize,
}

/// Syscall tracepoints (`syscalls:sys_enter_*`): argument `n` is the 8-byte slot at
/// `SYSCALL_ARGS_OFFSET + 8 * n`, whatever its C type.
pub const SYSCALL_ARGS_OFFSET: usize = 16;
/// Bytes of one syscall tracepoint argument slot.
pub const SYSCALL_ARG_SIZE: usize = 8;
/// `syscalls:sys_exit_*`: the return value.
pub const SYSCALL_RET: RawField = RawField {
    offset: 16,
    size: 8,
};
/// `task:task_newtask`: the child's pid (its tgid, for a process).
pub const TASK_NEWTASK_PID: RawField = RawField { offset: 8, size: 4 };
/// `task:task_newtask`: the clone flags.
pub const TASK_NEWTASK_CLONE_FLAGS: RawField = RawField {
    offset: 32,
    size: 8,
};
/// `sched:sched_process_exec`: `__data_loc` of the new image's file name.
pub const SCHED_PROCESS_EXEC_FILENAME: RawField = RawField { offset: 8, size: 4 };
/// `sched:sched_process_exec`: the pid before exec.
pub const SCHED_PROCESS_EXEC_OLD_PID: RawField = RawField {
    offset: 16,
    size: 4,
};
/// `sched:sched_process_exit`: whether the exiting thread is the last of its group.
pub const SCHED_PROCESS_EXIT_GROUP_DEAD: RawField = RawField {
    offset: 32,
    size: 1,
};

/// `io_uring:io_uring_submit_req`: the request's opcode (`IORING_OP_*`).
pub const IO_URING_SUBMIT_REQ_OPCODE: RawField = RawField {
    offset: 32,
    size: 1,
};

/// Common prefix of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventHeader {
    /// One of the `EV_*` constants.
    pub kind: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Host process id (thread group id).
    pub tgid: u32,
    /// Host thread id.
    pub tid: u32,
    /// Host tgid of the registered worker whose activity was running on this thread
    /// when the record was made (or that started this process), 0 when none.
    pub owner: u32,
    pub _pad: u32,
    /// The activity token the worker's hook had published in the thread's slot (or
    /// that the process inherited at fork), 0 when none. Meaningful only with `owner`.
    pub activity: u64,
}

/// Payload bytes of one call, or one chunk of it. The record in the ring buffer is the
/// header ([`DATA_HEADER_LEN`] bytes) followed by `len` payload bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DataEvent {
    pub hdr: EventHeader,
    /// Socket descriptor, or -1 for TLS plaintext (libssl does not say).
    pub fd: i32,
    /// `SRC_*`: which syscall or probe produced it.
    pub source: u32,
    /// The `SSL*` of a TLS record, or of the libssl call active on this thread.
    pub ssl: u64,
    /// Bytes the whole call moved (its return value).
    pub call_len: u64,
    /// Offset of this chunk within the call's bytes.
    pub offset: u64,
    /// Payload bytes in this record.
    pub len: u32,
    /// `DIR_*`.
    pub direction: u32,
    pub data: [u8; MAX_CHUNK],
}

/// Size of [`DataEvent`] without its payload.
pub const DATA_HEADER_LEN: usize = core::mem::size_of::<DataEvent>() - MAX_CHUNK;

/// An address as the kernel had it in a `sockaddr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockAddr {
    /// AF_INET (2), AF_INET6 (10), AF_UNIX (1), or 0 when unknown.
    pub family: u16,
    /// Port in host byte order.
    pub port: u16,
    pub _pad: u32,
    /// IPv4 in the first 4 bytes, or IPv6; for AF_UNIX the start of the path.
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnEvent {
    pub hdr: EventHeader,
    pub fd: i32,
    /// connect(): 0 or -EINPROGRESS; accept: the new fd; socketpair: the second fd.
    pub ret: i32,
    /// Remote address (connect argument, accept result).
    pub peer: SockAddr,
    /// socket(): type (SOCK_STREAM = 1, SOCK_DGRAM = 2).
    pub sock_type: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CloseEvent {
    pub hdr: EventHeader,
    pub fd: i32,
    /// `FD_*` kind the descriptor had.
    pub fd_kind: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct FileOpenEvent {
    pub hdr: EventHeader,
    pub fd: i32,
    /// openat flags (O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_APPEND, O_TRUNC …).
    pub open_flags: u32,
    /// The dirfd argument (AT_FDCWD = -100 for paths relative to the cwd).
    pub dirfd: i32,
    /// Bytes of `path` used, without the NUL.
    pub path_len: u32,
    pub path: [u8; MAX_PATH],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DupEvent {
    pub hdr: EventHeader,
    /// The descriptor copied.
    pub oldfd: i32,
    /// The copy.
    pub newfd: i32,
    /// `FD_*` kind of the descriptor copied.
    pub fd_kind: u32,
    /// `FD_*` kind of a tracked descriptor that `newfd` named before dup2/dup3 closed
    /// it, 0 when none.
    pub replaced_kind: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TransferEvent {
    pub hdr: EventHeader,
    /// Where the bytes came from, and its `FD_*` kind (0: not tracked, e.g. a pipe).
    pub in_fd: i32,
    pub in_kind: u32,
    /// Where they went, and its kind.
    pub out_fd: i32,
    pub out_kind: u32,
    /// `SRC_SENDFILE`, `SRC_SPLICE` or `SRC_COPY_FILE_RANGE`.
    pub source: u32,
    pub _pad: u32,
    /// Bytes moved (the call's result).
    pub bytes: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FileIoEvent {
    pub hdr: EventHeader,
    pub fd: i32,
    /// `SRC_*` syscall.
    pub source: u32,
    /// `DIR_*`.
    pub direction: u32,
    pub _pad: u32,
    /// Bytes the call moved.
    pub bytes: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcEvent {
    pub hdr: EventHeader,
    /// EV_FORK: the child's tgid. EV_EXIT: the exit code. EV_EXEC: the old pid.
    pub other: u32,
    pub path_len: u32,
    pub comm: [u8; COMM_LEN],
    /// EV_EXEC: the new image's path.
    pub path: [u8; MAX_PATH],
}

/// What the kernel knows of one descriptor of a watched process (map `FDS`, key
/// `tgid << 32 | fd`). Only the kernel programs write it once watching has begun; the
/// agent writes it only to seed descriptors that existed before (and only where the
/// kernel has no entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FdState {
    /// `FD_*`.
    pub kind: u32,
    pub _pad: u32,
    /// Identifies this incarnation of the descriptor: the timestamp of the record that
    /// created it (connect, accept, socket, socketpair, openat), or a small number the
    /// agent chose when seeding. A reused descriptor number gets a new generation.
    pub gen: u64,
}

/// Key of the `FD_FLAGS` map: flags the agent sets on one incarnation of a descriptor.
/// Keyed by generation, a late update can never touch a newer descriptor that reuses
/// the number (the agent reads events a little after they happen).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FdFlagKey {
    pub fd_key: u64,
    pub gen: u64,
}

/// Value of the `THREADS` map (key: host tid): where the thread's activity slot is.
/// Written only by the agent, after it checked the hook's peer credentials.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadSlot {
    /// User address, in the worker's memory, of the u64 the hook writes the running
    /// activity's token into (0 = none).
    pub addr: u64,
    /// Host tgid of the worker (the thread's own process).
    pub owner: u32,
    pub _pad: u32,
}

/// Value of the `INHERIT` map (key: host tgid): the activity that started this process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Inherited {
    pub owner: u32,
    pub _pad: u32,
    pub activity: u64,
}

/// Value of the `SSL_ARGS` map (key: pid_tgid): a libssl call in flight on a thread,
/// as its entry probe saw it; removed by its return probe. The agent reads it too, under
/// `--enforce`: a thread held in a socket write while this says `SSL_write` is sending
/// the ciphertext of the plaintext at `buf`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SslArgs {
    pub ssl: u64,
    pub buf: u64,
    pub num: u64,
    /// SSL_*_ex: where the byte count is written.
    pub out_len: u64,
    /// `SRC_SSL_*`.
    pub source: u32,
    /// `SSL_CALL_*` flags.
    pub flags: u32,
}

/// [`SslArgs::flags`]: the call moved bytes on a socket itself (a socket BIO), so its
/// ciphertext went out inside it; a write without it encrypted into a memory BIO.
pub const SSL_CALL_SOCKET_IO: u32 = 1;

/// Bytes kept of the first unsent write of a memory-BIO SSL object ([`UnsentWrite`]):
/// enough for a request head with its headers.
pub const UNSENT_HEAD: usize = 2048;

/// Key of the `TLS_UNSENT` map: an SSL object of a process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnsentKey {
    pub tgid: u32,
    pub _pad: u32,
    pub ssl: u64,
}

/// Value of the `TLS_UNSENT` map: the plaintext a memory-BIO SSL object encrypted since
/// the agent last let its socket send (asyncio's TLS: `SSL_write` returns before any
/// byte is sent, and the event loop sends the ciphertext later, outside libssl). Written
/// by the `SSL_write` return probe on registered worker threads: created by the first
/// such write (its first bytes kept), counted by the next ones; removed by the agent
/// under `--enforce` once a send of that socket carrying it was let through or denied.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UnsentWrite {
    /// Host tid of the thread that wrote it.
    pub tid: u32,
    /// `SSL_write` calls since the entry was created (the first included).
    pub writes: u32,
    /// Plaintext length of the first write.
    pub len: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the first write.
    pub at_ns: u64,
    /// The token of the activity whose step made the first write (0: none): the event
    /// loop may send it later, between that activity's steps or in another's.
    pub activity: u64,
    /// Bytes of it in `head` (0 when they could not be read).
    pub head_len: u32,
    /// Host tgid of the worker that activity belongs to (0: none): the writer's own
    /// process, or the worker that started it.
    pub owner: u32,
    pub head: [u8; UNSENT_HEAD],
}

impl Default for UnsentWrite {
    fn default() -> Self {
        UnsentWrite {
            tid: 0,
            writes: 0,
            len: 0,
            at_ns: 0,
            activity: 0,
            head_len: 0,
            owner: 0,
            head: [0; UNSENT_HEAD],
        }
    }
}

/// Value of the `PAUSED` map (key: host tgid): a process the kernel stopped when it
/// opened a libssl, until the agent resumes it. The map is pinned in bpffs, so a record
/// outlives an agent that crashed meanwhile and the next agent resumes the process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PausedProc {
    /// `bpf_ktime_get_boot_ns()` at the stop: CLOCK_BOOTTIME, the clock of the start
    /// time in /proc/PID/stat. A process with this pid that started later is another one
    /// (the pid was reused) and is never resumed on this record's behalf.
    pub paused_at_ns: u64,
}

/// Key of the `FDS` map.
#[inline(always)]
pub fn fd_key(tgid: u32, fd: i32) -> u64 {
    ((tgid as u64) << 32) | (fd as u32 as u64)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers and arrays, every bit pattern is valid.
    unsafe impl aya::Pod for super::FdState {}
    unsafe impl aya::Pod for super::FdFlagKey {}
    unsafe impl aya::Pod for super::ThreadSlot {}
    unsafe impl aya::Pod for super::Inherited {}
    unsafe impl aya::Pod for super::PausedProc {}
    unsafe impl aya::Pod for super::SslArgs {}
    unsafe impl aya::Pod for super::UnsentKey {}
    unsafe impl aya::Pod for super::UnsentWrite {}
}
