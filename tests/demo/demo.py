"""`cargo xtask demo`: openbox-agent traces a sample program that makes an HTTPS call to
a local TLS server and reads and writes files, and prints what it saw.

Run by xtask, which builds the agent and sets OPENBOX_AGENT_BIN, OPENBOX_TEST_PYTHON
and OPENBOX_TEST_SUPPORT.
"""

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    agent = os.environ["OPENBOX_AGENT_BIN"]
    python = os.environ["OPENBOX_TEST_PYTHON"]
    support = os.environ["OPENBOX_TEST_SUPPORT"]
    server = subprocess.Popen(
        [python, os.path.join(support, "tls_server.py"), "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(server.stdout.readline())
        with tempfile.TemporaryDirectory(prefix="openbox-demo-") as workdir:
            print(f"== openbox-agent trace -- python sample_app.py  (TLS server on 127.0.0.1:{port})\n", flush=True)
            rc = subprocess.call(
                [agent, "trace", "--", python, os.path.join(HERE, "sample_app.py"), str(port), workdir]
            )
            if rc != 0:
                sys.exit(f"the traced sample program failed with exit code {rc}")
            print(
                "\nAbove: the HTTPS request and response in plaintext (read from libssl by uprobes),"
                " the files with their modes and byte totals, and the kernel's counters."
                " Add --json for one JSON object per line.",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
