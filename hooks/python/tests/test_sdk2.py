"""SDK 2.0 conventions in the hook: OpenBoxPlugin, HALT, BLOCK with patch, sessions.

What the hook does with the agent's decisions under each convention, the patch envelope
and how it is found in a failure chain, and OpenBoxPlugin's parameters and wiring. The
end-to-end behaviour (a real worker, agent and Core) is in tests/e2e/tests/sdk2.rs.
"""

from __future__ import annotations

import asyncio
import logging
import unittest

import support  # noqa: F401  (import path)
from fake_agent import FakeAgent

import temporalio.plugin
from temporalio.exceptions import ActivityError, ApplicationError, RetryState

from openbox_hook import OpenBoxHook, OpenBoxPlugin, create_openbox_worker, emit_handoff
from openbox_hook import _decision, _patch

PATCH = {
    "schema_version": 1,
    "new_input": {"amount": 5},
    "governance_event_id": "ge-1",
    "reason": "use the safe input",
    "event_type": "ActivityStarted",
    "hook_trigger": False,
    "hook_stage": None,
}


def fail(error_type: str, message: str, **extra: object) -> dict:
    return {
        "ok": True,
        "token": 1,
        "decision": {
            "action": "fail",
            "error_type": error_type,
            "message": message,
            "non_retryable": True,
            **extra,
        },
    }


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


class DecisionTest(unittest.TestCase):
    def test_sdk2_halt_is_worded_as_sdk2_and_terminates(self) -> None:
        reply = fail("GovernanceHalt", "Governance blocked: runaway", reason="runaway")
        d = _decision.read(reply, "start", sdk2=True)
        self.assertTrue(d.halt)
        self.assertEqual(
            (d.error.type, d.error.message, d.error.non_retryable),
            ("GovernanceHalt", "Governance HALT: runaway", True),
        )
        # Core gave no reason: SDK 2.0's default.
        d = _decision.read(
            fail("GovernanceHalt", "Governance blocked: No reason provided"), "end", True
        )
        self.assertEqual(d.error.message, "Governance HALT: Workflow halted by governance policy")

    def test_sdk1_halt_only_fails_the_activity_and_ignores_a_patch(self) -> None:
        d = _decision.read(fail("GovernanceHalt", "Governance blocked: r", reason="r"), "start")
        self.assertFalse(d.halt)
        self.assertEqual(d.error.message, "Governance blocked: r")
        d = _decision.read(fail("GovernanceBlock", "Governance blocked: r", patch=PATCH), "start")
        self.assertEqual(
            (d.error.type, d.error.message), ("GovernanceBlock", "Governance blocked: r")
        )
        self.assertFalse(d.halt)

    def test_sdk2_block_with_patch_raises_governance_patch_with_the_details(self) -> None:
        d = _decision.read(
            fail("GovernanceBlock", "Governance blocked: r", patch=PATCH), "end", True
        )
        self.assertFalse(d.halt)
        self.assertEqual(d.error.type, "GovernancePatch")
        self.assertEqual(d.error.message, "Governance requested workflow restart")
        self.assertTrue(d.error.non_retryable)
        self.assertEqual(list(d.error.details), [PATCH])

    def test_sdk2_malformed_patch_is_a_plain_block(self) -> None:
        for bad in (
            {**PATCH, "schema_version": 2},
            {k: v for k, v in PATCH.items() if k != "new_input"},
            {**PATCH, "hook_trigger": 0},
            {**PATCH, "event_type": ""},
            {**PATCH, "reason": 3},
            "patch",
        ):
            d = _decision.read(
                fail("GovernanceBlock", "Governance blocked: r", patch=bad), "start", True
            )
            self.assertEqual(d.error.type, "GovernanceBlock", bad)


