"""The governance end-to-end tests' Temporal worker, with the OpenBox worker hook.

Usage: gov_worker.py --address HOST:PORT --task-queue QUEUE --socket PATH [--threads N]
                     [--plugin --openbox-url URL --openbox-api-key KEY
                      [--governance-policy P] [--governance-timeout S]]

Registers the workflows of gov_workflows.py (in Temporal's default workflow sandbox)
and the activities below, with `interceptors=[OpenBoxHook(PATH)]` (SDK 1.0 conventions),
or with `--plugin` as an SDK 2.0 user writes it,
`plugins=[OpenBoxPlugin(openbox_url=URL, openbox_api_key=KEY)]` (the socket from
`$OPENBOX_AGENT_SOCKET`; `governance_policy`/`governance_timeout` when given), and sync activities on `ThreadPoolExecutor(N)`. Prints `ready <pid>` on stdout once the worker runs; SIGTERM
or SIGINT shuts it down (exit 0). Logs go to stderr as `LEVEL logger: message` lines.

Activities (each returns what it did, so the test sees what the activity really got):
- `gov_http(p)` (async, httpx): GET `{https_base}/e2e/{marker}` (tls_server.py answers
  `echo:GET <path> 0`), and when `p["core_url"]` / `p["core_alias_url"]` are set also a
  plain-HTTP GET of `{url}/_control?m={marker}` (the first is under the Core base URL: the
  agent must not report it; the second names the same server otherwise, `localhost`).
- `gov_sql(p)` (async, asyncpg over TLS): `SELECT '{marker}'::text AS marker`.
- `gov_file(p)` (async): writes then reads `{dir}/{marker}.txt`.
- `echo(p)` (async): returns `{"got": p, "attempt": n}`.
- `echo_dc(req: Req)` (sync, on the thread pool): a dataclass argument; returns
  `{"got": asdict(req), "was_dataclass": true, "attempt": n}`.
- `answer(p)` (async): returns `{"answer": "the secret is 42", "marker": ..., "attempt": n}`.
- `gov_llm(p)` (async): two LLM calls to the fake LLM server at `p["llm_base"]`
  (llm_server.py) with the real clients: an `openai` chat completion answered gzip'd,
  then an `anthropic` message streamed (SSE); returns what each client got (`text`, `id`,
  `model`, `finish`, `input_tokens`, `output_tokens`) under `chat` and `stream`.
- `gov_ops(p)` (async, hook_ops.py): one operation of each kind SDK 2.0 governs.
- `enf_write`, `enf_http`, `enf_https`, `enf_curl_loop`, `enf_bench`, `enf_sql` (sync),
  `enf_aiohttp`, `enf_async_upload`, `enf_bench_async` (async; enforce_ops.py): the
  enforcement test's and its bench's.
`echo`, `echo_dc` and `answer` first create the empty file
`{dir}/ran-{activity_id}-{attempt}`, so the test can tell which attempts really ran
their body (a refused activity must never get there).
"""

import argparse
import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import signal
import ssl
import sys

import asyncpg
import httpx
from temporalio import activity
from temporalio.client import Client
from temporalio.worker import Worker

from gov_workflows import WORKFLOWS
from enforce_ops import (
    enf_aiohttp,
    enf_async_upload,
    enf_bench,
    enf_bench_async,
    enf_curl_loop,
    enf_http,
    enf_https,
    enf_sql,
    enf_write,
)
from hook_ops import gov_ops
from openbox_hook import OpenBoxHook, OpenBoxPlugin
from quick_exit import exit_now


def pg_ssl():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def attempt():
    return activity.info().attempt


def mark_ran(directory):
    info = activity.info()
    path = os.path.join(directory, f"ran-{info.activity_id}-{info.attempt}")
    with open(path, "w"):
        pass


@dataclasses.dataclass
class Req:
    prompt: str
    user: str
    secret: str
    dir: str
    note: str = ""


@activity.defn
async def gov_http(p: dict) -> dict:
    marker = p["marker"]
    async with httpx.AsyncClient(verify=False) as client:
        r = await client.get(f"{p['https_base']}/e2e/{marker}")
    want = f"echo:GET /e2e/{marker} 0"
    if r.text != want:
        raise RuntimeError(f"HTTPS answer {r.text!r}, expected {want!r}")
    out = {"text": r.text}
    # The same plain-HTTP server under two names: the Core base URL (never reported) and
    # an alias that is not Core's URL (reported: shows the first one was captured too).
    for key in ("core_url", "core_alias_url"):
        if p.get(key):
            async with httpx.AsyncClient() as client:
                c = await client.get(f"{p[key]}/_control?m={marker}")
            out[key.replace("_url", "_status")] = c.status_code
    return out


