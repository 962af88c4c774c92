"""MariaDB through a minimal client speaking the protocol itself, offering
CLIENT_DEPRECATE_EOF (which MariaDB Connector/C does not), with a server-side cursor:
COM_STMT_PREPARE, COM_STMT_EXECUTE with CURSOR_TYPE_READ_ONLY, COM_STMT_FETCH of PREFETCH
rows at a time until the server reports the cursor's last row, COM_STMT_CLOSE, COM_QUIT;
as user `openbox` on database `shop` (mariadb_server.py, mysql_native_password).

Usage: client_mysql_raw_cursor.py PORT OUTDIR

Writes OUTDIR/result.json: {"statement", "deprecate_eof", "fetched": [rows of each
COM_STMT_FETCH], "rows"}.
"""

import hashlib
import json
import os
import socket
import struct
import sys

STATEMENT = b"SELECT id, name FROM items ORDER BY id"
PREFETCH = 2

CLIENT_MYSQL = 1
CLIENT_LONG_FLAG = 1 << 2
CLIENT_CONNECT_WITH_DB = 1 << 3
CLIENT_PROTOCOL_41 = 1 << 9
CLIENT_TRANSACTIONS = 1 << 13
CLIENT_SECURE_CONNECTION = 1 << 15
CLIENT_PLUGIN_AUTH = 1 << 19
CLIENT_DEPRECATE_EOF = 1 << 24
SERVER_STATUS_CURSOR_EXISTS = 0x40
SERVER_STATUS_LAST_ROW_SENT = 0x80


class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""

    def read_packet(self):
        while True:
            if len(self.buf) >= 4:
                n = int.from_bytes(self.buf[:3], "little")
                if len(self.buf) >= 4 + n:
                    seq, payload = self.buf[3], self.buf[4:4 + n]
                    self.buf = self.buf[4 + n:]
                    return seq, payload
            data = self.sock.recv(65536)
            if not data:
                sys.exit("client_mysql_raw_cursor: the server closed the connection")
            self.buf += data

    def send(self, seq, payload):
        # Header and payload in one write, as client libraries do.
        self.sock.sendall(len(payload).to_bytes(3, "little") + bytes([seq]) + payload)


def fail_on_err(payload, what):
    if payload[:1] == b"\xff":
        code = struct.unpack_from("<H", payload, 1)[0]
        sys.exit(f"client_mysql_raw_cursor: {what} failed: {code} {payload[9:].decode()}")


def native_password(password, scramble):
    h1 = hashlib.sha1(password).digest()
    h2 = hashlib.sha1(scramble + hashlib.sha1(h1).digest()).digest()
    return bytes(a ^ b for a, b in zip(h1, h2))


def status_of_terminator(payload):
    """Status flags of an EOF packet or (DEPRECATE_EOF) of the OK packet ending rows."""
    if len(payload) < 9:
        return struct.unpack_from("<H", payload, 3)[0]
    pos = 1
    for _ in range(2):  # affected rows, last insert id: length-encoded, small here
        pos += {0xfc: 3, 0xfd: 4, 0xfe: 9}.get(payload[pos], 1)
    return struct.unpack_from("<H", payload, pos)[0]


def main():
    port, outdir = int(sys.argv[1]), sys.argv[2]
    c = Conn(port)
    _, greeting = c.read_packet()
    fail_on_err(greeting, "connecting")
    end = greeting.index(b"\0", 1)
    pos = end + 1 + 4
    scramble = greeting[pos:pos + 8]
    pos += 8 + 1
    server_caps = struct.unpack_from("<H", greeting, pos)[0]
    server_caps |= struct.unpack_from("<H", greeting, pos + 5)[0] << 16
    pos += 2 + 1 + 2 + 2 + 1 + 10
    scramble += greeting[pos:pos + 12]
    if not server_caps & CLIENT_DEPRECATE_EOF:
        sys.exit("client_mysql_raw_cursor: the server does not offer CLIENT_DEPRECATE_EOF")
    caps = (CLIENT_MYSQL | CLIENT_LONG_FLAG | CLIENT_CONNECT_WITH_DB | CLIENT_PROTOCOL_41
            | CLIENT_TRANSACTIONS | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH
            | CLIENT_DEPRECATE_EOF)
    auth = native_password(b"openbox-pw", scramble)
    resp = struct.pack("<IIB", caps, 1 << 24, 45) + b"\0" * 23
    resp += b"openbox\0" + bytes([len(auth)]) + auth + b"shop\0" + b"mysql_native_password\0"
    c.send(1, resp)
    _, ok = c.read_packet()
    fail_on_err(ok, "login")
    if ok[:1] != b"\0":
        sys.exit(f"client_mysql_raw_cursor: unexpected login answer {ok[:1].hex()}")

    c.send(0, b"\x16" + STATEMENT)
    _, prep = c.read_packet()
    fail_on_err(prep, "prepare")
    stmt_id, cols, params = struct.unpack_from("<IHH", prep, 1)
    for _ in range(cols + params):  # no EOFs after the definitions: DEPRECATE_EOF
        c.read_packet()

    c.send(0, b"\x17" + struct.pack("<IBI", stmt_id, 1, 1))  # CURSOR_TYPE_READ_ONLY
    _, first = c.read_packet()
    fail_on_err(first, "execute")
    for _ in range(first[0]):
        c.read_packet()
    _, opened = c.read_packet()
    if opened[:1] != b"\xfe" or not status_of_terminator(opened) & SERVER_STATUS_CURSOR_EXISTS:
        sys.exit(f"client_mysql_raw_cursor: no cursor opened: {opened.hex()}")

    fetched = []
    while True:
        c.send(0, b"\x1c" + struct.pack("<II", stmt_id, PREFETCH))
        n = 0
        while True:
            _, p = c.read_packet()
            fail_on_err(p, "fetch")
            if p[:1] == b"\xfe" and len(p) < 0xFFFFFF:
                status = status_of_terminator(p)
                break
            n += 1
        fetched.append(n)
        if status & SERVER_STATUS_LAST_ROW_SENT:
            break
    c.send(0, b"\x19" + struct.pack("<I", stmt_id))
    c.send(0, b"\x01")
    c.sock.close()
    with open(os.path.join(outdir, "result.json"), "w") as f:
        json.dump({"statement": STATEMENT.decode(), "deprecate_eof": True, "fetched": fetched,
                   "rows": sum(fetched)}, f)


if __name__ == "__main__":
    main()
