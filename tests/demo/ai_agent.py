"""The demo's Temporal application: an "AI agent" workflow whose activities call an LLM
API over HTTPS, query PostgreSQL, read and write files, and fan out many HTTPS
requests at once. The worker adopts openbox-agent in one line: the OpenBoxHook
interceptor. Nothing in the activities knows about openbox.

    ai_agent.py worker --temporal HOST:PORT --llm URL --pg-port N --workdir DIR
    ai_agent.py run    --temporal HOST:PORT --question TEXT

`worker` serves task queue `ai-agent` until SIGTERM; `run` starts one workflow, waits,
and prints its result as JSON.
"""

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError
from temporalio.worker import Worker

with workflow.unsafe.imports_passed_through():
    import httpx
    import psycopg2
    from openbox_hook import OpenBoxHook

TASK_QUEUE = "ai-agent"
CONFIG = {}


@dataclasses.dataclass
class Report:
    question: str
    plan: list
    products: list
    sources: list


async def ask_llm(prompt: str) -> str:
    async with httpx.AsyncClient(verify=False, timeout=10) as client:
        r = await client.post(
            f"{CONFIG['llm']}/v1/chat/completions",
            json={"model": "demo-llm", "messages": [{"role": "user", "content": prompt}]},
            headers={"Authorization": "Bearer sk-demo-not-a-real-key"},
        )
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]


@activity.defn
async def plan_research(question: str) -> list:
    """Async: one LLM call."""
    answer = await ask_llm(f"Plan three research steps for: {question}")
    return [f"step {i}: {answer[:40]}" for i in range(1, 4)]


@activity.defn
def query_products(limit: int) -> list:
    """Sync, on the worker's thread pool: a PostgreSQL query over TLS."""
    conn = psycopg2.connect(host="127.0.0.1", port=CONFIG["pg_port"], user="openbox",
                            password="openbox-pw", dbname="shop", sslmode="require")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, name FROM items ORDER BY id LIMIT %s", (limit,))
            return [{"id": i, "name": n} for i, n in cur.fetchall()]
    finally:
        conn.close()


@activity.defn
async def fetch_sources(topics: list) -> list:
    """Async: many HTTPS requests in flight at once on one shared client."""
    async with httpx.AsyncClient(verify=False, timeout=10) as client:
        async def one(topic):
            r = await client.get(f"{CONFIG['llm']}/json/source-{topic}")
            return r.json()["path"]
        return await asyncio.gather(*(one(t) for t in topics))


@activity.defn
def write_report(report: Report) -> str:
    """Sync: writes the report, reads it back."""
    path = os.path.join(CONFIG["workdir"], "report.json")
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(report), f, indent=2)
    with open(path) as f:
        return f"{path} ({len(f.read())} bytes)"


@activity.defn
async def summarize(text: str) -> str:
    return await ask_llm(f"Summarize: {text}")


@activity.defn
async def publish_report(where: str) -> str:
    """Would post the report to a public site; the demo's local policy blocks it before
    it runs."""
    async with httpx.AsyncClient(verify=False, timeout=10) as client:
        r = await client.post(f"{CONFIG['llm']}/json/publish", json={"report": where})
        return r.text


@workflow.defn
class ResearchAgent:
    @workflow.run
    async def run(self, question: str) -> dict:
        opts = dict(start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=RetryPolicy(maximum_attempts=2))
        plan = await workflow.execute_activity(plan_research, question, **opts)
        products = await workflow.execute_activity(query_products, 3, **opts)
        sources = await workflow.execute_activity(
            fetch_sources, [f"topic-{i}" for i in range(12)], **opts)
        where = await workflow.execute_activity(
            write_report, Report(question, plan, products, sources), **opts)
        summary = await workflow.execute_activity(summarize, f"{question} / {where}", **opts)
        try:
            published = await workflow.execute_activity(publish_report, where, **opts)
        except ActivityError as e:
            published = f"not published: {e.cause}"
        return {"summary": summary, "report": where, "sources": len(sources),
                "published": published}


async def serve(args):
    CONFIG.update(llm=args.llm, pg_port=args.pg_port, workdir=args.workdir)
    client = await Client.connect(args.temporal)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    with ThreadPoolExecutor(max_workers=8) as pool:
        worker = Worker(
            client,
            task_queue=TASK_QUEUE,
            workflows=[ResearchAgent],
            activities=[plan_research, query_products, fetch_sources, write_report, summarize,
                        publish_report],
            activity_executor=pool,
            interceptors=[OpenBoxHook()],  # the one line that adopts openbox-agent
        )
        async with worker:
            print("worker ready", flush=True)
            await stop.wait()


async def run(args):
    client = await Client.connect(args.temporal)
    result = await client.execute_workflow(
        ResearchAgent.run, args.question, id=f"ai-agent-{os.getpid()}", task_queue=TASK_QUEUE)
    print(json.dumps(result), flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--temporal", required=True)
    w.add_argument("--llm", required=True)
    w.add_argument("--pg-port", type=int, required=True)
    w.add_argument("--workdir", required=True)
    r = sub.add_parser("run")
    r.add_argument("--temporal", required=True)
    r.add_argument("--question", required=True)
    args = p.parse_args()
    asyncio.run(serve(args) if args.cmd == "worker" else run(args))


if __name__ == "__main__":
    sys.exit(main())
