"""What the worker hook costs: per coroutine step, per activity, and end to end.

    python hooks/python/bench/bench_hook.py [--steps N] [--activities N] [--submissions N]
        [--rounds N]
        [--temporal HOST:PORT [--agent-socket PATH] [--runs N]]

1. Per coroutine step: a coroutine doing N ``await asyncio.sleep(0)`` awaited plainly vs
   through the per-step driver (ns per step, ratio).
2. Per activity: a no-op activity through the interceptor chain with and without the
   hook, against the in-process fake agent (the start/end round trips, wrapping, slot
   writes): µs per activity and the difference, async and sync.
3. Per submission: no-op work handed to a one-thread pool, ``asyncio.to_thread`` and a
   one-process pool (fork) by the standard library's ``submit``, by the hook's outside
   activities, and inside an activity (µs per submission and the differences).
4. With ``--temporal``: one-activity workflows on a real Temporal server, alternately on
   a worker without and with the hook (async and sync no-op activities), reporting the
   median schedule-to-close time of the activity from the workflow's history and the
   median client-side workflow time. The hook talks to ``--agent-socket``, else to the
   in-process fake agent.

Prints plain text lines, then one JSON line with every figure. Medians over rounds; no
figure is a pass/fail threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import pickle
import statistics
import sys
import time
import uuid
from datetime import timedelta
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # fake agent, Terminal

import support  # noqa: E402  (also puts the package on the path)
from fake_agent import FakeAgent  # noqa: E402

from temporalio import activity, workflow  # noqa: E402
from temporalio.testing import ActivityEnvironment  # noqa: E402
from temporalio.worker import ExecuteActivityInput  # noqa: E402

from openbox_hook import OpenBoxHook, _driver, _propagate, _slots  # noqa: E402


# -- 1. per coroutine step ------------------------------------------------------------


async def _steps(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def step_cost(steps: int, rounds: int) -> dict[str, float]:
    slot = _slots.current()
    assert slot is not None
    mark = _driver.Mark(1, lambda: slot)
    plain, driven = [], []
    await _steps(steps)  # warm up
    for _ in range(rounds):
        start = time.perf_counter_ns()
        await _steps(steps)
        plain.append((time.perf_counter_ns() - start) / steps)
        start = time.perf_counter_ns()
        await _driver.StepDriver(_steps(steps), mark, slot)
        driven.append((time.perf_counter_ns() - start) / steps)
    p, d = statistics.median(plain), statistics.median(driven)
    return {"plain_ns": p, "driven_ns": d, "added_ns": d - p, "ratio": d / p}


# -- 2. per activity, against the in-process fake agent ----------------------------------


async def _noop_async() -> None:
    return None


def _noop_sync() -> None:
    return None


async def activity_cost(activities: int, rounds: int) -> dict[str, float]:
    agent = FakeAgent()
    hook = OpenBoxHook(agent.socket_path)
    executor = concurrent.futures.ThreadPoolExecutor(1)
    terminal = support.Terminal()
    chains = {"plain": terminal, "hook": hook.intercept_activity(terminal)}

    async def measure() -> dict[str, float]:
        figures: dict[str, list[float]] = {}
        for kind, fn, pool in (("async", _noop_async, None), ("sync", _noop_sync, executor)):
            input = ExecuteActivityInput(fn=fn, args=[], executor=pool, headers={})
            for chain in chains.values():
                for _ in range(20):  # warm up: connections, thread registrations
                    await chain.execute_activity(input)
            for _ in range(rounds):
                for name, chain in chains.items():
                    terminal.inputs.clear()
                    start = time.perf_counter_ns()
                    for _ in range(activities):
                        await chain.execute_activity(input)
                    per = (time.perf_counter_ns() - start) / activities / 1000
                    figures.setdefault(f"{kind}_{name}_us", []).append(per)
        result = {key: statistics.median(values) for key, values in figures.items()}
        for kind in ("async", "sync"):
            result[f"{kind}_added_us"] = result[f"{kind}_hook_us"] - result[f"{kind}_plain_us"]
        return result

    try:
        return await ActivityEnvironment().run(measure)
    finally:
        hook.close()
        executor.shutdown()
        agent.close()


# -- 3. per submission: work handed to thread and process pools ---------------------------


def _noop_task(x: int = 0) -> int:
    return x


async def submission_cost(submissions: int, rounds: int) -> dict[str, float]:
    """What marking each submission adds: batches of no-op submissions to a one-thread
    pool, ``asyncio.to_thread`` and a one-process pool (fork), as the standard library
    does them (the original ``submit``), through the hook's ``submit`` outside an
    activity, and inside one (wrapped, the slot written around each call)."""
    agent = FakeAgent()
    hook = OpenBoxHook(agent.socket_path)
    link = hook._link
    slot = await link.register_loop_thread()
    assert slot is not None
    threads = concurrent.futures.ThreadPoolExecutor(1)
    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
    processes = concurrent.futures.ProcessPoolExecutor(
        1, mp_context=__import__("multiprocessing").get_context("fork")
    )
    mark = _driver.Mark(7, link.current_slot, link)

    def thread_batch(submit: Any, n: int) -> None:
        for f in [submit(threads, _noop_task) for _ in range(n)]:
            f.result()

    def process_batch(submit: Any, n: int) -> None:
        for f in [submit(processes, _noop_task) for _ in range(n)]:
            f.result()

    async def to_thread_batch(n: int) -> None:
        for _ in range(n):
            await asyncio.to_thread(_noop_task)

    original_thread_submit = _propagate._thread_pool_submit
    original_process_submit = _propagate._process_pool_submit
    patched_thread_submit = concurrent.futures.ThreadPoolExecutor.submit
    patched_process_submit = concurrent.futures.ProcessPoolExecutor.submit

    async def timed(variant: str, kind: str, n: int) -> float:
        # Inside an activity: the activity's mark is the current context's.
        scope = _driver.current.set(mark) if variant == "activity" else None
        try:
            # CPU time of this process (every thread: the pool's run the calls), so the
            # figures hold on a loaded machine; a pool process's own CPU is not in it.
            start = time.process_time_ns()
            if kind == "thread_pool":
                thread_batch(
                    original_thread_submit if variant == "stdlib" else patched_thread_submit, n
                )
            elif kind == "process_pool":
                process_batch(
                    original_process_submit if variant == "stdlib" else patched_process_submit, n
                )
            else:
                if variant == "stdlib":
                    concurrent.futures.ThreadPoolExecutor.submit = original_thread_submit
                try:
                    await to_thread_batch(n)
                finally:
                    concurrent.futures.ThreadPoolExecutor.submit = patched_thread_submit
            return (time.process_time_ns() - start) / n / 1000
        finally:
            if scope is not None:
                _driver.current.reset(scope)

    def parts(n: int) -> dict[str, float]:
        """The hook's own work per submission, each part alone (CPU ns)."""

        def per(call: Any) -> float:
            start = time.process_time_ns()
            for _ in range(n):
                call()
            return (time.process_time_ns() - start) / n

        noop = per(_noop_task)
        scope = _driver.current.set(mark)
        try:
            wrapped = _propagate.InThread(_noop_task, 7, mark)
            wrapped()  # registers this thread
            in_process = _propagate.InProcess(_noop_task, 7, link.socket_path, link.timeout)
            in_process()  # registers this process as a helper, once
            return {
                # Submitting side: the mark read, the wrapper, the slot cleared around
                # the standard library's submit.
                "submit_side_ns": per(
                    lambda: _propagate.unmarked(
                        lambda: _propagate.InThread(_noop_task, mark.token, mark)
                    )
                )
                - noop,
                "outside_activity_ns": per(_propagate._mark) - noop,
                # Running side: the thread's slot written and put back, the context set.
                "thread_run_side_ns": per(wrapped) - noop,
                "process_run_side_ns": per(in_process) - noop,
                "process_pickle_added_bytes": len(pickle.dumps(in_process))
                - len(pickle.dumps(_noop_task)),
            }
        finally:
            _driver.current.reset(scope)

    figures: dict[str, list[float]] = {}
    kinds = (
        ("thread_pool", submissions),
        ("to_thread", submissions),
        ("process_pool", max(submissions // 5, 1)),
    )
    try:
        for kind, _ in kinds:
            for variant in ("stdlib", "outside", "activity"):
                await timed(variant, kind, 50)  # warm up: registrations, pool start
        for _ in range(rounds):
            for kind, n in kinds:
                for variant in ("stdlib", "outside", "activity"):
                    figures.setdefault(f"{kind}_{variant}_us", []).append(
                        await timed(variant, kind, n)
                    )
    finally:
        threads.shutdown()
        processes.shutdown()
        hook.close()
        agent.close()
    result: dict[str, float] = {key: statistics.median(values) for key, values in figures.items()}
    result.update(parts(max(submissions * 20, 1000)))
    for kind, _ in kinds:
        for variant in ("outside", "activity"):
            result[f"{kind}_{variant}_added_us"] = (
                result[f"{kind}_{variant}_us"] - result[f"{kind}_stdlib_us"]
            )
    return result


# -- 4. end to end on a Temporal server -------------------------------------------------


@activity.defn(name="bench_noop_async")
async def bench_noop_async() -> None:
    return None


@activity.defn(name="bench_noop_sync")
def bench_noop_sync() -> None:
    return None


@workflow.defn(name="BenchOneActivity", sandboxed=False)
class BenchOneActivity:
    @workflow.run
    async def run(self, kind: str) -> None:
        await workflow.execute_activity(
            f"bench_noop_{kind}", start_to_close_timeout=timedelta(seconds=30)
        )


async def _one_workflow(client: Any, task_queue: str, kind: str) -> tuple[float, float]:
    """(activity schedule-to-close ms from the history, client-side workflow ms)."""
    from temporalio.api.enums.v1 import EventType

    start = time.perf_counter()
    handle = await client.start_workflow(
        BenchOneActivity.run, kind, id=f"openbox-bench-{uuid.uuid4()}", task_queue=task_queue
    )
    await handle.result()
    total_ms = (time.perf_counter() - start) * 1000
    times = {}
    async for event in handle.fetch_history_events():
        times[event.event_type] = event.event_time.ToNanoseconds()
    scheduled = times[EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED]
    completed = times[EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED]
    return (completed - scheduled) / 1e6, total_ms


async def temporal_latency(target: str, agent_socket: str | None, runs: int) -> dict[str, Any]:
    from temporalio.client import Client
    from temporalio.worker import Worker

    client = await Client.connect(target)
    agent = None if agent_socket else FakeAgent()
    hook = OpenBoxHook(agent_socket or agent.socket_path)  # type: ignore[union-attr]
    suffix = uuid.uuid4().hex[:8]
    queues = {"plain": f"openbox-bench-plain-{suffix}", "hook": f"openbox-bench-hook-{suffix}"}
    executor = concurrent.futures.ThreadPoolExecutor(4)
    workers = [
        Worker(
            client,
            task_queue=queue,
            workflows=[BenchOneActivity],
            activities=[bench_noop_async, bench_noop_sync],
            activity_executor=executor,
            interceptors=[hook] if name == "hook" else [],
        )
        for name, queue in queues.items()
    ]
    samples: dict[str, list[float]] = {}
    try:
        async with workers[0], workers[1]:
            for kind in ("async", "sync"):
                for queue in queues.values():
                    for _ in range(3):  # warm up
                        await _one_workflow(client, queue, kind)
            for round_ in range(runs):
                # Alternate which worker goes first, so drift favours neither.
                order = list(queues.items()) if round_ % 2 == 0 else list(queues.items())[::-1]
                for kind in ("async", "sync"):
                    for name, queue in order:
                        activity_ms, workflow_ms = await _one_workflow(client, queue, kind)
                        samples.setdefault(f"{kind}_{name}_activity_ms", []).append(activity_ms)
                        samples.setdefault(f"{kind}_{name}_workflow_ms", []).append(workflow_ms)
    finally:
        hook.close()
        executor.shutdown()
        if agent is not None:
            agent.close()
    result: dict[str, Any] = {key: statistics.median(values) for key, values in samples.items()}
    for kind in ("async", "sync"):
        for what in ("activity", "workflow"):
            result[f"{kind}_added_{what}_ms"] = (
                result[f"{kind}_hook_{what}_ms"] - result[f"{kind}_plain_{what}_ms"]
            )
    result["runs"] = runs
    result["agent"] = agent_socket or "in-process fake agent"
    if agent is not None:
        result["agent_saw_activities"] = len(agent.ops("activity_end"))
    return result


# -- main -------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"python": sys.version.split()[0]}
    _driver.install_task_factory(asyncio.get_running_loop())

    steps = await step_cost(args.steps, args.rounds)
    figures["step"] = steps
    print(
        f"coroutine step: plain {steps['plain_ns']:.0f} ns, through the driver "
        f"{steps['driven_ns']:.0f} ns (+{steps['added_ns']:.0f} ns, x{steps['ratio']:.3f})"
    )

    per_activity = await activity_cost(args.activities, args.rounds)
    figures["activity"] = per_activity
    for kind in ("async", "sync"):
        print(
            f"{kind} activity through the interceptor chain (fake agent): "
            f"without hook {per_activity[f'{kind}_plain_us']:.1f} µs, with hook "
            f"{per_activity[f'{kind}_hook_us']:.1f} µs (+{per_activity[f'{kind}_added_us']:.1f} µs)"
        )

    per_submission = await submission_cost(args.submissions, args.rounds)
    figures["submission"] = per_submission
    print(
        "hook work per submission (CPU): submitting side "
        f"{per_submission['submit_side_ns']:.0f} ns (outside activities "
        f"{per_submission['outside_activity_ns']:.0f} ns), running side: pool thread "
        f"{per_submission['thread_run_side_ns']:.0f} ns, pool process "
        f"{per_submission['process_run_side_ns']:.0f} ns; "
        f"+{per_submission['process_pickle_added_bytes']} bytes pickled per process task"
    )
    for kind in ("thread_pool", "to_thread", "process_pool"):
        print(
            f"{kind} submission (CPU of this process): standard library "
            f"{per_submission[f'{kind}_stdlib_us']:.1f} µs, "
            f"hook outside activities "
            f"{per_submission[f'{kind}_outside_added_us']:+.1f} µs, inside an activity "
            f"{per_submission[f'{kind}_activity_added_us']:+.1f} µs"
        )

    if args.temporal:
        latency = await temporal_latency(args.temporal, args.agent_socket, args.runs)
        figures["temporal"] = latency
        print(f"Temporal {args.temporal}, {args.runs} runs, agent: {latency['agent']}")
        for kind in ("async", "sync"):
            print(
                f"{kind} activity schedule-to-close: without hook "
                f"{latency[f'{kind}_plain_activity_ms']:.2f} ms, with hook "
                f"{latency[f'{kind}_hook_activity_ms']:.2f} ms "
                f"({latency[f'{kind}_added_activity_ms']:+.2f} ms); one-activity workflow "
                f"{latency[f'{kind}_plain_workflow_ms']:.2f} / "
                f"{latency[f'{kind}_hook_workflow_ms']:.2f} ms "
                f"({latency[f'{kind}_added_workflow_ms']:+.2f} ms)"
            )
    return figures


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20000, help="steps per coroutine run")
    parser.add_argument("--activities", type=int, default=500, help="activities per round")
    parser.add_argument("--submissions", type=int, default=2000, help="pool submissions per round")
    parser.add_argument("--rounds", type=int, default=9, help="rounds (medians over these)")
    parser.add_argument("--temporal", metavar="HOST:PORT", help="a Temporal server's frontend")
    parser.add_argument("--agent-socket", metavar="PATH", help="a real agent (with --temporal)")
    parser.add_argument("--runs", type=int, default=50, help="workflows per variant (--temporal)")
    return parser.parse_args()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse_args()))))
