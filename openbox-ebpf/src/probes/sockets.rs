//! Socket syscalls: the data calls (read/write and friends, which also serve tracked
//! files), connect, accept, socket, socketpair and close.
//!
//! Every `syscalls:*` tracepoint reads its arguments as 8-byte slots from offset 16
//! and `ret` at offset 16 (`task::arg`, `task::ret`); for example, on the kernel this
//! was written on (6.18):
//!
//! ```text
//! name: sys_enter_read
//! format:
//!     field:unsigned short common_type;   offset:0;   size:2; signed:0;
//!     field:unsigned char common_flags;   offset:2;   size:1; signed:0;
//!     field:unsigned char common_preempt_count;   offset:3;   size:1; signed:0;
//!     field:int common_pid;   offset:4;   size:4; signed:1;
//!
//!     field:int __syscall_nr; offset:8;   size:4; signed:1;
//!     field:unsigned int fd;  offset:16;  size:8; signed:0;
//!     field:char * buf;   offset:24;  size:8; signed:0;
//!     field:size_t count; offset:32;  size:8; signed:0;
//!
//! name: sys_exit_read
//! format:
//!     (common fields as above)
//!     field:int __syscall_nr; offset:8;   size:4; signed:1;
//!     field:long ret; offset:16;  size:8; signed:1;
//! ```
//!
//! The agent checks every slot a program reads (`capture/tracefs.rs`).
//!
//! In fentry mode the same calls are seen by one fexit program per syscall, on the
//! `__x64_sys_*` function the syscall table calls (fentry for close, which needs no
//! result): it sees the arguments (in `struct pt_regs`, `task::SyscallRegs`) and the
//! result together, so nothing is stashed between entry and exit. Those functions
//! exist for every syscall on x86_64, are never inlined (the syscall table points at
//! them), and see exactly the calls the tracepoints see; an unwatched process pays a
//! BPF trampoline and one hash lookup per call instead of the syscall slow path that
//! any enabled syscall tracepoint forces on every process.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{fentry, fexit, tracepoint},
    programs::{FEntryContext, FExitContext, TracePointContext},
};
use openbox_common::*;

use super::{stash, take_args, track_fd};
use crate::{
    emit::{
        claim_scratch, cpu_scratch, emit_no_payload, emit_payload, release, submit, with_scratch,
        Claimed, DataCall, Payload,
    },
    error::{count, finish, Loss},
    maps::{
        Batch, Scratch, SyscallArgs, FDS, FD_FLAGS, FEXIT_MMSG_MESSAGE, MMSG_MESSAGE, SSL_ARGS,
        TLS_SCRATCH,
    },
    task::{arg, fexit_ret, header, ret, watched, SyscallRegs},
};

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// recv's flag for reading without consuming (linux/socket.h).
const MSG_PEEK: u64 = 2;
/// errno of a non-blocking connect still under way (aya-ebpf has no errno values).
const EINPROGRESS: i64 = 115;

// ---- data calls ----

/// The arguments of read/write/readv/writev/recvfrom/sendto/recvmsg/sendmsg, when the
/// process is watched and the descriptor tracked: what the call's result is reported
/// with. `args(n)` reads syscall argument n.
#[inline(always)]
fn data_args(source: u32, args: impl Fn(usize) -> u64) -> Option<(u64, SyscallArgs)> {
    let (pid_tgid, tgid) = watched()?;
    // A peek (curl's liveness check, `recv(fd, buf, 1, MSG_PEEK)`) leaves the bytes in the
    // socket for the next read: reporting them would report them twice and cut the
    // stream's framing (recvfrom's and recvmmsg's flags are argument 3, recvmsg's 2).
    let peek = match source {
        SRC_RECVFROM | SRC_RECVMMSG => args(3) & MSG_PEEK != 0,
        SRC_RECVMSG => args(2) & MSG_PEEK != 0,
        _ => false,
    };
    if peek {
        return None;
    }
    let fd = args(0) as i32;
    let key = fd_key(tgid, fd);
    // Not a loss: an untracked descriptor is one this process had no socket or file
    // event for (a pipe, a tty), which the agent does not follow.
    let state = (unsafe { FDS.get(key) }).copied()?;
    // No entry is the common case: the agent set no flags on this descriptor.
    let flags = unsafe {
        FD_FLAGS.get(FdFlagKey {
            fd_key: key,
            gen: state.gen,
        })
    }
    .copied()
    .unwrap_or(0);
    if flags & FD_QUIET != 0 {
        // The agent asked for nothing but the close.
        return None;
    }
    Some((
        pid_tgid,
        SyscallArgs::Data {
            source,
            fd,
            fd_kind: state.kind,
            fd_flags: flags,
            buf: args(1),
            count: args(2),
        },
    ))
}

