"""Exact and near-duplicate detection for corpus files.

Exact: SHA-256 of the text with line endings unified, trailing whitespace
stripped and blank lines at the ends removed.

Near: MinHash over 5-token shingles with locality-sensitive hashing
(16 bands x 8 rows = 128 permutations), candidates confirmed when the
estimated Jaccard similarity reaches the threshold (0.85 by default).
The first file offered wins, so callers decide priority by order.
All hashing is deterministic across processes (no Python ``hash``).
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

_TOKEN = re.compile(r"\w+|[^\w\s]")
SHINGLE = 5
NUM_PERM = 128
BANDS = 16
ROWS = NUM_PERM // BANDS
_MASK64 = (1 << 64) - 1


def exact_key(text: str) -> str:
    """Hash of text normalised for exact-duplicate detection."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return hashlib.sha256("\n".join(lines).strip("\n").encode("utf-8")).hexdigest()


def _permutations() -> tuple[np.ndarray, np.ndarray]:
    # Fixed seed: the same text always gets the same signature.
    rng = np.random.Generator(np.random.PCG64(20261122))
    a = rng.integers(1, 2**63, size=NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=NUM_PERM, dtype=np.uint64)
    return a, b


_A, _B = _permutations()
_SHINGLE_MULT = np.array(
    [pow(0x100000001B3, SHINGLE - 1 - k, 1 << 64) for k in range(SHINGLE)], dtype=np.uint64
)


def shingle_hashes(text: str) -> np.ndarray:
    """Unique 64-bit hashes of the text's 5-token shingles."""
    tokens = _TOKEN.findall(text)
    if not tokens:
        return np.zeros(0, dtype=np.uint64)
    tok = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in tokens), dtype=np.uint64, count=len(tokens))
    if len(tok) < SHINGLE:
        return np.unique(tok)
    n = len(tok) - SHINGLE + 1
    acc = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(SHINGLE):
            acc += tok[k : k + n] * _SHINGLE_MULT[k]
    return np.unique(acc)


def minhash(text: str) -> np.ndarray:
    """128-value MinHash signature (uint64) of the text."""
    shingles = shingle_hashes(text)
    if len(shingles) == 0:
        return np.full(NUM_PERM, np.iinfo(np.uint64).max, dtype=np.uint64)
    sig = np.empty(NUM_PERM, dtype=np.uint64)
    # Chunk the permutations so a 200 KB file stays well under 100 MB of temporaries.
    step = max(1, 2_000_000 // len(shingles))
    with np.errstate(over="ignore"):
        for lo in range(0, NUM_PERM, step):
            hi = min(NUM_PERM, lo + step)
            vals = shingles[None, :] * _A[lo:hi, None] + _B[lo:hi, None]
            sig[lo:hi] = vals.min(axis=1)
    return sig


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def exact_jaccard(a: str, b: str) -> float:
    """Jaccard similarity of the two texts' shingle sets (for tests and checks)."""
    sa, sb = set(shingle_hashes(a).tolist()), set(shingle_hashes(b).tolist())
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


class Deduplicator:
    """Stateful filter: ``check(text)`` returns None for a new file, else a reason."""

    def __init__(self, threshold: float = 0.85):
        self.threshold = threshold
        self._exact: set[str] = set()
        self._bands: list[dict[bytes, list[int]]] = [dict() for _ in range(BANDS)]
        self._signatures: list[np.ndarray] = []

    def check(self, text: str) -> str | None:
        key = exact_key(text)
        if key in self._exact:
            return "exact_duplicate"
        sig = minhash(text)
        band_keys = [sig[i * ROWS : (i + 1) * ROWS].tobytes() for i in range(BANDS)]
        seen: set[int] = set()
        for band, bkey in zip(self._bands, band_keys):
            for other in band.get(bkey, ()):
                if other in seen:
                    continue
                seen.add(other)
                if estimated_jaccard(sig, self._signatures[other]) >= self.threshold:
                    return "near_duplicate"
        self._exact.add(key)
        index = len(self._signatures)
        self._signatures.append(sig)
        for band, bkey in zip(self._bands, band_keys):
            band.setdefault(bkey, []).append(index)
        return None
