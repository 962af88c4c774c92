"""Starts the governance end-to-end tests' workflows, signals them, and reports outcomes.

Usage: gov_client.py --address HOST:PORT --task-queue QUEUE --plan FILE [--timeout SECONDS]

FILE holds `{"workflows": [{"id", "workflow", "arg", "signal"?, "memo"?}, ...]}`: each
workflow (gov_workflows.py, by name) is started with that id, single argument and memo,
all at once.
`signal` is `{"name", "args", "query", "equals"}`: once the workflow's query `query`
answers `equals` (polled every 50 ms), the signal `name` is sent with `args`.

Prints one JSON object on stdout, `{"workflows": [...]}` in plan order, each
`{"id", "run_id", "ok": true, "result"}` or `{"id", "run_id", "ok": false, "error"}`
(`run_id` is the first run's; `status` is the last run's Temporal status, e.g.
`COMPLETED`, `FAILED`, `TERMINATED`)
where `error` is the failure as this client sees it: `{"chain": [link, ...]}`, the
exception and its causes (`.cause`) from the outside in, each link
`{"class", "message", "type", "non_retryable", "retry_state", "activity_type",
"activity_id", "details"}` (the fields an exception does not have are null). Exits 0 when it got an outcome for every workflow,
1 on the timeout.
"""

import argparse
import asyncio
import json
import sys
from datetime import timedelta

from temporalio.client import Client
from quick_exit import exit_now


def link(e):
    retry_state = getattr(e, "retry_state", None)
    details = getattr(e, "details", None)
    try:
        details = json.loads(json.dumps(list(details), default=str)) if details else None
    except Exception:  # noqa: BLE001
        details = repr(details)
    return {
        "class": type(e).__name__,
        "message": getattr(e, "message", None) or str(e),
        "type": getattr(e, "type", None) if isinstance(getattr(e, "type", None), str) else None,
        "non_retryable": getattr(e, "non_retryable", None),
        "retry_state": retry_state.name if retry_state is not None else None,
        "activity_type": getattr(e, "activity_type", None),
        "activity_id": getattr(e, "activity_id", None),
        "details": details,
    }


def chain(e):
    out = []
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(link(e))
        e = getattr(e, "cause", None) or e.__cause__
    return out


async def signal_when_ready(handle, sig, deadline):
    loop = asyncio.get_running_loop()
    while True:
        try:
            stage = await handle.query(sig["query"])
        except Exception:  # noqa: BLE001 - not queryable yet (no worker has it yet)
            stage = None
        if stage == sig["equals"]:
            break
        if loop.time() > deadline:
            raise TimeoutError(f"query {sig['query']} never answered {sig['equals']!r}")
        await asyncio.sleep(0.05)
    await handle.signal(sig["name"], args=sig.get("args", []))


async def outcome(client, handle, wf, deadline):
    base = {"id": handle.id, "run_id": handle.result_run_id}
    try:
        if wf.get("signal"):
            await signal_when_ready(handle, wf["signal"], deadline)
        done = dict(base, ok=True, result=await handle.result())
    except Exception as e:  # noqa: BLE001 - every failure is an outcome to report
        done = dict(base, ok=False, error={"chain": chain(e)})
    # The latest run of the id (after continue-as-new): how it ended.
    status = (await client.get_workflow_handle(handle.id).describe()).status
    return dict(done, status=status.name if status is not None else None)


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-queue", required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    with open(args.plan) as f:
        plan = json.load(f)

    client = await Client.connect(args.address)
    deadline = asyncio.get_running_loop().time() + args.timeout
    handles = []
    for wf in plan["workflows"]:
        handles.append(await client.start_workflow(
            wf["workflow"], wf["arg"], id=wf["id"], task_queue=args.task_queue,
            execution_timeout=timedelta(seconds=args.timeout), memo=wf.get("memo")))
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(outcome(client, h, wf, deadline) for h, wf in zip(handles, plan["workflows"]))),
            timeout=args.timeout)
    except asyncio.TimeoutError:
        print(f"gov_client: no result within {args.timeout} s", file=sys.stderr)
        sys.exit(1)
    json.dump({"workflows": results}, sys.stdout)
    print(flush=True)


if __name__ == "__main__":
    asyncio.run(main())
    exit_now()  # no interpreter finalization: see quick_exit.py
