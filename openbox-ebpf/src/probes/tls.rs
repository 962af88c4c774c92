//! libssl uprobes: TLS plaintext at SSL_read/SSL_write (and the `_ex` forms).
//!
//! Scratch space: the tracepoint programs build data records in a per-CPU slot
//! (`maps::SCRATCH`), which is sound because they run with preemption disabled. A
//! uprobe program does not: it runs with migration disabled but may be preempted (on
//! a kernel with preempt=full, or PREEMPT_DYNAMIC switched to it), and the task that
//! runs meanwhile on the same CPU may run a tracepoint program, or another uprobe
//! program, that overwrites the per-CPU slot halfway through our copy. An overlap is
//! hard to detect after the fact (the record is in the ring buffer by then), so the
//! uprobe programs do not share it: each run takes a scratch entry keyed by its own
//! pid_tgid (`maps::TLS_SCRATCH`), which no other program touches, and deletes it
//! before returning. The cost is one hash insert (copying the scratch size) and one
//! delete per TLS call that moved bytes; a full map is counted as `Loss::Scratch`.
//!
//! Scope: the agent attaches these programs once per watched process (a perf event
//! bound to the process, which the kernel filters by memory map before any program
//! runs), so a process that is not watched never traps on them, even in the same
//! libssl. A forked child has a copy of its parent's memory but not its probes: it
//! stops itself at its first watched call until the agent has attached its own
//! ([`hold_forked_child`]).
//!
//! Where: on OpenSSL builds whose `SSL_write_ex`/`SSL_read_ex` are wrappers, the agent
//! attaches `ssl_write_ex`/`ssl_read_ex` and `ssl_ret` to the internal functions they
//! call (same first four arguments, same return), whose first instruction the kernel
//! emulates instead of single-stepping it (openbox-agent's capture/tls.rs,
//! `probe_points`).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, BPF_RB_FORCE_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_probe_read_user as raw_probe_read_user,
    },
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use openbox_common::*;

use super::files::pause;
use crate::{
    emit::{emit_payload, thread_scratch, DataCall, Payload},
    error::{count, finish, Loss},
    maps::{EVENTS, INHERIT, SSL_ARGS, THREADS, TLS_SCRATCH, TLS_UNSENT, UNSENT_ZERO, WATCHED},
    task::{attribution, header, watch_flags},
};

/// Argument `n` (0-based) of the probed function. `ProbeContext::arg` is None only for
/// arguments beyond those passed in registers (six on x86_64, eight on aarch64); the
/// libssl functions take at most four, so 0 is never a stand-in for a lost value.
#[inline(always)]
fn reg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

#[inline(always)]
fn try_ssl_enter(ctx: &ProbeContext, source: u32, ex: bool) -> Result<(), Loss> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if watch_flags((pid_tgid >> 32) as u32).is_none() {
        // Probes still attached for a process that just exited or was unwatched.
        count(CNT_TLS_UNWATCHED, 1);
        return Ok(());
    }
    count(CNT_TLS_WATCHED, 1);
    let args = SslArgs {
        ssl: reg(ctx, 0),
        buf: reg(ctx, 1),
        num: reg(ctx, 2),
        out_len: if ex { reg(ctx, 3) } else { 0 },
        source,
        flags: 0,
    };
    SSL_ARGS
        .insert(pid_tgid, args, BPF_ANY.into())
        .map_err(|_| Loss::MapFull)
}

#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    finish(try_ssl_enter(&ctx, SRC_SSL_WRITE, false))
}
#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    finish(try_ssl_enter(&ctx, SRC_SSL_WRITE_EX, true))
}
#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    finish(try_ssl_enter(&ctx, SRC_SSL_READ, false))
}
#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    finish(try_ssl_enter(&ctx, SRC_SSL_READ_EX, true))
}

#[uretprobe]
pub fn ssl_ret(ctx: RetProbeContext) -> u32 {
    finish(try_ssl_ret(&ctx))
}

