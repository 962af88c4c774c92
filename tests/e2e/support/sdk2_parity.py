"""One ParityFlow run (parity_workflows.py) with its worker in this process, adopted
as an SDK 2.0 user writes it: `plugins=[OpenBoxPlugin(openbox_url=…, openbox_api_key=…)]`.

Usage: sdk2_parity.py --sdk {openbox,hook} --address HOST:PORT --task-queue Q
                      --workflow-id ID --openbox-url URL --openbox-api-key KEY
                      --http-url URL --dir DIR

`--sdk openbox` imports the plugin from `openbox-temporal-sdk-python` 2.0.0 itself
(`from openbox import OpenBoxPlugin`); `--sdk hook` from the OpenBox hook
(`from openbox_hook import OpenBoxPlugin`, the agent's socket in $OPENBOX_AGENT_SOCKET):
the only line that differs. Starts the workflow, sends it the `resume` signal once its
first activity is done, waits for
its result and prints `{"workflow_id", "run_id", "result"}` on stdout.

Activities: `parity_ok(p)` returns; `parity_raises(p)` raises a non-retryable
ApplicationError of type ParityError; `parity_io(p)` GETs `{http_url}/parity/{marker}`
with httpx (tls_server.py answers `echo:GET <path> 0`) and writes `{dir}/{marker}.txt`.
"""

import argparse
import asyncio
import json
import logging
import os
import sys

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from parity_workflows import ParityFlow
from quick_exit import exit_now


@activity.defn
async def parity_ok(p: dict) -> dict:
    return {"echo": p["marker"], "answer": 42, "items": ["a", "é"]}


@activity.defn
async def parity_raises(p: dict) -> dict:
    raise ApplicationError(
        f"parity failure of {p['marker']}", type="ParityError", non_retryable=True
    )


@activity.defn
async def parity_io(p: dict) -> dict:
    import httpx

    async with httpx.AsyncClient() as client:
        r = await client.get(f"{p['http_url']}/parity/{p['marker']}")
    path = os.path.join(p["dir"], f"{p['marker']}.txt")
    with open(path, "w") as f:
        f.write(f"parity {p['marker']}\n")
    return {"status": r.status_code, "text": r.text, "file": os.path.basename(path)}


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sdk", choices=["openbox", "hook"], required=True)
    ap.add_argument("--address", required=True)
    ap.add_argument("--task-queue", required=True)
    ap.add_argument("--workflow-id", required=True)
    ap.add_argument("--openbox-url", required=True)
    ap.add_argument("--openbox-api-key", required=True)
    ap.add_argument("--http-url", required=True)
    ap.add_argument("--dir", required=True)
    args = ap.parse_args()
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.sdk == "openbox":
        from openbox import OpenBoxPlugin
    else:
        from openbox_hook import OpenBoxPlugin

    client = await Client.connect(args.address)
    plugin = OpenBoxPlugin(
        openbox_url=args.openbox_url, openbox_api_key=args.openbox_api_key
    )
    p = {"marker": args.workflow_id, "http_url": args.http_url, "dir": args.dir}
    async with Worker(
        client,
        task_queue=args.task_queue,
        workflows=[ParityFlow],
        activities=[parity_ok, parity_raises, parity_io],
        plugins=[plugin],
    ):
        handle = await client.start_workflow(
            ParityFlow.run, p, id=args.workflow_id, task_queue=args.task_queue
        )
        # Signalled once the first activity is done, so that SignalReceived has one
        # place in the run's events under both (Core gets workflow events in order).
        while await handle.query(ParityFlow.stage) != "waiting":
            await asyncio.sleep(0.05)
        await handle.signal(ParityFlow.resume, "go on")
        result = await asyncio.wait_for(handle.result(), timeout=120)
    print(
        json.dumps(
            {
                "workflow_id": args.workflow_id,
                "run_id": handle.result_run_id,
                "result": result,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
    exit_now()  # no interpreter finalization: see quick_exit.py
