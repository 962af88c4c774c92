"""`cargo xtask bench --only enforce`'s SDK 2.0 variant: tests/e2e/support/enforce_ops.py
`enf_bench` as a sync activity of a worker in this process adopted as an SDK 2.0 user
writes it, `plugins=[OpenBoxPlugin(openbox_url=…, openbox_api_key=…)]`, with
`openbox-temporal-sdk-python` 2.0.0 itself (its virtualenv, OPENBOX_SDK2_PYTHON).

Usage: enforce_sdk2.py --address HOST:PORT --task-queue Q --workflow-id ID
                       --openbox-url URL --openbox-api-key KEY --arg JSON

Prints the activity's result (JSON) on stdout.
"""

import argparse
import asyncio
import concurrent.futures
import json
import logging
import os
import sys

from temporalio.client import Client
from temporalio.worker import Worker

sys.path.insert(
    0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "e2e", "support")
)
from enforce_ops import enf_bench
from enforce_sdk2_flow import EnforceBenchFlow
from quick_exit import exit_now


async def main():
    ap = argparse.ArgumentParser()
    for a in (
        "address",
        "task-queue",
        "workflow-id",
        "openbox-url",
        "openbox-api-key",
        "arg",
    ):
        ap.add_argument(f"--{a}", required=True)
    args = ap.parse_args()
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from openbox import OpenBoxPlugin

    client = await Client.connect(args.address)
    plugin = OpenBoxPlugin(
        openbox_url=args.openbox_url, openbox_api_key=args.openbox_api_key
    )
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        async with Worker(
            client,
            task_queue=args.task_queue,
            workflows=[EnforceBenchFlow],
            activities=[enf_bench],
            activity_executor=pool,
            plugins=[plugin],
        ):
            result = await client.execute_workflow(
                EnforceBenchFlow.run,
                json.loads(args.arg),
                id=args.workflow_id,
                task_queue=args.task_queue,
            )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
    exit_now()  # no interpreter finalization: see quick_exit.py
