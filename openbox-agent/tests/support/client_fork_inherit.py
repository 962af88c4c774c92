"""A child uses a socket it inherited at fork from its first instruction on.

Usage: client_fork_inherit.py PORT OUTDIR

The parent connects to tls_server.py --plain and forks at once; the child writes a
request on the inherited socket with os.write as its first act, reads the answer and
exits. Repeated 5 times (a new connection each), the socket moved with dup2 to a
descriptor spread over 0-1023 each time (3, 203, 403, 603, 803: the kernel copies a
parent's descriptors to its child 64 numbers per program run, one run after another).
Writes OUTDIR/children.json ({child pid: request sent}) and OUTDIR/ok when every
child got its answer.
"""

import json
import os
import socket
import sys


def main():
    port, outdir = int(sys.argv[1]), sys.argv[2]
    children = {}
    for i in range(5):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.settimeout(None)
        fd = s.detach()
        if i > 0:
            high = os.dup2(fd, 3 + 200 * i)
            os.close(fd)
            fd = high
        req = b"GET /fork/%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % i
        pid = os.fork()
        if pid == 0:
            try:
                os.write(fd, req)
                got = b""
                while not got.endswith(b"echo:GET /fork/%d 0" % i):
                    piece = os.read(fd, 4096)
                    if not piece:
                        os._exit(3)
                    got += piece
                os._exit(0)
            except BaseException:
                os._exit(4)
        os.close(fd)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        children[pid] = req.decode()
    with open(os.path.join(outdir, "children.json"), "w") as f:
        json.dump(children, f)
    open(os.path.join(outdir, "ok"), "w").close()


if __name__ == "__main__":
    main()
