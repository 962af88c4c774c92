"""MariaDB through MariaDB Connector/C (libmariadb, called with ctypes) using a
server-side cursor: COM_STMT_PREPARE, COM_STMT_EXECUTE with CURSOR_TYPE_READ_ONLY, then
COM_STMT_FETCH of PREFETCH rows at a time until the cursor is exhausted, as user
`openbox` on database `shop` (mariadb_server.py).

Usage: client_mysql_cursor.py PORT OUTDIR

Connector/C does not offer CLIENT_DEPRECATE_EOF (it refuses the flag), so each fetch's
rows end in an EOF packet; client_mysql_raw_cursor.py is the same cursor with it.
Writes OUTDIR/result.json: {"statement", "deprecate_eof", "fetched": [rows of each
COM_STMT_FETCH], "rows"}.
"""

import ctypes
import json
import os
import sys

STATEMENT = b"SELECT id, name FROM items ORDER BY id"
PREFETCH = 2
STMT_ATTR_CURSOR_TYPE = 1
STMT_ATTR_PREFETCH_ROWS = 2
CURSOR_TYPE_READ_ONLY = 1
MYSQL_NO_DATA = 100
MYSQL_DATA_TRUNCATED = 101


def main():
    port, outdir = int(sys.argv[1]), sys.argv[2]
    lib = ctypes.CDLL("libmariadb.so.3")
    lib.mysql_init.restype = ctypes.c_void_p
    lib.mysql_init.argtypes = [ctypes.c_void_p]
    lib.mysql_real_connect.restype = ctypes.c_void_p
    lib.mysql_real_connect.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                                       ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint,
                                       ctypes.c_char_p, ctypes.c_ulong]
    lib.mysql_error.restype = ctypes.c_char_p
    lib.mysql_error.argtypes = [ctypes.c_void_p]
    lib.mysql_stmt_init.restype = ctypes.c_void_p
    lib.mysql_stmt_init.argtypes = [ctypes.c_void_p]
    lib.mysql_stmt_prepare.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong]
    lib.mysql_stmt_attr_set.restype = ctypes.c_char
    lib.mysql_stmt_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.mysql_stmt_execute.argtypes = [ctypes.c_void_p]
    lib.mysql_stmt_fetch.argtypes = [ctypes.c_void_p]
    lib.mysql_stmt_error.restype = ctypes.c_char_p
    lib.mysql_stmt_error.argtypes = [ctypes.c_void_p]
    lib.mysql_stmt_close.argtypes = [ctypes.c_void_p]
    lib.mysql_close.argtypes = [ctypes.c_void_p]

    conn = lib.mysql_init(None)
    if not lib.mysql_real_connect(conn, b"127.0.0.1", b"openbox", b"openbox-pw", b"shop",
                                  port, None, 0):
        sys.exit(f"client_mysql_cursor: connect failed: {lib.mysql_error(conn).decode()}")
    stmt = lib.mysql_stmt_init(conn)

    def check(rc, what):
        if rc:
            sys.exit(f"client_mysql_cursor: {what} failed: {lib.mysql_stmt_error(stmt).decode()}")

    check(lib.mysql_stmt_prepare(stmt, STATEMENT, len(STATEMENT)), "prepare")
    cursor = ctypes.c_ulong(CURSOR_TYPE_READ_ONLY)
    check(ord(lib.mysql_stmt_attr_set(stmt, STMT_ATTR_CURSOR_TYPE, ctypes.byref(cursor))),
          "setting the cursor type")
    prefetch = ctypes.c_ulong(PREFETCH)
    check(ord(lib.mysql_stmt_attr_set(stmt, STMT_ATTR_PREFETCH_ROWS, ctypes.byref(prefetch))),
          "setting the prefetch rows")
    check(lib.mysql_stmt_execute(stmt), "execute")
    rows = 0
    while True:
        rc = lib.mysql_stmt_fetch(stmt)
        if rc == MYSQL_NO_DATA:
            break
        if rc not in (0, MYSQL_DATA_TRUNCATED):
            check(rc, "fetch")
        rows += 1
    lib.mysql_stmt_close(stmt)
    lib.mysql_close(conn)
    # Connector/C asks for PREFETCH rows per COM_STMT_FETCH; the server sends that many
    # until the cursor runs out, and says so (SERVER_STATUS_LAST_ROW_SENT) with the last
    # ones (3 rows here, not a multiple of PREFETCH: no empty fetch at the end).
    fetched = [min(PREFETCH, rows - i) for i in range(0, rows, PREFETCH)]
    with open(os.path.join(outdir, "result.json"), "w") as f:
        json.dump({"statement": STATEMENT.decode(), "deprecate_eof": False, "fetched": fetched,
                   "rows": rows}, f)

if __name__ == "__main__":
    main()
