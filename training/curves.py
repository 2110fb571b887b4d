"""Plot a training run's log.jsonl: train and validation loss against tokens seen.

`python -m training.curves runs/default/log.jsonl --out eval/results/training.png`
Reads the log `parafill train` writes; never touches the model.
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("log", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="parafill default model: training curves")
    args = p.parse_args(argv)
    plot(read_log(args.log), args.out, args.title)


if __name__ == "__main__":
    main()
