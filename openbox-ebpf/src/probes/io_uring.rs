//! io_uring: requests a watched process submits are counted, not captured.
//!
//! An io_uring request is carried out by the kernel for the ring (inline at submit,
//! from task work, or by an io-wq worker) without the syscalls the other programs see,
//! so its bytes are missing from the capture. What the kernel does offer is the
//! `io_uring:io_uring_submit_req` tracepoint, fired for every request in the context
//! of the task that submitted it (the SQPOLL thread is a thread of the process too);
//! its record names the opcode but not the buffers, which are only in the kernel's
//! private `struct io_kiocb`. So this counts the requests, and those that move bytes,
//! as the visible measure of what the capture misses.
//!
//! ```text
//! name: io_uring_submit_req
//!     field:void * ctx;   offset:8;   size:8; signed:0;
//!     field:void * req;   offset:16;  size:8; signed:0;
//!     field:unsigned long long user_data; offset:24;  size:8; signed:0;
//!     field:u8 opcode;    offset:32;  size:1; signed:0;
//!     field:unsigned long long flags; offset:40;  size:8; signed:0;
//!     field:bool sq_thread;   offset:48;  size:1; signed:0;
//! ```
//!
//! Not a syscall tracepoint: attaching it puts no process on the syscall slow path,
//! so it serves both capture modes.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};
use openbox_common::*;

use crate::{
    error::count,
    task::{field, is_watched},
};

/// `IORING_OP_*` values (include/uapi/linux/io_uring.h) of the requests that move
/// bytes through a descriptor: READV 1, WRITEV 2, READ_FIXED 4, WRITE_FIXED 5,
/// SENDMSG 9, RECVMSG 10, READ 22, WRITE 23, SEND 26, RECV 27, SPLICE 30, TEE 33,
/// SEND_ZC 47, SENDMSG_ZC 48, READ_MULTISHOT 49.
#[inline(always)]
fn moves_bytes(opcode: u8) -> bool {
    matches!(
        opcode,
        1 | 2 | 4 | 5 | 9 | 10 | 22 | 23 | 26 | 27 | 30 | 33 | 47 | 48 | 49
    )
}

#[tracepoint]
pub fn io_uring_submit_req(ctx: TracePointContext) -> u32 {
    // The plain watched check: no probe-hit counting and no stop of a forked child
    // waiting for TLS probes (the submitter may be the ring's SQPOLL thread).
    if !is_watched((bpf_get_current_pid_tgid() >> 32) as u32) {
        return 0;
    }
    count(CNT_IO_URING_OPS, 1);
    let opcode: u8 = field(&ctx, IO_URING_SUBMIT_REQ_OPCODE);
    if moves_bytes(opcode) {
        count(CNT_IO_URING_DATA_OPS, 1);
    }
    0
}
