"""The activity interceptor: tells the agent what runs, and marks where it runs.

For each activity: ``activity_start`` (identity, input) gets a token from the agent; the
activity function is wrapped so its thread's slot holds that token while (and only while)
its code runs; ``activity_end`` (status, output or error) follows once the function has
finished, before Temporal sees the result.

The hook never changes an activity's outcome on its own account: without an agent, or
when any of this machinery fails, the activity runs with its original function and its
result or exception passes through untouched.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import temporalio.activity
import temporalio.exceptions
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput

from . import _driver, _slots
from ._agent import AgentLink
from .serialize import serialize_args, serialize_value

_log = logging.getLogger("openbox.hook")
_internal_error_logged = False


def _internal_error() -> None:
    """A bug in the hook: reported once with its traceback, never raised into activities."""
    global _internal_error_logged
    if _internal_error_logged:
        _log.debug("openbox hook internal error", exc_info=True)
        return
    _internal_error_logged = True
    _log.warning(
        "openbox hook internal error; the activity runs without attribution "
        "(further ones are logged at debug level)",
        exc_info=True,
    )


class ActivityInbound(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, link: AgentLink) -> None:
        super().__init__(next)
        self._link = link

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        reply = await self._start(input)
        if reply is None:
            return await self.next.execute_activity(input)
        token = reply["token"]
        try:
            input = self._on_start_reply(reply, input)
            result = await self.next.execute_activity(await self._attributed(input, token))
        except (Exception, asyncio.CancelledError) as exc:
            # Not GeneratorExit, KeyboardInterrupt or SystemExit: nothing can be awaited
            # while those unwind, so such an activity gets no activity_end.
            await self._end(token, "failed", None, exc)
            raise
        await self._end(token, "completed", result, None)
        return result

    def _on_start_reply(
        self, reply: dict[str, Any], input: ExecuteActivityInput
    ) -> ExecuteActivityInput:
        """Where the agent's answer to ``activity_start`` acts on the activity.

        Returns the input to run. The agent's governance verdict will ride on this reply
        (redacted input, BLOCK/HALT raised from here as the activity's failure); today the
        agent only attributes, so the input is returned as it came.
        """
        return input

    async def _start(self, input: ExecuteActivityInput) -> dict[str, Any] | None:
        """The agent's reply to ``activity_start`` when it accepted the activity, else None."""
        try:
            info = temporalio.activity.info()
            reply = await self._link.call(
                "activity_start",
                workflow_id=info.workflow_id,
                run_id=info.workflow_run_id,
                workflow_type=info.workflow_type,
                activity_id=info.activity_id,
                activity_type=info.activity_type,
                task_queue=info.task_queue,
                attempt=info.attempt,
                start_time=time.time(),
                input=serialize_args(input.args),
            )
        except Exception:
            _internal_error()
            return None
        if reply is None:
            return None
        token = reply.get("token")
        if not reply.get("ok") or type(token) is not int or not 0 < token < 1 << 64:
            _log.debug("openbox-agent did not take the activity: %s", reply)
            return None
        return reply

    async def _end(self, token: int, status: str, result: Any, exc: BaseException | None) -> None:
        try:
            await self._link.call(
                "activity_end",
                token=token,
                status=status,
                end_time=time.time(),
                output=None if exc is not None else serialize_value(result),
                error=None
                if exc is None
                else {"type": type(exc).__name__, "message": _message(exc)},
            )
        except Exception:
            _internal_error()

    async def _attributed(self, input: ExecuteActivityInput, token: int) -> ExecuteActivityInput:
        """``input`` with its function wrapped to publish ``token``, or as it came."""
        try:
            fn = input.fn
            # The test temporalio itself applies to choose the event loop or the executor.
            if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
                fn.__call__  # type: ignore[operator]
            ):
                slot = await self._link.register_loop_thread()
                if slot is None:
                    return input
                _driver.install_task_factory(asyncio.get_running_loop())
                mark = _driver.Mark(token, self._link.current_slot)
                return dataclasses.replace(input, fn=_async_wrapper(fn, mark, slot))
            if isinstance(input.executor, concurrent.futures.ThreadPoolExecutor):
                return dataclasses.replace(input, fn=_sync_wrapper(fn, token, self._link))
            # Other executors (process pools) pickle the function: it must stay the
            # original, and it runs in another process this hook cannot mark.
            return input
        except Exception:
            _internal_error()
            return input


def _async_wrapper(fn: Callable[..., Any], mark: _driver.Mark, slot: int) -> Callable[..., Any]:
    # An `async def`, so temporalio still sees a coroutine function and awaits it on the
    # loop rather than sending it to the executor.
    @functools.wraps(fn)
    async def attributed(*args: Any) -> Any:
        coro = fn(*args)
        if not isinstance(coro, Coroutine):
            return await coro  # an awaitable that cannot be stepped through: unattributed
        scope = _driver.current.set(mark)
        try:
            return await _driver.StepDriver(coro, mark, slot)
        finally:
            mark.token = 0
            _driver.current.reset(scope)

    return attributed


def _sync_wrapper(fn: Callable[..., Any], token: int, link: AgentLink) -> Callable[..., Any]:
    # A plain function, so temporalio still runs it on the activity executor. Its body
    # runs on the executor thread: the only place that thread's slot can be written.
    @functools.wraps(fn)
    def attributed(*args: Any) -> Any:
        try:
            slot = link.register_thread()
        except temporalio.exceptions.CancelledError:
            raise  # Temporal cancelling the activity in this thread, not a hook failure
        except Exception:
            _internal_error()
            slot = None
        if slot is None:
            return fn(*args)
        table = _slots.table
        previous = table[slot]
        table[slot] = token
        try:
            return fn(*args)
        finally:
            table[slot] = previous

    return attributed


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__}: str() failed>"
