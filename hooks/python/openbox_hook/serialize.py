"""Activity inputs and outputs as JSON values, by the OpenBox SDK's rules.

The agent forwards these values to OpenBox Core as ``activity_input`` and
``activity_output`` (openbox-core-protocol.md §2.1), so they must come out exactly as the
in-process SDK made them:

- JSON scalars pass through (``None``, ``bool``, ``int``, ``float``, ``str``);
- bytes become UTF-8 text, or base64 when they are not valid UTF-8;
- a dataclass instance becomes an object keyed by field name;
- a list or tuple becomes an array, a dict an object;
- a Temporal ``Payload`` is decoded as JSON (``RawValue``, what dynamic activities get,
  by its payload);
- a pydantic model becomes ``model_dump(mode="json")``;
- anything else goes through ``json`` with ``str()`` as the fallback.

Two deliberate refinements over the SDK, both so the result is always valid JSON: fields
of dataclasses are serialised by these same rules (the SDK's ``asdict`` left bytes inside
them unserialisable), and non-finite floats become their ``str()`` (JSON has no NaN).
Serialisation never raises: a value that defeats every rule becomes a short description.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import temporalio.api.common.v1
import temporalio.common

_Payload = temporalio.api.common.v1.Payload


def serialize_args(args: Sequence[Any]) -> list[Any]:
    """The positional arguments of an activity as a JSON array (``[]`` when none)."""
    return [serialize_value(arg) for arg in args]


def serialize_value(value: Any) -> Any:
    """``value`` as a JSON-compatible Python value (see the module docstring)."""
    try:
        return _convert(value, set())
    except Exception:
        # A __str__, __eq__ or model_dump that raises, or nesting too deep for the stack.
        return _describe(value)


def _convert(value: Any, active: set[int]) -> Any:
    # `active` holds the ids of the containers on the path from the root: a container
    # that contains itself is cut there (as its str()) instead of recursing forever.
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _bytes(bytes(value))
    if isinstance(value, _Payload):
        return _payload(value)
    if isinstance(value, temporalio.common.RawValue):
        return _payload(value.payload)
    if id(value) in active:
        return str(value)
    if isinstance(value, (list, tuple)):
        active.add(id(value))
        try:
            return [_convert(item, active) for item in value]
        finally:
            active.discard(id(value))
    if isinstance(value, dict):
        active.add(id(value))
        try:
            return {_key(key): _convert(item, active) for key, item in value.items()}
        finally:
            active.discard(id(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        active.add(id(value))
        try:
            return {
                field.name: _convert(getattr(value, field.name), active)
                for field in dataclasses.fields(value)
            }
        finally:
            active.discard(id(value))
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump) and not isinstance(value, type):
        # pydantic v2: its JSON mode already yields JSON-compatible values; the second
        # pass only normalises what a custom serialiser may have left (NaN, bytes).
        return _convert(model_dump(mode="json"), active)
    # Everything else the way the SDK did it: json with str() as the fallback, which
    # keeps int and str subclasses (enums) as their values and turns the rest into text.
    return _convert(json.loads(json.dumps(value, default=str)), active)


def _bytes(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii")


def _payload(payload: _Payload) -> Any:
    if payload.metadata.get("encoding") == b"binary/null":
        return None
    try:
        return _convert(json.loads(payload.data), set())
    except ValueError:
        # The SDK's description of a payload that is not JSON (binary/plain, protobuf).
        return f"<Payload: {len(payload.data)} bytes>"


def _key(key: Any) -> str:
    # json.dumps writes scalar keys as their JSON text (1 -> "1", True -> "true",
    # None -> "null"); it rejects other keys, which get their str() here.
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key)
    return str(key)


def _describe(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unserialisable {type(value).__qualname__}>"
