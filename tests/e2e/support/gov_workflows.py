"""Workflows of the governance end-to-end tests (run by gov_worker.py, started by
gov_client.py). A module of its own so Temporal's workflow sandbox can import it.

`GovSteps(plan)` runs `plan["steps"]` one after the other: each step is
`{"activity", "args": [...], "activity_id"}`, with the retry policy
`plan["max_attempts"]` (default 3) and `plan["retry_ms"]` (default 200, no backoff). It
returns the list of the activities' results; an activity failure fails the workflow (the
client then sees the failure's cause chain).

`GovSession(plan)` (for SDK 2.0 conventions) first calls
`emit_handoff(plan["handoff"]["session"], plan["handoff"]["from"])` when the plan has
`handoff`, then runs `plan["steps"]` as `GovSteps` does, and returns
`{"results", "tag": plan.get("tag"), "restarts"}` where `restarts` is the memo's
BLOCK-with-patch restart counter (0 on a first run).

`GovFlow(plan)` runs `gov_http(plan["http"])`, then waits for the `proceed(note, extra)`
signal (the `stage` query says `"waiting"` by then), then `gov_sql(plan["sql"])` and
`gov_file(plan["file"])`; each activity's id is its argument's `marker`. It returns
`{"http", "sql", "file", "signal"}`.
"""

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from openbox_hook import emit_handoff


def _retry(plan):
    return RetryPolicy(
        initial_interval=timedelta(milliseconds=plan.get("retry_ms", 200)),
        backoff_coefficient=1.0,
        maximum_interval=timedelta(milliseconds=max(plan.get("retry_ms", 200), 100)),
        maximum_attempts=plan.get("max_attempts", 3),
    )


def _timeout(plan):
    return timedelta(seconds=plan.get("timeout_s", 60))


@workflow.defn
class GovSteps:
    @workflow.run
    async def run(self, plan: dict) -> list:
        out = []
        for step in plan["steps"]:
            out.append(
                await workflow.execute_activity(
                    step["activity"],
                    args=step.get("args", []),
                    activity_id=step["activity_id"],
                    start_to_close_timeout=_timeout(plan),
                    retry_policy=_retry(plan),
                )
            )
        return out


@workflow.defn
class GovSession:
    @workflow.run
    async def run(self, plan: dict) -> dict:
        if plan.get("handoff"):
            await emit_handoff(plan["handoff"]["session"], plan["handoff"]["from"])
        results = []
        for step in plan["steps"]:
            results.append(
                await workflow.execute_activity(
                    step["activity"],
                    args=step.get("args", []),
                    activity_id=step["activity_id"],
                    start_to_close_timeout=_timeout(plan),
                    retry_policy=_retry(plan),
                )
            )
        restarts = workflow.memo_value("openbox_retryable_block_restart_count", 0)
        return {"results": results, "tag": plan.get("tag"), "restarts": restarts}


@workflow.defn
class GovFlow:
    def __init__(self) -> None:
        self._signal = None
        self._stage = "started"

    @workflow.signal
    def proceed(self, note: str, extra: dict) -> None:
        self._signal = [note, extra]

    @workflow.query
    def stage(self) -> str:
        return self._stage

    @workflow.run
    async def run(self, plan: dict) -> dict:
        async def step(name, arg):
            return await workflow.execute_activity(
                name,
                arg,
                activity_id=arg["marker"],
                start_to_close_timeout=_timeout(plan),
                retry_policy=_retry(plan),
            )

        http = await step("gov_http", plan["http"])
        self._stage = "waiting"
        await workflow.wait_condition(lambda: self._signal is not None)
        self._stage = "signalled"
        sql = await step("gov_sql", plan["sql"])
        file = await step("gov_file", plan["file"])
        self._stage = "done"
        return {"http": http, "sql": sql, "file": file, "signal": self._signal}


WORKFLOWS = [GovSteps, GovFlow, GovSession]
