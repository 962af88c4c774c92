"""`cargo xtask demo`: a real Temporal dev server, a Python worker adopting openbox-agent
with one interceptor, and the agent daemon attributing what every activity did.

Starts, each on free loopback ports and in a throwaway directory: the Temporal dev
server, a local HTTPS server answering like an LLM API, a throwaway PostgreSQL (TLS),
`openbox-agent run` (embedded default: events as JSON lines, verdicts from the local
policy tests/demo/policy.toml), and the worker of ai_agent.py; runs the ResearchAgent
workflow; then prints, per activity, the spans the agent captured and attributed to it,
and the activity the policy blocked.

Run by xtask, which builds the agent and provides OPENBOX_AGENT_BIN,
OPENBOX_TEST_PYTHON, OPENBOX_TEST_SUPPORT, OPENBOX_PG_BIN and OPENBOX_TEMPORAL_BIN.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def env(name):
    value = os.environ.get(name)
    if not value:
        sys.exit(f"{name} is not set: run this through `cargo xtask demo`")
    return value


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Everything started, stopped in reverse order (SIGTERM, then SIGKILL)."""

    def __init__(self):
        self.running = []

    def start(self, name, cmd, **kw):
        p = subprocess.Popen(cmd, start_new_session=True, **kw)
        self.running.append((name, p))
        return p

    def stop(self, p, timeout=20):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def stop_all(self):
        for _, p in reversed(self.running):
            self.stop(p)


