"""Plot held-out quality against training tokens from `parafill eval` JSON files.

    python -m tools.quality_plot --out eval/results/quality-vs-tokens.png \
        "stage 3=13.9:eval/results/default-cpu-v3.json" \
        "stage 4=34.6:eval/results/default-cpu-v4.json,eval/results/default-cpu-v4-dd.json" ...

Each point is LABEL=MILLIONS_OF_TOKENS:FILE[,FILE...]. A file measured with the
model alone (`--no-document-drafts`) feeds the "model alone" lines, one with the
default settings the "default settings" lines; a later file of the same kind
replaces an earlier one, so list them oldest first.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

GATE = "0.5"


def read_point(spec: str) -> tuple[str, float, dict[str, float]]:
    """(label, tokens in millions, {line name: percent}) of one LABEL=TOKENS:FILES argument."""
    label, _, rest = spec.partition("=")
    tokens, _, files = rest.partition(":")
    if not (label and tokens and files):
        raise SystemExit(f"quality_plot: {spec!r} is not LABEL=MILLIONS_OF_TOKENS:FILE[,FILE...]")
    values: dict[str, float] = {}
    for name in files.split(","):
        data = json.loads(Path(name).read_text(encoding="utf-8"))
        kind = "default settings" if data.get("options", {}).get("document_drafts") else "model alone"
        metrics = data["settings"][0]["metrics"]
        heldout, single = metrics.get("heldout"), metrics.get("single")
        if heldout:
            gated = heldout["min_confidence"][GATE]
            values[f"held-out exact, gate off ({kind})"] = 100 * heldout["exact_match"]
            values[f"held-out exact, gate {GATE} ({kind})"] = 100 * gated["shown"] * (gated["exact_match_of_shown"] or 0)
        if single:
            values[f"HumanEval single-line pass@1, gate off ({kind})"] = 100 * single["pass@1"]
    return label, float(tokens), values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("points", nargs="+", help="LABEL=MILLIONS_OF_TOKENS:FILE[,FILE...]")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [read_point(spec) for spec in args.points]
    names = sorted({name for _, _, values in points for name in values})
    fig, ax = plt.subplots(figsize=(9, 5))
    for name in names:
        xs = [tokens for _, tokens, values in points if name in values]
        ys = [values[name] for _, _, values in points if name in values]
        style = "--" if "model alone" in name else "-"
        ax.plot(xs, ys, style, marker="o", label=name)
    for label, tokens, _ in points:
        ax.axvline(tokens, color="grey", alpha=0.2)
        ax.annotate(label, (tokens, 1.0), xycoords=("data", "axes fraction"), textcoords="offset points",
                    xytext=(0, 4), ha="center", fontsize=8)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("%")
    ax.set_title("parafill default model on a 2-core CPU: quality against training tokens", pad=18)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
