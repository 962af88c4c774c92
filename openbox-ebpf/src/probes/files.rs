//! File opens: openat and openat2 (reads and writes of tracked files go through the
//! data calls in `sockets`). When asked, a process that opens a TLS library is
//! stopped until the agent has attached its uprobes.
//!
//! The syscall arguments are 8-byte slots from offset 16 (see `sockets`); on the kernel
//! this was written on (6.18):
//!
//! ```text
//! name: sys_enter_openat
//!     field:int dfd;  offset:16;  size:8; signed:0;
//!     field:const char * filename;    offset:24;  size:8; signed:0;
//!     field:int flags;    offset:32;  size:8; signed:0;
//!     field:umode_t mode; offset:40;  size:8; signed:0;
//! name: sys_enter_openat2
//!     field:int dfd;  offset:16;  size:8; signed:0;
//!     field:const char * filename;    offset:24;  size:8; signed:0;
//!     field:struct open_how * how;    offset:32;  size:8; signed:0;
//!     field:size_t usize; offset:40;  size:8; signed:0;
//! ```
//!
//! In fentry mode, one fexit program per syscall on `__x64_sys_openat`/`openat2` sees
//! the arguments (`task::SyscallRegs`) and the new descriptor at once (see `sockets`).

use core::ptr;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_RB_FORCE_WAKEUP},
    helpers::{
        bpf_probe_read_user, bpf_probe_read_user_str_bytes,
        generated::{bpf_ktime_get_boot_ns, bpf_send_signal},
    },
    macros::{fexit, tracepoint},
    programs::{FExitContext, TracePointContext},
};
use openbox_common::*;

use super::{stash, take_args, track_fd};
use crate::{
    emit::wakeup,
    error::{count, finish, Loss},
    maps::{SyscallArgs, EVENTS, PAUSED, PAUSE_ON_TLS_LIB},
    task::{arg, fexit_ret, header, ret, watched, SyscallRegs},
};

const SIGSTOP: u32 = 19;

#[inline(always)]
fn try_openat_enter(ctx: &TracePointContext, flags: impl FnOnce() -> u64) -> Result<(), Loss> {
    let Some((pid_tgid, _)) = watched() else {
        return Ok(());
    };
    stash(
        pid_tgid,
        SyscallArgs::Open {
            dirfd: arg(ctx, 0) as i32,
            path: arg(ctx, 1),
            flags: flags(),
        },
    )
}

#[tracepoint]
pub fn sys_enter_openat(ctx: TracePointContext) -> u32 {
    finish(try_openat_enter(&ctx, || arg(&ctx, 2)))
}

/// openat2's flags: struct open_how starts with the u64 flags. Unreadable, the open is
/// still tracked (its descriptor must be), reported with flags 0, and the failure
/// counted.
#[inline(always)]
fn open_how_flags(how: u64) -> u64 {
    unsafe { bpf_probe_read_user(how as *const u64) }.unwrap_or_else(|_| {
        Loss::UserRead.count();
        0
    })
}

#[tracepoint]
pub fn sys_enter_openat2(ctx: TracePointContext) -> u32 {
    // Read after the watched check: an unwatched process's open_how is none of our
    // business (before, an unreadable one was even counted as a loss).
    finish(try_openat_enter(&ctx, || open_how_flags(arg(&ctx, 2))))
}

#[inline(always)]
fn try_openat_exit(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((pid_tgid, SyscallArgs::Open { dirfd, path, flags })) = take_args() else {
        return Ok(());
    };
    open_done(pid_tgid, dirfd, path, flags, ret(ctx))
}

/// openat and openat2 at their end; the path is read then, from the caller's memory
/// (see `sockets::fexit_connect`).
#[inline(always)]
fn try_openat_fexit(ctx: &FExitContext, openat2: bool) -> Result<(), Loss> {
    let Some((pid_tgid, _)) = watched() else {
        return Ok(());
    };
    let regs = SyscallRegs::of(ctx);
    let flags = if openat2 {
        open_how_flags(regs.arg(2))
    } else {
        regs.arg(2)
    };
    open_done(
        pid_tgid,
        regs.arg(0) as i32,
        regs.arg(1),
        flags,
        fexit_ret(ctx),
    )
}