/// Entry tracepoint of a data call: stash its arguments for the exit.
#[inline(always)]
fn try_data_enter(ctx: &TracePointContext, source: u32) -> Result<(), Loss> {
    match data_args(source, |n| arg(ctx, n)) {
        Some((pid_tgid, args)) => stash(pid_tgid, args),
        None => Ok(()),
    }
}

/// Exit tracepoint of a data call: its stashed arguments and its result.
#[inline(always)]
fn try_data_exit(ctx: &TracePointContext) -> Result<(), Loss> {
    // Nothing kept: not watched or not tracked at entry.
    let Some((pid_tgid, args)) = take_args() else {
        return Ok(());
    };
    data_done(pid_tgid, args, ret(ctx), false)
}

/// fexit of a data call: the arguments and the result at once.
#[inline(always)]
fn try_data_fexit(ctx: &FExitContext, source: u32) -> Result<(), Loss> {
    let regs = SyscallRegs::of(ctx);
    match data_args(source, |n| regs.arg(n)) {
        Some((pid_tgid, args)) => data_done(pid_tgid, args, fexit_ret(ctx), true),
        None => Ok(()),
    }
}

/// Which way a data call moves bytes.
#[inline(always)]
fn direction_of(source: u32) -> u32 {
    match source {
        SRC_WRITE | SRC_WRITEV | SRC_SENDTO | SRC_SENDMSG | SRC_PWRITE64 | SRC_PWRITEV
        | SRC_PWRITEV2 | SRC_SENDMMSG => DIR_EGRESS,
        _ => DIR_INGRESS,
    }
}

/// Reports what a data call moved. `preemptible`: the caller is an fexit program.
#[inline(always)]
fn data_done(pid_tgid: u64, args: SyscallArgs, n: i64, preemptible: bool) -> Result<(), Loss> {
    // Another call's arguments: its entry ran before the programs were attached.
    let SyscallArgs::Data {
        source,
        fd,
        fd_kind,
        fd_flags,
        buf,
        count,
    } = args
    else {
        return Ok(());
    };
    if fd_kind == FD_SOCKET {
        if let Some(ssl) = SSL_ARGS.get_ptr_mut(pid_tgid) {
            // A socket BIO: the call's ciphertext goes out (or comes in) inside it, and
            // its plaintext is never kept as unsent (`tls::note_unsent`) — a failed send
            // included (libpq then tells OpenSSL the write succeeded).
            unsafe { (*ssl).flags |= SSL_CALL_SOCKET_IO };
        }
    }
    if n <= 0 {
        // The call failed or moved nothing: nothing to report.
        return Ok(());
    }
    let n = n as u64;
    let direction = direction_of(source);
    if fd_kind == FD_FILE {
        return submit(FileIoEvent {
            hdr: header(EV_FILE_IO, 0, pid_tgid),
            fd,
            source,
            direction,
            _pad: 0,
            bytes: n,
        });
    }
    let call = DataCall {
        kind: EV_SOCK_DATA,
        pid_tgid,
        fd,
        source,
        direction,
        ssl: 0,
        len: n,
    };
    // A libssl call active on this thread: these are its ciphertext bytes.
    if let Some(ssl) = unsafe { SSL_ARGS.get(pid_tgid) } {
        let call = DataCall {
            ssl: ssl.ssl,
            ..call
        };
        return with_scratch(preemptible, pid_tgid, |s| {
            emit_no_payload(s, call, FLAG_IN_SSL)
        });
    }
    if fd_flags & FD_NO_PAYLOAD != 0 {
        return with_scratch(preemptible, pid_tgid, |s| emit_no_payload(s, call, 0));
    }
    let payload = match source {
        SRC_READV | SRC_WRITEV | SRC_PREADV | SRC_PWRITEV | SRC_PREADV2 | SRC_PWRITEV2 => {
            Payload::Iovecs { array: buf, count }
        }
        SRC_RECVMSG | SRC_SENDMSG => {
            // struct user_msghdr: msg_iov at offset 16, msg_iovlen at 24.
            let array = unsafe { bpf_probe_read_user((buf + 16) as *const u64) }
                .map_err(|_| Loss::UserRead)?;
            let count = unsafe { bpf_probe_read_user((buf + 24) as *const u64) }
                .map_err(|_| Loss::UserRead)?;
            Payload::Iovecs { array, count }
        }
        _ => Payload::Buffer(buf),
    };
    with_scratch(preemptible, pid_tgid, |s| emit_payload(s, call, payload))
}

