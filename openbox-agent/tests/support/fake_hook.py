"""A stand-in for the worker hook, speaking the hook protocol by hand, for the daemon's
tests without a Temporal server.

    fake_hook.py SOCKET MODE [ARGS...]

Modes:
  attribute URL DIR   two threads run activities "a" and "b" at the same time; each
                      writes DIR/<id>-marker.txt, GETs URL/<id>-marker (TLS or not),
                      and runs `curl URL/<id>-curl`; then, with no activity published,
                      writes DIR/none.txt. Prints the replies as JSON lines.
  forge-pid PID       hello claiming pid PID.
  forge-thread TID    a valid hello, then `thread` for TID.
  die                 hello, activity_start, then exits without activity_end.
  workflow-events RUNS SIGNALS ACKED
                      as the hook's workflow-event sender does: one connection, every
                      request written without waiting for replies. Per run (round robin
                      over RUNS runs): WorkflowStarted, SIGNALS signals, WorkflowCompleted.
                      Appends the key of each event the agent acknowledged (ok: true) to
                      the file ACKED, one line each, as the reply arrives; ends when every
                      reply came or the agent went away.
  activities THREADS SECONDS
                      THREADS threads, each on its own connection, run activities
                      (activity_start then activity_end) one after the other until
                      SECONDS have passed; prints {"ended": [activity ids]} of the
                      activity_end requests answered ok.
  hello [SECS]        hello; with SECS, waits that long on the same connection and says
                      hello again (a registered connection must not be timed out).
  command CMD...      one activity ("cmd") that runs CMD as a subprocess (its output
                      discarded; a failure fails the hook).
  settings JSON       hello with JSON as the worker's own governance settings
                      (create_openbox_worker's parameters), then one activity.
  helper DIR          as a process pool does: the worker runs activity "p" and forks a
                      child (its own slot cleared) that says hello as a helper, registers
                      its thread, publishes p's token while it writes DIR/p-helper.txt,
                      then tries an activity_start of its own. The child's replies are
                      printed as {"helper": op, "reply": ...}.
  helper-orphan       hello as a helper from a process no worker started.
"""

import ctypes
import json
import mmap
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request


class Agent:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.file = self.sock.makefile("rw")
        self.next_id = 0
        self.lock = threading.Lock()
        self.echo = True

    def call(self, **msg):
        with self.lock:
            self.next_id += 1
            msg["id"] = self.next_id
            self.file.write(json.dumps(msg) + "\n")
            self.file.flush()
            reply = json.loads(self.file.readline())
            if self.echo:
                print(json.dumps({"op": msg["op"], "reply": reply}), flush=True)
        return reply


