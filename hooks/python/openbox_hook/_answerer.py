"""The process that answers held calls while no agent holds them (``_enforce``).

Why a process: a thread of the worker cannot be relied on to answer. A held call made
while its thread holds the GIL — Temporal's own Rust core writes its ``eventfd`` from
the event-loop thread inside a call that holds it — would wait forever for a Python
thread that needs the GIL to answer it. This process has its own interpreter and
imports nothing but the standard library: it is started once per worker (``python -I
-S`` on this file) with one end of a socket pair, and keeps running until the worker
closes it (the worker exited).

Over the socket pair the hook sends one byte with one descriptor each (SCM_RIGHTS):

- ``L`` + a listener: answer its held calls while no agent holds them;
- ``R`` + a listener the agent refused: let every held call of it through, always;
- ``A`` + the hook's connection to an agent: that agent holds the listeners now; stop
  answering them, acknowledged with ``k`` (the hook hands the listeners over only
  then, so exactly one side receives each held call); once the agent closes that
  connection (it stopped or restarted: ``POLLRDHUP``), answer them again.

Answers by the worker's failure policy (``argv[2]``: ``open`` lets held calls through,
``closed`` fails them with EPERM) — except opens for reading, always let through: only
the agent knows a HALT, the one reason to deny them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
import sys

# ioctls on the listener (linux/seccomp.h), struct sizes 0x50 and 0x18.
_NOTIF_RECV = 0xC0502100
_NOTIF_SEND = 0xC0182101
_NOTIF_SIZE = 0x50
_FLAG_CONTINUE = 1
# x86_64: open and openat, and where their flags are in struct seccomp_notif (id u64,
# pid u32, flags u32, then seccomp_data: nr i32, arch u32, ip u64, args u64[6]).
_NOTIF_NR = 16
_NOTIF_OPEN_FLAGS = {2: 16 + 16 + 8, 257: 16 + 16 + 16}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_POLLRDHUP = 0x2000


def reads_only(notif: bytes | bytearray) -> bool:
    """Whether the held call is an open for reading (``open``/``openat`` without a flag
    that may write or create; ``openat2`` keeps its flags in memory: not known here)."""
    (nr,) = struct.unpack_from("<i", notif, _NOTIF_NR)
    at = _NOTIF_OPEN_FLAGS.get(nr)
    if at is None:
        return False
    (flags,) = struct.unpack_from("<Q", notif, at)
    return not flags & _WRITE_FLAGS


def answer(listener: int, allow: bool) -> bool:
    """Receives one held call and answers it; False when the listener is done."""
    notif = bytearray(_NOTIF_SIZE)
    try:
        fcntl.ioctl(listener, _NOTIF_RECV, notif, True)
    except OSError as exc:
        return exc.errno in (errno.ENOENT, errno.EINTR)
    (notif_id,) = struct.unpack_from("<Q", notif)
    if allow or reads_only(notif):
        resp = struct.pack("<QqiI", notif_id, 0, 0, _FLAG_CONTINUE)
    else:
        resp = struct.pack("<QqiI", notif_id, 0, -errno.EPERM, 0)
    try:
        fcntl.ioctl(listener, _NOTIF_SEND, bytearray(resp), True)
    except OSError:
        pass  # the caller is gone
    return True


def serve(ctl: socket.socket, allow: bool) -> None:
    listeners: set[int] = set()
    refused: set[int] = set()
    agent: int | None = None
    while True:
        poller = select.poll()
        poller.register(ctl, select.POLLIN)
        if agent is not None:
            poller.register(agent, _POLLRDHUP)
        for fd in refused if agent is not None else refused | listeners:
            poller.register(fd, select.POLLIN)
        for fd, events in poller.poll():
            if fd == ctl.fileno():
                msg, fds, _, _ = socket.recv_fds(ctl, 1, 1)
                if not msg:
                    return  # the worker is gone
                new = fds[0] if fds else None
                if new is None:
                    continue
                if msg == b"L":
                    listeners.add(new)
                elif msg == b"R":
                    listeners.discard(new)
                    refused.add(new)
                elif msg == b"A":
                    if agent is not None:
                        os.close(agent)
                    agent = new
                    ctl.sendall(b"k")
                else:
                    os.close(new)
            elif fd == agent:
                if events & (_POLLRDHUP | select.POLLHUP | select.POLLERR):
                    os.close(agent)  # the agent is gone: answer for it
                    agent = None
            elif events & select.POLLIN:
                answer(fd, fd in refused or allow)
            elif events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                # Every thread and process of this filter has exited.
                listeners.discard(fd)
                refused.discard(fd)
                os.close(fd)


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])), sys.argv[2] == "open")
