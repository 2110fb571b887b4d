"""`parafill bench --train`: how close a training step runs to this machine's matmul rate.

For one model shape it times the real training step (`training.loop.collate`,
`losses`, backward, fused AdamW) in fp32, in bf16 autocast, and in bf16
compiled, on random token batches of the real layout (full context, spans of
16/32/64 as training draws them). Beside each it prints tokens/s, the step's
FLOPs (`training.step.step_flops`) per second, and that rate against a large
matmul measured in the same run in fp32 and bf16, as nanoGPT reports MFU.
Writes JSON and a bar plot under bench/results/. Measures only.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results"
VARIANTS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16-compiled": ("bf16", True)}
SPANS = (16, 32, 64)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parafill bench --train", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--context-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ar-positions", type=int, default=192)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=704)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=6, help="timed steps per span length and variant")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated from {', '.join(VARIANTS)}; the first is the baseline of the speed-ups")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<machine>__train-step.json)")
    return p


def matmul_rate(dtype, reps: int = 20) -> float:
    """GFLOP/s of a 4096×512 @ 512×1408 matmul (the shape of a small model's MLP)."""
    import torch

    a, b = torch.randn(4096, 512, dtype=dtype), torch.randn(512, 1408, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 4096 * 512 * 1408 / statistics.median(times) / 1e9


def random_examples(rng: random.Random, count: int, context: int, span: int, vocab: int):
    from denoiser.config import EOS_ID, FIM_MIDDLE_ID, FIM_SUFFIX_ID
    from training.examples import TokenExample

    return [TokenExample([FIM_SUFFIX_ID] + [rng.randrange(16, vocab) for _ in range(context - 2)] + [FIM_MIDDLE_ID],
                         [rng.randrange(16, vocab) for _ in range(rng.randint(1, span - 1))] + [EOS_ID], "line")
            for _ in range(count)]


def time_variant(args, precision: str, compile_loss: bool) -> dict:
    import torch

    from denoiser.config import ModelConfig
    from denoiser.model import SpanDenoiser
    from training.loop import TrainSettings, collate, losses, optimizer_step
    from training.step import compiled, step_flops

    config = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                         d_ff=args.d_ff, max_positions=4096, context_tokens=args.context_tokens)
    model = SpanDenoiser(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    settings = TrainSettings(context_tokens=args.context_tokens, batch_size=args.batch_size,
                             ar_positions=args.ar_positions)
    loss_fn = compiled(losses, compile_loss)
    rng, noise = random.Random(0), torch.Generator().manual_seed(0)
    device = torch.device("cpu")

    def step(span: int) -> tuple[float, int, float]:
        examples = random_examples(rng, args.batch_size, args.context_tokens, span, args.vocab)
        batch = collate(examples, span, noise, device, region=args.context_tokens + span)
        started = time.perf_counter()
        optimizer_step(model, optimizer, batch, settings, noise, precision, loss_fn)
        elapsed = time.perf_counter() - started
        tokens = sum(len(e.context) + len(e.middle) for e in examples) + len(examples) * span
        flops = step_flops(config, len(examples), args.context_tokens + 2 * span, 2 * span + args.ar_positions)
        return elapsed, tokens, flops

    warm_started = time.perf_counter()
    for span in SPANS:  # compiles one graph per span length
        step(span)
    warmup_s = time.perf_counter() - warm_started
    total_s = total_tokens = total_flops = 0.0
    for _ in range(args.steps):
        for span in SPANS:
            elapsed, tokens, flops = step(span)
            total_s, total_tokens, total_flops = total_s + elapsed, total_tokens + tokens, total_flops + flops
    return {"precision": precision, "compiled": compile_loss, "warmup_s": round(warmup_s, 1),
            "ms_per_step": round(1000 * total_s / (args.steps * len(SPANS)), 1),
            "tokens_per_s": round(total_tokens / total_s), "gflops": round(total_flops / total_s / 1e9, 1),
            "parameters": sum(p.numel() for p in model.parameters())}


def machine_name() -> str:
    from tools.bench import cpu_name, slug

    return slug(cpu_name())[:48]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["variants"]
    labels = [f"{r['precision']}{' compiled' if r['compiled'] else ''}" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(labels, [r["tokens_per_s"] for r in rows], color="tab:blue")
    left.set_ylabel("training tokens/s")
    right.bar(labels, [r["gflops"] for r in rows], color="tab:green")
    for name, rate in results["matmul_gflops"].items():
        right.axhline(rate, linestyle="--", color="gray")
        right.text(-0.4, rate, f"{name} matmul", va="bottom", fontsize=8)
    right.set_ylabel("GFLOP/s of model arithmetic")
    fig.suptitle(f"training step, {results['parameters'] / 1e6:.1f}M parameters, context {results['shape']['context_tokens']}, "
                 f"batch {results['shape']['batch_size']} — {results['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        print(f"parafill bench --train: error: --variants takes names from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from tools.bench import cpu_name

    machine = machine_name()
    rates = {"fp32": round(matmul_rate(torch.float32), 1), "bf16": round(matmul_rate(torch.bfloat16), 1)}
    print(f"matmul 4096x512 @ 512x1408: fp32 {rates['fp32']} GFLOP/s, bf16 {rates['bf16']} GFLOP/s", file=sys.stderr)
    rows = []
    for precision, compile_loss in (VARIANTS[v] for v in names):
        row = time_variant(args, precision, compile_loss)
        row["of_matmul_rate"] = round(row["gflops"] / rates[precision], 3)
        rows.append(row)
        print(f"{precision:>4}{' compiled' if compile_loss else '         '}  {row['ms_per_step']:8.1f} ms/step  "
              f"{row['tokens_per_s']:7d} tok/s  {row['gflops']:6.1f} GFLOP/s  "
              f"({100 * row['of_matmul_rate']:.0f}% of the {precision} matmul rate)", file=sys.stderr)
    baseline = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup_over_fp32"] = round(row["tokens_per_s"] / baseline, 2)
    results = {
        "machine": machine, "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "command": "parafill bench --train " + " ".join(argv or sys.argv[1:]),
        "shape": {k: getattr(args, k) for k in ("context_tokens", "batch_size", "ar_positions", "d_model", "n_layers",
                                                "n_heads", "d_ff", "vocab")},
        "parameters": rows[0]["parameters"], "matmul_gflops": rates, "variants": rows,
    }
    out = Path(args.out) if args.out else DEFAULT_OUT / f"{machine}__train-step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
