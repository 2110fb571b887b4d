"""Benchmark open-model span denoising against autoregressive baselines (random weights).

Speed does not depend on weight values, so Qwen2-shaped models (0.5B, 1.5B, 7B)
get random bf16 weights of the real shapes. For a 64-token span over a 1k-token
context it reports, in one run on one device:

- parafill's span decoding at 1, 2, 4 and 8 tokens per step, dual cache
  (full pass every `refresh_every` steps, span-only passes between) and exact;
- (a) `transformers` eager greedy generation of 64 tokens (dynamic K/V cache);
- (b) the same model decoded autoregressively with a static K/V cache and CUDA
  graphs (`torch.compile(mode="reduce-overhead")`), when CUDA is present;

as tokens/s, the ratio to (a), and GB/s of weights read. Meant for the GPU
machine (`python -m tools.open_model_bench --shapes 0.5B,7B`); `--shapes
tiny --device cpu` is a smoke run. Not used by the server.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

from denoiser.open_models.families import TransformerShape
from denoiser.open_models.network import BidirectionalTransformer, KVStore, LayerWeights

SHAPES = {
    "tiny": TransformerShape(512, 64, 2, 4, 2, 16, 128, 1e6, 1e-6, True, True, 4096),
    "0.5B": TransformerShape(151936, 896, 24, 14, 2, 64, 4864, 1e6, 1e-6, True, True, 32768),
    "1.5B": TransformerShape(151936, 1536, 28, 12, 2, 128, 8960, 1e6, 1e-6, True, True, 32768),
    "7B": TransformerShape(152064, 3584, 28, 28, 4, 128, 18944, 1e6, 1e-6, True, False, 32768),
}


def random_model(shape: TransformerShape, device: torch.device, dtype: torch.dtype) -> BidirectionalTransformer:
    def rnd(*dims: int) -> torch.Tensor:
        return (torch.randn(*dims, device=device, dtype=dtype) * 0.02)

    h, q, kv = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    layers = [LayerWeights(rnd(q, h), rnd(kv, h), rnd(kv, h), rnd(h, q), rnd(shape.intermediate_size, h),
                           rnd(shape.intermediate_size, h), rnd(h, shape.intermediate_size),
                           torch.ones(h, device=device, dtype=dtype), torch.ones(h, device=device, dtype=dtype),
                           rnd(q), rnd(kv), rnd(kv)) for _ in range(shape.num_layers)]
    embed = rnd(shape.vocab_size, h)
    head = embed if shape.tie_embeddings else rnd(shape.vocab_size, h)
    return BidirectionalTransformer(shape, embed, torch.ones(h, device=device, dtype=dtype), head, layers)


def _timed(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocations, kernels, graphs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def span_decode_seconds(model: BidirectionalTransformer, context: int, span: int, per_step: int,
                        cache: str, refresh_every: int, device: torch.device, repeats: int) -> float:
    """One span fill with a fixed number of commits per step (random weights have no confident tokens)."""
    ids = torch.randint(0, model.shape.vocab_size, (context + span,), device=device)
    start = context // 2  # span in the middle: half prefix, half suffix
    rows = torch.arange(start - 1, start + span - 1, device=device)

    def run() -> None:
        kv = KVStore()
        for step in range(-(-span // per_step)):
            if cache == "none" or step % refresh_every == 0:
                logits = model.full(ids, rows=rows, kv=kv if cache == "dual" else None)
            else:
                logits = model.window(ids[start - 1:start + span], start - 1, kv, rows=rows - (start - 1))
            ids[start:start + span] = logits.argmax(-1)

    return _timed(run, device, repeats)


def hf_generate_seconds(shape: TransformerShape, context: int, new_tokens: int, device: torch.device,
                        dtype: torch.dtype, compiled: bool, repeats: int) -> float:
    import transformers  # baseline only; parafill itself never needs it

    cfg = transformers.Qwen2Config(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        rope_theta=shape.rope_theta, rms_norm_eps=shape.rms_norm_eps, tie_word_embeddings=shape.tie_embeddings,
        attn_implementation="eager" if not compiled else "sdpa",
    )
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(cfg).to(dtype).eval()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if compiled:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        kwargs["cache_implementation"] = "static"
    prompt = torch.randint(0, shape.vocab_size, (1, context), device=device)

    def run() -> None:
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)

    if compiled:
        run()  # compilation and graph capture outside the timing
    seconds = _timed(run, device, repeats)
    del model
    return seconds


def run_benchmark(shape_names: list[str], device: torch.device, context: int = 1024, span: int = 64,
                  per_steps: tuple[int, ...] = (1, 2, 4, 8), refresh_every: int = 4, repeats: int = 3,
                  baselines: bool = True) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name in shape_names:
        shape = SHAPES[name]
        model = random_model(shape, device, dtype)
        weight_bytes = model.parameters() * model.embed.element_size()
        base = None
        if baselines:
            eager = hf_generate_seconds(shape, context, span, device, dtype, compiled=False, repeats=repeats)
            base = span / eager
            rows.append(dict(shape=name, method="transformers eager AR", tok_s=base, ratio=1.0))
            if device.type == "cuda":
                graphed = hf_generate_seconds(shape, context, span, device, dtype, compiled=True, repeats=repeats)
                rows.append(dict(shape=name, method="AR static cache + CUDA graphs", tok_s=span / graphed,
                                 ratio=(span / graphed) / base, gb_s=span * weight_bytes / graphed / 1e9))
        for cache in ("dual", "none"):
            for k in per_steps:
                secs = span_decode_seconds(model, context, span, k, cache, refresh_every, device, repeats)
                passes = -(-span // k)
                rows.append(dict(shape=name, method=f"parafill span, {k}/step, cache={cache}", tok_s=span / secs,
                                 ratio=(span / secs) / base if base else None, gb_s=passes * weight_bytes / secs / 1e9))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="0.5B,1.5B,7B", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--span", type=int, default=64)
    parser.add_argument("--refresh-every", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-baselines", action="store_true", help="skip the transformers baselines")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = run_benchmark(args.shapes.split(","), device, args.context, args.span, refresh_every=args.refresh_every,
                         repeats=args.repeats, baselines=not args.no_baselines)
    print(f"device: {name}; context {args.context}, span {args.span}")
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "-"
        gbs = f"{r['gb_s']:.0f} GB/s" if r.get("gb_s") else ""
        print(f"{r['shape']:>5}  {r['method']:<40} {r['tok_s']:>10.1f} tok/s  {ratio:>7}  {gbs}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
