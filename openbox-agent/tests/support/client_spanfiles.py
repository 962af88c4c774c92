"""File I/O for the file spans: known paths, calls and byte counts (os-level calls, so
each is exactly one syscall).

Usage: client_spanfiles.py DIR      (DIR: an existing, empty directory; absolute path)

  1. DIR/known.txt  O_WRONLY|O_CREAT|O_TRUNC (w):  write 1000, write 2000
                    -> one file.write child: 3000 bytes, 2 calls
  2. DIR/known.txt  O_RDONLY (r):  read 1200, read 1800
                    -> one file.read child: 3000 bytes, 2 calls
  3. DIR/mixed.bin  O_RDWR|O_CREAT (r+):  write 100, lseek 0, read 40, read 10, write 7
                    -> children in order: write 100, read 50 (2 calls), write 7
  4. DIR/big.bin    written with one 10 MiB write (w), then O_RDONLY (r) read in 4 KiB
                    os.read calls until EOF -> one file.read child of 10485760 bytes
Writes DIR/ok last.
"""

import os
import sys

BIG = 10 * 1024 * 1024


def write_all(fd, data):
    n = os.write(fd, data)
    assert n == len(data), (n, len(data))


def main():
    d = sys.argv[1]
    assert os.path.isabs(d), d
    known = os.path.join(d, "known.txt")

    fd = os.open(known, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    write_all(fd, b"k" * 1000)
    write_all(fd, b"n" * 2000)
    os.close(fd)

    fd = os.open(known, os.O_RDONLY)
    assert len(os.read(fd, 1200)) == 1200
    assert len(os.read(fd, 1800)) == 1800
    os.close(fd)

    fd = os.open(os.path.join(d, "mixed.bin"), os.O_RDWR | os.O_CREAT, 0o644)
    write_all(fd, b"m" * 100)
    os.lseek(fd, 0, os.SEEK_SET)
    assert len(os.read(fd, 40)) == 40
    assert len(os.read(fd, 10)) == 10
    write_all(fd, b"x" * 7)
    os.close(fd)

    big = os.path.join(d, "big.bin")
    fd = os.open(big, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    write_all(fd, b"b" * BIG)
    os.close(fd)
    fd = os.open(big, os.O_RDONLY)
    total = 0
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        total += len(chunk)
    os.close(fd)
    assert total == BIG, total

    open(os.path.join(d, "ok"), "w").close()


if __name__ == "__main__":
    main()
