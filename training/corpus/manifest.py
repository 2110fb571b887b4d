"""The corpus manifest: which packages, at which version, under which licence.

``manifest.json`` is committed; the same manifest must give the same corpus.
Entries have ``name``, ``version``, ``licence`` and ``source`` (``pypi``,
``npm``, ``local-site-packages`` or ``local-stdlib``); registry entries also
pin the archive ``url`` and its ``sha256``.  ``validation_packages`` names the
packages held out whole for validation.  Loading validates all of this and
says what is wrong; nothing here touches the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .licences import PERMISSIVE_CLASSIFIERS, spdx_is_permissive

SOURCES = ("pypi", "npm", "local-site-packages", "local-stdlib")


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class PackageEntry:
    name: str
    version: str
    licence: str
    source: str
    url: str | None = None
    sha256: str | None = None

    @property
    def key(self) -> str:
        """Unique id across sources (npm and PyPI may share a name)."""
        return f"{self.source}:{self.name}"


@dataclass(frozen=True)
class Manifest:
    packages: tuple[PackageEntry, ...]
    validation_packages: frozenset[str]
    raw: dict = field(repr=False, compare=False, default_factory=dict)

    def is_validation(self, entry: PackageEntry) -> bool:
        return entry.name in self.validation_packages or entry.key in self.validation_packages


def licence_is_permissive(label: str) -> bool:
    return spdx_is_permissive(label) or label.lower() in PERMISSIVE_CLASSIFIERS


def parse_manifest(data: dict, *, where: str = "manifest") -> Manifest:
    if not isinstance(data, dict) or not isinstance(data.get("packages"), list):
        raise ManifestError(f"{where}: expected an object with a 'packages' list")
    entries = []
    keys = set()
    for i, item in enumerate(data["packages"]):
        missing = [k for k in ("name", "version", "licence", "source") if not item.get(k)]
        if missing:
            raise ManifestError(f"{where}: packages[{i}] lacks {', '.join(missing)}")
        entry = PackageEntry(
            name=item["name"], version=item["version"], licence=item["licence"],
            source=item["source"], url=item.get("url"), sha256=item.get("sha256"),
        )
        if entry.source not in SOURCES:
            raise ManifestError(f"{where}: {entry.name} has unknown source {entry.source!r}; use one of {SOURCES}")
        if entry.source in ("pypi", "npm") and not (entry.url and entry.sha256):
            raise ManifestError(f"{where}: {entry.name} ({entry.source}) must pin 'url' and 'sha256'")
        if not licence_is_permissive(entry.licence):
            raise ManifestError(f"{where}: {entry.name} licence {entry.licence!r} is not on the permissive list")
        if entry.key in keys:
            raise ManifestError(f"{where}: {entry.key} is listed twice")
        keys.add(entry.key)
        entries.append(entry)
    valid = frozenset(data.get("validation_packages", []))
    known = {e.name for e in entries} | keys
    unknown = sorted(valid - known)
    if unknown:
        raise ManifestError(f"{where}: validation_packages not in packages: {', '.join(unknown)}")
    return Manifest(tuple(entries), valid, data)


def dump_manifest(data: dict) -> str:
    """Manifest JSON with one package per line, so diffs show which pin changed."""
    lines = ["{"]
    for key, value in data.items():
        if key == "packages":
            continue
        lines.append(f" {json.dumps(key)}: {json.dumps(value)},")
    lines.append(' "packages": [')
    rows = [" " + json.dumps(p, ensure_ascii=False) for p in data["packages"]]
    lines.append(",\n".join(rows))
    lines.append(" ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    return parse_manifest(data, where=str(path))
