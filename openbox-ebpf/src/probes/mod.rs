//! The programs, one file per probe family.

mod descriptors;
mod files;
mod io_uring;
mod process;
mod sockets;
mod tls;

pub(crate) use self::tls::hold_forked_child;

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_get_current_pid_tgid};
use openbox_common::*;

use crate::{
    error::Loss,
    maps::{SyscallArgs, ARGS, FDS},
};

/// Keeps a syscall's arguments for its exit program.
#[inline(always)]
fn stash(pid_tgid: u64, args: SyscallArgs) -> Result<(), Loss> {
    ARGS.insert(pid_tgid, args, BPF_ANY.into())
        .map_err(|_| Loss::MapFull)
}

/// Takes what the entry program of the current thread's syscall kept. None when there
/// is nothing: the process is not watched, the descriptor not tracked, or the entry
/// ran before the programs were attached (or its stash was lost, counted there).
#[inline(always)]
fn take_args() -> Option<(u64, SyscallArgs)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: plain lookup; the value is copied out at once.
    let args = unsafe { ARGS.get(pid_tgid) }.copied()?;
    let _ = ARGS.remove(pid_tgid);
    Some((pid_tgid, args))
}

/// Starts tracking a descriptor the current process just got.
#[inline(always)]
fn track_fd(tgid: u32, fd: i32, kind: u32, gen: u64) {
    let state = FdState { kind, _pad: 0, gen };
    if FDS.insert(fd_key(tgid, fd), state, BPF_ANY.into()).is_err() {
        // The descriptor's calls will go unseen; its creation record still goes out.
        Loss::MapFull.count();
    }
}
