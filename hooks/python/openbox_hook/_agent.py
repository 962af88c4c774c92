"""The hook's side of the hook <-> agent protocol, and which threads the agent knows.

Wire format: a Unix stream socket carrying one compact JSON object per line. Requests are
``{"id": <int unique per connection>, "op": <str>, ...}``; replies are ``{"id": <same>,
"ok": true, ...}`` or ``{"id": <same>, "ok": false, "error": <str>}`` and may arrive out
of order. Every connection starts with ``hello`` (who we are, where the slot table is,
the governance settings). Every request and reply is described by the JSON Schema
``hooks/protocol/hook-agent.schema.json``, which this package's tests and the agent's
tests check real messages against.

Two kinds of connection, because two kinds of caller:

- one asyncio connection per event loop (``_Channel``) for the interceptor's
  ``activity_start``/``activity_end`` and the loop thread's own registration: activities
  on the loop must never block it (the workflow-event sender, ``_events``, has a loop of
  its own and so a connection of its own);
- one blocking connection (``_BlockingConnection``) for executor threads, which must
  register themselves synchronously before they run activity code.

``activity_start``/``activity_end`` (and ``workflow_event``) are answered once the agent
has governed them, which may take up to the governance timeout: they wait
``governance_timeout + 5`` seconds (``GOVERNED_TIMEOUT`` without that setting) instead of
the hook's short per-call timeout.

Every failure here means "no agent" for the call at hand: the caller gets ``None``. Under
fail_open the activity then runs as if the hook were not installed; under fail_closed
(``governance_policy`` in the config) it fails with ``GovernanceHalt``
(``AgentLink.unreachable_error``): without the agent nothing governs it. The first failure
in the process logs one warning; reconnecting is tried again, silently, at the next call
when no agent listens (no socket, or a connection refused at once: the agent is
restarting, and the next activity must find the new one) and otherwise at most every
``RETRY_INTERVAL`` seconds (an agent that does not answer costs the timeout).

Thread registrations are valid for one *epoch*: any lost connection starts a new one (the
agent may have restarted and forgotten every thread), and threads register again before
their next activity.

A third, idle connection (``_Presence``, a daemon thread) says ``hello`` as soon as the
hook is created — when the worker is built, before it opens its connection pools — and
holds it: the agent watches a process from its hello on, and a connection already
carrying traffic when watching begins is seen from its middle. When that connection
breaks (the agent stopped or restarted), the thread connects again at once and then with
a backoff of up to ``PRESENCE_MAX_BACKOFF`` seconds, so an idle worker is watched again
by a restarted agent without waiting for its next activity.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import threading
import time
import weakref
from typing import Any

import temporalio.exceptions

from . import _enforce, _slots
from ._version import __version__

DEFAULT_SOCKET = "/run/openbox/agent.sock"
SOCKET_ENV = "OPENBOX_AGENT_SOCKET"
POLICY_ENV = "OPENBOX_GOVERNANCE_POLICY"
"""The worker's failure policy when neither ``create_openbox_worker`` nor the hook's
``config`` sets ``governance_policy``."""
GOVERNANCE_POLICIES = ("fail_open", "fail_closed")
CONVENTIONS_ENV = "OPENBOX_SDK_CONVENTIONS"
"""Which SDK's conventions the worker follows when neither
``OpenBoxHook(sdk_conventions=...)`` nor the config says: ``1.0`` or ``2.0``."""
SDK_CONVENTIONS = ("1.0", "2.0")
HOOK = f"openbox-hook/{__version__}"
RETRY_INTERVAL = 5.0
"""Seconds between connection attempts once one failed slowly (see ``_retry_after``)."""


def _retry_after(exc: BaseException) -> float:
    """Seconds before connecting again after ``exc``: none when nothing listens (a
    missing socket or a refused connect fail at once), ``RETRY_INTERVAL`` otherwise."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        return 0.0
    return RETRY_INTERVAL


