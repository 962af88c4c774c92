"""The agent's governance decision for an activity, and how the hook carries it out.

Replies to ``activity_start`` and ``activity_end`` may carry ``"decision"`` (the agent's
``governance::Decision``; openbox-core-protocol.md §4.2, §4.3, §5):

- ``{"action": "continue", "verdict": ..., "constrained": bool, "redaction": null |
  {"target": "input", "args": [{"index": i, "value": v}, ...]} |
  {"target": "output", "value": v}}``
- ``{"action": "fail", "error_type": str, "message": str, "non_retryable": bool,
  "reason"?: str, "patch"?: {GovernancePatch details}}``
- ``{"action": "approval_pending", "message": str}``

Under SDK 2.0 conventions (``sdk2``), a ``fail`` carrying a valid ``patch`` becomes the
``GovernancePatch`` error (§8), and a ``GovernanceHalt`` is worded as SDK 2.0 words it
(``Governance HALT: <reason>``) and marked ``halt``: the activity terminates its workflow
before raising it. Under SDK 1.0 conventions both are the agent's plain error.

A reply without a decision, and a decision this module cannot read, mean "continue
unchanged": the hook only ever fails an activity because the agent explicitly said so.
A decision is checked whole before anything of it is applied, so a malformed one changes
nothing (no half-applied redaction).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from typing import Any

import temporalio.exceptions

from . import _patch

_log = logging.getLogger("openbox.hook")

APPROVAL_PENDING = "ApprovalPending"
GOVERNANCE_HALT = "GovernanceHalt"
HALT_DEFAULT_REASON = "Workflow halted by governance policy"
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Decision:
    """A readable decision. ``error`` is set for fail/approval_pending, else None."""

    error: temporalio.exceptions.ApplicationError | None = None
    constrained: bool = False
    input_args: tuple[tuple[int, Any], ...] = ()
    """Input redaction: (argument index, value) pairs, in the agent's order."""
    output: Any = _MISSING
    """Output redaction: the value, or ``_MISSING`` for none."""
    halt: bool = False
    """SDK 2.0 HALT: terminate the workflow before raising ``error``."""

    @property
    def redacts_output(self) -> bool:
        return self.output is not _MISSING


CONTINUE = Decision()

_malformed_lock = threading.Lock()
_malformed_warned = False


def read(reply: dict[str, Any] | None, stage: str, sdk2: bool = False) -> Decision:
    """The decision in an agent reply to ``activity_start``/``activity_end`` (``stage``
    ``"start"``/``"end"``); CONTINUE when there is none or it is malformed. ``sdk2``:
    the worker follows SDK 2.0 conventions."""
    if reply is None or "decision" not in reply:
        return CONTINUE
    raw = reply["decision"]
    try:
        decision = _parse(raw, stage)
        return _as_sdk2(decision, raw) if sdk2 else decision
    except _Malformed as exc:
        _warn_malformed(stage, raw, exc)
        return CONTINUE


class _Malformed(ValueError):
    pass


def _as_sdk2(decision: Decision, raw: dict[str, Any]) -> Decision:
    """``decision`` as SDK 2.0 acts on it: a valid patch first, then HALT (§4.2)."""
    if decision.error is None or raw.get("action") != "fail":
        return decision
    request = _patch.details(raw.get("patch"))
    if request is not None:
        return Decision(error=_patch.error(request))
    if decision.error.type != GOVERNANCE_HALT:
        return decision
    reason = raw.get("reason")
    if not isinstance(reason, str) or not reason:
        reason = HALT_DEFAULT_REASON
    return Decision(error=halt_error(reason), halt=True)


def halt_error(reason: str) -> temporalio.exceptions.ApplicationError:
    """SDK 2.0's HALT error, raised once the workflow is terminated."""
    return _application_error(f"Governance HALT: {reason}", GOVERNANCE_HALT, True)


def _parse(raw: Any, stage: str) -> Decision:
    if raw is None:
        return CONTINUE
    if not isinstance(raw, dict):
        raise _Malformed("not an object")
    action = raw.get("action")
    if action == "continue":
        constrained = raw.get("constrained", False)
        if not isinstance(constrained, bool):
            raise _Malformed("`constrained` is not a boolean")
        return _redaction(raw.get("redaction"), stage, constrained)
    if action == "fail":
        error_type = raw.get("error_type")
        message = raw.get("message")
        non_retryable = raw.get("non_retryable", True)
        if not isinstance(error_type, str) or not error_type:
            raise _Malformed("`error_type` is not a non-empty string")
        if not isinstance(message, str):
            raise _Malformed("`message` is not a string")
        if not isinstance(non_retryable, bool):
            raise _Malformed("`non_retryable` is not a boolean")
        return Decision(error=_application_error(message, error_type, non_retryable))
    if action == "approval_pending":
        message = raw.get("message")
        if not isinstance(message, str):
            raise _Malformed("`message` is not a string")
        # Retryable: Temporal's retry brings the activity back, and the agent polls the
        # approval at that attempt's activity_start (§5).
        return Decision(error=_application_error(message, APPROVAL_PENDING, False))
    raise _Malformed(f"unknown action {action!r}")


