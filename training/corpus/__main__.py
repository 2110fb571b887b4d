"""Command line of the corpus builder.

    python -m training.corpus build --manifest training/corpus/manifest.json --out data/corpus
    python -m training.corpus pin --manifest M --pypi requests==2.32.5 --npm zod@3.23.8
    python -m training.corpus pin-local --manifest M
    python -m training.corpus shard --corpus data/corpus --out data/shards --max-mb 40

``build`` downloads (into --downloads, verified by SHA-256) only when the
manifest has registry entries.  ``pin`` asks the registries and records
licence, URL and SHA-256 in the manifest; ``pin-local`` records the
permissive distributions installed next to this interpreter and its stdlib.
``shard`` cuts the train split into files small enough to copy in pieces.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from .archives import iter_archive
from .builder import select_records, write_corpus
from .decontaminate import Decontaminator, load_patterns
from .local_sources import (
    default_site_packages,
    default_stdlib,
    distribution_licence,
    site_packages_files,
    stdlib_files,
)
from .manifest import ManifestError, PackageEntry, dump_manifest, load_manifest

DEFAULT_HUMANEVAL = str(Path(__file__).resolve().parents[2] / "eval" / "human-eval-infilling")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _files_for(args):
    site_packages = Path(args.site_packages) if args.site_packages else default_site_packages()
    stdlib = Path(args.stdlib) if args.stdlib else default_stdlib()
    downloads = Path(args.downloads)

    def files_for(entry: PackageEntry):
        if entry.source == "local-stdlib":
            return stdlib_files(entry.version, stdlib)
        if entry.source == "local-site-packages":
            return site_packages_files(entry.name, entry.version, site_packages)
        from .fetch import download  # networked code only when the manifest needs it
        return iter_archive(download(entry, downloads))

    return files_for


def cmd_build(args) -> int:
    manifest = load_manifest(args.manifest)
    manifest_sha = hashlib.sha256(Path(args.manifest).read_bytes()).hexdigest()
    decon = None
    if not args.no_decontaminate:
        patterns = load_patterns(args.humaneval)
        _log(f"decontamination: {len(patterns)} HumanEval patterns from {args.humaneval}")
        decon = Decontaminator(patterns)
    t0 = time.monotonic()
    result = select_records(manifest, _files_for(args), decon, near_threshold=args.near_threshold,
                            log=_log, skip_failed=args.skip_failed)
    stats = write_corpus(Path(args.out), result, manifest_sha)
    _log(f"train: {stats['train']['files']} files {stats['train']['bytes'] / 1e6:.1f} MB; "
         f"valid: {stats['valid']['files']} files {stats['valid']['bytes'] / 1e6:.1f} MB; "
         f"dropped {sum(stats['dropped'].values())}; {time.monotonic() - t0:.0f}s")
    print(stats["corpus_sha256"])
    return 0


def cmd_shard(args) -> int:
    from .shards import write_shards

    shards = write_shards(Path(args.corpus), Path(args.out), int(args.max_mb * 2**20))
    for path in shards:
        _log(f"{path}: {path.stat().st_size / 2**20:.1f} MiB")
    return 0


def _update_manifest(path: Path, new_entries: list[dict], validation: list[str]) -> None:
    data = json.loads(path.read_text()) if path.exists() else {"packages": [], "validation_packages": []}
    by_key = {f"{e['source']}:{e['name']}": e for e in data["packages"]}
    for e in new_entries:
        by_key[f"{e['source']}:{e['name']}"] = e
    data["packages"] = sorted(by_key.values(), key=lambda e: (e["source"], e["name"].lower()))
    data["validation_packages"] = sorted(set(data.get("validation_packages", [])) | set(validation))
    path.write_text(dump_manifest(data))


def cmd_pin(args) -> int:
    from .fetch import FetchError, pin_npm, pin_pypi
    downloads = Path(args.downloads)
    entries, failures = [], []
    for spec in args.pypi or []:
        name, _, version = spec.partition("==")
        try:
            entries.append(pin_pypi(name, version or None, downloads))
            _log(f"pinned pypi {entries[-1]['name']} {entries[-1]['version']} ({entries[-1]['licence']})")
        except (FetchError, KeyError, ValueError) as exc:
            failures.append(f"pypi {spec}: {exc}")
            _log(f"skip pypi {spec}: {exc}")
    for spec in args.npm or []:
        at = spec.rfind("@")
        name, version = (spec[:at], spec[at + 1:]) if at > 0 else (spec, None)
        try:
            entries.append(pin_npm(name, version, downloads))
            _log(f"pinned npm {entries[-1]['name']} {entries[-1]['version']} ({entries[-1]['licence']})")
        except (FetchError, KeyError, ValueError) as exc:
            failures.append(f"npm {spec}: {exc}")
            _log(f"skip npm {spec}: {exc}")
    _update_manifest(Path(args.manifest), entries, [])
    for f in failures:
        _log(f"SKIPPED {f}")
    return 0


def cmd_pin_local(args) -> int:
    import importlib.metadata as md
    site_packages = Path(args.site_packages) if args.site_packages else default_site_packages()
    entries = []
    exclude = {n.lower() for n in args.exclude or []}
    for dist in sorted(md.distributions(path=[str(site_packages)]), key=lambda d: d.metadata["Name"].lower()):
        name = dist.metadata["Name"]
        if name.lower() in exclude:
            continue
        licence = distribution_licence(dist)
        if licence is None:
            _log(f"skip {name}: licence not permissive or unknown")
            continue
        entries.append({"name": name, "version": dist.version, "licence": licence,
                        "source": "local-site-packages"})
    if not args.no_stdlib:
        ver = "%d.%d.%d" % sys.version_info[:3]
        entries.append({"name": "python-stdlib", "version": ver, "licence": "PSF-2.0",
                        "source": "local-stdlib"})
    _update_manifest(Path(args.manifest), entries, args.validation or [])
    _log(f"recorded {len(entries)} local packages in {args.manifest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--manifest", default="training/corpus/manifest.json")
    common.add_argument("--downloads", default="data/downloads", help="archive cache directory")
    common.add_argument("--site-packages", help="site-packages for local-site-packages entries")
    common.add_argument("--stdlib", help="standard library directory for the local-stdlib entry")

    b = sub.add_parser("build", parents=[common], help="build the corpus")
    b.add_argument("--out", default="data/corpus")
    b.add_argument("--humaneval", default=DEFAULT_HUMANEVAL, help="human-eval-infilling data directory")
    b.add_argument("--no-decontaminate", action="store_true", help="skip HumanEval decontamination (tests only)")
    b.add_argument("--near-threshold", type=float, default=0.85, help="MinHash Jaccard for near duplicates")
    b.add_argument("--skip-failed", action="store_true", help="record and skip packages that fail to download")
    b.set_defaults(func=cmd_build)

    p = sub.add_parser("pin", parents=[common], help="pin registry packages into the manifest")
    p.add_argument("--pypi", nargs="*", help="NAME or NAME==VERSION")
    p.add_argument("--npm", nargs="*", help="NAME or NAME@VERSION")
    p.set_defaults(func=cmd_pin)

    pl = sub.add_parser("pin-local", parents=[common], help="pin installed permissive distributions")
    pl.add_argument("--exclude", nargs="*")
    pl.add_argument("--validation", nargs="*", help="package names to hold out for validation")
    pl.add_argument("--no-stdlib", action="store_true")
    pl.set_defaults(func=cmd_pin_local)

    sh = sub.add_parser("shard", help="cut the train split into compressed shards of at most --max-mb")
    sh.add_argument("--corpus", default="data/corpus", help="a built corpus folder")
    sh.add_argument("--out", required=True, help="folder for train-NNN.jsonl.gz, valid.jsonl.gz, stats.json")
    sh.add_argument("--max-mb", type=float, default=40.0, help="MiB per shard (default 40)")
    sh.set_defaults(func=cmd_shard)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ManifestError, FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
