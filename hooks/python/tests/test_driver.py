"""The per-step driver and the task factory: the slot holds a token exactly during steps."""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import types
import unittest

import support  # noqa: F401  (import path)

from openbox_hook import _driver, _slots

SLOT = _slots.current()  # the test thread's slot: asyncio.run loops run on it


def slot_value() -> int:
    # Read through the published address, as the kernel does, not through the view.
    return ctypes.c_uint64.from_address(_slots.address + 8 * SLOT).value


def mark(token: int) -> _driver.Mark:
    return _driver.Mark(token, lambda: SLOT)


def drive(coro, token: int) -> _driver.StepDriver:
    return _driver.StepDriver(coro, mark(token), SLOT)


def run(main):
    """asyncio.run with our task factory on the loop, as the interceptor installs it."""

    async def with_factory():
        _driver.install_task_factory(asyncio.get_running_loop())
        return await main()

    return asyncio.run(with_factory())


class StepDriverTest(unittest.TestCase):
    def setUp(self) -> None:
        _slots.table[SLOT] = 0

    def test_slot_holds_token_during_each_step_and_zero_between(self) -> None:
        seen_inside: list[int] = []
        seen_between: list[int] = []

        async def activity() -> str:
            for _ in range(5):
                seen_inside.append(slot_value())
                await asyncio.sleep(0)
            seen_inside.append(slot_value())
            return "done"

        async def observer(stop: asyncio.Event) -> None:
            while not stop.is_set():
                seen_between.append(slot_value())
                await asyncio.sleep(0)

        async def main() -> str:
            stop = asyncio.Event()
            watcher = asyncio.create_task(observer(stop))
            result = await drive(activity(), 42)
            stop.set()
            await watcher
            return result

        self.assertEqual(run(main), "done")
        self.assertEqual(seen_inside, [42] * 6)
        self.assertGreaterEqual(len(seen_between), 5)
        self.assertEqual(set(seen_between), {0})
        self.assertEqual(slot_value(), 0)

    def test_previous_value_is_restored_not_zeroed(self) -> None:
        async def inner() -> int:
            return slot_value()

        async def main() -> tuple[int, int]:
            _slots.table[SLOT] = 7
            inside = await drive(inner(), 9)
            return inside, slot_value()

        self.assertEqual(run(main), (9, 7))

    def test_values_sent_in_and_returned_pass_through(self) -> None:
        async def inner(future: asyncio.Future) -> tuple[str, int]:
            value = await future
            return value, slot_value()

        async def main():
            future = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.01, future.set_result, "hello")
            return await drive(inner(future), 5)

        self.assertEqual(run(main), ("hello", 5))

    def test_exception_raised_by_the_coroutine_is_the_same_object(self) -> None:
        error = ValueError("boom")

        async def inner() -> None:
            await asyncio.sleep(0)
            raise error

        async def main() -> None:
            await drive(inner(), 3)

        with self.assertRaises(ValueError) as caught:
            run(main)
        self.assertIs(caught.exception, error)
        self.assertEqual(slot_value(), 0)

    def test_exception_thrown_in_reaches_the_coroutine_with_token_set(self) -> None:
        async def inner(future: asyncio.Future) -> tuple[str, int]:
            try:
                await future
            except KeyError as exc:
                return f"caught {exc.args[0]}", slot_value()
            return "not caught", 0

        async def main():
            future = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(future.set_exception, KeyError("k"))
            return await drive(inner(future), 11)

        self.assertEqual(run(main), ("caught k", 11))

    def test_cancellation_reaches_the_coroutine_and_propagates(self) -> None:
        log: list[tuple[str, int]] = []

        async def inner() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                log.append(("cancelled", slot_value()))
                raise
            finally:
                log.append(("finally", slot_value()))

        async def main() -> None:
            task = asyncio.create_task(drive(inner(), 13))
            await asyncio.sleep(0.01)
            task.cancel("stop")
            with self.assertRaises(asyncio.CancelledError):
                await task
            log.append(("after", slot_value()))

        run(main)
        self.assertEqual(log, [("cancelled", 13), ("finally", 13), ("after", 0)])

    def test_cancellation_can_be_absorbed_by_the_coroutine(self) -> None:
        async def inner() -> str:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                return "absorbed"
            return "slept"

        async def main() -> str:
            task = asyncio.create_task(drive(inner(), 1))
            await asyncio.sleep(0.01)
            task.cancel()
            return await task

        self.assertEqual(run(main), "absorbed")

    def test_close_closes_the_inner_coroutine_with_token_set(self) -> None:
        log: list[tuple[str, int]] = []

        async def inner() -> None:
            try:
                await asyncio.sleep(10)
            finally:
                log.append(("finally", slot_value()))

        async def main() -> None:
            coro = inner()
            driver = drive(coro, 17)
            driver.send(None)  # first step: suspends in sleep
            driver.close()
            log.append(("closed", coro.cr_frame is None))

        run(main)
        self.assertEqual(log, [("finally", 17), ("closed", True)])

    def test_closing_an_awaiting_coroutine_closes_the_driven_one(self) -> None:
        log: list[object] = []

        @types.coroutine
        def suspend():
            yield "suspended"

        async def inner() -> None:
            try:
                await suspend()
            except GeneratorExit:
                log.append(("GeneratorExit", slot_value()))
                raise

        async def outer() -> None:
            await drive(inner(), 2)

        coro = outer()
        log.append(coro.send(None))  # what the driven coroutine yields reaches the top
        coro.close()
        self.assertEqual(log, ["suspended", ("GeneratorExit", 2)])
        self.assertEqual(slot_value(), 0)

    def test_interleaved_activities_each_see_only_their_own_token(self) -> None:
        seen: dict[int, set[int]] = {21: set(), 22: set()}

        async def activity(token: int) -> None:
            for _ in range(20):
                seen[token].add(slot_value())
                await asyncio.sleep(0)

        async def main() -> None:
            await asyncio.gather(drive(activity(21), 21), drive(activity(22), 22))

        run(main)
        self.assertEqual(seen, {21: {21}, 22: {22}})

    def test_driver_is_a_coroutine_for_tasks_and_awaits(self) -> None:
        async def inner() -> int:
            return 1

        driver = drive(inner(), 1)
        self.assertTrue(asyncio.iscoroutine(driver))
        self.assertIsNotNone(driver.cr_frame)
        driver.close()


