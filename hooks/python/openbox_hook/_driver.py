"""Per-step attribution for async activities.

Async activities interleave on the event-loop thread, so "this thread runs activity X" is
true only while one of X's coroutines is actually executing. ``StepDriver`` wraps a
coroutine and publishes X's token in the thread's slot for exactly the duration of each
step (each ``send``/``throw``/``close`` into the coroutine), restoring the previous value
as soon as the step returns, suspends or raises. Between steps the slot shows whatever
ran before, normally 0: the loop's own I/O and other activities' steps are never
attributed to X.

Tasks the activity creates (``asyncio.gather``, ``create_task``, ``TaskGroup``) are steps
of X too. ``current`` holds X's ``Mark`` in the activity's context; child tasks copy that
context, and ``TaskFactory`` (installed once per loop) wraps the coroutine of every task
created while a mark is set in the same driver.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any

from . import _slots


class Mark:
    """The token of one running activity, shared by all of its drivers.

    Zeroed when the activity ends, so a task it started that outlives it (a pool's
    background reader, a fire-and-forget call) stops carrying its token.
    """

    __slots__ = ("token", "slot_of_thread", "link")

    def __init__(
        self, token: int, slot_of_thread: Callable[[], int | None], link: Any = None
    ) -> None:
        self.token = token
        self.slot_of_thread = slot_of_thread
        """The registered slot of the calling thread, or None (for the task factory)."""
        self.link = link
        """The ``AgentLink`` the token came from: threads and processes the activity
        hands work to register on it (``_propagate``)."""


current: contextvars.ContextVar[Mark | None] = contextvars.ContextVar(
    "openbox_hook_activity", default=None
)


class StepDriver(Coroutine):
    """Drives ``coro`` step by step with ``mark.token`` in ``slots[slot]`` during each step.

    It is itself a coroutine (send/throw/close), so it can be awaited or handed to a Task
    in place of the coroutine it wraps; values, exceptions, cancellation and close pass
    through unchanged.
    """

    __slots__ = ("_coro", "_mark", "_slot")

    def __init__(self, coro: Coroutine, mark: Mark, slot: int) -> None:
        self._coro = coro
        self._mark = mark
        self._slot = slot

    def send(self, value: Any = None) -> Any:
        token = self._mark.token
        if not token:
            return self._coro.send(value)
        table, slot = _slots.table, self._slot
        previous = table[slot]
        table[slot] = token
        try:
            return self._coro.send(value)
        finally:
            table[slot] = previous

    # `await` and Task resume with next() (a send of None): the same method, no extra call.
    __next__ = send

    def throw(self, *args: Any) -> Any:
        # The arguments are forwarded as given: CPython and asyncio pass the exception
        # alone, and the legacy (type, value, traceback) form is deprecated since 3.12.
        token = self._mark.token
        if not token:
            return self._coro.throw(*args)
        table, slot = _slots.table, self._slot
        previous = table[slot]
        table[slot] = token
        try:
            return self._coro.throw(*args)
        finally:
            table[slot] = previous

    def close(self) -> None:
        # Closing runs the coroutine's `finally` blocks: activity code, so attributed.
        token = self._mark.token
        if not token:
            self._coro.close()
            return
        table, slot = _slots.table, self._slot
        previous = table[slot]
        table[slot] = token
        try:
            self._coro.close()
        finally:
            table[slot] = previous

    def __await__(self) -> StepDriver:
        return self

    def __iter__(self) -> StepDriver:
        return self

    # Introspection (Task.get_stack, print_stack, debuggers) sees the wrapped coroutine.
    @property
    def cr_frame(self) -> Any:
        return getattr(self._coro, "cr_frame", None)

    @property
    def cr_await(self) -> Any:
        return getattr(self._coro, "cr_await", None)

    @property
    def cr_running(self) -> bool:
        return bool(getattr(self._coro, "cr_running", False))

    @property
    def cr_code(self) -> Any:
        return getattr(self._coro, "cr_code", None)

    def __repr__(self) -> str:
        return f"<StepDriver token={self._mark.token} of {self._coro!r}>"


class TaskFactory:
    """Loop task factory: tasks created inside an activity run under its driver.

    Chains the factory that was set before (or creates plain Tasks), passing every
    keyword through, which covers both call forms: ``factory(loop, coro)`` /
    ``factory(loop, coro, context=ctx)`` (3.11-3.13) and ``factory(loop, coro, **kwargs)``
    with name/context/eager_start (3.13.3+). Tasks created outside activities are passed
    on untouched.
    """

    __slots__ = ("_inner",)

    def __init__(self, inner: Callable[..., asyncio.Future] | None) -> None:
        self._inner = inner

    def __call__(self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future:
        context = kwargs.get("context")
        mark = current.get() if context is None else context.get(current)
        # iscoroutine: anything else is left for Task to reject exactly as it would.
        if mark is not None and mark.token and asyncio.iscoroutine(coro):
            slot = mark.slot_of_thread()
            if slot is not None:
                coro = StepDriver(coro, mark, slot)
        if self._inner is None:
            return asyncio.Task(coro, loop=loop, **kwargs)
        return self._inner(loop, coro, **kwargs)


def install_task_factory(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop`` wrap tasks created inside activities; idempotent.

    Checked on every activity start, so a factory set later by the application is chained
    in turn instead of silently disabling child-task attribution.
    """
    existing = loop.get_task_factory()
    if not isinstance(existing, TaskFactory):
        loop.set_task_factory(TaskFactory(existing))
