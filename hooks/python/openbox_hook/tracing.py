"""``@traced``: SDK 2.0's function decorator (``openbox.tracing.traced``), through the agent.

A decorated function called inside a governed activity is one operation of that
activity, of hook type ``function_call`` (openbox-core-protocol.md §3.2): before it runs,
the hook sends the agent its ``started`` stage (``function``, ``module``, ``args``) and
waits for the verdict, as SDK 2.0 waits for its preflight — a BLOCK or HALT raises
``GovernanceBlock`` / ``GovernanceHalt`` and the function never runs; after it returns
or raises, the ``completed`` stage (``result`` or the error) is sent without waiting.

Outside an activity, without an agent, or when the worker's operations do not go to Core
as hook events (SDK 1.0 conventions and an agent without ``--hook-events``), the function
runs as it is: SDK 2.0 without its hook runtime does the same.

The options are SDK 2.0's: ``name`` (the span is ``function <name>``), ``capture_args``,
``capture_result``; ``capture_exception`` and ``max_arg_length`` are accepted and, as in
SDK 2.0, not used.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar, overload

from . import _decision, _driver
from .serialize import serialize_value

__all__ = ["traced"]

_log = logging.getLogger("openbox.hook")

F = TypeVar("F", bound=Callable[..., Any])


@overload
def traced(_func: F) -> F: ...


@overload
def traced(
    _func: None = None,
    *,
    name: str | None = None,
    capture_args: bool = True,
    capture_result: bool = True,
    capture_exception: bool = True,
    max_arg_length: int = 2000,
) -> Callable[[F], F]: ...


def traced(
    _func: F | None = None,
    *,
    name: str | None = None,
    capture_args: bool = True,
    capture_result: bool = True,
    capture_exception: bool = True,
    max_arg_length: int = 2000,
) -> F | Callable[[F], F]:
    """Govern each call of the function as a ``function_call`` operation of its activity."""
    del capture_exception, max_arg_length  # accepted for SDK compatibility, as SDK 2.0 does

    def decorate(target: F) -> F:
        qualname = getattr(target, "__qualname__", getattr(target, "__name__", "function"))
        subject = name or qualname

        def started_fields(args: tuple, kwargs: dict) -> dict[str, Any]:
            fields: dict[str, Any] = {
                "hook_type": "function_call",
                "stage": "started",
                "name": subject,
                "function": qualname,
                "module": getattr(target, "__module__", None),
            }
            if capture_args:
                fields["args"] = serialize_value({"args": list(args), "kwargs": kwargs})
            return fields

        def completed_fields(
            token: int, span_id: str, result: Any, error: BaseException | None
        ) -> dict[str, Any]:
            fields: dict[str, Any] = {
                "token": token,
                "hook_type": "function_call",
                "stage": "completed",
                "span_id": span_id,
                "function": qualname,
                "module": getattr(target, "__module__", None),
            }
            if error is not None:
                fields["error"] = str(error)
            elif capture_result:
                fields["result"] = serialize_value(result)
            return fields

        if inspect.iscoroutinefunction(target):

            @functools.wraps(target)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                mark = _driver.current.get()
                if mark is None or not mark.token or mark.link is None:
                    return await target(*args, **kwargs)
                token, link = mark.token, mark.link
                started = started_fields(args, kwargs)
                reply = await link.call_governed("hook_event", token=token, **started)
                span_id = _governed(reply)
                if span_id is None:
                    return await target(*args, **kwargs)
                try:
                    result = await target(*args, **kwargs)
                except Exception as exc:
                    await _post(link, completed_fields(token, span_id, None, exc))
                    raise
                await _post(link, completed_fields(token, span_id, result, None))
                return result

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(target)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            mark = _driver.current.get()
            if mark is None or not mark.token or mark.link is None:
                return target(*args, **kwargs)
            token, link = mark.token, mark.link
            started = started_fields(args, kwargs)
            reply = link.call_blocking("hook_event", token=token, **started)
            span_id = _governed(reply)
            if span_id is None:
                return target(*args, **kwargs)
            try:
                result = target(*args, **kwargs)
            except Exception as exc:
                link.call_blocking("hook_event", **completed_fields(token, span_id, None, exc))
                raise
            link.call_blocking("hook_event", **completed_fields(token, span_id, result, None))
            return result

        return sync_wrapper  # type: ignore[return-value]

    if _func is not None:
        return decorate(_func)
    return decorate


def _governed(reply: dict[str, Any] | None) -> str | None:
    """The call's span id when the agent governs it; raises the agent's BLOCK/HALT error.

    No agent, a refusal, or a null span id: the call runs ungoverned (fail_closed is
    enforced when the activity ends, by the agent or the hook's activity interceptor).
    """
    if reply is None or not reply.get("ok"):
        if reply is not None:
            _log.debug("openbox-agent did not take a @traced call: %s", reply.get("error"))
        return None
    decision = _decision.read(reply, "start")
    if decision.error is not None:
        raise decision.error
    span_id = reply.get("span_id")
    return span_id if isinstance(span_id, str) else None


async def _post(link: Any, fields: dict[str, Any]) -> None:
    """Send a completed stage without waiting for its answer (nothing acts on it)."""
    future = await link.post("hook_event", fields)
    if future is not None:
        # Read (and drop) the answer when it comes, so its failure is not logged as
        # never retrieved.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
