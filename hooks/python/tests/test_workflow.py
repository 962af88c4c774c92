"""Workflow events: the error object, and a real worker on a Temporal dev server.

The dev-server tests run the worker with the default (sandboxed) workflow runner, in a
child process (``devserver_worker.py``). They need the ``temporal`` CLI binary: set
``OPENBOX_TEMPORAL_BIN`` to its path (e.g. ``/root/.cache/openbox/go/bin/temporal``);
without it they are skipped (nothing is downloaded).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import unittest

import support  # noqa: F401  (import path)
from fake_agent import FakeAgent

from temporalio.exceptions import ActivityError, ApplicationError, RetryState

from openbox_hook import _workflow

TEMPORAL_BIN = os.environ.get("OPENBOX_TEMPORAL_BIN")


def activity_error(cause: BaseException) -> ActivityError:
    error = ActivityError(
        "Activity task failed",
        scheduled_event_id=5,
        started_event_id=6,
        identity="w",
        activity_type="charge",
        activity_id="1",
        retry_state=RetryState.NON_RETRYABLE_FAILURE,
    )
    error.__cause__ = cause
    return error


class ErrorObjectTest(unittest.TestCase):
    """The WorkflowFailed ``error`` (openbox-core-protocol.md §2.3)."""

    def test_activity_error_with_a_governance_cause(self) -> None:
        block = ApplicationError(
            "Governance blocked: x", type="GovernanceBlock", non_retryable=True
        )
        self.assertEqual(
            _workflow._error_object(activity_error(block)),
            {
                "type": "ActivityError",
                "message": "Activity task failed",
                "cause": {
                    "type": "ApplicationError",
                    "message": str(block),
                    "error_type": "GovernanceBlock",
                    "non_retryable": True,
                },
            },
        )

    def test_root_cause_is_the_causes_cause_without_non_retryable(self) -> None:
        root = ApplicationError("disk full", type="IOError", non_retryable=False)
        cause = ApplicationError("x" * 600, non_retryable=False)
        cause.__cause__ = root
        error = _workflow._error_object(activity_error(cause))
        self.assertEqual(
            error["cause"],
            {"type": "ApplicationError", "message": "x" * 500, "non_retryable": False},
        )
        self.assertEqual(
            error["root_cause"],
            {"type": "ApplicationError", "message": str(root), "error_type": "IOError"},
        )

    def test_python_cause_and_context(self) -> None:
        try:
            try:
                raise KeyError("k")
            except KeyError:
                raise RuntimeError("while handling")  # __context__ only
        except RuntimeError as exc:
            self.assertEqual(
                _workflow._error_object(exc),
                {
                    "type": "RuntimeError",
                    "message": "while handling",
                    "cause": {"type": "KeyError", "message": "'k'"},
                },
            )
        self.assertEqual(
            _workflow._error_object(ValueError("alone")), {"type": "ValueError", "message": "alone"}
        )

    def test_error_type_only_when_a_short_string(self) -> None:
        class Odd(Exception):
            type = 42
            non_retryable = "maybe"

        class Long(Exception):
            type = "T" * 200

        for cause, expected in (
            (Odd("o"), {"type": "Odd", "message": "o", "non_retryable": "maybe"}),
            (Long("l"), {"type": "Long", "message": "l"}),
        ):
            outer = RuntimeError("outer")
            outer.__cause__ = cause
            self.assertEqual(_workflow._error_object(outer)["cause"], expected)


class WorkflowStartedTest(unittest.TestCase):
    """WorkflowStarted's own fields."""

    def test_the_workflow_arguments_unless_the_worker_chose_sdk1_conventions(self) -> None:
        import dataclasses
        from unittest import mock

        import temporalio.workflow

        @dataclasses.dataclass
        class Order:
            item: str
            count: int

        info = mock.Mock(continued_run_id="r-0")
        with mock.patch.object(temporalio.workflow, "info", return_value=info):
            self.assertEqual(
                _workflow._started(("ann", Order("tea", 2), b"\xff")),
                {
                    "continued_run_id": "r-0",
                    "activity_input": ["ann", {"item": "tea", "count": 2}, "/w=="],
                },
            )
            self.assertEqual(
                _workflow._started(()), {"continued_run_id": "r-0", "activity_input": []}
            )
            self.assertEqual(_workflow._started(None), {"continued_run_id": "r-0"})

    def test_a_worker_under_sdk1_conventions_sends_no_workflow_arguments(self) -> None:
        from openbox_hook import OpenBoxHook

        agent = FakeAgent()
        self.addCleanup(agent.close)
        sent = {}
        for conventions in ("1.0", "2.0", None):
            with mock_interceptor_class() as factory:
                hook = OpenBoxHook(agent.socket_path, sdk_conventions=conventions)
                self.addCleanup(hook.close)
            sent[conventions] = factory.call_args.kwargs["workflow_input"]
        self.assertEqual(sent, {"1.0": False, "2.0": True, None: True})


