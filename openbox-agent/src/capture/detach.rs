//! Detaching the kernel programs without making anyone wait for it.
//!
//! Closing a tracepoint's perf event waits for an RCU grace period, under a kernel-wide
//! mutex (`perf_trace_destroy` → `tracepoint_synchronize_unregister`), so the ~40
//! syscall tracepoints detach one after the other: measured 2.1–3.9 s between the end of
//! a traced command and the end of `trace`, and as long again for a daemon restarting in
//! a rolling update. Closing them from several threads would not help (the mutex).
//!
//! So the agent hands them to a child: [`hand_off`] forks a process that keeps only the
//! perf events and BPF links open (closing everything else at once: stdio, the hook
//! socket, files, so nobody waiting on those waits for the detach), waits until the
//! agent has exited, and then exits itself, which closes them. The agent's own closes
//! are then cheap (the child still holds each one), and the programs keep running for
//! those seconds only for processes that are no longer watched.

use std::{ffi::c_int, fs, time::Duration};

/// Forks the detaching child. Called once, as the agent ends, with every kernel object
/// still open. A failure (fork refused) only means the agent detaches slowly itself.
pub fn hand_off() {
    let Ok(entries) = fs::read_dir("/proc/self/fd") else {
        return;
    };
    let mut close = Vec::new();
    let mut kept = 0usize;
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<c_int>().ok())
        else {
            continue;
        };
        let target = fs::read_link(entry.path()).unwrap_or_default();
        let target = target.to_string_lossy();
        if target == "anon_inode:[perf_event]" || target.starts_with("anon_inode:bpf_link") {
            kept += 1;
        } else {
            close.push(fd);
        }
    }
    if kept == 0 {
        return;
    }
    let tick = libc::timespec {
        tv_sec: 0,
        tv_nsec: Duration::from_millis(20).as_nanos() as libc::c_long,
    };
    // SAFETY: getpid(2) cannot fail.
    let agent = unsafe { libc::getpid() };
    // SAFETY: the child runs only async-signal-safe system calls (close, setsid,
    // sigaction through signal, getppid, nanosleep, _exit) on memory allocated before
    // the fork: no allocation, no lock another thread could have held.
    match unsafe { libc::fork() } {
        0 => unsafe {
            for &fd in &close {
                libc::close(fd);
            }
            // Out of the agent's process group and deaf to the terminal's signals: a
            // Ctrl-C meant for the agent must not end the child before the agent.
            libc::setsid();
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            while libc::getppid() == agent {
                libc::nanosleep(&tick, std::ptr::null_mut());
            }
            libc::_exit(0)
        },
        -1 => tracing::debug!(
            "could not fork the detaching process ({}); detaching in the foreground",
            std::io::Error::last_os_error()
        ),
        child => tracing::debug!(
            child,
            kept,
            "kernel programs detach in the background once the agent has exited"
        ),
    }
}
