"""The server caps glibc's malloc arenas, fixes its mmap threshold and hands free pages back on a
timer (its memory stays flat over a long soak)."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lsp_server import memory
from lsp_server.memory import fix_mmap_threshold, limit_malloc_arenas


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_the_arena_cap_takes_effect_unless_the_user_set_one(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_the_mmap_threshold_is_fixed_unless_the_user_set_one(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert fix_mmap_threshold() is True
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_mmap_threshold() is False


# Blocks freed in the middle of a thread's arena: glibc keeps their pages until malloc_trim.
FRAGMENTED_HEAP = r"""
import ctypes, json, sys, threading
from lsp_server.memory import fix_mmap_threshold, limit_malloc_arenas, release_free_memory
limit_malloc_arenas(); fix_mmap_threshold()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def rss_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024

kept = []
def work():  # 80 MB in 16 KB blocks, every other one freed: no free block at the top to give back
    blocks = [libc.malloc(16384) for _ in range(5000)]
    for block in blocks:
        ctypes.memset(block, 1, 16384)
    for block in blocks[::2]:
        libc.free(block)
    kept.extend(blocks[1::2])
thread = threading.Thread(target=work)
thread.start(); thread.join()
before = rss_mb()
trimmed = release_free_memory()
print(json.dumps({"before": before, "after": rss_mb(), "trimmed": trimmed}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_free_pages_in_the_middle_of_an_arena_go_back_to_the_system():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("MALLOC_ARENA_MAX", None)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    done = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    # 40 MB were freed; without the trim none of it leaves (the arena's top block is in use).
    assert figures["trimmed"] and figures["before"] - figures["after"] > 25, figures


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_the_server_trims_on_a_timer_unless_turned_off(monkeypatch):
    calls = []
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: SimpleNamespace(malloc_trim=calls.append))
    stop = threading.Event()
    thread = memory.start_releasing_free_memory(0.01, stop)
    assert thread is not None and thread.daemon and thread.name == "parafill-malloc-trim"
    deadline = time.monotonic() + 10
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(10)
    assert calls[:3] == [0, 0, 0] and not thread.is_alive()
    monkeypatch.setenv("PARAFILL_TRIM_INTERVAL_S", "0")
    assert memory.trim_interval_s() == 0 and memory.start_releasing_free_memory() is None
    monkeypatch.setenv("PARAFILL_TRIM_INTERVAL_S", "often")
    assert memory.trim_interval_s() == 0
    monkeypatch.delenv("PARAFILL_TRIM_INTERVAL_S")
    assert memory.trim_interval_s() == memory.TRIM_INTERVAL_S
