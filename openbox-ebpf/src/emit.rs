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

/// Wake the agent only once 2^WAKEUP_SHIFT bytes (64 KiB) are waiting; it also drains the ring on a short
/// timer. Waking it for every record cost the traced process a context switch per
/// syscall (measured: 6.3 µs instead of 2.5 µs per 1-byte write+read).
const WAKEUP_SHIFT: u32 = 16;
const _: () = assert!(BPF_RB_NO_WAKEUP == 1 && BPF_RB_FORCE_WAKEUP == 2);

/// log2 of `MAX_CHUNK`, for [`emit_payload`]'s arithmetic.
const CHUNK_SHIFT: u32 = MAX_CHUNK.trailing_zeros();
const _: () = assert!(1 << CHUNK_SHIFT == MAX_CHUNK);

/// The wake-up flag for a record submitted now: `BPF_RB_FORCE_WAKEUP` from 64 KiB
/// waiting, `BPF_RB_NO_WAKEUP` below. Without a branch: each branch of a
/// program is a path the verifier walks, and [`emit_payload`] calls this in its loop.
#[inline(always)]
pub fn wakeup() -> u64 {
    let waiting = EVENTS.query(BPF_RB_AVAIL_DATA.into());
    // waiting >> WAKEUP_SHIFT is below 2^48: adding 2^48 - 1 carries into bit 48
    // exactly when it is not zero.
    BPF_RB_NO_WAKEUP as u64 + (((waiting >> WAKEUP_SHIFT) + ((1 << 48) - 1)) >> 48)
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
#[repr(C)]
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
    /// Bytes of the chunk being copied.
    n: u64,
    /// The iovec array and its length (0 for a plain buffer), and the call's length.
    array: u64,
    iovcnt: u64,
    call_len: u64,
    /// Records sent and their payload bytes, records the ring buffer had no room for,
    /// and copies that failed: counted once the loop is done.
    sent: u64,
    captured: u64,
    dropped: u64,
    read_failed: u64,
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

/// Sends the first `size` bytes of the scratch record: 0, or a negative errno when the
/// ring buffer had no room. Counts nothing (see [`output_scratch`]).
#[inline(always)]
fn output_raw(ev: *mut DataEvent, size: u64) -> i64 {
    // SAFETY: `ev` is a map value of at least `size` bytes (size <= size_of DataEvent).
    unsafe {
        bpf_ringbuf_output(
            &EVENTS as *const _ as *mut c_void,
            ev as *mut c_void,
            size,
            wakeup(),
        )
    }
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
    // Everything the loop needs is in `st` from here, read back where used: so the loop
    // is verified once whatever the caller (a buffer or iovecs, a call cut at the limit
    // or not), where values kept in registers would make each caller's state a walk of
    // every iteration of its own.
    vset!(st, array, ptr);
    // A plain buffer has no next iovec.
    vset!(st, iovcnt, if iov { iovcnt } else { 0 });
    vset!(st, call_len, call_len);
    vset!(st, base, first.base);
    vset!(st, len, first.len);
    vset!(st, off, 0);
    vset!(st, idx, 0);
    vset!(st, done, 0);
    vset!(st, wanted, wanted);
    vset!(st, sent, 0);
    vset!(st, captured, 0);
    vset!(st, dropped, 0);
    vset!(st, read_failed, 0);

    for _ in 0..MAX_RECORDS_PER_CALL {
        let done = vget!(st, done);
        let wanted = vget!(st, wanted);
        if done >= wanted {
            break;
        }
        let off = vget!(st, off);
        let len = vget!(st, len);
        if off >= len {
            // This buffer is exhausted (or empty): move to the next iovec, if any.
            let idx = vget!(st, idx) + 1;
            if idx >= vget!(st, iovcnt) {
                break;
            }
            let at = vget!(st, array) + idx * 16;
            let next = match unsafe { bpf_probe_read_user(at as *const Iovec) } {
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
        // The chunk: min(len - off, wanted - done, MAX_CHUNK), computed without a branch
        // (see `LoopState`). `len` is the caller's: any u64.
        let rest = len - off;
        // 1 when rest >= MAX_CHUNK: rest >> CHUNK_SHIFT is below 2^52, so adding
        // 2^52 - 1 carries into bit 52 exactly when it is not zero.
        let big = ((rest >> CHUNK_SHIFT) + ((1 << 52) - 1)) >> 52;
        vset!(st, n, rest.wrapping_mul(1 - big) + MAX_CHUNK as u64 * big);
        // Both below 2^19 now, so their difference's sign bit says which is smaller.
        let a = vget!(st, n);
        let b = wanted - done;
        let d = a.wrapping_sub(b) as i64;
        vset!(st, n, (b as i64 + (d & (d >> 63))) as u64);
        // Read back: one unknown value on every path, bounded once for the copy.
        let n = vget!(st, n);
        if n > MAX_CHUNK as u64 {
            break;
        }
        let src = vget!(st, base) + vget!(st, off);
        let rc = unsafe {
            raw_probe_read_user(
                (*ev).data.as_mut_ptr() as *mut c_void,
                n as u32,
                src as *const c_void,
            )
        };
        // 1 when the copy failed (0 or a negative errno): the record goes out flagged,
        // so the agent knows its bytes are not the call's.
        let failed = (rc as u64) >> 63;
        let done = vget!(st, done) + n;
        vset!(st, done, done);
        let off = vget!(st, off) + n;
        vset!(st, off, off);
        let wanted = vget!(st, wanted);
        // done <= wanted: 1 when this chunk is the last.
        let last = (wanted - done).wrapping_sub(1) >> 63;
        // wanted <= call_len: 1 when the call is cut at the limit.
        let cut = wanted.wrapping_sub(vget!(st, call_len)) >> 63;
        let flags = failed * FLAG_READ_FAILED as u64
            + last * FLAG_LAST as u64
            + (last & cut) * FLAG_TRUNCATED as u64;
        unsafe {
            (*ev).hdr.flags = flags as u32;
            (*ev).offset = done - n;
            (*ev).len = n as u32;
        }
        // 1 when the ring buffer had no room (0 or a negative errno).
        let lost = (output_raw(ev, DATA_HEADER_LEN as u64 + n) as u64) >> 63;
        let (sent, captured) = (vget!(st, sent), vget!(st, captured));
        let (dropped, read_failed) = (vget!(st, dropped), vget!(st, read_failed));
        vset!(st, sent, sent + 1 - lost);
        vset!(st, captured, captured + n * (1 - lost));
        vset!(st, dropped, dropped + lost);
        vset!(st, read_failed, read_failed + failed);
    }
    let sent = vget!(st, sent);
    if sent != 0 {
        count(CNT_EVENTS, sent);
        count(CNT_CAPTURED_BYTES, vget!(st, captured));
    }
    let dropped = vget!(st, dropped);
    if dropped != 0 {
        Loss::RingFull.count_n(dropped);
    }
    let read_failed = vget!(st, read_failed);
    if read_failed != 0 {
        Loss::UserRead.count_n(read_failed);
    }
    let call_len = vget!(st, call_len);
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
