"""The workflow of enforce_sdk2.py (a module of its own for Temporal's workflow sandbox):
runs the `enf_bench` activity once with the given argument and returns its result."""

from datetime import timedelta

from temporalio import workflow


@workflow.defn
class EnforceBenchFlow:
    @workflow.run
    async def run(self, p: dict) -> dict:
        return await workflow.execute_activity(
            "enf_bench", p, start_to_close_timeout=timedelta(minutes=10)
        )