macro_rules! data_syscall {
    ($enter:ident, $exit:ident, $fexit:ident, $func:literal, $src:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            finish(try_data_enter(&ctx, $src))
        }
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            finish(try_data_exit(&ctx))
        }
        #[fexit(function = $func)]
        pub fn $fexit(ctx: FExitContext) -> u32 {
            finish(try_data_fexit(&ctx, $src))
        }
    };
}

data_syscall!(
    sys_enter_read,
    sys_exit_read,
    fexit_read,
    "__x64_sys_read",
    SRC_READ
);
data_syscall!(
    sys_enter_write,
    sys_exit_write,
    fexit_write,
    "__x64_sys_write",
    SRC_WRITE
);
data_syscall!(
    sys_enter_readv,
    sys_exit_readv,
    fexit_readv,
    "__x64_sys_readv",
    SRC_READV
);
data_syscall!(
    sys_enter_writev,
    sys_exit_writev,
    fexit_writev,
    "__x64_sys_writev",
    SRC_WRITEV
);
data_syscall!(
    sys_enter_recvfrom,
    sys_exit_recvfrom,
    fexit_recvfrom,
    "__x64_sys_recvfrom",
    SRC_RECVFROM
);
data_syscall!(
    sys_enter_sendto,
    sys_exit_sendto,
    fexit_sendto,
    "__x64_sys_sendto",
    SRC_SENDTO
);
data_syscall!(
    sys_enter_recvmsg,
    sys_exit_recvmsg,
    fexit_recvmsg,
    "__x64_sys_recvmsg",
    SRC_RECVMSG
);
data_syscall!(
    sys_enter_sendmsg,
    sys_exit_sendmsg,
    fexit_sendmsg,
    "__x64_sys_sendmsg",
    SRC_SENDMSG
);

// The positional calls take the descriptor, the buffer (or iovec array) and the
// length (or iovec count) in the same first three arguments as read/readv; the file
// offset that follows does not change which stream bytes they are (a socket has none,
// and a file's reads and writes are counted, not reassembled).
data_syscall!(
    sys_enter_pread64,
    sys_exit_pread64,
    fexit_pread64,
    "__x64_sys_pread64",
    SRC_PREAD64
);
data_syscall!(
    sys_enter_pwrite64,
    sys_exit_pwrite64,
    fexit_pwrite64,
    "__x64_sys_pwrite64",
    SRC_PWRITE64
);
data_syscall!(
    sys_enter_preadv,
    sys_exit_preadv,
    fexit_preadv,
    "__x64_sys_preadv",
    SRC_PREADV
);
data_syscall!(
    sys_enter_pwritev,
    sys_exit_pwritev,
    fexit_pwritev,
    "__x64_sys_pwritev",
    SRC_PWRITEV
);
data_syscall!(
    sys_enter_preadv2,
    sys_exit_preadv2,
    fexit_preadv2,
    "__x64_sys_preadv2",
    SRC_PREADV2
);
data_syscall!(
    sys_enter_pwritev2,
    sys_exit_pwritev2,
    fexit_pwritev2,
    "__x64_sys_pwritev2",
    SRC_PWRITEV2
);

// ---- message batches: sendmmsg, recvmmsg ----

/// `struct mmsghdr`: a `struct user_msghdr` (56 bytes: msg_iov at 16, msg_iovlen at
/// 24) followed by the u32 `msg_len` the kernel sets, padded to 64.
const MMSGHDR_SIZE: u64 = 64;
const MMSG_LEN_OFFSET: u64 = 56;

