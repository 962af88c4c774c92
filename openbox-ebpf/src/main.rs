//! Kernel programs of openbox-agent: syscall tracepoints for sockets and files, libssl
//! uprobes for TLS plaintext, and process lifecycle tracepoints.
//!
//! Every program first asks `WATCHED` whether the current process is watched; an
//! unwatched process costs one hash lookup and one per-CPU counter increment, and
//! nothing is copied. The kernel has no kprobes, so everything is built on tracepoints
//! and uprobes.
#![no_std]
#![no_main]

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes,
        bpf_probe_read_user, bpf_probe_read_user_str_bytes,
        generated::{bpf_probe_read_user as raw_probe_read_user, bpf_ringbuf_output, bpf_send_signal},
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
    EbpfContext,
};
use openbox_common::*;

// ---- load-time settings (EbpfLoader::set_global) ----
#[no_mangle]
static CAPTURE_LIMIT: u32 = DEFAULT_CAPTURE_LIMIT;
#[no_mangle]
static PAUSE_ON_TLS_LIB: u32 = 0;

// ---- maps ----
/// Watched processes: tgid → flags. Filled by the agent and by fork of a watched process.
#[map]
static WATCHED: HashMap<u32, u32> = HashMap::with_max_entries(8192, 0);
/// Descriptors of watched processes: fd_key(tgid, fd) → FdState.
#[map]
static FDS: HashMap<u64, FdState> = HashMap::with_max_entries(131072, 0);
/// Arguments of a syscall in flight, by pid_tgid (a thread is in one syscall at a time).
#[map]
static ARGS: HashMap<u64, SyscallArgs> = HashMap::with_max_entries(16384, 0);
/// Arguments of a libssl call in flight, by pid_tgid. Its presence also means "a TLS
/// call is active on this thread": socket bytes moved meanwhile are ciphertext.
#[map]
static SSL_ARGS: HashMap<u64, SslArgs> = HashMap::with_max_entries(16384, 0);
/// Scratch space for data records (the stack is 512 bytes).
#[map]
static SCRATCH: PerCpuArray<DataEvent> = PerCpuArray::with_max_entries(1, 0);
/// Flags the agent sets on one incarnation of a descriptor (see FdFlagKey).
#[map]
static FD_FLAGS: HashMap<FdFlagKey, u32> = HashMap::with_max_entries(65536, 0);
/// Threads of registered workers (key: host tid) and where their activity slot is.
/// Written by the agent once the hook's registration passed the peer-credential check.
#[map]
static THREADS: HashMap<u32, ThreadSlot> = HashMap::with_max_entries(65536, 0);
/// Processes started while an activity ran (key: host tgid): the activity they serve.
/// Written here at fork, from the parent's attribution; never by user space.
#[map]
static INHERIT: HashMap<u32, Inherited> = HashMap::with_max_entries(16384, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct SyscallArgs {
    source: u32,
    fd: i32,
    /// Buffer, iovec array, msghdr or sockaddr pointer, by source.
    buf: u64,
    /// Requested byte count or iovec count.
    count: u64,
    /// FD kind at entry.
    fd_kind: u32,
    fd_flags: u32,
    /// connect: the peer read at entry.
    peer: SockAddr,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SslArgs {
    ssl: u64,
    buf: u64,
    num: u64,
    /// SSL_*_ex: where the byte count is written.
    out_len: u64,
    source: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

// Internal "source" values for non-data syscalls stashed in ARGS.
const SRC_CONNECT: u32 = 100;
const SRC_ACCEPT: u32 = 101;
const SRC_OPENAT: u32 = 102;
const SRC_SOCKET: u32 = 103;
const SRC_SOCKETPAIR: u32 = 104;

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const EINPROGRESS: i64 = 115;
const CLONE_THREAD: u64 = 0x10000;
const SIGSTOP: u32 = 19;

// ---- helpers ----

#[inline(always)]
fn count(idx: u32, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, programs do not nest on one CPU.
        unsafe { *p += n };
    }
}

/// The current tgid when it is watched, counting the probe hit either way.
#[inline(always)]
fn watched() -> Option<(u64, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: plain lookup; the value is not kept.
    if unsafe { WATCHED.get(tgid) }.is_some() {
        count(CNT_WATCHED, 1);
        Some((pid_tgid, tgid))
    } else {
        count(CNT_UNWATCHED, 1);
        None
    }
}

/// Which worker activity the current thread works for: (owner tgid, token).
///
/// A registered worker thread reads its slot, which the hook rewrites on every step of
/// an activity (the slot is in the worker's own memory: `current` is that worker, so
/// the address means the same thing here as to the hook). Any other process of a
/// watched tree uses what it inherited when an activity started it. A worker thread
/// never falls back to inheritance: its slot is the only exact evidence.
#[inline(always)]
fn attribution(pid_tgid: u64) -> (u32, u64) {
    let tid = pid_tgid as u32;
    // SAFETY: plain lookups; values are copied out at once.
    if let Some(slot) = unsafe { THREADS.get(tid) } {
        let (addr, owner) = (slot.addr, slot.owner);
        return match unsafe { bpf_probe_read_user(addr as *const u64) } {
            Ok(token) if token != 0 => (owner, token),
            Ok(_) => (0, 0),
            Err(_) => {
                count(CNT_SLOT_READ_FAILURES, 1);
                (0, 0)
            }
        };
    }
    match unsafe { INHERIT.get((pid_tgid >> 32) as u32) } {
        Some(i) => (i.owner, i.activity),
        None => (0, 0),
    }
}

#[inline(always)]
fn header(kind: u32, flags: u32, pid_tgid: u64) -> EventHeader {
    let (owner, activity) = attribution(pid_tgid);
    EventHeader {
        kind,
        flags,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        owner,
        _pad: 0,
        activity,
    }
}

/// Sends a fixed-size record to the ring buffer, counting success or loss.
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// Wake the agent only once this much is waiting; it also drains the ring on a short
/// timer. Waking it for every record cost the traced process a context switch per
/// syscall (measured: 6.3 µs instead of 2.5 µs per 1-byte write+read).
const WAKEUP_BYTES: u64 = 64 * 1024;

#[inline(always)]
fn wakeup() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[inline(always)]
fn submit<T: 'static>(value: T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(value);
            entry.submit(wakeup());
            count(CNT_EVENTS, 1);
        }
        None => count(CNT_RINGBUF_DROPS, 1),
    }
}