class TaskFactoryTest(unittest.TestCase):
    def setUp(self) -> None:
        _slots.table[SLOT] = 0

    @staticmethod
    async def in_activity(token: int, body):
        """Run ``body()`` the way the interceptor runs an async activity."""
        activity_mark = mark(token)
        scope = _driver.current.set(activity_mark)
        try:
            return await _driver.StepDriver(body(), activity_mark, SLOT)
        finally:
            activity_mark.token = 0
            _driver.current.reset(scope)

    def test_gather_children_carry_the_token(self) -> None:
        async def child() -> list[int]:
            values = []
            for _ in range(3):
                values.append(slot_value())
                await asyncio.sleep(0)
            return values

        async def body():
            return await asyncio.gather(child(), child())

        async def main():
            return await self.in_activity(31, body)

        self.assertEqual(run(main), [[31, 31, 31], [31, 31, 31]])

    def test_create_task_and_task_group_children_carry_the_token(self) -> None:
        async def child() -> int:
            await asyncio.sleep(0)
            return slot_value()

        async def body():
            task = asyncio.create_task(child())
            async with asyncio.TaskGroup() as group:
                grouped = group.create_task(child())
            return await task, grouped.result()

        async def main():
            return await self.in_activity(32, body)

        self.assertEqual(run(main), (32, 32))

    def test_child_steps_do_not_leak_into_unrelated_tasks(self) -> None:
        outside: list[int] = []

        async def unrelated(stop: asyncio.Event) -> None:
            while not stop.is_set():
                outside.append(slot_value())
                await asyncio.sleep(0)

        async def child() -> None:
            for _ in range(5):
                await asyncio.sleep(0)

        async def body():
            await asyncio.gather(child(), child())

        async def main() -> None:
            stop = asyncio.Event()
            watcher = asyncio.create_task(unrelated(stop))
            await self.in_activity(33, body)
            stop.set()
            await watcher

        run(main)
        self.assertGreater(len(outside), 3)
        self.assertEqual(set(outside), {0})

    def test_tasks_outside_activities_are_untouched(self) -> None:
        async def plain() -> int:
            return slot_value()

        async def main():
            task = asyncio.create_task(plain())
            return type(task.get_coro()).__name__, await task

        self.assertEqual(run(main), ("coroutine", 0))

    def test_a_task_that_outlives_its_activity_stops_carrying_the_token(self) -> None:
        async def lingering(release: asyncio.Event) -> tuple[int, int]:
            before = slot_value()
            await release.wait()
            return before, slot_value()

        async def main():
            release = asyncio.Event()
            holder = {}

            async def body() -> None:
                holder["task"] = asyncio.create_task(lingering(release))
                await asyncio.sleep(0)  # let the child take its first step

            await self.in_activity(34, body)
            release.set()
            return await holder["task"]

        self.assertEqual(run(main), (34, 0))

    def test_explicit_context_decides(self) -> None:
        async def child() -> int:
            return slot_value()

        async def main():
            inside = mark(35)
            context = contextvars.copy_context()
            context.run(_driver.current.set, inside)
            with_mark = asyncio.get_running_loop().create_task(child(), context=context)
            return await with_mark

        self.assertEqual(run(main), 35)

    def test_existing_factory_is_chained_and_install_is_idempotent(self) -> None:
        created: list[object] = []

        def previous_factory(loop, coro, **kwargs):
            created.append(coro)
            return asyncio.Task(coro, loop=loop, **kwargs)

        async def child() -> int:
            return slot_value()

        async def main():
            loop = asyncio.get_running_loop()
            loop.set_task_factory(previous_factory)
            _driver.install_task_factory(loop)
            factory = loop.get_task_factory()
            _driver.install_task_factory(loop)
            self.assertIs(loop.get_task_factory(), factory)

            async def body():
                return await asyncio.create_task(child())

            return await self.in_activity(36, body)

        self.assertEqual(run(main), 36)
        self.assertTrue(any(isinstance(coro, _driver.StepDriver) for coro in created))

    @unittest.skipUnless(hasattr(asyncio, "eager_task_factory"), "Python 3.12+")
    def test_eager_children_carry_the_token_and_give_it_back(self) -> None:
        async def child() -> int:
            return slot_value()  # runs eagerly, inside the parent's step

        async def main():
            loop = asyncio.get_running_loop()
            loop.set_task_factory(asyncio.eager_task_factory)
            _driver.install_task_factory(loop)

            async def body():
                task = asyncio.create_task(child())
                done_eagerly = task.done()
                return done_eagerly, await task, slot_value()

            return await self.in_activity(38, body), slot_value()

        self.assertEqual(run(main), ((True, 38, 38), 0))

    def test_non_coroutines_are_still_rejected(self) -> None:
        async def main() -> None:
            async def body():
                with self.assertRaises(TypeError):
                    asyncio.get_running_loop().create_task(object())  # type: ignore[arg-type]

            await self.in_activity(37, body)

        run(main)


if __name__ == "__main__":
    unittest.main()
