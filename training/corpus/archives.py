"""Read source files out of downloaded sdists and npm tarballs.

Yields ``(path_inside_package, bytes)`` with the archive's top-level folder
(``name-1.2.3/`` or npm's ``package/``) removed, in sorted path order.  Links,
devices and absolute or parent-escaping paths are skipped; nothing is
written to disk.
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from fim.code_files import MAX_FILE_BYTES, language_of


def _inner_path(name: str) -> str | None:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or len(p.parts) < 2:
        return None
    return str(PurePosixPath(*p.parts[1:]))


def iter_archive(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """Source files of a .tar.gz/.tgz/.tar.bz2/.zip archive, sorted by path.

    Files over twice the corpus size limit are yielded as a marker-sized
    prefix so the filters still count them as too large without reading
    megabytes of data.
    """
    path = Path(path)
    items: list[tuple[str, bytes]] = []
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                inner = _inner_path(info.filename)
                if inner is None or language_of(inner) is None:
                    continue
                if info.file_size > MAX_FILE_BYTES:
                    items.append((inner, b"\0" * (MAX_FILE_BYTES + 1)))
                    continue
                items.append((inner, zf.read(info)))
    else:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                inner = _inner_path(member.name)
                if inner is None or language_of(inner) is None:
                    continue
                if member.size > MAX_FILE_BYTES:
                    items.append((inner, b"\0" * (MAX_FILE_BYTES + 1)))
                    continue
                fh = tf.extractfile(member)
                if fh is not None:
                    items.append((inner, fh.read()))
    # Archives may list a path twice; keep the last, as extraction would.
    return iter(sorted(dict(items).items()))
