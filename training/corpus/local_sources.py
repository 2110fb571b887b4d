"""Corpus sources already on this machine: installed distributions and the stdlib.

``site_packages_files`` lists a distribution's source files from its
dist-info RECORD; ``stdlib_files`` walks the interpreter's standard library
(without site-packages).  Licences come from the distribution metadata and
are checked with ``licences.classify``.  These sources need no network, so a
first corpus can be built in minutes; they are pinned by version only.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
import sysconfig
from pathlib import Path, PurePosixPath
from typing import Iterator

from fim.code_files import language_of
from .licences import classify


class SourceMismatch(RuntimeError):
    """The installed package differs from what the manifest pins."""


def default_site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def default_stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def find_distribution(name: str, site_packages: Path) -> md.Distribution:
    wanted = name.lower().replace("_", "-")
    for dist in md.distributions(path=[str(site_packages)]):
        dname = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if dname == wanted:
            return dist
    raise SourceMismatch(f"{name} is not installed in {site_packages}")


def distribution_licence(dist: md.Distribution) -> str | None:
    meta = dist.metadata
    return classify(
        meta.get("License-Expression"), meta.get("License"), meta.get_all("Classifier") or []
    )


def site_packages_files(name: str, version: str, site_packages: Path) -> Iterator[tuple[str, bytes]]:
    """Source files of an installed distribution, sorted by path."""
    dist = find_distribution(name, site_packages)
    if dist.version != version:
        raise SourceMismatch(
            f"{name}: manifest pins {version} but {dist.version} is installed in {site_packages}"
        )
    rels = sorted(
        {str(PurePosixPath(str(f))) for f in (dist.files or [])
         if ".." not in PurePosixPath(str(f)).parts and language_of(str(f)) is not None}
    )
    for rel in rels:
        full = site_packages / rel
        if full.is_file():
            yield rel, full.read_bytes()


def stdlib_files(version: str, stdlib: Path) -> Iterator[tuple[str, bytes]]:
    """Source files of the standard library, sorted by path."""
    actual = "%d.%d.%d" % sys.version_info[:3]
    if stdlib == default_stdlib() and actual != version:
        raise SourceMismatch(f"python-stdlib: manifest pins {version} but this is Python {actual}")
    rels: list[str] = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        for fname in files:
            rel = Path(root, fname).relative_to(stdlib).as_posix()
            if language_of(rel) is not None:
                rels.append(rel)
    for rel in sorted(rels):
        yield rel, (stdlib / rel).read_bytes()
