"""Workflows for the dev-server tests. The default sandboxed runner imports this module
afresh for each run; it imports the hook, as a file that defines workflows and builds
its worker would, to check that the sandbox accepts that."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

import openbox_hook  # noqa: F401  (see the module docstring)


@dataclasses.dataclass
class Greeting:
    name: str
    secret: str


@dataclasses.dataclass
class Outcome:
    greeting: str
    approvals: list[list]


FAST_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_attempts=3)


@workflow.defn
class SignalTimerWorkflow:
    """An activity, then a signal to wait for, then a timer: several workflow tasks."""

    def __init__(self) -> None:
        self.approvals: list[list] = []

    @workflow.run
    async def run(self, who: str) -> Outcome:
        greeting = await workflow.execute_activity(
            "greet",
            Greeting(who, "s3cret"),
            start_to_close_timeout=timedelta(seconds=20),
            result_type=str,
        )
        await workflow.wait_condition(lambda: bool(self.approvals))
        await workflow.sleep(timedelta(milliseconds=200))
        return Outcome(greeting, self.approvals)

    @workflow.signal
    async def approve(self, by: str, level: int) -> None:
        self.approvals.append([by, level])


@workflow.defn
class OneActivityWorkflow:
    """Runs the named activity (retried quickly) and returns its result."""

    @workflow.run
    async def run(self, activity: str) -> str:
        return await workflow.execute_activity(
            activity,
            "payload",
            start_to_close_timeout=timedelta(seconds=20),
            retry_policy=FAST_RETRY,
            result_type=str,
        )


@workflow.defn
class RaisingWorkflow:
    """Fails with an ApplicationError chained to another (no activity)."""

    @workflow.run
    async def run(self) -> None:
        try:
            raise ValueError("inner problem")
        except ValueError as inner:
            raise ApplicationError("outer problem", type="Custom", non_retryable=True) from inner


@workflow.defn
class ContinuingWorkflow:
    """Continues as new `runs_left` times, then returns how many runs there were."""

    @workflow.run
    async def run(self, runs_left: int) -> int:
        if runs_left > 0:
            workflow.continue_as_new(runs_left - 1)
        return 0
