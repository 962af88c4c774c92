"""The demo's sample program: what an AI-agent activity typically does — an HTTPS call
to an LLM-like API, then file I/O. It knows nothing of openbox-agent.

Usage: sample_app.py PORT WORKDIR
"""

import json
import os
import ssl
import sys
import urllib.request


def main():
    port, workdir = int(sys.argv[1]), sys.argv[2]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    body = json.dumps({"model": "demo-llm", "messages": [{"role": "user", "content": "Summarise the quarterly report"}]}).encode()
    req = urllib.request.Request(
        f"https://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": "Bearer sk-demo-not-a-real-key"},
    )
    with urllib.request.urlopen(req, context=ctx) as resp:
        answer = resp.read()
    report = os.path.join(workdir, "report.txt")
    with open(report, "w") as f:
        f.write("quarterly report\n" * 100)
    with open(report) as f:
        f.read()
    with open(os.path.join(workdir, "answer.json"), "wb") as f:
        f.write(answer)


if __name__ == "__main__":
    main()