/// What a sendmmsg/recvmmsg call's messages are reported with, each as a data call of
/// its own in the batch's order; `None` when there is nothing to report. `messages`:
/// the call's result, the number of messages moved.
#[inline(always)]
fn mmsg_batch(pid_tgid: u64, args: SyscallArgs, messages: i64) -> Option<Batch> {
    let SyscallArgs::Data {
        source,
        fd,
        fd_kind,
        fd_flags,
        buf,
        ..
    } = args
    else {
        return None;
    };
    if messages <= 0 || fd_kind != FD_SOCKET {
        // Nothing moved, or not a socket (the call fails on anything else).
        return None;
    }
    let in_ssl = unsafe { SSL_ARGS.get(pid_tgid) }.is_some();
    Some(Batch {
        call: DataCall {
            kind: EV_SOCK_DATA,
            pid_tgid,
            fd,
            source,
            direction: direction_of(source),
            ssl: 0,
            len: 0,
        },
        array: buf,
        messages: messages as u64,
        no_payload: (in_ssl || fd_flags & FD_NO_PAYLOAD != 0) as u64,
        next: 0,
    })
}

/// Reports message `i` of `batch`. `false`: its length could not be read, so the
/// stream's offsets are lost from here on and the batch stops.
#[inline(always)]
fn emit_message(scratch: *mut Scratch, batch: &Batch, i: u64) -> bool {
    let hdr = batch.array + i * MMSGHDR_SIZE;
    let len = match unsafe { bpf_probe_read_user((hdr + MMSG_LEN_OFFSET) as *const u32) } {
        Ok(len) => len as u64,
        Err(_) => {
            Loss::UserRead.count();
            return false;
        }
    };
    if len == 0 {
        // An empty message moves nothing.
        return true;
    }
    let call = DataCall { len, ..batch.call };
    let sent = if batch.no_payload != 0 {
        emit_no_payload(scratch, call, 0)
    } else {
        match (
            unsafe { bpf_probe_read_user((hdr + 16) as *const u64) },
            unsafe { bpf_probe_read_user((hdr + 24) as *const u64) },
        ) {
            (Ok(array), Ok(count)) => emit_payload(scratch, call, Payload::Iovecs { array, count }),
            _ => {
                // The message goes out without its bytes: a gap the parsers see.
                Loss::UserRead.count();
                emit_no_payload(scratch, call, FLAG_TRUNCATED)
            }
        }
    };
    if let Err(loss) = sent {
        // The next message is still tried; the agent sees the gap in the offsets.
        loss.count();
    }
    true
}

/// The messages of a batch past the first MAX_MMSG, by length only (up to
/// MAX_MMSG_LENS), so later offsets stay exact.
#[inline(always)]
fn emit_rest(scratch: *mut Scratch, batch: &Batch) -> Result<(), Loss> {
    let messages = batch.messages;
    if messages <= MAX_MMSG as u64 {
        return Ok(());
    }
    let mut rest = 0u64;
    let last = if messages > MAX_MMSG_LENS as u64 {
        MAX_MMSG_LENS as u64
    } else {
        messages
    };
    let mut i = MAX_MMSG as u64;
    while i < last && i < MAX_MMSG_LENS as u64 {
        let hdr = batch.array + i * MMSGHDR_SIZE;
        match unsafe { bpf_probe_read_user((hdr + MMSG_LEN_OFFSET) as *const u32) } {
            Ok(len) => rest += len as u64,
            Err(_) => {
                Loss::UserRead.count();
                break;
            }
        }
        i += 1;
    }
    if rest > 0 {
        count(CNT_TRUNCATED_CALLS, 1);
        count(CNT_TRUNCATED_BYTES, rest);
        emit_no_payload(
            scratch,
            DataCall {
                len: rest,
                ..batch.call
            },
            FLAG_TRUNCATED,
        )?;
    }
    Ok(())
}

/// Exit tracepoint of sendmmsg/recvmmsg: the batch goes to this CPU's scratch record
/// and `sys_mmsg_message` reports it, one tail call per message (see `MMSG_MESSAGE`).
#[inline(always)]
fn try_mmsg_exit(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((pid_tgid, args)) = take_args() else {
        return Ok(());
    };
    let Some(batch) = mmsg_batch(pid_tgid, args, ret(ctx)) else {
        return Ok(());
    };
    let scratch = cpu_scratch()?;
    // SAFETY: this CPU's slot; a tracepoint program and its tail calls are not
    // preempted, so nothing else uses it until the batch is reported.
    unsafe { (*scratch).batch = batch };
    // SAFETY: the callee is a tracepoint program, as this one.
    unsafe { MMSG_MESSAGE.tail_call(ctx, 0) };
    // Only when the agent did not set the program: the batch is not reported.
    Err(Loss::Scratch)
}

