"""The end-to-end tests' Temporal worker, with the OpenBox worker hook.

Usage: worker.py --address HOST:PORT --task-queue QUEUE [--socket PATH] [--threads N]
                 [--max-concurrent N] [--https-base URL] [--pg-port PORT]
                 [--otel-traces-url URL]

Registers the `Fanout` workflow and the activities below, with
`interceptors=[OpenBoxHook(PATH)]` (PATH also from $OPENBOX_AGENT_SOCKET), sync
activities on `ThreadPoolExecutor(N)`. Prints `ready <pid>` on stdout once the worker
runs; SIGTERM or SIGINT shuts it down (exit 0). Logs go to stderr as
`LEVEL logger: message` lines, so a test can count the hook's warnings.

`Fanout(plan)` runs `plan["activity"]` once per item of `plan["items"]`, all at once,
each with `activity_id = item["marker"]`, and returns one `{"ok", "result"|"error"}` per
item. `plan["max_attempts"]` (default 1: a failure is final) and
`plan["retry_initial_ms"]` set the retry policy.

Every activity gets one dict: `marker` (unique text the test looks for in the captured
spans: URL path, SQL text, file name), `https_base` (tls_server.py), `pg_port`
(pg_server.py, user `openbox`, database `shop`, TLS), `dir` (where files go), and
optionally `shared` (async: use the worker-wide httpx client and asyncpg pool) and
`rendezvous` (`{"name", "count", "timeout"}`: wait until `count` activities of that name
have started, or `timeout` seconds, so they really run at the same time). `llm_io` also
needs `llm_base` (llm_server.py).

`plan["then"]`, when present, is the plan of the run the workflow continues as new with,
once this run's activities are done.

`--background BASE` (repeatable) opens one aiohttp session with one connection per server
before the worker exists and keeps a slow request (`/slow/…`) on its way to each BASE for
as long as the worker runs; `pooled_http` (item `base`) makes its request on that session.

With `--otel-traces-url`, the worker traces itself as a user's worker would: Temporal's
OpenTelemetry `TracingInterceptor` before the hook, and its spans sent to that OTLP/HTTP
URL (service `e2e-worker`, as OTLP JSON: the exporter packages' protobuf pin conflicts
with temporalio's).
"""

import argparse
import asyncio
import concurrent.futures
import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
from datetime import timedelta

import asyncpg
import httpcore  # noqa: F401  (see below)
import httpx
import psycopg2
import requests
import urllib3
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from openbox_hook import OpenBoxHook
from quick_exit import exit_now

urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

# pg_server.py allows 20 connections (3 reserved for superusers): activities that open
# their own asyncpg connection take one of these first. The others still run at the
# same time; only their database step queues.
OWN_PG_CONNECTIONS = 12
SHARED = {}


def pg_ssl():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def url_of(p, marker):
    return f"{p['https_base']}/e2e/{marker}"


def expect_echo(text, marker):
    want = f"echo:GET /e2e/{marker} 0"
    if text != want:
        raise RuntimeError(f"HTTPS answer {text!r}, expected {want!r}")


def sql_of(marker):
    return f"SELECT '{marker}'::text AS marker"


def write_file(p, marker):
    path = os.path.join(p["dir"], f"{marker}.txt")
    with open(path, "w") as f:
        f.write(f"written by the activity of {marker}\n")
    return path


# ---- rendezvous: activities wait for each other so they overlap for sure ----

_async_counts = {}
_sync_counts = {}
_sync_cond = threading.Condition()


async def arendezvous(p):
    r = p.get("rendezvous")
    if not r:
        return
    name = r["name"]
    _async_counts[name] = _async_counts.get(name, 0) + 1
    deadline = asyncio.get_running_loop().time() + r.get("timeout", 20)
    while _async_counts[name] < r["count"] and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)


