//! The current task: is it watched, which activity does it work for, and the header
//! of the records it causes. Also the raw reads of tracepoint records.

use core::ptr;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    programs::TracePointContext,
    EbpfContext,
};
use openbox_common::*;

use crate::{
    error::count,
    maps::{INHERIT, THREADS, WATCHED},
};

/// The current tgid when it is watched, counting the probe hit either way. A forked
/// child still waiting for TLS probes of its own stops here (see
/// [`crate::probes::hold_forked_child`]), at its first watched call.
#[inline(always)]
pub fn watched() -> Option<(u64, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: plain lookup; the value is copied out at once.
    if let Some(flags) = unsafe { WATCHED.get(tgid) }.copied() {
        count(CNT_WATCHED, 1);
        if flags & WATCH_TLS_PENDING != 0 {
            crate::probes::hold_forked_child(pid_tgid, flags);
        }
        Some((pid_tgid, tgid))
    } else {
        count(CNT_UNWATCHED, 1);
        None
    }
}

/// The WATCHED flags of a process, None when it is not watched.
#[inline(always)]
pub fn watch_flags(tgid: u32) -> Option<u32> {
    // SAFETY: plain lookup; the value is copied out at once.
    unsafe { WATCHED.get(tgid) }.copied()
}

/// Whether the current process is watched, without counting a probe hit (the process
/// lifecycle programs, which are not per-call probes).
#[inline(always)]
pub fn is_watched(tgid: u32) -> bool {
    // SAFETY: plain lookup; the value is not kept.
    unsafe { WATCHED.get(tgid) }.is_some()
}

/// Which worker activity the current thread works for: (owner tgid, token).
///
/// A registered worker thread reads its slot, which the hook rewrites on every step of
/// an activity (the slot is in the worker's own memory: `current` is that worker, so
/// the address means the same thing here as to the hook). Any other process of a
/// watched tree uses what it inherited when an activity started it. A worker thread
/// never falls back to inheritance: its slot is the only exact evidence.
#[inline(always)]
pub fn attribution(pid_tgid: u64) -> (u32, u64) {
    let tid = pid_tgid as u32;
    // SAFETY: plain lookups; values are copied out at once.
    if let Some(slot) = unsafe { THREADS.get(tid) } {
        let (addr, owner) = (slot.addr, slot.owner);
        return match unsafe { bpf_probe_read_user(addr as *const u64) } {
            Ok(token) if token != 0 => (owner, token),
            Ok(_) => (0, 0),
            Err(_) => {
                // The record still goes out, unattributed.
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
pub fn header(kind: u32, flags: u32, pid_tgid: u64) -> EventHeader {
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

/// Argument `n` of a `syscalls:sys_enter_*` tracepoint: an 8-byte slot whatever the C
/// type (see `SYSCALL_ARGS_OFFSET`; the agent checks the slots at load).
#[inline(always)]
pub fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: tracepoint contexts may be read directly; the verifier bounds the offset.
    unsafe {
        ptr::read(
            (ctx.as_ptr() as *const u8).add(SYSCALL_ARGS_OFFSET + SYSCALL_ARG_SIZE * n)
                as *const u64,
        )
    }
}

/// The return value of a `syscalls:sys_exit_*` tracepoint.
#[inline(always)]
pub fn ret(ctx: &TracePointContext) -> i64 {
    field(ctx, SYSCALL_RET)
}

/// A field of a tracepoint record at the offset the agent checked at load. `T` must be
/// `field.size` bytes.
#[inline(always)]
pub fn field<T>(ctx: &TracePointContext, field: RawField) -> T {
    // SAFETY: as `arg`. Reading past the record on a kernel with another layout would
    // return garbage, not fault: that is why the agent refuses such a kernel.
    unsafe { ptr::read((ctx.as_ptr() as *const u8).add(field.offset) as *const T) }
}