PRESENCE_FIRST_BACKOFF = 0.05
PRESENCE_MAX_BACKOFF = 2.0
"""Seconds between the presence connection's attempts: doubling from the first to the
most, so a restarted agent is found within about this long."""
GOVERNED_TIMEOUT = 35.0
"""Seconds a governed call waits when the config has no ``governance_timeout``: the SDK's
default governance timeout (30 s) plus the margin the agent needs to answer after it."""
GOVERNED_MARGIN = 5.0
MAX_LINE = 16 << 20
"""Longest reply line accepted, and the most unsent data tolerated on a connection: an
agent that stops reading gets its connection closed rather than the worker's memory."""

_log = logging.getLogger("openbox.hook")
_warn_lock = threading.Lock()
_warned = False


def _warn_unreachable(socket_path: str, reason: object, consequence: str) -> None:
    """One warning per process, whichever connection fails first; the rest go to debug."""
    global _warned
    _log.debug("openbox-agent call failed at %s: %s", socket_path, reason)
    with _warn_lock:
        if _warned:
            return
        _warned = True
    _log.warning(
        "openbox-agent not reachable at %s (%s): %s",
        socket_path,
        reason,
        consequence,
    )


_links: weakref.WeakSet[AgentLink] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _warn_lock
    _warn_lock = threading.Lock()
    for link in list(_links):
        link._start_afresh()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _encode(message: dict[str, Any]) -> bytes:
    # ASCII-only JSON: no raw newline can appear inside, and no encoding can fail.
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _decode(line: bytes | bytearray) -> dict[str, Any]:
    reply = json.loads(line)
    if not isinstance(reply, dict):
        raise ValueError(f"reply is not a JSON object: {line[:200]!r}")
    return reply


class _ThreadState(threading.local):
    """One thread's registration with one agent link (class attributes are the defaults)."""

    slot: int | None = None
    epoch = -1
    """Link epoch the registration was made in; -1 = never registered."""
    refused = False
    """The agent said no, or no slot was left: this thread never writes its slot."""
    pending: asyncio.Future | None = None
    """Loop threads: the registration in flight, so concurrent activities send one."""
    enforce = False
    """The agent holds this thread's operations until Core answers (``_enforce``)."""
    filtered = False
    """The thread's seccomp filter is installed (for the thread's life, across agents)."""


