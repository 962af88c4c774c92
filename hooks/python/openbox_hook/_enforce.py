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
them (it stopped or restarts), a small process of the worker's, the answerer
(``_answerer``, one per worker, given a copy of each listener), answers held calls by the
worker's failure policy — let through under ``fail_open``, ``EPERM`` under
``fail_closed``, except opens for reading, always let through: only a HALT, which the
agent knows, denies them — so nothing waits forever; the enforce thread hands them to
the next agent. A process, not a thread: a call held while its thread holds the GIL
(Temporal's own core writes its ``eventfd`` so from the event-loop thread) would wait
forever for a thread of this interpreter.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._agent import AgentLink

from . import _answerer

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
# seccomp_data offsets: nr 0, arch 4, args[i] at 16 + 8 i (low half first).
_NR, _ARCH, _ARG0 = 0, 4, 16


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


class Enforcement(threading.Thread):
    """Hands listeners to the agent; while no agent holds them, the answerer process
    (``_answerer``) answers their held calls."""

    RETRY = 0.1
    """Seconds between attempts to reach an agent while none holds the listeners (a
    refused connect is cheap; a thread registering with a new agent waits for the
    handover)."""
    POLL = 0.05
    """Seconds between looks for a new listener to hand over."""

    def __init__(self, link: AgentLink) -> None:
        super().__init__(name="openbox-hook-enforce", daemon=True)
        self._link = link
        self._incoming: queue.Queue[tuple[int, int, int, threading.Event]] = queue.Queue()
        self._listeners: dict[int, tuple[int, int]] = {}
        """listener fd -> (tid, slot): every listener of this process, kept open."""
        self._refused: set[int] = set()
        """Listeners the agent would not take: the answerer lets every call through."""
        self._handed = threading.Event()
        """Set while the agent on the current connection has been offered every listener."""
        self._answerer: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None

    def wait_handed(self, timeout: float) -> bool:
        """Waits until the agent this process is connected to now has been offered every
        listener: a thread filtered under an earlier agent waits for it before its next
        activity, whose held calls that agent must answer, not the answerer."""
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
            try:
                self._ensure_answerer()
            except OSError as exc:
                _log.warning("openbox hook: cannot start the answerer process: %s", exc)
            sock = self._connect()
            if sock is None:
                self._without_agent(self.RETRY)
                continue
            try:
                # The answerer stops answering before the agent is offered anything.
                self._tell(b"A", sock.fileno())
                assert self._ctl is not None
                if self._ctl.recv(1) != b"k":
                    raise ConnectionError("the answerer process did not acknowledge")
                self._serve(sock)
            except (OSError, ValueError, AssertionError) as exc:
                _log.debug("openbox hook: enforce connection: %s", exc)
            finally:
                self._handed.clear()
                sock.close()

    def _ensure_answerer(self) -> None:
        """Starts the answerer process, again if it died (with every listener)."""
        if self._answerer is not None and self._answerer.poll() is None:
            return
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        ours, theirs = socket.socketpair()
        policy = "closed" if self._link.fail_closed else "open"
        try:
            self._answerer = subprocess.Popen(
                [sys.executable, "-I", "-S", _answerer.__file__, str(theirs.fileno()), policy],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(self._link.governed_timeout)
        self._ctl = ours
        for listener in self._listeners:
            self._tell(b"R" if listener in self._refused else b"L", listener)

    def _tell(self, what: bytes, fd: int) -> None:
        if self._ctl is None:
            raise ConnectionError("no answerer process")
        socket.send_fds(self._ctl, [what], [fd])

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
        pending = [(fd, at) for fd, at in self._listeners.items() if fd not in self._refused]
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
                if not reply.get("ok"):
                    self._refused.add(listener)
                    self._tell(b"R", listener)
                    _log.warning(
                        "openbox-agent refused to hold thread %d's operations: %s",
                        tid,
                        reply.get("error"),
                    )
            self._handed.set()
            pending = self._take_incoming()
            if pending:
                continue
            ready, _, _ = select.select([sock], [], [], self.POLL)
            self._forget_exited()
            pending = self._take_incoming()
            if ready and not sock.recv(4096, socket.MSG_PEEK):
                return  # the agent is gone: the answerer answers until it is back

    def _take_incoming(self) -> list[tuple[int, tuple[int, int]]]:
        out: list[tuple[int, tuple[int, int]]] = []
        while True:
            try:
                tid, slot, listener, done = self._incoming.get_nowait()
            except queue.Empty:
                return out
            self._listeners[listener] = (tid, slot)
            try:
                self._tell(b"L", listener)
            except OSError as exc:
                _log.warning("openbox hook: the answerer process is gone: %s", exc)
            out.append((listener, (tid, slot)))
            # Handed over (or about to be: the agent answers its calls once it has it),
            # and the answerer answers them meanwhile.
            done.set()

    def _without_agent(self, seconds: float) -> None:
        """No agent: takes new listeners (the answerer answers their calls) for
        ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._take_incoming()
            self._forget_exited()
            time.sleep(self.POLL)

    def _forget_exited(self) -> None:
        """Closes this process's copy of the listeners whose threads have all exited."""
        if not self._listeners:
            return
        poller = select.poll()
        for listener in self._listeners:
            poller.register(listener, 0)  # hang-ups are reported whatever is asked
        for fd, events in poller.poll(0):
            if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                del self._listeners[fd]
                self._refused.discard(fd)
                os.close(fd)


def _read_line(sock: socket.socket) -> bytes:
    buffer = bytearray()
    while (end := buffer.find(b"\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("openbox-agent closed the connection")
        buffer += chunk
    return bytes(buffer[:end])
