//! Socket syscalls: the data calls (read/write and friends, which also serve tracked
//! files), connect, accept, socket, socketpair and close.
//!
//! Every `syscalls:*` tracepoint reads its arguments as 8-byte slots from offset 16
//! and `ret` at offset 16 (`task::arg`, `task::ret`); for example, on the kernel this
//! was written on (6.18):
//!
//! ```text
//! name: sys_enter_read
//! format:
//!     field:unsigned short common_type;   offset:0;   size:2; signed:0;
//!     field:unsigned char common_flags;   offset:2;   size:1; signed:0;
//!     field:unsigned char common_preempt_count;   offset:3;   size:1; signed:0;
//!     field:int common_pid;   offset:4;   size:4; signed:1;
//!
//!     field:int __syscall_nr; offset:8;   size:4; signed:1;
//!     field:unsigned int fd;  offset:16;  size:8; signed:0;
//!     field:char * buf;   offset:24;  size:8; signed:0;
//!     field:size_t count; offset:32;  size:8; signed:0;
//!
//! name: sys_exit_read
//! format:
//!     (common fields as above)
//!     field:int __syscall_nr; offset:8;   size:4; signed:1;
//!     field:long ret; offset:16;  size:8; signed:1;
//! ```
//!
//! The agent checks every slot a program reads (`capture/tracefs.rs`).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};
use openbox_common::*;

use super::{stash, take_args, track_fd};
use crate::{
    emit::{cpu_scratch, emit_no_payload, emit_payload, submit, DataCall, Payload},
    error::{finish, Loss},
    maps::{SyscallArgs, ARGS, FDS, FD_FLAGS, SSL_ARGS},
    task::{arg, header, ret, watched},
};

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// errno of a non-blocking connect still under way (aya-ebpf has no errno values).
const EINPROGRESS: i64 = 115;

// ---- data calls ----

/// Entry of read/write/readv/writev/recvfrom/sendto/recvmsg/sendmsg: stash the
/// arguments when the process is watched and the descriptor tracked.
#[inline(always)]
fn try_data_enter(ctx: &TracePointContext, source: u32) -> Result<(), Loss> {
    let Some((pid_tgid, tgid)) = watched() else {
        return Ok(());
    };
    let fd = arg(ctx, 0) as i32;
    let key = fd_key(tgid, fd);
    // Not a loss: an untracked descriptor is one this process had no socket or file
    // event for (a pipe, a tty), which the agent does not follow.
    let Some(state) = (unsafe { FDS.get(key) }).copied() else {
        return Ok(());
    };
    // No entry is the common case: the agent set no flags on this descriptor.
    let flags = unsafe {
        FD_FLAGS.get(FdFlagKey {
            fd_key: key,
            gen: state.gen,
        })
    }
    .copied()
    .unwrap_or(0);
    if flags & FD_QUIET != 0 {
        // The agent asked for nothing but the close.
        return Ok(());
    }
    stash(
        pid_tgid,
        SyscallArgs::Data {
            source,
            fd,
            fd_kind: state.kind,
            fd_flags: flags,
            buf: arg(ctx, 1),
            count: arg(ctx, 2),
        },
    )
}

#[inline(always)]
fn try_data_exit(ctx: &TracePointContext) -> Result<(), Loss> {
    let pid_tgid = bpf_get_current_pid_tgid();
    // Nothing kept: not watched or not tracked at entry (see `take_args`).
    let Some(args) = (unsafe { ARGS.get(pid_tgid) }).copied() else {
        return Ok(());
    };
    let _ = ARGS.remove(pid_tgid);
    // Another call's arguments: its entry ran before the programs were attached.
    let SyscallArgs::Data {
        source,
        fd,
        fd_kind,
        fd_flags,
        buf,
        count,
    } = args
    else {
        return Ok(());
    };
    let n = ret(ctx);
    if n <= 0 {
        // The call failed or moved nothing: nothing to report.
        return Ok(());
    }
    let n = n as u64;
    let direction = match source {
        SRC_WRITE | SRC_WRITEV | SRC_SENDTO | SRC_SENDMSG => DIR_EGRESS,
        _ => DIR_INGRESS,
    };
    if fd_kind == FD_FILE {
        return submit(FileIoEvent {
            hdr: header(EV_FILE_IO, 0, pid_tgid),
            fd,
            source,
            direction,
            _pad: 0,
            bytes: n,
        });
    }
    let call = DataCall {
        kind: EV_SOCK_DATA,
        pid_tgid,
        fd,
        source,
        direction,
        ssl: 0,
        len: n,
    };
    // A libssl call active on this thread: these are its ciphertext bytes.
    if let Some(ssl) = unsafe { SSL_ARGS.get(pid_tgid) } {
        return emit_no_payload(
            cpu_scratch()?,
            DataCall {
                ssl: ssl.ssl,
                ..call
            },
            FLAG_IN_SSL,
        );
    }
    if fd_flags & FD_NO_PAYLOAD != 0 {
        return emit_no_payload(cpu_scratch()?, call, 0);
    }
    let payload = match source {
        SRC_READV | SRC_WRITEV => Payload::Iovecs { array: buf, count },
        SRC_RECVMSG | SRC_SENDMSG => {
            // struct user_msghdr: msg_iov at offset 16, msg_iovlen at 24.
            let array = unsafe { bpf_probe_read_user((buf + 16) as *const u64) }
                .map_err(|_| Loss::UserRead)?;
            let count = unsafe { bpf_probe_read_user((buf + 24) as *const u64) }
                .map_err(|_| Loss::UserRead)?;
            Payload::Iovecs { array, count }
        }
        _ => Payload::Buffer(buf),
    };
    emit_payload(cpu_scratch()?, call, payload)
}