def wait_for(what, check, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    sys.exit(f"{what} did not come up within {timeout} s")


def port_open(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def describe(span):
    a = span["attributes"]
    ms = (span.get("duration_ns") or 0) / 1e6
    if "http.url" in a:
        text = f"{span['name']} {a['http.url']} → {a.get('http.status_code', '-')}"
        if span.get("request_body"):
            text += f"\n{'':12}request  {span['request_body'][:100]}"
        if span.get("response_body"):
            text += f"\n{'':12}response {span['response_body'][:100]}"
    elif "db.system" in a:
        text = f"{a['db.system']} {span['name']} \"{a.get('db.statement', '')[:90]}\""
        if "db.rowcount" in a:
            text += f" rows={a['db.rowcount']}"
    elif span["name"] == "file.open":
        text = (f"file.open {a['file.path']} ({a.get('file.mode')}) read "
                f"{a.get('file.total_bytes_read', 0)} B, wrote {a.get('file.total_bytes_written', 0)} B")
    elif "file.path" in a:
        text = f"  {span['name']} {a.get('file.bytes', 0)} B"
    else:
        text = span["name"]
    return f"{text}  ({ms:.2f} ms)"


def report(events_path, summary):
    events = [json.loads(l) for l in open(events_path)]
    done = [e for e in events if e["event_type"] == "ActivityCompleted"]
    print(f"\n== what openbox-agent attributed, per activity ({len(done)} activities)\n")
    for e in done:
        print(f"{e['activity_type']} (activity {e['activity_id']}, attempt {e['attempt']}, "
              f"{e['status']}, {e['duration_ms']:.1f} ms) — {e['span_count']} spans")
        if e.get("error"):
            print(f"    {e['error']['type']}: {e['error']['message']}")
        roots = [s for s in e["spans"] if s["name"] != "file.read" and s["name"] != "file.write"]
        children = {}
        for s in e["spans"]:
            if s.get("parent_span_id"):
                children.setdefault(s["parent_span_id"], []).append(s)
        for s in sorted(roots, key=lambda s: s["start_time"]):
            print(f"    {describe(s)}")
            for c in children.get(s["span_id"], []):
                print(f"    {describe(c)}")
        print()
    print("== agent summary")
    keys = ["workers", "activities", "spans_attributed", "spans_unattributed",
            "unattributed_reasons", "registrations_refused", "ringbuf_drops", "events"]
    print("    " + ", ".join(f"{k}={summary.get(k)}" for k in keys))
    print("\npublish_report was blocked by the local policy (tests/demo/policy.toml) before it "
          "ran: the hook raised the SDK's non-retryable GovernanceBlock, and the workflow saw it.")
    print("Unattributed spans are the worker's own housekeeping outside any activity "
          "(Temporal's polling, imports); they are never guessed onto an activity.")
    print(f"Every event as JSON lines: {events_path} (the worker's log is beside it)")


def main():
    agent = env("OPENBOX_AGENT_BIN")
    python = env("OPENBOX_TEST_PYTHON")
    support = env("OPENBOX_TEST_SUPPORT")
    temporal = env("OPENBOX_TEMPORAL_BIN")
    workdir = tempfile.mkdtemp(prefix="openbox-demo-")
    procs = Processes()
    try:
        tport = free_port()
        print(f"== Temporal dev server on 127.0.0.1:{tport}", flush=True)
        procs.start("temporal", [temporal, "server", "start-dev", "--headless", "--ip", "127.0.0.1",
                                 "--port", str(tport), "--db-filename", os.path.join(workdir, "temporal.db"),
                                 "--log-level", "error"],
                    stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, "temporal.log"), "w"))
        llm = procs.start("llm", [python, os.path.join(support, "tls_server.py"), "0"],
                          stdout=subprocess.PIPE, text=True)
        llm_port = int(llm.stdout.readline())
        print(f"== LLM-style HTTPS endpoint on 127.0.0.1:{llm_port}", flush=True)
        pg = procs.start("postgres", [python, os.path.join(support, "pg_server.py"), "0"],
                         stdout=subprocess.PIPE, text=True)
        pg_port = int(pg.stdout.readline())
        print(f"== PostgreSQL (TLS) on 127.0.0.1:{pg_port}", flush=True)

        sock = os.path.join(workdir, "agent.sock")
        events = os.path.join(workdir, "events.jsonl")
        agent_err = os.path.join(workdir, "agent.err")
        policy = os.path.join(HERE, "policy.toml")
        print(f"== openbox-agent run --socket {sock} --events {events} --policy-file {policy}", flush=True)
        agent_p = procs.start("agent", [agent, "run", "--socket", sock, "--events", events,
                                        "--policy-file", policy,
                                        "--unattributed", os.path.join(workdir, "unattributed.jsonl")],
                              stdout=subprocess.DEVNULL, stderr=open(agent_err, "w"))
        wait_for("openbox-agent", lambda: os.path.exists(sock) or agent_p.poll() is not None)
        if agent_p.poll() is not None:
            sys.exit("openbox-agent failed to start:\n" + open(agent_err).read())
        wait_for("the Temporal dev server", lambda: port_open(tport))

        app = os.path.join(HERE, "ai_agent.py")
        worker_env = dict(os.environ, OPENBOX_AGENT_SOCKET=sock)
        worker = procs.start("worker", [python, app, "worker", "--temporal", f"127.0.0.1:{tport}",
                                        "--llm", f"https://127.0.0.1:{llm_port}", "--pg-port", str(pg_port),
                                        "--workdir", workdir],
                             env=worker_env, stdout=subprocess.PIPE, text=True,
                             stderr=open(os.path.join(workdir, "worker.log"), "w"))
        if worker.stdout.readline().strip() != "worker ready":
            sys.exit("the worker did not start:\n" + open(os.path.join(workdir, "worker.log")).read())
        print("== worker ready (Worker(..., interceptors=[OpenBoxHook()])); running ResearchAgent", flush=True)
        result = subprocess.run([python, app, "run", "--temporal", f"127.0.0.1:{tport}",
                                 "--question", "Which fruit sells best in winter?"],
                                capture_output=True, text=True, timeout=180)
        if result.returncode != 0:
            sys.exit(f"the workflow failed:\n{result.stderr}")
        print(f"== workflow result: {result.stdout.strip()}", flush=True)

        procs.stop(worker)
        procs.stop(agent_p)
        lines = [l for l in open(agent_err).read().splitlines() if l.startswith("{")]
        summary = json.loads(lines[-1]) if lines else {}
        report(events, summary)
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
