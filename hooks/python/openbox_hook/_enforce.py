"""Holding a thread's operations until the agent answers (``openbox-agent run --enforce``).

When the agent says so (the ``thread`` reply's ``enforce``), a thread about to run its
first governed activity — an executor thread for a sync activity, the event-loop thread
for an async one — installs a seccomp filter on itself only (no TSYNC: Temporal's own
threads are untouched) that turns these calls into user notifications: ``connect``,
``sendto``, ``sendmsg``, ``sendmmsg``; ``write`` and ``writev`` on descriptors above 2;
``open``, ``openat``, ``openat2`` and ``creat``. The kernel parks the calling thread
until the listener's holder answers. Opens for reading are held too, only so that a
halted activity cannot open anything: the agent lets them through at once otherwise. Threads and
processes the thread starts afterwards inherit the filter (a ``curl`` subprocess too,
across ``exec``).

On the event-loop thread the agent attributes a held call by the thread's slot, which the
step driver (``_driver``) sets for exactly the duration of each step of an activity's
task: the call is that step's. A held call stops the whole loop until the agent answers
(a Core round trip for a new operation); calls made between steps (slot 0) are let
through at once.

The thread cannot hand the listener over itself (its own send would wait for an answer
nobody gives yet), so it gives it to the ``openbox-hook-enforce`` thread and waits: that
thread (unfiltered) sends ``enforce`` on a connection of its own, and the agent takes the
descriptor with ``pidfd_getfd``. The hook keeps its own copy of every listener: were
every copy closed, each filtered call would fail with ``ENOSYS``. While no agent holds
them (it stopped or restarts), the enforce thread answers held calls itself by the
worker's failure policy — let through under ``fail_open``, ``EPERM`` under
``fail_closed``, except opens for reading, always let through: only a HALT, which the
agent knows, denies them — so nothing waits forever, and hands them to the next agent.
Limit: a call made while holding the GIL (a C extension that does not release it) would
wait for that answer forever while no agent runs; CPython releases it around its I/O.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._agent import AgentLink

_log = logging.getLogger("openbox.hook")

# x86_64 system call numbers.
_SYS = {
    "write": 1,
    "open": 2,
    "writev": 20,
    "connect": 42,
    "sendto": 44,
    "sendmsg": 46,
    "creat": 85,
    "openat": 257,
    "sendmmsg": 307,
    "openat2": 437,
}
_SYS_SECCOMP = 317
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
_RET_ALLOW = 0x7FFF0000
_RET_USER_NOTIF = 0x7FC00000
_RET_ERRNO = 0x00050000
_PR_SET_NO_NEW_PRIVS = 38
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# seccomp_data offsets: nr 0, arch 4, args[i] at 16 + 8 i (low half first).
_NR, _ARCH, _ARG0 = 0, 4, 16
# In struct seccomp_notif (id u64, pid u32, flags u32, then seccomp_data): the number
# and the argument holding an open's flags, by call.
_NOTIF_NR = 16
_NOTIF_OPEN_FLAGS = {_SYS["open"]: 16 + 16 + 8, _SYS["openat"]: 16 + 16 + 16}

# ioctls on the listener (linux/seccomp.h), struct sizes 0x50 and 0x18.
_NOTIF_RECV = 0xC0502100
_NOTIF_SEND = 0xC0182101
_NOTIF_SIZE = 0x50
_FLAG_CONTINUE = 1

_LD, _JEQ, _JGT, _JGE, _JSET, _RET = 0x20, 0x15, 0x25, 0x35, 0x45, 0x06


def _program() -> bytes:
    """The classic BPF filter, assembled with labels (every jump is forward)."""
    code: list[tuple[int, str | None, str | None, int]] = []
    labels: dict[str, int] = {}

    def op(c: int, k: int, jt: str | None = None, jf: str | None = None) -> None:
        code.append((c, jt, jf, k))

    def label(name: str) -> None:
        labels[name] = len(code)

    op(_LD, _ARCH)
    op(_JEQ, _AUDIT_ARCH_X86_64, None, "deny")
    op(_LD, _NR)
    op(_JGE, _X32_SYSCALL_BIT, "deny", None)
    for name, target in (
        ("write", "fd"),
        ("writev", "fd"),
        ("connect", "notify"),
        ("sendto", "notify"),
        ("sendmsg", "notify"),
        ("sendmmsg", "notify"),
        ("creat", "notify"),
        ("openat2", "notify"),
        ("openat", "notify"),
        ("open", "notify"),
    ):
        op(_JEQ, _SYS[name], target, None)
    op(_RET, _RET_ALLOW)
    label("fd")
    op(_LD, _ARG0)
    op(_JGT, 2, "notify", "allow")
    label("notify")
    op(_RET, _RET_USER_NOTIF)
    label("allow")
    op(_RET, _RET_ALLOW)
    label("deny")
    op(_RET, _RET_ERRNO | errno.EPERM)

    out = bytearray()
    for i, (c, jt, jf, k) in enumerate(code):
        t = labels[jt] - i - 1 if jt else 0
        f = labels[jf] - i - 1 if jf else 0
        out += struct.pack("<HBBI", c, t, f, k)
    return bytes(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc = ctypes.CDLL(None, use_errno=True)


def available() -> bool:
    """Whether this process can install the filter here (x86_64 Linux)."""
    return os.uname().machine == "x86_64" and hasattr(_libc, "syscall")


def install() -> int:
    """Installs the filter on the calling thread; returns the listener descriptor.

    Without CAP_SYS_ADMIN the kernel requires no_new_privs, which is then set on this
    thread (and so on what it starts: a setuid program it runs gains no privilege)."""
    program = _program()
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    for attempt in (0, 1):
        fd = _libc.syscall(
            _SYS_SECCOMP,
            _SECCOMP_SET_MODE_FILTER,
            _SECCOMP_FILTER_FLAG_NEW_LISTENER,
            ctypes.byref(prog),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err != errno.EACCES or attempt:
            raise OSError(err, f"seccomp filter: {os.strerror(err)}")
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"no_new_privs: {os.strerror(err)}")
    raise AssertionError("unreachable")


def _answer(listener: int, allow: bool) -> bool:
    """Receives one held call and answers it; False when the listener is done."""
    notif = bytearray(_NOTIF_SIZE)
    try:
        fcntl.ioctl(listener, _NOTIF_RECV, notif, True)
    except OSError as exc:
        return exc.errno in (errno.ENOENT, errno.EINTR)
    (notif_id,) = struct.unpack_from("<Q", notif)
    if allow or _reads_only(notif):
        resp = struct.pack("<QqiI", notif_id, 0, 0, _FLAG_CONTINUE)
    else:
        resp = struct.pack("<QqiI", notif_id, 0, -errno.EPERM, 0)
    try:
        fcntl.ioctl(listener, _NOTIF_SEND, bytearray(resp), True)
    except OSError:
        pass  # the caller is gone
    return True


def _reads_only(notif: bytearray) -> bool:
    """Whether the held call is an open for reading (``open``/``openat`` without a flag
    that may write or create; ``openat2`` keeps its flags in memory: not known here)."""
    (nr,) = struct.unpack_from("<i", notif, _NOTIF_NR)
    at = _NOTIF_OPEN_FLAGS.get(nr)
    if at is None:
        return False
    (flags,) = struct.unpack_from("<Q", notif, at)
    return not flags & _WRITE_FLAGS


class Enforcement(threading.Thread):
    """Hands listeners to the agent, and answers held calls while no agent holds them."""

    RETRY = 0.1
    """Seconds between attempts to reach an agent while answering for it (a refused
    connect is cheap; a thread registering with a new agent waits for the handover)."""
    POLL = 0.05
    """Seconds between looks for a new listener to hand over."""

    def __init__(self, link: AgentLink) -> None:
        super().__init__(name="openbox-hook-enforce", daemon=True)
        self._link = link
        self._incoming: queue.Queue[tuple[int, int, int, threading.Event]] = queue.Queue()
        self._listeners: dict[int, tuple[int, int]] = {}
        """listener fd -> (tid, slot): every listener of this process, kept open."""
        self._refused: set[int] = set()
        """Listeners the agent would not take: answered here, letting every call through."""
        self._handed = threading.Event()
        """Set while the agent on the current connection has been offered every listener."""

    def wait_handed(self, timeout: float) -> bool:
        """Waits until the agent this process is connected to now has been offered every
        listener: a thread filtered under an earlier agent waits for it before its next
        activity, whose held calls that agent must answer, not this thread alone."""
        return self._handed.wait(timeout)

    def hand_over(self, tid: int, slot: int, listener: int, timeout: float) -> None:
        """Gives a thread's listener to the agent; returns once someone answers it."""
        done = threading.Event()
        # Only futex calls from here: this thread's writes are held already, and nobody
        # answers them until the listener is handed over (so no pipe to wake that thread:
        # it looks for new listeners every POLL seconds).
        self._incoming.put((tid, slot, listener, done))
        done.wait(timeout)

    def run(self) -> None:
        while True:
            sock = self._connect()
            if sock is None:
                self._answer_alone(self.RETRY)
                continue
            try:
                self._serve(sock)
            except (OSError, ValueError) as exc:
                _log.debug("openbox hook: enforce connection: %s", exc)
            finally:
                self._handed.clear()
                sock.close()

    def _connect(self) -> socket.socket | None:
        from ._agent import _decode, _encode

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self._link.timeout)
            sock.connect(self._link.socket_path)
            sock.sendall(_encode({"id": 1, "op": "hello", **self._link.hello()}))
            reply = _decode(_read_line(sock))
            if not reply.get("ok"):
                raise ConnectionRefusedError(f"hello refused: {reply.get('error')}")
        except (OSError, ValueError) as exc:
            _log.debug("openbox hook: enforce connection to %s: %s", self._link.socket_path, exc)
            sock.close()
            return None
        return sock

    def _serve(self, sock: socket.socket) -> None:
        """Hands every listener to the agent on ``sock``, then new ones as they come,
        until the agent goes."""
        from ._agent import _decode, _encode

        next_id = 2
        pending = list(self._listeners.items())
        while True:
            for listener, (tid, slot) in pending:
                sock.settimeout(self._link.governed_timeout)
                sock.sendall(
                    _encode(
                        {"id": next_id, "op": "enforce", "tid": tid, "slot": slot, "fd": listener}
                    )
                )
                next_id += 1
                reply = _decode(_read_line(sock))
                if reply.get("ok"):
                    self._refused.discard(listener)
                else:
                    self._refused.add(listener)
                    _log.warning(
                        "openbox-agent refused to hold thread %d's operations: %s",
                        tid,
                        reply.get("error"),
                    )
            self._handed.set()
            pending = self._take_incoming()
            if pending:
                continue
            watched: list[socket.socket | int] = [sock, *self._refused]
            ready, _, _ = select.select(watched, [], [], self.POLL)
            for listener in self._refused.intersection(ready):
                if not _answer(listener, True):
                    self._refused.discard(listener)
            pending = self._take_incoming()
            if sock in ready and not sock.recv(4096, socket.MSG_PEEK):
                return  # the agent is gone: the caller answers alone until it is back

    def _take_incoming(self) -> list[tuple[int, tuple[int, int]]]:
        out: list[tuple[int, tuple[int, int]]] = []
        while True:
            try:
                tid, slot, listener, done = self._incoming.get_nowait()
            except queue.Empty:
                return out
            self._listeners[listener] = (tid, slot)
            out.append((listener, (tid, slot)))
            # Handed over (or about to be: the agent answers its calls once it has it).
            done.set()

    def _answer_alone(self, seconds: float) -> None:
        """No agent: answers held calls by the failure policy for ``seconds``."""
        allow = not self._link.fail_closed
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._take_incoming()
            poller = select.poll()
            for listener in self._listeners:
                poller.register(listener, select.POLLIN)
            for fd, events in poller.poll(min(left, self.POLL) * 1000):
                if events & select.POLLIN:
                    _answer(fd, allow)
                elif events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    # Every thread and process of this filter has exited.
                    del self._listeners[fd]
                    os.close(fd)


def _read_line(sock: socket.socket) -> bytes:
    buffer = bytearray()
    while (end := buffer.find(b"\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("openbox-agent closed the connection")
        buffer += chunk
    return bytes(buffer[:end])
