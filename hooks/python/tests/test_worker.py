"""create_openbox_worker: the SDK's parameters, validation, and what reaches the agent."""

from __future__ import annotations

import unittest
from unittest import mock

import support  # noqa: F401  (import path)

import temporalio.worker

from openbox_hook import OpenBoxHook, create_openbox_worker


class CreateWorkerTest(unittest.TestCase):
    def build(self, **kwargs):
        """Call the factory with Worker replaced by a recorder: (hook, Worker kwargs)."""
        with mock.patch.object(temporalio.worker, "Worker") as worker:
            result = create_openbox_worker("client", "queue", **kwargs)
        self.assertIs(result, worker.return_value)
        (client,), worker_kwargs = worker.call_args
        self.assertEqual(client, "client")
        hook = worker_kwargs["interceptors"][-1]
        self.assertIsInstance(hook, OpenBoxHook)
        return hook, worker_kwargs

    def test_defaults_send_the_sdk_defaults_and_omit_unset(self) -> None:
        hook, worker_kwargs = self.build()
        self.assertEqual(
            hook._link.config,
            {
                "governance_timeout": 30.0,
                "governance_policy": "fail_open",
                "send_start_event": True,
                "send_activity_start_event": True,
                "hitl_enabled": True,
            },
        )
        self.assertEqual(worker_kwargs["task_queue"], "queue")
        self.assertEqual(worker_kwargs["workflows"], ())
        self.assertEqual(worker_kwargs["activities"], ())

    def test_governance_timeout_sets_how_long_decisions_are_awaited(self) -> None:
        hook, _ = self.build(governance_timeout=3)
        self.assertEqual(hook._link.governed_timeout, 8.0)

    def test_all_sdk_parameters(self) -> None:
        def act() -> None:
            pass

        existing = temporalio.worker.Interceptor()
        hook, worker_kwargs = self.build(
            workflows=[int],
            activities=[act],
            openbox_url="http://core:8086",
            openbox_api_key="obx_test_key_1",
            governance_timeout=12,
            governance_policy="fail_closed",
            send_start_event=False,
            send_activity_start_event=False,
            skip_workflow_types={"B", "A"},
            skip_activity_types={"send_governance_event"},
            skip_signals=frozenset({"heartbeat"}),
            hitl_enabled=False,
            instrument_databases=False,
            db_libraries={"psycopg2", "redis"},
            instrument_file_io=True,
            agent_socket="/tmp/agent.sock",
            max_concurrent_activities=10,
            interceptors=[existing],
        )
        self.assertEqual(
            hook._link.config,
            {
                "openbox_url": "http://core:8086",
                "openbox_api_key": "obx_test_key_1",
                "governance_timeout": 12.0,
                "governance_policy": "fail_closed",
                "send_start_event": False,
                "send_activity_start_event": False,
                "skip_workflow_types": ["A", "B"],
                "skip_activity_types": ["send_governance_event"],
                "skip_signals": ["heartbeat"],
                "hitl_enabled": False,
            },
        )
        self.assertEqual(hook.socket_path, "/tmp/agent.sock")
        self.assertEqual(worker_kwargs["interceptors"], [existing, hook])
        self.assertEqual(worker_kwargs["max_concurrent_activities"], 10)
        self.assertEqual(worker_kwargs["workflows"], [int])
        self.assertEqual(worker_kwargs["activities"], [act])

    def test_validation_names_the_parameter(self) -> None:
        for kwargs, parameter in (
            ({"governance_policy": "fail_sometimes"}, "governance_policy"),
            ({"governance_timeout": 0}, "governance_timeout"),
            ({"governance_timeout": -1.5}, "governance_timeout"),
            ({"governance_timeout": "30"}, "governance_timeout"),
            ({"governance_timeout": True}, "governance_timeout"),
        ):
            with self.subTest(kwargs=kwargs), self.assertRaisesRegex(ValueError, parameter):
                create_openbox_worker("client", "queue", **kwargs)
        with self.assertRaisesRegex(TypeError, "skip_signals"):
            create_openbox_worker("client", "queue", skip_signals="heartbeat")

    def test_policy_from_the_environment_unless_given(self) -> None:
        with mock.patch.dict("os.environ", {"OPENBOX_GOVERNANCE_POLICY": "fail_closed"}):
            hook, _ = self.build()
            self.assertEqual(hook._link.config["governance_policy"], "fail_closed")
            self.assertTrue(hook._link.fail_closed)
            hook, _ = self.build(governance_policy="fail_open")
            self.assertEqual(hook._link.config["governance_policy"], "fail_open")
            self.assertFalse(hook._link.fail_closed)
        with (
            mock.patch.dict("os.environ", {"OPENBOX_GOVERNANCE_POLICY": "closed"}),
            self.assertRaisesRegex(ValueError, r"\$OPENBOX_GOVERNANCE_POLICY .*'closed'"),
        ):
            create_openbox_worker("client", "queue")


