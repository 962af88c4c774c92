"""An in-process stand-in for openbox-agent's hook socket.

Serves the hook protocol on a Unix socket in a temporary directory, one thread per
connection, records every message, and answers: ``hello`` with a worker pid, ``thread``
with ok (or a refusal), ``activity_start`` with a fresh token, anything else (such as
``workflow_event``) with ok. Replies to ``activity_start``/``activity_end`` carry the
governance decision ``decide`` returns, if any: by default the one scripted in
``decisions[(op, activity_type)]``, where a list is consumed one item per call (one per
attempt). Subclasses change answers through ``respond`` and their timing through
``delay``.

Every message received and every reply sent is checked against the protocol schema
(``hook_protocol``); ``close`` fails the test that used the agent if one was off the
protocol. A test that answers off the protocol on purpose sets ``check_replies = False``.
With ``OPENBOX_HOOK_RECORD=<file>`` in the environment every request line received is
also appended to that file (how ``hooks/protocol/recorded-requests.jsonl`` is made).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from typing import Any

import hook_protocol

RECORD = os.environ.get("OPENBOX_HOOK_RECORD")

NO_DECISION = object()
"""``decide``'s answer for a reply without ``"decision"``."""


class FakeAgent:
    def __init__(self, socket_path: str | None = None, *, refuse_threads: bool = False) -> None:
        """Listens on ``socket_path``, default a new temporary directory's ``agent.sock``."""
        self.refuse_threads = refuse_threads
        self.check_replies = True
        self.violations: list[str] = []
        """Messages and replies that were off the protocol, with why."""
        self._dir = None if socket_path else tempfile.mkdtemp(prefix="openbox-fake-agent-")
        self.socket_path = socket_path or os.path.join(self._dir, "agent.sock")
        self.messages: list[dict[str, Any]] = []
        self.connections = 0
        self._changed = threading.Condition()
        self._next_token = 1
        self.decisions: dict[tuple[str, str], Any] = {}
        self.started: dict[int, dict[str, Any]] = {}
        """activity_start messages by the token they got."""
        self._clients: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.socket_path)
        self._listener.listen(64)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="fake-agent").start()

    # -- what tests look at -------------------------------------------------------

    def ops(self, op: str) -> list[dict[str, Any]]:
        with self._changed:
            return [m for m in self.messages if m.get("op") == op]

    def wait_for(self, op: str, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(found := [m for m in self.messages if m.get("op") == op]) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"fake agent: {len(found)} {op!r} messages, wanted {count}"
                    )
                self._changed.wait(remaining)
            return found

    def workflow_events(self, event_type: str | None = None) -> list[dict[str, Any]]:
        return [
            m
            for m in self.ops("workflow_event")
            if event_type is None or m.get("event_type") == event_type
        ]

    # -- behaviour subclasses change ---------------------------------------------

    def respond(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """The reply (without id) to ``message``; None sends nothing."""
        op = message.get("op")
        if op == "hello":
            return {"ok": True, "agent": "fake-agent", "worker": message.get("pid")}
        if op == "thread" and self.refuse_threads:
            return {"ok": False, "error": "thread refused"}
        if op == "thread":
            return {"ok": True, "host_tid": message.get("tid")}
        reply: dict[str, Any] = {"ok": True}
        if op == "activity_end":
            reply.update(span_count=0, spans_dropped=0)
        if op == "activity_start":
            with self._changed:
                token = self._next_token
                self._next_token += 1
                self.started[token] = message
            reply["token"] = token
        if op in ("activity_start", "activity_end"):
            decision = self.decide(message)
            if decision is not NO_DECISION:
                reply["decision"] = decision
        return reply

    def decide(self, message: dict[str, Any]) -> Any:
        """The decision for an activity_start/activity_end, or NO_DECISION for none."""
        op = message["op"]
        with self._changed:
            start = message if op == "activity_start" else self.started.get(message.get("token"))
            script = self.decisions.get((op, (start or {}).get("activity_type")), NO_DECISION)
            if isinstance(script, list):
                return script.pop(0) if script else NO_DECISION
            return script

    def delay(self, message: dict[str, Any]) -> float:
        """Seconds to hold the reply to ``message`` (other replies overtake it)."""
        return 0.0

    # -- serving -----------------------------------------------------------------

    def close(self) -> None:
        """Stops serving; fails when a message or reply was off the protocol."""
        self._closed = True
        self._listener.close()
        with self._changed:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            client.close()
        if self._dir is None:
            os.unlink(self.socket_path)
        else:
            shutil.rmtree(self._dir, ignore_errors=True)
        with self._changed:
            violations = list(self.violations)
        if violations:
            raise AssertionError("off the hook protocol:\n" + "\n".join(violations))

    def __enter__(self) -> FakeAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._changed:
                self._clients.append(client)
                self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        write_lock = threading.Lock()
        reader = client.makefile("rb")
        try:
            for line in reader:
                message = json.loads(line)
                assert line.endswith(b"\n") and b"\n" not in line[:-1]
                problems = hook_protocol.request_problems(message)
                if RECORD:
                    with open(RECORD, "ab") as record:
                        record.write(line)
                with self._changed:
                    self.messages.append(message)
                    self.violations += [f"request {message}: {p}" for p in problems]
                    self._changed.notify_all()
                reply = self.respond(message)
                if reply is None:
                    continue
                reply = {"id": message["id"], **reply}
                if self.check_replies:
                    problems = hook_protocol.reply_problems(message.get("op"), reply)
                    with self._changed:
                        self.violations += [f"reply {reply}: {p}" for p in problems]
                data = (json.dumps(reply) + "\n").encode()
                delay = self.delay(message)
                if delay:
                    threading.Timer(delay, self._send, (client, write_lock, data)).start()
                else:
                    self._send(client, write_lock, data)
        except (OSError, ValueError):
            pass
        finally:
            reader.close()

    @staticmethod
    def _send(client: socket.socket, lock: threading.Lock, data: bytes) -> None:
        with lock:
            try:
                client.sendall(data)
            except OSError:
                pass
