//! Process lifecycle: fork (a watched process's children are watched from their first
//! instruction), exec, and exit.
//!
//! These tracepoints are read at raw offsets (`openbox_common::TASK_NEWTASK_*`,
//! `SCHED_PROCESS_*`); the agent checks each against tracefs at load and refuses a
//! kernel whose layout differs, so a program never reads a field that is not there.

use core::ptr;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
    },
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext,
};
use openbox_common::*;

use crate::{
    emit::wakeup,
    error::{count, finish, Loss},
    maps::{
        ForkCopy, ARGS, EVENTS, EXIT_SIGNAL_LIVE, EXIT_TASK_SIGNAL, FDS, FD_FLAGS, FORK_COPY,
        FORK_FDS, INHERIT, PAUSED, PAUSE_ON_TLS_LIB, SSL_ARGS, THREADS, WATCHED,
    },
    task::{attribution, field, header, is_watched, watch_flags},
};

const CLONE_VM: u64 = 0x100;
const CLONE_THREAD: u64 = 0x10000;
/// errno of an insertion with BPF_NOEXIST whose key is there (aya-ebpf has no errno
/// values).
const EEXIST: i32 = 17;

/// The current task's name. bpf_get_current_comm fails only without a current task,
/// which a tracepoint fired by a task always has: not a loss; the name would be empty.
#[inline(always)]
fn comm() -> [u8; COMM_LEN] {
    bpf_get_current_comm().unwrap_or([0; COMM_LEN])
}

/// ```text
/// name: task_newtask
/// ID: 205
/// format:
///     field:unsigned short common_type;   offset:0;   size:2; signed:0;
///     field:unsigned char common_flags;   offset:2;   size:1; signed:0;
///     field:unsigned char common_preempt_count;   offset:3;   size:1; signed:0;
///     field:int common_pid;   offset:4;   size:4; signed:1;
///
///     field:pid_t pid;    offset:8;   size:4; signed:1;
///     field:char comm[16];    offset:12;  size:16;    signed:0;
///     field:u64 clone_flags;  offset:32;  size:8; signed:0;
///     field:short oom_score_adj;  offset:40;  size:2; signed:1;
/// ```
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    finish(try_task_newtask(&ctx))
}

#[inline(always)]
fn try_task_newtask(ctx: &TracePointContext) -> Result<(), Loss> {
    // Runs in the parent, before the child can run: the child is watched from its
    // first instruction. Threads (CLONE_THREAD) share the parent's tgid already.
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(parent) = watch_flags((pid_tgid >> 32) as u32) else {
        return Ok(());
    };
    let clone_flags: u64 = field(ctx, TASK_NEWTASK_CLONE_FLAGS);
    if clone_flags & CLONE_THREAD != 0 {
        return Ok(());
    }
    let child: u32 = field(ctx, TASK_NEWTASK_PID);
    // The parent's uprobes fire only in the parent's memory: a child with a copy of its
    // own waits for probes of its own (`probes::tls`). One that shares the parent's
    // memory (vfork, posix_spawn) is covered by the parent's until it execs.
    let mut flags = WATCH_ON;
    if parent & WATCH_TLS_PROBED != 0
        && clone_flags & CLONE_VM == 0
        && unsafe { ptr::read_volatile(&PAUSE_ON_TLS_LIB) } != 0
    {
        flags |= WATCH_TLS_PENDING;
    }
    match WATCHED.insert(child, flags, BPF_NOEXIST.into()) {
        Ok(()) => {}
        // Watched already (the agent got there first): nothing lost.
        Err(e) if e == -EEXIST => {}
        Err(_) => Loss::MapFull.count(),
    }
    // A process started while an activity ran on this thread (subprocess.run, a shell)
    // works for that activity for its whole life, and so do its own children.
    let (owner, activity) = attribution(pid_tgid);
    if activity != 0 {
        let value = Inherited {
            owner,
            _pad: 0,
            activity,
        };
        if INHERIT.insert(child, value, BPF_ANY.into()).is_err() {
            Loss::MapFull.count();
        }
    }
    // The descriptors, then the fork's record, in `task_newtask_fds`.
    match FORK_COPY.get_ptr_mut(0) {
        Some(copy) => {
            // SAFETY: this CPU's slot; nothing preempts this program or its tail calls.
            unsafe {
                *copy = ForkCopy {
                    parent: (pid_tgid >> 32) as u32,
                    child,
                    next_fd: 0,
                    _pad: 0,
                };
                // SAFETY: the callee is a tracepoint program, as this one.
                FORK_FDS.tail_call(ctx, 0);
            }
            // Only when the agent did not set the program: no descriptor is copied.
            Loss::Scratch.count();
        }
        None => Loss::Scratch.count(),
    }
    fork_event(pid_tgid, child)
}