def _redaction(raw: Any, stage: str, constrained: bool) -> Decision:
    if raw is None:
        return Decision(constrained=constrained)
    if not isinstance(raw, dict):
        raise _Malformed("`redaction` is not an object")
    target = raw.get("target")
    if target == "input":
        entries = raw.get("args")
        if not isinstance(entries, list):
            raise _Malformed("input redaction `args` is not an array")
        args = []
        for entry in entries:
            index = entry.get("index") if isinstance(entry, dict) else None
            if type(index) is not int or index < 0 or "value" not in entry:
                raise _Malformed(f"input redaction entry {entry!r} is not {{index, value}}")
            args.append((index, entry["value"]))
        if stage != "start":
            return Decision(constrained=constrained)  # nothing left to redact: ignored
        return Decision(constrained=constrained, input_args=tuple(args))
    if target == "output":
        if "value" not in raw:
            raise _Malformed("output redaction has no `value`")
        if stage != "end" or raw["value"] is None:
            # §4.3: a null redacted output leaves the result unchanged.
            return Decision(constrained=constrained)
        return Decision(constrained=constrained, output=raw["value"])
    raise _Malformed(f"unknown redaction target {target!r}")


def _application_error(
    message: str, error_type: str, non_retryable: bool
) -> temporalio.exceptions.ApplicationError:
    return temporalio.exceptions.ApplicationError(
        message, type=error_type, non_retryable=non_retryable
    )


def _warn_malformed(stage: str, raw: Any, exc: Exception) -> None:
    global _malformed_warned
    with _malformed_lock:
        first = not _malformed_warned
        _malformed_warned = True
    text = repr(raw)
    if len(text) > 300:
        text = text[:300] + "…"
    _log.log(
        logging.WARNING if first else logging.DEBUG,
        "openbox-agent sent a decision the hook cannot read at activity %s (%s): %s; "
        "the activity continues unchanged%s",
        stage,
        exc,
        text,
        " (further ones are logged at debug level)" if first else "",
    )


# -- redaction ---------------------------------------------------------------------------


def redact_args(args: Sequence[Any], redactions: Sequence[tuple[int, Any]]) -> list[Any]:
    """The arguments after an input redaction (§4.3, applied to the real arguments).

    Each ``(i, v)`` with ``i`` below the argument count: a dataclass argument gets ``v``
    merged in place when ``v`` is an object; any other argument is replaced by ``v``.
    Returns a new list (the dataclass arguments in it are the same, updated, objects).
    """
    result = list(args)
    for index, value in redactions:
        if index < len(result):
            result[index] = _redact(result[index], value)
    return result


def redact_output(result: Any, value: Any) -> Any:
    """The result after an output redaction: merged into a dataclass result when ``value``
    is an object, else ``value`` itself."""
    return _redact(result, value)


def _redact(current: Any, value: Any) -> Any:
    if _is_dataclass_instance(current) and isinstance(value, dict):
        merge_dataclass(current, value)
        return current
    return value


def merge_dataclass(obj: Any, data: dict[str, Any]) -> None:
    """The SDK's ``_deep_update_dataclass``: each key of ``data`` that names a field of
    ``obj`` replaces it, except that a nested dataclass given an object is merged into
    recursively, and a list given a list is updated element by element (dataclass items
    given objects merged, other items replaced, up to the shorter of the two). Keys that
    name no field are ignored. Frozen dataclasses are updated too: redaction must reach
    the object the activity holds."""
    for field in dataclasses.fields(obj):
        if field.name not in data:
            continue
        new = data[field.name]
        current = getattr(obj, field.name)
        if _is_dataclass_instance(current) and isinstance(new, dict):
            merge_dataclass(current, new)
        elif isinstance(current, list) and isinstance(new, list):
            for i, (item, new_item) in enumerate(zip(current, new, strict=False)):
                if _is_dataclass_instance(item) and isinstance(new_item, dict):
                    merge_dataclass(item, new_item)
                else:
                    current[i] = new_item
        elif _is_frozen(obj):
            # How the dataclass's own __init__ sets the fields of a frozen instance.
            object.__setattr__(obj, field.name, new)
        else:
            setattr(obj, field.name, new)


def _is_frozen(obj: Any) -> bool:
    params = getattr(type(obj), "__dataclass_params__", None)
    return bool(getattr(params, "frozen", False))


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)
