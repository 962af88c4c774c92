"""Shared test helpers: import path, and running an activity through the hook.

Tests run against the source tree (``python -m unittest discover -s hooks/python/tests``
with any Python that has temporalio), so the package need not be installed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import inspect
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from temporalio.testing import ActivityEnvironment  # noqa: E402
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput  # noqa: E402

import openbox_hook._agent  # noqa: E402


class Terminal(ActivityInboundInterceptor):
    """The end of the interceptor chain, doing what temporalio's own does with the input:
    coroutine functions are awaited on the loop, others go to the executor (with the
    context copied, as temporalio does for thread pools)."""

    def __init__(self) -> None:  # no next: this is the end of the chain
        self.inputs: list[ExecuteActivityInput] = []

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        self.inputs.append(input)
        if inspect.iscoroutinefunction(input.fn) or inspect.iscoroutinefunction(
            input.fn.__call__  # type: ignore[operator]
        ):
            return await input.fn(*input.args)
        loop = asyncio.get_running_loop()
        if not isinstance(input.executor, concurrent.futures.ThreadPoolExecutor | None):
            # Pickled to another process: no context to carry (temporalio does the same).
            return await loop.run_in_executor(input.executor, input.fn, *input.args)
        context = contextvars.copy_context()
        return await loop.run_in_executor(input.executor, context.run, input.fn, *input.args)


async def run_activity(
    hook: Any,
    fn: Callable[..., Any],
    *args: Any,
    executor: concurrent.futures.Executor | None = None,
    activity_type: str = "act",
    activity_id: str = "1",
    terminal: Terminal | None = None,
) -> Any:
    """Run ``fn(*args)`` as an activity through ``hook``'s activity interceptor."""
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, activity_type=activity_type, activity_id=activity_id)
    inbound = hook.intercept_activity(terminal or Terminal())
    input = ExecuteActivityInput(fn=fn, args=list(args), executor=executor, headers={})

    async def activity() -> Any:
        return await inbound.execute_activity(input)

    return await env.run(activity)


def run(main: Coroutine[Any, Any, Any], *hooks: Any) -> Any:
    """``asyncio.run(main)``, closing the hooks' connections on that loop before it ends."""

    async def run_then_close() -> Any:
        try:
            return await main
        finally:
            for hook in hooks:
                hook.close()

    return asyncio.run(run_then_close())


def reset_warning() -> None:
    """Forget that the process already warned about a missing agent."""
    openbox_hook._agent._warned = False
