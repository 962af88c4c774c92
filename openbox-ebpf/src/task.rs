//! The current task: is it watched, which activity does it work for, and the header
//! of the records it causes. Also the raw reads of tracepoint records, and of the
//! syscall arguments an fentry/fexit program finds in `struct pt_regs`.

use core::ptr;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    programs::{FExitContext, TracePointContext},
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

/// The registers a syscall was entered with, as the fentry/fexit programs on the
/// `__x64_sys_*` functions see them: those functions take a single `const struct
/// pt_regs *` and read each argument from it.
#[derive(Clone, Copy)]
pub struct SyscallRegs(*const u64);

/// Where each syscall argument is in x86_64's `struct pt_regs`, in 8-byte words (from
/// the kernel's BTF: r10 at 56, r9 64, r8 72, dx 96, si 104, di 112). The syscall ABI
/// passes arguments in di, si, dx, r10, r8, r9.
const SYSCALL_ARG_REGS: [usize; 6] = [14, 13, 12, 7, 9, 8];

impl SyscallRegs {
    /// The `pt_regs` pointer: argument 0 of every `__x64_sys_*` function.
    #[inline(always)]
    pub fn of(ctx: &impl EbpfContext) -> Self {
        // SAFETY: a tracing program's context is an array of u64 arguments; the
        // verifier checks this read against the function's BTF prototype.
        SyscallRegs(unsafe { ptr::read(ctx.as_ptr() as *const *const u64) })
    }

    /// Syscall argument `n` (0-based, at most 5).
    ///
    /// A direct load, not a bpf_probe_read_kernel: the verifier knows the pointer as
    /// a `struct pt_regs` (PTR_TO_BTF_ID) and checks each offset against that struct's
    /// BTF at load, so a kernel whose layout differs refuses the program instead of
    /// letting it read the wrong register.
    #[inline(always)]
    pub fn arg(self, n: usize) -> u64 {
        // SAFETY: see above; the verifier rejects an offset outside the struct.
        unsafe { ptr::read(self.0.add(SYSCALL_ARG_REGS[n])) }
    }
}

/// The return value of the `__x64_sys_*` function an fexit program runs after: it
/// follows the single `pt_regs` argument in the context.
#[inline(always)]
pub fn fexit_ret(ctx: &FExitContext) -> i64 {
    // SAFETY: slot 1 of a one-argument function's fexit context is its return value;
    // the verifier checks the read against the BTF prototype.
    unsafe { ptr::read((ctx.as_ptr() as *const i64).add(1)) }
}