#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // Syscall tracepoint arguments are 8-byte slots from offset 16; tracepoint
    // contexts may be read directly.
    unsafe { ptr::read((ctx.as_ptr() as *const u8).add(16 + 8 * n) as *const u64) }
}

#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    unsafe { ptr::read((ctx.as_ptr() as *const u8).add(16) as *const i64) }
}

#[inline(always)]
fn read_sockaddr(uaddr: u64) -> SockAddr {
    let mut out = SockAddr::default();
    if uaddr == 0 {
        return out;
    }
    // sockaddr_in6 is 28 bytes: family(2) port(2) flowinfo(4) addr(16) scope(4).
    let raw: [u8; 28] = match unsafe { bpf_probe_read_user(uaddr as *const [u8; 28]) } {
        Ok(r) => r,
        Err(_) => {
            // A sockaddr_in is only 16 bytes and may end a page: try the short form.
            match unsafe { bpf_probe_read_user(uaddr as *const [u8; 16]) } {
                Ok(r) => {
                    let mut full = [0u8; 28];
                    full[..16].copy_from_slice(&r);
                    full
                }
                Err(_) => return out,
            }
        }
    };
    out.family = u16::from_ne_bytes([raw[0], raw[1]]);
    out.port = u16::from_be_bytes([raw[2], raw[3]]);
    match out.family {
        AF_INET => out.addr[..4].copy_from_slice(&raw[4..8]),
        AF_INET6 => out.addr.copy_from_slice(&raw[8..24]),
        AF_UNIX => out.addr.copy_from_slice(&raw[2..18]),
        _ => {}
    }
    out
}

/// Loop state of [`emit_payload`], kept in map memory on purpose: the verifier does not
/// track values loaded from a map precisely, so every iteration starts from the same
/// abstract state and is pruned. Kept in registers, the exact offsets differed per
/// iteration and verification hit "BPF program is too large. Processed 1000001 insn".
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopState {
    /// Current buffer (or iovec) and its length.
    base: u64,
    len: u64,
    /// Bytes of the current buffer already copied.
    off: u64,
    /// Index of the current iovec.
    idx: u64,
    /// Bytes copied for this call so far, and the most that will be.
    done: u64,
    wanted: u64,
}

