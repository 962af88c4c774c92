"""client_ssl.py's exchange, then a wait: the process stays watched, with its TLS probes
attached, until the test has run an unwatched client beside it.

Usage: client_ssl_hold.py PORT OUTDIR
Does what client_ssl.py does (OUTDIR/ok last), then waits until OUTDIR/go exists
(at most 120 s).
"""

import os
import sys
import time

import client_ssl


def main():
    outdir = sys.argv[2]
    client_ssl.main()
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(outdir, "go")):
        if time.monotonic() > deadline:
            sys.exit("nobody created OUTDIR/go within 120 s")
        time.sleep(0.05)


if __name__ == "__main__":
    main()
