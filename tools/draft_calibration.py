"""`parafill eval --fit-drafts DIR,...`: fit how far this model's drafts from the user's code can be trusted.

Each DIR is a package the model never trained on. Every rest-of-line cut is
drafted twice, as editors send it: with the package as the workspace folder (as
`--repo-drafts` does: the evaluated files are left out of the index) and with
the document alone (a file opened without a folder). For every draft, the model
checks it in one pass (`NativeBackend.draft_features`) and the draft is marked
right when it is exactly the rest of the line. The two settings draw drafts of
different worth from the same evidence (a lone document offers fewer rivals), so
a fit on one alone misrates the other. A logistic regression over those features gives
`DraftCalibration`, written as drafts.json into the model directory, where the
server reads it: every draft is kept whole with that probability as its
confidence, so the suggestion gate (`minConfidence`) decides which are shown.
Evaluate on other packages than these.
"""
from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from denoiser.drafts import DraftCalibration
from fim.drafts import DraftIndex
from fim.positions import position_at
from lsp_server.settings import Settings
from lsp_server.suggest import build_request, context_options, with_draft
from tools.draft_eval import package_examples
from tools.evaluate import exact_match

L2 = 0.1  # ridge on standardised weights: a few hundred examples, nine features
GATE = Settings().min_confidence  # the default suggestion gate the fit is reported at
SETTINGS = ("workspace", "document")  # a draft from the workspace folder's index, or from the document alone


def collect(backend, engine, folders: list[Path], files: int, per_file: int, seed: int, log) -> list[dict]:
    """One row per drafted example: the package, the features, whether the draft was right."""
    rows = []
    options = context_options(Settings(), engine.max_context_tokens)
    for folder in folders:
        workspace, examples = package_examples(folder, files, per_file, seed)
        before = len(rows)
        for number, (path, text, cursor, expected) in enumerate(examples):
            line, character = position_at(text, cursor)
            document = f"fit:{path}:{number}"
            plain = build_request(text, line, character, path=path, language_id="python", options=options)
            for setting, index in (("workspace", workspace), ("document", DraftIndex())):
                request = with_draft(plain, index, text, line, character, document)
                index.remove(document)
                features = backend.draft_features(request, document)
                backend.forget(document)
                if features is not None:
                    rows.append({"package": folder.name, "setting": setting, "features": features,
                                 "right": bool(exact_match(request.draft, expected))})
        drafted = rows[before:]
        counts = ", ".join(f"{s}: {sum(r['setting'] == s for r in drafted)} drafted, "
                           f"{sum(r['right'] for r in drafted if r['setting'] == s)} right" for s in SETTINGS)
        log(f"{folder.name}: {len(examples)} cuts; {counts}")
    return rows


def fit(rows: list[dict]) -> DraftCalibration:
    """Logistic regression of `right` on the features (standardised, ridge), in the features' own units."""
    import torch

    names = DraftCalibration.FEATURES
    x = torch.tensor([[r["features"][n] for n in names] for r in rows], dtype=torch.float64)
    y = torch.tensor([float(r["right"]) for r in rows], dtype=torch.float64)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    w = torch.zeros(len(names), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + L2 * (w * w).sum() / len(y)
        value.backward()
        return value

    optimizer.step(loss)
    weights = (w.detach() / std).tolist()
    bias = float(b.detach() - (w.detach() / std * mean).sum())
    return DraftCalibration({n: round(v, 5) for n, v in zip(names, weights)}, round(bias, 5))


def precision_above(rated: list[tuple[float, bool]], threshold: float) -> float:
    kept = [right for p, right in rated if p >= threshold]
    return sum(kept) / len(kept) if kept else 0.0


def shown_and_right(calibration: DraftCalibration, rows: list[dict], gate: float = GATE) -> tuple[int, int]:
    kept = [r for r in rows if calibration.probability(r["features"]) >= gate]
    return len(kept), sum(r["right"] for r in kept)


def main(args, log) -> int:
    from denoiser.engine import Engine

    started = time.perf_counter()
    engine = Engine.load(args.model, device=args.device)
    backend = engine.backend
    if not hasattr(backend, "draft_features"):
        print(f"parafill eval: error: {backend.name} is not a parafill model; only those carry a draft "
              "calibration", file=sys.stderr)
        return 2
    folders = [Path(p) for p in args.fit_drafts.split(",") if p]
    rows = collect(backend, engine, folders, args.draft_files, args.draft_examples_per_file, args.seed, log)
    right = sum(r["right"] for r in rows)
    if len(rows) < 20 or right < 5 or right == len(rows):
        print(f"parafill eval: error: {len(rows)} drafts, {right} right: too few to fit; add packages or "
              "--draft-files", file=sys.stderr)
        return 2
    # Each package rated by a fit on the others: how the calibration does on code it never saw.
    unseen = []
    for folder in folders:
        rest = [r for r in rows if r["package"] != folder.name]
        held = [r for r in rows if r["package"] == folder.name]
        if held and sum(r["right"] for r in rest) >= 3:
            others = fit(rest)
            unseen += [(r["setting"], others.probability(r["features"]), r["right"]) for r in held]
    for setting in SETTINGS:
        rated = [(p, right) for s, p, right in unseen if s == setting]
        log(f"  {setting}, rated by fits on the other packages: {sum(p >= GATE for p, _ in rated)} of "
            f"{len(rated)} drafts rated >= {GATE:g} (the default gate), right "
            f"{precision_above(rated, GATE):.0%} of the time; {sum(right for _, right in rated)} right in all")
    unseen = [(p, right) for _, p, right in unseen]
    shown_unseen = sum(p >= GATE for p, _ in unseen)
    calibration = fit(rows)
    kept, good = shown_and_right(calibration, rows)
    calibration = DraftCalibration(calibration.weights, calibration.bias, about={
        "packages": [f.name for f in folders], "drafts": len(rows), "right": right,
        "drafts_by_setting": {s: sum(r["setting"] == s for r in rows) for s in SETTINGS},
        "rated_at_least_gate": kept, "rated_at_least_gate_right": good, "gate": GATE,
        "unseen_rated_at_least_gate": shown_unseen,
        "unseen_precision_at_gate": round(precision_above(unseen, GATE), 4),
        "seed": args.seed, "fitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "parafill eval " + " ".join(args.argv),
    })
    out = Path(args.out) if args.out else Path(backend.model_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = calibration.save(out)
    log(f"{len(rows)} drafts ({right} right); {kept} rated >= {GATE:g}, {good} of them right; "
        f"wrote {path} in {time.perf_counter() - started:.0f} s")
    return 0