#[map]
static LOOP: PerCpuArray<LoopState> = PerCpuArray::with_max_entries(1, 0);

macro_rules! vget {
    ($st:expr, $f:ident) => {
        unsafe { ptr::read_volatile(ptr::addr_of!((*$st).$f)) }
    };
}
macro_rules! vset {
    ($st:expr, $f:ident, $v:expr) => {
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*$st).$f), $v) }
    };
}

#[inline(always)]
fn output_scratch(ev: *mut DataEvent, size: u64) -> bool {
    let rc = unsafe { bpf_ringbuf_output(&EVENTS as *const _ as *mut c_void, ev as *mut c_void, size, wakeup()) };
    if rc == 0 {
        count(CNT_EVENTS, 1);
        true
    } else {
        count(CNT_RINGBUF_DROPS, 1);
        false
    }
}

/// Copies up to `CAPTURE_LIMIT` bytes of what a call moved into data records: from one
/// buffer (`iov == false`: `ptr` is the buffer) or an iovec array (`ptr` is the array,
/// `iovcnt` entries). One record per chunk of at most MAX_CHUNK bytes (and per iovec),
/// at most MAX_RECORDS_PER_CALL records.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one call site per record kind; a struct would only rename them")]
fn emit_payload(
    kind: u32,
    pid_tgid: u64,
    fd: i32,
    source: u32,
    direction: u32,
    ssl: u64,
    ptr: u64,
    iov: bool,
    iovcnt: u64,
    call_len: u64,
) {
    let Some(ev) = SCRATCH.get_ptr_mut(0) else { return };
    let Some(st) = LOOP.get_ptr_mut(0) else { return };
    let limit = unsafe { ptr::read_volatile(&CAPTURE_LIMIT) } as u64;
    let limit = if limit > MAX_CAPTURE_LIMIT as u64 { MAX_CAPTURE_LIMIT as u64 } else { limit };
    let wanted = if call_len < limit { call_len } else { limit };
    let iovcnt = if iovcnt > MAX_IOVECS as u64 { MAX_IOVECS as u64 } else { iovcnt };
    // SAFETY: the per-CPU scratch slots are ours until the program returns.
    unsafe {
        (*ev).hdr = header(kind, 0, pid_tgid);
        (*ev).fd = fd;
        (*ev).source = source;
        (*ev).ssl = ssl;
        (*ev).call_len = call_len;
        (*ev).direction = direction;
    }
    let first = if iov {
        if iovcnt == 0 {
            return;
        }
        match unsafe { bpf_probe_read_user(ptr as *const Iovec) } {
            Ok(v) => v,
            Err(_) => {
                count(CNT_READ_FAILURES, 1);
                return;
            }
        }
    } else {
        Iovec { base: ptr, len: call_len }
    };
    vset!(st, base, first.base);
    vset!(st, len, first.len);
    vset!(st, off, 0);
    vset!(st, idx, 0);
    vset!(st, done, 0);
    vset!(st, wanted, wanted);

    for _ in 0..MAX_RECORDS_PER_CALL {
        let done = vget!(st, done);
        let wanted = vget!(st, wanted);
        if done >= wanted {
            break;
        }
        let off = vget!(st, off);
        let len = vget!(st, len);
        if off >= len {
            // This iovec is exhausted (or empty): move to the next.
            if !iov {
                break;
            }
            let idx = vget!(st, idx) + 1;
            if idx >= iovcnt {
                break;
            }
            let next = match unsafe { bpf_probe_read_user((ptr + idx * 16) as *const Iovec) } {
                Ok(v) => v,
                Err(_) => {
                    count(CNT_READ_FAILURES, 1);
                    break;
                }
            };
            vset!(st, idx, idx);
            vset!(st, base, next.base);
            vset!(st, len, next.len);
            vset!(st, off, 0);
            continue;
        }
        let mut n = len - off;
        if n > wanted - done {
            n = wanted - done;
        }
        if n > MAX_CHUNK as u64 {
            n = MAX_CHUNK as u64;
        }
        let n = n as u32;
        // Bound for the verifier: the copy must fit the scratch record.
        if n > MAX_CHUNK as u32 {
            break;
        }
        let mut flags = 0;
        let src = vget!(st, base) + off;
        let rc = unsafe {
            raw_probe_read_user((*ev).data.as_mut_ptr() as *mut c_void, n, src as *const c_void)
        };
        if rc != 0 {
            flags |= FLAG_READ_FAILED;
            count(CNT_READ_FAILURES, 1);
        }
        let done = done + n as u64;
        vset!(st, done, done);
        vset!(st, off, off + n as u64);
        if done >= wanted {
            flags |= FLAG_LAST;
            if wanted < call_len {
                flags |= FLAG_TRUNCATED;
            }
        }
        unsafe {
            (*ev).hdr.flags = flags;
            (*ev).offset = done - n as u64;
            (*ev).len = n;
        }
        if output_scratch(ev, DATA_HEADER_LEN as u64 + n as u64) {
            count(CNT_CAPTURED_BYTES, n as u64);
        }
    }
    let done = vget!(st, done);
    if done < call_len {
        count(CNT_TRUNCATED_CALLS, 1);
        count(CNT_TRUNCATED_BYTES, call_len - done);
        if done < vget!(st, wanted) {
            // Out of records or iovecs before the limit: an empty last record tells the
            // agent where the call ended.
            unsafe {
                (*ev).offset = done;
                (*ev).len = 0;
                (*ev).hdr.flags = FLAG_LAST | FLAG_TRUNCATED;
            }
            output_scratch(ev, DATA_HEADER_LEN as u64);
        }
    }
}

