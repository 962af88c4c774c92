"""The workflow sdk2_parity.py runs under SDK 2.0 and under the hook (kept apart from the
activities so that Temporal's workflow sandbox imports nothing but temporalio here)."""

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError


@workflow.defn
class ParityFlow:
    """`parity_ok`, then waits for the `resume` signal (query `stage` says `waiting`), then `parity_io`, then
    `parity_raises` (one attempt; its failure is caught and reported in the result)."""

    def __init__(self) -> None:
        self._note = None
        self._stage = "started"

    @workflow.query
    def stage(self) -> str:
        return self._stage

    @workflow.signal
    def resume(self, note: str) -> None:
        self._note = note

    @workflow.run
    async def run(self, p: dict) -> dict:
        opts = {
            "start_to_close_timeout": timedelta(seconds=60),
            "retry_policy": RetryPolicy(maximum_attempts=1),
        }
        first = await workflow.execute_activity("parity_ok", p, **opts)
        self._stage = "waiting"
        await workflow.wait_condition(lambda: self._note is not None)
        io = await workflow.execute_activity("parity_io", p, **opts)
        try:
            await workflow.execute_activity("parity_raises", p, **opts)
            failed = None
        except ActivityError as e:
            failed = str(e.cause)
        return {"first": first, "io": io, "failed": failed, "note": self._note}