class HookConstructionTest(unittest.TestCase):
    def test_socket_path_argument_env_default(self) -> None:
        with mock.patch.dict("os.environ", {"OPENBOX_AGENT_SOCKET": "/env/agent.sock"}):
            self.assertEqual(OpenBoxHook("/arg/agent.sock").socket_path, "/arg/agent.sock")
            self.assertEqual(OpenBoxHook().socket_path, "/env/agent.sock")
        with mock.patch.dict("os.environ", clear=True):
            self.assertEqual(OpenBoxHook().socket_path, "/run/openbox/agent.sock")

    def test_bare_hook_sends_empty_config_and_has_a_workflow_interceptor(self) -> None:
        hook = OpenBoxHook()
        self.assertEqual(hook._link.config, {})
        cls = hook.workflow_interceptor_class(mock.Mock())
        self.assertTrue(issubclass(cls, temporalio.worker.WorkflowInboundInterceptor))
        self.assertIs(hook.workflow_interceptor_class(mock.Mock()), cls)

    def test_governed_calls_wait_governance_timeout_plus_five_seconds(self) -> None:
        self.assertEqual(OpenBoxHook()._link.governed_timeout, 35.0)
        self.assertEqual(
            OpenBoxHook(config={"governance_timeout": 12})._link.governed_timeout, 17.0
        )
        # Never shorter than the hook's own per-call timeout.
        self.assertEqual(
            OpenBoxHook(timeout=60, config={"governance_timeout": 1})._link.governed_timeout, 60.0
        )

    def test_policy_from_config_else_environment(self) -> None:
        with mock.patch.dict("os.environ", {"OPENBOX_GOVERNANCE_POLICY": "fail_closed"}):
            hook = OpenBoxHook()
            self.assertEqual(hook._link.config, {"governance_policy": "fail_closed"})
            self.assertTrue(hook._link.fail_closed)
            hook = OpenBoxHook(config={"governance_policy": "fail_open"})
            self.assertFalse(hook._link.fail_closed)
            self.assertTrue(OpenBoxHook(config={"on_api_error": "fail_closed"})._link.fail_closed)
        with mock.patch.dict("os.environ", {"OPENBOX_GOVERNANCE_POLICY": "nope"}):
            with self.assertRaisesRegex(ValueError, "OPENBOX_GOVERNANCE_POLICY"):
                OpenBoxHook()
        with mock.patch.dict("os.environ", clear=True):
            self.assertFalse(OpenBoxHook()._link.fail_closed)

    def test_sdk_conventions_from_argument_config_else_environment(self) -> None:
        with mock.patch.dict("os.environ", clear=True):
            self.assertNotIn("sdk_conventions", OpenBoxHook()._link.config)
            self.assertEqual(
                OpenBoxHook(sdk_conventions="2.0")._link.config["sdk_conventions"], "2.0"
            )
        with mock.patch.dict("os.environ", {"OPENBOX_SDK_CONVENTIONS": "2"}):
            self.assertEqual(OpenBoxHook()._link.config["sdk_conventions"], "2.0")
            hook = OpenBoxHook(config={"sdk_conventions": "1.0"})
            self.assertEqual(hook._link.config["sdk_conventions"], "1.0")
            hook = OpenBoxHook(sdk_conventions="1.0", config={"sdk_conventions": "2.0"})
            self.assertEqual(hook._link.config["sdk_conventions"], "1.0")
        with mock.patch.dict("os.environ", {"OPENBOX_SDK_CONVENTIONS": "3.0"}):
            with self.assertRaisesRegex(ValueError, r"\$OPENBOX_SDK_CONVENTIONS .*'3.0'"):
                OpenBoxHook()
        with self.assertRaisesRegex(ValueError, "sdk_conventions"):
            create_openbox_worker("client", "queue", sdk_conventions="2.1")

    def test_timeout_must_be_positive(self) -> None:
        with self.assertRaisesRegex(ValueError, "timeout"):
            OpenBoxHook(timeout=0)


if __name__ == "__main__":
    unittest.main()
