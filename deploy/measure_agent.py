#!/usr/bin/env python3
"""Measures every `openbox-agent run` process on this host while it runs, for sizing the
DaemonSet's requests and limits (deploy/README.md, "Resources").

Every 50 ms, from outside the agent: peak RSS (VmHWM) split into heap (RssAnon) and
file-backed pages (RssFile) from /proc/PID/status, CPU time from /proc/PID/stat (mean
over the process's life and the highest 1-second rate), and the kernel's own `memlock`
figure of each BPF map the process holds (/proc/PID/fdinfo), which is kernel memory
charged to the pod's cgroup but not part of RSS.

    python3 deploy/measure_agent.py OUT.json &      # then run the load
    kill -TERM %1                                   # writes OUT.json and a table
"""

import json
import os
import signal
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")
STATUS_KEYS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "Threads")


def agent_run_pids():
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"openbox-agent") and argv[1:2] == [b"run"]:
            yield pid, b" ".join(argv[1:]).decode(errors="replace")


def status(pid):
    out = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        if key in STATUS_KEYS:
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def bpf_map_memlock(pid):
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            info = open(f"/proc/{pid}/fdinfo/{fd}").read()
        except OSError:
            continue
        if "map_type:" in info:
            for line in info.splitlines():
                if line.startswith("memlock:"):
                    total += int(line.split()[1])
    return total


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else "agent-measure.json"
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    seen = {}
    while not stop:
        now = time.time()
        for pid, cmd in agent_run_pids():
            try:
                st, cpu, memlock = status(pid), cpu_seconds(pid), bpf_map_memlock(pid)
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
            r = seen.setdefault(pid, {"cmd": cmd, "first": now, "window": [now, cpu]})
            r["last"], r["cpu_s"] = now, cpu
            for key, name in (("VmHWM", "hwm_kib"), ("RssAnon", "anon_kib"),
                              ("RssFile", "file_kib"), ("Threads", "threads")):
                r[name] = max(r.get(name, 0), st.get(key, 0))
            r["bpf_memlock_bytes"] = max(r.get("bpf_memlock_bytes", 0), memlock)
            t0, c0 = r["window"]
            if now - t0 >= 1.0:
                r["cpu_peak_1s"] = max(r.get("cpu_peak_1s", 0.0), (cpu - c0) / (now - t0))
                r["window"] = [now, cpu]
        time.sleep(0.05)
    for r in seen.values():
        del r["window"]
    with open(out_path, "w") as f:
        json.dump(seen, f, indent=1)
    print(f"{'pid':>8} {'VmHWM':>9} {'anon':>9} {'file':>9} {'maps':>9} {'cpu mean':>9} {'cpu 1s':>7}")
    for pid, r in seen.items():
        life = max(r["last"] - r["first"], 0.05)
        print(f"{pid:>8} {r['hwm_kib'] / 1024:8.1f}M {r['anon_kib'] / 1024:8.1f}M "
              f"{r['file_kib'] / 1024:8.1f}M {r['bpf_memlock_bytes'] / 2**20:8.1f}M "
              f"{r['cpu_s'] / life:9.2f} {r.get('cpu_peak_1s', 0.0):7.2f}")


if __name__ == "__main__":
    main()