class PatchChainTest(unittest.TestCase):
    def test_the_request_is_found_in_the_cause_chain_by_type(self) -> None:
        error = ApplicationError("x", PATCH, type="GovernancePatch", non_retryable=True)
        self.assertEqual(_patch.requested(activity_error(error)), PATCH)
        legacy = ApplicationError("x", PATCH, type="GovernanceRetryableBlock")
        self.assertEqual(_patch.requested(activity_error(legacy)), PATCH)
        null_input = {**PATCH, "new_input": None}
        error = ApplicationError("x", null_input, type="GovernancePatch")
        self.assertEqual(_patch.requested(error), null_input)

    def test_anything_else_is_no_restart(self) -> None:
        two = ApplicationError("x", PATCH, PATCH, type="GovernancePatch")
        block = ApplicationError("Governance blocked: r", type="GovernanceBlock")
        halt = ApplicationError("Governance HALT: r", PATCH, type="GovernanceHalt")
        text_only = ApplicationError("GovernancePatch", PATCH)
        for error in (two, block, halt, text_only):
            self.assertIsNone(_patch.requested(activity_error(error)), error)


class _Client:
    """What SimplePlugin asks of the worker's client: its configuration."""

    def config(self, active_config: bool = False) -> dict:
        return {"interceptors": []}


class ConventionsTest(unittest.TestCase):
    def setUp(self) -> None:
        self.agent = FakeAgent()
        self.addCleanup(self.agent.close)

    def test_the_plugin_is_a_simple_plugin_under_sdk2_conventions(self) -> None:
        plugin = OpenBoxPlugin(
            openbox_url="https://core.example.com",
            openbox_api_key="obx_live_k",
            max_patch_restarts=5,
            enable_trace_propagation=False,
            agent_socket=self.agent.socket_path,
        )
        self.addCleanup(plugin.hook.close)
        self.assertIsInstance(plugin, temporalio.plugin.SimplePlugin)
        self.assertEqual(plugin.name(), "openbox.OpenBoxPlugin")
        self.assertEqual(plugin.hook.sdk_conventions, "2.0")
        [hello] = self.agent.wait_for("hello")
        self.assertEqual(
            hello["config"],
            {
                "openbox_url": "https://core.example.com",
                "openbox_api_key": "obx_live_k",
                "governance_timeout": 30.0,
                "governance_policy": "fail_open",
                "send_start_event": True,
                "send_activity_start_event": True,
                "hitl_enabled": True,
                "sdk_conventions": "2.0",
            },
        )

    def test_the_plugin_forwards_max_body_size_to_the_agent(self) -> None:
        plugin = OpenBoxPlugin(
            max_body_size=1024,
            enable_trace_propagation=False,
            agent_socket=self.agent.socket_path,
        )
        self.addCleanup(plugin.hook.close)
        [hello] = self.agent.wait_for("hello")
        self.assertEqual(hello["config"]["max_body_size"], 1024)
        self.assertEqual(hello["config"]["sdk_conventions"], "2.0")

    def test_the_plugin_keeps_the_workers_client_and_installs_the_hook(self) -> None:
        plugin = OpenBoxPlugin(enable_trace_propagation=False, agent_socket=self.agent.socket_path)
        self.addCleanup(plugin.hook.close)
        client = _Client()
        config = plugin.configure_worker({"client": client, "interceptors": []})
        self.assertIs(plugin.hook._client, client)
        self.assertIn(plugin.hook, config["interceptors"])

    def test_trace_propagation_adds_temporals_tracing_interceptor_first(self) -> None:
        plugin = OpenBoxPlugin(agent_socket=self.agent.socket_path)
        self.addCleanup(plugin.hook.close)
        config = plugin.configure_worker({"client": _Client(), "interceptors": []})
        names = [type(i).__name__ for i in config["interceptors"]]
        self.assertEqual(names, ["TracingInterceptor", "OpenBoxHook"])

    def test_identity_parameters_are_accepted_and_said_to_be_unused(self) -> None:
        with self.assertLogs("openbox.hook", logging.WARNING) as logs:
            plugin = OpenBoxPlugin(
                agent_did="did:example:a",
                agent_private_key="secret",
                enable_trace_propagation=False,
                agent_socket=self.agent.socket_path,
            )
        self.addCleanup(plugin.hook.close)
        text = "\n".join(logs.output)
        self.assertIn("agent_did, agent_private_key", text)
        self.assertNotIn("secret", text)
        [hello] = self.agent.wait_for("hello")
        self.assertNotIn("agent_private_key", hello["config"])

    def test_bad_conventions_and_restart_limits_are_refused(self) -> None:
        with self.assertRaisesRegex(ValueError, "max_patch_restarts"):
            OpenBoxPlugin(max_patch_restarts=0, agent_socket=self.agent.socket_path)
        with self.assertRaisesRegex(ValueError, "max_patch_restarts"):
            OpenBoxHook(self.agent.socket_path, max_patch_restarts=True)
        with self.assertRaisesRegex(ValueError, "sdk_conventions"):
            OpenBoxHook(self.agent.socket_path, config={"sdk_conventions": "3.0"})

    def test_the_factory_selects_the_conventions_per_worker(self) -> None:
        from unittest import mock

        import temporalio.worker

        with mock.patch.object(temporalio.worker, "Worker") as worker:
            create_openbox_worker("client", "q", agent_socket=self.agent.socket_path)
            create_openbox_worker(
                "client", "q", agent_socket=self.agent.socket_path, sdk_conventions="2.0"
            )
        hooks = [call.kwargs["interceptors"][-1] for call in worker.call_args_list]
        for hook in hooks:
            self.addCleanup(hook.close)
        self.assertEqual([h.sdk_conventions for h in hooks], ["1.0", "2.0"])
        self.assertEqual([h._client for h in hooks], ["client", "client"])


