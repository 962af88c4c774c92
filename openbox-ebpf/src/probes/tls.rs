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

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use openbox_common::*;

use crate::{
    emit::{emit_payload, thread_scratch, DataCall, Payload},
    error::{finish, Loss},
    maps::{SslArgs, SSL_ARGS, TLS_SCRATCH},
    task::watched,
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
    let Some((pid_tgid, _)) = watched() else {
        return Ok(());
    };
    let args = SslArgs {
        ssl: reg(ctx, 0),
        buf: reg(ctx, 1),
        num: reg(ctx, 2),
        out_len: if ex { reg(ctx, 3) } else { 0 },
        source,
        _pad: 0,
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