/// Descriptors `task_newtask_fds` copies per run.
const FDS_PER_COPY: i32 = 64;
// At most INHERITED_FDS_COPIED / FDS_PER_COPY tail calls, under the kernel's 33.
const _: () = assert!(INHERITED_FDS_COPIED / FDS_PER_COPY <= 32);

/// Copies the next [`FDS_PER_COPY`] descriptors of the fork in `FORK_COPY`, then the
/// next ones by a tail call to itself, and at the end sends the fork's record: never
/// attached, only tail-called from `task_newtask`.
#[tracepoint]
pub fn task_newtask_fds(ctx: TracePointContext) -> u32 {
    finish(try_task_newtask_fds(&ctx))
}

#[inline(always)]
fn try_task_newtask_fds(ctx: &TracePointContext) -> Result<(), Loss> {
    let copy = FORK_COPY.get_ptr_mut(0).ok_or(Loss::Scratch)?;
    // SAFETY: this CPU's slot, as in `try_task_newtask`.
    let ForkCopy {
        parent,
        child,
        next_fd,
        ..
    } = unsafe { *copy };
    inherit_fds(parent, child, next_fd);
    let next = next_fd + FDS_PER_COPY;
    if next < INHERITED_FDS_COPIED {
        unsafe {
            (*copy).next_fd = next;
            FORK_FDS.tail_call(ctx, 0);
        }
        // Cannot happen (the program is set, and at most 16 tail calls in a row): the
        // rest of the descriptors are not copied.
        Loss::Scratch.count();
    }
    fork_event(bpf_get_current_pid_tgid(), child)
}

/// The record of a watched process's new child.
#[inline(always)]
fn fork_event(pid_tgid: u64, child: u32) -> Result<(), Loss> {
    let mut entry = EVENTS.reserve::<ProcEvent>(0).ok_or(Loss::RingFull)?;
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    ev.hdr = header(EV_FORK, 0, pid_tgid);
    ev.other = child;
    ev.path_len = 0;
    ev.comm = comm();
    entry.submit(wakeup());
    count(CNT_EVENTS, 1);
    Ok(())
}

/// Copies the parent's tracked descriptors `first` to `first + FDS_PER_COPY - 1` (and
/// their flags) to a new child process, before the child can run: it uses them from
/// its first instruction, long before the agent could read its /proc. The copy keeps
/// each descriptor's generation (the same incarnation), so the agent's seeding finds
/// the entry and keeps it. Numbers from [`INHERITED_FDS_COPIED`] are left to that
/// seeding.
#[inline(always)]
fn inherit_fds(parent: u32, child: u32, first: i32) {
    // A multiple of FDS_PER_COPY below INHERITED_FDS_COPIED, as `task_newtask` and its
    // tail calls set it; checked once here, not per number (a check per number is a
    // way out of the loop per number, each walked by the verifier).
    // Two signed comparisons: written as a range's `contains`, the verifier walked 30 000
    // instructions instead of 13 000.
    #[allow(clippy::manual_range_contains)]
    if first < 0 || first > INHERITED_FDS_COPIED - FDS_PER_COPY {
        return;
    }
    for k in 0..FDS_PER_COPY {
        let fd = first + k;
        // SAFETY: plain lookups; the values are copied out at once.
        if let Some(state) = unsafe { FDS.get(fd_key(parent, fd)) }.copied() {
            if FDS
                .insert(fd_key(child, fd), state, BPF_ANY.into())
                .is_err()
            {
                Loss::MapFull.count();
            }
            let flags = unsafe {
                FD_FLAGS.get(FdFlagKey {
                    fd_key: fd_key(parent, fd),
                    gen: state.gen,
                })
            }
            .copied();
            if let Some(flags) = flags {
                let key = FdFlagKey {
                    fd_key: fd_key(child, fd),
                    gen: state.gen,
                };
                if FD_FLAGS.insert(key, flags, BPF_ANY.into()).is_err() {
                    Loss::MapFull.count();
                }
            }
        }
    }
}

/// ```text
/// name: sched_process_exec
/// ID: 365
/// format:
///     (common fields as in task_newtask)
///
///     field:__data_loc char[] filename;   offset:8;   size:4; signed:0;
///     field:pid_t pid;    offset:12;  size:4; signed:1;
///     field:pid_t old_pid;    offset:16;  size:4; signed:1;
/// ```
#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    finish(try_sched_process_exec(&ctx))
}

