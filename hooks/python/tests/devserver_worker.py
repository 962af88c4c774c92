"""Child process of test_workflow.DevServerTest: a real worker on a Temporal dev server.

    python devserver_worker.py TEMPORAL_BIN AGENT_SOCKET REPLAY_AGENT_SOCKET RESULTS_JSON

Starts the dev server (``WorkflowEnvironment.start_local`` on the given binary: nothing
is downloaded), runs a worker with the hook on AGENT_SOCKET and the default sandboxed
workflow runner, runs the scenarios below, replays the first one's history with a hook
on REPLAY_AGENT_SOCKET, and writes what the client saw to RESULTS_JSON; the test process
(which serves both fake agents) checks what the agents received.

It is a separate process because temporalio's Rust runtime threads can abort the
interpreter at exit ("PyGILState_Release: thread state … must be current",
temporalio/sdk-python#300): this process leaves with ``os._exit`` once it is done.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import traceback
import uuid

import support  # noqa: F401  (import path)
import wf_defs

from temporalio import activity
from temporalio.client import WorkflowFailureError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from openbox_hook import OpenBoxHook


@activity.defn(name="greet")
async def greet(greeting: wf_defs.Greeting) -> str:
    return f"hello {greeting.name} ({greeting.secret})"


@activity.defn(name="charge")
async def charge(payload: str) -> str:
    return f"charged {payload}"


@activity.defn(name="pay")
async def pay(payload: str) -> str:
    return f"paid {payload} at attempt {activity.info().attempt}"


async def wait_for_event(handle, event_name: str) -> None:
    """Until the workflow's history has an event of this kind."""
    while True:
        history = await handle.fetch_history()
        if any(e.WhichOneof("attributes") == event_name for e in history.events):
            return
        await asyncio.sleep(0.05)


def failure(exc: WorkflowFailureError) -> dict:
    cause = exc.cause
    return {
        "type": type(cause).__name__,
        "cause_type": type(cause.cause).__name__ if cause.cause else None,
        "error_type": getattr(cause.cause, "type", None) or getattr(cause, "type", None),
    }


async def scenarios(temporal_bin: str, agent_socket: str, replay_socket: str) -> dict:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_bin, dev_server_extra_args=["--headless"]
    )
    try:
        return await asyncio.wait_for(run(env.client, agent_socket, replay_socket), 120)
    finally:
        await env.shutdown()


async def run(client, agent_socket: str, replay_socket: str) -> dict:
    task_queue = f"q-{uuid.uuid4()}"
    hook = OpenBoxHook(agent_socket)
    results: dict = {"task_queue": task_queue}
    # No workflow cache: every workflow task after a workflow's first replays its history,
    # so an event reported while replaying would show up twice.
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[
            wf_defs.SignalTimerWorkflow,
            wf_defs.OneActivityWorkflow,
            wf_defs.RaisingWorkflow,
            wf_defs.ContinuingWorkflow,
        ],
        activities=[greet, charge, pay],
        interceptors=[hook],
        max_cached_workflows=0,
    ):
        # 1. An activity, a signal, a timer.
        handle = await client.start_workflow(
            wf_defs.SignalTimerWorkflow.run, "ann", id=f"wf-{uuid.uuid4()}", task_queue=task_queue
        )
        await wait_for_event(handle, "activity_task_completed_event_attributes")
        await handle.signal(wf_defs.SignalTimerWorkflow.approve, args=["bob", 2])
        outcome = await handle.result()
        results["signal_timer"] = {
            "workflow_id": handle.id,
            "run_id": handle.result_run_id,
            "result": {"greeting": outcome.greeting, "approvals": outcome.approvals},
        }
        history = await handle.fetch_history()

        # 2. An activity the agent blocks: the workflow fails.
        blocked = await client.start_workflow(
            wf_defs.OneActivityWorkflow.run,
            "charge",
            id=f"wf-{uuid.uuid4()}",
            task_queue=task_queue,
        )
        try:
            await blocked.result()
            results["blocked"] = {"error": None}
        except WorkflowFailureError as exc:
            results["blocked"] = {"error": failure(exc)}
        results["blocked"].update(workflow_id=blocked.id, run_id=blocked.result_run_id)

        # 3. An activity pending approval at its first attempt, allowed at the second.
        results["approval"] = {
            "result": await client.execute_workflow(
                wf_defs.OneActivityWorkflow.run,
                "pay",
                id=f"wf-{uuid.uuid4()}",
                task_queue=task_queue,
            )
        }

        # 4. A workflow raising a chained ApplicationError.
        raising = await client.start_workflow(
            wf_defs.RaisingWorkflow.run, id=f"wf-{uuid.uuid4()}", task_queue=task_queue
        )
        try:
            await raising.result()
            results["raising"] = {"error": None}
        except WorkflowFailureError as exc:
            results["raising"] = {"error": failure(exc), "workflow_id": raising.id}

        # 5. A workflow that continues as new once: two runs of one workflow id.
        continuing = await client.start_workflow(
            wf_defs.ContinuingWorkflow.run, 1, id=f"wf-{uuid.uuid4()}", task_queue=task_queue
        )
        await continuing.result()
        last = await client.get_workflow_handle(continuing.id).describe()
        results["continuing"] = {
            "workflow_id": continuing.id,
            "first_run_id": continuing.result_run_id,
            "last_run_id": last.run_id,
        }

    # 6. The first workflow's whole history replayed (as after an eviction or a restart)
    # with the default sandboxed runner; its hook's agent must receive nothing.
    replay_hook = OpenBoxHook(replay_socket)
    replayed = await Replayer(
        workflows=[wf_defs.SignalTimerWorkflow], interceptors=[replay_hook]
    ).replay_workflow(history, raise_on_replay_failure=False)
    results["replay"] = {
        "failure": None if replayed.replay_failure is None else repr(replayed.replay_failure)
    }
    results["flushed"] = OpenBoxHook.flush(10.0)
    hook.close()
    return results


def main() -> None:
    temporal_bin, agent_socket, replay_socket, results_path = sys.argv[1:5]
    code = 0
    try:
        results = asyncio.run(scenarios(temporal_bin, agent_socket, replay_socket))
    except BaseException:
        results = {"crash": traceback.format_exc()}
        code = 1
    with open(results_path, "w") as out:
        json.dump(results, out)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
