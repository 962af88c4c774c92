"""client_ssl.py's exchange made by a forked child (os.fork, no exec): the parent loads
libssl (its TLS probes are attached then) and makes no connection itself.

Usage: client_fork_ssl.py PORT OUTDIR
The child writes what client_ssl.py writes (OUTDIR/ok last); the parent writes the
child's pid to OUTDIR/child.pid and exits with the child's status.
"""

import os
import ssl
import sys

import client_ssl


def main():
    outdir = sys.argv[2]
    # libssl is mapped by now: the agent attached this process's probes when it opened it.
    ssl.create_default_context()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            client_ssl.main()
            code = 0
        finally:
            os._exit(code)
    with open(os.path.join(outdir, "child.pid"), "w") as f:
        f.write(str(pid))
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
