//! Descriptor copies (dup, dup2, dup3, fcntl F_DUPFD/F_DUPFD_CLOEXEC) and the calls
//! that move bytes between two descriptors inside the kernel (sendfile, splice,
//! copy_file_range).
//!
//! A copy refers to the same open file as the original: the copy is tracked with the
//! original's kind and flags from the call's return, so the bytes written through it
//! are captured on the same connection (the agent maps both numbers to one stream).
//! dup2/dup3 onto a tracked descriptor closes that one first: it is reported closed.
//!
//! The transfer calls have no user buffer: what they move is reported by length
//! (`TransferEvent`), with the kind of both ends, so the agent can count a file's
//! bytes and say that a socket's body came from a file.
//!
//! The arguments are 8-byte slots from offset 16 (see `sockets`); on 6.18:
//!
//! ```text
//! sys_enter_dup:             fildes
//! sys_enter_dup2:            oldfd, newfd
//! sys_enter_dup3:            oldfd, newfd, flags
//! sys_enter_fcntl:           fd, cmd, arg
//! sys_enter_sendfile64:      out_fd, in_fd, offset, count
//! sys_enter_splice:          fd_in, off_in, fd_out, off_out, len, flags
//! sys_enter_copy_file_range: fd_in, off_in, fd_out, off_out, len, flags
//! ```

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::bpf_get_current_pid_tgid,
    macros::{fexit, tracepoint},
    programs::{FExitContext, TracePointContext},
};
use openbox_common::*;

use super::{stash, take_args, track_fd};
use crate::{
    emit::submit,
    error::{finish, Loss},
    maps::{SyscallArgs, FDS, FD_FLAGS},
    task::{arg, fexit_ret, header, ret, watched, SyscallRegs},
};

const F_DUPFD: u64 = 0;
const F_DUPFD_CLOEXEC: u64 = 1030;

/// The kind of a tracked descriptor of process `tgid`, 0 when not tracked.
#[inline(always)]
fn kind_of(tgid: u32, fd: i32) -> u32 {
    if fd < 0 {
        return 0;
    }
    // SAFETY: plain lookup; the value is copied out at once.
    unsafe { FDS.get(fd_key(tgid, fd)) }.map_or(0, |s| s.kind)
}

/// The copy calls' arguments when the process is watched and one of the numbers
/// tracked (`newfd` -1: the kernel picks the lowest free number, never a tracked one's
/// replacement).
#[inline(always)]
fn dup_args(oldfd: i32, newfd: i32) -> Option<(u64, SyscallArgs)> {
    let (pid_tgid, tgid) = watched()?;
    if kind_of(tgid, oldfd) == 0 && kind_of(tgid, newfd) == 0 {
        // A copy of a descriptor the agent does not follow (a tty, a pipe) over another.
        return None;
    }
    Some((pid_tgid, SyscallArgs::Dup { oldfd }))
}

/// Records the copy `newfd` (the call's result) of `oldfd`.
#[inline(always)]
fn dup_done(pid_tgid: u64, oldfd: i32, r: i64) -> Result<(), Loss> {
    if r < 0 || r as i32 == oldfd {
        // Failed, or dup2(fd, fd), which changes nothing.
        return Ok(());
    }
    let newfd = r as i32;
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: plain lookups; the values are copied out at once.
    let old = unsafe { FDS.get(fd_key(tgid, oldfd)) }.copied();
    let replaced = unsafe { FDS.get(fd_key(tgid, newfd)) }.copied();
    let hdr = header(EV_DUP, 0, pid_tgid);
    let Some(old) = old else {
        let Some(replaced) = replaced else {
            // Neither is tracked (the original closed meanwhile by another thread).
            return Ok(());
        };
        // dup2 over a tracked descriptor with an untracked one: the tracked one closed.
        let _ = FDS.remove(fd_key(tgid, newfd));
        return submit(CloseEvent {
            hdr: EventHeader {
                kind: EV_CLOSE,
                ..hdr
            },
            fd: newfd,
            fd_kind: replaced.kind,
        });
    };
    // A new incarnation of the number: flags set on the one it replaced stay with it.
    track_fd(tgid, newfd, old.kind, hdr.ts_ns);
    let flags = unsafe {
        FD_FLAGS.get(FdFlagKey {
            fd_key: fd_key(tgid, oldfd),
            gen: old.gen,
        })
    }
    .copied();
    if let Some(flags) = flags {
        // The copy carries the same bytes: ciphertext, or a noise path, as the original.
        let key = FdFlagKey {
            fd_key: fd_key(tgid, newfd),
            gen: hdr.ts_ns,
        };
        if FD_FLAGS.insert(key, flags, BPF_ANY.into()).is_err() {
            Loss::MapFull.count();
        }
    }
    submit(DupEvent {
        hdr,
        oldfd,
        newfd,
        fd_kind: old.kind,
        replaced_kind: replaced.map_or(0, |s| s.kind),
    })
}