#[inline(always)]
fn try_ssl_ret(ctx: &RetProbeContext) -> Result<(), Loss> {
    let pid_tgid = bpf_get_current_pid_tgid();
    // Nothing kept: the process is not watched (or the entry's stash was lost, counted
    // there).
    let Some(args) = (unsafe { SSL_ARGS.get(pid_tgid) }).copied() else {
        return Ok(());
    };
    let _ = SSL_ARGS.remove(pid_tgid);
    let rv: i64 = ctx.ret::<i32>() as i64;
    let n: u64 = match args.source {
        SRC_SSL_WRITE_EX | SRC_SSL_READ_EX => {
            if rv != 1 || args.out_len == 0 {
                // The call failed: no bytes moved.
                return Ok(());
            }
            unsafe { bpf_probe_read_user(args.out_len as *const u64) }
                .map_err(|_| Loss::UserRead)?
        }
        _ => {
            if rv <= 0 {
                // The call failed: no bytes moved.
                return Ok(());
            }
            rv as u64
        }
    };
    if n == 0 {
        return Ok(());
    }
    let direction = match args.source {
        SRC_SSL_WRITE | SRC_SSL_WRITE_EX => DIR_EGRESS,
        _ => DIR_INGRESS,
    };
    if direction == DIR_EGRESS && args.flags & SSL_CALL_SOCKET_IO == 0 {
        note_unsent(pid_tgid, &args, n);
    }
    let call = DataCall {
        kind: EV_TLS_DATA,
        pid_tgid,
        fd: -1,
        source: args.source,
        direction,
        ssl: args.ssl,
        len: n,
    };
    let result = thread_scratch(pid_tgid)
        .and_then(|scratch| emit_payload(scratch, call, Payload::Buffer(args.buf)));
    // Whatever happened, the entry must not outlive this run (no entry: no harm).
    let _ = TLS_SCRATCH.remove(pid_tgid);
    result
}

/// Keeps what an `SSL_write` that sent nothing on a socket (a memory BIO: asyncio's TLS)
/// encrypted, for the agent to name the event loop's later send of its ciphertext
/// (`TLS_UNSENT`): the first `n` bytes at `args.buf` (at most `UNSENT_HEAD`) when the SSL
/// object has nothing unsent yet, else one more write counted, with the activity the
/// write is attributed to. Only on threads of registered workers and in processes an
/// activity started, the ones `--enforce` holds.
#[inline(always)]
fn note_unsent(pid_tgid: u64, args: &SslArgs, n: u64) {
    if unsafe { THREADS.get(pid_tgid as u32) }.is_none()
        && unsafe { INHERIT.get((pid_tgid >> 32) as u32) }.is_none()
    {
        return;
    }
    let key = UnsentKey {
        tgid: (pid_tgid >> 32) as u32,
        _pad: 0,
        ssl: args.ssl,
    };
    if let Some(e) = TLS_UNSENT.get_ptr_mut(key) {
        unsafe { (*e).writes = (*e).writes.saturating_add(1) };
        return;
    }
    let Some(zero) = UNSENT_ZERO.get(0) else {
        return;
    };
    if TLS_UNSENT.insert(key, zero, BPF_NOEXIST.into()).is_err() {
        Loss::MapFull.count();
        return;
    }
    let Some(e) = TLS_UNSENT.get_ptr_mut(key) else {
        return;
    };
    let take = if n > UNSENT_HEAD as u64 {
        UNSENT_HEAD as u64
    } else {
        n
    };
    // Bounded again where the verifier sees the copy's size.
    let take = core::hint::black_box(take);
    if take == 0 || take > UNSENT_HEAD as u64 {
        return;
    }
    let rc = unsafe {
        raw_probe_read_user(
            (*e).head.as_mut_ptr() as *mut c_void,
            take as u32,
            args.buf as *const c_void,
        )
    };
    unsafe {
        (*e).tid = pid_tgid as u32;
        (*e).writes = 1;
        (*e).len = n;
        (*e).at_ns = bpf_ktime_get_ns();
        ((*e).owner, (*e).activity) = attribution(pid_tgid);
        (*e).head_len = if rc == 0 { take as u32 } else { 0 };
    }
}

/// Stops a forked child of a process with TLS probes at its first watched call, once,
/// until the agent has attached probes of its own: the parent's do not fire in the
/// child's copy of the memory, and the child may reach libssl before the agent has read
/// the fork record. The agent attaches on the fork record already; when it got there
/// first, the flag is gone and nobody stops. Otherwise the record sent here, flagged
/// [`FLAG_PAUSED`], makes it attach (or find it done) and resume the child.
///
/// The stop takes effect when the call returns to user space, before the child's next
/// instruction: a new connection needs a socket call, so its TLS calls come after.
#[inline(always)]
pub fn hold_forked_child(pid_tgid: u64, flags: u32) {
    let tgid = (pid_tgid >> 32) as u32;
    // Once: the other threads of the child, and this one after the stop, run on.
    if WATCHED
        .insert(tgid, flags & !WATCH_TLS_PENDING, BPF_ANY.into())
        .is_err()
    {
        Loss::MapFull.count();
        return;
    }
    // Reserved before the stop: a stop the agent is not told of would last.
    let Some(mut entry) = EVENTS.reserve::<ProcEvent>(0) else {
        Loss::RingFull.count();
        return;
    };
    if !pause(tgid) {
        entry.discard(0);
        return;
    }
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    ev.hdr = header(EV_TLS_WAIT, FLAG_PAUSED, pid_tgid);
    ev.other = 0;
    ev.path_len = 0;
    ev.comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    entry.submit(BPF_RB_FORCE_WAKEUP.into());
    count(CNT_EVENTS, 1);
}
