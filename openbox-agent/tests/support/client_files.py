"""File I/O with exact, known sizes, plus noise paths the agent must not report.

Usage: client_files.py DIR        (DIR: an existing, empty directory; absolute path)

Every call below is one syscall (os.open/os.read/os.write), so counts are exact. The
integration test (tests/capture.rs, files_are_reported_with_exact_paths_modes_and_sizes)
mirrors this list; keep them in step.

  path                  flags                        mode  calls                      read/written
  DIR/written.txt       O_WRONLY|O_CREAT|O_TRUNC     w     write 500, 300, 200        0 / 1000
  DIR/written.txt       O_RDONLY                     r     read 400, 600              1000 / 0
  DIR/written.txt       O_WRONLY|O_APPEND            a     write 24                   0 / 24
  DIR/rw.bin            O_RDWR|O_CREAT               r+    write 100, lseek 0, read 50  50 / 100
  DIR/appendplus.log    O_RDWR|O_CREAT|O_APPEND      a+    write 10, lseek 0, read 10   10 / 10
  DIR/highlevel.txt     open(..., "w") (Python io)   w     one 12345-byte write       0 / 12345
  DIR/highlevel.txt     open(..., "rb").read()       r     reads up to EOF            12345 / 0

Noise (must not appear): /proc/self/status, /dev/null, /dev/urandom,
/sys/devices/system/cpu/online, DIR/__pycache__/noise.cpython-311.pyc, DIR/libnoise.so.
Writes DIR/ok last.
"""

import os
import sys


def write_all(fd, data):
    n = os.write(fd, data)
    assert n == len(data), (n, len(data))


def main():
    d = sys.argv[1]
    assert os.path.isabs(d), d
    written = os.path.join(d, "written.txt")

    fd = os.open(written, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    write_all(fd, b"a" * 500)
    write_all(fd, b"b" * 300)
    write_all(fd, b"c" * 200)
    os.close(fd)

    fd = os.open(written, os.O_RDONLY)
    assert len(os.read(fd, 400)) == 400
    assert len(os.read(fd, 600)) == 600
    os.close(fd)

    fd = os.open(written, os.O_WRONLY | os.O_APPEND)
    write_all(fd, b"d" * 24)
    os.close(fd)

    fd = os.open(os.path.join(d, "rw.bin"), os.O_RDWR | os.O_CREAT, 0o644)
    write_all(fd, b"e" * 100)
    os.lseek(fd, 0, os.SEEK_SET)
    assert len(os.read(fd, 50)) == 50
    os.close(fd)

    fd = os.open(os.path.join(d, "appendplus.log"), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    write_all(fd, b"f" * 10)
    os.lseek(fd, 0, os.SEEK_SET)
    assert len(os.read(fd, 10)) == 10
    os.close(fd)

    high = os.path.join(d, "highlevel.txt")
    with open(high, "w") as f:
        f.write("g" * 12345)
    with open(high, "rb") as f:
        assert len(f.read()) == 12345

    # Noise.
    with open("/proc/self/status", "rb") as f:
        f.read()
    with open("/dev/null", "wb") as f:
        f.write(b"noise")
    with open("/dev/urandom", "rb") as f:
        f.read(16)
    with open("/sys/devices/system/cpu/online", "rb") as f:
        f.read()
    os.mkdir(os.path.join(d, "__pycache__"))
    pyc = os.path.join(d, "__pycache__", "noise.cpython-311.pyc")
    with open(pyc, "wb") as f:
        f.write(b"\x00" * 64)
    with open(pyc, "rb") as f:
        f.read()
    with open(os.path.join(d, "libnoise.so"), "wb") as f:
        f.write(b"\x7fELF")

    open(os.path.join(d, "ok"), "w").close()


if __name__ == "__main__":
    main()
