"""``create_openbox_worker``: the SDK's factory, taking the SDK's parameters.

Moving from ``openbox-temporal-sdk-python`` is a one-line import change::

    from openbox_hook import create_openbox_worker   # was: from openbox import ...

The governance settings are not acted on here: they go to openbox-agent in ``hello``
(``config``), and the agent governs. The instrumentation switches are accepted and
ignored: the agent captures HTTP, databases and files at kernel level, for every library.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import temporalio.client
import temporalio.worker

from ._agent import GOVERNANCE_POLICIES, POLICY_ENV
from .hook import OpenBoxHook


def create_openbox_worker(
    client: temporalio.client.Client,
    task_queue: str,
    workflows: Sequence[type] = (),
    activities: Sequence[Callable[..., Any]] = (),
    *,
    openbox_url: str | None = None,
    openbox_api_key: str | None = None,
    governance_timeout: float = 30.0,
    governance_policy: str | None = None,
    send_start_event: bool = True,
    send_activity_start_event: bool = True,
    skip_workflow_types: Iterable[str] | None = None,
    skip_activity_types: Iterable[str] | None = None,
    skip_signals: Iterable[str] | None = None,
    hitl_enabled: bool = True,
    instrument_databases: bool = True,
    db_libraries: Iterable[str] | None = None,
    instrument_file_io: bool = False,
    max_body_size: int | None = None,
    agent_socket: str | None = None,
    sdk_conventions: str | None = None,
    max_patch_restarts: int = 3,
    **worker_kwargs: Any,
) -> temporalio.worker.Worker:
    """A ``temporalio.worker.Worker`` with an :class:`OpenBoxHook` installed.

    Args:
        client, task_queue, workflows, activities: as for ``Worker``.
        openbox_url, openbox_api_key, governance_timeout, governance_policy,
        send_start_event, send_activity_start_event, skip_workflow_types,
        skip_activity_types, skip_signals, hitl_enabled: the SDK's governance settings,
            forwarded to the agent, which governs (settings left as ``None`` are not
            sent, so the agent's own defaults apply to them). ``governance_timeout``
            plus 5 s is also how long the hook waits for the agent's decision on each
            ``activity_start``/``activity_end``. ``governance_policy`` defaults to
            ``$OPENBOX_GOVERNANCE_POLICY``, else ``"fail_open"``; under ``"fail_closed"``
            an unreachable agent fails every activity with ``GovernanceHalt``.
        instrument_databases, db_libraries, instrument_file_io: accepted for
            compatibility and ignored: the agent sees all database and file I/O.
        max_body_size: under 2.0 conventions, characters kept of each captured body
            (default: the agent's setting, else SDK 2.0's 65536).
        agent_socket: the agent's Unix socket (default ``$OPENBOX_AGENT_SOCKET``, else
            ``/run/openbox/agent.sock``).
        sdk_conventions: ``"1.0"`` (the default: HALT fails the activity, as SDK 1.0
            did) or ``"2.0"`` (HALT terminates the workflow, BLOCK with patch continues
            it as new, multi-agent sessions; see :class:`OpenBoxHook`).
        max_patch_restarts: SDK 2.0's limit on BLOCK-with-patch restarts (≥ 1).
        worker_kwargs: any other ``Worker`` parameter; an ``interceptors`` list gets
            the hook appended.

    Raises:
        ValueError: ``governance_policy`` (or ``$OPENBOX_GOVERNANCE_POLICY``) is not
            ``"fail_open"``/``"fail_closed"``, or
            ``governance_timeout`` is not a positive number of seconds.
        TypeError: a skip list is a single string instead of a collection of names.
    """
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
        sdk_conventions=sdk_conventions,
        max_body_size=max_body_size,
    )
    hook = OpenBoxHook(
        agent_socket, config=config, max_patch_restarts=max_patch_restarts, client=client
    )
    interceptors = [*worker_kwargs.pop("interceptors", ()), hook]
    return temporalio.worker.Worker(
        client,
        task_queue=task_queue,
        workflows=workflows,
        activities=activities,
        interceptors=interceptors,
        **worker_kwargs,
    )


def governance_config(
    *,
    openbox_url: str | None,
    openbox_api_key: str | None,
    governance_timeout: float,
    governance_policy: str | None,
    send_start_event: bool,
    send_activity_start_event: bool,
    skip_workflow_types: Iterable[str] | None,
    skip_activity_types: Iterable[str] | None,
    skip_signals: Iterable[str] | None,
    hitl_enabled: bool,
    sdk_conventions: str | None,
    max_body_size: int | None = None,
) -> dict[str, Any]:
    """The SDK's governance parameters, checked, as the ``config`` the hook sends the
    agent (settings left as ``None`` are left out)."""
    source = "governance_policy"
    if governance_policy is None:
        governance_policy, source = os.environ.get(POLICY_ENV), f"${POLICY_ENV}"
        governance_policy = governance_policy or "fail_open"
    if governance_policy not in GOVERNANCE_POLICIES:
        raise ValueError(
            f"{source} must be 'fail_open' or 'fail_closed', got {governance_policy!r}"
        )
    if (
        isinstance(governance_timeout, bool)
        or not isinstance(governance_timeout, (int, float))
        or not governance_timeout > 0
    ):
        raise ValueError(
            f"governance_timeout must be a number of seconds > 0, got {governance_timeout!r}"
        )
    settings: dict[str, Any] = {
        "openbox_url": openbox_url,
        "openbox_api_key": openbox_api_key,
        "governance_timeout": float(governance_timeout),
        "governance_policy": governance_policy,
        "send_start_event": send_start_event,
        "send_activity_start_event": send_activity_start_event,
        "skip_workflow_types": _names("skip_workflow_types", skip_workflow_types),
        "skip_activity_types": _names("skip_activity_types", skip_activity_types),
        "skip_signals": _names("skip_signals", skip_signals),
        "hitl_enabled": hitl_enabled,
        "sdk_conventions": sdk_conventions,
        "max_body_size": max_body_size,
    }
    return {key: value for key, value in settings.items() if value is not None}


def _names(parameter: str, names: Iterable[str] | None) -> list[str] | None:
    """A set of names as the sorted list JSON can carry."""
    if names is None:
        return None
    if isinstance(names, (str, bytes)):
        raise TypeError(f"{parameter} must be a collection of names, not a single string")
    return sorted({str(name) for name in names})