class AgentLink:
    """Everything one hook knows about its agent: connections, epoch, registered threads."""

    def __init__(
        self, socket_path: str, timeout: float, config: dict[str, Any], *, helper: bool = False
    ) -> None:
        self.socket_path = socket_path
        self.helper = helper
        """A process pool's worker, not a worker: it only registers threads, which
        publish the tokens of the worker it descends from (``_propagate.InProcess``)."""
        self.timeout = timeout
        self.config = config
        self.governed_timeout = max(timeout, _governed_timeout(config))
        policy = config.get("governance_policy", config.get("on_api_error"))
        self.fail_closed = policy == "fail_closed"
        self.last_failure: object = "not connected yet"
        """Why the agent was last found unreachable (for the fail_closed error)."""
        self.epoch = 0
        self._start_afresh()
        _links.add(self)

    def _start_afresh(self) -> None:
        """No connection, no registered thread (also what a forked child inherits).

        A child must not speak on its parent's connections (the agent knows the peer by
        its credentials), its threads are not its parent's, and a lock some other
        thread of the parent held at the fork would never be released.
        """
        self._epoch_lock = threading.Lock()
        self._threads = _ThreadState()
        self._blocking = _BlockingConnection(self)
        self._channels: dict[asyncio.AbstractEventLoop, _Channel] = {}
        # A forked child has none: it says hello when its first activity connects.
        self._presence: _Presence | None = None
        self._enforcement: _enforce.Enforcement | None = None

    def start_presence(self) -> None:
        """Say hello now, and again whenever the agent comes back (see the module's note)."""
        if self._presence is None:
            self._presence = _Presence(self)
            self._presence.start()

    def hello(self) -> dict[str, Any]:
        # The pid is taken per connection: a forked child connects as itself.
        hello = {
            "pid": os.getpid(),
            "hook": HOOK,
            "slots_addr": _slots.address,
            "slots": _slots.SLOTS,
            "config": self.config,
        }
        if self.helper:
            hello["helper"] = True
        return hello

    def close(self) -> None:
        """Close the presence and blocking connections and the calling event loop's."""
        if self._presence is not None:
            self._presence.close()
            self._presence = None
        self._blocking.close()
        try:
            channel = self._channels.pop(asyncio.get_running_loop(), None)
        except RuntimeError:
            channel = None  # not on an event loop: only the blocking connection is ours
        if channel is not None:
            channel.close()
        self.lost()  # a thread registered on a closed connection registers again

    def lost(self) -> None:
        """A connection broke: registrations made so far may be gone with the agent."""
        with self._epoch_lock:
            self.epoch += 1

    def failed(self, reason: object) -> None:
        self.last_failure = reason
        consequence = (
            "activities fail with GovernanceHalt (governance_policy fail_closed)"
            if self.fail_closed
            else "activities run without capture"
        )
        _warn_unreachable(self.socket_path, reason, consequence)

    def unreachable_error(self, what: str) -> temporalio.exceptions.ApplicationError:
        """fail_closed without an agent: the error the activity fails with (non-retryable,
        as the agent's own fail_closed HALT is). ``what`` says what it costs."""
        return temporalio.exceptions.ApplicationError(
            f"openbox-agent unreachable at {self.socket_path} ({self.last_failure}); "
            f"governance_policy is fail_closed, so {what}",
            type="GovernanceHalt",
            non_retryable=True,
        )

    async def call(self, op: str, /, **fields: Any) -> dict[str, Any] | None:
        """One request on this event loop's connection; None when there is no agent."""
        return await self._channel().call(op, fields, self.timeout)

    async def call_governed(self, op: str, /, **fields: Any) -> dict[str, Any] | None:
        """``call`` for a request the agent answers after governing it (longer timeout)."""
        return await self._channel().call(op, fields, self.governed_timeout)

    def call_blocking(self, op: str, /, **fields: Any) -> dict[str, Any] | None:
        """One request from a thread that is not running an event loop (a sync activity's
        executor thread), on the blocking connection; None when there is no agent. Waits
        up to the governed timeout (the agent may be asking Core)."""
        return self._blocking.call(op, timeout=self.governed_timeout, **fields)

    async def post(self, op: str, fields: dict[str, Any]) -> asyncio.Future | None:
        """Write one request on this event loop's connection without waiting for its reply.

        Returns the future of the reply (it fails with ``OSError`` when the connection is
        lost or the governed timeout passes), or None when there is no agent. Requests
        posted one after the other from one task are written in that order.
        """
        return await self._channel().post(op, fields, self.governed_timeout)

    def _channel(self) -> _Channel:
        loop = asyncio.get_running_loop()
        channel = self._channels.get(loop)
        if channel is None:
            # A new loop: forget the channels of loops that are closed (their sockets
            # close when the transports are collected).
            for closed in [other for other in self._channels if other.is_closed()]:
                del self._channels[closed]
            channel = self._channels[loop] = _Channel(self, loop)
        return channel

    def current_slot(self) -> int | None:
        """The calling thread's slot if its registration is valid now; never does I/O."""
        state = self._threads
        return state.slot if state.epoch == self.epoch else None

    def register_thread(self) -> int | None:
        """Slot of the calling (executor) thread, registering it first if needed (blocks)."""
        slot = self.current_slot()
        if slot is not None:
            return slot
        state = self._threads
        if state.refused or (slot := self._allocate(state)) is None:
            return None
        epoch = self.epoch
        reply = self._blocking.call("thread", tid=threading.get_native_id(), slot=slot)
        return self._registered(state, slot, epoch, reply)

    async def register_loop_thread(self) -> int | None:
        """Slot of the event-loop thread, registering it over the loop's connection."""
        slot = self.current_slot()
        if slot is not None:
            return slot
        state = self._threads
        if state.pending is not None:
            # Another activity is registering this thread right now: wait for its answer
            # (shielded: this activity being cancelled must not cancel the others' wait).
            return await asyncio.shield(state.pending)
        if state.refused or (slot := self._allocate(state)) is None:
            return None
        state.pending = done = asyncio.get_running_loop().create_future()
        try:
            epoch = self.epoch
            reply = await self.call("thread", tid=threading.get_native_id(), slot=slot)
            return self._registered(state, slot, epoch, reply)
        finally:
            state.pending = None
            # Also when this task was cancelled mid-way: the waiters get what holds now.
            done.set_result(self.current_slot())

    @staticmethod
    def _allocate(state: _ThreadState) -> int | None:
        slot = _slots.current()
        if slot is None:
            state.refused = True
        return slot

    def _registered(
        self, state: _ThreadState, slot: int, epoch: int, reply: dict[str, Any] | None
    ) -> int | None:
        if reply is None:
            return None  # no agent: the thread tries again before a later activity
        if not reply.get("ok"):
            state.refused = True
            _log.debug(
                "openbox-agent refused thread %d: %s",
                threading.get_native_id(),
                reply.get("error"),
            )
            return None
        state.slot, state.epoch = slot, epoch
        state.enforce = reply.get("enforce") is True
        enforcement = self._enforcement
        if state.enforce and state.filtered and enforcement is not None:
            # Filtered under an earlier agent (this is a new epoch): until this agent
            # holds the listener, the hook would answer the activity's calls alone.
            if not enforcement.wait_handed(self.governed_timeout):
                _log.warning(
                    "openbox hook: thread %d's held calls are not handed to the agent yet",
                    threading.get_native_id(),
                )
        return slot

    def enforce_thread(self, slot: int) -> None:
        """Installs the calling thread's seccomp filter (an executor thread's, or the
        event-loop thread's for async activities) and hands its listener to the agent,
        once per thread, when the agent asked for it (``_enforce``)."""
        state = self._threads
        if not state.enforce or state.filtered:
            return
        state.filtered = True  # one filter per thread, whatever happens next
        if not _enforce.available():
            _log.warning("openbox hook: --enforce needs x86_64 Linux; operations are not held")
            return
        with self._epoch_lock:
            if self._enforcement is None:
                self._enforcement = _enforce.Enforcement(self)
                self._enforcement.start()
            enforcement = self._enforcement
        try:
            listener = _enforce.install()
        except OSError as exc:
            _log.warning(
                "openbox hook: cannot hold thread %d's operations: %s",
                threading.get_native_id(),
                exc,
            )
            return
        enforcement.hand_over(threading.get_native_id(), slot, listener, self.governed_timeout)