/// A data record with no payload: ciphertext, or a descriptor marked FD_NO_PAYLOAD.
#[inline(always)]
fn emit_no_payload(pid_tgid: u64, fd: i32, source: u32, direction: u32, ssl: u64, call_len: u64, flags: u32) {
    let Some(ev) = SCRATCH.get_ptr_mut(0) else { return };
    let ev = unsafe { &mut *ev };
    ev.hdr = header(EV_SOCK_DATA, flags | FLAG_NO_PAYLOAD | FLAG_LAST, pid_tgid);
    ev.fd = fd;
    ev.source = source;
    ev.ssl = ssl;
    ev.call_len = call_len;
    ev.offset = 0;
    ev.len = 0;
    ev.direction = direction;
    output_scratch(ev, DATA_HEADER_LEN as u64);
}

// ---- data syscalls ----

/// Entry of read/write/readv/writev/recvfrom/sendto/recvmsg/sendmsg: stash the
/// arguments when the process is watched and the descriptor tracked.
#[inline(always)]
fn data_enter(ctx: &TracePointContext, source: u32) -> u32 {
    let Some((pid_tgid, tgid)) = watched() else { return 0 };
    let fd = arg(ctx, 0) as i32;
    let key = fd_key(tgid, fd);
    let Some(state) = (unsafe { FDS.get(key) }).copied() else { return 0 };
    let flags = unsafe { FD_FLAGS.get(FdFlagKey { fd_key: key, gen: state.gen }) }.copied().unwrap_or(0);
    if flags & FD_QUIET != 0 {
        return 0;
    }
    let args = SyscallArgs {
        source,
        fd,
        buf: arg(ctx, 1),
        count: arg(ctx, 2),
        fd_kind: state.kind,
        fd_flags: flags,
        peer: SockAddr::default(),
    };
    if ARGS.insert(pid_tgid, args, 0).is_err() {
        count(CNT_MAP_FULL, 1);
    }
    0
}

