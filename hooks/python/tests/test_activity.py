"""The activity interceptor against the fake agent: messages, slots, and no-agent runs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import socket
import tempfile
import threading
import unittest
import warnings
from unittest import mock

import support
from fake_agent import FakeAgent

from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from openbox_hook import OpenBoxHook, _slots
from openbox_hook._agent import AgentLink


@dataclasses.dataclass
class Order:
    item: str
    quantity: int


def slot_of_this_thread() -> int:
    """What the kernel would read for the calling thread (0 if it has no slot)."""
    slot = _slots.current()
    return 0 if slot is None else _slots.table[slot]


class ActivityHookTest(unittest.TestCase):
    def setUp(self) -> None:
        self.agent = FakeAgent()
        self.addCleanup(self.agent.close)
        self.hook = OpenBoxHook(self.agent.socket_path)
        self.addCleanup(self.hook.close)
        self.executor = concurrent.futures.ThreadPoolExecutor(2)
        self.addCleanup(self.executor.shutdown)

    def run_with_hook(self, main):
        return support.run(main, self.hook)

    def test_activity_start_carries_the_w3c_trace_context_of_the_workers_current_span(
        self,
    ) -> None:
        # What Temporal's TracingInterceptor, placed before the hook, makes current.
        from opentelemetry.sdk.trace import TracerProvider

        tracer = TracerProvider().get_tracer("test")

        async def work() -> str:
            return "ok"

        async def main() -> tuple[str, object]:
            with tracer.start_as_current_span("RunActivity:work") as span:
                result = await support.run_activity(self.hook, work, activity_type="work")
            return result, span

        result, span = self.run_with_hook(main())
        [start] = self.agent.wait_for("activity_start")
        ctx = span.get_span_context()  # type: ignore[attr-defined]
        self.assertEqual(result, "ok")
        self.assertEqual(start["traceparent"], f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01")
        self.assertNotIn("tracestate", start)

    def test_without_a_current_span_activity_start_carries_no_trace_context(self) -> None:
        import opentelemetry.trace  # noqa: F401 - imported, as a tracing worker would

        async def work() -> str:
            return "ok"

        self.run_with_hook(support.run_activity(self.hook, work))
        [start] = self.agent.wait_for("activity_start")
        self.assertNotIn("traceparent", start)

    def test_async_activity_start_and_end_messages(self) -> None:
        async def order(o: Order, note: bytes) -> dict:
            return {"ok": o.quantity, "token_seen": slot_of_this_thread()}

        result = self.run_with_hook(
            support.run_activity(self.hook, order, Order("tea", 2), b"\xff", activity_type="order")
        )
        # The presence connection's and the event loop's: each connection starts with it.
        hellos = self.agent.wait_for("hello", 2)
        [start] = self.agent.wait_for("activity_start")
        [end] = self.agent.wait_for("activity_end")
        self.assertEqual(result, {"ok": 2, "token_seen": 1})
        self.assertEqual([hello["id"] for hello in hellos], [1, 1])
        hello = hellos[0]
        self.assertEqual(hello["pid"], os.getpid())
        self.assertEqual(hello["hook"], "openbox-hook/0.1.0")
        self.assertEqual(hello["slots_addr"], _slots.address)
        self.assertEqual(hello["slots"], _slots.SLOTS)
        self.assertEqual(hello["config"], {})
        info = ActivityEnvironment.default_info()
        self.assertEqual(
            {k: v for k, v in start.items() if k not in ("id", "start_time")},
            {
                "op": "activity_start",
                "workflow_id": info.workflow_id,
                "run_id": info.workflow_run_id,
                "workflow_type": info.workflow_type,
                "activity_id": "1",
                "activity_type": "order",
                "task_queue": info.task_queue,
                "attempt": 1,
                "input": [{"item": "tea", "quantity": 2}, "/w=="],
            },
        )
        self.assertIsInstance(start["start_time"], float)
        self.assertEqual(end["token"], 1)
        self.assertEqual(end["status"], "completed")
        self.assertEqual(end["output"], result)
        self.assertIsNone(end["error"])
        self.assertGreaterEqual(end["end_time"], start["start_time"])

    def test_async_activity_registers_the_loop_thread_once(self) -> None:
        async def noop() -> int:
            return slot_of_this_thread()

        async def main() -> list[int]:
            return [await support.run_activity(self.hook, noop) for _ in range(3)]

        self.assertEqual(self.run_with_hook(main()), [1, 2, 3])
        [thread] = self.agent.wait_for("thread")
        self.assertEqual(thread["tid"], threading.get_native_id())
        self.assertEqual(thread["slot"], _slots.current())
        self.assertEqual(slot_of_this_thread(), 0)

    def test_sync_activity_marks_its_executor_thread(self) -> None:
        seen = {}

        def work(x: int) -> int:
            seen["tid"] = threading.get_native_id()
            seen["token"] = slot_of_this_thread()
            return x * 2

        async def main() -> int:
            return await support.run_activity(self.hook, work, 21, executor=self.executor)

        self.assertEqual(self.run_with_hook(main()), 42)
        self.assertEqual(seen["token"], 1)
        threads = self.agent.wait_for("thread")
        self.assertIn(seen["tid"], [m["tid"] for m in threads])
        self.assertNotEqual(seen["tid"], threading.get_native_id())
        # After the activity the executor thread's slot is back to 0.
        self.assertEqual(self.executor.submit(slot_of_this_thread).result(), 0)
        [end] = self.agent.wait_for("activity_end")
        self.assertEqual(end["output"], 42)

    def test_sync_wrapper_stays_a_plain_function_and_restores_previous(self) -> None:
        terminal = support.Terminal()

        def work() -> int:
            return slot_of_this_thread()

        async def main() -> int:
            return await support.run_activity(
                self.hook, work, executor=self.executor, terminal=terminal
            )

        self.assertEqual(self.run_with_hook(main()), 1)
        wrapped = terminal.inputs[0].fn
        self.assertIsNot(wrapped, work)
        self.assertFalse(asyncio.iscoroutinefunction(wrapped))
        self.assertEqual(wrapped.__name__, "work")
        # Called directly on another thread whose slot holds a token, it registers that
        # thread, runs with its own token and puts the other one back.
        slot = _slots.current()
        _slots.table[slot] = 99
        try:
            self.assertEqual(wrapped(), 1)
            self.assertEqual(_slots.table[slot], 99)
        finally:
            _slots.table[slot] = 0
        self.assertIn(threading.get_native_id(), [m["tid"] for m in self.agent.ops("thread")])

    def test_async_wrapper_stays_a_coroutine_function(self) -> None:
        terminal = support.Terminal()

        async def work() -> str:
            return "x"

        self.run_with_hook(support.run_activity(self.hook, work, terminal=terminal))
        self.assertTrue(asyncio.iscoroutinefunction(terminal.inputs[0].fn))
        self.assertIsNot(terminal.inputs[0].fn, work)

    def test_activity_exception_passes_through_untouched(self) -> None:
        error = ValueError("bad order")

        async def failing() -> None:
            raise error

        def failing_sync() -> None:
            raise error

        for fn, executor in ((failing, None), (failing_sync, self.executor)):
            with self.assertRaises(ValueError) as caught:
                self.run_with_hook(support.run_activity(self.hook, fn, executor=executor))
            self.assertIs(caught.exception, error)
        ends = self.agent.wait_for("activity_end", 2)
        for end in ends:
            self.assertEqual(end["status"], "failed")
            self.assertIsNone(end["output"])
            self.assertEqual(end["error"], {"type": "ValueError", "message": "bad order"})

    def test_cancellation_propagates_and_is_reported(self) -> None:
        async def slow(ready: asyncio.Event) -> None:
            ready.set()
            await asyncio.sleep(30)

        async def main() -> None:
            ready = asyncio.Event()
            task = asyncio.create_task(support.run_activity(self.hook, slow, ready))
            await ready.wait()
            task.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await task

        self.run_with_hook(main())
        [end] = self.agent.wait_for("activity_end")
        self.assertEqual(end["status"], "failed")
        self.assertEqual(end["error"]["type"], "CancelledError")

    def test_child_tasks_of_an_activity_carry_its_token(self) -> None:
        async def child() -> int:
            await asyncio.sleep(0)
            return slot_of_this_thread()

        async def parent() -> list[int]:
            return list(await asyncio.gather(child(), child(), child()))

        async def main():
            return await asyncio.gather(
                support.run_activity(self.hook, parent, activity_id="a"),
                support.run_activity(self.hook, parent, activity_id="b"),
            )

        first, second = self.run_with_hook(main())
        self.assertEqual(len(set(first)), 1)
        self.assertEqual(len(set(second)), 1)
        self.assertEqual({first[0], second[0]}, {1, 2})

    def test_refused_thread_runs_without_writing_its_slot(self) -> None:
        self.agent.refuse_threads = True

        async def work() -> int:
            return slot_of_this_thread()

        def work_sync() -> int:
            return slot_of_this_thread()

        async def main():
            return (
                await support.run_activity(self.hook, work),
                await support.run_activity(self.hook, work),
                await support.run_activity(self.hook, work_sync, executor=self.executor),
            )

        self.assertEqual(self.run_with_hook(main()), (0, 0, 0))
        self.assertEqual(len(self.agent.wait_for("activity_end", 3)), 3)
        # Refused once, never asked again: one loop thread, one executor thread.
        self.assertEqual(len(self.agent.ops("thread")), 2)

    def test_replies_are_matched_by_id_when_out_of_order(self) -> None:
        class SlowFirst(FakeAgent):
            def delay(self, message):
                return 0.2 if message.get("activity_id") == "slow" else 0.0

            def respond(self, message):
                reply = super().respond(message)
                if message.get("op") == "activity_start":
                    self.tokens[message["activity_id"]] = reply["token"]
                return reply

        agent = SlowFirst()
        agent.tokens = {}
        self.addCleanup(agent.close)
        hook = OpenBoxHook(agent.socket_path)

        async def work() -> int:
            await asyncio.sleep(0)
            return slot_of_this_thread()

        async def main():
            slow = asyncio.create_task(support.run_activity(hook, work, activity_id="slow"))
            await asyncio.to_thread(agent.wait_for, "activity_start")  # slow's start is out
            fast = await support.run_activity(hook, work, activity_id="fast")
            return await slow, fast

        slow, fast = support.run(main(), hook)
        self.assertEqual(slow, agent.tokens["slow"])
        self.assertEqual(fast, agent.tokens["fast"])
        self.assertNotEqual(slow, fast)

    def test_agent_restart_reconnects_and_registers_threads_again(self) -> None:
        async def work() -> int:
            return slot_of_this_thread()

        def work_sync() -> int:
            return slot_of_this_thread()

        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "agent.sock")
        first_agent = FakeAgent(path)
        hook = OpenBoxHook(path)

        async def scenario():
            before = (
                await support.run_activity(hook, work),
                await support.run_activity(hook, work_sync, executor=self.executor),
            )
            channel = hook._link._channels[asyncio.get_running_loop()]
            first_agent.close()
            while channel._connection is not None:  # until the loop has seen it go
                await asyncio.sleep(0.01)
            second_agent = FakeAgent(path)
            # The presence connection is back (so its new epoch is already counted).
            await asyncio.to_thread(second_agent.wait_for, "hello")
            try:
                after = (
                    await support.run_activity(hook, work),
                    await support.run_activity(hook, work_sync, executor=self.executor),
                )
                return (
                    before,
                    after,
                    second_agent.wait_for("hello", 3),
                    second_agent.ops("thread"),
                )
            finally:
                second_agent.close()

        before, after, hellos, threads = support.run(scenario(), hook)
        self.assertEqual(before, (1, 2))
        self.assertEqual(after, (1, 2))  # the new agent's tokens, in re-registered slots
        # The presence connection's, the loop's and the blocking one's.
        self.assertEqual(len(hellos), 3)
        self.assertEqual([m["id"] for m in hellos], [1, 1, 1])
        self.assertEqual(len(threads), 2)  # the loop thread and an executor thread
        self.assertIn(threading.get_native_id(), [m["tid"] for m in threads])

    def test_forked_child_connects_and_registers_as_itself(self) -> None:
        async def work() -> int:
            return slot_of_this_thread()

        self.assertEqual(self.run_with_hook(support.run_activity(self.hook, work)), 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
            pid = os.fork()
        if pid == 0:
            ok = False
            try:
                ok = self.run_with_hook(support.run_activity(self.hook, work)) == 2
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        # The parent's presence and loop connections, then the child's own (a child
        # has no presence connection: it was not built as a worker).
        hellos = self.agent.wait_for("hello", 3)
        self.assertEqual(sorted(m["pid"] for m in hellos), sorted([os.getpid(), os.getpid(), pid]))
        self.assertEqual(hellos[-1]["pid"], pid)
        self.assertEqual([m["tid"] for m in self.agent.wait_for("thread", 2)][1], pid)

    def test_process_pool_style_executor_gets_the_original_function(self) -> None:
        class OtherExecutor(concurrent.futures.Executor):
            def submit(self, fn, /, *args, **kwargs):
                future = concurrent.futures.Future()
                future.set_result(fn(*args, **kwargs))
                return future

        terminal = support.Terminal()

        def work() -> str:
            return "ran"

        result = self.run_with_hook(
            support.run_activity(self.hook, work, executor=OtherExecutor(), terminal=terminal)
        )
        self.assertEqual(result, "ran")
        self.assertIs(terminal.inputs[0].fn, work)
        self.assertEqual(len(self.agent.wait_for("activity_end")), 1)


class NoAgentTest(unittest.TestCase):
    def setUp(self) -> None:
        support.reset_warning()
        self.directory = tempfile.TemporaryDirectory()
        self.addCleanup(self.directory.cleanup)
        self.executor = concurrent.futures.ThreadPoolExecutor(2)
        self.addCleanup(self.executor.shutdown)

    def run_many(self, hook: OpenBoxHook, terminal: support.Terminal) -> list:
        async def work(x: int) -> int:
            await asyncio.sleep(0)
            return x + 1

        def work_sync(x: int) -> int:
            return x * 10

        async def main():
            results = []
            for i in range(20):
                results.append(await support.run_activity(hook, work, i, terminal=terminal))
                results.append(
                    await support.run_activity(
                        hook, work_sync, i, executor=self.executor, terminal=terminal
                    )
                )
            return results, (work, work_sync)

        results, originals = support.run(main(), hook)
        for input in terminal.inputs:
            self.assertIn(input.fn, originals)  # nothing wrapped without an agent
        return results

    def expect(self) -> list:
        return [v for i in range(20) for v in (i + 1, i * 10)]

    def test_missing_socket_one_warning_results_unchanged(self) -> None:
        path = os.path.join(self.directory.name, "missing.sock")
        hook = OpenBoxHook(path)
        terminal = support.Terminal()
        with self.assertLogs("openbox.hook", "DEBUG") as logs:
            results = self.run_many(hook, terminal)
            results += self.run_many(OpenBoxHook(path), support.Terminal())
        self.assertEqual(results, self.expect() * 2)
        warned = [r.getMessage() for r in logs.records if r.levelname == "WARNING"]
        self.assertEqual(len(warned), 1, warned)
        self.assertIn(f"openbox-agent not reachable at {path}", warned[0])
        self.assertIn("activities run without capture", warned[0])

    def test_socket_that_refuses(self) -> None:
        path = os.path.join(self.directory.name, "closed.sock")
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(path)  # bound, never listening: connect() is refused
        self.addCleanup(dead.close)
        with self.assertLogs("openbox.hook", "WARNING") as logs:
            results = self.run_many(OpenBoxHook(path), support.Terminal())
        self.assertEqual(results, self.expect())
        self.assertEqual(len(logs.records), 1)

    def test_agent_that_never_answers(self) -> None:
        class Mute(FakeAgent):
            def respond(self, message):
                return None

        agent = Mute()
        self.addCleanup(agent.close)
        # The activity connections' retry interval is what is checked: no presence
        # connection (it retries on its own backoff, see PresenceTest).
        with mock.patch.object(AgentLink, "start_presence", lambda self: None):
            hook = OpenBoxHook(agent.socket_path, timeout=0.05)
        with self.assertLogs("openbox.hook", "WARNING") as logs:
            results = self.run_many(hook, support.Terminal())
        self.assertEqual(results, self.expect())
        self.assertEqual(len(logs.records), 1)
        # The retry interval holds: one hello, not one per activity.
        self.assertEqual(len(agent.ops("hello")), 1)

    def test_agent_refusing_activities_changes_nothing(self) -> None:
        class Declines(FakeAgent):
            def respond(self, message):
                if message.get("op") == "activity_start":
                    return {"ok": False, "error": "not governed"}
                return super().respond(message)

        agent = Declines()
        self.addCleanup(agent.close)
        terminal = support.Terminal()
        results = self.run_many(OpenBoxHook(agent.socket_path), terminal)
        self.assertEqual(results, self.expect())
        self.assertEqual(agent.ops("activity_end"), [])


class FailClosedNoAgentTest(unittest.TestCase):
    """fail_closed without an agent: nothing governs the activities, so none runs."""

    CONFIG = {"governance_policy": "fail_closed"}

    def setUp(self) -> None:
        support.reset_warning()
        self.directory = tempfile.TemporaryDirectory()
        self.addCleanup(self.directory.cleanup)
        self.executor = concurrent.futures.ThreadPoolExecutor(2)
        self.addCleanup(self.executor.shutdown)

    def run_both(self, hook: OpenBoxHook, terminal: support.Terminal) -> list[BaseException]:
        """An async and a sync activity, each 5 times: the exceptions they raised."""

        async def work() -> str:
            return "ran"

        def work_sync() -> str:
            return "ran"

        async def main() -> list[BaseException]:
            raised = []
            for _ in range(5):
                for fn, executor in ((work, None), (work_sync, self.executor)):
                    try:
                        await support.run_activity(hook, fn, executor=executor, terminal=terminal)
                    except BaseException as exc:
                        raised.append(exc)
            return raised

        return support.run(main(), hook)

    def assert_halted(self, raised: list[BaseException], path: str, count: int = 10) -> None:
        self.assertEqual(len(raised), count, raised)
        for exc in raised:
            self.assertIsInstance(exc, ApplicationError)
            assert isinstance(exc, ApplicationError)
            self.assertEqual(exc.type, "GovernanceHalt")
            self.assertTrue(exc.non_retryable)
            self.assertIn(f"openbox-agent unreachable at {path}", exc.message)
            self.assertIn("fail_closed", exc.message)

    def test_missing_socket_fails_every_activity_unrun(self) -> None:
        path = os.path.join(self.directory.name, "missing.sock")
        terminal = support.Terminal()
        with self.assertLogs("openbox.hook", "WARNING") as logs:
            raised = self.run_both(OpenBoxHook(path, config=self.CONFIG), terminal)
        self.assert_halted(raised, path)
        self.assertIn("No such file", raised[0].message)
        self.assertEqual(terminal.inputs, [])  # no activity ran
        self.assertEqual(len(logs.records), 1)
        self.assertIn(f"openbox-agent not reachable at {path}", logs.records[0].getMessage())
        self.assertIn("GovernanceHalt", logs.records[0].getMessage())

    def test_refused_socket_and_policy_from_the_environment(self) -> None:
        path = os.path.join(self.directory.name, "closed.sock")
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(path)  # bound, never listening: connect() is refused
        self.addCleanup(dead.close)
        terminal = support.Terminal()
        with mock.patch.dict("os.environ", {"OPENBOX_GOVERNANCE_POLICY": "fail_closed"}):
            hook = OpenBoxHook(path)
        with self.assertLogs("openbox.hook", "WARNING"):
            raised = self.run_both(hook, terminal)
        self.assert_halted(raised, path)
        self.assertIn("refused", raised[0].message)
        self.assertEqual(terminal.inputs, [])

    def test_agent_gone_mid_run_withholds_the_outcome(self) -> None:
        agent = FakeAgent()
        self.addCleanup(agent.close)
        hook = OpenBoxHook(agent.socket_path, config=self.CONFIG)
        terminal = support.Terminal()

        async def dies() -> str:
            agent.close()  # the agent goes away while the activity runs
            return "ran"

        async def main() -> BaseException | None:
            try:
                await support.run_activity(hook, dies, terminal=terminal)
            except BaseException as exc:
                return exc
            return None

        with self.assertLogs("openbox.hook", "WARNING"):
            raised = support.run(main(), hook)
        self.assertEqual(len(terminal.inputs), 1)  # it ran: the agent was there at start
        assert raised is not None
        self.assert_halted([raised], agent.socket_path, count=1)
        self.assertIn("outcome is withheld", raised.message)  # type: ignore[attr-defined]

    def test_fail_open_keeps_running_without_capture(self) -> None:
        path = os.path.join(self.directory.name, "missing.sock")
        terminal = support.Terminal()
        with self.assertLogs("openbox.hook", "WARNING") as logs:
            raised = self.run_both(
                OpenBoxHook(path, config={"governance_policy": "fail_open"}), terminal
            )
        self.assertEqual(raised, [])
        self.assertEqual(len(terminal.inputs), 10)
        self.assertIn("activities run without capture", logs.records[0].getMessage())


if __name__ == "__main__":
    unittest.main()


class PresenceTest(unittest.TestCase):
    """The hook registers the worker when it is built, not at its first activity, and
    again by itself when the agent comes back."""

    def setUp(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.path = os.path.join(directory.name, "agent.sock")

    def test_hello_when_built_and_again_when_a_restarted_agent_is_back(self) -> None:
        first = FakeAgent(self.path)
        hook = OpenBoxHook(self.path)
        self.addCleanup(hook.close)
        [hello] = first.wait_for("hello")  # no activity ran
        self.assertEqual(hello["pid"], os.getpid())
        self.assertEqual(first.ops("activity_start"), [])
        epoch = hook._link.epoch
        first.close()
        second = FakeAgent(self.path)
        self.addCleanup(second.close)
        [hello] = second.wait_for("hello", timeout=10)
        self.assertEqual(hello["pid"], os.getpid())
        # Threads registered with the old agent register again before their next activity.
        self.assertGreater(hook._link.epoch, epoch)

    def test_a_hook_built_before_the_agent_starts_registers_when_it_does(self) -> None:
        hook = OpenBoxHook(self.path)
        self.addCleanup(hook.close)
        agent = FakeAgent(self.path)
        self.addCleanup(agent.close)
        [hello] = agent.wait_for("hello", timeout=10)
        self.assertEqual(hello["pid"], os.getpid())

    def test_close_ends_the_presence_connection(self) -> None:
        agent = FakeAgent(self.path)
        self.addCleanup(agent.close)
        hook = OpenBoxHook(self.path)
        agent.wait_for("hello")
        presence = hook._link._presence
        hook.close()
        presence.join(5)
        self.assertFalse(presence.is_alive())
