//! Writing records to the ring buffer: fixed-size records, and the payload of a call
//! copied in chunks from a scratch record.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_probe_read_user,
        generated::{bpf_probe_read_user as raw_probe_read_user, bpf_ringbuf_output},
    },
};
use openbox_common::*;

use crate::{
    error::{count, Loss},
    maps::{Scratch, CAPTURE_LIMIT, EVENTS, SCRATCH, TLS_SCRATCH},
    task::header,
};

/// Wake the agent only once this much is waiting; it also drains the ring on a short
/// timer. Waking it for every record cost the traced process a context switch per
/// syscall (measured: 6.3 µs instead of 2.5 µs per 1-byte write+read).
const WAKEUP_BYTES: u64 = 64 * 1024;

/// The wake-up flag for a record submitted now.
#[inline(always)]
pub fn wakeup() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA.into()) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        BPF_RB_NO_WAKEUP.into()
    }
}

/// Sends a fixed-size record to the ring buffer.
#[inline(always)]
pub fn submit<T: 'static>(value: T) -> Result<(), Loss> {
    let mut entry = EVENTS.reserve::<T>(0).ok_or(Loss::RingFull)?;
    entry.write(value);
    entry.submit(wakeup());
    count(CNT_EVENTS, 1);
    Ok(())
}

/// This CPU's scratch record, for the tracepoint programs (see `maps::SCRATCH`; fentry
/// and fexit programs use [`claim_scratch`]).
#[inline(always)]
pub fn cpu_scratch() -> Result<*mut Scratch, Loss> {
    // Index 0 of a one-entry array: the lookup cannot fail, but the verifier wants the
    // check, and a failure would still be counted.
    SCRATCH.get_ptr_mut(0).ok_or(Loss::Scratch)
}

/// A scratch entry of this thread's own (see `probes::tls`), deleted by the caller
/// before its program returns.
#[inline(always)]
pub fn thread_scratch(pid_tgid: u64) -> Result<*mut Scratch, Loss> {
    // The insert needs a value to copy; its content does not matter (every field a
    // record carries is written before it is sent), so this CPU's slot serves, even if
    // a preempting program is writing it.
    let template = cpu_scratch()?;
    // SAFETY: a map value pointer of the map's value type. Passed by reference: by
    // value, the 4 KiB scratch would be copied to the 512-byte stack.
    let template: &Scratch = unsafe { &*template };
    TLS_SCRATCH
        .insert(pid_tgid, template, BPF_ANY.into())
        .map_err(|_| Loss::Scratch)?;
    TLS_SCRATCH.get_ptr_mut(pid_tgid).ok_or(Loss::Scratch)
}

/// Scratch space claimed by an fentry/fexit program, given back with [`release`].
#[derive(Clone, Copy)]
pub enum Claimed {
    /// This CPU's slot.
    Cpu(*mut Scratch),
    /// The thread's own entry: this CPU's slot was in use (see [`claim_scratch`]).
    Thread(*mut Scratch),
}

impl Claimed {
    #[inline(always)]
    pub fn scratch(self) -> *mut Scratch {
        match self {
            Claimed::Cpu(s) | Claimed::Thread(s) => s,
        }
    }
}

/// Scratch space for an fentry/fexit program. Those run with migration disabled but,
/// unlike tracepoint programs, may be preempted (preempt=full or lazy), and the task
/// that runs meanwhile on this CPU may run another of them: so the per-CPU slot is
/// marked busy while used, and a program that finds it busy takes a thread-keyed entry
/// as the uprobe programs do. Costs two stores in the common case. The check and the
/// mark are two instructions, not an atomic exchange: a program preempted exactly
/// between them by one that is itself preempted while holding the slot could share
/// it; that needs two preemptions within a few instructions on one CPU.
#[inline(always)]
pub fn claim_scratch(pid_tgid: u64) -> Result<Claimed, Loss> {
    let s = cpu_scratch()?;
    // SAFETY: this CPU's slot of a per-CPU array; see above for concurrency.
    let busy = unsafe { ptr::addr_of_mut!((*s).busy) };
    if unsafe { ptr::read_volatile(busy) } == 0 {
        unsafe { ptr::write_volatile(busy, 1) };
        return Ok(Claimed::Cpu(s));
    }
    thread_scratch(pid_tgid).map(Claimed::Thread)
}

