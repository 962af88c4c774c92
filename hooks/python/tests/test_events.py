"""The background sender of workflow events: order, no blocking, no agent, overflow."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import unittest
from unittest import mock

import support
from fake_agent import FakeAgent

from openbox_hook import OpenBoxHook, _events


def event(n: int, thread: int = 0) -> dict:
    """A SignalReceived of workflow ``w<thread>`` whose argument is ``n``."""
    return {
        "event_type": "SignalReceived",
        "workflow_id": f"w{thread}",
        "run_id": "r",
        "workflow_type": "W",
        "task_queue": "q",
        "signal_name": "s",
        "signal_args": [n],
    }


class SenderTest(unittest.TestCase):
    def test_events_from_many_threads_arrive_in_each_threads_order(self) -> None:
        agent = FakeAgent()
        self.addCleanup(agent.close)
        hook = OpenBoxHook(agent.socket_path, config={"governance_timeout": 1})

        def post_many(thread: int) -> None:
            for n in range(100):
                self.assertTrue(_events.post(hook._link, "workflow_event", event(n, thread)))

        threads = [threading.Thread(target=post_many, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertTrue(OpenBoxHook.flush(10.0))
        messages = agent.wait_for("workflow_event", 400)
        for t in range(4):
            self.assertEqual(
                [m["signal_args"][0] for m in messages if m["workflow_id"] == f"w{t}"],
                list(range(100)),
            )
        # One connection of its own (beside the hook's presence connection), introduced
        # by hello with the hook's config.
        hellos = agent.wait_for("hello", 2)
        self.assertEqual(len(hellos), 2)
        for hello in hellos:
            self.assertEqual(hello["config"], {"governance_timeout": 1})
        self.assertEqual(len({m["id"] for m in messages}), 400)

    def test_a_refusal_is_logged_at_debug(self) -> None:
        class Refuses(FakeAgent):
            def respond(self, message):
                if message.get("op") == "workflow_event":
                    return {"ok": False, "error": "unknown op"}
                return super().respond(message)

        agent = Refuses()
        self.addCleanup(agent.close)
        hook = OpenBoxHook(agent.socket_path)
        with self.assertLogs("openbox.hook", "DEBUG") as logs:
            _events.post(hook._link, "workflow_event", event(1))
            self.assertTrue(OpenBoxHook.flush(5.0))
        [record] = [r for r in logs.records if "refused" in r.getMessage()]
        self.assertEqual(record.levelno, logging.DEBUG)
        self.assertIn("SignalReceived: unknown op", record.getMessage())

    def test_without_an_agent_events_are_dropped_quickly(self) -> None:
        support.reset_warning()
        with tempfile.TemporaryDirectory() as directory:
            hook = OpenBoxHook(os.path.join(directory, "missing.sock"))
            with self.assertLogs("openbox.hook", "WARNING") as logs:
                for n in range(50):
                    _events.post(hook._link, "workflow_event", event(n))
                self.assertTrue(OpenBoxHook.flush(5.0))
        self.assertEqual(len(logs.records), 1)
        self.assertIn("not reachable", logs.records[0].getMessage())

    def test_a_full_queue_drops_with_one_warning(self) -> None:
        agent = FakeAgent()
        self.addCleanup(agent.close)
        hook = OpenBoxHook(agent.socket_path)
        sender = _events.sender
        with mock.patch.object(_events, "MAX_QUEUED", 0):
            with self.assertLogs("openbox.hook", "WARNING") as logs:
                self.assertFalse(_events.post(hook._link, "workflow_event", event(1)))
                self.assertFalse(_events.post(hook._link, "workflow_event", event(2)))
        self.assertEqual(len(logs.records), 1)
        self.assertIn("further ones are dropped", logs.records[0].getMessage())
        sender._overflow_warned = False
        self.assertTrue(_events.post(hook._link, "workflow_event", event(3)))
        self.assertTrue(OpenBoxHook.flush(5.0))
        self.assertEqual([m["signal_args"][0] for m in agent.ops("workflow_event")], [3])


if __name__ == "__main__":
    unittest.main()
