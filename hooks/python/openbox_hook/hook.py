"""``OpenBoxHook``: the worker interceptor that connects a Temporal worker to openbox-agent."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import temporalio.client
import temporalio.worker

from . import _events, _patch, _propagate, _workflow
from ._activity import ActivityInbound
from ._agent import (
    CONVENTIONS_ENV,
    DEFAULT_SOCKET,
    GOVERNANCE_POLICIES,
    POLICY_ENV,
    SDK_CONVENTIONS,
    SOCKET_ENV,
    AgentLink,
)
from .serialize import serialize_value


class OpenBoxHook(temporalio.worker.Interceptor):
    """Publishes which activity runs on which thread, for openbox-agent to attribute, and
    carries out the agent's governance decisions.

    Adopt it in one line::

        Worker(client, task_queue=..., activities=..., interceptors=[OpenBoxHook()])

    Args:
        socket_path: the agent's Unix socket. Default: ``$OPENBOX_AGENT_SOCKET``, else
            ``/run/openbox/agent.sock``.
        timeout: seconds to wait for the agent to accept a connection and answer
            ``hello`` and thread registrations; a call that takes longer means "no agent"
            for that activity.
        config: governance settings sent to the agent in ``hello`` (what
            :func:`create_openbox_worker` fills in from the SDK's parameters). Its
            ``governance_timeout`` (default 30 s) plus 5 s is how long ``activity_start``
            and ``activity_end`` wait: the agent answers them after governing. Its
            ``governance_policy`` (alias ``on_api_error``) defaults to
            ``$OPENBOX_GOVERNANCE_POLICY`` when that is set (and is then sent to the agent
            too).
        sdk_conventions: ``"1.0"`` or ``"2.0"``: which SDK's behaviour this worker
            keeps, and whose request conventions (headers, body encoding, which
            ActivityCompleted events are sent) the agent follows for its calls to
            OpenBox Core. Default: the config's ``sdk_conventions``, else
            ``$OPENBOX_SDK_CONVENTIONS``; none of them: 1.0 here, and not sent (the
            agent's setting applies to its requests). Under ``"2.0"`` a HALT (and
            fail_closed without an answer) terminates the workflow before failing the
            activity with ``GovernanceHalt``, a BLOCK with patch continues the workflow
            as new with the patched input, and the memo's multi-agent session reaches
            every event; under ``"1.0"`` a HALT fails the activity only.
        max_patch_restarts: how many times a workflow chain may continue as new for a
            BLOCK with patch (``"2.0"`` conventions); one more fails the workflow with
            ``GovernancePatchLimitExceeded``.
        client: the worker's Temporal client, used to terminate workflows on HALT
            (``"2.0"``); without it the activity's own client is used, which only
            ``async def`` activities have (a sync activity's HALT then fails the activity
            without terminating, with a warning): give it, or :meth:`set_client`.

    Creating it says ``hello`` to the agent at once (from a background thread), so the
    agent watches the worker from its start, and again as soon as a restarted agent is
    back.

    Without a reachable agent, under fail_open (the default) the worker runs exactly as
    without the hook; under fail_closed each activity fails with ``GovernanceHalt``
    (non-retryable) naming the socket. Either way one warning is logged (logger
    ``openbox.hook``) and the connection is retried every 5 s.

    Raises:
        ValueError: ``timeout`` is not positive, ``$OPENBOX_GOVERNANCE_POLICY`` is
            not ``fail_open``/``fail_closed``, ``sdk_conventions`` is not ``"1.0"`` or
            ``"2.0"``, or ``max_patch_restarts`` is not an integer ≥ 1.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 5.0,
        config: Mapping[str, Any] | None = None,
        sdk_conventions: str | None = None,
        max_patch_restarts: int = _patch.DEFAULT_MAX_RESTARTS,
        client: temporalio.client.Client | None = None,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        check_max_patch_restarts(max_patch_restarts)
        path = socket_path or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
        settings = dict(config or {})
        _apply_policy_env(settings)
        _apply_conventions(settings, sdk_conventions)
        self._sdk2 = settings.get("sdk_conventions") == "2.0"
        self._client = client
        self._link = AgentLink(os.fspath(path), float(timeout), serialize_value(settings))
        self._workflow_class = _workflow.interceptor_class(
            self._link,
            self._sdk2,
            max_patch_restarts,
            workflow_input=settings.get("sdk_conventions") != "1.0",
        )
        # Hello now, as the worker is built: the agent must watch the process before it
        # opens the connections its activities will use.
        self._link.start_presence()
        # Work activities hand to thread pools, process pools and their own threads is
        # attributed to them (see `_propagate`).
        _propagate.install()

    @property
    def socket_path(self) -> str:
        return self._link.socket_path

    @property
    def sdk_conventions(self) -> str:
        return "2.0" if self._sdk2 else "1.0"

    def set_client(self, client: temporalio.client.Client) -> None:
        """The worker's Temporal client, for terminating workflows on HALT."""
        self._client = client

    def close(self) -> None:
        """Close the hook's connections to the agent (exiting the process does too).

        Call it on the worker's event loop once the worker has stopped; a later activity
        would simply connect again. Workflow events already handed to the background
        sender are still sent (see :meth:`flush`).
        """
        self._link.close()

    @staticmethod
    def flush(timeout: float = 5.0) -> bool:
        """Wait (blocking) until every workflow event reported so far has been written
        to the agent and answered, or given up. True if that happened within
        ``timeout`` seconds. Useful before a process exits."""
        return _events.wait_idle(timeout)

    def intercept_activity(
        self, next: temporalio.worker.ActivityInboundInterceptor
    ) -> temporalio.worker.ActivityInboundInterceptor:
        return ActivityInbound(next, self._link, self._sdk2, lambda: self._client)

    def workflow_interceptor_class(
        self, input: temporalio.worker.WorkflowInterceptorClassInput
    ) -> type[temporalio.worker.WorkflowInboundInterceptor] | None:
        # Workflow events (WorkflowStarted/Completed/Failed, SignalReceived), fire and
        # forget; workflows do no I/O of their own, so attribution needs nothing here.
        return self._workflow_class


def check_max_patch_restarts(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_patch_restarts must be an integer >= 1, got {value!r}")


def _apply_conventions(config: dict[str, Any], chosen: str | None) -> None:
    """The worker's SDK conventions into the config sent in ``hello``: the argument, else
    the config's own, else ``$OPENBOX_SDK_CONVENTIONS``; none of them: not sent (the
    agent's setting applies). Checked here so a typo fails at worker start."""
    if chosen is not None:
        source, value = "sdk_conventions", chosen
    elif config.get("sdk_conventions") is not None:
        source, value = "config['sdk_conventions']", config["sdk_conventions"]
    elif os.environ.get(CONVENTIONS_ENV):
        source, value = f"${CONVENTIONS_ENV}", os.environ[CONVENTIONS_ENV]
    else:
        return
    value = str(value).strip()
    value = {"1": "1.0", "2": "2.0"}.get(value, value)
    if value not in SDK_CONVENTIONS:
        raise ValueError(f"{source} must be '1.0' or '2.0', got {value!r}")
    config["sdk_conventions"] = value


def _apply_policy_env(config: dict[str, Any]) -> None:
    """``$OPENBOX_GOVERNANCE_POLICY`` as the config's ``governance_policy`` unless the
    config sets one (or its alias ``on_api_error``). Checked here: the hook acts on it when
    the agent is unreachable, so a misspelt fail_closed must not pass for fail_open."""
    if "governance_policy" in config or "on_api_error" in config:
        return
    policy = os.environ.get(POLICY_ENV)
    if not policy:
        return
    if policy not in GOVERNANCE_POLICIES:
        raise ValueError(f"${POLICY_ENV} must be 'fail_open' or 'fail_closed', got {policy!r}")
    config["governance_policy"] = policy
