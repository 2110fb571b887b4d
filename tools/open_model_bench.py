"""Benchmark open diffusion models: GPU span decoding, and each catalogue model's cost on this CPU.

Speed does not depend on weight values, so models get random weights of the
real shapes where the real ones are not at hand.

GPU mode (default; `python -m tools.open_model_bench --shapes 0.5B,7B`): for a
64-token span over a 1k-token context, in one run on one device,

- parafill's span decoding at 1, 2, 4 and 8 tokens per step, dual cache
  (full pass every `refresh_every` steps, span-only passes between) and exact;
- (a) `transformers` eager greedy generation of 64 tokens (dynamic K/V cache);
- (b) the same model decoded autoregressively with a static K/V cache and CUDA
  graphs (`torch.compile(mode="reduce-overhead")`), when CUDA is present;

as tokens/s, the ratio to (a), and GB/s of weights read. `--shapes tiny
--device cpu` is a smoke run.

CPU mode (`--cpu-costs`): what each catalogue model costs on the user's CPU.
Per distinct shape (the five Dream-family 7B entries share one) it uses the
real weights when `parafill model pull` has put them in the Hugging Face cache,
else writes a real-shaped random checkpoint (bf16 safetensors, the family's
tensor names and config.json, a synthetic tokenizer of the vocabulary's size),
and then, for each weight format (bf16, int8, fp32), in a fresh process so the
memory figures are the model's own:

- load time through the real loader, from a cold page cache (the files are
  evicted with posix_fadvise first, where the kernel allows);
- resident memory once ready (after the first completion: weights the loader
  leaves memory-mapped are read then, and that completion's time is reported
  as well) and at its peak;
- the latency of one inline completion: a span of 32 over a 1k-token context
  (3/4 before the cursor, code from this repository), N denoising steps (a fixed
  step budget, no early stop, so every request does the same work), dual cache;
  p50/p99 over the requests, tokens/s, GB/s of weights read;
- the time of one full pass (every position) and one span-only pass, which is
  what reusing context keys/values across keystrokes could save at best
  (`KV_REUSE` says why these families cannot reuse them exactly);
- the greedy fills, compared token by token with fp32's (bf16's where fp32 is
  not run): how far int8 and bf16 keep the outputs.

Typing (`--cpu-costs --typing`): a real file (textwrap.py by default) with a
line from its middle cut out and typed back a few characters per request, the
windows built as the server builds them (`fim.build_request`, 1k tokens), each
request filling a span of fixed work (SPANxSTEPS schedules, 32x8 and 16x4), in
four configurations over one loaded model, interleaved request by request so a
change in the machine's load hits all alike: the keystroke cache off (refresh
every 4 steps, today's default; or one full pass per request) and on (the
suffix's keys shifted to their new positions, or the suffix re-encoded).
Reports the cold request, the warm keystroke p50/p99 and their ratio to the
default, with the load average; then, on tiny random checkpoints of each
family, how far each configuration's fills agree with exact recomputation
and how far the keystroke cache's first pass agrees with the exact first pass.

Not used by the server.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from denoiser.catalogue import CATALOGUE, DREAM, LLADA, OPEN_DCODER, CatalogueEntry, ModelShape, parse_model_name
from denoiser.open_models.families import TransformerShape
from denoiser.open_models.keystroke_cache import KeystrokeCachePolicy
from denoiser.open_models.network import BidirectionalTransformer, KVStore, LayerWeights

REPO = Path(__file__).resolve().parents[1]

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


# --- CPU mode: what each catalogue model costs on this machine's CPU ------------------------

PRECISIONS = ("bf16", "int8", "fp32")

# Whether a family can keep the context's keys/values from one keystroke to the next.
KV_REUSE = {
    DREAM: "no exact reuse: attention is bidirectional (no causal mask), so every context position's keys and "
           "values depend on the span and the suffix, which change as the user types",
    LLADA: "no exact reuse: bidirectional, as Dream",
    OPEN_DCODER: "no exact reuse: a Qwen2ForCausalLM checkpoint, but trained and sampled without the causal mask "
                 "(Open-dLLM), so bidirectional as Dream; running it causally would be another model",
}
KV_REUSE_APPROXIMATE = (
    "Within one request parafill reuses approximate context keys/values (Fast-dLLM's dual cache: a full pass "
    "every refresh_every steps, span-only passes between). With the keystroke cache on (openModelKeystrokeCache) "
    "they are also carried to the document's next request: the unchanged token prefix is reused in place and the "
    "suffix's keys are moved to their new positions, so a request costs span-only passes instead of starting "
    "with a full one, up to a full refresh after 8 such requests or when less than half the context is reused; "
    "`--typing` measures it. The saving per request is about `full_pass_s - window_pass_s`.")


@dataclass
class CostPlan:
    """The knobs of one CPU run."""

    context: int = 1024
    span: int = 32
    steps: int = 8
    refresh_every: int = 4
    requests: int = 10
    warmup: int = 1
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    pass_repeats: int = 2


def shape_key(shape: ModelShape, family: str) -> str:
    return f"{family}-{shape.layers}x{shape.hidden}-v{shape.vocab}"


def shape_parameters(shape: ModelShape) -> int:
    h, kv = shape.hidden, shape.kv_heads * (shape.hidden // shape.heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * shape.intermediate + 2 * h
    return shape.vocab * h * (1 if shape.tied_embeddings else 2) + shape.layers * per_layer + h


# --- a real-shaped random checkpoint ---------------------------------------------------------

def synthetic_tokenizer(family: str, vocab_rows: int):
    """A tokenizer as large as the real one (the loader checks it fits the embedding): characters, fillers, specials."""
    from tokenizers import Tokenizer, decoders, models

    from tools.tiny_open import _CHARS, _SPECIALS

    specials = _SPECIALS[family]
    names = list(dict.fromkeys(specials.values())) + ["<unk>"]
    size = vocab_rows - 64  # the real tokenizers also stop short of the padded embedding
    fillers = [f"\u27e8t{i}\u27e9" for i in range(size - len(names) - len(_CHARS))]
    vocab = {tok: i for i, tok in enumerate(names + _CHARS + fillers)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(names)
    tok.decoder = decoders.Fuse()
    return tok, specials


def write_random_checkpoint(family: str, shape: ModelShape, model_dir: Path, seed: int = 0,
                            shard_bytes: int = 2 * 1024 ** 3, progress: Callable[[str], None] = print) -> None:
    """A bf16 safetensors checkpoint of `shape` in `family`'s layout, written shard by shard (bounded memory)."""
    from safetensors.torch import save_file

    from denoiser.open_models.families import family_spec
    from tools.tiny_open import family_config

    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, specials = synthetic_tokenizer(family, shape.vocab)
    ids = {k.replace("_token", "_token_id"): tokenizer.token_to_id(v) for k, v in specials.items()}
    config = family_config(family, ids, tie=shape.tied_embeddings, layers=shape.layers, hidden=shape.hidden,
                           heads=shape.heads, kv_heads=shape.kv_heads, intermediate=shape.intermediate,
                           vocab_rows=shape.vocab, rope_theta=shape.rope_theta, max_positions=shape.max_positions)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**specials, "tokenizer_class": "PreTrainedTokenizerFast"}))
    (model_dir / "config.json").write_text(json.dumps(config, indent=1))
    expected = family_spec(config).expected_tensors()
    gen = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    written = held = total = 0

    def flush() -> None:
        nonlocal shard, held, written
        if shard:
            written += 1
            fname = f"model-{written:05d}.safetensors"
            save_file(shard, str(model_dir / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
            progress(f"  wrote {fname} ({held / 1e9:.1f} GB)")
        shard, held = {}, 0

    for name, dims in expected.items():
        if (len(dims) == 1 and "norm" in name) or name.endswith("ln_f.weight"):
            tensor = torch.ones(dims, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(dims, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        nbytes = tensor.numel() * 2
        if held and held + nbytes > shard_bytes:
            flush()
        shard[name] = tensor
        held += nbytes
        total += nbytes
    flush()
    # Final names carry the shard count, as the hub's do.
    renamed = {}
    for i in range(1, written + 1):
        old, new = f"model-{i:05d}.safetensors", f"model-{i:05d}-of-{written:05d}.safetensors"
        (model_dir / old).rename(model_dir / new)
        renamed[old] = new
    index = {"metadata": {"total_size": total}, "weight_map": {n: renamed[f] for n, f in weight_map.items()}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))


def evict_page_cache(model_dir: Path) -> bool:
    """Drop the weight files from the page cache so the load reads the disk; False where the kernel will not."""
    done = True
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            fd = os.open(path.resolve(), os.O_RDONLY)
            try:
                os.fsync(fd)  # pages still being written back would stay cached
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            done = False
    return done


# --- one measurement, in its own process ------------------------------------------------------

def proc_memory() -> dict:
    """Resident memory of this process, GiB: now (total, anonymous, file-backed) and peak."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024 / 1024 ** 3
    except OSError:
        import resource
        fields["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1024 ** 3
    return {"rss_gib": fields.get("VmRSS"), "anon_gib": fields.get("RssAnon"), "file_gib": fields.get("RssFile"),
            "peak_gib": fields.get("VmHWM")}


def code_corpus(chars: int) -> str:
    """About `chars` characters of source text for the prompts: this repository's Python, in a fixed order."""
    parts, held = [], 0
    for path in sorted(p for d in ("denoiser", "fim", "tools") for p in (REPO / d).rglob("*.py")):
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        held += len(parts[-1])
        if held >= chars:
            break
    return "\n\n".join(parts)


def prompts(backend, plan: CostPlan, count: int) -> list[tuple[list[int], list[int]]]:
    """`count` (head, tail) pairs of `plan.context` tokens around the cursor, in the family's layout."""
    special = backend.tokenizer.special
    lead = [special.bos] if backend.spec.bos_before_prefix and special.bos is not None else []
    trail = [special.eos] if backend.spec.eos_after_suffix and special.eos is not None else []
    before = plan.context * 3 // 4 - len(lead)
    after = plan.context - plan.context * 3 // 4 - len(trail)
    window = before + plan.span + after
    # Code runs 3-4 characters a token in these vocabularies; 6 leaves distinct windows for every request.
    ids = backend.tokenizer.encode(code_corpus(6 * window * (count + 1)))
    stride = max(1, (len(ids) - window) // max(count, 1))
    out = []
    for i in range(count):
        start = (i * stride) % max(1, len(ids) - window)
        chunk = ids[start:start + window]
        out.append((lead + chunk[:before], chunk[before + plan.span:] + trail))
    return out


def measure(model_dir: Path, precision: str, plan: CostPlan, evict: bool) -> dict:
    """Load once, then time `plan.requests` fills; runs in the child process."""
    from denoiser.backend import ModelLoadError
    from denoiser.open_models import load_open_model
    from denoiser.open_models.span_decoder import SpanDecoder, SpanDecodeSettings

    torch.set_num_threads(plan.threads)
    cold = evict_page_cache(model_dir) if evict else False
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        backend = load_open_model(model_dir, "cpu", dtype={"bf16": torch.bfloat16, "fp32": torch.float32}.get(precision),
                                  int8=precision == "int8")
    except ModelLoadError as exc:
        return {"precision": precision, "skipped": str(exc)}
    load_s, load_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    loaded = proc_memory()
    model = backend.model
    special = backend.tokenizer.special
    # No end tokens and a threshold no probability reaches: exactly `steps` passes, the same work every request.
    decoder = SpanDecoder(model, mask_id=special.mask, stop_ids=frozenset(), shift_logits=backend.spec.shift_logits,
                          never_emit=frozenset(t for t in (special.bos,) if t is not None), end_id=special.eos or 0)
    settings = SpanDecodeSettings(initial=plan.span, maximum=plan.span, grow_by=plan.span, threshold=2.0,
                                  steps=plan.steps, cache_mode="dual", refresh_every=plan.refresh_every)
    inputs = prompts(backend, plan, plan.warmup + plan.requests)
    latencies, cpu_times, fills, steps, full_passes = [], [], [], set(), set()
    first_s = ready = None
    for i, (head, tail) in enumerate(inputs):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = decoder.decode(head, tail, settings)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if i == 0:
            # Weights the loader left memory-mapped (a checkpoint already in the target dtype) are read
            # from disk by the first completion, so it, not the load, pays for them.
            first_s, ready = elapsed, proc_memory()
        if i >= plan.warmup:
            latencies.append(elapsed)
            cpu_times.append(cpu)
            fills.append(result.tokens)
            steps.add(result.steps)
            full_passes.add(result.full_passes)
    (full_s, full_cpu_s), (window_s, window_cpu_s) = pass_seconds(model, inputs[0], plan, decoder.shift)
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    weight_bytes = model.weight_bytes()
    n_full = max(full_passes)
    n_window = max(steps) - n_full
    return {
        "precision": precision, "load_s": load_s, "load_cpu_s": load_cpu_s, "cold_load": cold,
        "memory_after_load": loaded, "first_completion_s": first_s, "memory_ready": ready,
        "memory_end": proc_memory(), "weight_gib": weight_bytes / 1024 ** 3, "parameters": model.parameters(),
        "latency_s": latencies, "p50_s": p50, "p99_s": p99, "mean_s": statistics.fmean(latencies),
        "tokens_per_s": plan.span / p50, "steps": sorted(steps), "full_passes": sorted(full_passes),
        # CPU seconds: on a busy machine wall time includes waiting for a core; CPU time / threads
        # is what the same work would take with the cores to itself.
        "cpu_s": cpu_times, "cpu_p50_s": statistics.median(cpu_times),
        "full_pass_s": full_s, "window_pass_s": window_s, "full_pass_cpu_s": full_cpu_s,
        "window_pass_cpu_s": window_cpu_s,
        # Every pass reads every weight once (bar the embedding rows it skips).
        "weights_gb_per_s": (n_full + n_window) * weight_bytes / p50 / 1e9,
        "fills": fills, "threads": torch.get_num_threads(),
    }


def pass_seconds(model: BidirectionalTransformer, prompt: tuple[list[int], list[int]], plan: CostPlan,
                 shift: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(wall, CPU) seconds of one exact full pass over the whole prompt, and of one span-only (dual-cache) pass."""
    head, tail = prompt
    start = len(head)
    seq = torch.randint(0, 100, (len(head) + plan.span + len(tail),))
    seq[:start] = torch.tensor(head)
    seq[start + plan.span:] = torch.tensor(tail, dtype=torch.long)
    rows = (torch.arange(start, start + plan.span) - shift).clamp(min=0)
    kv = KVStore()
    timings: dict[str, list[tuple[float, float]]] = {"full": [], "window": []}
    lo = int(rows[0])
    for _ in range(plan.pass_repeats):
        for kind, run in (("full", lambda: model.full(seq, rows=rows, kv=kv)),
                          ("window", lambda: model.window(seq[lo:start + plan.span], lo, kv, rows=rows - lo))):
            t, c = time.perf_counter(), time.process_time()
            run()
            timings[kind].append((time.perf_counter() - t, time.process_time() - c))
    return min(timings["full"]), min(timings["window"])


def shape_checkpoints(entries: list[CatalogueEntry], report: dict, *, use_cache: bool, workdir: Path, keep: bool,
                      say: Callable[[str], None]) -> Iterator[tuple[str, dict, Path]]:
    """(shape key, report row, checkpoint directory) for each distinct shape among `entries`.

    Each row lands in `report["shapes"]` (with `skipped` when no checkpoint could be had);
    a random checkpoint written for a shape is removed once its row is done, unless `keep`."""
    groups: dict[str, list[CatalogueEntry]] = {}
    for entry in entries:
        groups.setdefault(shape_key(entry.shape, entry.family), []).append(entry)
    for key, group in groups.items():
        row = {"shape": key, "family": group[0].family, "models": [e.name for e in group],
               "parameters": shape_parameters(group[0].shape), "results": []}
        report["shapes"].append(row)
        model_dir, written = checkpoint_to_measure(group, key, row, use_cache, workdir, say)
        if model_dir is None:
            continue
        try:
            yield key, row, model_dir
        finally:
            if written and not keep:
                shutil.rmtree(model_dir, ignore_errors=True)


def checkpoint_to_measure(group: list[CatalogueEntry], key: str, row: dict, use_cache: bool, workdir: Path,
                          say: Callable[[str], None]) -> tuple[Path | None, bool]:
    """(directory, written) of the weights to measure a shape with: the real ones when a model of
    `group` is in the Hugging Face cache (and `use_cache`), else a random checkpoint of the real
    shape written to `workdir` (written=True: remove it afterwards). None, with `row["skipped"]`
    saying why, when the disk cannot hold it. Notes the weights and write time in `row`."""
    first = group[0]
    found = cached_weights(group) if use_cache else None
    if found is not None:
        row["weights"] = f"real ({found[0].name}, from the Hugging Face cache)"
        return found[1], False
    row["weights"] = "random, real shape"
    model_dir = workdir / key
    need = shape_parameters(first.shape) * 2
    free = shutil.disk_usage(workdir).free
    if free < need * 1.1:
        row["skipped"] = f"needs {need / 1e9:.1f} GB of disk in {workdir} for the random checkpoint, " \
                         f"{free / 1e9:.1f} GB free"
        say(f"{key}: skipped, {row['skipped']}")
        return None, False
    say(f"{key}: writing a random {first.family} checkpoint ({need / 1e9:.1f} GB) to {model_dir}")
    start = time.perf_counter()
    write_random_checkpoint(first.family, first.shape, model_dir, progress=say)
    row["write_s"] = time.perf_counter() - start
    return model_dir, True


def measure_in_child(model_dir: Path, precision: str, plan: CostPlan, evict: bool = True) -> dict:
    """Run `measure` in a fresh interpreter, so memory and load time are this model's alone."""
    job = {"model_dir": str(model_dir), "precision": precision, "plan": asdict(plan), "evict": evict}
    return _run_child("--measure-one", job, plan.threads)


def _run_child(flag: str, job: dict, threads: int) -> dict:
    """`python -m tools.open_model_bench FLAG JOB` with `threads` torch threads; its last line of JSON,
    or a `skipped` entry saying why it failed."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    run = subprocess.run([sys.executable, "-m", "tools.open_model_bench", flag, json.dumps(job)], cwd=REPO, env=env,
                         capture_output=True, text=True, check=False)
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
        killed = " (killed: out of memory?)" if run.returncode in (-9, 137) else ""
        return {"precision": job["precision"], "skipped": f"measurement failed, exit {run.returncode}{killed}: "
                                                          + " | ".join(tail)}
    return json.loads(lines[-1])


def agreement(result: dict, reference: dict) -> dict:
    """How far `result`'s greedy fills match `reference`'s, request by request."""
    same = total = identical = 0
    for a, b in zip(result["fills"], reference["fills"]):
        total += max(len(a), len(b))
        same += sum(x == y for x, y in zip(a, b))
        identical += a == b
    return {"against": reference["precision"], "tokens_equal": same / total if total else None,
            "fills_identical": identical / len(result["fills"]) if result["fills"] else None}


# --- the run ---------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cached_weights(entries: list[CatalogueEntry]) -> tuple[CatalogueEntry, Path] | None:
    from denoiser.hub_cache import snapshot_of

    for entry in entries:
        snapshot = snapshot_of(parse_model_name(entry.name))
        if snapshot is not None:
            return entry, snapshot
    return None


def run_cpu_costs(entries: list[CatalogueEntry], precisions: list[str], plan: CostPlan, workdir: Path, *,
                  use_cache: bool = True, keep: bool = False, say: Callable[[str], None] = print) -> dict:
    """Measure every distinct shape among `entries` in every format of `precisions`; the report as a dict."""
    report = {"machine": {**_machine(plan.threads), "quantized_engine": torch.backends.quantized.engine,
                          "available_gib_at_start": _meminfo("MemAvailable")},
              "plan": asdict(plan), "kv_reuse": KV_REUSE, "kv_reuse_approximate": KV_REUSE_APPROXIMATE, "shapes": []}
    for key, row, model_dir in shape_checkpoints(entries, report, use_cache=use_cache, workdir=workdir, keep=keep,
                                                 say=say):
        for precision in precisions:
            say(f"{key}: measuring {precision} ({plan.warmup}+{plan.requests} requests, {plan.threads} threads)")
            result = measure_in_child(model_dir, precision, plan)
            row["results"].append(result)
            say(f"  {summary_line(result)}")
        measured = {r["precision"]: r for r in row["results"] if "skipped" not in r}
        reference = measured.get("fp32") or measured.get("bf16")
        for result in measured.values():
            if reference is not None and result is not reference:
                result["agreement"] = agreement(result, reference)
    return report


def _machine(threads: int) -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "memory_gib": _meminfo("MemTotal"),
            "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _meminfo(key: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return None


def summary_line(r: dict) -> str:
    if "skipped" in r:
        return f"{r['precision']:>5}: skipped: {r['skipped']}"
    mem = r.get("memory_ready") or r["memory_after_load"]
    agree = r.get("agreement")
    agreed = f"  agree/{agree['against']} {agree['tokens_equal']:.0%}" if agree and agree["tokens_equal"] is not None else ""
    first = f" + first {r['first_completion_s']:.1f} s" if r.get("first_completion_s") else ""
    return (f"{r['precision']:>5}: load {r['load_s']:6.1f} s{first}{'' if r['cold_load'] else ' (warm)'}  "
            f"RSS {mem['rss_gib']:5.2f} GiB (peak {r['memory_end']['peak_gib']:.2f})  "
            f"p50 {r['p50_s']:6.2f} s  p99 {r['p99_s']:6.2f} s  (CPU {r['cpu_p50_s']:.2f} s)  "
            f"{r['tokens_per_s']:6.2f} tok/s  {r['weights_gb_per_s']:5.1f} GB/s  "
            f"full pass {r['full_pass_s']:.2f} s, span pass {r['window_pass_s']:.3f} s{agreed}")


def print_cpu_report(report: dict) -> None:
    m, plan = report["machine"], report["plan"]
    print(f"\n{m['cpu']}: {plan['threads']} threads of {m['cores']} cores, {m['memory_gib']:.0f} GiB; "
          f"torch {m['torch']}; load average {m['load_average_at_start']} at the start")
    print(f"one inline completion: span {plan['span']}, context {plan['context']} tokens, {plan['steps']} steps "
          f"(dual cache, full pass every {plan['refresh_every']}), {plan['requests']} requests")
    for row in report["shapes"]:
        print(f"\n{row['shape']} ({row['parameters'] / 1e9:.2f} B parameters; {row.get('weights', '-')}): "
              f"{', '.join(row['models'])}")
        if "skipped" in row:
            print(f"  skipped: {row['skipped']}")
        for r in row["results"]:
            print(f"  {summary_line(r)}")
        print(f"  context K/V across keystrokes: {KV_REUSE[row['family']]}")


# --- typing: keystroke latency with and without the keystroke cache ---------------------------

@dataclass
class TypingPlan:
    """The knobs of one typing measurement (`--cpu-costs --typing`)."""

    file: str = ""  # the file typed (default: the standard library's textwrap.py)
    context: int = 1024  # preamble + prefix + suffix tokens, as the server's contextTokens
    requests: int = 40  # keystroke requests (each `chars` characters after the last)
    chars: int = 3
    schedules: tuple[str, ...] = ("32x8", "16x4")  # span tokens x denoising steps
    off_every: int = 4  # the cache-off configurations run on every this many keystrokes
    cold_requests: int = 3
    refresh_after: int = KeystrokeCachePolicy.refresh_after
    min_reuse: float = KeystrokeCachePolicy.min_reuse
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)


# name -> (keystroke cache suffix mode or None, refresh_every)
TYPING_CONFIGS = {
    "off, refresh every 4": (None, 4),  # today's default: the dual cache, nothing kept between requests
    "off, one full pass": (None, 0),  # the cheaper cold schedule alone
    "on, suffix shifted": ("shift", 0),  # the keystroke cache, the suffix's keys moved to their new positions
    "on, suffix re-encoded": ("reencode", 0),  # the keystroke cache, the suffix computed afresh
}


def default_typing_file() -> Path:
    import textwrap

    return Path(textwrap.__file__)


def typed_requests(text: str, plan: TypingPlan, count_tokens: Callable[[str], int]) -> list:
    """One `FimRequest` per keystroke: a line from the middle of `text` cut out and typed back,
    `plan.chars` characters a request.

    The first request's windows are the server's (`fim.build_request`: whole lines, a quarter of
    `plan.context` tokens for the suffix) cut at the line that makes its context `plan.context`
    tokens; later requests keep that window start, as the server does until the prefix outgrows its
    budget (it then moves the start 16 lines at once, and the keystroke cache starts over)."""
    from dataclasses import replace as dc_replace

    from fim.context import ContextOptions, build_request
    from tools.typing_bench import typing_plan

    start, pieces = typing_plan(text, 0.5, plan.requests, plan.chars)
    rest = text[start + len("".join(pieces)):]
    cursors = [start + sum(len(p) for p in pieces[:i + 1]) for i in range(len(pieces))]
    if not cursors:
        return []

    def at(cursor: int):
        before = text[:cursor]
        return build_request(before + rest, before.count("\n"), len(before) - before.rfind("\n") - 1,
                             path="textwrap.py", language_id="python",
                             options=ContextOptions(context_tokens=plan.context, line_step=1),
                             count_tokens=count_tokens)

    first = at(cursors[0])
    window_start = cursors[0] - len(first.prefix)
    return [dc_replace(at(cursor), prefix=text[window_start:cursor], suffix=first.suffix) for cursor in cursors]


def _typing_backends(base, schedule: str, plan: TypingPlan) -> dict:
    """One backend per configuration over the same loaded model, each doing fixed work: no end
    tokens and a threshold nothing reaches, so every request takes exactly `steps` passes."""
    from denoiser.open_models.infill_backend import OpenModelBackend
    from denoiser.open_models.span_decoder import SpanDecoder

    span = int(schedule.split("x")[0])
    special = base.tokenizer.special
    out = {}
    for name, (suffix, refresh_every) in TYPING_CONFIGS.items():
        policy = KeystrokeCachePolicy(refresh_after=plan.refresh_after, min_reuse=plan.min_reuse,
                                      suffix=suffix) if suffix else None
        backend = OpenModelBackend(base.model, base.tokenizer, base.spec, name=base.name, refresh_every=refresh_every,
                                   initial_span=span, max_context_tokens=base.max_context_tokens,
                                   keystroke_cache=policy)
        backend.decoder = SpanDecoder(base.model, mask_id=special.mask, stop_ids=frozenset(),
                                      shift_logits=base.spec.shift_logits,
                                      never_emit=frozenset(t for t in (special.bos,) if t is not None),
                                      end_id=special.eos or 0)
        out[name] = backend
    return out


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {"n": len(ordered), "p50": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
            "mean": statistics.fmean(ordered)}


def measure_typing(model_dir: Path, precision: str, plan: TypingPlan) -> dict:
    """Type `plan.file` through every configuration and schedule; runs in the child process."""
    from dataclasses import replace as dc_replace

    from denoiser.backend import DecodeSettings, ModelLoadError
    from denoiser.open_models import load_open_model
    from fim.request import SpanPlan

    torch.set_num_threads(plan.threads)
    try:
        base = load_open_model(model_dir, "cpu", dtype={"bf16": torch.bfloat16, "fp32": torch.float32}.get(precision),
                               int8=precision == "int8")
    except ModelLoadError as exc:
        return {"precision": precision, "skipped": str(exc)}
    tokenizer = base.tokenizer
    text = Path(plan.file or default_typing_file()).read_text(encoding="utf-8")
    requests = typed_requests(text, plan, lambda s: len(tokenizer.encode(s)))
    load_samples = [os.getloadavg()[0]]
    out = {"precision": precision, "weight_gib": base.model.weight_bytes() / 1024 ** 3, "schedules": {},
           "load_average_at_start": load_samples[0], "threads": torch.get_num_threads()}

    def timed(backend, request, document: str, decode: DecodeSettings) -> dict:
        wall, cpu = time.perf_counter(), time.process_time()
        result = backend.fill(request, decode, document=document, is_cancelled=lambda: False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return {"s": wall, "cpu_s": cpu, "reused": result.reused_context_tokens, "context": result.context_tokens,
                "steps": result.steps}

    for schedule in plan.schedules:
        span, steps = (int(x) for x in schedule.split("x"))
        decode = DecodeSettings(steps=steps, confidence_threshold=1.0)
        backends = _typing_backends(base, schedule, plan)
        fixed = [dc_replace(r, span=SpanPlan(r.span.mode, span)) for r in requests]
        timed(backends["off, one full pass"], fixed[0], "warm-up", decode)  # first touch of weights, allocations
        cold = {name: [timed(backends[name], fixed[i], f"cold-{i}", decode)
                       for i in range(min(plan.cold_requests, len(fixed)))]
                for name in ("off, refresh every 4", "off, one full pass")}
        rows = {name: [] for name in TYPING_CONFIGS}
        for i, request in enumerate(fixed):
            for name, backend in backends.items():
                if TYPING_CONFIGS[name][0] is None and i % plan.off_every:
                    continue
                rows[name].append({"request": i, **timed(backend, request, "typing", decode)})
            load_samples.append(os.getloadavg()[0])
        summary = {}
        for name, series in rows.items():
            on = TYPING_CONFIGS[name][0] is not None
            warm = [r["s"] for r in series if r["reused"] > 0] if on else [r["s"] for r in series]
            summary[name] = {
                "keystroke_s": _percentiles(warm),  # with the cache on: requests that reused keys/values
                "all_s": _percentiles([r["s"] for r in series]),  # with the refreshes
                "keystroke_cpu_s": _percentiles([r["cpu_s"] for r in series if r["reused"] > 0 or not on]),
                "refreshes": sum(r["reused"] == 0 for r in series) if on else None,
                "reused_share": (sum(r["reused"] for r in series) / max(1, sum(r["context"] for r in series))),
                "per_request": series,
            }
        base_p50 = summary["off, refresh every 4"]["keystroke_s"].get("p50")
        for name, row in summary.items():
            p50 = row["keystroke_s"].get("p50")
            row["p50_ratio_to_default"] = p50 / base_p50 if p50 and base_p50 else None
        out["schedules"][schedule] = {
            "span": span, "steps": steps,
            "cold_s": {name: _percentiles([r["s"] for r in series]) for name, series in cold.items()},
            "cold_cpu_s": {name: _percentiles([r["cpu_s"] for r in series]) for name, series in cold.items()},
            "configs": summary,
        }
    out["context_tokens"] = statistics.median(r["context"] for r in
                                              next(iter(out["schedules"].values()))["configs"]["off, one full pass"]["per_request"])
    out["load_average"] = {"min": min(load_samples), "mean": statistics.fmean(load_samples), "max": max(load_samples)}
    return out


def measure_typing_in_child(model_dir: Path, precision: str, plan: TypingPlan) -> dict:
    return _run_child("--measure-typing", {"model_dir": str(model_dir), "precision": precision, "plan": asdict(plan)},
                      plan.threads)


def keystroke_agreement(plan: TypingPlan, families: tuple[str, ...] = (DREAM, LLADA, OPEN_DCODER),
                        steps: int = 8, span: int = 32) -> dict:
    """On tiny random checkpoints of each family (tools/tiny_open.py): how far each schedule's fills, with
    the real stop rules and threshold (0.9), agree with exact recomputation (every step a full pass), and
    how far the keystroke cache's first pass agrees with the exact first pass (top-1 over the span)."""
    from dataclasses import replace as dc_replace

    from denoiser.backend import DecodeSettings
    from denoiser.open_models import load_open_model
    from fim.request import SpanPlan
    from tools.tiny_open import make_tiny_checkpoint

    text = Path(plan.file or default_typing_file()).read_text(encoding="utf-8")
    decode = DecodeSettings(steps=steps, confidence_threshold=0.9)
    out = {}
    with tempfile.TemporaryDirectory(prefix="parafill-tiny-") as tmp:
        for family in families:
            model_dir = Path(tmp) / family
            make_tiny_checkpoint(model_dir, family, seed=7)
            configs: dict[str, dict] = {"exact (every step a full pass)": {"cache_mode": "none"},
                                        "off, refresh every 4": {"refresh_every": 4},
                                        "off, one full pass": {"refresh_every": 0}}
            for name, (suffix, _) in TYPING_CONFIGS.items():
                if suffix:
                    configs[name] = {"keystroke_cache": KeystrokeCachePolicy(
                        refresh_after=plan.refresh_after, min_reuse=plan.min_reuse, suffix=suffix)}
            probe = load_open_model(model_dir, "cpu")
            encode = probe.tokenizer.encode
            requests = [dc_replace(r, span=SpanPlan(r.span.mode, span))
                        for r in typed_requests(text, plan, lambda s, encode=encode: len(encode(s)))]
            fills = {}
            for name, kwargs in configs.items():
                backend = load_open_model(model_dir, "cpu", initial_span=span, **kwargs)
                fills[name] = [backend.tokenizer.encode(backend.fill(r, decode, document="d",
                                                                     is_cancelled=lambda: False).text)
                               for r in requests]
            row = {}
            for name, mine in fills.items():
                row[name] = {"vs_exact": _fill_agreement(mine, fills["exact (every step a full pass)"]),
                             "vs_one_full_pass": _fill_agreement(mine, fills["off, one full pass"])}
            row["first_pass_top1"] = {suffix: _first_pass_agreement(probe, requests, span, plan, suffix)
                                      for suffix in ("shift", "reencode")}
            out[family] = row
    return out


def _fill_agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = total = identical = 0
    for x, y in zip(a, b):
        total += max(len(x), len(y))
        same += sum(p == q for p, q in zip(x, y))
        identical += x == y
    return {"tokens_equal": same / total if total else 1.0, "fills_identical": identical / len(a) if a else None}


def _first_pass_agreement(backend, requests: list, span: int, plan: TypingPlan, suffix: str) -> dict:
    """Follow the keystroke cache's snapshots through the typed requests; at each reuse compare the first
    pass's span predictions with the exact full pass's: top-1 equal, and the largest logit error relative
    to the exact logits' range."""
    from denoiser.open_models.keystroke_cache import ContextSnapshot, plan_reuse

    model, mask, shift = backend.model, backend.tokenizer.special.mask, int(backend.spec.shift_logits)
    snapshot, equal, total, worst, reuses = None, 0, 0, 0.0, 0
    for request in requests:
        head, tail = backend.layout(request, span)
        seq = torch.tensor(head + [mask] * span + tail)
        rows = (torch.arange(len(head), len(head) + span) - shift).clamp(min=0)
        exact_kv = KVStore()
        exact = model.full(seq, rows=rows, kv=exact_kv)
        reuse = None
        if snapshot is not None and snapshot.reuses < plan.refresh_after:
            reuse = plan_reuse(model, snapshot, head, tail, span, shift=shift, suffix=suffix, min_reuse=plan.min_reuse)
        if reuse is None:
            snapshot = ContextSnapshot(head=head, tail=tail, span=span, kv=exact_kv)
            continue
        approx = model.recompute(seq[reuse.fresh], reuse.fresh, reuse.kv, rows=torch.searchsorted(reuse.fresh, rows))
        equal += int((approx.argmax(-1) == exact.argmax(-1)).sum())
        total += span
        worst = max(worst, ((approx - exact).abs().max() / (exact.max() - exact.min())).item())
        reuses += 1
        snapshot = ContextSnapshot(head=head, tail=tail, span=span, kv=reuse.kv, reuses=reuse.reuses)
    return {"top1_equal": equal / total if total else None, "max_logit_error_of_range": worst, "reusing_requests": reuses}


def run_typing(entries: list[CatalogueEntry], precisions: list[str], plan: TypingPlan, workdir: Path, *,
               use_cache: bool = True, keep: bool = False, say: Callable[[str], None] = print) -> dict:
    """The typing measurement for every distinct shape among `entries` (random weights where the real ones
    are not cached), each weight format in a fresh process, and the agreement measurement on tiny models."""
    report = {"machine": _machine(plan.threads),
              "plan": asdict(plan), "configs": {name: {"keystroke_cache": suffix, "refresh_every": refresh}
                                                for name, (suffix, refresh) in TYPING_CONFIGS.items()},
              "shapes": []}
    for key, row, model_dir in shape_checkpoints(entries, report, use_cache=use_cache, workdir=workdir, keep=keep,
                                                 say=say):
        for precision in precisions:
            say(f"{key}: typing {plan.requests} requests in {precision} ({', '.join(plan.schedules)})")
            result = measure_typing_in_child(model_dir, precision, plan)
            row["results"].append(result)
            for line in typing_summary(result):
                say(line)
    say("agreement on tiny random checkpoints of each family")
    report["agreement_tiny"] = keystroke_agreement(plan)
    report["machine"]["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return report


def typing_summary(result: dict) -> list[str]:
    if "skipped" in result:
        return [f"  {result['precision']}: skipped: {result['skipped']}"]
    lines = []
    for schedule, s in result["schedules"].items():
        cold = s["cold_s"]
        lines.append(f"  {result['precision']} {schedule} (span {s['span']}, {s['steps']} steps): cold "
                     + ", ".join(f"{n} {c.get('p50', float('nan')):.2f} s" for n, c in cold.items()))
        for name, row in s["configs"].items():
            k = row["keystroke_s"]
            ratio = row["p50_ratio_to_default"]
            refreshes = "" if row["refreshes"] is None else f", refreshes {row['refreshes']}"
            times = f"x{ratio:.2f} of the default" if ratio else ""
            lines.append(f"    {name:<24} keystroke p50 {k.get('p50', float('nan')):6.3f} s  "
                         f"p99 {k.get('p99', float('nan')):6.3f} s  (n={k['n']}{refreshes})  "
                         f"reused {row['reused_share']:.0%}  {times}")
    return lines


def plot_typing(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for row in report["shapes"] for r in row["results"] if "skipped" not in r]
    schedules = list(report["plan"]["schedules"])
    if not results:
        return
    fig, axes = plt.subplots(len(results), len(schedules), figsize=(6 * len(schedules), 3.6 * len(results)),
                             squeeze=False, sharey=True)
    for i, result in enumerate(results):
        for j, schedule in enumerate(schedules):
            ax, s = axes[i][j], result["schedules"][schedule]
            for k, (name, row) in enumerate(s["configs"].items()):
                series = row["per_request"]
                ax.plot([r["request"] for r in series], [r["s"] for r in series], ".-" if len(series) > 1 else ".",
                        color=f"C{k}", markersize=4, linewidth=0.7,
                        label=f"{name}: p50 {row['keystroke_s'].get('p50', float('nan')):.2f} s")
                refreshes = [r for r in series if TYPING_CONFIGS[name][0] and r["reused"] == 0]
                ax.scatter([r["request"] for r in refreshes], [r["s"] for r in refreshes], marker="x", color=f"C{k}",
                           s=24)
            ax.axhline(0.4, color="gray", linestyle=":", linewidth=1)
            ax.set_yscale("log")
            ax.set_title(f"{result['precision']}, span {s['span']}, {s['steps']} steps "
                         f"(load {result['load_average']['mean']:.1f})", fontsize=9)
            ax.set_xlabel("keystroke request (x: full refresh)")
            if j == 0:
                ax.set_ylabel("seconds per request")
            ax.legend(fontsize=7, loc="upper right")
    held = statistics.median(r.get("context_tokens", report["plan"]["context"]) for r in results)
    fig.suptitle(f"{report['shapes'][0]['models'][0]} shape, {report['plan']['context']}-token context "
                 f"(median {held:.0f} while typing), "
                 f"{report['plan']['chars']} chars per request, {report['machine']['threads']} threads "
                 f"({report['machine']['cpu']}); dotted: 400 ms", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- entry point -----------------------------------------------------------------------------

def typing_main(args, names: list[str], parser: argparse.ArgumentParser, argv: list[str]) -> int:
    schedules = tuple(args.typing_schedules.split(","))
    if not all(len(x.split("x")) == 2 and all(p.isdigit() and int(p) > 0 for p in x.split("x")) for x in schedules):
        parser.error(f"--typing-schedules takes SPANxSTEPS items such as 32x8, got {args.typing_schedules!r}")
    plan = TypingPlan(file=args.typing_file, context=args.context, requests=args.typing_requests,
                      chars=args.typing_chars, schedules=schedules, off_every=max(1, args.typing_off_every),
                      threads=args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="parafill-open-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = run_typing([e for e in CATALOGUE if e.name in names], args.precisions.split(","), plan, workdir,
                        use_cache=not args.random, keep=args.keep,
                        say=lambda line: print(line, file=sys.stderr, flush=True))
    report["command"] = "python -m tools.open_model_bench " + shlex.join(argv)
    report["wall_s"] = time.perf_counter() - started
    for row in report["shapes"]:
        for result in row["results"]:
            print("\n".join(typing_summary(result)))
    if args.json:
        out = Path(args.json)
        out.write_text(json.dumps(report, indent=1))
        plot_typing(report, out.with_suffix(".png"))
    return 0

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--measure-one"]:
        job = json.loads(argv[1])
        print(json.dumps(measure(Path(job["model_dir"]), job["precision"], CostPlan(**job["plan"]), job["evict"])))
        return 0
    if argv[:1] == ["--measure-typing"]:
        job = json.loads(argv[1])
        plan = TypingPlan(**{**job["plan"], "schedules": tuple(job["plan"]["schedules"])})
        print(json.dumps(measure_typing(Path(job["model_dir"]), job["precision"], plan)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-costs", action="store_true",
                        help="measure each catalogue model on this CPU (load, memory, one inline completion)")
    parser.add_argument("--shapes", default="0.5B,1.5B,7B", help=f"GPU mode: comma list of {', '.join(SHAPES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="GPU mode: device")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--span", type=int, default=None, help="span tokens (GPU mode 64, CPU mode 32)")
    parser.add_argument("--refresh-every", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="GPU mode: timed repeats")
    parser.add_argument("--no-baselines", action="store_true", help="GPU mode: skip the transformers baselines")
    parser.add_argument("--models", default="all", help="CPU mode: comma list of catalogue names, or all")
    parser.add_argument("--precisions", default="bf16,int8", help=f"CPU mode: comma list of {', '.join(PRECISIONS)}")
    parser.add_argument("--steps", type=int, default=8, help="CPU mode: denoising steps per completion")
    parser.add_argument("--requests", type=int, default=10, help="CPU mode: timed completions per model and format")
    parser.add_argument("--warmup", type=int, default=1, help="CPU mode: untimed completions first")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU mode: torch threads")
    parser.add_argument("--random", action="store_true", help="CPU mode: random weights even when the real ones are cached")
    parser.add_argument("--workdir", default=None, help="CPU mode: where random checkpoints are written (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="CPU mode: keep the random checkpoints")
    parser.add_argument("--typing", action="store_true",
                        help="CPU mode: instead of single completions, type a file a few characters per request "
                             "with the keystroke cache on and off (writes a PNG beside --json)")
    parser.add_argument("--typing-file", default="", help="CPU mode, --typing: the file typed (default: textwrap.py)")
    parser.add_argument("--typing-requests", type=int, default=40, help="CPU mode, --typing: keystroke requests")
    parser.add_argument("--typing-chars", type=int, default=3, help="CPU mode, --typing: characters per request")
    parser.add_argument("--typing-schedules", default="32x8,16x4",
                        help="CPU mode, --typing: comma list of SPANxSTEPS (span tokens x denoising steps)")
    parser.add_argument("--typing-off-every", type=int, default=4,
                        help="CPU mode, --typing: run the cache-off configurations on every Nth keystroke")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.cpu_costs:
        names = [e.name for e in CATALOGUE] if args.models == "all" else args.models.split(",")
        unknown = sorted(set(names) - {e.name for e in CATALOGUE})
        bad = sorted(set(args.precisions.split(",")) - set(PRECISIONS))
        if unknown or bad:
            parser.error(f"unknown model(s) {unknown} or format(s) {bad}; see `parafill model list`")
        if args.typing:
            return typing_main(args, names, parser, argv)
        plan = CostPlan(context=args.context, span=args.span or 32, steps=args.steps, refresh_every=args.refresh_every,
                        requests=args.requests, warmup=args.warmup, threads=args.threads)
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="parafill-open-bench-"))
        workdir.mkdir(parents=True, exist_ok=True)
        entries = [e for e in CATALOGUE if e.name in names]
        report = run_cpu_costs(entries, args.precisions.split(","), plan, workdir, use_cache=not args.random,
                               keep=args.keep, say=lambda line: print(line, file=sys.stderr, flush=True))
        print_cpu_report(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
        return 0
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    span = args.span or 64
    rows = run_benchmark(args.shapes.split(","), device, args.context, span, refresh_every=args.refresh_every,
                         repeats=args.repeats, baselines=not args.no_baselines)
    print(f"device: {name}; context {args.context}, span {span}")
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