/// One message of the batch in this CPU's scratch record (see `try_mmsg_exit`), then
/// the next one by a tail call to itself: never attached, only tail-called.
#[tracepoint]
pub fn sys_mmsg_message(ctx: TracePointContext) -> u32 {
    finish(try_mmsg_message(&ctx))
}

#[inline(always)]
fn try_mmsg_message(ctx: &TracePointContext) -> Result<(), Loss> {
    // This CPU's slot, as in `try_mmsg_exit`.
    if next_message(cpu_scratch()?)? {
        // SAFETY: as in `try_mmsg_exit`; at most MAX_MMSG tail calls in a row, under
        // the kernel's limit of 33.
        unsafe { MMSG_MESSAGE.tail_call(ctx, 0) };
        return Err(Loss::Scratch);
    }
    Ok(())
}

/// Reports the next message of the batch in `scratch` (and after the last one copied,
/// the length of the rest). `true`: another message is left, for the next tail call.
#[inline(always)]
fn next_message(scratch: *mut Scratch) -> Result<bool, Loss> {
    // SAFETY: scratch space the caller holds. Copied: emitting a message rewrites the
    // rest of the scratch record.
    let batch = unsafe { (*scratch).batch };
    let i = batch.next;
    if i < batch.messages && i < MAX_MMSG as u64 {
        if !emit_message(scratch, &batch, i) {
            return Ok(false);
        }
        let next = i + 1;
        if next < batch.messages && next < MAX_MMSG as u64 {
            unsafe { (*scratch).batch.next = next };
            return Ok(true);
        }
    }
    emit_rest(scratch, &batch).map(|()| false)
}

// The descriptor, the mmsghdr array and its length are sendmmsg's and recvmmsg's first
// three arguments, as for the other data calls: only the report differs. Both exits
// are the same code (the call's kind comes from what its entry kept): the agent loads
// `sys_exit_sendmmsg` once and attaches it to both tracepoints.
#[tracepoint]
pub fn sys_enter_sendmmsg(ctx: TracePointContext) -> u32 {
    finish(try_data_enter(&ctx, SRC_SENDMMSG))
}
#[tracepoint]
pub fn sys_exit_sendmmsg(ctx: TracePointContext) -> u32 {
    finish(try_mmsg_exit(&ctx))
}
#[fexit(function = "__x64_sys_sendmmsg")]
pub fn fexit_sendmmsg(ctx: FExitContext) -> u32 {
    finish(try_mmsg_fexit(&ctx, SRC_SENDMMSG))
}
#[tracepoint]
pub fn sys_enter_recvmmsg(ctx: TracePointContext) -> u32 {
    finish(try_data_enter(&ctx, SRC_RECVMMSG))
}
#[fexit(function = "__x64_sys_recvmmsg")]
pub fn fexit_recvmmsg(ctx: FExitContext) -> u32 {
    finish(try_mmsg_fexit(&ctx, SRC_RECVMMSG))
}

/// fexit of sendmmsg/recvmmsg: the arguments and the result at once. The batch goes to
/// the scratch space this program claims (`emit::claim_scratch`: an fexit program may
/// be preempted) and is reported one message per tail call, as in tracepoint mode, by
/// the program for that space: `fexit_mmsg_message` for this CPU's slot,
/// `fexit_mmsg_message_own` for the thread's own entry. The last message gives it back.
#[inline(always)]
fn try_mmsg_fexit(ctx: &FExitContext, source: u32) -> Result<(), Loss> {
    let regs = SyscallRegs::of(ctx);
    let Some((pid_tgid, args)) = data_args(source, |n| regs.arg(n)) else {
        return Ok(());
    };
    let Some(batch) = mmsg_batch(pid_tgid, args, fexit_ret(ctx)) else {
        return Ok(());
    };
    let claimed = claim_scratch(pid_tgid)?;
    // SAFETY: claimed: no other program writes it until it is given back.
    unsafe { (*claimed.scratch()).batch = batch };
    let index = match claimed {
        Claimed::Cpu(_) => MMSG_IN_CPU_SLOT,
        Claimed::Thread(_) => MMSG_IN_OWN_ENTRY,
    };
    // SAFETY: the callee is an fexit program of the same prototype as this one (every
    // `__x64_sys_*` function takes one `const struct pt_regs *`).
    unsafe { FEXIT_MMSG_MESSAGE.tail_call(ctx, index) };
    // Only when the agent did not set the program: the batch is not reported.
    release(claimed, pid_tgid);
    Err(Loss::Scratch)
}

