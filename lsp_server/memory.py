"""Keep a long-running server's memory flat: fewer glibc malloc arenas, a fixed mmap threshold.

glibc gives each thread that allocates its own arena (up to 8 per core), and
an arena keeps the pages of freed objects for reuse by its own threads. With a
pool of completion threads handling documents of up to 10 MB, the server's
resident memory kept climbing over a 10,000-operation soak (466 → 659 MB,
60 MB between the halves); with two arenas it ended at 491 MB (22 MB between
the halves), latency unchanged (bench/results/soak-10000-cpu.json). A user's own
MALLOC_ARENA_MAX wins; other C libraries are left alone.

glibc also raises its mmap threshold to the size of each large block freed (up
to 32 MB): after the editor sends one 10 MB document, every buffer below 10 MB
(tensors, message bodies, document text) comes from the heap instead of its own
mapping, and the heap keeps what it once held. Between operations 2,000 and
6,000 of a soak (the default model on the 2-core CPU) the memory glibc held free
grew 134 → 214 MB and the server's RSS 677 → 761 MB; with the threshold fixed at
glibc's own starting value, 128 KiB, large buffers go back to the system when
freed: 8 → 9 MB held free, RSS 547 → 553 MB. A user's own MALLOC_MMAP_THRESHOLD_
wins.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_ARENA_MAX = -8  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
ARENAS = 2
MMAP_THRESHOLD = 128 << 10


def limit_malloc_arenas() -> bool:
    """Cap glibc's malloc arenas, before threads start; True if the cap is in force."""
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        # The symbols Python itself is linked with (its C library): no lookup that
        # would start `ldconfig` or open files.
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_ARENA_MAX, ARENAS))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold (setting it stops glibc from raising it); True if in force."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc
        return False