def rendezvous(p):
    r = p.get("rendezvous")
    if not r:
        return
    name = r["name"]
    with _sync_cond:
        _sync_counts[name] = _sync_counts.get(name, 0) + 1
        _sync_cond.notify_all()
        _sync_cond.wait_for(lambda: _sync_counts[name] >= r["count"], timeout=r.get("timeout", 20))


# ---- async steps ----

_own_pg = None


async def a_http(p, marker):
    if p.get("shared"):
        r = await SHARED["httpx"].get(url_of(p, marker))
    else:
        async with httpx.AsyncClient(verify=False) as client:
            r = await client.get(url_of(p, marker))
    expect_echo(r.text, marker)
    return r.text


async def a_sql(p, marker):
    global _own_pg
    if p.get("shared"):
        async with SHARED["pgpool"].acquire() as conn:
            value = await conn.fetchval(sql_of(marker))
    else:
        if _own_pg is None:
            _own_pg = asyncio.Semaphore(OWN_PG_CONNECTIONS)
        async with _own_pg:
            conn = await asyncpg.connect(host="127.0.0.1", port=p["pg_port"], user="openbox",
                                         database="shop", ssl=pg_ssl(), timeout=60)
            try:
                value = await conn.fetchval(sql_of(marker))
            finally:
                await conn.close()
    if value != marker:
        raise RuntimeError(f"SQL answered {value!r}, expected {marker!r}")
    return value


async def a_file(p, marker):
    return write_file(p, marker)


async def async_steps(p, marker):
    # A different step order per activity, with a yield between steps, so the steps
    # of different activities interleave on the loop.
    steps = [a_http, a_sql, a_file]
    k = sum(map(ord, marker)) % 3
    steps = steps[k:] + steps[:k]
    out = {}
    for step in steps:
        out[step.__name__] = await step(p, marker)
        await asyncio.sleep(0)
    return out


# ---- sync steps ----

def s_http(p, marker):
    r = requests.get(url_of(p, marker), verify=False, timeout=60)
    expect_echo(r.text, marker)
    return r.text


# Sync database steps on threads and pool processes other than the activity executor's
# share the server's connection limit with everything else: at most this many at once
# per process (pool processes run one task at a time).
_sync_pg = threading.BoundedSemaphore(8)


def _fresh_sync_pg():
    # A process forked while other threads held permits (or the semaphore's inner lock)
    # would wait for them forever: they do not exist in the child.
    global _sync_pg
    _sync_pg = threading.BoundedSemaphore(8)


os.register_at_fork(after_in_child=_fresh_sync_pg)


def s_sql(p, marker):
    with _sync_pg:
        return _s_sql(p, marker)


def _s_sql(p, marker):
    conn = psycopg2.connect(host="127.0.0.1", port=p["pg_port"], user="openbox", dbname="shop",
                            sslmode="require", gssencmode="disable", connect_timeout=60)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql_of(marker))
            value = cur.fetchone()[0]
    finally:
        conn.close()
    if value != marker:
        raise RuntimeError(f"SQL answered {value!r}, expected {marker!r}")
    return value


def sync_steps(p, marker):
    steps = [s_http, s_sql, write_file]
    k = sum(map(ord, marker)) % 3
    steps = steps[k:] + steps[:k]
    return {step.__name__: step(p, marker) for step in steps}


def info():
    i = activity.info()
    return {"activity_id": i.activity_id, "attempt": i.attempt, "pid": os.getpid(),
            "tid": threading.get_native_id()}


# ---- activities ----

@activity.defn
async def async_io(p):
    await arendezvous(p)
    return {"steps": await async_steps(p, p["marker"]), **info()}


@activity.defn
def sync_io(p):
    rendezvous(p)
    return {"steps": sync_steps(p, p["marker"]), **info()}


@activity.defn
def curl_sync(p):
    rendezvous(p)
    r = subprocess.run(["curl", "-sk", "--max-time", "60", url_of(p, p["marker"])],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"curl exited {r.returncode}: {r.stderr}")
    expect_echo(r.stdout, p["marker"])
    return {"curl": r.stdout, **info()}


