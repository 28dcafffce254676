"""Giving memory back to the system between jobs.

Why a replica's RSS between jobs climbed with work: a job allocates hundreds of MB of NumPy and
torch buffers from several threads (the event loop's thread pool, torch's intra-op threads,
the DICOM readers). glibc's malloc serves each thread from an arena of its own and keeps what is
freed inside the arena for reuse; large blocks come back to the system only when they sit at the
top of a heap, so a heap fragmented by a job's many buffers keeps its freed pages resident. Each
new job shape reuses some of that and adds more: idle RSS ratchets up (measured in the README's
chaos table: the memory scenario with and without trimming).

`trim()` asks glibc to return every free page it holds (malloc_trim), in all arenas; it runs
after a job when no other job is running. On a C library without malloc_trim (musl) it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging

log = logging.getLogger(__name__)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        return None
    return libc


def settle() -> None:
    """Once the models are loaded: what start-up made (modules, networks, configs) goes out of the
    collector's sight (gc.freeze), so the collection after each job walks that job's objects only:
    ~2 ms instead of ~170 ms of a held GIL, which delayed every job's final event and slowed a
    burst of jobs (0.81 of the inference rate instead of 0.9-1.05)."""
    gc.collect()
    gc.freeze()


def trim() -> bool:
    """Collect what a job left in reference cycles, then return free heap pages to the system;
    True when some were. A cycle holding a job's frames keeps its scan-sized arrays alive until
    the collector's oldest generation runs, which may be jobs later (a replica was seen keeping
    ~700 MB after a 512x512x300 job); after `settle`, a full collection takes milliseconds."""
    gc.collect()
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))