class TerminateTest(unittest.TestCase):
    """How the hook terminates a workflow on an SDK 2.0 HALT (the e2e tests run it)."""

    def terminate(self, hook_client: object, activity_client: object) -> list[str]:
        from unittest import mock

        import temporalio.activity

        from openbox_hook._activity import ActivityInbound

        inbound = ActivityInbound(mock.Mock(), mock.Mock(), True, lambda: hook_client)
        info = mock.Mock(workflow_id="wf-1")
        with (
            mock.patch.object(temporalio.activity, "info", return_value=info),
            mock.patch.object(temporalio.activity, "client", side_effect=activity_client),
            self.assertLogs("openbox.hook", logging.DEBUG) as logs,
        ):
            asyncio.run(inbound._terminate("Governance HALT: r"))
        return logs.output

    def test_a_workflow_another_activity_already_ended_is_no_failure(self) -> None:
        from unittest import mock

        import temporalio.service

        client = mock.Mock()
        client.get_workflow_handle.return_value.terminate = mock.AsyncMock(
            side_effect=temporalio.service.RPCError(
                "workflow execution already completed",
                temporalio.service.RPCStatusCode.NOT_FOUND,
                b"",
            )
        )
        [line] = self.terminate(client, RuntimeError("unused"))
        self.assertTrue(line.startswith("DEBUG:openbox.hook:"), line)
        self.assertIn("already ended", line)

    def test_a_sync_activity_without_the_workers_client_says_how_to_give_it(self) -> None:
        [line] = self.terminate(None, RuntimeError("No client available"))
        self.assertTrue(line.startswith("WARNING:openbox.hook:"), line)
        self.assertIn("could not terminate workflow wf-1", line)
        self.assertIn("OpenBoxHook(client=...)", line)


class HandoffTest(unittest.TestCase):
    def test_empty_fields_are_refused_before_anything_is_sent(self) -> None:
        with self.assertRaisesRegex(ValueError, "from_agent_did"):
            asyncio.run(emit_handoff("s-1", " "))
        with self.assertRaisesRegex(ValueError, "multi_agent_session_id"):
            asyncio.run(emit_handoff("", "did:example:a"))


if __name__ == "__main__":
    unittest.main()
