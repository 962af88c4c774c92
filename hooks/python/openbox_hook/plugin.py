"""``OpenBoxPlugin``: SDK 2.0's Temporal plugin, taking SDK 2.0's parameters.

Moving from ``openbox-temporal-sdk-python`` 2.0 is an import change::

    from openbox_hook import OpenBoxPlugin   # was: from openbox.plugin import OpenBoxPlugin

    worker = Worker(client, task_queue="q", workflows=[...], activities=[...],
                    plugins=[OpenBoxPlugin(openbox_url=..., openbox_api_key=...)])

The plugin installs an :class:`OpenBoxHook` under SDK 2.0 conventions (HALT terminates
the workflow, BLOCK with patch continues it as new, multi-agent sessions), keeps the
worker's client for those terminations, and forwards the governance settings to
openbox-agent, which governs. It registers no ``send_governance_event`` activity: the
agent sends workflow events from outside the process.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

import temporalio.worker
from temporalio.plugin import SimplePlugin
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from .hook import OpenBoxHook, check_max_patch_restarts
from .worker import governance_config

_log = logging.getLogger("openbox.hook")

IDENTITY_PARAMETERS = (
    "agent_did",
    "agent_private_key",
    "workload_private_key",
    "openbox_agent_id",
    "organization_id",
    "deployment_id",
    "okta_agent_id",
    "okta_agent_key_id",
    "okta_agent_private_key",
    "okta_agent_algorithm",
    "agent_proof_audience",
)


class OpenBoxPlugin(SimplePlugin):
    """OpenBox governance for a Temporal worker, as SDK 2.0's ``OpenBoxPlugin``.

    Args:
        openbox_url, openbox_api_key, governance_timeout, governance_policy,
        send_start_event, send_activity_start_event, skip_workflow_types,
        skip_activity_types, skip_signals, hitl_enabled: forwarded to openbox-agent,
            as for :func:`create_openbox_worker`.
        max_patch_restarts: how many times a workflow chain may continue as new for a
            BLOCK with patch; one more fails it with ``GovernancePatchLimitExceeded``.
        max_body_size: characters kept of each captured request and response body in
            what Core gets (default: the agent's setting, else SDK 2.0's 65536); SDK 2.0
            sets it in ``GovernanceConfig``, as :func:`create_openbox_worker` does here.
        enable_trace_propagation: as in SDK 2.0, adds Temporal's OpenTelemetry
            ``TracingInterceptor`` (before the hook, whose activity spans then join the
            worker's traces) and lets ``opentelemetry`` through the workflow sandbox.
            Needs the ``opentelemetry`` packages; without them a warning is logged and
            the worker runs untraced.
        agent_did, agent_private_key, workload_private_key, openbox_agent_id,
        organization_id, deployment_id, okta_agent_id, okta_agent_key_id,
        okta_agent_private_key, okta_agent_algorithm, agent_proof_audience: SDK 2.0's
            identity; accepted, and not used by the hook: the agent signs its requests
            with keys its operator configures (never sent by a worker). Passing one logs
            a warning saying so.
        instrument_databases, db_libraries, sqlalchemy_engine, instrument_file_io:
            accepted and ignored: the agent sees all database and file I/O.
        agent_socket: the agent's Unix socket (default ``$OPENBOX_AGENT_SOCKET``, else
            ``/run/openbox/agent.sock``).

    Raises:
        ValueError: as :func:`create_openbox_worker`, or ``max_patch_restarts`` < 1.
    """

    def __init__(
        self,
        *,
        openbox_url: str | None = None,
        openbox_api_key: str | None = None,
        agent_did: str | None = None,
        agent_private_key: str | None = None,
        workload_private_key: str | None = None,
        openbox_agent_id: str | None = None,
        organization_id: str | None = None,
        deployment_id: str | None = None,
        okta_agent_id: str | None = None,
        okta_agent_key_id: str | None = None,
        okta_agent_private_key: str | None = None,
        okta_agent_algorithm: str | None = None,
        agent_proof_audience: str | None = None,
        governance_timeout: float = 30.0,
        governance_policy: str | None = None,
        send_start_event: bool = True,
        send_activity_start_event: bool = True,
        skip_workflow_types: Iterable[str] | None = None,
        skip_activity_types: Iterable[str] | None = None,
        skip_signals: Iterable[str] | None = None,
        hitl_enabled: bool = True,
        max_patch_restarts: int = 3,
        max_body_size: int | None = None,
        instrument_databases: bool = True,
        db_libraries: Iterable[str] | None = None,
        sqlalchemy_engine: Any | None = None,
        instrument_file_io: bool = True,
        enable_trace_propagation: bool = True,
        agent_socket: str | None = None,
    ) -> None:
        del instrument_databases, db_libraries, sqlalchemy_engine, instrument_file_io
        check_max_patch_restarts(max_patch_restarts)
        identity = dict(
            agent_did=agent_did,
            agent_private_key=agent_private_key,
            workload_private_key=workload_private_key,
            openbox_agent_id=openbox_agent_id,
            organization_id=organization_id,
            deployment_id=deployment_id,
            okta_agent_id=okta_agent_id,
            okta_agent_key_id=okta_agent_key_id,
            okta_agent_private_key=okta_agent_private_key,
            okta_agent_algorithm=okta_agent_algorithm,
            agent_proof_audience=agent_proof_audience,
        )
        given = [name for name in IDENTITY_PARAMETERS if identity[name] is not None]
        if given:
            _log.warning(
                "OpenBoxPlugin: %s not used by the hook: openbox-agent signs its requests "
                "to OpenBox Core with the identity its operator configures (see the "
                "README, moving from SDK 2.0)",
                ", ".join(given),
            )
        config = governance_config(
            openbox_url=openbox_url,
            openbox_api_key=openbox_api_key,
            governance_timeout=governance_timeout,
            governance_policy=governance_policy,
            send_start_event=send_start_event,
            send_activity_start_event=send_activity_start_event,
            skip_workflow_types=skip_workflow_types,
            skip_activity_types=skip_activity_types,
            skip_signals=skip_signals,
            hitl_enabled=hitl_enabled,
            sdk_conventions="2.0",
            max_body_size=max_body_size,
        )
        self.hook = OpenBoxHook(agent_socket, config=config, max_patch_restarts=max_patch_restarts)
        interceptors: list[Any] = []
        tracing = enable_trace_propagation and _tracing_interceptor()
        if tracing:
            interceptors.append(tracing)
        interceptors.append(self.hook)

        def workflow_runner(
            runner: temporalio.worker.WorkflowRunner | None,
        ) -> temporalio.worker.WorkflowRunner:
            # Temporal's TracingInterceptor runs in workflow code: opentelemetry must be
            # the real module there, not the sandbox's fresh copy.
            runner = runner or SandboxedWorkflowRunner()
            if isinstance(runner, SandboxedWorkflowRunner):
                return dataclasses.replace(
                    runner,
                    restrictions=runner.restrictions.with_passthrough_modules("opentelemetry"),
                )
            return runner

        super().__init__(
            "openbox.OpenBoxPlugin",
            interceptors=interceptors,
            workflow_runner=workflow_runner if tracing else None,
        )

    def configure_worker(
        self, config: temporalio.worker.WorkerConfig
    ) -> temporalio.worker.WorkerConfig:
        client = config.get("client")
        if client is not None:
            self.hook.set_client(client)
        return super().configure_worker(config)


def _tracing_interceptor() -> Any:
    try:
        from temporalio.contrib.opentelemetry import TracingInterceptor
    except ImportError as exc:
        _log.warning(
            "OpenBoxPlugin: enable_trace_propagation needs the opentelemetry packages "
            "(%s); the worker runs without Temporal's TracingInterceptor. Install "
            "opentelemetry-api and opentelemetry-sdk, or pass enable_trace_propagation=False",
            exc,
        )
        return None
    return TracingInterceptor()