def slot_table(n=64):
    mm = mmap.mmap(-1, 8 * n, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    slots = memoryview(mm).cast("Q")
    for i in range(n):
        slots[i] = 0  # fault the pages in: the kernel side cannot
    return mm, slots, ctypes.addressof(ctypes.c_char.from_buffer(mm))


def hello(agent, addr, n=64, pid=None, config=None, helper=False):
    extra = {"helper": True} if helper else {}
    return agent.call(op="hello", pid=os.getpid() if pid is None else pid,
                      hook="fake-hook", slots_addr=addr, slots=n, config=config or {}, **extra)


def helper(path, agent, slots, addr, out_dir):
    hello(agent, addr)
    agent.call(op="thread", tid=threading.get_native_id(), slot=1)
    start = agent.call(op="activity_start", workflow_id="wf-p", run_id="run-1",
                       workflow_type="W", activity_id="p", activity_type="pool",
                       task_queue="q", attempt=1, input=[])
    token = start["token"]
    pid = os.fork()  # slot 1 holds 0: the child inherits no activity from the kernel
    if pid == 0:
        code = 1
        try:
            own = Agent(path)
            own.echo = False

            def call(**msg):
                reply = own.call(**msg)
                print(json.dumps({"helper": msg["op"], "reply": reply}), flush=True)
                return reply

            call(op="hello", pid=os.getpid(), hook="fake-hook", slots_addr=addr, slots=64,
                 config={}, helper=True)
            call(op="thread", tid=threading.get_native_id(), slot=2)
            slots[2] = token
            with open(os.path.join(out_dir, "p-helper.txt"), "w") as f:
                f.write("written by a helper of p")
            slots[2] = 0
            call(op="activity_start", workflow_id="wf-h", run_id="run-1", workflow_type="W",
                 activity_id="h", activity_type="pool", task_queue="q", attempt=1, input=[])
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    agent.call(op="activity_end", token=token, status="completed", output={"done": "p"},
               error=None)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit("the helper child failed")


def activity(agent, slots, slot, name, url, out_dir, barrier):
    agent.call(op="thread", tid=threading.get_native_id(), slot=slot)
    start = agent.call(op="activity_start", workflow_id="wf-" + name, run_id="run-1",
                       workflow_type="W", activity_id=name, activity_type="work",
                       task_queue="q", attempt=1, input=[{"who": name}])
    barrier.wait()
    slots[slot] = start["token"]
    try:
        with open(os.path.join(out_dir, name + "-marker.txt"), "w") as f:
            f.write("written by " + name)
        ctx = ssl._create_unverified_context()
        urllib.request.urlopen(f"{url}/{name}-marker", context=ctx).read()
        subprocess.run(["curl", "-sk", "-o", "/dev/null", f"{url}/{name}-curl"], check=True)
    finally:
        slots[slot] = 0
    barrier.wait()
    agent.call(op="activity_end", token=start["token"], status="completed",
               output={"done": name}, error=None)


def event_key(msg):
    """What identifies a workflow event, in the hook's request and in Core's body alike."""
    n = msg.get("signal_args", [""])[0] if msg["event_type"] == "SignalReceived" else ""
    return f"{msg['workflow_id']}/{msg['event_type']}/{n}"


def workflow_events(agent, addr, runs, signals, acked_path):
    hello(agent, addr)
    head = {"workflow_type": "Durable", "task_queue": "q"}
    requests = []
    for step in range(signals + 2):
        for r in range(runs):
            wf = {"workflow_id": f"dur-{r}", "run_id": "run-1", **head}
            if step == 0:
                requests.append({"event_type": "WorkflowStarted", **wf})
            elif step == signals + 1:
                requests.append({"event_type": "WorkflowCompleted", "workflow_output": None, **wf})
            else:
                n = (step - 1) * runs + r
                requests.append({"event_type": "SignalReceived", "signal_name": "tick",
                                 "signal_args": [n], **wf})
    keys = {}
    for i, req in enumerate(requests, start=1000):
        keys[i] = event_key(req)

    def write():
        try:
            for i, req in enumerate(requests, start=1000):
                agent.sock.sendall((json.dumps({"id": i, "op": "workflow_event", **req}) + "\n").encode())
        except OSError:
            pass  # the agent went away

    writer = threading.Thread(target=write)
    writer.start()
    with open(acked_path, "a") as acked:
        for _ in requests:
            line = agent.file.readline()
            if not line:
                break
            reply = json.loads(line)
            if reply.get("ok"):
                acked.write(keys[reply["id"]] + "\n")
                acked.flush()
    writer.join()


def activities(path, addr, threads, seconds):
    deadline = time.monotonic() + seconds
    ended = []

    def run(t):
        agent = Agent(path)
        agent.echo = False
        hello(agent, addr)
        i = 0
        while time.monotonic() < deadline:
            i += 1
            activity_id = f"{t}-{i}"
            start = agent.call(op="activity_start", workflow_id=f"storm-{t}", run_id="run-1",
                               workflow_type="Storm", activity_id=activity_id,
                               activity_type="work", task_queue="q", attempt=1, input=[i])
            end = agent.call(op="activity_end", token=start["token"], status="completed",
                             output=i, error=None)
            if end.get("ok"):
                ended.append(activity_id)

    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    print(json.dumps({"ended": ended}), flush=True)


def main():
    path, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    agent = Agent(path)
    mm, slots, addr = slot_table()
    if mode == "attribute":
        url, out_dir = args
        hello(agent, addr)
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=activity, args=(agent, slots, i + 1, name, url, out_dir, barrier))
                   for i, name in enumerate(["a", "b"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with open(os.path.join(out_dir, "none.txt"), "w") as f:
            f.write("no activity")
    elif mode == "forge-pid":
        hello(agent, addr, pid=int(args[0]))
    elif mode == "forge-thread":
        hello(agent, addr)
        agent.call(op="thread", tid=int(args[0]), slot=0)
    elif mode == "hello":
        hello(agent, addr)
        if args:
            time.sleep(float(args[0]))
            hello(agent, addr)
    elif mode == "command":
        hello(agent, addr)
        agent.call(op="thread", tid=threading.get_native_id(), slot=1)
        start = agent.call(op="activity_start", workflow_id="wf-cmd", run_id="run-1",
                           workflow_type="W", activity_id="cmd", activity_type="command",
                           task_queue="q", attempt=1, input=[])
        slots[1] = start["token"]
        try:
            subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        finally:
            slots[1] = 0
        agent.call(op="activity_end", token=start["token"], status="completed",
                   output={"done": "cmd"}, error=None)
    elif mode == "settings":
        hello(agent, addr, config=json.loads(args[0]))
        start = agent.call(op="activity_start", workflow_id="wf", run_id="r", workflow_type="W",
                           activity_id="1", activity_type="t", task_queue="q", attempt=1,
                           input=[])
        agent.call(op="activity_end", token=start["token"], status="completed", output=None,
                   error=None)
    elif mode == "helper":
        helper(path, agent, slots, addr, args[0])
    elif mode == "helper-orphan":
        hello(agent, addr, helper=True)
    elif mode == "die":
        hello(agent, addr)
        agent.call(op="activity_start", workflow_id="wf", run_id="r", workflow_type="W",
                   activity_id="1", activity_type="t", task_queue="q", attempt=1, input=[])
        os._exit(0)
    elif mode == "workflow-events":
        workflow_events(agent, addr, int(args[0]), int(args[1]), args[2])
    elif mode == "activities":
        activities(path, addr, int(args[0]), float(args[1]))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
