"""Governance decisions carried out by the activity interceptor, against the fake agent."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import unittest

import support
from fake_agent import FakeAgent

from temporalio.exceptions import ApplicationError

from openbox_hook import OpenBoxHook, _decision


@dataclasses.dataclass
class Address:
    street: str
    city: str


@dataclasses.dataclass
class Item:
    sku: str
    note: str


@dataclasses.dataclass
class Order:
    customer: str
    card: str
    address: Address
    items: list[Item]
    tags: list[str]


@dataclasses.dataclass(frozen=True)
class Frozen:
    secret: str
    keep: int


@dataclasses.dataclass
class Reply:
    text: str
    tokens: int


def order() -> Order:
    return Order(
        customer="ann",
        card="4111-1111",
        address=Address("1 Main St", "Springfield"),
        items=[Item("a1", "gift"), Item("b2", "call 555-0100")],
        tags=["x", "y", "z"],
    )


def fail(error_type: str, message: str, non_retryable: bool = True) -> dict:
    return {
        "action": "fail",
        "error_type": error_type,
        "message": message,
        "non_retryable": non_retryable,
    }


def proceed(redaction=None, constrained: bool = False, verdict: str = "allow") -> dict:
    return {
        "action": "continue",
        "verdict": verdict,
        "constrained": constrained,
        "redaction": redaction,
    }


class DecisionTest(unittest.TestCase):
    def setUp(self) -> None:
        self.agent = FakeAgent()
        self.addCleanup(self.agent.close)
        self.hook = OpenBoxHook(self.agent.socket_path)
        self.executor = concurrent.futures.ThreadPoolExecutor(2)
        self.addCleanup(self.executor.shutdown)
        self.ran: list = []

    def script(self, op: str, decision, activity_type: str = "act") -> None:
        self.agent.decisions[(op, activity_type)] = decision

    def run_activity(self, fn, *args, **kwargs):
        return support.run(support.run_activity(self.hook, fn, *args, **kwargs), self.hook)

    def work(self, *args):
        async def work(*args):
            self.ran.append(args)
            return "done"

        return work

    # -- refusals at activity_start -------------------------------------------------

    def assert_refused_before_running(
        self, decision: dict, error_type: str, message: str, non_retryable: bool
    ) -> None:
        self.script("activity_start", decision)
        with self.assertRaises(ApplicationError) as caught:
            self.run_activity(self.work(), "arg")
        error = caught.exception
        self.assertEqual(error.message, message)
        self.assertEqual(error.type, error_type)
        self.assertIs(error.non_retryable, non_retryable)
        self.assertEqual(self.ran, [], "the activity must not run")
        [start] = self.agent.wait_for("activity_start")
        [end] = self.agent.wait_for("activity_end")
        self.assertEqual(self.agent.started[end["token"]], start)  # the start's own token
        self.assertEqual(end["status"], "failed")
        self.assertIsNone(end["output"])
        # str() of the exception, as for any failed activity (temporalio puts the type first).
        self.assertEqual(end["error"], {"type": "ApplicationError", "message": str(error)})
        self.assertTrue(str(error).endswith(message))
        self.assertEqual(end["input"], ["arg"])
        self.assertEqual(start["input"], ["arg"])

    def test_block_fails_the_activity_non_retryably_without_running_it(self) -> None:
        self.assert_refused_before_running(
            fail("GovernanceBlock", "Governance blocked: no PII"),
            "GovernanceBlock",
            "Governance blocked: no PII",
            True,
        )

    def test_halt(self) -> None:
        self.assert_refused_before_running(
            fail("GovernanceHalt", "Governance blocked: stop everything"),
            "GovernanceHalt",
            "Governance blocked: stop everything",
            True,
        )

    def test_guardrails_validation_failure(self) -> None:
        self.assert_refused_before_running(
            fail("GuardrailsValidationFailed", "Guardrails validation failed: pii; toxicity"),
            "GuardrailsValidationFailed",
            "Guardrails validation failed: pii; toxicity",
            True,
        )

    def test_approval_rejected_and_expired_keep_the_agents_flags(self) -> None:
        for error_type, message in (
            ("ApprovalRejected", "Activity rejected: no"),
            ("ApprovalExpired", "Approval expired"),
        ):
            with self.subTest(error_type):
                self.setUp()
                self.assert_refused_before_running(
                    fail(error_type, message), error_type, message, True
                )

    def test_a_retryable_fail_stays_retryable(self) -> None:
        self.assert_refused_before_running(
            fail("GovernanceBlock", "try later", non_retryable=False),
            "GovernanceBlock",
            "try later",
            False,
        )

    def test_approval_pending_is_retryable(self) -> None:
        self.assert_refused_before_running(
            {"action": "approval_pending", "message": "Approval required: payments"},
            "ApprovalPending",
            "Approval required: payments",
            False,
        )

    def test_sync_activity_is_refused_before_the_executor_runs_it(self) -> None:
        def work_sync(x):
            self.ran.append(x)

        self.script("activity_start", fail("GovernanceBlock", "no"))
        with self.assertRaises(ApplicationError):
            self.run_activity(work_sync, 1, executor=self.executor)
        self.assertEqual(self.ran, [])
        self.assertEqual(self.agent.wait_for("activity_end")[0]["status"], "failed")

    # -- input redaction -----------------------------------------------------------

    def test_input_redaction_merges_into_a_dataclass_argument_in_place(self) -> None:
        seen = {}
        original = order()

        async def place(o: Order, count: int) -> str:
            seen["order"] = o
            seen["copy"] = dataclasses.replace(
                o,
                address=dataclasses.replace(o.address),
                items=[dataclasses.replace(i) for i in o.items],
                tags=list(o.tags),
            )
            seen["count"] = count
            return "ok"

        redaction = {
            "target": "input",
            "args": [
                {
                    "index": 0,
                    "value": {
                        "card": "[REDACTED]",
                        "address": {"street": "[REDACTED]", "zip": "ignored"},
                        "items": [{}, {"note": "call [REDACTED]", "extra": 1}],
                        "tags": ["X"],
                        "not_a_field": "ignored",
                    },
                }
            ],
        }
        self.script("activity_start", proceed(redaction))
        self.assertEqual(self.run_activity(place, original, 3), "ok")
        self.assertIs(seen["order"], original, "merged into the object the activity holds")
        self.assertEqual(
            seen["copy"],
            Order(
                customer="ann",
                card="[REDACTED]",
                address=Address("[REDACTED]", "Springfield"),
                items=[Item("a1", "gift"), Item("b2", "call [REDACTED]")],
                tags=["X", "y", "z"],
            ),
        )
        self.assertEqual(seen["count"], 3)
        [start] = self.agent.wait_for("activity_start")
        [end] = self.agent.wait_for("activity_end")
        self.assertEqual(start["input"][0]["card"], "4111-1111")  # what the agent governed
        self.assertEqual(
            end["input"],
            [
                {
                    "customer": "ann",
                    "card": "[REDACTED]",
                    "address": {"street": "[REDACTED]", "city": "Springfield"},
                    "items": [
                        {"sku": "a1", "note": "gift"},
                        {"sku": "b2", "note": "call [REDACTED]"},
                    ],
                    "tags": ["X", "y", "z"],
                },
                3,
            ],
        )

    def test_input_redaction_replaces_a_plain_dict_argument(self) -> None:
        seen = []

        async def prompt(request: dict, model: str) -> str:
            seen.append((request, model))
            return "ok"

        redaction = {
            "target": "input",
            "args": [
                {"index": 0, "value": {"prompt": "[REDACTED]"}},
                {"index": 1, "value": {"model": "safe"}},
                {"index": 5, "value": {"beyond": "the arguments: ignored"}},
            ],
        }
        self.script("activity_start", proceed(redaction))
        request = {"prompt": "my SSN is 123-45-6789", "temperature": 0.2}
        self.assertEqual(self.run_activity(prompt, request, "gpt"), "ok")
        # Replaced, not merged: the activity really runs with the agent's values.
        self.assertEqual(seen, [({"prompt": "[REDACTED]"}, {"model": "safe"})])
        self.assertEqual(request["prompt"], "my SSN is 123-45-6789")  # the caller's copy
        [end] = self.agent.wait_for("activity_end")
        self.assertEqual(end["input"], [{"prompt": "[REDACTED]"}, {"model": "safe"}])

    def test_input_redaction_reaches_a_sync_activity_on_the_executor(self) -> None:
        seen = []

        def work_sync(o: Order, note: str) -> str:
            seen.append((o.card, note))
            return "ok"

        redaction = {
            "target": "input",
            "args": [{"index": 0, "value": {"card": "****"}}, {"index": 1, "value": {"n": 1}}],
        }
        self.script("activity_start", proceed(redaction))
        self.run_activity(work_sync, order(), "free text", executor=self.executor)
        self.assertEqual(seen, [("****", {"n": 1})])

    def test_input_redaction_updates_a_frozen_dataclass(self) -> None:
        seen = []

        async def work(f: Frozen) -> None:
            seen.append(f)

        self.script(
            "activity_start",
            proceed({"target": "input", "args": [{"index": 0, "value": {"secret": "***"}}]}),
        )
        self.run_activity(work, Frozen("s3cret", 7))
        self.assertEqual(seen, [Frozen("***", 7)])

    def test_activity_end_carries_the_input_also_without_redaction(self) -> None:
        self.run_activity(self.work(), {"a": 1}, [2])
        [end] = self.agent.wait_for("activity_end")
        self.assertEqual(end["input"], [{"a": 1}, [2]])

    # -- activity_end decisions -----------------------------------------------------

    def test_output_redaction_merges_into_a_dataclass_result(self) -> None:
        result = Reply("the card is 4111-1111", 12)

        async def answer() -> Reply:
            return result

        self.script(
            "activity_end",
            proceed({"target": "output", "value": {"text": "the card is [REDACTED]", "x": 1}}),
        )
        returned = self.run_activity(answer)
        self.assertIs(returned, result)
        self.assertEqual(returned, Reply("the card is [REDACTED]", 12))
        [end] = self.agent.wait_for("activity_end")
        self.assertEqual(end["output"], {"text": "the card is 4111-1111", "tokens": 12})

    def test_output_redaction_replaces_a_plain_result(self) -> None:
        for result, value in (
            ({"text": "secret", "n": 1}, {"text": "[REDACTED]"}),
            ("secret", "[REDACTED]"),
            (Reply("x", 1), "not an object: replaces the dataclass"),
            ([1, 2], [3]),
        ):
            with self.subTest(result=result):

                async def answer(result=result):
                    return result

                self.script("activity_end", proceed({"target": "output", "value": value}))
                self.assertEqual(self.run_activity(answer), value)

    def test_null_output_redaction_leaves_the_result(self) -> None:
        async def answer():
            return "kept"

        self.script("activity_end", proceed({"target": "output", "value": None}))
        self.assertEqual(self.run_activity(answer), "kept")

    def test_fail_at_activity_end_replaces_the_result_after_the_work(self) -> None:
        async def send_email(to: str) -> str:
            self.ran.append(to)
            return "sent"

        for decision, error_type, non_retryable in (
            (fail("GovernanceBlock", "Governance blocked: exfiltration"), "GovernanceBlock", True),
            (fail("GovernanceHalt", "Governance blocked: halt"), "GovernanceHalt", True),
            (
                {"action": "approval_pending", "message": "Approval required"},
                "ApprovalPending",
                False,
            ),
        ):
            with self.subTest(error_type):
                self.ran.clear()
                self.script("activity_end", decision)
                with self.assertRaises(ApplicationError) as caught:
                    self.run_activity(send_email, "bob@example.com")
                self.assertEqual(caught.exception.type, error_type)
                self.assertIs(caught.exception.non_retryable, non_retryable)
                self.assertEqual(self.ran, ["bob@example.com"])  # the work happened
        ends = self.agent.wait_for("activity_end", 3)
        self.assertEqual([e["status"] for e in ends], ["completed"] * 3)
        self.assertEqual([e["output"] for e in ends], ["sent"] * 3)
        # One activity_end each: the decision is not reported back.
        self.assertEqual(len(self.agent.ops("activity_end")), 3)

    def test_fail_at_activity_end_of_a_failed_activity_replaces_its_exception(self) -> None:
        original = ValueError("boom")

        async def broken():
            raise original

        self.script("activity_end", fail("GovernanceBlock", "Governance blocked: x"))
        with self.assertRaises(ApplicationError) as caught:
            self.run_activity(broken)
        self.assertEqual(caught.exception.type, "GovernanceBlock")
        self.assertIs(caught.exception.__cause__, original)
        [end] = self.agent.wait_for("activity_end")
        self.assertEqual(end["error"], {"type": "ValueError", "message": "boom"})

    def test_a_failed_activity_without_a_fail_decision_keeps_its_exception(self) -> None:
        original = ValueError("boom")

        async def broken():
            raise original

        self.script("activity_end", proceed({"target": "output", "value": "ignored"}))
        with self.assertRaises(ValueError) as caught:
            self.run_activity(broken)
        self.assertIs(caught.exception, original)

    def test_cancellation_is_never_replaced(self) -> None:
        self.script("activity_end", fail("GovernanceBlock", "no"))

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

        support.run(main(), self.hook)
        self.assertEqual(self.agent.wait_for("activity_end")[0]["error"]["type"], "CancelledError")

    def test_the_end_decision_is_ignored_when_the_start_refused(self) -> None:
        self.script("activity_start", fail("GovernanceBlock", "first"))
        self.script("activity_end", fail("GovernanceHalt", "second"))
        with self.assertRaises(ApplicationError) as caught:
            self.run_activity(self.work())
        self.assertEqual(
            (caught.exception.type, caught.exception.message), ("GovernanceBlock", "first")
        )

    # -- continue, constrain, malformed -------------------------------------------------

    def test_constrain_continues_and_logs_once_per_activity(self) -> None:
        self.script("activity_start", proceed(constrained=True, verdict="constrain"))
        self.script("activity_end", proceed(constrained=True, verdict="constrain"))
        with self.assertLogs("openbox.hook", "INFO") as logs:
            self.assertEqual(self.run_activity(self.work(), 1), "done")
            self.assertEqual(self.run_activity(self.work(), 2), "done")
        self.assertEqual(self.ran, [(1,), (2,)])
        constrained = [r for r in logs.records if "constrained" in r.getMessage()]
        self.assertEqual(len(constrained), 2, [r.getMessage() for r in logs.records])
        self.assertEqual(constrained[0].levelno, logging.INFO)
        self.assertIn("activity act", constrained[0].getMessage())

    def test_plain_continue_and_no_decision_change_nothing(self) -> None:
        for decision in (proceed(), {"action": "continue", "verdict": None, "constrained": False}):
            with self.subTest(decision=decision):
                self.script("activity_start", decision)
                self.script("activity_end", decision)
                self.assertEqual(self.run_activity(self.work(), {"a": 1}), "done")

    def test_malformed_decisions_continue_unchanged(self) -> None:
        malformed = [
            "block",
            ["fail"],
            {"action": "stop"},
            {"verdict": "block"},
            {"action": "fail", "message": "no type"},
            {"action": "fail", "error_type": "", "message": "empty type"},
            {"action": "fail", "error_type": 7, "message": "x"},
            {"action": "fail", "error_type": "GovernanceBlock", "message": None},
            {
                "action": "fail",
                "error_type": "GovernanceBlock",
                "message": "m",
                "non_retryable": "yes",
            },
            {"action": "approval_pending"},
            {"action": "continue", "constrained": "yes"},
            proceed({"target": "elsewhere"}),
            proceed({"target": "input", "args": {"index": 0}}),
            proceed({"target": "input", "args": [{"index": -1, "value": {}}]}),
            proceed({"target": "input", "args": [{"index": "0", "value": {}}]}),
            proceed({"target": "input", "args": [{"index": 0}]}),
            # One bad entry spoils the whole redaction: nothing is half-applied.
            proceed({"target": "input", "args": [{"index": 0, "value": {"p": "R"}}, "bad"]}),
            proceed({"target": "output"}),
            proceed("redact"),
        ]
        seen = []

        async def work(request: dict) -> dict:
            seen.append(dict(request))
            return {"result": 1}

        _decision._malformed_warned = False
        self.agent.check_replies = False  # off the protocol on purpose
        with self.assertLogs("openbox.hook", "DEBUG") as logs:
            for decision in malformed:
                with self.subTest(decision=decision):
                    self.script("activity_start", decision)
                    self.script("activity_end", decision)
                    self.assertEqual(self.run_activity(work, {"p": "x"}), {"result": 1})
        self.assertEqual(seen, [{"p": "x"}] * len(malformed))
        warnings = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("decision the hook cannot read", warnings[0])
        self.assertIn("continues unchanged", warnings[0])

    def test_redaction_for_the_other_stage_is_ignored(self) -> None:
        seen = []

        async def work(x):
            seen.append(x)
            return "result"

        self.script("activity_start", proceed({"target": "output", "value": "nope"}))
        self.script(
            "activity_end", proceed({"target": "input", "args": [{"index": 0, "value": {}}]})
        )
        self.assertEqual(self.run_activity(work, "arg"), "result")
        self.assertEqual(seen, ["arg"])

    def test_a_decision_slower_than_the_hook_timeout_is_still_awaited(self) -> None:
        class Slow(FakeAgent):
            def delay(self, message):
                return 0.3 if message.get("op") == "activity_start" else 0.0

        agent = Slow()
        self.addCleanup(agent.close)
        agent.decisions[("activity_start", "act")] = fail("GovernanceBlock", "slow but sure")
        hook = OpenBoxHook(agent.socket_path, timeout=0.05, config={"governance_timeout": 0.5})
        self.assertEqual(hook._link.governed_timeout, 5.5)
        with self.assertRaises(ApplicationError) as caught:
            support.run(support.run_activity(hook, self.work()), hook)
        self.assertEqual(caught.exception.type, "GovernanceBlock")
        self.assertEqual(self.ran, [])


class MergeTest(unittest.TestCase):
    """``merge_dataclass`` is the SDK's ``_deep_update_dataclass``."""

    def test_lists_update_element_wise_up_to_the_shorter(self) -> None:
        o = order()
        _decision.merge_dataclass(o, {"tags": ["A", "B", "C", "D"], "items": [{"sku": "z"}]})
        self.assertEqual(o.tags, ["A", "B", "C"])
        self.assertEqual(o.items, [Item("z", "gift"), Item("b2", "call 555-0100")])

    def test_a_non_object_replaces_a_nested_dataclass_and_a_list_item(self) -> None:
        o = order()
        _decision.merge_dataclass(o, {"address": "[REDACTED]", "items": ["gone"]})
        self.assertEqual(o.address, "[REDACTED]")
        self.assertEqual(o.items[0], "gone")
        self.assertEqual(o.items[1], Item("b2", "call 555-0100"))

    def test_redact_args_replaces_a_dataclass_given_a_non_object(self) -> None:
        o = order()
        self.assertEqual(
            _decision.redact_args([o, 1], [(0, ["x"]), (1, {"y": 2})]), [["x"], {"y": 2}]
        )


if __name__ == "__main__":
    unittest.main()