macro_rules! data_syscall {
    ($enter:ident, $exit:ident, $src:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            finish(try_data_enter(&ctx, $src))
        }
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            finish(try_data_exit(&ctx))
        }
    };
}

data_syscall!(sys_enter_read, sys_exit_read, SRC_READ);
data_syscall!(sys_enter_write, sys_exit_write, SRC_WRITE);
data_syscall!(sys_enter_readv, sys_exit_readv, SRC_READV);
data_syscall!(sys_enter_writev, sys_exit_writev, SRC_WRITEV);
data_syscall!(sys_enter_recvfrom, sys_exit_recvfrom, SRC_RECVFROM);
data_syscall!(sys_enter_sendto, sys_exit_sendto, SRC_SENDTO);
data_syscall!(sys_enter_recvmsg, sys_exit_recvmsg, SRC_RECVMSG);
data_syscall!(sys_enter_sendmsg, sys_exit_sendmsg, SRC_SENDMSG);

// ---- connections ----

/// Reads a sockaddr from user memory. An unreadable one is reported as family 0: the
/// connection is still tracked, its peer unknown.
#[inline(always)]
fn read_sockaddr(uaddr: u64) -> SockAddr {
    let mut out = SockAddr::default();
    if uaddr == 0 {
        // accept without an address buffer: nothing to read, nothing lost.
        return out;
    }
    // sockaddr_in6 is 28 bytes: family(2) port(2) flowinfo(4) addr(16) scope(4).
    let raw: [u8; 28] = match unsafe { bpf_probe_read_user(uaddr as *const [u8; 28]) } {
        Ok(r) => r,
        Err(_) => {
            // A sockaddr_in is only 16 bytes and may end a page: try the short form.
            match unsafe { bpf_probe_read_user(uaddr as *const [u8; 16]) } {
                Ok(r) => {
                    let mut full = [0u8; 28];
                    full[..16].copy_from_slice(&r);
                    full
                }
                Err(_) => {
                    Loss::UserRead.count();
                    return out;
                }
            }
        }
    };
    out.family = u16::from_ne_bytes([raw[0], raw[1]]);
    out.port = u16::from_be_bytes([raw[2], raw[3]]);
    match out.family {
        AF_INET => out.addr[..4].copy_from_slice(&raw[4..8]),
        AF_INET6 => out.addr.copy_from_slice(&raw[8..24]),
        AF_UNIX => out.addr.copy_from_slice(&raw[2..18]),
        _ => {}
    }
    out
}

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    finish(try_connect_enter(&ctx))
}

#[inline(always)]
fn try_connect_enter(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((pid_tgid, _)) = watched() else {
        return Ok(());
    };
    let peer = read_sockaddr(arg(ctx, 1));
    stash(
        pid_tgid,
        SyscallArgs::Connect {
            fd: arg(ctx, 0) as i32,
            peer,
        },
    )
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    finish(try_connect_exit(&ctx))
}

#[inline(always)]
fn try_connect_exit(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((pid_tgid, SyscallArgs::Connect { fd, peer })) = take_args() else {
        return Ok(());
    };
    let r = ret(ctx);
    if r != 0 && r != -EINPROGRESS {
        // The connection failed: there is none to track.
        return Ok(());
    }
    let hdr = header(EV_CONNECT, 0, pid_tgid);
    track_fd((pid_tgid >> 32) as u32, fd, FD_SOCKET, hdr.ts_ns);
    submit(ConnEvent {
        hdr,
        fd,
        ret: r as i32,
        peer,
        sock_type: 0,
        _pad: 0,
    })
}

#[inline(always)]
fn try_accept_enter(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((pid_tgid, _)) = watched() else {
        return Ok(());
    };
    stash(
        pid_tgid,
        SyscallArgs::Accept {
            listener: arg(ctx, 0) as i32,
            peer_addr: arg(ctx, 1),
        },
    )
}