#[inline(always)]
fn try_dup_enter(ctx: &TracePointContext, newfd: i32) -> Result<(), Loss> {
    match dup_args(arg(ctx, 0) as i32, newfd) {
        Some((pid_tgid, args)) => stash(pid_tgid, args),
        None => Ok(()),
    }
}

#[inline(always)]
fn try_dup_exit(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((pid_tgid, SyscallArgs::Dup { oldfd })) = take_args() else {
        return Ok(());
    };
    dup_done(pid_tgid, oldfd, ret(ctx))
}

#[inline(always)]
fn try_dup_fexit(ctx: &FExitContext, newfd: impl FnOnce(SyscallRegs) -> i32) -> Result<(), Loss> {
    let regs = SyscallRegs::of(ctx);
    match dup_args(regs.arg(0) as i32, newfd(regs)) {
        Some((pid_tgid, _)) => dup_done(pid_tgid, regs.arg(0) as i32, fexit_ret(ctx)),
        None => Ok(()),
    }
}

#[tracepoint]
pub fn sys_enter_dup(ctx: TracePointContext) -> u32 {
    finish(try_dup_enter(&ctx, -1))
}
#[tracepoint]
pub fn sys_exit_dup(ctx: TracePointContext) -> u32 {
    finish(try_dup_exit(&ctx))
}
#[fexit(function = "__x64_sys_dup")]
pub fn fexit_dup(ctx: FExitContext) -> u32 {
    finish(try_dup_fexit(&ctx, |_| -1))
}

#[tracepoint]
pub fn sys_enter_dup2(ctx: TracePointContext) -> u32 {
    finish(try_dup_enter(&ctx, arg(&ctx, 1) as i32))
}
#[tracepoint]
pub fn sys_exit_dup2(ctx: TracePointContext) -> u32 {
    finish(try_dup_exit(&ctx))
}
#[fexit(function = "__x64_sys_dup2")]
pub fn fexit_dup2(ctx: FExitContext) -> u32 {
    finish(try_dup_fexit(&ctx, |r| r.arg(1) as i32))
}

#[tracepoint]
pub fn sys_enter_dup3(ctx: TracePointContext) -> u32 {
    finish(try_dup_enter(&ctx, arg(&ctx, 1) as i32))
}
#[tracepoint]
pub fn sys_exit_dup3(ctx: TracePointContext) -> u32 {
    finish(try_dup_exit(&ctx))
}
#[fexit(function = "__x64_sys_dup3")]
pub fn fexit_dup3(ctx: FExitContext) -> u32 {
    finish(try_dup_fexit(&ctx, |r| r.arg(1) as i32))
}

/// fcntl is called often (O_NONBLOCK, FD_CLOEXEC): only the two copy commands go on,
/// and only after the watched check, so an unwatched process pays what it did.
#[inline(always)]
fn is_dup_cmd(cmd: u64) -> bool {
    cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC
}

#[tracepoint]
pub fn sys_enter_fcntl(ctx: TracePointContext) -> u32 {
    finish(try_fcntl_enter(&ctx))
}

#[inline(always)]
fn try_fcntl_enter(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((pid_tgid, tgid)) = watched() else {
        return Ok(());
    };
    if !is_dup_cmd(arg(ctx, 1)) {
        return Ok(());
    }
    let oldfd = arg(ctx, 0) as i32;
    if kind_of(tgid, oldfd) == 0 {
        // F_DUPFD never replaces a descriptor: only a tracked original matters.
        return Ok(());
    }
    stash(pid_tgid, SyscallArgs::Dup { oldfd })
}

#[tracepoint]
pub fn sys_exit_fcntl(ctx: TracePointContext) -> u32 {
    finish(try_dup_exit(&ctx))
}

#[fexit(function = "__x64_sys_fcntl")]
pub fn fexit_fcntl(ctx: FExitContext) -> u32 {
    finish(try_fcntl_fexit(&ctx))
}

#[inline(always)]
fn try_fcntl_fexit(ctx: &FExitContext) -> Result<(), Loss> {
    let Some((pid_tgid, tgid)) = watched() else {
        return Ok(());
    };
    let regs = SyscallRegs::of(ctx);
    let oldfd = regs.arg(0) as i32;
    if !is_dup_cmd(regs.arg(1)) || kind_of(tgid, oldfd) == 0 {
        return Ok(());
    }
    dup_done(pid_tgid, oldfd, fexit_ret(ctx))
}

