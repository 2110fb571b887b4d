"""`parafill adapt REPO_DIR`: teach the embedded model one repository, on this machine's CPU.

Reads the repository's code as a user would expect (`fim.repo_files`: its
.gitignore honoured; vendored, generated, minified, binary and huge files
skipped), keeps a fifth of its files aside, and trains a copy of the base
model on the rest (`training.adapt`). Every so often it scores the held-out
files' training loss, keeps the weights where it was lowest, and stops early
when it stops falling. Then it completes rest-of-line cuts of the held-out files
through the server's own suggestion path (`lsp_server.suggest`, gate off) with
the base model and with the kept weights: the adapted copy goes to the user's
cache (`denoiser.adapted`), never into the repository, and only when it
completes more of them exactly. Nothing is sent anywhere.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HELD_OUT_SHARE = 5  # one file in five is kept aside, chosen by a hash of its path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parafill adapt", description=__doc__.split("\n\n")[0])
    p.add_argument("repo", metavar="REPO_DIR", help="the repository's root folder")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget (default 10)")
    p.add_argument("--out", default=None, help="write the adapted model here instead of the user's cache")
    p.add_argument("--model", default=None, help="base model directory (default: the embedded model)")
    p.add_argument("--remove", action="store_true", help="forget the adapted model of REPO_DIR")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: every core)")
    p.add_argument("--checks", type=int, default=200,
                   help="held-out rest-of-line cuts completed before and after (default 200)")
    p.add_argument("--check-every", type=float, default=1.0, help="minutes between held-out loss checks (default 1)")
    p.add_argument("--patience", type=int, default=3, help="checks without improvement before stopping early")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate (default 3e-4)")
    p.add_argument("--seed", type=int, default=0)
    return p


def split_files(files):
    """(train, held out): one file in HELD_OUT_SHARE aside, by a stable hash of its path."""
    def aside(f) -> bool:
        return int(hashlib.sha1(f.path.encode("utf-8")).hexdigest(), 16) % HELD_OUT_SHARE == 0

    held = [f for f in files if aside(f)]
    train = [f for f in files if not aside(f)]
    if not held and len(train) > 1:
        held, train = train[-1:], train[:-1]
    return train, held


def held_out_cuts(files, count: int, seed: int):
    """Rest-of-line cuts of the held-out files: (path, language, document, line, character, expected)."""
    from fim.positions import position_at
    from tools.evaluate import rest_of_line_cut

    rng = random.Random(seed)
    cuts = []
    for _ in range(count * 4):
        if len(cuts) >= count or not files:
            break
        f = rng.choice(files)
        cut = rest_of_line_cut(f.text, rng)
        if cut is None:
            continue
        cursor, end = cut
        document = f.text[:cursor] + f.text[end:]
        line, character = position_at(document, cursor)
        cuts.append((f.path, f.language, document, line, character, f.text[cursor:end]))
    return cuts


def exact_line(model, tokenizer_json: Path, cuts) -> float:
    """Share of cuts whose suggestion (gate off) is exactly the rest of the line, as the server would show it."""
    import torch

    from denoiser.engine import Engine
    from denoiser.native_backend import NativeBackend
    from lsp_server.settings import Settings
    from lsp_server.suggest import suggest
    from tools.evaluate import exact_match
    from training.export import save_native_model

    if not cuts:
        return 0.0
    threads = torch.get_num_threads()  # loading a backend picks the server's thread count; training keeps its own
    with tempfile.TemporaryDirectory(prefix="parafill-adapt-") as scratch:
        save_native_model(model, tokenizer_json, Path(scratch), int8=True, card="# candidate\n")
        # A candidate checked once: compiling its steps would cost far more than it saves.
        engine = Engine(NativeBackend(scratch, device="cpu", cpu_compile="off"))
        settings = Settings(min_confidence=0.0)
        right = 0
        for i, (path, language, document, line, character, expected) in enumerate(cuts):
            found = suggest(engine, document, line, character, document=f"check-{i}", path=path,
                            language_id=language, settings=settings)
            right += exact_match(found.text or "", expected)
    torch.set_num_threads(threads)
    return right / len(cuts)


def card(base: str, repo: Path, report: dict) -> str:
    return (f"# {base}, adapted to {repo.name}\n\n"
            f"The base model `{base}` trained further for {report['minutes']:.1f} minutes on "
            f"{report['train_files']} files of `{repo}` on this machine ({report['steps']} steps, "
            f"{report['tokens'] / 1e6:.2f}M tokens). Rest-of-line exact match on {report['checks']} cuts of "
            f"{report['held_out_files']} held-out files of the repository: {100 * report['before']:.1f}% before, "
            f"{100 * report['after']:.1f}% after (training loss on those files {report['loss_before']:.3f} before, "
            f"{report['loss_after']:.3f} after). Used only for documents under that folder; the base model's "
            f"card describes its data and licences.\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    repo = Path(args.repo).expanduser()
    if not repo.is_dir():
        print(f"parafill adapt: error: {args.repo}: not a folder", file=sys.stderr)
        return 2
    repo = repo.resolve()
    from denoiser.adapted import RECORD, adapted_dir, remove_adapted

    if args.remove:
        removed = remove_adapted(repo)
        print(f"removed the adapted model of {repo} ({removed})" if removed else f"no adapted model for {repo}")
        return 0
    import torch

    from denoiser.checkpoint import TOKENIZER, load_native_model
    from denoiser.drafts import DraftCalibration
    from denoiser.loading import default_model_dir, read_model_config
    from denoiser.tokenizer import CodeTokenizer
    from fim.repo_files import iter_repo_files
    from training.adapt import Adapter, held_out_batches
    from training.export import save_native_model

    base_dir = Path(args.model).expanduser() if args.model else default_model_dir()
    if read_model_config(base_dir).get("architecture") != "parafill-span-denoiser":
        print(f"parafill adapt: error: {base_dir}: only parafill's own models can be adapted on a CPU; "
              "open diffusion models are far too large to train here", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    files = list(iter_repo_files(repo))
    train, held = split_files(files)
    if not train or not held:
        print(f"parafill adapt: error: {repo}: found {len(files)} code files; adapting needs at least two",
              file=sys.stderr)
        return 2
    model, _, config = load_native_model(base_dir, torch.device("cpu"))
    tokenizer = base_dir / TOKENIZER
    codec = CodeTokenizer.load(tokenizer)
    cuts = held_out_cuts(held, args.checks, args.seed)
    print(f"{repo}: {len(train)} files to learn from, {len(held)} held out ({len(cuts)} rest-of-line cuts)",
          file=sys.stderr)
    before = exact_line(model, tokenizer, cuts)
    print(f"held-out exact line before: {100 * before:.1f}%", file=sys.stderr)
    adapter = Adapter(model, codec, [(f.path, f.language, f.text) for f in train], lr=args.lr, seed=args.seed)
    batches = held_out_batches([(f.path, f.language, f.text) for f in held], codec, config.context_tokens)
    before_loss = adapter.held_out_loss(batches)
    best_loss, best_state, misses = before_loss, None, 0
    print(f"held-out loss before: {before_loss:.3f}", file=sys.stderr)
    started = time.monotonic()
    budget = args.minutes * 60
    while time.monotonic() - started < budget and misses < args.patience:
        slice_s = min(args.check_every * 60, budget - (time.monotonic() - started))
        loss = adapter.train_for(max(1.0, slice_s))
        held_loss = adapter.held_out_loss(batches)
        elapsed = (time.monotonic() - started) / 60
        if held_loss < best_loss:
            best_loss, best_state, misses = held_loss, {k: v.detach().clone() for k, v in model.state_dict().items()}, 0
        else:
            misses += 1
        done = min(1.0, elapsed * 60 / budget)
        print(f"[{'#' * int(30 * done):<30}] {elapsed:4.1f}/{args.minutes:g} min  step {adapter.steps}  "
              f"loss {loss:.3f}  held-out loss {held_loss:.3f} (best {best_loss:.3f})", file=sys.stderr)
    candidate = None  # the kept weights' held-out exact line
    if best_state is not None:
        model.load_state_dict(best_state)
        candidate = exact_line(model, tokenizer, cuts)
    kept = "adapted" if candidate is not None and candidate > before else "base"
    report = {"repository": str(repo), "base_model": str(base_dir), "before": before,
              "after": candidate if kept == "adapted" else before, "candidate": candidate,
              "loss_before": round(before_loss, 4), "loss_after": round(best_loss, 4), "checks": len(cuts),
              "train_files": len(train), "held_out_files": len(held), "steps": adapter.steps,
              "tokens": adapter.tokens, "minutes": (time.monotonic() - started) / 60,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if kept == "base":
        why = ("did not lower the held-out loss" if candidate is None else
               f"lowered the held-out loss but completed no more cuts exactly ({100 * candidate:.1f}%)")
        print(f"kept the base model: adapting {why}; held-out exact line {100 * before:.1f}%", file=sys.stderr)
        print(json.dumps({**report, "kept": "base"}))
        return 0
    out = Path(args.out).expanduser() if args.out else adapted_dir(repo)
    out.mkdir(parents=True, exist_ok=True)
    save_native_model(model, tokenizer, out, int8=True, card=card(base_dir.name, repo, report))
    calibration = DraftCalibration.load(base_dir)
    if calibration is not None:  # drafts are trusted as with the base model (fitted on code neither saw)
        calibration.save(out)
    (out / RECORD).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"held-out exact line {100 * before:.1f}% → {100 * candidate:.1f}%; adapted model in {out}",
          file=sys.stderr)
    print(json.dumps({**report, "kept": "adapted", "model": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