/// The index in `FEXIT_MMSG_MESSAGE` of the program that reports a batch kept in this
/// CPU's scratch slot, and of the one for a batch in the thread's own entry. Two
/// programs rather than one that looks for its space: the verifier would walk a
/// message's work once for each map the space could be in.
const MMSG_IN_CPU_SLOT: u32 = 0;
const MMSG_IN_OWN_ENTRY: u32 = 1;

/// One message of a batch in this CPU's scratch slot, claimed by `fexit_sendmmsg` or
/// `fexit_recvmmsg` (and still marked busy: migration stays disabled across tail calls,
/// so it is this CPU's), then the next one by a tail call to itself; the last gives the
/// slot back. Loaded as an fexit program of sendmmsg but never attached: only
/// tail-called, from both.
#[fexit(function = "__x64_sys_sendmmsg")]
pub fn fexit_mmsg_message(ctx: FExitContext) -> u32 {
    finish(cpu_scratch().and_then(|s| mmsg_message_fexit(&ctx, Claimed::Cpu(s), MMSG_IN_CPU_SLOT)))
}

/// The same for a batch in the thread's own scratch entry (this CPU's slot was taken).
#[fexit(function = "__x64_sys_sendmmsg")]
pub fn fexit_mmsg_message_own(ctx: FExitContext) -> u32 {
    let own = TLS_SCRATCH.get_ptr_mut(bpf_get_current_pid_tgid());
    finish(
        own.ok_or(Loss::Scratch)
            .and_then(|s| mmsg_message_fexit(&ctx, Claimed::Thread(s), MMSG_IN_OWN_ENTRY)),
    )
}

#[inline(always)]
fn mmsg_message_fexit(ctx: &FExitContext, claimed: Claimed, index: u32) -> Result<(), Loss> {
    let more = next_message(claimed.scratch());
    if let Ok(true) = more {
        // SAFETY: as in `try_mmsg_fexit`; at most MAX_MMSG tail calls in a row, under
        // the kernel's limit of 33.
        unsafe { FEXIT_MMSG_MESSAGE.tail_call(ctx, index) };
    }
    release(claimed, bpf_get_current_pid_tgid());
    match more {
        // The tail call failed: the rest of the batch is not reported.
        Ok(true) => Err(Loss::Scratch),
        Ok(false) => Ok(()),
        Err(loss) => Err(loss),
    }
}

// ---- connections ----