#[inline(always)]
fn try_accept_exit(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((
        pid_tgid,
        SyscallArgs::Accept {
            listener,
            peer_addr,
        },
    )) = take_args()
    else {
        return Ok(());
    };
    let r = ret(ctx);
    if r < 0 {
        // No connection accepted.
        return Ok(());
    }
    let fd = r as i32;
    let hdr = header(EV_ACCEPT, 0, pid_tgid);
    track_fd((pid_tgid >> 32) as u32, fd, FD_SOCKET, hdr.ts_ns);
    submit(ConnEvent {
        hdr,
        fd,
        ret: listener,
        peer: read_sockaddr(peer_addr),
        sock_type: 0,
        _pad: 0,
    })
}

#[tracepoint]
pub fn sys_enter_accept(ctx: TracePointContext) -> u32 {
    finish(try_accept_enter(&ctx))
}
#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    finish(try_accept_exit(&ctx))
}
#[tracepoint]
pub fn sys_enter_accept4(ctx: TracePointContext) -> u32 {
    finish(try_accept_enter(&ctx))
}
#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    finish(try_accept_exit(&ctx))
}

#[tracepoint]
pub fn sys_enter_socket(ctx: TracePointContext) -> u32 {
    finish(try_socket_enter(&ctx))
}

#[inline(always)]
fn try_socket_enter(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((pid_tgid, _)) = watched() else {
        return Ok(());
    };
    stash(
        pid_tgid,
        SyscallArgs::Socket {
            family: arg(ctx, 0) as u16,
            sock_type: arg(ctx, 1),
        },
    )
}

#[tracepoint]
pub fn sys_exit_socket(ctx: TracePointContext) -> u32 {
    finish(try_socket_exit(&ctx))
}

#[inline(always)]
fn try_socket_exit(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((pid_tgid, SyscallArgs::Socket { family, sock_type })) = take_args() else {
        return Ok(());
    };
    let r = ret(ctx);
    if r < 0 {
        // No socket created.
        return Ok(());
    }
    let hdr = header(EV_SOCKET, 0, pid_tgid);
    track_fd((pid_tgid >> 32) as u32, r as i32, FD_SOCKET, hdr.ts_ns);
    submit(ConnEvent {
        hdr,
        fd: r as i32,
        ret: -1,
        peer: SockAddr {
            family,
            ..SockAddr::default()
        },
        sock_type: (sock_type & 0xf) as u32,
        _pad: 0,
    })
}

#[tracepoint]
pub fn sys_enter_socketpair(ctx: TracePointContext) -> u32 {
    finish(try_socketpair_enter(&ctx))
}

#[inline(always)]
fn try_socketpair_enter(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((pid_tgid, _)) = watched() else {
        return Ok(());
    };
    stash(
        pid_tgid,
        SyscallArgs::SocketPair {
            family: arg(ctx, 0) as u16,
            sock_type: arg(ctx, 1),
            fds: arg(ctx, 3),
        },
    )
}

#[tracepoint]
pub fn sys_exit_socketpair(ctx: TracePointContext) -> u32 {
    finish(try_socketpair_exit(&ctx))
}

#[inline(always)]
fn try_socketpair_exit(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((
        pid_tgid,
        SyscallArgs::SocketPair {
            family,
            sock_type,
            fds,
        },
    )) = take_args()
    else {
        return Ok(());
    };
    if ret(ctx) != 0 {
        // No sockets created.
        return Ok(());
    }
    let fds = unsafe { bpf_probe_read_user(fds as *const [i32; 2]) }.map_err(|_| Loss::UserRead)?;
    let tgid = (pid_tgid >> 32) as u32;
    let hdr = header(EV_SOCKET, 0, pid_tgid);
    track_fd(tgid, fds[0], FD_SOCKET, hdr.ts_ns);
    track_fd(tgid, fds[1], FD_SOCKET, hdr.ts_ns);
    submit(ConnEvent {
        hdr,
        fd: fds[0],
        ret: fds[1],
        peer: SockAddr {
            family,
            ..SockAddr::default()
        },
        sock_type: (sock_type & 0xf) as u32,
        _pad: 0,
    })
}

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    finish(try_close(&ctx))
}

#[inline(always)]
fn try_close(ctx: &TracePointContext) -> Result<(), Loss> {
    let Some((pid_tgid, tgid)) = watched() else {
        return Ok(());
    };
    let fd = arg(ctx, 0) as i32;
    let key = fd_key(tgid, fd);
    // Not tracked: not a descriptor the agent follows.
    let Some(state) = (unsafe { FDS.get(key) }).copied() else {
        return Ok(());
    };
    let _ = FDS.remove(key);
    submit(CloseEvent {
        hdr: header(EV_CLOSE, 0, pid_tgid),
        fd,
        fd_kind: state.kind,
    })
}
