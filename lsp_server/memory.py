"""Keep a long-running server's memory flat: fewer glibc malloc arenas.

glibc gives each thread that allocates its own arena (up to 8 per core), and
an arena keeps the pages of freed objects for reuse by its own threads. With a
pool of completion threads handling documents of up to 10 MB, the server's
resident memory kept climbing over a 10,000-operation soak (466 → 659 MB,
60 MB between the halves); with two arenas it ended at 491 MB (22 MB between
the halves), latency unchanged (bench/results/soak-10000-cpu.json). A user's own
MALLOC_ARENA_MAX wins; other C libraries are left alone.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_ARENA_MAX = -8  # glibc's mallopt parameter number
ARENAS = 2


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
