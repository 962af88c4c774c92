"""The process-wide sender of fire-and-forget messages (``workflow_event``).

Workflow code runs on the worker's workflow threads, inside Temporal's sandbox, and must
never wait, block or do I/O. It hands each message to ``post``, which only appends to a
bounded count and schedules a callback on this module's own event loop (one daemon
thread, ``openbox-hook-events``, started on first use and again in a forked child). That
loop writes the messages, in the order they were posted, on its own connection per
agent link (``AgentLink.post``: hello and reconnection as for every connection), and
does not wait for one reply before writing the next. Replies are only logged: an
``ok: false`` at debug level.

Without an agent, messages are dropped (the link's usual single warning covers it). At
most ``MAX_QUEUED`` messages wait to be written; past that, messages are dropped with
one warning.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

from ._agent import AgentLink

MAX_QUEUED = 10_000
"""Messages posted but not yet written; more are dropped."""

_log = logging.getLogger("openbox.hook")


class _Sender:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._pid = 0
        self._queued = 0
        self._inflight = 0
        self._idle = threading.Condition(self._lock)
        self._overflow_warned = False

    def post(self, link: AgentLink, op: str, fields: dict[str, Any]) -> bool:
        """Queue one message for ``link``'s agent; never blocks (it raises only when the
        sender's thread cannot be started). False when it was dropped: the queue is full."""
        with self._lock:
            if self._queued >= MAX_QUEUED:
                warn = not self._overflow_warned
                self._overflow_warned = True
                queued = False
            else:
                if self._loop is None or self._pid != os.getpid():
                    self._start()
                self._queued += 1
                loop, queue = self._loop, self._queue
                queued = True
        if not queued:
            if warn:
                _log.warning(
                    "openbox hook: %d workflow events wait to be sent to openbox-agent; "
                    "further ones are dropped until they are written",
                    MAX_QUEUED,
                )
            return False
        assert loop is not None and queue is not None
        loop.call_soon_threadsafe(queue.put_nowait, (link, op, fields))
        return True

    def pending(self) -> int:
        """Messages posted in this process and not yet written."""
        with self._lock:
            return self._queued if self._pid == os.getpid() else 0

    def wait_idle(self, timeout: float) -> bool:
        """Until every posted message is written and answered (or given up); for tests
        and orderly shutdown. True if that happened within ``timeout`` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: self._queued == 0 and self._inflight == 0, timeout)

    def _start(self) -> None:
        # Called with the lock held, on first use and in a forked child (which has the
        # parent's loop object but not its thread). No wait: callbacks scheduled before
        # the thread runs the loop are run first.
        loop = asyncio.new_event_loop()
        self._loop, self._queue, self._pid = loop, asyncio.Queue(), os.getpid()
        self._queued = self._inflight = 0
        thread = threading.Thread(
            target=self._run, args=(loop, self._queue), name="openbox-hook-events", daemon=True
        )
        thread.start()

    def _run(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(self._write_all(queue))

    async def _write_all(self, queue: asyncio.Queue) -> None:
        while True:
            link, op, fields = await queue.get()
            future = None
            try:
                future = await link.post(op, fields)
            except Exception:
                _log.debug("openbox hook: could not send %s", op, exc_info=True)
            with self._lock:
                self._queued -= 1
                if future is not None:
                    self._inflight += 1
                self._idle.notify_all()
            if future is not None:
                future.add_done_callback(
                    lambda f, op=op, fields=fields: self._answered(f, op, fields)
                )

    def _answered(self, future: asyncio.Future, op: str, fields: dict[str, Any]) -> None:
        try:
            if future.cancelled():
                return
            exc = future.exception()
            if exc is not None:
                _log.debug(
                    "openbox hook: no answer to %s %s: %s", op, fields.get("event_type"), exc
                )
                return
            reply = future.result()
            if not reply.get("ok"):
                _log.debug(
                    "openbox-agent refused %s %s: %s",
                    op,
                    fields.get("event_type"),
                    reply.get("error"),
                )
        finally:
            with self._lock:
                self._inflight -= 1
                self._idle.notify_all()


sender = _Sender()


def _after_fork_in_child() -> None:
    global sender
    sender = _Sender()  # the parent's lock may be held and its thread is not ours


os.register_at_fork(after_in_child=_after_fork_in_child)


def post(link: AgentLink, op: str, fields: dict[str, Any]) -> bool:
    return sender.post(link, op, fields)


def wait_idle(timeout: float = 5.0) -> bool:
    return sender.wait_idle(timeout)


async def written(timeout: float) -> bool:
    """Until every message posted so far has been written to the agent (not answered),
    without blocking the caller's event loop; at once when none waits. False on timeout."""
    deadline = time.monotonic() + timeout
    while sender.pending():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.001)
    return True
