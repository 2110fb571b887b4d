"""Plot a training run: its losses against tokens seen, or its held-out quality.

`python -m training.curves runs/default/log.jsonl --out eval/results/training.png`
`python -m training.curves --quality 13.9e6=a.json,b.json --quality 30e6=c.json --out q.png`
Reads the log `parafill train` writes and the JSON `parafill eval` writes; never
touches the model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def smooth(values: list[float], window: int = 20) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(records: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r["tokens"] / 1e6 for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(tokens, smooth([r["mdlm"] for r in records]), label="train span (MDLM, 1/t weighted)")
    ax.plot(tokens, smooth([r["ar"] for r in records]), label="train next-token")
    valid = [r for r in records if "valid" in r]
    ax.plot([r["tokens"] / 1e6 for r in valid], [r["valid"]["mdlm"] for r in valid], "o-", label="valid span")
    ax.plot([r["tokens"] / 1e6 for r in valid], [r["valid"]["ar"] for r in valid], "s-", label="valid next-token")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def headline(evaluation: dict, gate: str = "0.3") -> dict:
    """The campaign's numbers from one `parafill eval` JSON (its first decode setting).

    "gated" numbers count a suggestion hidden by the confidence gate as a miss;
    "precision" is the exact-match rate of what the gate shows.
    """
    metrics = evaluation["settings"][0]["metrics"]
    out = {}
    for suite, value in (("single", "pass@1"), ("multi", "pass@1"), ("heldout", "exact_match")):
        m = metrics.get(suite)
        if not m:
            continue
        shown = m["min_confidence"][gate]
        of_shown = shown.get("pass@1_of_shown" if value == "pass@1" else "exact_match_of_shown") or 0.0
        out[suite] = {value: m[value], f"{value} gated": round(shown["shown"] * of_shown, 4),
                      "shown": shown["shown"], "precision": shown.get("exact_match_of_shown"),
                      "p50_ms": m["latency_ms"]["p50"], "count": m["count"]}
    return out


def plot_quality(points: list[tuple[float, dict]], out: Path, title: str) -> None:
    """Held-out quality (gate off and at the default gate) against training tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(points, key=lambda p: p[0])
    tokens = [t / 1e6 for t, _ in points]
    fig, ax = plt.subplots(figsize=(7, 4))
    series = (("single", "pass@1", "HumanEval single-line pass@1"), ("multi", "pass@1", "multi-line pass@1"),
              ("heldout", "exact_match", "held-out rest-of-line exact"))
    for suite, value, label in series:
        if all(suite in h for _, h in points):
            ax.plot(tokens, [100 * h[suite][value] for _, h in points], "o-", label=f"{label}, gate off")
            ax.plot(tokens, [100 * h[suite][f"{value} gated"] for _, h in points], "s--",
                    label=f"{label}, minConfidence 0.3")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("log", type=Path, nargs="?", help="a run's log.jsonl: plot its loss curves")
    p.add_argument("--quality", action="append", default=[], metavar="TOKENS=EVAL.json[,EVAL.json]",
                   help="plot held-out quality against training tokens from `parafill eval` results instead")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="parafill default model: training curves")
    args = p.parse_args(argv)
    if args.quality:
        points = []
        for item in args.quality:
            tokens, _, files = item.partition("=")
            merged: dict = {}
            for name in files.split(","):
                merged.update(headline(json.loads(Path(name).read_text(encoding="utf-8"))))
            points.append((float(tokens), merged))
        plot_quality(points, args.out, args.title)
        return
    if args.log is None:
        p.error("give a log.jsonl, or --quality")
    plot(read_log(args.log), args.out, args.title)


if __name__ == "__main__":
    main()