#[inline(always)]
fn data_exit(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(args) = (unsafe { ARGS.get(pid_tgid) }).copied() else { return 0 };
    let _ = ARGS.remove(pid_tgid);
    let n = ret(ctx);
    if n <= 0 {
        return 0;
    }
    let n = n as u64;
    let direction = match args.source {
        SRC_WRITE | SRC_WRITEV | SRC_SENDTO | SRC_SENDMSG => DIR_EGRESS,
        _ => DIR_INGRESS,
    };
    if args.fd_kind == FD_FILE {
        submit(FileIoEvent {
            hdr: header(EV_FILE_IO, 0, pid_tgid),
            fd: args.fd,
            source: args.source,
            direction,
            _pad: 0,
            bytes: n,
        });
        return 0;
    }
    // A libssl call active on this thread: these are its ciphertext bytes.
    if let Some(ssl) = unsafe { SSL_ARGS.get(pid_tgid) } {
        emit_no_payload(pid_tgid, args.fd, args.source, direction, ssl.ssl, n, FLAG_IN_SSL);
        return 0;
    }
    if args.fd_flags & FD_NO_PAYLOAD != 0 {
        emit_no_payload(pid_tgid, args.fd, args.source, direction, 0, n, 0);
        return 0;
    }
    let (ptr, iov, iovcnt) = match args.source {
        SRC_READV | SRC_WRITEV => (args.buf, true, args.count),
        SRC_RECVMSG | SRC_SENDMSG => {
            // struct user_msghdr: msg_iov at offset 16, msg_iovlen at 24.
            let iov_ptr = unsafe { bpf_probe_read_user((args.buf + 16) as *const u64) }.unwrap_or(0);
            let iovlen = unsafe { bpf_probe_read_user((args.buf + 24) as *const u64) }.unwrap_or(0);
            (iov_ptr, true, iovlen)
        }
        _ => (args.buf, false, 0),
    };
    emit_payload(EV_SOCK_DATA, pid_tgid, args.fd, args.source, direction, 0, ptr, iov, iovcnt, n);
    0
}

macro_rules! data_syscall {
    ($enter:ident, $exit:ident, $src:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            data_enter(&ctx, $src)
        }
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            data_exit(&ctx)
        }
    };
}

data_syscall!(sys_enter_read, sys_exit_read, SRC_READ);
data_syscall!(sys_enter_write, sys_exit_write, SRC_WRITE);
data_syscall!(sys_enter_readv, sys_exit_readv, SRC_READV);
data_syscall!(sys_enter_writev, sys_exit_writev, SRC_WRITEV);
data_syscall!(sys_enter_recvfrom, sys_exit_recvfrom, SRC_RECVFROM);
data_syscall!(sys_enter_sendto, sys_exit_sendto, SRC_SENDTO);
data_syscall!(sys_enter_recvmsg, sys_exit_recvmsg, SRC_RECVMSG);
data_syscall!(sys_enter_sendmsg, sys_exit_sendmsg, SRC_SENDMSG);

// ---- connections ----

#[inline(always)]
fn stash(pid_tgid: u64, source: u32, fd: i32, buf: u64, count_: u64, peer: SockAddr) {
    let args = SyscallArgs { source, fd, buf, count: count_, fd_kind: 0, fd_flags: 0, peer };
    if ARGS.insert(pid_tgid, args, 0).is_err() {
        count(CNT_MAP_FULL, 1);
    }
}

#[inline(always)]
fn take_args(source: u32) -> Option<(u64, SyscallArgs)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let args = unsafe { ARGS.get(pid_tgid) }.copied()?;
    let _ = ARGS.remove(pid_tgid);
    if args.source != source {
        return None;
    }
    Some((pid_tgid, args))
}

#[inline(always)]
fn track_fd(tgid: u32, fd: i32, kind: u32, gen: u64) {
    let state = FdState { kind, _pad: 0, gen };
    if FDS.insert(fd_key(tgid, fd), state, 0).is_err() {
        count(CNT_MAP_FULL, 1);
    }
}

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, _)) = watched() else { return 0 };
    let peer = read_sockaddr(arg(&ctx, 1));
    stash(pid_tgid, SRC_CONNECT, arg(&ctx, 0) as i32, 0, 0, peer);
    0
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, args)) = take_args(SRC_CONNECT) else { return 0 };
    let r = ret(&ctx);
    if r != 0 && r != -EINPROGRESS {
        return 0;
    }
    let hdr = header(EV_CONNECT, 0, pid_tgid);
    track_fd((pid_tgid >> 32) as u32, args.fd, FD_SOCKET, hdr.ts_ns);
    submit(ConnEvent {
        hdr,
        fd: args.fd,
        ret: r as i32,
        peer: args.peer,
        sock_type: 0,
        _pad: 0,
    });
    0
}

#[inline(always)]
fn accept_enter(ctx: &TracePointContext) -> u32 {
    let Some((pid_tgid, _)) = watched() else { return 0 };
    stash(pid_tgid, SRC_ACCEPT, arg(ctx, 0) as i32, arg(ctx, 1), 0, SockAddr::default());
    0
}

