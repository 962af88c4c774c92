"""Functions the process-pool tests send to pool processes: importable by name, as a
spawned process needs (it cannot unpickle a function defined in a test method)."""

from __future__ import annotations

import os

from openbox_hook import _slots


def slot_now(_: object = None) -> tuple[int, int]:
    """(pid, the token the calling thread publishes now, 0 if none)."""
    slot = _slots.allocated()
    return os.getpid(), 0 if slot is None else _slots.table[slot]
