"""`parafill model list | pull NAME | info NAME | rm NAME`: open diffusion models by name.

NAME is a catalogue name (`parafill model list`) or `hf:ORG/NAME[@REVISION]` for
any Hugging Face repository of a supported family. Models live in the standard
Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub), shared with other tools.

- `list`: the catalogue, and which entries are already in the cache.
- `pull`: downloads into the cache, every file checked (tools/hub_download.py);
  the only parafill command that opens a network connection.
- `info`: a catalogue entry and whether (and where) it is in the cache.
- `rm`: removes a model's repository (every revision) from the cache.

Exit codes: 0 done, 1 the pull or removal failed, 2 a name or option is wrong.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from denoiser.catalogue import (CATALOGUE, LAYOUTS, QUALITY_SOURCE, ModelNameError, ModelRef, family_of_config,
                                parse_model_name)
from denoiser.hub_cache import folder_bytes, hub_cache_dir, repo_folder, snapshot_of

EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    pass


def hub_page(repo_id: str) -> str:
    return f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{repo_id}"


def size_text(n: float) -> str:
    from tools.hub_download import human_size

    return human_size(n)


def name_ref(text: str) -> ModelRef:
    try:
        ref = parse_model_name(text)
    except ModelNameError as exc:
        raise UsageError(str(exc)) from None
    if ref is None:
        raise UsageError(f"{text!r} is not a model name: use one of `parafill model list` "
                         "or hf:ORG/NAME[@REVISION]")
    return ref


def cached_family(snapshot: Path) -> str | None:
    try:
        return family_of_config(json.loads((snapshot / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError):
        return None


def run_list(args: argparse.Namespace) -> int:
    cache = hub_cache_dir()
    rows = [("NAME", "FAMILY", "PARAMS", "DOWNLOAD", "LICENCE", "HE-INFILL", "IN CACHE")]
    for entry in CATALOGUE:
        ref = parse_model_name(entry.name)
        infill = f"{entry.humaneval_infill:.1f}%" if entry.humaneval_infill is not None else "-"
        rows.append((entry.name, entry.family, f"{entry.parameters_b:g}B", f"{entry.disk_gb:g} GB", entry.licence,
                     infill, "yes" if snapshot_of(ref, cache) else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    known = {entry.repo_id.lower() for entry in CATALOGUE}
    others = []
    for folder in sorted(cache.glob("models--*--*")) if cache.is_dir() else []:
        repo_id = folder.name[len("models--"):].replace("--", "/", 1)
        ref = ModelRef(f"hf:{repo_id}", repo_id, "main")
        snapshot = snapshot_of(ref, cache)
        if repo_id.lower() not in known and snapshot is not None and cached_family(snapshot):
            others.append(f"  hf:{repo_id}  ({cached_family(snapshot)}, {size_text(folder_bytes(folder))})")
    if others:
        print("\nAlso in the cache:")
        print("\n".join(others))
    print(f"\nHE-INFILL: HumanEval-infilling pass@1, fixed length; source: {QUALITY_SOURCE}")
    print(f"Cache: {cache}. Any hf:ORG/NAME[@REVISION] of these families works too: `parafill model pull hf:ORG/NAME`.")
    return 0


def run_info(args: argparse.Namespace) -> int:
    ref = name_ref(args.name)
    entry = ref.entry
    lines = [f"{ref.text}: {entry.summary}" if entry else f"{ref.text}: not in parafill's catalogue"]
    lines.append(f"  repository  {ref.repo_id} @ {ref.revision}  ({hub_page(ref.repo_id)})")
    if entry:
        lines.append(f"  family      {entry.family}; prompt layout: {entry.layout}")
        lines.append(f"  size        {entry.parameters_b:g} B parameters; download about {entry.disk_gb:g} GB")
        lines.append(f"  licence     {entry.licence} (the model card's; `pull` shows the hub's current one)")
        if entry.humaneval_infill is not None:
            lines.append(f"  quality     HumanEval-infilling {entry.humaneval_infill:.1f}% pass@1, fixed length "
                         f"({QUALITY_SOURCE})")
    snapshot = snapshot_of(ref)
    if snapshot is None:
        lines.append(f"  in cache    no (looked in {hub_cache_dir()}); `{ref.pull_command}` downloads it")
    else:
        family = cached_family(snapshot) or "unknown family"
        if not entry:
            lines.append(f"  family      {family}; prompt layout: {LAYOUTS.get(family, '-')}")
        lines.append(f"  in cache    yes: {snapshot} ({size_text(folder_bytes(repo_folder(ref.repo_id)))}); "
                     f"use it with --model {ref.text}")
    print("\n".join(lines))
    return 0


def run_rm(args: argparse.Namespace) -> int:
    ref = name_ref(args.name)
    cache = hub_cache_dir()
    folder = repo_folder(ref.repo_id, cache)
    if not folder.exists():
        print(f"parafill: {ref.text} is not in the cache ({folder} does not exist); nothing removed", file=sys.stderr)
        return EXIT_FAILED
    freed = folder_bytes(folder)
    shutil.rmtree(folder)
    shutil.rmtree(cache / ".locks" / folder.name, ignore_errors=True)
    print(f"parafill: removed {ref.repo_id} (every revision) from {cache}, {size_text(freed)} freed")
    return 0


def run_pull(args: argparse.Namespace) -> int:
    from tools.hub_download import PullError, pull

    ref = name_ref(args.name)
    try:
        snapshot = pull(ref)
    except PullError as exc:
        print(f"parafill: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"parafill: interrupted; the files already checked are kept, run `{ref.pull_command}` to continue",
              file=sys.stderr)
        return 130
    print(f"{ref.text} is ready: use --model {ref.text} (or the `model` setting); files in {snapshot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parafill model", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    commands.add_parser("list", help="the models parafill knows by name, and which are downloaded")
    for name, summary in (("pull", "download a model into the Hugging Face cache (uses the network)"),
                          ("info", "show a model's details and whether it is downloaded"),
                          ("rm", "remove a model from the Hugging Face cache")):
        sub = commands.add_parser(name, help=summary)
        sub.add_argument("name", metavar="NAME", help="a name from `parafill model list`, or hf:ORG/NAME[@REVISION]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    run = {"list": run_list, "pull": run_pull, "info": run_info, "rm": run_rm}[args.command]
    try:
        return run(args)
    except UsageError as exc:
        print(f"parafill: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