#[inline(always)]
fn accept_exit(ctx: &TracePointContext) -> u32 {
    let Some((pid_tgid, args)) = take_args(SRC_ACCEPT) else { return 0 };
    let r = ret(ctx);
    if r < 0 {
        return 0;
    }
    let fd = r as i32;
    let hdr = header(EV_ACCEPT, 0, pid_tgid);
    track_fd((pid_tgid >> 32) as u32, fd, FD_SOCKET, hdr.ts_ns);
    submit(ConnEvent {
        hdr,
        fd,
        ret: args.fd,
        peer: read_sockaddr(args.buf),
        sock_type: 0,
        _pad: 0,
    });
    0
}

#[tracepoint]
pub fn sys_enter_accept(ctx: TracePointContext) -> u32 {
    accept_enter(&ctx)
}
#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    accept_exit(&ctx)
}
#[tracepoint]
pub fn sys_enter_accept4(ctx: TracePointContext) -> u32 {
    accept_enter(&ctx)
}
#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    accept_exit(&ctx)
}

#[tracepoint]
pub fn sys_enter_socket(ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, _)) = watched() else { return 0 };
    let peer = SockAddr { family: arg(&ctx, 0) as u16, ..SockAddr::default() };
    stash(pid_tgid, SRC_SOCKET, -1, 0, arg(&ctx, 1), peer);
    0
}

#[tracepoint]
pub fn sys_exit_socket(ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, args)) = take_args(SRC_SOCKET) else { return 0 };
    let r = ret(&ctx);
    if r < 0 {
        return 0;
    }
    let hdr = header(EV_SOCKET, 0, pid_tgid);
    track_fd((pid_tgid >> 32) as u32, r as i32, FD_SOCKET, hdr.ts_ns);
    submit(ConnEvent {
        hdr,
        fd: r as i32,
        ret: -1,
        peer: args.peer,
        sock_type: (args.count & 0xf) as u32,
        _pad: 0,
    });
    0
}

#[tracepoint]
pub fn sys_enter_socketpair(ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, _)) = watched() else { return 0 };
    let peer = SockAddr { family: arg(&ctx, 0) as u16, ..SockAddr::default() };
    stash(pid_tgid, SRC_SOCKETPAIR, -1, arg(&ctx, 3), arg(&ctx, 1), peer);
    0
}

#[tracepoint]
pub fn sys_exit_socketpair(ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, args)) = take_args(SRC_SOCKETPAIR) else { return 0 };
    if ret(&ctx) != 0 {
        return 0;
    }
    let Ok(fds) = (unsafe { bpf_probe_read_user(args.buf as *const [i32; 2]) }) else {
        count(CNT_READ_FAILURES, 1);
        return 0;
    };
    let tgid = (pid_tgid >> 32) as u32;
    let hdr = header(EV_SOCKET, 0, pid_tgid);
    track_fd(tgid, fds[0], FD_SOCKET, hdr.ts_ns);
    track_fd(tgid, fds[1], FD_SOCKET, hdr.ts_ns);
    submit(ConnEvent {
        hdr,
        fd: fds[0],
        ret: fds[1],
        peer: args.peer,
        sock_type: (args.count & 0xf) as u32,
        _pad: 0,
    });
    0
}

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, tgid)) = watched() else { return 0 };
    let fd = arg(&ctx, 0) as i32;
    let key = fd_key(tgid, fd);
    let Some(state) = (unsafe { FDS.get(key) }).copied() else { return 0 };
    let _ = FDS.remove(key);
    submit(CloseEvent { hdr: header(EV_CLOSE, 0, pid_tgid), fd, fd_kind: state.kind });
    0
}

// ---- files ----

#[inline(always)]
fn openat_enter(ctx: &TracePointContext, flags: u64) -> u32 {
    let Some((pid_tgid, _)) = watched() else { return 0 };
    let peer = SockAddr::default();
    // dirfd rides in `fd`, the path pointer in `buf`, the open flags in `count`.
    stash(pid_tgid, SRC_OPENAT, arg(ctx, 0) as i32, arg(ctx, 1), flags, peer);
    0
}

#[tracepoint]
pub fn sys_enter_openat(ctx: TracePointContext) -> u32 {
    openat_enter(&ctx, arg(&ctx, 2))
}

