"""Attribution of the work an activity hands to other threads and processes.

The kernel attributes each call to the token in the slot of the thread making it. Work an
activity hands elsewhere runs on threads whose slots say nothing about it, so the hook
carries the activity's token with the work and publishes it where the work runs, for as
long as that work runs, and no longer:

- **Executor submissions** (``ThreadPoolExecutor.submit``, so also ``asyncio.to_thread``
  and ``loop.run_in_executor`` on the default executor or any thread pool, wherever it
  was created): the callable is wrapped (``InThread``); the pool thread that runs it
  registers with the agent once, publishes the token for that call and puts its slot
  back after. Pool threads are shared and reused, so a pool thread itself never carries
  an activity.
- **Threads the activity starts** (``threading.Thread(...).start()`` while the activity
  runs, non-daemon threads only): the thread's ``run`` is wrapped the same way, so the
  thread works for the activity until ``run`` returns (after the activity's end, the
  agent reports its spans as ``after_activity_end``). Daemon threads are the mark of
  background services (a client library's sender or flusher started on first use) that
  serve every activity: they stay unattributed; hand them work through :func:`carry`.
- **Process pools** (``ProcessPoolExecutor.submit``, hence ``map``; and
  ``multiprocessing.Pool``'s ``apply_async``, ``map``/``starmap`` (and their ``_async``
  forms), ``imap``, ``imap_unordered``): the callable is wrapped in a picklable
  ``InProcess`` holding the token and the agent's socket. The pool process registers
  with the agent as a *helper* of the worker (the agent checks that the worker is its
  ancestor) and publishes the token while the task runs; idle, it publishes nothing.

Machinery the standard library starts on first use and shares between activities — a
thread pool's threads, a process pool's processes and manager thread, the fork server,
the resource tracker — is started *unmarked* (``unmarked``): the starting thread's slot
is cleared meanwhile, so a process forked or spawned then does not inherit the activity
in the kernel for its whole life (as ``subprocess`` children rightly do), and a thread
started then is not taken for the activity's own.

Everything here is installed once per process, by the first ``OpenBoxHook`` (``install``),
and costs a context-variable read per call outside activities.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import concurrent.futures.thread
import functools
import logging
import multiprocessing.forkserver
import multiprocessing.pool
import multiprocessing.resource_tracker
import threading
from collections.abc import Callable
from typing import Any

from . import _driver, _slots

_log = logging.getLogger("openbox.hook")
_local = threading.local()
_installed = False
_install_lock = threading.Lock()


def _mark() -> _driver.Mark | None:
    """The activity the calling code works for, if any (with a link to register on)."""
    mark = _driver.current.get()
    if mark is None or not mark.token or mark.link is None:
        return None
    return mark


def carry(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` wrapped to run for the activity running now, on whatever thread calls it.

    For work handed to threads the hook does not know about (a daemon thread, a
    third-party pool): the thread that calls the result publishes the activity while the
    call runs. Outside an activity, ``fn`` itself is returned.
    """
    mark = _mark()
    return fn if mark is None else InThread(fn, mark.token, mark)


class InThread:
    """A callable that runs ``fn`` with ``token`` in the calling thread's slot.

    The calling thread registers with the agent first if it has not (a blocking round
    trip, once per thread and agent connection). Its slot is put back as it was after
    the call, whatever happens, so a reused pool thread carries nothing between calls.
    """

    __slots__ = ("fn", "token", "mark", "__weakref__")

    def __init__(self, fn: Callable[..., Any], token: int, mark: _driver.Mark) -> None:
        self.fn = fn
        self.token = token
        self.mark = mark
        """The submitter's mark: work this call hands on goes to the same activity."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        link = self.mark.link
        slot = link.current_slot()
        if slot is None:
            try:
                slot = link.register_thread()
            except Exception:
                _log.debug("openbox hook: registering a pool thread failed", exc_info=True)
                slot = None
            if slot is None:
                return self.fn(*args, **kwargs)
        table = _slots.table
        previous = table[slot]
        table[slot] = self.token
        scope = _driver.current.set(self.mark)
        try:
            return self.fn(*args, **kwargs)
        finally:
            _driver.current.reset(scope)
            table[slot] = previous

    def __repr__(self) -> str:
        return f"<openbox InThread token={self.token} of {self.fn!r}>"


class InProcess:
    """``fn`` handed to a process pool: it runs for activity ``token`` in the pool process.

    Pickled with the task (so ``fn`` must be picklable, as the pool requires anyway). In
    the pool process, the first call registers the process as a helper of the worker and
    its thread with the agent at ``socket_path``; every call publishes ``token`` while
    ``fn`` runs and clears the slot after (an idle pool process works for nobody).
    """

    __slots__ = ("fn", "token", "socket_path", "timeout")

    def __init__(self, fn: Callable[..., Any], token: int, socket_path: str, timeout: float):
        self.fn = fn
        self.token = token
        self.socket_path = socket_path
        self.timeout = timeout

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.fn, self.token, self.socket_path, self.timeout)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.fn, self.token, self.socket_path, self.timeout = state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            link = _helper_link(self.socket_path, self.timeout)
            if link._blocking.broken():
                # The agent restarted: it knows neither this process nor its thread.
                link._blocking.close()
                link.lost()
            slot = link.register_thread()
        except Exception:
            _log.debug("openbox hook: registering a pool process failed", exc_info=True)
            slot = None
        if slot is None:
            return self.fn(*args, **kwargs)
        table = _slots.table
        table[slot] = self.token
        scope = _driver.current.set(_driver.Mark(self.token, link.current_slot, link))
        try:
            return self.fn(*args, **kwargs)
        finally:
            _driver.current.reset(scope)
            # Not what was there before: a forked pool process starts with a copy of
            # its parent's table, and nothing else on this thread works for anyone.
            table[slot] = 0

    def __repr__(self) -> str:
        return f"<openbox InProcess token={self.token} of {self.fn!r}>"


_helpers: dict[str, Any] = {}
_helpers_lock = threading.Lock()


def _helper_link(socket_path: str, timeout: float) -> Any:
    """This process's helper connection to the agent at ``socket_path``."""
    link = _helpers.get(socket_path)
    if link is not None:
        return link
    from ._agent import AgentLink  # here: _agent imports temporalio, not needed before

    with _helpers_lock:
        link = _helpers.get(socket_path)
        if link is None:
            link = _helpers[socket_path] = AgentLink(socket_path, timeout, {}, helper=True)
            install()  # work this process hands on is carried too
    return link


