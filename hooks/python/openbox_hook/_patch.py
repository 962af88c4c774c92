"""BLOCK with patch (SDK 2.0 conventions; openbox-core-protocol.md §8).

Core may answer an activity's event with ``verdict: block`` and ``patch: {new_input: X}``.
The agent checks the patch's rules and hands the hook the ``GovernancePatch`` details;
the activity raises the non-retryable ``ApplicationError(type="GovernancePatch")`` with
that single details entry, and the workflow interceptor, seeing it in the failure's cause
chain, continues the workflow as new: with the original arguments when ``new_input`` is
null, else with ``new_input`` as its single argument. The memo counter
``openbox_retryable_block_restart_count`` counts the restarts of the chain; one past
``max_patch_restarts`` fails the workflow with ``GovernancePatchLimitExceeded``.

Everything here reads only what the workflow's history holds (the activity failure and
the memo), so replay takes the same path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import temporalio.exceptions
import temporalio.workflow

PATCH = "GovernancePatch"
LEGACY_PATCH = "GovernanceRetryableBlock"
"""The type SDK 2.0 raised before it renamed the error; still accepted."""
LIMIT_EXCEEDED = "GovernancePatchLimitExceeded"
SCHEMA_VERSION = 1
MEMO_RESTART_COUNT = "openbox_retryable_block_restart_count"
MESSAGE = "Governance requested workflow restart"
DEFAULT_MAX_RESTARTS = 3


def details(raw: Any) -> dict[str, Any] | None:
    """The ``GovernancePatch`` details entry when ``raw`` is a well-formed one, else None
    (a malformed envelope is a plain BLOCK, never a restart)."""
    if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
        return None
    if "new_input" not in raw:  # present-null is the "keep the input" patch
        return None
    event_type = raw.get("event_type")
    if not isinstance(event_type, str) or not event_type:
        return None
    if not isinstance(raw.get("hook_trigger"), bool):
        return None
    for key in ("hook_stage", "governance_event_id", "reason"):
        if raw.get(key) is not None and not isinstance(raw.get(key), str):
            return None
    return {
        key: raw.get(key)
        for key in (
            "schema_version",
            "new_input",
            "governance_event_id",
            "reason",
            "event_type",
            "hook_trigger",
            "hook_stage",
        )
    }


def error(request: dict[str, Any]) -> temporalio.exceptions.ApplicationError:
    """The activity's error carrying a patch request to its workflow."""
    return temporalio.exceptions.ApplicationError(MESSAGE, request, type=PATCH, non_retryable=True)


def requested(exc: BaseException) -> dict[str, Any] | None:
    """The patch request in ``exc``'s cause chain (Temporal ``cause``, else ``__cause__``,
    else ``__context__``), matched on the ``ApplicationError.type``, never on text. A
    patch error whose details are not exactly one valid entry means no restart."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "type", None) in (PATCH, LEGACY_PATCH):
            entries = getattr(current, "details", None)
            if isinstance(entries, (list, tuple)) and len(entries) == 1:
                return details(entries[0])
            return None
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    return None


def continue_as_new(request: dict[str, Any], args: Sequence[Any], max_restarts: int) -> None:
    """Continue the current workflow as new for ``request`` (raises Temporal's
    ``ContinueAsNewError``), or raise ``GovernancePatchLimitExceeded`` when the chain has
    restarted ``max_restarts`` times already or its memo counter is not a count. The
    whole memo is carried over (the application's keys and the multi-agent session)."""
    memo = dict(temporalio.workflow.memo())
    count = temporalio.workflow.memo_value(MEMO_RESTART_COUNT, 0)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise temporalio.exceptions.ApplicationError(
            f"Invalid patch restart counter in workflow memo ({MEMO_RESTART_COUNT}={count!r})",
            type=LIMIT_EXCEEDED,
            non_retryable=True,
        )
    if count + 1 > max_restarts:
        raise temporalio.exceptions.ApplicationError(
            f"Patch restart limit ({max_restarts}) exceeded",
            type=LIMIT_EXCEEDED,
            non_retryable=True,
        )
    memo[MEMO_RESTART_COUNT] = count + 1
    if request["new_input"] is None:
        temporalio.workflow.continue_as_new(args=list(args), memo=memo)
    temporalio.workflow.continue_as_new(request["new_input"], memo=memo)
