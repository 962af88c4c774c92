"""The activity interceptor: tells the agent what runs, and marks where it runs.

For each activity: ``activity_start`` (identity, input) gets a token from the agent; the
activity function is wrapped so its thread's slot holds that token while (and only while)
its code runs; ``activity_end`` (status, input as run, output or error) follows once the
function has finished, before Temporal sees the result.

Both replies may carry the agent's governance decision (``_decision``): the start reply
can refuse the activity (it does not run; Temporal gets the decision's
``ApplicationError``) or redact its arguments; the end reply can fail it after the fact
or redact its result.

The hook never changes an activity's outcome on its own account: when any of this
machinery fails, or without an agent under fail_open, the activity runs with its original
function and its result or exception passes through untouched. Only an explicit decision
changes it, or, under fail_closed, an agent that cannot be reached: nothing can govern the
activity then, so it fails with ``GovernanceHalt`` (not run when ``activity_start`` got no
answer, its outcome withheld when ``activity_end`` got none).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import importlib
import inspect
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import temporalio.activity
import temporalio.exceptions
import temporalio.service
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput

from . import _decision, _driver, _events, _multi_agent, _propagate, _slots
from ._agent import AgentLink
from .serialize import serialize_args, serialize_value

_log = logging.getLogger("openbox.hook")
_internal_error_logged = False


WORKFLOW_EVENTS_WAIT = 2.0
"""Seconds an activity waits, at most, for workflow events posted before it to be written."""


def _internal_error() -> None:
    """A bug in the hook: reported once with its traceback, never raised into activities."""
    global _internal_error_logged
    if _internal_error_logged:
        _log.debug("openbox hook internal error", exc_info=True)
        return
    _internal_error_logged = True
    _log.warning(
        "openbox hook internal error; the activity runs as if the hook were not there "
        "(further ones are logged at debug level)",
        exc_info=True,
    )


class ActivityInbound(ActivityInboundInterceptor):
    def __init__(
        self,
        next: ActivityInboundInterceptor,
        link: AgentLink,
        sdk2: bool = False,
        client: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(next)
        self._link = link
        self._sdk2 = sdk2
        # The worker's Temporal client when the hook was given it (OpenBoxPlugin,
        # create_openbox_worker); else the activity's own (temporalio.activity.client()).
        self._client = client or (lambda: None)

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        started = await self._start(input)
        if started is None:
            return await self.next.execute_activity(input)
        reply, input_json = started
        token = reply["token"]
        seen = _Seen()
        try:
            run_input = self._on_start_reply(reply, input, seen)
        except temporalio.exceptions.ApplicationError as refusal:
            # The agent's decision: the activity does not run. It still gets its
            # activity_end, so the agent can free what it holds for it.
            await self._end(token, "failed", None, refusal, input_json)
            await self._terminate_if_halted(seen, refusal)
            raise
        except Exception:
            _internal_error()
            run_input = input
        if run_input is not input:
            input_json = serialize_args(run_input.args)  # what ActivityCompleted reports
        try:
            result = await self.next.execute_activity(await self._attributed(run_input, token))
        except (Exception, asyncio.CancelledError) as exc:
            # Not GeneratorExit, KeyboardInterrupt or SystemExit: nothing can be awaited
            # while those unwind, so such an activity gets no activity_end.
            end = await self._end(token, "failed", None, exc, input_json)
            # Not named `refusal`: that name is the except target above, unbound after it.
            verdict = None if _is_cancellation(exc) else self._on_failed_end_reply(end, seen)
            if verdict is not None:
                await self._terminate_if_halted(seen, verdict)
                raise verdict from exc
            raise
        end = await self._end(token, "completed", result, None, input_json)
        try:
            return self._on_end_reply(end, result, seen)
        except temporalio.exceptions.ApplicationError as verdict:
            await self._terminate_if_halted(seen, verdict)
            raise
        except Exception:
            _internal_error()
            return result

    def _on_start_reply(
        self, reply: dict[str, Any], input: ExecuteActivityInput, seen: _Seen | None = None
    ) -> ExecuteActivityInput:
        """Where the agent's answer to ``activity_start`` acts on the activity.

        Returns the input to run: ``input`` itself, or a copy whose ``args`` carry the
        input redaction (dataclass arguments merged in place, others replaced). Raises
        the ``ApplicationError`` of a ``fail`` or ``approval_pending`` decision (any other
        exception is the hook's own failure: the caller logs it and runs the input as it
        came).
        """
        decision = _decision.read(reply, "start", self._sdk2)
        (seen or _Seen()).note(decision)
        if decision.error is not None:
            raise decision.error
        if not decision.input_args:
            return input
        return dataclasses.replace(
            input, args=_decision.redact_args(input.args, decision.input_args)
        )

    def _on_end_reply(self, reply: dict[str, Any] | None, result: Any, seen: _Seen) -> Any:
        """Where the agent's answer to ``activity_end`` acts on a completed activity.

        Returns the result to hand to Temporal (after any output redaction), or raises
        the decision's ``ApplicationError``, which replaces the result (the activity's
        work has happened).
        """
        decision = _decision.read(reply, "end", self._sdk2)
        seen.note(decision)
        if decision.error is not None:
            raise decision.error
        if not decision.redacts_output:
            return result
        return _decision.redact_output(result, decision.output)

    def _on_failed_end_reply(
        self, reply: dict[str, Any] | None, seen: _Seen
    ) -> temporalio.exceptions.ApplicationError | None:
        """The error replacing a failed activity's own exception, if the agent decided one.

        The agent governs ActivityCompleted of failed activities too (as SDK 1.0 did from
        its ``finally``); a ``fail`` or ``approval_pending`` decision on it is raised with
        the activity's exception as its cause. There is no result to redact.
        """
        try:
            decision = _decision.read(reply, "end", self._sdk2)
            seen.note(decision)
            return decision.error
        except Exception:
            _internal_error()
            return None

    async def _start(self, input: ExecuteActivityInput) -> tuple[dict[str, Any], list[Any]] | None:
        """The agent's reply to ``activity_start`` and the serialised arguments it was
        sent, when the agent accepted the activity; else None. Raises ``GovernanceHalt``
        instead of None when the agent is unreachable under fail_closed."""
        try:
            info = temporalio.activity.info()
            input_json = serialize_args(input.args)
            # The run's WorkflowStarted (posted by workflow code, sent by another thread)
            # goes out before this activity's ActivityStarted.
            await _events.written(WORKFLOW_EVENTS_WAIT)
            session = _multi_agent.from_header(input.headers) if self._sdk2 else None
            reply = await self._link.call_governed(
                "activity_start",
                workflow_id=info.workflow_id,
                run_id=info.workflow_run_id,
                workflow_type=info.workflow_type,
                activity_id=info.activity_id,
                activity_type=info.activity_type,
                task_queue=info.task_queue,
                attempt=info.attempt,
                start_time=time.time(),
                input=input_json,
                **_trace_context(),
                **({"multi_agent_session_id": session} if session else {}),
            )
        except Exception:
            _internal_error()
            return None
        if reply is None:
            if self._link.fail_closed:
                error = self._link.unreachable_error("the activity does not run")
                if self._sdk2:
                    # SDK 2.0's fail_closed is a HALT: the workflow is terminated too.
                    error = _decision.halt_error(error.message)
                    await self._terminate(error.message)
                raise error
            return None
        token = reply.get("token")
        if not reply.get("ok") or type(token) is not int or not 0 < token < 1 << 64:
            _log.debug("openbox-agent did not take the activity: %s", reply)
            return None
        return reply, input_json

    async def _end(
        self,
        token: int,
        status: str,
        result: Any,
        exc: BaseException | None,
        input_json: list[Any],
    ) -> dict[str, Any] | None:
        """The agent's reply to ``activity_end`` (None without one)."""
        try:
            reply = await self._link.call_governed(
                "activity_end",
                token=token,
                status=status,
                end_time=time.time(),
                input=input_json,
                output=None if exc is not None else serialize_value(result),
                error=None
                if exc is None
                else {"type": type(exc).__name__, "message": _message(exc)},
            )
        except Exception:
            _internal_error()
            return None
        if reply is None and self._link.fail_closed:
            # Read like the agent's own decision, so every path applies it the same way.
            error = self._link.unreachable_error("the activity's outcome is withheld")
            return {
                "ok": True,
                "decision": {
                    "action": "fail",
                    "error_type": error.type,
                    "message": error.message,
                    "non_retryable": True,
                    "reason": error.message,
                },
            }
        if reply is not None and not reply.get("ok"):
            _log.debug("openbox-agent refused activity_end: %s", reply.get("error"))
            return None
        return reply

    async def _terminate_if_halted(
        self, seen: _Seen, error: temporalio.exceptions.ApplicationError
    ) -> None:
        if seen.halt:
            await self._terminate(error.message)

    async def _terminate(self, reason: str) -> None:
        """Terminate the activity's workflow (SDK 2.0 HALT), by workflow id as the SDK
        does. A failure is logged: the activity fails with GovernanceHalt all the same.
        A workflow that has already ended (another of its activities halted it first) is
        no failure."""
        info = temporalio.activity.info()
        try:
            if info.workflow_id is None:
                raise RuntimeError("the activity belongs to no workflow")
            client = self._client()
            if client is None:
                try:
                    client = temporalio.activity.client()
                except RuntimeError:
                    raise RuntimeError(
                        "the hook has no Temporal client and a sync (`def`) activity has "
                        "none of its own: give the hook the worker's client "
                        "(OpenBoxHook(client=...) or hook.set_client(client); OpenBoxPlugin "
                        "and create_openbox_worker do it)"
                    ) from None
            await client.get_workflow_handle(info.workflow_id).terminate(reason)
            _log.info("openbox governance: workflow %s terminated: %s", info.workflow_id, reason)
        except temporalio.service.RPCError as exc:
            if exc.status == temporalio.service.RPCStatusCode.NOT_FOUND:
                _log.debug(
                    "openbox governance: workflow %s already ended: %s", info.workflow_id, exc
                )
            else:
                self._terminate_failed(info.workflow_id, exc)
        except Exception as exc:
            self._terminate_failed(info.workflow_id, exc)

    @staticmethod
    def _terminate_failed(workflow_id: str | None, exc: Exception) -> None:
        _log.warning(
            "openbox governance: could not terminate workflow %s on HALT (%s: %s); "
            "the activity fails with GovernanceHalt, the workflow decides what follows",
            workflow_id,
            type(exc).__name__,
            exc,
        )

    async def _attributed(self, input: ExecuteActivityInput, token: int) -> ExecuteActivityInput:
        """``input`` with its function wrapped to publish ``token``, or as it came."""
        try:
            fn = input.fn
            # The test temporalio itself applies to choose the event loop or the executor.
            if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
                fn.__call__  # type: ignore[operator]
            ):
                slot = await self._link.register_loop_thread()
                if slot is None:
                    return input
                # Each step publishes the activity in the loop thread's slot, so a call the
                # filter holds is the running step's: exact (`_enforce`).
                self._link.enforce_thread(slot)
                _driver.install_task_factory(asyncio.get_running_loop())
                mark = _driver.Mark(token, self._link.current_slot, self._link)
                return dataclasses.replace(input, fn=_async_wrapper(fn, mark, slot))
            if isinstance(input.executor, concurrent.futures.ThreadPoolExecutor):
                return dataclasses.replace(input, fn=_sync_wrapper(fn, token, self._link))
            if isinstance(input.executor, concurrent.futures.ProcessPoolExecutor):
                # Pickled with the task: the pool process registers as a helper of this
                # worker and publishes the token while the activity runs there.
                link = self._link
                carried = _propagate.InProcess(fn, token, link.socket_path, link.timeout)
                return dataclasses.replace(input, fn=carried)
            # Other executors may run the function anywhere, or pickle it: it stays the
            # original, unattributed.
            return input
        except Exception:
            _internal_error()
            return input