def mock_interceptor_class():
    from unittest import mock

    return mock.patch.object(_workflow, "interceptor_class", wraps=_workflow.interceptor_class)


@unittest.skipUnless(
    TEMPORAL_BIN,
    "set OPENBOX_TEMPORAL_BIN to the temporal CLI binary to run the dev-server tests "
    "(e.g. /root/.cache/openbox/go/bin/temporal); nothing is downloaded",
)
class DevServerTest(unittest.TestCase):
    """A real worker (default sandboxed runner) on a dev server, in a child process
    (``devserver_worker.py``; see there why), against the fake agents served here."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.agent = FakeAgent()
        cls.replay_agent = FakeAgent()
        cls.agent.decisions[("activity_start", "greet")] = {
            "action": "continue",
            "verdict": "allow",
            "constrained": False,
            "redaction": {"target": "input", "args": [{"index": 0, "value": {"secret": "***"}}]},
        }
        cls.agent.decisions[("activity_start", "charge")] = {
            "action": "fail",
            "error_type": "GovernanceBlock",
            "message": "Governance blocked: payments are off",
            "non_retryable": True,
        }
        cls.agent.decisions[("activity_start", "pay")] = [
            {"action": "approval_pending", "message": "Approval required: payments"},
            {"action": "continue", "verdict": "allow", "constrained": False, "redaction": None},
        ]
        with tempfile.TemporaryDirectory() as directory:
            results_path = os.path.join(directory, "results.json")
            command = [
                sys.executable,
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "devserver_worker.py"),
                TEMPORAL_BIN,
                cls.agent.socket_path,
                cls.replay_agent.socket_path,
                results_path,
            ]
            # Its own process group, so a child that hangs is killed with its dev server.
            with subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
            ) as child:
                try:
                    output, _ = child.communicate(timeout=180)
                    cls.returncode = child.returncode
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
                    output, _ = child.communicate()
                    cls.returncode = "timed out"
            cls.output = output.decode(errors="replace")
            try:
                with open(results_path) as results:
                    cls.results = json.load(results)
            except (OSError, ValueError):
                cls.results = {}

    @classmethod
    def tearDownClass(cls) -> None:
        cls.agent.close()
        cls.replay_agent.close()

    def setUp(self) -> None:
        if self.returncode != 0 or "crash" in self.results or not self.results:
            self.fail(
                f"devserver_worker.py exited {self.returncode}: "
                f"{self.results.get('crash') or self.output[-3000:]}"
            )
        self.assertTrue(self.results["flushed"])

    def events(self, workflow_id: str) -> list[dict]:
        return [
            {k: v for k, v in m.items() if k not in ("id", "op")}
            for m in self.agent.workflow_events()
            if m["workflow_id"] == workflow_id
        ]

    def activity(self, activity_type: str) -> tuple[list[dict], list[dict]]:
        starts = [
            m for m in self.agent.ops("activity_start") if m["activity_type"] == activity_type
        ]
        tokens = [m["token"] for m in self.agent.ops("activity_end")]
        ends = [
            m
            for m in self.agent.ops("activity_end")
            if self.agent.started[m["token"]]["activity_type"] == activity_type
        ]
        self.assertEqual(len(tokens), len(set(tokens)))
        return starts, ends

    def test_started_signal_completed_once_each_with_the_sandboxed_runner(self) -> None:
        run = self.results["signal_timer"]
        self.assertEqual(run["result"], {"greeting": "hello ann (***)", "approvals": [["bob", 2]]})
        base = {
            "workflow_id": run["workflow_id"],
            "run_id": run["run_id"],
            "workflow_type": "SignalTimerWorkflow",
        }
        task_queue = self.results["task_queue"]
        # Exactly once each although the worker (no workflow cache) replayed the history
        # at every workflow task after the first.
        self.assertEqual(
            self.events(run["workflow_id"]),
            [
                # The workflow's arguments: this hook chose no conventions, so the agent
                # decides whether Core gets them (SDK 2.0 conventions do).
                {
                    "event_type": "WorkflowStarted",
                    **base,
                    "task_queue": task_queue,
                    "activity_input": ["ann"],
                },
                {
                    "event_type": "SignalReceived",
                    **base,
                    "task_queue": task_queue,
                    "signal_name": "approve",
                    "signal_args": ["bob", 2],
                },
                {
                    "event_type": "WorkflowCompleted",
                    **base,
                    "workflow_output": {"greeting": "hello ann (***)", "approvals": [["bob", 2]]},
                },
            ],
        )
        # The input redaction reached the real activity and activity_end's input.
        [start], [end] = self.activity("greet")
        self.assertEqual(start["input"], [{"name": "ann", "secret": "s3cret"}])
        self.assertEqual(end["input"], [{"name": "ann", "secret": "***"}])

    def test_continue_as_new_ends_the_run_and_the_next_run_names_it(self) -> None:
        run = self.results["continuing"]
        first, last = run["first_run_id"], run["last_run_id"]
        self.assertNotEqual(first, last)
        base = {"workflow_id": run["workflow_id"], "workflow_type": "ContinuingWorkflow"}
        task_queue = self.results["task_queue"]
        self.assertEqual(
            self.events(run["workflow_id"]),
            [
                {
                    "event_type": "WorkflowStarted",
                    **base,
                    "run_id": first,
                    "task_queue": task_queue,
                    "activity_input": [1],
                },
                # Local to the agent (no Core event): the first run's span ends here.
                {"event_type": "WorkflowContinuedAsNew", **base, "run_id": first},
                {
                    "event_type": "WorkflowStarted",
                    **base,
                    "run_id": last,
                    "task_queue": task_queue,
                    "continued_run_id": first,
                    "activity_input": [0],
                },
                {"event_type": "WorkflowCompleted", **base, "run_id": last, "workflow_output": 0},
            ],
        )

    def test_replaying_the_history_reports_nothing(self) -> None:
        self.assertIsNone(self.results["replay"]["failure"])  # and it stayed deterministic
        self.assertEqual(self.replay_agent.workflow_events(), [])
        # Only the presence hello the hook says when it is created (it cannot tell a
        # Replayer from a Worker then): no workflow or activity message at all.
        self.assertEqual([m for m in self.replay_agent.messages if m.get("op") != "hello"], [])

    def test_blocked_activity_fails_the_workflow_with_the_cause_chain(self) -> None:
        run = self.results["blocked"]
        self.assertEqual(
            run["error"],
            {
                "type": "ActivityError",
                "cause_type": "ApplicationError",
                "error_type": "GovernanceBlock",
            },
        )
        starts, ends = self.activity("charge")
        self.assertEqual(len(starts), 1)  # non-retryable: one attempt
        self.assertEqual([e["status"] for e in ends], ["failed"])
        started, failed = self.events(run["workflow_id"])
        self.assertEqual(started["event_type"], "WorkflowStarted")
        self.assertEqual(
            failed,
            {
                "event_type": "WorkflowFailed",
                "workflow_id": run["workflow_id"],
                "run_id": run["run_id"],
                "workflow_type": "OneActivityWorkflow",
                "error": {
                    "type": "ActivityError",
                    "message": "Activity task failed",
                    "cause": {
                        "type": "ApplicationError",
                        "message": "GovernanceBlock: Governance blocked: payments are off",
                        "error_type": "GovernanceBlock",
                        "non_retryable": True,
                    },
                },
            },
        )

    def test_approval_pending_is_retried_by_temporal(self) -> None:
        self.assertEqual(self.results["approval"]["result"], "paid payload at attempt 2")
        starts, ends = self.activity("pay")
        self.assertEqual([s["attempt"] for s in starts], [1, 2])
        self.assertEqual([e["status"] for e in ends], ["failed", "completed"])
        self.assertEqual(
            ends[0]["error"],
            {"type": "ApplicationError", "message": "ApprovalPending: Approval required: payments"},
        )

    def test_workflow_raising_a_chained_application_error(self) -> None:
        run = self.results["raising"]
        self.assertEqual(run["error"]["type"], "ApplicationError")
        *_, failed = self.events(run["workflow_id"])
        self.assertEqual(
            failed["error"],
            {
                "type": "ApplicationError",
                "message": "Custom: outer problem",
                "cause": {"type": "ValueError", "message": "inner problem"},
            },
        )


if __name__ == "__main__":
    unittest.main()