/// Reads a sockaddr from user memory. An unreadable one is reported as family 0: the
/// connection is still tracked, its peer unknown.
#[inline(always)]
fn read_sockaddr(uaddr: u64) -> SockAddr {
    let mut out = SockAddr::default();
    if uaddr == 0 {
        // accept without an address buffer: nothing to read, nothing lost.
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
                Err(_) => {
                    Loss::UserRead.count();
                    return out;
                }
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

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    finish(try_connect_enter(&ctx))
}

#[inline(always)]
fn try_connect_enter(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((pid_tgid, _)) = watched() else {
        return Ok(());
    };
    let peer = read_sockaddr(arg(ctx, 1));
    stash(
        pid_tgid,
        SyscallArgs::Connect {
            fd: arg(ctx, 0) as i32,
            peer,
        },
    )
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    finish(try_connect_exit(&ctx))
}

#[inline(always)]
fn try_connect_exit(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((pid_tgid, SyscallArgs::Connect { fd, peer })) = take_args() else {
        return Ok(());
    };
    connect_done(pid_tgid, fd, peer, ret(ctx))
}

/// connect's fexit reads the address at the call's end: the caller's memory, which
/// only another thread of the process could have changed meanwhile.
#[fexit(function = "__x64_sys_connect")]
pub fn fexit_connect(ctx: FExitContext) -> u32 {
    finish(try_connect_fexit(&ctx))
}

#[inline(always)]
fn try_connect_fexit(ctx: &FExitContext) -> Result<(), Loss> {
    let Some((pid_tgid, _)) = watched() else {
        return Ok(());
    };
    let regs = SyscallRegs::of(ctx);
    let peer = read_sockaddr(regs.arg(1));
    connect_done(pid_tgid, regs.arg(0) as i32, peer, fexit_ret(ctx))
}

#[inline(always)]
fn connect_done(pid_tgid: u64, fd: i32, peer: SockAddr, r: i64) -> Result<(), Loss> {
    if r != 0 && r != -EINPROGRESS {
        // The connection failed: there is none to track.
        return Ok(());
    }
    let hdr = header(EV_CONNECT, 0, pid_tgid);
    track_fd((pid_tgid >> 32) as u32, fd, FD_SOCKET, hdr.ts_ns);
    submit(ConnEvent {
        hdr,
        fd,
        ret: r as i32,
        peer,
        sock_type: 0,
        _pad: 0,
    })
}

#[inline(always)]
fn try_accept_enter(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((pid_tgid, _)) = watched() else {
        return Ok(());
    };
    stash(
        pid_tgid,
        SyscallArgs::Accept {
            listener: arg(ctx, 0) as i32,
            peer_addr: arg(ctx, 1),
        },
    )
}

#[inline(always)]
fn try_accept_exit(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((
        pid_tgid,
        SyscallArgs::Accept {
            listener,
            peer_addr,
        },
    )) = take_args()
    else {
        return Ok(());
    };
    accept_done(pid_tgid, listener, peer_addr, ret(ctx))
}

/// accept and accept4 (the same first two arguments).
#[inline(always)]
fn try_accept_fexit(ctx: &FExitContext) -> Result<(), Loss> {
    let Some((pid_tgid, _)) = watched() else {
        return Ok(());
    };
    let regs = SyscallRegs::of(ctx);
    accept_done(pid_tgid, regs.arg(0) as i32, regs.arg(1), fexit_ret(ctx))
}

#[inline(always)]
fn accept_done(pid_tgid: u64, listener: i32, peer_addr: u64, r: i64) -> Result<(), Loss> {
    if r < 0 {
        // No connection accepted.
        return Ok(());
    }
    let fd = r as i32;
    let hdr = header(EV_ACCEPT, 0, pid_tgid);
    track_fd((pid_tgid >> 32) as u32, fd, FD_SOCKET, hdr.ts_ns);
    submit(ConnEvent {
        hdr,
        fd,
        ret: listener,
        peer: read_sockaddr(peer_addr),
        sock_type: 0,
        _pad: 0,
    })
}

#[tracepoint]
pub fn sys_enter_accept(ctx: TracePointContext) -> u32 {
    finish(try_accept_enter(&ctx))
}
#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    finish(try_accept_exit(&ctx))
}
#[tracepoint]
pub fn sys_enter_accept4(ctx: TracePointContext) -> u32 {
    finish(try_accept_enter(&ctx))
}
#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    finish(try_accept_exit(&ctx))
}
#[fexit(function = "__x64_sys_accept")]
pub fn fexit_accept(ctx: FExitContext) -> u32 {
    finish(try_accept_fexit(&ctx))
}
#[fexit(function = "__x64_sys_accept4")]
pub fn fexit_accept4(ctx: FExitContext) -> u32 {
    finish(try_accept_fexit(&ctx))
}

#[tracepoint]
pub fn sys_enter_socket(ctx: TracePointContext) -> u32 {
    finish(try_socket_enter(&ctx))
}

#[inline(always)]
fn try_socket_enter(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((pid_tgid, _)) = watched() else {
        return Ok(());
    };
    stash(
        pid_tgid,
        SyscallArgs::Socket {
            family: arg(ctx, 0) as u16,
            sock_type: arg(ctx, 1),
        },
    )
}

#[tracepoint]
pub fn sys_exit_socket(ctx: TracePointContext) -> u32 {
    finish(try_socket_exit(&ctx))
}

#[inline(always)]
fn try_socket_exit(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((pid_tgid, SyscallArgs::Socket { family, sock_type })) = take_args() else {
        return Ok(());
    };
    socket_done(pid_tgid, family, sock_type, ret(ctx))
}

#[fexit(function = "__x64_sys_socket")]
pub fn fexit_socket(ctx: FExitContext) -> u32 {
    finish(try_socket_fexit(&ctx))
}

#[inline(always)]
fn try_socket_fexit(ctx: &FExitContext) -> Result<(), Loss> {
    let Some((pid_tgid, _)) = watched() else {
        return Ok(());
    };
    let regs = SyscallRegs::of(ctx);
    socket_done(pid_tgid, regs.arg(0) as u16, regs.arg(1), fexit_ret(ctx))
}

