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

Small blocks freed in the middle of an arena stay with the process: glibc gives
back only the top of the main heap by itself. Several completions on big
documents at once left the completion threads' arena at 160 MB with 33 MB of it
free (a 2,000-operation stretch of the mixed soak), and a 50,000-operation soak
sat at 706 MB from operation 2,500 to 15,000 before falling to 564 MB. So a
thread hands the free pages of every arena back (malloc_trim) every
`TRIM_INTERVAL_S` seconds: a few milliseconds each time. PARAFILL_TRIM_INTERVAL_S
changes the interval (0 turns it off).
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading

M_ARENA_MAX = -8  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
ARENAS = 2
MMAP_THRESHOLD = 128 << 10
TRIM_INTERVAL_S = 10.0


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


def release_free_memory() -> bool:
    """Hand the free pages of every glibc malloc arena back to the system; True if glibc did."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


def trim_interval_s() -> float:
    """PARAFILL_TRIM_INTERVAL_S, else `TRIM_INTERVAL_S`; 0 (or a value that is no number) turns trimming off."""
    raw = os.environ.get("PARAFILL_TRIM_INTERVAL_S")
    if raw is None:
        return TRIM_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        return 0.0
    return value if value > 0 else 0.0


def start_releasing_free_memory(interval_s: float | None = None,
                                stop: threading.Event | None = None) -> threading.Thread | None:
    """A daemon thread that calls `release_free_memory` every `interval_s` seconds (default
    `trim_interval_s()`) until `stop` is set (the server never sets it); None where there
    is no glibc or the interval is 0."""
    interval_s = trim_interval_s() if interval_s is None else interval_s
    if interval_s <= 0 or not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None

    stop = stop or threading.Event()

    def run() -> None:
        while not stop.wait(interval_s):
            trim(0)

    thread = threading.Thread(target=run, name="parafill-malloc-trim", daemon=True)
    thread.start()
    return thread