/// Gives back what [`claim_scratch`] claimed.
#[inline(always)]
pub fn release(claimed: Claimed, pid_tgid: u64) {
    match claimed {
        // SAFETY: the slot this program marked busy.
        Claimed::Cpu(s) => unsafe { ptr::write_volatile(ptr::addr_of_mut!((*s).busy), 0) },
        Claimed::Thread(_) => {
            let _ = TLS_SCRATCH.remove(pid_tgid);
        }
    }
}

/// Runs `f` with scratch space: this CPU's slot for a tracepoint program
/// (`preemptible` false), a claimed one for an fentry/fexit program.
#[inline(always)]
pub fn with_scratch(
    preemptible: bool,
    pid_tgid: u64,
    f: impl FnOnce(*mut Scratch) -> Result<(), Loss>,
) -> Result<(), Loss> {
    if !preemptible {
        return f(cpu_scratch()?);
    }
    let claimed = claim_scratch(pid_tgid)?;
    let result = f(claimed.scratch());
    release(claimed, pid_tgid);
    result
}

/// Where the bytes of a call are.
#[derive(Clone, Copy)]
pub enum Payload {
    /// One buffer of the call's length.
    Buffer(u64),
    /// An iovec array of `count` entries.
    Iovecs { array: u64, count: u64 },
}

/// One call whose bytes become data records.
#[derive(Clone, Copy)]
pub struct DataCall {
    /// `EV_SOCK_DATA` or `EV_TLS_DATA`.
    pub kind: u32,
    pub pid_tgid: u64,
    pub fd: i32,
    /// `SRC_*`.
    pub source: u32,
    /// `DIR_*`.
    pub direction: u32,
    pub ssl: u64,
    /// Bytes the call moved.
    pub len: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

/// Loop state of [`emit_payload`], kept in map memory on purpose: the verifier does not
/// track values loaded from a map precisely, so every iteration starts from the same
/// abstract state and is pruned. Kept in registers, the exact offsets differed per
/// iteration and verification hit "BPF program is too large. Processed 1000001 insn".
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoopState {
    /// Current buffer (or iovec) and its length.
    base: u64,
    len: u64,
    /// Bytes of the current buffer already copied.
    off: u64,
    /// Index of the current iovec.
    idx: u64,
    /// Bytes copied for this call so far, and the most that will be.
    done: u64,
    wanted: u64,
}

macro_rules! vget {
    ($st:expr, $f:ident) => {
        unsafe { ptr::read_volatile(ptr::addr_of!((*$st).$f)) }
    };
}
macro_rules! vset {
    ($st:expr, $f:ident, $v:expr) => {
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*$st).$f), $v) }
    };
}

/// Sends the first `size` bytes of the scratch record.
#[inline(always)]
fn output_scratch(ev: *mut DataEvent, size: u64) -> Result<(), Loss> {
    // SAFETY: `ev` is a map value of at least `size` bytes (size <= size_of DataEvent).
    let rc = unsafe {
        bpf_ringbuf_output(
            &EVENTS as *const _ as *mut c_void,
            ev as *mut c_void,
            size,
            wakeup(),
        )
    };
    if rc != 0 {
        return Err(Loss::RingFull);
    }
    count(CNT_EVENTS, 1);
    Ok(())
}