def unmarked(call: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)`` as shared machinery: the calling thread's slot reads 0
    meanwhile (what the kernel copies into a process forked now) and threads started
    meanwhile are not the activity's."""
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    slot = _slots.allocated()
    table = _slots.table
    previous = 0
    if slot is not None and (previous := table[slot]):
        table[slot] = 0
    try:
        return call(*args, **kwargs)
    finally:
        if slot is not None and previous:
            table[slot] = previous
        _local.depth = depth


def _unmarked_method(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def shared(*args: Any, **kwargs: Any) -> Any:
        return unmarked(method, *args, **kwargs)

    shared.__openbox_original__ = method  # type: ignore[attr-defined]
    return shared


# ---- the patches ----------------------------------------------------------------

_thread_pool_submit = concurrent.futures.ThreadPoolExecutor.submit
_process_pool_submit = concurrent.futures.ProcessPoolExecutor.submit
_thread_start = threading.Thread.start


def _submit_to_thread_pool(self: Any, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    mark = _mark()
    if mark is None:
        return _thread_pool_submit(self, fn, *args, **kwargs)
    return unmarked(_thread_pool_submit, self, InThread(fn, mark.token, mark), *args, **kwargs)


def _in_process(fn: Callable[..., Any]) -> Callable[..., Any]:
    mark = _mark()
    if mark is None:
        return fn
    link = mark.link
    return InProcess(fn, mark.token, link.socket_path, link.timeout)


def _submit_to_process_pool(self: Any, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    return unmarked(_process_pool_submit, self, _in_process(fn), *args, **kwargs)


def _start_thread(self: threading.Thread) -> None:
    mark = _mark()
    if mark is not None and not self.daemon and not getattr(_local, "depth", 0):
        # An instance attribute: Thread._bootstrap_inner calls self.run(), whatever
        # class the thread is.
        self.run = InThread(self.run, mark.token, mark)  # type: ignore[method-assign]
    _thread_start(self)


def _wrap_pool_method(method: Callable[..., Any]) -> Callable[..., Any]:
    """A ``multiprocessing.Pool`` method whose first argument after self is the function."""

    @functools.wraps(method)
    def carried(self: Any, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return unmarked(method, self, _in_process(func), *args, **kwargs)

    carried.__openbox_original__ = method  # type: ignore[attr-defined]
    return carried


def install() -> None:
    """Installs the patches (once per process)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _installed = True
    concurrent.futures.ThreadPoolExecutor.submit = _submit_to_thread_pool  # type: ignore[method-assign]
    concurrent.futures.ProcessPoolExecutor.submit = _submit_to_process_pool  # type: ignore[method-assign]
    # The constructor makes the pool's queues, whose semaphores may start the resource
    # tracker; with "fork" the processes start at the first submit.
    pp = concurrent.futures.ProcessPoolExecutor
    pp.__init__ = _unmarked_method(pp.__init__)  # type: ignore[method-assign]
    threading.Thread.start = _start_thread  # type: ignore[method-assign]
    pool = multiprocessing.pool.Pool
    for name in ("apply_async", "_map_async", "imap", "imap_unordered"):
        setattr(pool, name, _wrap_pool_method(getattr(pool, name)))
    # Its processes and handler threads start in the constructor; replacements (after
    # maxtasksperchild) from a handler thread, which never works for an activity.
    pool.__init__ = _unmarked_method(pool.__init__)  # type: ignore[method-assign]
    for cls in (
        multiprocessing.forkserver.ForkServer,
        multiprocessing.resource_tracker.ResourceTracker,
    ):
        cls.ensure_running = _unmarked_method(cls.ensure_running)  # type: ignore[method-assign]
