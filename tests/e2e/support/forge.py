"""Tries to register with the agent on behalf of someone else.

Usage: forge.py SOCKET VICTIM_PID

Speaks the hook protocol (one JSON object a line; requests `{"id", "op", ...}`, replies
`{"id", "ok", "error"?}`) on fresh connections to the agent's socket:
  forged_pid  hello claiming VICTIM_PID (another process)        -> must be refused
  pid_one     hello claiming pid 1                                -> must be refused
  own_hello   hello with this process's own pid                   -> accepted
  own_thread  then `thread` with this process's own native tid    -> accepted
  foreign_tid then `thread` with VICTIM_PID's main thread's tid   -> must be refused
Prints `{"<step>": reply or null (no reply: connection closed), ...}` on stdout.
"""

import ctypes
import json
import mmap
import os
import socket
import sys
import threading

SLOTS = 64
# A slot table like the hook's (hooks/python/openbox_hook/_slots.py): SLOTS u64 slots in
# a private anonymous mapping, all 0 (no activity).
_map = mmap.mmap(-1, 8 * SLOTS, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
slot_memory = ctypes.c_char.from_buffer(_map)


class Conn:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.next_id = 1

    def ask(self, op, **fields):
        request = {"id": self.next_id, "op": op, **fields}
        self.next_id += 1
        try:
            self.sock.sendall(json.dumps(request).encode() + b"\n")
            line = self.file.readline()
        except OSError as e:
            return {"closed": repr(e)}
        if not line:
            return None
        return json.loads(line)

    def close(self):
        self.sock.close()


def hello(conn, pid):
    return conn.ask("hello", pid=pid, hook="openbox-e2e-forge", slots_addr=ctypes.addressof(slot_memory),
                    slots=SLOTS, config={})


def main():
    path, victim = sys.argv[1], int(sys.argv[2])
    out = {}
    c = Conn(path)
    out["forged_pid"] = hello(c, victim)
    c.close()
    c = Conn(path)
    out["pid_one"] = hello(c, 1)
    c.close()
    c = Conn(path)
    out["own_hello"] = hello(c, os.getpid())
    out["own_thread"] = c.ask("thread", tid=threading.get_native_id(), slot=0)
    out["foreign_tid"] = c.ask("thread", tid=victim, slot=1)
    c.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
