"""The slot table: where each worker thread publishes the activity it runs right now.

One anonymous private mapping per process holds ``SLOTS`` unsigned 64-bit slots. A thread
that runs activity code gets one slot index (once, for its whole life) and tells the agent
"thread <tid> uses slot <i>"; from then on it writes the running activity's token into
``table[i]`` (0 = no activity). The eBPF program reads that u64 from this process's memory
at every syscall of the thread, so a store here is all attribution costs at run time.

The mapping is private and anonymous on purpose: the kernel reads it through the
process's own address space (``bpf_probe_read_user``), so it needs no file, no sharing and
no cleanup; a forked child gets its own copy-on-write copy.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading

SLOTS = 1024
"""Number of u64 slots, so of threads that can ever carry attribution in one process."""

_map = mmap.mmap(-1, 8 * SLOTS, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)

table = memoryview(_map).cast("Q")
"""The slots. Page-aligned, so every 8-byte store is a single aligned store the kernel
never sees half-written."""

# Fault every page in now: the kernel reads the slots where it cannot take a page fault
# (a syscall tracepoint), so an untouched page would read as a failure, not as zero.
for _i in range(0, SLOTS, mmap.PAGESIZE // 8):
    table[_i] = 0

# The agent needs the user address of slot 0. ctypes exports the buffer's address; the
# exported object is kept for the life of the process, which also pins the mapping.
_exported = ctypes.c_char.from_buffer(_map)
address: int = ctypes.addressof(_exported)

_log = logging.getLogger("openbox.hook")
_lock = threading.Lock()
_next = 0
_exhausted_warned = False
_local = threading.local()


def _after_fork_in_child() -> None:
    # Another thread of the parent may have held the lock at the fork: it is never
    # released in the child. The forking thread keeps its slot (the table is copied).
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def allocated() -> int | None:
    """Slot index of the calling thread if it has one; never allocates."""
    return getattr(_local, "slot", None)


def current() -> int | None:
    """Slot index of the calling thread, allocated on first use; None once all are taken.

    Slots are never given back: a thread id can be reused by the kernel after a thread
    dies, and a recycled slot could then be read on behalf of the wrong thread. Worker
    threads (the event loop, the activity executor's pool) live as long as the worker.
    """
    try:
        return _local.slot
    except AttributeError:
        pass
    global _next, _exhausted_warned
    with _lock:
        if _next < SLOTS:
            slot: int | None = _next
            _next += 1
        else:
            slot = None
            if not _exhausted_warned:
                _exhausted_warned = True
                _log.warning(
                    "openbox hook: all %d thread slots are taken; activities on further "
                    "threads run without attribution",
                    SLOTS,
                )
    _local.slot = slot
    return slot