#[tracepoint]
pub fn sys_enter_openat2(ctx: TracePointContext) -> u32 {
    // struct open_how starts with the u64 flags.
    let how = arg(&ctx, 2);
    let flags = unsafe { bpf_probe_read_user(how as *const u64) }.unwrap_or(0);
    openat_enter(&ctx, flags)
}

#[inline(always)]
fn openat_exit(ctx: &TracePointContext) -> u32 {
    let Some((pid_tgid, args)) = take_args(SRC_OPENAT) else { return 0 };
    let r = ret(ctx);
    if r < 0 {
        return 0;
    }
    let tgid = (pid_tgid >> 32) as u32;
    let fd = r as i32;
    let hdr = header(EV_FILE_OPEN, 0, pid_tgid);
    track_fd(tgid, fd, FD_FILE, hdr.ts_ns);
    let Some(mut entry) = EVENTS.reserve::<FileOpenEvent>(0) else {
        count(CNT_RINGBUF_DROPS, 1);
        return 0;
    };
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    ev.hdr = hdr;
    ev.fd = fd;
    ev.open_flags = args.count as u32;
    ev.dirfd = args.fd;
    let len = match unsafe { bpf_probe_read_user_str_bytes(args.buf as *const u8, &mut ev.path) } {
        Ok(s) => s.len(),
        Err(_) => {
            count(CNT_READ_FAILURES, 1);
            0
        }
    };
    ev.path_len = len as u32;
    if unsafe { ptr::read_volatile(&PAUSE_ON_TLS_LIB) } != 0 && contains_libssl(&ev.path, len) {
        // Stop the process until the agent has attached its uprobes to this library:
        // otherwise its first TLS calls could run before the probes exist.
        if unsafe { bpf_send_signal(SIGSTOP) } == 0 {
            ev.hdr.flags |= FLAG_PAUSED;
        }
    }
    // A paused process waits for the agent: wake it now.
    let wake = if ev.hdr.flags & FLAG_PAUSED != 0 { BPF_RB_FORCE_WAKEUP } else { wakeup() };
    entry.submit(wake);
    count(CNT_EVENTS, 1);
    0
}

#[inline(always)]
fn contains_libssl(path: &[u8; MAX_PATH], len: usize) -> bool {
    let needle = *b"libssl";
    let mut i = 0;
    while i + needle.len() <= MAX_PATH && i + needle.len() <= len {
        if path[i] == b'l'
            && path[i + 1] == b'i'
            && path[i + 2] == b'b'
            && path[i + 3] == b's'
            && path[i + 4] == b's'
            && path[i + 5] == b'l'
        {
            return true;
        }
        i += 1;
    }
    false
}

#[tracepoint]
pub fn sys_exit_openat(ctx: TracePointContext) -> u32 {
    openat_exit(&ctx)
}

#[tracepoint]
pub fn sys_exit_openat2(ctx: TracePointContext) -> u32 {
    openat_exit(&ctx)
}

// ---- processes ----