@activity.defn
async def curl_async(p):
    await arendezvous(p)
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sk", "--max-time", "60", url_of(p, p["marker"]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"curl exited {proc.returncode}: {err.decode(errors='replace')}")
    expect_echo(out.decode(), p["marker"])
    return {"curl": out.decode(), **info()}


def fail_if_early(p, attempt):
    if attempt <= p.get("fail_attempts", 1):
        raise ApplicationError(f"failing attempt {attempt} on purpose", type="E2EFailOnPurpose")


@activity.defn
async def retry_async(p):
    attempt = activity.info().attempt
    marker = f"{p['marker']}-attempt-{attempt}"
    steps = await async_steps(p, marker)
    fail_if_early(p, attempt)
    return {"steps": steps, **info()}


@activity.defn
def retry_sync(p):
    attempt = activity.info().attempt
    marker = f"{p['marker']}-attempt-{attempt}"
    steps = sync_steps(p, marker)
    fail_if_early(p, attempt)
    return {"steps": steps, **info()}


# ---- work handed to other threads and processes ----

def s_http_sync_client(p, marker):
    """What a sync LLM SDK does underneath: a blocking httpx.Client request."""
    with httpx.Client(verify=False, timeout=60) as client:
        r = client.get(url_of(p, marker))
    expect_echo(r.text, marker)
    return r.text


def handed_off_steps(p, marker):
    steps = [s_http_sync_client, s_sql, write_file]
    k = sum(map(ord, marker)) % 3
    steps = steps[k:] + steps[:k]
    return {step.__name__: step(p, marker) for step in steps}


@activity.defn
async def to_thread_io(p):
    """An async activity calling a sync client through asyncio.to_thread (the loop's
    default executor: a few threads shared by every activity)."""
    await arendezvous(p)
    return {"steps": await asyncio.to_thread(handed_off_steps, p, p["marker"]), **info()}