class _Connection(asyncio.Protocol):
    """One asyncio connection to the agent: writes requests, matches replies by id."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_lost: Any) -> None:
        self._loop = loop
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 1
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            try:
                reply = _decode(buffer[start:end])
            except ValueError as exc:
                self._abort(exc)
                return
            start = end + 1
            request_id = reply.get("id")
            # A reply to a request that timed out finds no future and is dropped.
            future = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
            if future is not None and not future.done():
                future.set_result(reply)
        del buffer[:start]
        if len(buffer) > MAX_LINE:
            self._abort(ValueError("reply line too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = ConnectionError(f"openbox-agent closed the connection ({exc or 'EOF'})")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._on_lost(self)

    def _abort(self, reason: Exception) -> None:
        _log.debug("openbox hook: dropping agent connection: %s", reason)
        self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()  # connection_lost follows and fails what is pending

    async def request(self, op: str, fields: dict[str, Any], timeout: float) -> dict[str, Any]:
        # Awaiting the future directly: a cancelled caller cancels it, which unregisters it.
        return await self.send(op, fields, timeout)

    def send(self, op: str, fields: dict[str, Any], timeout: float) -> asyncio.Future:
        """Write one request now; the future of its reply expires after ``timeout``."""
        if self.closed or self._transport is None:
            raise ConnectionError("openbox-agent connection is closed")
        request_id = self._next_id
        self._next_id += 1
        future = self._loop.create_future()
        self._pending[request_id] = future
        timer = self._loop.call_later(timeout, _expire, future, op, timeout)

        def settled(_: asyncio.Future) -> None:
            timer.cancel()
            self._pending.pop(request_id, None)

        future.add_done_callback(settled)
        try:
            self._transport.write(_encode({"id": request_id, "op": op, **fields}))
        except BaseException:
            future.cancel()
            raise
        if self._transport.get_write_buffer_size() > MAX_LINE:
            self._abort(ConnectionError("openbox-agent is not reading"))
        return future


def _governed_timeout(config: dict[str, Any]) -> float:
    seconds = config.get("governance_timeout")
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds > 0:
        return float(seconds) + GOVERNED_MARGIN
    return GOVERNED_TIMEOUT


def _expire(future: asyncio.Future, op: str, timeout: float) -> None:
    if not future.done():
        future.set_exception(TimeoutError(f"no reply to {op} within {timeout:g} s"))


class _Channel:
    """The connection of one event loop: connects (and says hello) on demand."""

    def __init__(self, link: AgentLink, loop: asyncio.AbstractEventLoop) -> None:
        self._link = link
        self._loop = loop
        self._connection: _Connection | None = None
        self._connecting = asyncio.Lock()
        self._retry_at = 0.0

    async def call(self, op: str, fields: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        connection = self._connection
        if connection is None and (connection := await self._connect()) is None:
            return None
        try:
            return await connection.request(op, fields, timeout)
        except (OSError, ValueError) as exc:
            self._link.failed(f"{op}: {exc}")
            return None

    async def post(self, op: str, fields: dict[str, Any], timeout: float) -> asyncio.Future | None:
        connection = self._connection
        if connection is None and (connection := await self._connect()) is None:
            return None
        try:
            return connection.send(op, fields, timeout)
        except (OSError, ValueError) as exc:
            self._link.failed(f"{op}: {exc}")
            return None

    async def _connect(self) -> _Connection | None:
        async with self._connecting:
            if self._connection is not None:
                return self._connection  # made while this call waited for the lock
            if self._loop.time() < self._retry_at:
                return None
            connection = _Connection(self._loop, self._lost)
            try:
                await asyncio.wait_for(
                    self._loop.create_unix_connection(lambda: connection, self._link.socket_path),
                    self._link.timeout,
                )
                reply = await connection.request("hello", self._link.hello(), self._link.timeout)
                if not reply.get("ok"):
                    raise ConnectionRefusedError(f"hello refused: {reply.get('error')}")
            except (OSError, ValueError) as exc:
                connection.close()
                self._retry_at = self._loop.time() + _retry_after(exc)
                self._link.failed(exc)
                return None
            _log.debug(
                "openbox hook: connected to %s (worker pid %s)",
                reply.get("agent"),
                reply.get("worker"),
            )
            self._connection = connection
            return connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _lost(self, connection: _Connection) -> None:
        if connection is self._connection:
            self._connection = None
            self._link.lost()


class _Presence(threading.Thread):
    """The connection that keeps the worker registered: hello, then wait for the end."""

    def __init__(self, link: AgentLink) -> None:
        super().__init__(name="openbox-hook-presence", daemon=True)
        self._link = link
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def run(self) -> None:
        backoff = PRESENCE_FIRST_BACKOFF
        while not self._closed.is_set():
            said_hello, welcomed = self._hold()
            if said_hello:
                # An agent that may have registered us is gone: so are the threads it
                # knew, which register again before their next activity.
                self._link.lost()
            if welcomed:
                # It was up: the agent is probably restarting; look for it at once.
                backoff = PRESENCE_FIRST_BACKOFF
            if self._closed.wait(backoff):
                return
            backoff = min(backoff * 2, PRESENCE_MAX_BACKOFF)

    def _hold(self) -> tuple[bool, bool]:
        """Connects and says hello; returns once the connection ends: whether hello was
        sent, and whether it was accepted."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with self._lock:
            if self._closed.is_set():
                sock.close()
                return False, False
            self._sock = sock
        said_hello = welcomed = False
        try:
            sock.settimeout(self._link.timeout)
            sock.connect(self._link.socket_path)
            sock.sendall(_encode({"id": 1, "op": "hello", **self._link.hello()}))
            said_hello = True
            buffer = bytearray()
            while (end := buffer.find(b"\n")) < 0:
                if len(buffer) > MAX_LINE:
                    raise ValueError("reply line too long")
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("openbox-agent closed the connection")
                buffer += chunk
            reply = _decode(bytes(buffer[:end]))
            if not reply.get("ok"):
                raise ConnectionRefusedError(f"hello refused: {reply.get('error')}")
            _log.debug("openbox hook: registered with %s", reply.get("agent"))
            welcomed = True
            # Nothing more is said on it: it ends when the agent goes.
            sock.settimeout(None)
            while sock.recv(65536):
                pass
        except (OSError, ValueError) as exc:
            if not welcomed and not self._closed.is_set():
                # Not warned about here: the first activity without an agent warns, as
                # it always did, and says what it costs.
                self._link.last_failure = exc
                _log.debug(
                    "openbox hook: presence connection to %s: %s", self._link.socket_path, exc
                )
        finally:
            with self._lock:
                self._sock = None
            sock.close()
        return said_hello, welcomed

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked recv
                except OSError:
                    pass


