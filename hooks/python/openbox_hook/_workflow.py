"""The workflow interceptor: reports workflow events to the agent, fire-and-forget.

``WorkflowStarted``, ``WorkflowCompleted``, ``WorkflowFailed`` and ``SignalReceived`` go to
the agent as ``{"op": "workflow_event", "event_type": ..., ...}`` (the fields of
openbox-core-protocol.md §2.2 without ``source`` and ``timestamp``, which the agent adds
when it sends them; WorkflowStarted's ``activity_input``, the workflow's arguments, goes
to Core under SDK 2.0 conventions only). The skip lists and ``send_start_event`` are the
agent's to apply.

Why determinism is untouched: the interceptor issues no command, awaits nothing, reads
no clock, and changes no value the workflow sees. It hands a message to a background
thread (``_events``) and returns; the workflow's own code runs exactly as without it.
The SDK sent these events through an activity (so they became commands in the history);
the hook needs no such activity: the agent outside the process sends them.

Nothing is sent while the workflow replays (``workflow.unsafe.is_replaying()``), so a
worker that replays a history (after a cache eviction, a restart, or in a
``Replayer``) sends nothing twice. ``WorkflowFailed`` is sent only for an exception that
fails the workflow; any other exception fails the workflow *task*, which Temporal retries
(replaying up to it), so it is not a workflow outcome.

Under SDK 2.0 conventions (``sdk2``) the interceptor also does what SDK 2.0's does at the
workflow boundary: the memo's multi-agent session goes on the workflow's events and, as
a header, on every activity it schedules (``_multi_agent``); and a ``GovernancePatch``
failure from an activity (BLOCK with patch) continues the workflow as new with the new
input, within ``max_patch_restarts`` (``_patch``). Both read only the history (memo,
activity failures), so replay takes the same path; continue-as-new is a command the
workflow's own code would otherwise not issue, which is the patch's point.

All of it runs on the workflow thread inside the sandbox. This module is imported
outside the sandbox (with the hook), so its globals are the real modules; the sandbox's
restrictions are lifted while a message is built, as user objects' serialisation
(``__str__``, pydantic's ``model_dump``) may touch what the sandbox guards.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import temporalio.exceptions
import temporalio.workflow
from temporalio.worker import (
    ExecuteWorkflowInput,
    HandleSignalInput,
    StartActivityInput,
    StartLocalActivityInput,
    WorkflowInboundInterceptor,
    WorkflowOutboundInterceptor,
)

from . import _events, _multi_agent, _patch
from ._agent import AgentLink
from .serialize import serialize_args, serialize_value

_log = logging.getLogger("openbox.hook")

MESSAGE_LIMIT = 500
"""Characters kept of ``cause``/``root_cause`` messages (SDK 2.0)."""
TYPE_LIMIT = 200
"""``error_type`` is reported only when shorter than this (SDK 2.0)."""


def interceptor_class(
    link: AgentLink,
    sdk2: bool = False,
    max_patch_restarts: int = _patch.DEFAULT_MAX_RESTARTS,
    workflow_input: bool = True,
) -> type[WorkflowInboundInterceptor]:
    """The workflow inbound interceptor class reporting to ``link``'s agent; ``sdk2``
    adds SDK 2.0's multi-agent session and BLOCK-with-patch restarts. ``workflow_input``:
    WorkflowStarted carries the workflow's arguments (``activity_input``), which Core gets
    under SDK 2.0 conventions; off when the worker chose 1.0, whose requests never carry
    them (the agent's default conventions decide for a worker that chose none)."""

    class OpenBoxWorkflowOutbound(WorkflowOutboundInterceptor):
        """Stamps the run's multi-agent session on every activity it schedules."""

        def start_activity(self, input: StartActivityInput) -> Any:
            session = _multi_agent.from_memo()
            if session:
                input.headers = _multi_agent.with_header(input.headers, session)
            return super().start_activity(input)

        def start_local_activity(self, input: StartLocalActivityInput) -> Any:
            session = _multi_agent.from_memo()
            if session:
                input.headers = _multi_agent.with_header(input.headers, session)
            return super().start_local_activity(input)

    class OpenBoxWorkflowInbound(WorkflowInboundInterceptor):
        def init(self, outbound: WorkflowOutboundInterceptor) -> None:
            super().init(OpenBoxWorkflowOutbound(outbound) if sdk2 else outbound)

        async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
            session = _session() if sdk2 else None
            run_id = temporalio.workflow.info().run_id
            if sdk2:
                _multi_agent.bind(run_id, link)
            try:
                return await self._execute(input, session)
            finally:
                if sdk2:
                    _multi_agent.unbind(run_id)

        async def _execute(self, input: ExecuteWorkflowInput, session: str | None) -> Any:
            _report(
                link,
                "WorkflowStarted",
                True,
                functools.partial(_started, input.args if workflow_input else None),
                session,
            )
            try:
                result = await super().execute_workflow(input)
            except temporalio.workflow.ContinueAsNewError:
                # Not a Core event (the SDK sends none either): the agent ends this
                # run's trace span here, and the next run's span links to it.
                _report(link, "WorkflowContinuedAsNew", False, dict)
                raise
            except Exception as exc:
                failure: BaseException = exc
                if sdk2:
                    try:
                        _restart_if_patched(exc, input, max_patch_restarts)
                    except temporalio.workflow.ContinueAsNewError:
                        _report(link, "WorkflowContinuedAsNew", False, dict)
                        raise
                    except temporalio.exceptions.ApplicationError as limit:
                        failure = limit
                if _fails_workflow(failure):
                    _report(
                        link, "WorkflowFailed", False, functools.partial(_failed, failure), session
                    )
                if failure is exc:
                    raise
                raise failure from exc
            _report(
                link,
                "WorkflowCompleted",
                False,
                lambda: {"workflow_output": serialize_value(result)},
                session,
            )
            return result

        async def handle_signal(self, input: HandleSignalInput) -> None:
            _report(
                link,
                "SignalReceived",
                True,
                lambda: {"signal_name": input.signal, "signal_args": serialize_args(input.args)},
                _session() if sdk2 else None,
            )
            await super().handle_signal(input)

    return OpenBoxWorkflowInbound


def _session() -> str | None:
    try:
        return _multi_agent.from_memo()
    except Exception:
        _internal_error("the multi-agent session")
        return None


def _restart_if_patched(exc: BaseException, input: ExecuteWorkflowInput, max_restarts: int) -> None:
    """Continue as new when ``exc`` carries a patch request (raises Temporal's
    ``ContinueAsNewError``, or ``GovernancePatchLimitExceeded``); returns otherwise."""
    request = _patch.requested(exc)
    if request is None:
        return
    _patch.continue_as_new(request, input.args, max_restarts)


def _report(
    link: AgentLink,
    event_type: str,
    with_task_queue: bool,
    build: Callable[[], dict[str, Any]],
    session: str | None = None,
) -> None:
    """Post one event unless replaying (``build`` gives its own fields, and is called only
    when the event is sent). Never raises into the workflow, never blocks it."""
    try:
        unsafe = temporalio.workflow.unsafe
        if unsafe.is_replaying():
            return
        with unsafe.sandbox_unrestricted(), unsafe.imports_passed_through():
            info = temporalio.workflow.info()
            fields: dict[str, Any] = {
                "event_type": event_type,
                "workflow_id": info.workflow_id,
                "run_id": info.run_id,
                "workflow_type": info.workflow_type,
            }
            if with_task_queue:
                fields["task_queue"] = info.task_queue
            if session:
                fields["multi_agent_session_id"] = session
            fields.update(build())
            _events.post(link, "workflow_event", fields)
    except Exception:
        _internal_error(event_type)


def _started(args: Sequence[Any] | None) -> dict[str, Any]:
    """WorkflowStarted's own fields: the run this one continues (continue-as-new, retry,
    cron), so the agent links the traces of the two runs; and the workflow's arguments
    when ``args`` is given (``[]`` for none, as SDK 2.0 sends them)."""
    fields: dict[str, Any] = {}
    prev = temporalio.workflow.info().continued_run_id
    if prev:
        fields["continued_run_id"] = prev
    if args is not None:
        fields["activity_input"] = serialize_args(args)
    return fields


_internal_error_logged = False


def _internal_error(event_type: str) -> None:
    """A bug in the hook: logged once with its traceback; the workflow goes on."""
    global _internal_error_logged
    try:
        with temporalio.workflow.unsafe.sandbox_unrestricted():
            first = not _internal_error_logged
            _internal_error_logged = True
            _log.log(
                logging.WARNING if first else logging.DEBUG,
                "openbox hook internal error: %s not reported to openbox-agent%s",
                event_type,
                " (further ones are logged at debug level)" if first else "",
                exc_info=True,
            )
    except Exception:
        pass


def _failed(exc: BaseException) -> dict[str, Any]:
    return {"error": _error_object(exc)}


def _fails_workflow(exc: BaseException) -> bool:
    """Whether ``exc`` leaving the workflow fails it (rather than its task)."""
    try:
        runtime = temporalio.workflow._Runtime.current()
        is_failure = getattr(runtime, "workflow_is_failure_exception", None)
        if is_failure is not None:
            return bool(is_failure(exc))
    except Exception:
        pass
    # Temporal's rule without the configured failure_exception_types.
    return isinstance(exc, (temporalio.exceptions.FailureError, asyncio.TimeoutError))


def _error_object(exc: BaseException) -> dict[str, Any]:
    """The WorkflowFailed ``error`` (§2.3): ``{type, message, cause?, root_cause?}``.

    ``cause`` is the exception's Temporal cause, else its ``__cause__``, else its
    ``__context__``; ``root_cause`` is the cause's own Temporal cause or ``__cause__``.
    ``error_type`` is included when the exception has a string ``type`` (shorter than
    200 characters), ``non_retryable`` when the cause has that attribute (not on the root
    cause, as in the SDK); cause messages are cut to 500 characters.
    """
    error: dict[str, Any] = {"type": type(exc).__name__, "message": _text(exc)}
    cause = _cause_of(exc, with_context=True)
    if cause is None:
        return error
    error["cause"] = _link(cause, with_non_retryable=True)
    root = _cause_of(cause, with_context=False)
    if root is not None:
        error["root_cause"] = _link(root, with_non_retryable=False)
    return error


def _cause_of(exc: BaseException, *, with_context: bool) -> BaseException | None:
    candidates = [getattr(exc, "cause", None), exc.__cause__]
    if with_context:
        candidates.append(exc.__context__)
    for candidate in candidates:
        if isinstance(candidate, BaseException):
            return candidate
    return None


def _link(exc: BaseException, *, with_non_retryable: bool) -> dict[str, Any]:
    link: dict[str, Any] = {"type": type(exc).__name__, "message": _text(exc)[:MESSAGE_LIMIT]}
    error_type = getattr(exc, "type", None)
    if isinstance(error_type, str) and error_type and len(error_type) < TYPE_LIMIT:
        link["error_type"] = error_type
    if with_non_retryable and hasattr(exc, "non_retryable"):
        link["non_retryable"] = serialize_value(exc.non_retryable)
    return link


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__}: str() failed>"