// ---- transfers ----

#[inline(always)]
fn transfer_args(source: u32, in_fd: i32, out_fd: i32) -> Option<(u64, SyscallArgs)> {
    let (pid_tgid, tgid) = watched()?;
    let in_kind = kind_of(tgid, in_fd);
    let out_kind = kind_of(tgid, out_fd);
    if in_kind == 0 && out_kind == 0 {
        // Between descriptors the agent does not follow (pipes, ttys).
        return None;
    }
    Some((
        pid_tgid,
        SyscallArgs::Transfer {
            source,
            in_fd,
            in_kind,
            out_fd,
            out_kind,
        },
    ))
}

#[inline(always)]
fn transfer_done(pid_tgid: u64, args: SyscallArgs, r: i64) -> Result<(), Loss> {
    let SyscallArgs::Transfer {
        source,
        in_fd,
        in_kind,
        out_fd,
        out_kind,
    } = args
    else {
        return Ok(());
    };
    if r <= 0 {
        // Failed or moved nothing.
        return Ok(());
    }
    submit(TransferEvent {
        hdr: header(EV_TRANSFER, 0, pid_tgid),
        in_fd,
        in_kind,
        out_fd,
        out_kind,
        source,
        _pad: 0,
        bytes: r as u64,
    })
}

#[inline(always)]
fn try_transfer_enter(source: u32, in_fd: i32, out_fd: i32) -> Result<(), Loss> {
    match transfer_args(source, in_fd, out_fd) {
        Some((pid_tgid, args)) => stash(pid_tgid, args),
        None => Ok(()),
    }
}

#[inline(always)]
fn try_transfer_exit(ctx: &TracePointContext) -> Result<(), Loss> {
    let pid_tgid = bpf_get_current_pid_tgid();
    match take_args() {
        Some((_, args)) => transfer_done(pid_tgid, args, ret(ctx)),
        None => Ok(()),
    }
}

#[inline(always)]
fn try_transfer_fexit(
    ctx: &FExitContext,
    source: u32,
    in_arg: usize,
    out_arg: usize,
) -> Result<(), Loss> {
    let regs = SyscallRegs::of(ctx);
    match transfer_args(source, regs.arg(in_arg) as i32, regs.arg(out_arg) as i32) {
        Some((pid_tgid, args)) => transfer_done(pid_tgid, args, fexit_ret(ctx)),
        None => Ok(()),
    }
}

#[tracepoint]
pub fn sys_enter_sendfile64(ctx: TracePointContext) -> u32 {
    finish(try_transfer_enter(
        SRC_SENDFILE,
        arg(&ctx, 1) as i32,
        arg(&ctx, 0) as i32,
    ))
}
#[tracepoint]
pub fn sys_exit_sendfile64(ctx: TracePointContext) -> u32 {
    finish(try_transfer_exit(&ctx))
}
#[fexit(function = "__x64_sys_sendfile64")]
pub fn fexit_sendfile64(ctx: FExitContext) -> u32 {
    finish(try_transfer_fexit(&ctx, SRC_SENDFILE, 1, 0))
}

#[tracepoint]
pub fn sys_enter_splice(ctx: TracePointContext) -> u32 {
    finish(try_transfer_enter(
        SRC_SPLICE,
        arg(&ctx, 0) as i32,
        arg(&ctx, 2) as i32,
    ))
}
#[tracepoint]
pub fn sys_exit_splice(ctx: TracePointContext) -> u32 {
    finish(try_transfer_exit(&ctx))
}
#[fexit(function = "__x64_sys_splice")]
pub fn fexit_splice(ctx: FExitContext) -> u32 {
    finish(try_transfer_fexit(&ctx, SRC_SPLICE, 0, 2))
}

#[tracepoint]
pub fn sys_enter_copy_file_range(ctx: TracePointContext) -> u32 {
    finish(try_transfer_enter(
        SRC_COPY_FILE_RANGE,
        arg(&ctx, 0) as i32,
        arg(&ctx, 2) as i32,
    ))
}
#[tracepoint]
pub fn sys_exit_copy_file_range(ctx: TracePointContext) -> u32 {
    finish(try_transfer_exit(&ctx))
}
#[fexit(function = "__x64_sys_copy_file_range")]
pub fn fexit_copy_file_range(ctx: FExitContext) -> u32 {
    finish(try_transfer_fexit(&ctx, SRC_COPY_FILE_RANGE, 0, 2))
}