class _BlockingConnection:
    """The connection executor threads register on; one request at a time, under a lock."""

    def __init__(self, link: AgentLink) -> None:
        self._link = link
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._epoch = 0
        self._buffer = bytearray()
        self._next_id = 1
        self._retry_at = 0.0

    def call(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any] | None:
        with self._lock:
            if self._sock is not None and self._epoch != self._link.epoch:
                self._close()  # made before a connection was lost: the agent may be new
            if self._sock is None and not self._connect():
                return None
            try:
                return self._request(op, fields, timeout)
            except (OSError, ValueError) as exc:
                self._close()
                self._link.lost()
                self._link.failed(f"{op}: {exc}")
                return None

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._close()

    def broken(self) -> bool:
        """Whether the agent closed this connection (it stopped or restarted), checked
        without blocking: a process with no presence connection (a pool's helper) learns
        it here, and registers again with the agent that is there now."""
        sock = self._sock
        if sock is None:
            return False
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _connect(self) -> bool:
        if time.monotonic() < self._retry_at:
            return False
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._epoch = self._link.epoch
        self._next_id = 1  # ids are per connection: hello is 1 on each
        try:
            self._sock.settimeout(self._link.timeout)
            self._sock.connect(self._link.socket_path)
            reply = self._request("hello", self._link.hello())
            if not reply.get("ok"):
                raise ConnectionRefusedError(f"hello refused: {reply.get('error')}")
        except (OSError, ValueError) as exc:
            self._close()
            self._retry_at = time.monotonic() + _retry_after(exc)
            self._link.failed(exc)
            return False
        return True

    def _close(self) -> None:
        assert self._sock is not None
        self._sock.close()
        self._sock = None
        self._buffer.clear()

    def _request(
        self, op: str, fields: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        assert self._sock is not None
        request_id = self._next_id
        self._next_id += 1
        timeout = timeout or self._link.timeout
        deadline = time.monotonic() + timeout
        self._sock.settimeout(timeout)
        self._sock.sendall(_encode({"id": request_id, "op": op, **fields}))
        while True:
            reply = _decode(self._read_line(deadline))
            if reply.get("id") == request_id:
                return reply
            # else: the late reply to a request that timed out earlier

    def _read_line(self, deadline: float) -> bytes:
        assert self._sock is not None
        buffer = self._buffer
        while (end := buffer.find(b"\n")) < 0:
            if len(buffer) > MAX_LINE:
                raise ValueError("reply line too long")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply within {self._link.timeout:g} s")
            self._sock.settimeout(remaining)
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("openbox-agent closed the connection")
            buffer += chunk
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        return line
