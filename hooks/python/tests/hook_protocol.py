"""The hook <-> agent protocol schema (``hooks/protocol/hook-agent.schema.json``), for
checking the messages the hook really sends and the replies the fake agent gives.

The same schema is checked by openbox-agent's tests against the agent's own requests
parsing and replies, so a field renamed on one side fails the other side's tests.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jsonschema

SCHEMA_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "protocol",
    "hook-agent.schema.json",
)
OPS = ("hello", "thread", "activity_start", "activity_end", "workflow_event")

with open(SCHEMA_PATH, encoding="utf-8") as _file:
    SCHEMA: dict[str, Any] = json.load(_file)
jsonschema.Draft202012Validator.check_schema(SCHEMA)


def _validator(definition: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/$defs/{definition}", "$defs": SCHEMA["$defs"]}
    )


_REQUEST = _validator("request")
_ERROR_REPLY = _validator("error_reply")
_REPLIES = {op: _validator(f"{op}_reply") for op in OPS}


def _problems(validator: jsonschema.Draft202012Validator, message: Any) -> list[str]:
    return [
        f"{error.message} at {'/'.join(map(str, error.absolute_path)) or 'top level'}"
        for error in validator.iter_errors(message)
    ]


def request_problems(message: Any) -> list[str]:
    """Why ``message`` is not a request of the protocol (empty when it is one)."""
    return _problems(_REQUEST, message)


def reply_problems(op: Any, reply: Any) -> list[str]:
    """Why ``reply`` is not a reply to an ``op`` request (empty when it is one)."""
    if isinstance(reply, dict) and reply.get("ok") is False:
        return _problems(_ERROR_REPLY, reply)
    validator = _REPLIES.get(op)
    if validator is None:
        return [f"no request op {op!r} to answer"]
    return _problems(validator, reply)