@activity.defn
async def gov_sql(p: dict) -> dict:
    marker = p["marker"]
    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=p["pg_port"],
        user="openbox",
        database="shop",
        ssl=pg_ssl(),
        timeout=60,
    )
    try:
        value = await conn.fetchval(f"SELECT '{marker}'::text AS marker")
    finally:
        await conn.close()
    if value != marker:
        raise RuntimeError(f"SQL answered {value!r}, expected {marker!r}")
    return {"value": value}


@activity.defn
async def gov_file(p: dict) -> dict:
    path = os.path.join(p["dir"], f"{p['marker']}.txt")
    text = f"written by the activity of {p['marker']}\n"
    with open(path, "w") as f:
        f.write(text)
    with open(path) as f:
        back = f.read()
    if back != text:
        raise RuntimeError(f"read back {back!r}")
    return {"path": path, "bytes": len(text)}


@activity.defn
async def echo(p: dict) -> dict:
    mark_ran(p["dir"])
    return {"got": p, "attempt": attempt()}


@activity.defn
def echo_dc(req: Req) -> dict:
    mark_ran(req.dir)
    return {
        "got": dataclasses.asdict(req),
        "was_dataclass": isinstance(req, Req),
        "attempt": attempt(),
    }


@activity.defn
async def answer(p: dict) -> dict:
    mark_ran(p["dir"])
    return {"answer": "the secret is 42", "marker": p["marker"], "attempt": attempt()}


@activity.defn
async def gov_llm(p: dict) -> dict:
    # Imported here: only this activity needs the LLM clients, and they load slowly.
    import anthropic
    import openai

    base, marker = p["llm_base"], p["marker"]
    async with openai.AsyncOpenAI(
        base_url=f"{base}/gzip/v1", api_key="sk-e2e-secret", max_retries=0
    ) as c:
        r = await c.chat.completions.create(
            model="gpt-e2e",
            messages=[{"role": "user", "content": f"hello {marker}"}],
            max_tokens=20,
            temperature=0.5,
        )
    chat = {
        "text": r.choices[0].message.content,
        "id": r.id,
        "model": r.model,
        "finish": r.choices[0].finish_reason,
        "input_tokens": r.usage.prompt_tokens,
        "output_tokens": r.usage.completion_tokens,
    }
    async with anthropic.AsyncAnthropic(
        base_url=f"{base}/identity", api_key="sk-ant-e2e-secret", max_retries=0
    ) as c:
        async with c.messages.stream(
            model="claude-e2e",
            max_tokens=30,
            messages=[{"role": "user", "content": f"stream {marker}"}],
        ) as s:
            text = "".join([t async for t in s.text_stream])
            m = await s.get_final_message()
    stream = {
        "text": text,
        "id": m.id,
        "model": m.model,
        "finish": m.stop_reason,
        "input_tokens": m.usage.input_tokens,
        "output_tokens": m.usage.output_tokens,
    }
    return {"chat": chat, "stream": stream}


ACTIVITIES = [
    gov_http,
    gov_sql,
    gov_file,
    echo,
    echo_dc,
    answer,
    gov_llm,
    gov_ops,
    enf_write,
    enf_http,
    enf_https,
    enf_curl_loop,
    enf_bench,
    enf_sql,
    enf_aiohttp,
    enf_async_upload,
    enf_bench_async,
]


def governance(args):
    if args.plugin:
        # What an SDK 2.0 worker says, the import aside.
        optional = {
            k: v
            for k, v in (
                ("governance_policy", args.governance_policy),
                ("governance_timeout", args.governance_timeout),
            )
            if v is not None
        }
        return {
            "plugins": [
                OpenBoxPlugin(
                    openbox_url=args.openbox_url,
                    openbox_api_key=args.openbox_api_key,
                    **optional,
                )
            ]
        }
    return {"interceptors": [OpenBoxHook(args.socket)]}


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-queue", required=True)
    parser.add_argument("--socket", default=os.environ.get("OPENBOX_AGENT_SOCKET"))
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--plugin", action="store_true")
    parser.add_argument("--openbox-url")
    parser.add_argument("--openbox-api-key")
    parser.add_argument("--governance-policy")
    parser.add_argument("--governance-timeout", type=float)
    args = parser.parse_args()
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )

    client = await Client.connect(args.address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.threads) as executor:
        worker = Worker(
            client,
            task_queue=args.task_queue,
            workflows=WORKFLOWS,
            activities=ACTIVITIES,
            activity_executor=executor,
            max_concurrent_activities=50,
            **governance(args),
        )
        async with worker:
            print("ready", os.getpid(), flush=True)
            await stop.wait()
    # Workflow events still on their way to the agent.
    if hasattr(OpenBoxHook, "flush"):
        OpenBoxHook.flush(5.0)


if __name__ == "__main__":
    asyncio.run(main())
    exit_now()  # no interpreter finalization: see quick_exit.py
