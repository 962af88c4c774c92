"""The httpx POST loop of `cargo xtask bench --only http`: one keep-alive client posting
to a local server in another process, timing each request.

Usage: http_loop.py --url URL --requests N --warmup W --out FILE [--sdk]

--sdk: openbox-temporal-sdk-python 1.0.0's instrumentation on, set up as
`create_openbox_worker` does (a WorkflowSpanProcessor, then
`setup_opentelemetry_for_governance` with its defaults; openbox-agent/tests/support/
sdk_setup.py, shared with the spans test), and the requests made inside an
`activity.*` span whose trace is registered with the processor, as its activity
interceptor does — so every request's span is built, its bodies captured and buffered,
exactly as in a worker. Without --sdk, the same loop with nothing added.

Writes one JSON line to FILE: the median, mean and quartiles of the timed requests in
microseconds, how many there were, and this process's CPU time per timed request
(user + system: the SDK's work, or the agent's uprobe traps and kernel programs, which
run in this process) — a figure a busy machine disturbs far less than wall time. The
warm-up requests (connection set-up, TLS handshake, first-call imports) are not timed.
"""

import argparse
import json
import os
import statistics
import sys
import time

BODY = b'{"model":"bench","messages":[{"role":"user","content":"hello"}]}'


def loop(url, requests, warmup):
    import httpx

    times = []
    cpu = 0.0
    with httpx.Client(verify=False) as client:
        for i in range(warmup + requests):
            if i == warmup:
                cpu = time.process_time()
            t0 = time.perf_counter_ns()
            r = client.post(url, content=BODY, headers={"Content-Type": "application/json"})
            r.read()
            t1 = time.perf_counter_ns()
            if r.status_code != 200:
                raise SystemExit(f"request {i}: status {r.status_code}")
            if i >= warmup:
                times.append((t1 - t0) / 1000)
    return times, (time.process_time() - cpu) * 1e6 / requests


def with_sdk(url, requests, warmup):
    # The SDK's set-up is shared with the spans test (openbox-agent/tests/support).
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "..", "..", "openbox-agent", "tests", "support"))
    import sdk_setup

    processor = sdk_setup.instrument()
    with sdk_setup.activity(processor, "wf-bench", "Bench", "bench") as (buffer, _):
        times, cpu = loop(url, requests, warmup)
    spans = len(buffer.spans)
    if spans < requests:
        raise SystemExit(f"the SDK buffered {spans} spans for {requests} requests: is it instrumenting httpx?")
    return times, cpu


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--out", required=True)
    p.add_argument("--sdk", action="store_true")
    a = p.parse_args()
    times, cpu = (with_sdk if a.sdk else loop)(a.url, a.requests, a.warmup)
    q = statistics.quantiles(times, n=4)
    with open(a.out, "w") as f:
        json.dump({"requests": len(times), "median_us": statistics.median(times),
                   "mean_us": statistics.fmean(times), "p25_us": q[0], "p75_us": q[2], "cpu_us": cpu}, f)
        f.write("\n")


if __name__ == "__main__":
    main()