def _async_wrapper(fn: Callable[..., Any], mark: _driver.Mark, slot: int) -> Callable[..., Any]:
    # An `async def`, so temporalio still sees a coroutine function and awaits it on the
    # loop rather than sending it to the executor.
    @functools.wraps(fn)
    async def attributed(*args: Any) -> Any:
        coro = fn(*args)
        if not isinstance(coro, Coroutine):
            return await coro  # an awaitable that cannot be stepped through: unattributed
        scope = _driver.current.set(mark)
        try:
            return await _driver.StepDriver(coro, mark, slot)
        finally:
            mark.token = 0
            _driver.current.reset(scope)

    return attributed


def _sync_wrapper(fn: Callable[..., Any], token: int, link: AgentLink) -> Callable[..., Any]:
    # A plain function, so temporalio still runs it on the activity executor. Its body
    # runs on the executor thread: the only place that thread's slot can be written.
    @functools.wraps(fn)
    def attributed(*args: Any) -> Any:
        try:
            slot = link.register_thread()
        except temporalio.exceptions.CancelledError:
            raise  # Temporal cancelling the activity in this thread, not a hook failure
        except Exception:
            _internal_error()
            slot = None
        if slot is None:
            return fn(*args)
        try:
            link.enforce_thread(slot)
        except Exception:
            _internal_error()
        table = _slots.table
        previous = table[slot]
        table[slot] = token
        # What it hands to thread and process pools, and the threads it starts, work
        # for it too (`_propagate`).
        mark = _driver.Mark(token, link.current_slot, link)
        scope = _driver.current.set(mark)
        try:
            return fn(*args)
        finally:
            mark.token = 0
            _driver.current.reset(scope)
            table[slot] = previous

    return attributed