#[fexit(function = "__x64_sys_openat")]
pub fn fexit_openat(ctx: FExitContext) -> u32 {
    finish(try_openat_fexit(&ctx, false))
}

#[fexit(function = "__x64_sys_openat2")]
pub fn fexit_openat2(ctx: FExitContext) -> u32 {
    finish(try_openat_fexit(&ctx, true))
}

#[inline(always)]
fn open_done(pid_tgid: u64, dirfd: i32, path: u64, flags: u64, r: i64) -> Result<(), Loss> {
    if r < 0 {
        // The open failed: no descriptor.
        return Ok(());
    }
    let tgid = (pid_tgid >> 32) as u32;
    let fd = r as i32;
    let hdr = header(EV_FILE_OPEN, 0, pid_tgid);
    track_fd(tgid, fd, FD_FILE, hdr.ts_ns);
    let mut entry = EVENTS.reserve::<FileOpenEvent>(0).ok_or(Loss::RingFull)?;
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    ev.hdr = hdr;
    ev.fd = fd;
    ev.open_flags = flags as u32;
    ev.dirfd = dirfd;
    let len = match unsafe { bpf_probe_read_user_str_bytes(path as *const u8, &mut ev.path) } {
        Ok(s) => s.len(),
        Err(_) => {
            // The record goes out with an empty path.
            Loss::UserRead.count();
            0
        }
    };
    ev.path_len = len as u32;
    if unsafe { ptr::read_volatile(&PAUSE_ON_TLS_LIB) } != 0
        && contains_libssl(&ev.path, len)
        && pause(tgid)
    {
        ev.hdr.flags |= FLAG_PAUSED;
    }
    // A paused process waits for the agent: wake it now.
    let wake = if ev.hdr.flags & FLAG_PAUSED != 0 {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        wakeup()
    };
    entry.submit(wake);
    count(CNT_EVENTS, 1);
    Ok(())
}

/// Stops the current process until the agent has attached its uprobes to the libssl it
/// opened: otherwise its first TLS calls could run before the probes exist. The stop is
/// recorded in PAUSED first, so no process is stopped that the agent (or, after a
/// crash, the next agent) could not find again; without a record there is no stop.
#[inline(always)]
pub(super) fn pause(tgid: u32) -> bool {
    let record = PausedProc {
        // SAFETY: a helper without arguments.
        paused_at_ns: unsafe { bpf_ktime_get_boot_ns() },
    };
    if PAUSED.insert(tgid, record, BPF_ANY.into()).is_err() {
        Loss::Pause.count();
        return false;
    }
    // SAFETY: a helper taking a signal number; it signals the current process.
    if unsafe { bpf_send_signal(SIGSTOP) } != 0 {
        let _ = PAUSED.remove(tgid);
        Loss::Pause.count();
        return false;
    }
    count(CNT_PAUSED, 1);
    true
}

/// Whether the path names a libssl. The last six bytes read are kept in one register
/// and compared at once: the verifier walks each of the loop's 256 iterations, and a
/// byte-by-byte comparison made six branches of each (15 500 instructions verified,
/// 50–80 ms of the start-up on the 2-core VM, against ~2 000 now).
#[inline(always)]
fn contains_libssl(path: &[u8; MAX_PATH], len: usize) -> bool {
    // "libssl", first byte highest: as the window below holds it.
    const NEEDLE: u64 = u64::from_be_bytes(*b"\0\0libssl");
    const WINDOW: u64 = (1 << 48) - 1;
    let mut window = 0u64;
    let mut i = 0;
    // A window of fewer than six bytes read holds zero bytes, which "libssl" has not.
    while i < MAX_PATH && i < len {
        window = ((window << 8) | path[i] as u64) & WINDOW;
        if window == NEEDLE {
            return true;
        }
        i += 1;
    }
    false
}

#[tracepoint]
pub fn sys_exit_openat(ctx: TracePointContext) -> u32 {
    finish(try_openat_exit(&ctx))
}

#[tracepoint]
pub fn sys_exit_openat2(ctx: TracePointContext) -> u32 {
    finish(try_openat_exit(&ctx))
}