/// Copies up to `CAPTURE_LIMIT` bytes of what a call moved into data records, built in
/// `scratch`. One record per chunk of at most MAX_CHUNK bytes (and per iovec), at most
/// MAX_RECORDS_PER_CALL records. A record the ring buffer had no room for is counted
/// and the next is tried (the agent sees the gap in the offsets).
#[inline(always)]
pub fn emit_payload(scratch: *mut Scratch, call: DataCall, payload: Payload) -> Result<(), Loss> {
    // SAFETY: `scratch` is a map value the caller has to itself until it returns.
    let (ev, st) = unsafe {
        (
            ptr::addr_of_mut!((*scratch).event),
            ptr::addr_of_mut!((*scratch).state),
        )
    };
    let (ptr, iov, iovcnt) = match payload {
        Payload::Buffer(buf) => (buf, false, 0),
        Payload::Iovecs { array, count } => (array, true, count),
    };
    let call_len = call.len;
    let limit = unsafe { ptr::read_volatile(&CAPTURE_LIMIT) } as u64;
    let limit = if limit > MAX_CAPTURE_LIMIT as u64 {
        MAX_CAPTURE_LIMIT as u64
    } else {
        limit
    };
    let wanted = if call_len < limit { call_len } else { limit };
    let iovcnt = if iovcnt > MAX_IOVECS as u64 {
        MAX_IOVECS as u64
    } else {
        iovcnt
    };
    unsafe {
        (*ev).hdr = header(call.kind, 0, call.pid_tgid);
        (*ev).fd = call.fd;
        (*ev).source = call.source;
        (*ev).ssl = call.ssl;
        (*ev).call_len = call_len;
        (*ev).direction = call.direction;
    }
    let first = if iov {
        if iovcnt == 0 {
            // The call moved bytes through no iovec: nothing to copy, nothing lost.
            return Ok(());
        }
        unsafe { bpf_probe_read_user(ptr as *const Iovec) }.map_err(|_| Loss::UserRead)?
    } else {
        Iovec {
            base: ptr,
            len: call_len,
        }
    };
    vset!(st, base, first.base);
    vset!(st, len, first.len);
    vset!(st, off, 0);
    vset!(st, idx, 0);
    vset!(st, done, 0);
    vset!(st, wanted, wanted);

    for _ in 0..MAX_RECORDS_PER_CALL {
        let done = vget!(st, done);
        let wanted = vget!(st, wanted);
        if done >= wanted {
            break;
        }
        let off = vget!(st, off);
        let len = vget!(st, len);
        if off >= len {
            // This iovec is exhausted (or empty): move to the next.
            if !iov {
                break;
            }
            let idx = vget!(st, idx) + 1;
            if idx >= iovcnt {
                break;
            }
            let next = match unsafe { bpf_probe_read_user((ptr + idx * 16) as *const Iovec) } {
                Ok(v) => v,
                Err(_) => {
                    // The rest of the call is reported as truncated below.
                    Loss::UserRead.count();
                    break;
                }
            };
            vset!(st, idx, idx);
            vset!(st, base, next.base);
            vset!(st, len, next.len);
            vset!(st, off, 0);
            continue;
        }
        let mut n = len - off;
        if n > wanted - done {
            n = wanted - done;
        }
        if n > MAX_CHUNK as u64 {
            n = MAX_CHUNK as u64;
        }
        let n = n as u32;
        // Bound for the verifier: the copy must fit the scratch record.
        if n > MAX_CHUNK as u32 {
            break;
        }
        let mut flags = 0;
        let src = vget!(st, base) + off;
        let rc = unsafe {
            raw_probe_read_user(
                (*ev).data.as_mut_ptr() as *mut c_void,
                n,
                src as *const c_void,
            )
        };
        if rc != 0 {
            // The record goes out flagged: the agent knows its bytes are not the call's.
            flags |= FLAG_READ_FAILED;
            Loss::UserRead.count();
        }
        let done = done + n as u64;
        vset!(st, done, done);
        vset!(st, off, off + n as u64);
        if done >= wanted {
            flags |= FLAG_LAST;
            if wanted < call_len {
                flags |= FLAG_TRUNCATED;
            }
        }
        unsafe {
            (*ev).hdr.flags = flags;
            (*ev).offset = done - n as u64;
            (*ev).len = n;
        }
        match output_scratch(ev, DATA_HEADER_LEN as u64 + n as u64) {
            Ok(()) => count(CNT_CAPTURED_BYTES, n as u64),
            Err(loss) => loss.count(),
        }
    }
    let done = vget!(st, done);
    if done < call_len {
        count(CNT_TRUNCATED_CALLS, 1);
        count(CNT_TRUNCATED_BYTES, call_len - done);
        if done < vget!(st, wanted) {
            // Out of records or iovecs before the limit: an empty last record tells the
            // agent where the call ended.
            unsafe {
                (*ev).offset = done;
                (*ev).len = 0;
                (*ev).hdr.flags = FLAG_LAST | FLAG_TRUNCATED;
            }
            output_scratch(ev, DATA_HEADER_LEN as u64)?;
        }
    }
    Ok(())
}

/// A data record with no payload: ciphertext, or a descriptor marked FD_NO_PAYLOAD.
#[inline(always)]
pub fn emit_no_payload(scratch: *mut Scratch, call: DataCall, flags: u32) -> Result<(), Loss> {
    // SAFETY: as in `emit_payload`.
    let ev = unsafe { &mut (*scratch).event };
    ev.hdr = header(
        call.kind,
        flags | FLAG_NO_PAYLOAD | FLAG_LAST,
        call.pid_tgid,
    );
    ev.fd = call.fd;
    ev.source = call.source;
    ev.ssl = call.ssl;
    ev.call_len = call.len;
    ev.offset = 0;
    ev.len = 0;
    ev.direction = call.direction;
    output_scratch(ev, DATA_HEADER_LEN as u64)
}