@activity.defn
async def own_pool_io(p):
    """An async activity fanning its three steps out on a ThreadPoolExecutor of its own."""
    await arendezvous(p)
    loop = asyncio.get_running_loop()
    marker = p["marker"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        done = await asyncio.gather(*(
            loop.run_in_executor(pool, step, p, marker)
            for step in (s_http_sync_client, s_sql, write_file)))
    return {"steps": done, **info()}


@activity.defn
async def own_thread_io(p):
    """An async activity doing its steps on a threading.Thread it starts and joins."""
    await arendezvous(p)
    out = {}

    def run():
        try:
            out["steps"] = handed_off_steps(p, p["marker"])
        except Exception as e:  # handed back to the activity below
            out["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    await asyncio.to_thread(thread.join)
    if "error" in out:
        raise out["error"]
    return {"steps": out["steps"], **info()}


# The "fork" pool is forked while other activities' threads run. A module one of them is
# importing at that instant stays locked for good in the child, so everything the pool's
# tasks import is imported up front (httpx imports httpcore lazily, in Client()): the
# hazard of forking a threaded process, which is why Python is moving away from fork.
PROCESS_POOLS = {}


def process_pool(method):
    """One ProcessPoolExecutor per start method, shared by every activity: created, and
    its processes started, inside the first activity that needs it."""
    pool = PROCESS_POOLS.get(method)
    if pool is None:
        import multiprocessing

        pool = PROCESS_POOLS[method] = concurrent.futures.ProcessPoolExecutor(
            2, mp_context=multiprocessing.get_context(method))
    return pool


@activity.defn
async def process_pool_io(p):
    """An async activity running its steps in a shared ProcessPoolExecutor
    (`p["start_method"]`: fork, spawn or forkserver)."""
    await arendezvous(p)
    loop = asyncio.get_running_loop()
    pool = process_pool(p["start_method"])
    steps = await loop.run_in_executor(pool, handed_off_steps, p, p["marker"])
    return {"steps": steps, **info()}


# ---- one pooled keep-alive session shared with background traffic ----

BACKGROUND_PATH = "/slow/100/background"


async def background_traffic(session, base, started):
    """What a health check or token refresh does: requests on the worker's shared
    session, one after the other, for as long as the worker runs. Each response takes
    a while, so one is nearly always on its way on the pooled connection."""
    while True:
        try:
            async with session.get(base + BACKGROUND_PATH) as r:
                await r.read()
            started.set()
            # A breath between requests: the connection goes to a waiting activity
            # rather than straight back to this loop.
            await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # keep going: the test counts activity spans, not these
            print(f"background request failed: {e!r}", file=sys.stderr, flush=True)
            await asyncio.sleep(0.1)


@activity.defn
async def pooled_http(p):
    """One GET on the worker's shared aiohttp session (one connection per server), which
    the background traffic keeps busy."""
    marker = p["marker"]
    async with SHARED["aiohttp"].get(f"{p['base']}/json/{marker}") as r:
        text = await r.text()
    if marker not in text:
        raise ApplicationError(f"response without the marker: {text[:200]}")
    return {"status": r.status, **info()}


@activity.defn
async def llm_io(p):
    """What an AI agent's step does: an LLM call (the real `openai` 3.x client, on
    httpx2, answered gzip'd), a SQL query and a file written. Returns what the client
    got, for the test to compare with the span's gen_ai.* attributes."""
    # Imported here: only this activity needs the LLM client, and it loads slowly.
    import openai

    marker = p["marker"]
    async with openai.AsyncOpenAI(base_url=f"{p['llm_base']}/gzip/v1", api_key="sk-e2e-secret",
                                  max_retries=0) as c:
        r = await c.chat.completions.create(
            model="gpt-e2e", messages=[{"role": "user", "content": f"hello {marker}"}],
            max_tokens=20)
    chat = {"id": r.id, "model": r.model, "finish": r.choices[0].finish_reason,
            "input_tokens": r.usage.prompt_tokens, "output_tokens": r.usage.completion_tokens}
    return {"chat": chat, "sql": await a_sql(p, marker), "file": write_file(p, marker),
            **info()}


ACTIVITIES = [async_io, sync_io, curl_sync, curl_async, retry_async, retry_sync, pooled_http,
              llm_io, to_thread_io, own_pool_io, own_thread_io, process_pool_io]


@workflow.defn
class Fanout:
    @workflow.run
    async def run(self, plan):
        retry = RetryPolicy(
            initial_interval=timedelta(milliseconds=plan.get("retry_initial_ms", 200)),
            backoff_coefficient=1.0,
            maximum_attempts=plan.get("max_attempts", 1),
        )
        calls = [
            workflow.execute_activity(
                plan["activity"], item, activity_id=item["marker"],
                start_to_close_timeout=timedelta(seconds=plan.get("timeout_s", 180)),
                retry_policy=retry,
            )
            for item in plan["items"]
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        out = []
        for r in results:
            if isinstance(r, BaseException):
                cause = r.__cause__
                out.append({
                    "ok": False,
                    "error": f"{r}: {cause!r}" if cause else str(r),
                    "error_type": getattr(cause, "type", None),
                })
            else:
                out.append({"ok": True, "result": r})
        if "then" in plan:
            workflow.continue_as_new(plan["then"])
        return out


def otel_tracing(url):
    """A tracer provider exporting to `url`; the interceptor that uses it."""
    import json
    import urllib.request

    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor, SpanExporter, SpanExportResult)
    from temporalio.contrib.opentelemetry import TracingInterceptor

    def value(v):
        if isinstance(v, bool):
            return {"boolValue": v}
        if isinstance(v, int):
            return {"intValue": str(v)}
        if isinstance(v, float):
            return {"doubleValue": v}
        return {"stringValue": str(v)}

    class OtlpJson(SpanExporter):
        def export(self, spans):
            body = {"resourceSpans": [{
                "resource": {"attributes": [
                    {"key": "service.name", "value": {"stringValue": "e2e-worker"}}]},
                "scopeSpans": [{"scope": {"name": "e2e-worker"}, "spans": [{
                    "traceId": f"{s.context.trace_id:032x}",
                    "spanId": f"{s.context.span_id:016x}",
                    "parentSpanId": f"{s.parent.span_id:016x}" if s.parent else "",
                    "name": s.name,
                    "kind": s.kind.value + 1,
                    "startTimeUnixNano": str(s.start_time),
                    "endTimeUnixNano": str(s.end_time),
                    "attributes": [{"key": k, "value": value(v)}
                                   for k, v in (s.attributes or {}).items()],
                } for s in spans]}],
            }]}
            req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=10).read()
                return SpanExportResult.SUCCESS
            except Exception as e:  # noqa: BLE001 - reported, the worker goes on
                print(f"otel export failed: {e}", file=sys.stderr)
                return SpanExportResult.FAILURE

    provider = TracerProvider(resource=Resource.create({"service.name": "e2e-worker"}))
    processor = BatchSpanProcessor(OtlpJson(), schedule_delay_millis=200)
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return TracingInterceptor(), provider


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-queue", required=True)
    parser.add_argument("--socket", default=os.environ.get("OPENBOX_AGENT_SOCKET"))
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--max-concurrent", type=int, default=100)
    parser.add_argument("--https-base")
    parser.add_argument("--pg-port", type=int)
    parser.add_argument("--background", action="append", default=[], metavar="BASE",
                        help="keep a request on its way to BASE on the shared aiohttp "
                             "session from before the worker (and its hook) starts")
    parser.add_argument("--otel-traces-url")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")

    # Worker-wide connections, opened before any activity runs: few connections that
    # every activity takes turns on (the "shared pool" case).
    if args.https_base:
        SHARED["httpx"] = httpx.AsyncClient(
            verify=False, limits=httpx.Limits(max_connections=5, max_keepalive_connections=5))
    if args.pg_port:
        SHARED["pgpool"] = await asyncpg.create_pool(
            host="127.0.0.1", port=args.pg_port, user="openbox", database="shop", ssl=pg_ssl(),
            min_size=5, max_size=5, timeout=60)

    background = []
    if args.background:
        import aiohttp

        SHARED["aiohttp"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit_per_host=1, ssl=False))
        for base in args.background:
            started = asyncio.Event()
            background.append(asyncio.create_task(
                background_traffic(SHARED["aiohttp"], base, started)))
            # The pooled connection is open, and its next request on its way, before
            # the worker and its hook exist.
            await started.wait()

    hook = OpenBoxHook(args.socket)
    interceptors = [hook]
    provider = None
    if args.otel_traces_url:
        # The tracing interceptor comes first, so its activity span is current when the
        # hook starts the activity.
        tracing, provider = otel_tracing(args.otel_traces_url)
        interceptors.insert(0, tracing)
    client = await Client.connect(args.address)
    # Under SDK 2.0 conventions a HALT terminates the workflow with this client: sync
    # activities have none of their own.
    hook.set_client(client)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.threads) as executor:
        worker = Worker(
            client,
            task_queue=args.task_queue,
            workflows=[Fanout],
            activities=ACTIVITIES,
            activity_executor=executor,
            max_concurrent_activities=args.max_concurrent,
            workflow_runner=UnsandboxedWorkflowRunner(),
            interceptors=interceptors,
        )
        async with worker:
            print("ready", os.getpid(), flush=True)
            await stop.wait()
    for pool in PROCESS_POOLS.values():
        pool.shutdown()
    if "pgpool" in SHARED:
        await SHARED["pgpool"].close()
    if "httpx" in SHARED:
        await SHARED["httpx"].aclose()
    for task in background:
        task.cancel()
    if "aiohttp" in SHARED:
        await SHARED["aiohttp"].close()
    if provider is not None:
        provider.shutdown()  # sends the spans still batched


if __name__ == "__main__":
    asyncio.run(main())
    exit_now()  # no interpreter finalization: see quick_exit.py
