"""Multi-agent sessions (SDK 2.0 conventions; openbox-core-protocol.md §2.4).

The application names the session when it starts a workflow, in the memo:
``start_workflow(..., memo={"openbox_multi_agent_session_id": "s-1"})``. The workflow
interceptor reads it from the memo (so replay reads the same), adds it to the workflow's
events and stamps it on every activity it schedules as the Temporal header
``openbox-multi-agent-session-id``; the activity interceptor reads the header and sends it
with ``activity_start``; the agent puts it on every event of the activity. The hook mints
no session ids and keeps no registry of agents: that is the application's.

``emit_handoff()`` (re-exported by the package) is called from workflow code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime

import temporalio.activity
import temporalio.api.common.v1
import temporalio.workflow

from . import _events
from ._agent import AgentLink

MEMO_KEY = "openbox_multi_agent_session_id"
HEADER_KEY = "openbox-multi-agent-session-id"

_log = logging.getLogger("openbox.hook")

_links: dict[str, AgentLink] = {}
"""The agent link of each workflow run this process executes under SDK 2.0 conventions,
by run id: ``emit_handoff`` (called by workflow code, which holds no hook) reports
through it."""


def from_memo() -> str | None:
    """The session of the current workflow run: its memo's, when a non-empty string."""
    value = temporalio.workflow.memo_value(MEMO_KEY, None)
    return value if isinstance(value, str) and value else None


def with_header(
    headers: Mapping[str, temporalio.api.common.v1.Payload], session: str
) -> dict[str, temporalio.api.common.v1.Payload]:
    return {**headers, HEADER_KEY: temporalio.workflow.payload_converter().to_payload(session)}


def from_header(headers: Mapping[str, temporalio.api.common.v1.Payload] | None) -> str | None:
    """The session an activity's headers carry, if any (in an activity)."""
    payload = headers.get(HEADER_KEY) if headers else None
    if payload is None:
        return None
    try:
        value = temporalio.activity.payload_converter().from_payload(payload, str)
    except Exception:
        _log.warning("openbox hook: the %s header is not a string; ignored", HEADER_KEY)
        return None
    return value if isinstance(value, str) and value else None


async def emit_handoff(
    multi_agent_session_id: str,
    from_agent_did: str,
    ts: datetime | None = None,
    *,
    timeout: float = 30.0,
    on_api_error: str = "fail_open",
) -> None:
    """Report a multi-agent ``Handoff`` (from ``from_agent_did``, in the session) from
    workflow code, as SDK 2.0's ``emit_handoff`` does.

    Differences by design: the event goes to the agent like the workflow's other events
    (fire-and-forget, never while replaying, no ``send_governance_event`` activity in the
    history), so this returns None and Core's verdict on the Handoff is not acted on in
    the workflow; ``ts``, ``timeout`` and ``on_api_error`` are accepted for
    compatibility: the agent stamps the time when it sends the event, and its own
    governance settings apply.

    Raises:
        ValueError: a field is empty (before anything is sent, as in the SDK).
        RuntimeError: called outside a workflow run of a worker with the hook under SDK
            2.0 conventions (``OpenBoxPlugin``, or ``sdk_conventions="2.0"``).
    """
    del ts, timeout, on_api_error
    if not isinstance(from_agent_did, str) or not from_agent_did.strip():
        raise ValueError("emit_handoff: from_agent_did is required and must be non-empty")
    if not isinstance(multi_agent_session_id, str) or not multi_agent_session_id.strip():
        raise ValueError("emit_handoff: multi_agent_session_id is required and must be non-empty")
    unsafe = temporalio.workflow.unsafe
    with unsafe.sandbox_unrestricted(), unsafe.imports_passed_through():
        info = temporalio.workflow.info()
        link = _links.get(info.run_id)
        if link is None:
            raise RuntimeError(
                "emit_handoff: this workflow does not run on a worker with the OpenBox hook "
                "under SDK 2.0 conventions; use OpenBoxPlugin, or "
                "create_openbox_worker(..., sdk_conventions='2.0')"
            )
        if unsafe.is_replaying():
            return
        _events.post(
            link,
            "workflow_event",
            {
                "event_type": "Handoff",
                "workflow_id": info.workflow_id,
                "run_id": info.run_id,
                "workflow_type": info.workflow_type,
                "from_agent_did": from_agent_did,
                "multi_agent_session_id": multi_agent_session_id,
            },
        )


def bind(run_id: str, link: AgentLink) -> None:
    _links[run_id] = link


def unbind(run_id: str) -> None:
    _links.pop(run_id, None)
