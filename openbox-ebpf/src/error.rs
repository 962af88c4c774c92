//! `Loss`: why a program gave up on (part of) what it was reporting.
//!
//! Every program body is a `try_*` function returning `Result<(), Loss>`; the program
//! itself is `finish(try_x(&ctx))`, which increments the loss's per-CPU counter. A
//! failure that does not stop the program (a record goes out without its path, say)
//! calls `Loss::count` and carries on. Early returns that are not losses (an
//! unwatched process, a failed syscall) return `Ok(())` with a comment saying why.

use openbox_common::*;

use crate::maps::COUNTERS;

/// A failure, named by the per-CPU counter (`openbox_common::CNT_*`) it increments.
#[derive(Clone, Copy)]
pub enum Loss {
    /// The ring buffer had no room: a record is lost.
    RingFull,
    /// A map insertion failed (map full): state is lost.
    MapFull,
    /// A read of user memory failed.
    UserRead,
    /// A read of kernel memory failed.
    KernelRead,
    /// No scratch space for a data record.
    Scratch,
    /// bpf_send_signal could not stop the process.
    Pause,
}

impl Loss {
    #[inline(always)]
    fn counter(self) -> u32 {
        match self {
            Loss::RingFull => CNT_RINGBUF_DROPS,
            Loss::MapFull => CNT_MAP_FULL,
            Loss::UserRead => CNT_READ_FAILURES,
            Loss::KernelRead => CNT_KERNEL_READ_FAILURES,
            Loss::Scratch => CNT_SCRATCH_FAILURES,
            Loss::Pause => CNT_PAUSE_FAILURES,
        }
    }

    /// Counts a failure the program carries on after.
    #[inline(always)]
    pub fn count(self) {
        count(self.counter(), 1);
    }

    /// Counts `n` such failures at once (a loop's, counted once after it).
    #[inline(always)]
    pub fn count_n(self, n: u64) {
        count(self.counter(), n);
    }
}

/// The return value of every program: counts the loss, if any. The value is ignored
/// by the kernel for tracepoints and uprobes.
#[inline(always)]
pub fn finish(result: Result<(), Loss>) -> u32 {
    if let Err(loss) = result {
        loss.count();
    }
    0
}

/// Adds `n` to counter `idx` of this CPU.
///
/// The increment is a plain load and store, not an atomic add: the tracepoint programs
/// run with preemption disabled, so nothing else touches this CPU's slot meanwhile. A
/// uprobe program may be preempted between the two (see `probes::tls`) and the
/// increment of the program that ran in between is then lost: counters are exact for
/// tracepoints and may undercount by the odd preempted TLS call.
#[inline(always)]
pub fn count(idx: u32, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: this CPU's slot of a per-CPU array; see above for concurrency.
        unsafe { *p += n };
    }
}