#[inline(always)]
fn try_sched_process_exec(ctx: &TracePointContext) -> Result<(), Loss> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // Counted as a probe hit, as the data calls are (not through `watched`: a child
    // waiting for its TLS probes must not stop here, see below).
    let Some(flags) = watch_flags(tgid) else {
        count(CNT_UNWATCHED, 1);
        return Ok(());
    };
    count(CNT_WATCHED, 1);
    if flags & (WATCH_TLS_PROBED | WATCH_TLS_PENDING) != 0 {
        // The new image maps its libraries afresh, and one that opens a libssl is
        // stopped at that open (`files`): no need to stop it here. The agent marks it
        // probed again once it has re-attached.
        if WATCHED.insert(tgid, WATCH_ON, BPF_ANY.into()).is_err() {
            Loss::MapFull.count();
        }
    }
    let mut entry = EVENTS.reserve::<ProcEvent>(0).ok_or(Loss::RingFull)?;
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    ev.hdr = header(EV_EXEC, 0, pid_tgid);
    ev.other = field(ctx, SCHED_PROCESS_EXEC_OLD_PID);
    ev.comm = comm();
    // __data_loc: low 16 bits offset from the record start, high 16 bits length.
    let loc: u32 = field(ctx, SCHED_PROCESS_EXEC_FILENAME);
    let off = (loc & 0xffff) as usize;
    let src = unsafe { (ctx.as_ptr() as *const u8).add(off) };
    ev.path_len = match unsafe { bpf_probe_read_kernel_str_bytes(src, &mut ev.path) } {
        Ok(s) => s.len() as u32,
        Err(_) => {
            // The record goes out without the new image's path.
            Loss::KernelRead.count();
            0
        }
    };
    entry.submit(wakeup());
    count(CNT_EVENTS, 1);
    Ok(())
}

/// `group_dead` exists only on recent kernels (6.1 and 6.12 do not have it); there the
/// exit program reads `current->signal->live` instead (see [`group_dead`]).
///
/// ```text
/// name: sched_process_exit
/// ID: 369
/// format:
///     (common fields as in task_newtask)
///
///     field:char comm[16];    offset:8;   size:16;    signed:0;
///     field:pid_t pid;    offset:24;  size:4; signed:1;
///     field:int prio; offset:28;  size:4; signed:1;
///     field:bool group_dead;  offset:32;  size:1; signed:0;
/// ```
#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    finish(try_sched_process_exit(&ctx))
}

#[inline(always)]
fn try_sched_process_exit(ctx: &TracePointContext) -> Result<(), Loss> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !is_watched(tgid) {
        return Ok(());
    }
    let _ = ARGS.remove(pid_tgid);
    let _ = SSL_ARGS.remove(pid_tgid);
    // The tid may be reused by an unrelated thread: its slot registration dies here.
    let _ = THREADS.remove(pid_tgid as u32);
    if !group_dead(ctx)? {
        // Another thread of the process lives on.
        return Ok(());
    }
    if WATCHED.remove(tgid).is_err() {
        // Another thread of the group saw it dead too and reported the exit (two
        // threads exiting at once both read `live` as 0).
        return Ok(());
    }
    let _ = INHERIT.remove(tgid);
    // A process killed while paused is no longer stopped: its pid may be reused.
    let _ = PAUSED.remove(tgid);
    let mut entry = EVENTS.reserve::<ProcEvent>(0).ok_or(Loss::RingFull)?;
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    ev.hdr = header(EV_EXIT, 0, pid_tgid);
    ev.other = 0;
    ev.path_len = 0;
    ev.comm = comm();
    entry.submit(wakeup());
    count(CNT_EVENTS, 1);
    Ok(())
}

/// Whether the exiting thread is the last of its group. From the record's `group_dead`
/// where the kernel has it (the agent checked its place, `capture/tracefs.rs`), else
/// from `current->signal->live` at the offsets the agent found in the kernel's BTF
/// (`capture/btf.rs`): `do_exit` decrements `live` before this tracepoint, so 0 means
/// no thread of the group is left. Both are read with bpf_probe_read_kernel: a direct
/// load of the record at offset 32, even on a branch never taken, would make the
/// kernel refuse to attach the program where the record is shorter.
#[inline(always)]
fn group_dead(ctx: &TracePointContext) -> Result<bool, Loss> {
    // SAFETY: globals set at load time and never written by a program.
    let (task_signal, signal_live) = unsafe {
        (
            ptr::read_volatile(&EXIT_TASK_SIGNAL),
            ptr::read_volatile(&EXIT_SIGNAL_LIVE),
        )
    };
    if task_signal == 0 {
        // SAFETY: within the record, at a place checked against this kernel's format.
        let at = unsafe { (ctx.as_ptr() as *const u8).add(SCHED_PROCESS_EXIT_GROUP_DEAD.offset) };
        let dead: u8 = unsafe { bpf_probe_read_kernel(at) }.map_err(|_| Loss::KernelRead)?;
        return Ok(dead != 0);
    }
    // SAFETY: the helper checks every address it reads.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let signal: *const u8 =
        unsafe { bpf_probe_read_kernel(task.add(task_signal as usize) as *const *const u8) }
            .map_err(|_| Loss::KernelRead)?;
    let live: i32 =
        unsafe { bpf_probe_read_kernel(signal.add(signal_live as usize) as *const i32) }
            .map_err(|_| Loss::KernelRead)?;
    Ok(live == 0)
}
