"""What the throwaway database servers share: a free port, SIGTERM/SIGINT handling,
waiting until the server answers, serving until stopped, and stopping it.

Used by redis_server.py, ferretdb_server.py and mariadb_server.py (imported from the
script's own directory).
"""

import signal
import socket
import subprocess
import sys
import time

_stopping = False


def _on_signal(*_):
    global _stopping
    _stopping = True


def handle_signals():
    """SIGTERM or SIGINT asks the fixture to stop (it then cleans up)."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def stopping():
    return _stopping


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _show_log(log_path):
    try:
        sys.stderr.write(open(log_path, errors="replace").read())
    except OSError:
        pass


def wait_until_answering(name, server, log_path, answers, timeout, poll=0.05):
    """Waits until `answers()` is true. Exits with the server's log when it dies or the
    time runs out; returns False when asked to stop meanwhile."""
    deadline = time.monotonic() + timeout
    while not answers():
        if server.poll() is not None or time.monotonic() > deadline:
            _show_log(log_path)
            sys.exit(f"{name}: the server did not start")
        if _stopping:
            return False
        time.sleep(poll)
    return True


def serve_until_stopped(name, server, port, log_path):
    """Announces the port (the caller's readiness signal) and waits for SIGTERM/SIGINT;
    a server that dies first is an error, with its log."""
    print(port, flush=True)
    while not _stopping and server.poll() is None:
        time.sleep(0.2)
    if server.poll() is not None and not _stopping:
        _show_log(log_path)
        sys.exit(f"{name}: the server exited unexpectedly")


def stop(server, timeout):
    if server is not None and server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
