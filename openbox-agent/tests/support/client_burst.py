"""Sends a burst of bytes over one loopback TCP connection, in 4 KiB writes, to a peer
in the same process (a thread that reads them all): far more than a small ring buffer
holds. Paced at 64 KiB every 3 ms (about 20 MB/s, the byte rate of the load bench at
100 000 events/s), so a reader that is not held up keeps up.

Usage: client_burst.py MIB OUTDIR
Writes OUTDIR/sent.bin (the bytes sent, in order), OUTDIR/port (the listener's port)
and OUTDIR/ok once the peer received every byte.
"""

import os
import socket
import sys
import threading
import time

CHUNK = 4096
PACE_BYTES = 64 << 10
PACE_SECONDS = 0.003


def main():
    mib, outdir = int(sys.argv[1]), sys.argv[2]
    total = mib << 20
    # Every chunk differs, so a lost or reordered one shows in the captured stream.
    data = b"".join(b"burst-%09d\n" % i for i in range(total // 16 + 1))[:total]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    with open(os.path.join(outdir, "port"), "w") as f:
        f.write(str(port))
    received = []

    def read():
        conn, _ = listener.accept()
        with conn:
            while True:
                b = conn.recv(1 << 16)
                if not b:
                    break
                received.append(b)

    reader = threading.Thread(target=read)
    reader.start()
    with socket.create_connection(("127.0.0.1", port)) as c:
        for at in range(0, total, CHUNK):
            c.sendall(data[at : at + CHUNK])
            if (at + CHUNK) % PACE_BYTES == 0:
                time.sleep(PACE_SECONDS)
    reader.join()
    with open(os.path.join(outdir, "sent.bin"), "wb") as f:
        f.write(data)
    if b"".join(received) != data:
        sys.exit("the peer did not receive the bytes sent")
    open(os.path.join(outdir, "ok"), "w").close()


if __name__ == "__main__":
    main()