class _Seen:
    """What was already seen of one activity: CONSTRAIN is logged once per activity, and
    whether the last decision is a HALT that terminates the workflow."""

    __slots__ = ("constrained", "halt")

    def __init__(self) -> None:
        self.constrained = False
        self.halt = False
        """The decision last read is an SDK 2.0 HALT: the workflow is terminated."""

    def note(self, decision: _decision.Decision) -> None:
        self.halt = decision.halt
        if decision.constrained and not self.constrained:
            self.constrained = True
            try:
                info = temporalio.activity.info()
                _log.info(
                    "openbox governance: activity %s (id %s, workflow %s) runs constrained",
                    info.activity_type,
                    info.activity_id,
                    info.workflow_id,
                )
            except Exception:
                _log.info("openbox governance: activity runs constrained")


def _trace_context() -> dict[str, str]:
    """The W3C ``traceparent`` (and ``tracestate``) of the span current now, when the
    worker traces with OpenTelemetry (e.g. Temporal's ``TracingInterceptor``, placed
    before this hook in ``interceptors``): the agent puts its activity and I/O spans
    under it. Empty when the worker does not trace: OpenTelemetry is never imported
    here, only used when the worker already did."""
    if "opentelemetry.trace" not in sys.modules:
        return {}
    try:
        tracecontext = importlib.import_module("opentelemetry.trace.propagation.tracecontext")
        carrier: dict[str, str] = {}
        tracecontext.TraceContextTextMapPropagator().inject(carrier)
        return {k: carrier[k] for k in ("traceparent", "tracestate") if carrier.get(k)}
    except Exception:
        return {}


def _is_cancellation(exc: BaseException) -> bool:
    return isinstance(exc, (asyncio.CancelledError, temporalio.exceptions.CancelledError))


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__}: str() failed>"
