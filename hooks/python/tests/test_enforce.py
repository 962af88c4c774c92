"""The enforcement filter (``_enforce``) on a real kernel: the filter holds a thread's
writes, and without an agent the hook answers them itself by the failure policy —
never an endless wait, never ENOSYS."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from openbox_hook import _enforce

pytestmark = pytest.mark.skipif(not _enforce.available(), reason="x86_64 Linux only")


class _NoAgent:
    """What Enforcement reads of its AgentLink, with a socket nobody listens on."""

    def __init__(self, tmp: Path, fail_closed: bool) -> None:
        self.socket_path = str(tmp / "no-agent.sock")
        self.timeout = 0.2
        self.governed_timeout = 5.0
        self.fail_closed = fail_closed

    def hello(self) -> dict[str, Any]:
        return {"pid": os.getpid()}


def _write(path: Path) -> None:
    with open(path, "w") as f:
        f.write("x")


def _write_in_filtered_thread(link: _NoAgent, path: Path) -> dict[str, Any]:
    return _in_filtered_thread(link, lambda: _write(path))


def _in_filtered_thread(link: _NoAgent, action: Any) -> dict[str, Any]:
    enforcement = _enforce.Enforcement(link)  # type: ignore[arg-type]
    enforcement.start()
    out: dict[str, Any] = {}

    def body() -> None:
        listener = _enforce.install()
        enforcement.hand_over(threading.get_native_id(), 0, listener, 5.0)
        try:
            out["result"] = action()
            out["done"] = True
        except OSError as exc:
            out["errno"] = exc.errno

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "a held call was never answered"
    return out


def test_without_an_agent_fail_open_lets_held_calls_through(tmp_path: Path) -> None:
    path = tmp_path / "open.txt"
    out = _write_in_filtered_thread(_NoAgent(tmp_path, False), path)
    assert out == {"result": None, "done": True}
    assert path.read_text() == "x"


def test_without_an_agent_fail_closed_denies_held_calls(tmp_path: Path) -> None:
    path = tmp_path / "closed.txt"
    out = _write_in_filtered_thread(_NoAgent(tmp_path, True), path)
    assert out == {"errno": errno.EPERM}
    assert not path.exists()


def test_without_an_agent_fail_closed_still_lets_reads_open(tmp_path: Path) -> None:
    # Opens for reading are held (a halted activity must not open anything), but only
    # the agent knows a HALT: answering alone, the hook lets them through.
    path = tmp_path / "read.txt"
    path.write_text("readable")

    def read_both() -> tuple[str, str]:
        with open(path) as f:
            by_open = f.read()
        fd = os.open(path, os.O_RDONLY, dir_fd=os.open(tmp_path, os.O_RDONLY))
        with os.fdopen(fd) as f:
            return by_open, f.read()

    out = _in_filtered_thread(_NoAgent(tmp_path, True), read_both)
    assert out == {"result": ("readable", "readable"), "done": True}


def test_without_an_agent_a_call_held_with_the_gil_held_is_answered(tmp_path: Path) -> None:
    # Temporal's core writes its eventfd from the event-loop thread while holding the GIL:
    # no thread of this interpreter could answer that call, so a process of its own
    # does (a PyDLL call keeps the GIL, as such an extension does).
    path = tmp_path / "gil.txt"

    def write_holding_the_gil() -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            return int(ctypes.PyDLL(None).write(fd, b"gil", 3))
        finally:
            os.close(fd)

    out = _in_filtered_thread(_NoAgent(tmp_path, False), write_holding_the_gil)
    assert out == {"result": 3, "done": True}
    assert path.read_text() == "gil"


def test_the_filter_leaves_other_threads_alone(tmp_path: Path) -> None:
    # A filtered thread exists (from the tests above or this one); this thread is not
    # filtered: its writes are never held, whoever answers.
    path = tmp_path / "free.txt"
    _write_in_filtered_thread(_NoAgent(tmp_path, True), tmp_path / "held.txt")
    path.write_text("free")
    assert path.read_text() == "free"
