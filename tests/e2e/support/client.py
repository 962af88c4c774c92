"""Starts the end-to-end tests' workflows and waits for their results.

Usage: client.py --address HOST:PORT --task-queue QUEUE --plan FILE [--timeout SECONDS]

FILE holds `{"workflows": [{"id": ..., "arg": {...}}, ...]}`: each is a `Fanout`
workflow (support/worker.py) started with that id and argument, all at once. Prints one
JSON object on stdout: `{"workflows": [{"id", "run_id", "ok", "result"|"error"}, ...]}`, in plan
order. Exits 0 when it got an outcome for every workflow (a failed workflow is an
outcome), 1 on the timeout.
"""

import argparse
import asyncio
import json
import sys
from datetime import timedelta

from temporalio.client import Client
from quick_exit import exit_now


async def outcome(handle):
    try:
        return {"id": handle.id, "run_id": handle.result_run_id, "ok": True,
                "result": await handle.result()}
    except Exception as e:  # noqa: BLE001 - every failure is an outcome to report
        cause = e.__cause__
        error = f"{e!r}: {cause!r}" if cause else repr(e)
        # A termination's reason is in its details, which repr() leaves out.
        details = getattr(cause, "details", None)
        if details:
            error += f" details={list(details)!r}"
        return {"id": handle.id, "run_id": handle.result_run_id, "ok": False, "error": error}


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-queue", required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--timeout", type=float, default=240)
    args = parser.parse_args()
    with open(args.plan) as f:
        plan = json.load(f)

    client = await Client.connect(args.address)
    handles = []
    for wf in plan["workflows"]:
        handles.append(await client.start_workflow(
            "Fanout", wf["arg"], id=wf["id"], task_queue=args.task_queue,
            execution_timeout=timedelta(seconds=args.timeout)))
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(outcome(h) for h in handles)), timeout=args.timeout)
    except asyncio.TimeoutError:
        print(f"client: no result within {args.timeout} s", file=sys.stderr)
        sys.exit(1)
    json.dump({"workflows": results}, sys.stdout)
    print(flush=True)


if __name__ == "__main__":
    asyncio.run(main())
    exit_now()  # no interpreter finalization: see quick_exit.py
