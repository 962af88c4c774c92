"""Work an activity hands to other threads and processes carries its token there, for
exactly as long as that work runs (``openbox_hook._propagate``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import tempfile
import threading
import unittest
import warnings

import pool_tasks
import support
from fake_agent import FakeAgent

from openbox_hook import OpenBoxHook, _slots, carry


def slot_of_this_thread() -> int:
    """What the kernel would read for the calling thread (0 if it has no slot)."""
    slot = _slots.allocated()
    return 0 if slot is None else _slots.table[slot]


class ThreadPropagationTest(unittest.TestCase):
    def setUp(self) -> None:
        self.agent = FakeAgent()
        self.addCleanup(self.agent.close)
        self.hook = OpenBoxHook(self.agent.socket_path)
        self.addCleanup(self.hook.close)

    def run_with_hook(self, main):
        return support.run(main, self.hook)

    def test_to_thread_on_a_shared_reused_thread_is_marked_per_submission(self) -> None:
        # One default-executor thread serves every activity in turn: each call sees its
        # own activity's token, and the thread carries nothing between calls.
        async def work() -> tuple[int, int]:
            await asyncio.sleep(0)
            inside = await asyncio.to_thread(slot_of_this_thread)
            via_loop = await asyncio.get_running_loop().run_in_executor(None, slot_of_this_thread)
            return inside, via_loop

        async def main():
            loop = asyncio.get_running_loop()
            loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
            results = await asyncio.gather(
                *(support.run_activity(self.hook, work, activity_id=str(i)) for i in range(6))
            )
            after = await loop.run_in_executor(None, slot_of_this_thread)
            tid = await loop.run_in_executor(None, threading.get_native_id)
            return results, after, tid

        results, after, tid = self.run_with_hook(main())
        tokens = sorted(self.agent.started)
        self.assertEqual(len(tokens), 6)
        self.assertEqual(sorted(r[0] for r in results), tokens)
        for inside, via_loop in results:
            self.assertEqual(inside, via_loop)
        self.assertEqual(after, 0)
        # The pool thread registered once, as itself.
        pool_threads = [m for m in self.agent.ops("thread") if m["tid"] == tid]
        self.assertEqual(len(pool_threads), 1)

    def test_sync_activity_fanning_out_on_its_own_thread_pool(self) -> None:
        executor = concurrent.futures.ThreadPoolExecutor(2)
        self.addCleanup(executor.shutdown)

        def work() -> tuple[int, list[int], int]:
            own = slot_of_this_thread()
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                fanned = list(pool.map(lambda _: slot_of_this_thread(), range(9)))
                # Nested: a pool thread hands work on again.
                nested = pool.submit(lambda: pool_inner.submit(slot_of_this_thread).result())
                return own, fanned, nested.result()

        pool_inner = concurrent.futures.ThreadPoolExecutor(1)
        self.addCleanup(pool_inner.shutdown)
        own, fanned, nested = self.run_with_hook(
            support.run_activity(self.hook, work, executor=executor)
        )
        self.assertEqual(own, 1)
        self.assertEqual(fanned, [1] * 9)
        self.assertEqual(nested, 1)
        self.assertEqual(pool_inner.submit(slot_of_this_thread).result(), 0)

    def test_threads_the_activity_starts_work_for_it_daemon_threads_do_not(self) -> None:
        def in_thread(daemon: bool, fn=slot_of_this_thread) -> int:
            out = []
            t = threading.Thread(target=lambda: out.append(fn()), daemon=daemon)
            t.start()
            t.join()
            return out[0]

        async def work() -> tuple[int, int, int]:
            return in_thread(False), in_thread(True), in_thread(True, carry(slot_of_this_thread))

        token = self.run_with_hook(support.run_activity(self.hook, work))
        self.assertEqual(token, (1, 0, 1))
        self.assertEqual(in_thread(False), 0)  # outside activities nothing is carried

    def test_a_thread_outliving_its_activity_keeps_the_token_so_the_agent_says_so(self) -> None:
        # The agent reports such a thread's spans as after_activity_end, not as another
        # activity's: the token stays that of the activity that started it.
        go, seen = threading.Event(), []

        def late() -> None:
            go.wait(5)
            seen.append(slot_of_this_thread())

        async def work() -> None:
            threading.Thread(target=late).start()

        self.run_with_hook(support.run_activity(self.hook, work))
        go.set()
        for t in threading.enumerate():
            if t is not threading.current_thread() and not t.daemon:
                t.join(5)
        self.assertEqual(seen, [1])

    def test_pool_threads_started_inside_an_activity_are_not_the_activitys(self) -> None:
        pool = concurrent.futures.ThreadPoolExecutor(1)
        self.addCleanup(pool.shutdown)

        async def work() -> int:
            # The pool's only thread starts here, inside the activity.
            return await asyncio.get_running_loop().run_in_executor(pool, slot_of_this_thread)

        self.assertEqual(self.run_with_hook(support.run_activity(self.hook, work)), 1)
        self.assertEqual(pool.submit(slot_of_this_thread).result(), 0)


class ProcessPropagationTest(unittest.TestCase):
    def setUp(self) -> None:
        self.agent = FakeAgent()
        self.addCleanup(self.agent.close)
        self.hook = OpenBoxHook(self.agent.socket_path)
        self.addCleanup(self.hook.close)
        # What the forking thread published at each fork: the kernel copies it into the
        # child as the activity the child works for, for life.
        self.at_fork: list[int] = []
        os.register_at_fork(before=lambda: self.at_fork.append(slot_of_this_thread()))

    def run_with_hook(self, main):
        return support.run(main, self.hook)

    def run_pool(self, method: str) -> None:
        context = multiprocessing.get_context(method)
        holder: dict[str, concurrent.futures.ProcessPoolExecutor] = {}

        async def work() -> list[tuple[int, int]]:
            # The pool is created, and its processes started, inside the first activity.
            if "pool" not in holder:
                holder["pool"] = concurrent.futures.ProcessPoolExecutor(2, mp_context=context)
            loop = asyncio.get_running_loop()
            return await asyncio.gather(
                *(loop.run_in_executor(holder["pool"], pool_tasks.slot_now) for _ in range(4))
            )

        async def main():
            results = []
            for i in range(3):
                results.append(await support.run_activity(self.hook, work, activity_id=str(i)))
            idle = holder["pool"].submit(pool_tasks.slot_now).result()
            return results, idle

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
            try:
                results, idle = self.run_with_hook(main())
            finally:
                if "pool" in holder:
                    holder["pool"].shutdown()
        # Every task of activity i ran with activity i's token, in a pool process.
        self.assertEqual([sorted({token for _, token in r}) for r in results], [[1], [2], [3]])
        pids = {pid for r in results for pid, _ in r}
        self.assertNotIn(os.getpid(), pids)
        self.assertEqual(idle[1], 0)  # a task submitted outside activities
        # Each pool process said hello as a helper, as itself, and registered a thread.
        helpers = [m for m in self.agent.ops("hello") if m.get("helper")]
        self.assertEqual({m["pid"] for m in helpers}, pids)
        self.assertTrue({m["tid"] for m in self.agent.ops("thread")} >= pids)
        self.assertEqual([t for t in self.at_fork if t], [])

    def test_process_pool_forked_inside_an_activity(self) -> None:
        self.run_pool("fork")

    def test_process_pool_spawned_inside_an_activity(self) -> None:
        self.run_pool("spawn")

    def test_process_pool_through_a_fork_server(self) -> None:
        self.run_pool("forkserver")

    def test_sync_activity_on_a_process_pool_activity_executor(self) -> None:
        # activity_executor=ProcessPoolExecutor: the activity function itself runs in a
        # pool process, which publishes the activity's token while it runs.
        executor = concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn")
        )
        self.addCleanup(executor.shutdown)

        async def main():
            return [
                await support.run_activity(
                    self.hook, pool_tasks.slot_now, executor=executor, activity_id=str(i)
                )
                for i in range(2)
            ]

        results = self.run_with_hook(main())
        self.assertEqual([token for _, token in results], [1, 2])
        self.assertNotEqual(results[0][0], os.getpid())
        self.assertEqual(executor.submit(pool_tasks.slot_now).result()[1], 0)

    def test_a_pool_process_registers_again_with_a_restarted_agent(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "agent.sock")
        first_agent = FakeAgent(path)
        hook = OpenBoxHook(path)
        pool = concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn")
        )
        self.addCleanup(pool.shutdown)

        async def work() -> tuple[int, int]:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(pool, pool_tasks.slot_now)

        async def scenario():
            before = await support.run_activity(hook, work)
            channel = hook._link._channels[asyncio.get_running_loop()]
            first_agent.close()
            while channel._connection is not None:
                await asyncio.sleep(0.01)
            second_agent = FakeAgent(path)
            await asyncio.to_thread(second_agent.wait_for, "hello")
            try:
                after = await support.run_activity(hook, work)
                helpers = [m for m in second_agent.ops("hello") if m.get("helper")]
                return before, after, helpers, second_agent.ops("thread")
            finally:
                second_agent.close()

        before, after, helpers, threads = support.run(scenario(), hook)
        self.assertEqual(before[0], after[0])  # the same pool process
        self.assertEqual((before[1], after[1]), (1, 1))  # each agent's first token
        self.assertEqual([m["pid"] for m in helpers], [after[0]])
        self.assertIn(after[0], [m["tid"] for m in threads])

    def test_multiprocessing_pool_map_and_apply(self) -> None:
        def work() -> tuple[list[tuple[int, int]], tuple[int, int]]:
            with multiprocessing.get_context("fork").Pool(2) as pool:
                return pool.map(pool_tasks.slot_now, range(6)), pool.apply(pool_tasks.slot_now)

        executor = concurrent.futures.ThreadPoolExecutor(1)
        self.addCleanup(executor.shutdown)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            mapped, applied = self.run_with_hook(
                support.run_activity(self.hook, work, executor=executor)
            )
        self.assertEqual({token for _, token in mapped}, {1})
        self.assertEqual(applied[1], 1)
        self.assertEqual([t for t in self.at_fork if t], [])


if __name__ == "__main__":
    unittest.main()