#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    // Runs in the parent, before the child can run: the child is watched from its
    // first instruction. Threads (CLONE_THREAD) share the parent's tgid already.
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if unsafe { WATCHED.get(tgid) }.is_none() {
        return 0;
    }
    let clone_flags: u64 = unsafe { ptr::read((ctx.as_ptr() as *const u8).add(32) as *const u64) };
    if clone_flags & CLONE_THREAD != 0 {
        return 0;
    }
    let child: u32 = unsafe { ptr::read((ctx.as_ptr() as *const u8).add(8) as *const u32) };
    if WATCHED.insert(child, 1, BPF_NOEXIST as u64).is_err() {
        count(CNT_MAP_FULL, 1);
    }
    // A process started while an activity ran on this thread (subprocess.run, a shell)
    // works for that activity for its whole life, and so do its own children.
    let (owner, activity) = attribution(pid_tgid);
    if activity != 0 {
        let value = Inherited { owner, _pad: 0, activity };
        if INHERIT.insert(child, value, 0).is_err() {
            count(CNT_MAP_FULL, 1);
        }
    }
    let Some(mut entry) = EVENTS.reserve::<ProcEvent>(0) else {
        count(CNT_RINGBUF_DROPS, 1);
        return 0;
    };
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    ev.hdr = header(EV_FORK, 0, pid_tgid);
    ev.other = child;
    ev.path_len = 0;
    ev.comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    entry.submit(wakeup());
    count(CNT_EVENTS, 1);
    0
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, _)) = watched() else { return 0 };
    let Some(mut entry) = EVENTS.reserve::<ProcEvent>(0) else {
        count(CNT_RINGBUF_DROPS, 1);
        return 0;
    };
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    ev.hdr = header(EV_EXEC, 0, pid_tgid);
    ev.other = unsafe { ptr::read((ctx.as_ptr() as *const u8).add(16) as *const u32) };
    ev.comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    // __data_loc: low 16 bits offset from the record start, high 16 bits length.
    let loc: u32 = unsafe { ptr::read((ctx.as_ptr() as *const u8).add(8) as *const u32) };
    let off = (loc & 0xffff) as usize;
    let src = unsafe { (ctx.as_ptr() as *const u8).add(off) };
    ev.path_len = match unsafe { bpf_probe_read_kernel_str_bytes(src, &mut ev.path) } {
        Ok(s) => s.len() as u32,
        Err(_) => 0,
    };
    entry.submit(wakeup());
    count(CNT_EVENTS, 1);
    0
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if unsafe { WATCHED.get(tgid) }.is_none() {
        return 0;
    }
    let _ = ARGS.remove(pid_tgid);
    let _ = SSL_ARGS.remove(pid_tgid);
    // The tid may be reused by an unrelated thread: its slot registration dies here.
    let _ = THREADS.remove(pid_tgid as u32);
    let group_dead: u8 = unsafe { ptr::read((ctx.as_ptr() as *const u8).add(32)) };
    if group_dead == 0 {
        return 0;
    }
    let _ = WATCHED.remove(tgid);
    let _ = INHERIT.remove(tgid);
    let Some(mut entry) = EVENTS.reserve::<ProcEvent>(0) else {
        count(CNT_RINGBUF_DROPS, 1);
        return 0;
    };
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    ev.hdr = header(EV_EXIT, 0, pid_tgid);
    ev.other = 0;
    ev.path_len = 0;
    ev.comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    entry.submit(wakeup());
    count(CNT_EVENTS, 1);
    0
}

// ---- libssl ----

#[inline(always)]
fn ssl_enter(ctx: &ProbeContext, source: u32, ex: bool) -> u32 {
    let Some((pid_tgid, _)) = watched() else { return 0 };
    let args = SslArgs {
        ssl: ctx.arg::<u64>(0).unwrap_or(0),
        buf: ctx.arg::<u64>(1).unwrap_or(0),
        num: ctx.arg::<u64>(2).unwrap_or(0),
        out_len: if ex { ctx.arg::<u64>(3).unwrap_or(0) } else { 0 },
        source,
        _pad: 0,
    };
    if SSL_ARGS.insert(pid_tgid, args, 0).is_err() {
        count(CNT_MAP_FULL, 1);
    }
    0
}

#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, SRC_SSL_WRITE, false)
}
#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, SRC_SSL_WRITE_EX, true)
}
#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, SRC_SSL_READ, false)
}
#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, SRC_SSL_READ_EX, true)
}

#[uretprobe]
pub fn ssl_ret(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(args) = (unsafe { SSL_ARGS.get(pid_tgid) }).copied() else { return 0 };
    let _ = SSL_ARGS.remove(pid_tgid);
    let rv: i64 = ctx.ret::<i32>() as i64;
    let n: u64 = match args.source {
        SRC_SSL_WRITE_EX | SRC_SSL_READ_EX => {
            if rv != 1 || args.out_len == 0 {
                return 0;
            }
            unsafe { bpf_probe_read_user(args.out_len as *const u64) }.unwrap_or(0)
        }
        _ => {
            if rv <= 0 {
                return 0;
            }
            rv as u64
        }
    };
    if n == 0 {
        return 0;
    }
    let direction = match args.source {
        SRC_SSL_WRITE | SRC_SSL_WRITE_EX => DIR_EGRESS,
        _ => DIR_INGRESS,
    };
    emit_payload(EV_TLS_DATA, pid_tgid, -1, args.source, direction, args.ssl, args.buf, false, 0, n);
    0
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
