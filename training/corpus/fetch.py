"""Download and pin registry archives: the only networked code in parafill.

``pin_pypi``/``pin_npm`` ask PyPI's JSON API or the npm registry for one
package version, check its licence, download the archive and return a
manifest entry with the archive URL and SHA-256.  ``download`` fetches a
pinned archive into the cache directory and refuses it when the SHA-256
differs.  Only the corpus builder's command line imports this module; the
language server never does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.parse
import urllib.request
from pathlib import Path

from .licences import classify
from .manifest import PackageEntry

PYPI = "https://pypi.org/pypi"
NPM = "https://registry.npmjs.org"
TIMEOUT_S = 60
USER_AGENT = "parafill-corpus-builder/0.1"


class FetchError(RuntimeError):
    pass


def _get(url: str) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return resp.read()
    except Exception as exc:
        raise FetchError(f"GET {url} failed: {exc}") from exc


def cache_path(downloads: Path, entry: PackageEntry) -> Path:
    name = Path(urllib.parse.urlparse(entry.url or "").path).name or f"{entry.name}-{entry.version}"
    sub = "npm" if entry.source == "npm" else "pypi"
    return downloads / sub / name.replace("/", "_")


def download(entry: PackageEntry, downloads: Path) -> Path:
    """Path of the verified archive in the cache, downloading it if needed."""
    target = cache_path(downloads, entry)
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == entry.sha256:
        return target
    data = _get(entry.url)
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise FetchError(
            f"{entry.name} {entry.version}: {entry.url} has sha256 {digest}, manifest pins "
            f"{entry.sha256}; the archive changed upstream or the manifest is wrong"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


def pin_pypi(name: str, version: str | None, downloads: Path) -> dict:
    """Manifest entry (dict) for a PyPI sdist; raises FetchError if unusable."""
    meta_url = f"{PYPI}/{urllib.parse.quote(name)}/json"
    meta = json.loads(_get(meta_url))
    info = meta["info"]
    version = version or info["version"]
    files = meta.get("releases", {}).get(version)
    if files is None:
        raise FetchError(f"{name}: version {version} not on PyPI")
    # The project-level info describes the latest release; use it only for that.
    if version != info["version"]:
        info = json.loads(_get(f"{PYPI}/{urllib.parse.quote(name)}/{version}/json"))["info"]
    licence = classify(info.get("license_expression"), info.get("license"), info.get("classifiers") or [])
    if licence is None:
        raise FetchError(f"{name} {version}: licence not permissive or unknown "
                         f"({info.get('license_expression') or (info.get('license') or '')[:60]!r})")
    sdists = [f for f in files if f["packagetype"] == "sdist" and not f.get("yanked")]
    if not sdists:
        raise FetchError(f"{name} {version}: no sdist")
    sdist = sdists[0]
    entry = {
        "name": info["name"], "version": version, "licence": licence, "source": "pypi",
        "url": urllib.parse.urljoin(meta_url, sdist["url"]), "sha256": sdist["digests"]["sha256"], "size": sdist["size"],
    }
    download(PackageEntry(**{k: entry[k] for k in ("name", "version", "licence", "source", "url", "sha256")}),
             downloads)
    return entry


def pin_npm(name: str, version: str | None, downloads: Path) -> dict:
    """Manifest entry (dict) for an npm tarball, integrity-checked."""
    quoted = urllib.parse.quote(name, safe="@")
    meta = json.loads(_get(f"{NPM}/{quoted}/{version or 'latest'}"))
    lic = meta.get("license")
    if isinstance(lic, dict):
        lic = lic.get("type")
    licence = classify(lic, None, ()) if isinstance(lic, str) else None
    if licence is None:
        raise FetchError(f"npm {name}: licence {lic!r} not permissive or unknown")
    dist = meta["dist"]
    tarball = urllib.parse.urljoin(f"{NPM}/{quoted}/", dist["tarball"])
    data = _get(tarball)
    integrity = dist.get("integrity", "")
    if integrity.startswith("sha512-"):
        if base64.b64encode(hashlib.sha512(data).digest()).decode() != integrity[7:]:
            raise FetchError(f"npm {name}: tarball fails its sha512 integrity check")
    elif hashlib.sha1(data).hexdigest() != dist.get("shasum"):
        raise FetchError(f"npm {name}: tarball fails its sha1 shasum check")
    entry = {
        "name": meta["name"], "version": meta["version"], "licence": licence, "source": "npm",
        "url": tarball, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
        "integrity": integrity,
    }
    target = cache_path(downloads, PackageEntry(entry["name"], entry["version"], licence, "npm", entry["url"], entry["sha256"]))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return entry