#[inline(always)]
fn socket_done(pid_tgid: u64, family: u16, sock_type: u64, r: i64) -> Result<(), Loss> {
    if r < 0 {
        // No socket created.
        return Ok(());
    }
    let hdr = header(EV_SOCKET, 0, pid_tgid);
    track_fd((pid_tgid >> 32) as u32, r as i32, FD_SOCKET, hdr.ts_ns);
    submit(ConnEvent {
        hdr,
        fd: r as i32,
        ret: -1,
        peer: SockAddr {
            family,
            ..SockAddr::default()
        },
        sock_type: (sock_type & 0xf) as u32,
        _pad: 0,
    })
}

#[tracepoint]
pub fn sys_enter_socketpair(ctx: TracePointContext) -> u32 {
    finish(try_socketpair_enter(&ctx))
}

#[inline(always)]
fn try_socketpair_enter(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((pid_tgid, _)) = watched() else {
        return Ok(());
    };
    stash(
        pid_tgid,
        SyscallArgs::SocketPair {
            family: arg(ctx, 0) as u16,
            sock_type: arg(ctx, 1),
            fds: arg(ctx, 3),
        },
    )
}

#[tracepoint]
pub fn sys_exit_socketpair(ctx: TracePointContext) -> u32 {
    finish(try_socketpair_exit(&ctx))
}

#[inline(always)]
fn try_socketpair_exit(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((
        pid_tgid,
        SyscallArgs::SocketPair {
            family,
            sock_type,
            fds,
        },
    )) = take_args()
    else {
        return Ok(());
    };
    socketpair_done(pid_tgid, family, sock_type, fds, ret(ctx))
}

#[fexit(function = "__x64_sys_socketpair")]
pub fn fexit_socketpair(ctx: FExitContext) -> u32 {
    finish(try_socketpair_fexit(&ctx))
}

#[inline(always)]
fn try_socketpair_fexit(ctx: &FExitContext) -> Result<(), Loss> {
    let Some((pid_tgid, _)) = watched() else {
        return Ok(());
    };
    let regs = SyscallRegs::of(ctx);
    socketpair_done(
        pid_tgid,
        regs.arg(0) as u16,
        regs.arg(1),
        regs.arg(3),
        fexit_ret(ctx),
    )
}

#[inline(always)]
fn socketpair_done(
    pid_tgid: u64,
    family: u16,
    sock_type: u64,
    fds: u64,
    r: i64,
) -> Result<(), Loss> {
    if r != 0 {
        // No sockets created.
        return Ok(());
    }
    let fds = unsafe { bpf_probe_read_user(fds as *const [i32; 2]) }.map_err(|_| Loss::UserRead)?;
    let tgid = (pid_tgid >> 32) as u32;
    let hdr = header(EV_SOCKET, 0, pid_tgid);
    track_fd(tgid, fds[0], FD_SOCKET, hdr.ts_ns);
    track_fd(tgid, fds[1], FD_SOCKET, hdr.ts_ns);
    submit(ConnEvent {
        hdr,
        fd: fds[0],
        ret: fds[1],
        peer: SockAddr {
            family,
            ..SockAddr::default()
        },
        sock_type: (sock_type & 0xf) as u32,
        _pad: 0,
    })
}

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    finish(try_close(|| arg(&ctx, 0) as i32))
}

/// close needs no result: the descriptor is gone whatever close returns (even EINTR).
#[fentry(function = "__x64_sys_close")]
pub fn fentry_close(ctx: FEntryContext) -> u32 {
    finish(try_close(|| SyscallRegs::of(&ctx).arg(0) as i32))
}

#[inline(always)]
fn try_close(fd: impl FnOnce() -> i32) -> Result<(), Loss> {
    let Some((pid_tgid, tgid)) = watched() else {
        return Ok(());
    };
    let fd = fd();
    let key = fd_key(tgid, fd);
    // Not tracked: not a descriptor the agent follows.
    let Some(state) = (unsafe { FDS.get(key) }).copied() else {
        return Ok(());
    };
    let _ = FDS.remove(key);
    submit(CloseEvent {
        hdr: header(EV_CLOSE, 0, pid_tgid),
        fd,
        fd_kind: state.kind,
    })
}
