"""`parafill bench`: reproducible speed numbers, written as JSON + a plot under bench/results/.

What it measures (bench/README.md has the commands):
- e2e: latency through a real stdio LSP client (`python -m lsp_server serve`)
  replaying an editor-like session: typing with automatic inline requests,
  invoked inline and menu completions, edits elsewhere in the file; p50/p90/p99;
- denoiser: time per denoising step by span length and batch size, hence
  tokens/s at each step count, and GB/s of weights (and context K/V) read
  against the device's memory bandwidth, as gpt-fast reports;
- autoregressive: the same weights decoding one token per forward with the
  causal context cache (denoiser/autoregressive.py), in the same run, and the
  denoiser/autoregressive ratio;
- context scaling (512 → 16k tokens, as far as the model's positions allow;
  lengths it cannot hold are listed with the reason) and concurrency (1, 4, 16
  clients calling the engine from their own threads, sharing steps);
- peak host (and GPU) memory.
`--soak N` hands over to `tools.soak` (the reliability soak). This module
measures and reports only: it holds no model or server logic of its own.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from lsp_server.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results"

# Peak memory bandwidth (GB/s) of devices we know; others are measured with a large copy.
KNOWN_BANDWIDTH_GBPS = {"H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0, "H200": 4800.0,
                        "A100-SXM4-80GB": 2039.0, "A100-PCIE-40GB": 1555.0, "A100": 1935.0,
                        "L4": 300.0, "RTX 4090": 1008.0}

# --tiny: random weights in the shape of the default model (denoiser.config.ModelConfig defaults).
TINY_SHAPE = dict(d_model=256, n_layers=6, n_heads=4, d_ff=768, max_positions=4096)
TINY_SHAPE_QUICK = dict(d_model=64, n_layers=2, n_heads=4, d_ff=128, max_positions=4096)


class Plan:
    """How much to measure: full or --quick (CI-size)."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.spans = (16, 32) if quick else (16, 32, 64, 128)
        self.steps = (1, 4, 8) if quick else (1, 2, 4, 8, 16, 32)
        self.batches = (1, 4) if quick else (1, 4, 16)
        self.contexts = (512, 1024) if quick else (512, 1024, 2048, 4096, 8192, 16384)
        self.clients = (1, 4) if quick else (1, 4, 16)
        self.requests_per_client = 2 if quick else 16
        self.keystrokes = 8 if quick else 200
        self.step_reps = 3 if quick else 30
        self.ar_tokens = 8 if quick else 64
        self.headline_context = 1024
        self.headline_span = 32
        self.copy_bytes = (16 if quick else 256) << 20
        # Decode settings of real fills and the LSP session: the product's defaults, or at
        # most 4 steps per span for CI (random weights are never confident, so each span
        # would otherwise take one step per token).
        self.decode_steps = 4 if quick else Settings().steps


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parafill bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="model directory (default: the model shipped with parafill)")
    parser.add_argument("--tiny", action="store_true",
                        help="benchmark a random model of the default model's shape (for development)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (default: auto = cuda if available); results are named after it")
    parser.add_argument("--quick", action="store_true", help="CI-size run: few shapes, few repetitions")
    parser.add_argument("--out", metavar="DIR", default=str(DEFAULT_OUT), help="where results go (default: bench/results)")
    parser.add_argument("--no-lsp", action="store_true", help="skip the end-to-end LSP session")
    parser.add_argument("--no-plot", action="store_true", help="write the JSON only")
    parser.add_argument("--soak", type=int, metavar="N", default=None,
                        help="run the reliability soak with N operations instead (tools.soak)")
    parser.add_argument("--train", action="store_true",
                        help="measure the training step instead: tokens/s and GFLOP/s in fp32, bf16 and bf16 "
                             "compiled against this machine's matmul rate (`parafill bench --train --help`)")
    parser.add_argument("--contended", action="store_true",
                        help="measure completion latency idle and beside busy processes, for several thread "
                             "counts (`parafill bench --contended --help`)")
    parser.add_argument("--engine", action="store_true",
                        help="measure the team engine instead: the hop against in-process, and requests/s for "
                             "1, 4 and 16 clients against 1 and 2 replicas (`parafill bench --engine --help`)")
    parser.add_argument("--open-models", action="store_true",
                        help="what each open model's shape costs on this CPU: load time, memory, fill latency in "
                             "fp32/bf16/int8 (`parafill bench --open-models --help`)")
    parser.add_argument("--typing", action="store_true",
                        help="type a real file forward through a real server, a few characters per request: "
                             "context K/V reuse and latency (`parafill bench --typing --help`)")
    return parser


# --- helpers ---------------------------------------------------------------------------
def percentiles(values) -> dict:
    from denoiser.engine import percentiles as nearest_rank

    return {**nearest_rank(values), "n": len(values), "mean": round(statistics.fmean(values), 3) if values else None}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device) -> dict:
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count, "torch": torch.__version__,
                "cuda": torch.version.cuda}
    return {"type": "cpu", "name": cpu_name(), "torch_threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "torch": torch.__version__}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bandwidth(device, plan: Plan) -> dict:
    """The device's peak bandwidth when known, else measured: GB/s of a large copy (read + write)."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, gbps in KNOWN_BANDWIDTH_GBPS.items():
            if key in name:
                return {"gbps": gbps, "method": f"datasheet peak for {key}"}
    n = plan.copy_bytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        sync(device)
        started = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - started)
    gbps = 2 * plan.copy_bytes / min(times) / 1e9
    return {"gbps": round(gbps, 2), "method": f"measured: copy of {plan.copy_bytes >> 20} MiB (read + write), best of 5"}


def matmul_rate(device, dtype) -> dict:
    """GFLOP/s of one large matmul in the model's dtype with this process's threads: the rate a
    step's arithmetic could run at, so a step time can be set against its bound."""
    import torch

    m, k, n = 4096, 512, 1408
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    seconds = min(timed(lambda: a @ b, device, 3) for _ in range(3))
    return {"gflops": round(2 * m * k * n / seconds / 1e9, 1), "shape": f"{m}x{k} @ {k}x{n}",
            "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads()}


def span_step_flop_parts(config, batch: int, context: int, span: int) -> dict[str, float]:
    """FLOPs of one denoising step (2 per multiply-add) by kind: "linear", the span's tokens through
    every layer's projections and the output head at every span position; "attention", their
    attention over the cached context and the span."""
    from training.step import body_parameters

    tokens = batch * span
    body = 2 * body_parameters(config) * tokens
    head = 2 * config.d_model * config.vocab_size * tokens
    attention = config.n_layers * 4 * (context + span) * config.d_model * tokens
    return {"linear": float(body + head), "attention": float(attention)}


def span_step_flops(config, batch: int, context: int, span: int) -> float:
    """FLOPs of one denoising step (`span_step_flop_parts` together)."""
    return sum(span_step_flop_parts(config, batch, context, span).values())


def step_dtypes(backend) -> dict[str, str]:
    """The dtype each kind of a step's FLOPs runs in: the model's, except a CPU step in bf16
    (`denoiser.model.CpuInference`), whose linear layers run in bf16 and attention in fp32."""
    model_dtype = str(backend.dtype).replace("torch.", "")
    linear = "bfloat16" if getattr(backend, "cpu_precision", None) == "bf16" else model_dtype
    return {"linear": linear, "attention": model_dtype}


def step_bound_s(parts: dict[str, float], dtypes: dict[str, str], rates: dict[str, dict]) -> float:
    """Seconds the step's arithmetic takes with each kind at the measured matmul rate of its dtype."""
    return sum(flops / (rates[dtypes[kind]]["gflops"] * 1e9) for kind, flops in parts.items())


def timed(fn, device, reps: int) -> float:
    """Median seconds of fn() over reps runs, after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def timed_compiled_and_not(fn, backend, reps: int, rounds: int = 5) -> tuple[float, float]:
    """Median seconds of fn() with the backend's compiled CPU steps and without them, timed in
    alternating rounds so that a shared machine's slower spells weigh on both alike."""
    cpu = backend.model.cpu_inference
    compiled = cpu.compiled
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for _ in range(rounds):
            for use in (True, False):
                cpu.compiled = compiled if use else None
                fn()
                for _ in range(max(1, reps // rounds)):
                    started = time.perf_counter()
                    fn()
                    times[use].append(time.perf_counter() - started)
    finally:
        cpu.compiled = compiled
    return statistics.median(times[True]), statistics.median(times[False])


def random_context(backend, length: int, seed: int = 0) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, backend.tokenizer.vocab_size, (length,), generator=g).tolist()


# --- denoiser and autoregressive throughput -------------------------------------------------
def step_timer(backend, context_len: int, span_len: int, batch: int):
    """A function running one denoising step (the product's step runner) for `batch` rows, its
    context K/V, and whether the step runs compiled: where the backend compiles CPU steps, this
    shape is compiled first (a server does it in the background, after the shape's first step)."""
    import torch

    from denoiser.batching import EagerStep, StepState
    from denoiser.config import MASK_ID
    from denoiser.model import KVBuffers

    model, device = backend.model, backend.device
    capacity = min(model.config.max_positions, -(-(context_len + span_len) // 1024) * 1024)
    kv = KVBuffers.allocate(model.config, batch, capacity, device, backend.dtype)
    ids = torch.tensor([random_context(backend, context_len)] * batch, device=device)
    for start in range(0, context_len, 2048):  # in pieces: bounded attention memory
        model.prefill(ids[:, start:start + 2048], kv, start)
    runner = backend.batcher.step_runner
    pooled = batch > 1 or runner.pooled_when_alone
    ctx = torch.full((batch,), context_len, dtype=torch.int32, device=device) if pooled else context_len
    state = StepState(
        span=torch.full((batch, span_len), MASK_ID, dtype=torch.long, device=device),
        masked=torch.ones((batch, span_len), dtype=torch.bool, device=device),
        steps=torch.zeros(batch, dtype=torch.long, device=device),
        live=torch.ones(batch, dtype=torch.bool, device=device),
        # Never confident enough: one commit per step, so the state never runs out of masks.
        threshold=torch.full((batch,), 2.0, device=device),
        max_steps=torch.zeros(batch, dtype=torch.long, device=device),
        ctx_len=ctx,
    )
    if not isinstance(runner, EagerStep) and not runner.pooled_when_alone:
        runner = EagerStep()
    compiled = getattr(getattr(model, "cpu_inference", None), "compiled", None)
    compiled = compiled is not None and compiled.compile_now(batch)

    def step():
        state.masked.fill_(True)
        state.span.fill_(MASK_ID)
        state.live.fill_(True)
        runner(model, state, kv, batch, backend.batcher.banned, backend.batcher.vocab_limit)

    return step, kv, compiled


def weight_bytes(model, matrix_dtype=None) -> int:
    """Bytes of the model's weights, its matrices counted in `matrix_dtype` when given (what a
    bf16 CPU step reads: its bf16 copies)."""
    import torch

    matrix_size = torch.empty(0, dtype=matrix_dtype).element_size() if matrix_dtype is not None else None
    return sum(p.numel() * (matrix_size if matrix_size and p.dim() == 2 else p.element_size())
               for p in model.parameters())


def kv_bytes(config, context_len: int, element_size: int) -> int:
    return 2 * config.n_layers * context_len * config.d_model * element_size


def bench_denoiser(backend, plan: Plan, bandwidth_gbps: float, rates: dict[str, dict]) -> dict:
    """Step times by span and batch, each beside its FLOPs and its bound: the time the FLOPs take
    at the matmul rate of the dtype they run in (`rates`: dtype name -> `matmul_rate`). When that
    is not the model's dtype (a bf16 CPU step), the bound with every FLOP at the model dtype's
    rate is given as well, so results compare across precisions."""
    import torch

    config = backend.model.config
    dtypes = step_dtypes(backend)
    model_dtype = dtypes["attention"]
    mixed = set(dtypes.values()) != {model_dtype}
    element = backend.model.embed.weight.element_size()
    weights = weight_bytes(backend.model, getattr(torch, dtypes["linear"]))
    ctx = min(plan.headline_context, config.max_positions - max(plan.spans))
    rows = []
    for span_len in plan.spans:
        for batch in plan.batches:
            step, _, compiled = step_timer(backend, ctx, span_len, batch)
            uncompiled = {}
            if compiled:  # and what compiling buys, from the same stretch of time
                seconds, plain = timed_compiled_and_not(step, backend, 2 * plan.step_reps)
                uncompiled = {"step_ms_uncompiled": round(plain * 1000, 4)}
            else:
                seconds = timed(step, backend.device, plan.step_reps)
            read = weights + batch * kv_bytes(config, ctx, element)
            parts = span_step_flop_parts(config, batch, ctx, span_len)
            flops = sum(parts.values())
            bound = step_bound_s(parts, dtypes, rates)
            at_model_dtype = {}
            if mixed:
                bound_model = step_bound_s(parts, dict.fromkeys(parts, model_dtype), rates)
                at_model_dtype = {f"bound_{model_dtype}_ms": round(bound_model * 1000, 4),
                                  f"x_bound_{model_dtype}": round(seconds / bound_model, 2)}
            rows.append({
                "span": span_len, "batch": batch, "context": ctx, "compiled": compiled,
                "step_ms": round(seconds * 1000, 4), **uncompiled,
                # The step's arithmetic, the time it takes at the measured matmul rates, how far off that it is.
                "gflop": round(flops / 1e9, 4), "bound_ms": round(bound * 1000, 4), "x_bound": round(seconds / bound, 2),
                **at_model_dtype,
                "weights_gbps": round(weights / seconds / 1e9, 3),
                "weights_and_kv_gbps": round(read / seconds / 1e9, 3),
                "bandwidth_fraction": round(read / seconds / 1e9 / bandwidth_gbps, 4),
                # A span of L tokens finished in S steps: L * batch tokens per S steps.
                "tokens_per_s_by_steps": {str(s): round(span_len * batch / (s * seconds), 1)
                                          for s in plan.steps if s <= span_len},
            })
    return {"context": ctx, "weight_bytes": weights, "flop_dtypes": dtypes, "rows": rows}


def bench_autoregressive(backend, plan: Plan) -> dict:
    """Per-token time of the same weights decoding autoregressively with the causal K/V cache."""
    from denoiser.autoregressive import generate_autoregressive
    from denoiser.kv_cache import ContextKVCache

    model = backend.model
    cache = ContextKVCache(model, max_documents=1, device=backend.device, dtype=backend.dtype)
    ctx = min(plan.headline_context, model.config.max_positions - plan.ar_tokens - 1)
    ids = random_context(backend, ctx)
    generate_autoregressive(model, cache, "ar", ids, 1)  # context prefill, not timed
    times = []
    for _ in range(plan.ar_tokens):
        sync(backend.device)
        started = time.perf_counter()
        # One call = one forward over the newest token with the cached context + the LM head.
        tokens, _, _ = generate_autoregressive(model, cache, "ar", ids, 1, vocab_limit=backend.tokenizer.vocab_size)
        sync(backend.device)
        times.append(time.perf_counter() - started)
        ids = ids + (tokens or [7])  # an end token would stop a real decode; keep going for timing
    per_token = statistics.median(times)
    weights = weight_bytes(model)
    return {"context": ctx, "tokens": plan.ar_tokens, "token_ms": round(per_token * 1000, 4),
            "tokens_per_s": round(1 / per_token, 1), "weights_gbps": round(weights / per_token / 1e9, 3)}


def real_fills(engine_backend, plan: Plan) -> dict:
    """Default decode settings on editor-like requests: the denoiser and the AR baseline on the same prompts.

    Each request is a new document (a cold context, as `parafill complete` has), after
    one untimed warm-up fill; latency percentiles are per request.
    """
    from denoiser.autoregressive import AutoregressiveBackend
    from denoiser.backend import DecodeSettings

    ar = AutoregressiveBackend(engine_backend)
    requests = sample_requests(plan)
    decode = DecodeSettings(steps=plan.decode_steps)
    out = {}
    for name, backend in (("denoiser", engine_backend), ("autoregressive", ar)):
        backend.fill(requests[0], decode, document=f"warmup-{name}")
        tokens = steps = 0
        latencies = []
        for i, request in enumerate(requests):
            sync(engine_backend.device)
            started = time.perf_counter()
            result = backend.fill(request, decode, document=f"fill-{name}-{i}")
            sync(engine_backend.device)
            latencies.append((time.perf_counter() - started) * 1000)
            tokens += result.tokens
            steps += result.steps
        elapsed = sum(latencies) / 1000
        out[name] = {"requests": len(requests), "tokens": tokens, "forward_passes": steps,
                     "ms_per_request": round(elapsed * 1000 / len(requests), 3),
                     "latency_ms": percentiles(latencies),
                     "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None}
    return out


SAMPLE_SOURCE = REPO / "fim" / "context.py"


def sample_requests(plan: Plan):
    from fim import ContextOptions, build_request

    text = SAMPLE_SOURCE.read_text(encoding="utf-8")
    lines = text.splitlines()
    picks = range(40, len(lines), max(1, len(lines) // (3 if plan.quick else 12)))
    options = ContextOptions(context_tokens=plan.headline_context, max_span_tokens_line=plan.headline_span,
                             max_span_tokens_block=2 * plan.headline_span)
    return [build_request(text, line, len(lines[line]) // 2, path="context.py", language_id="python",
                          options=options) for line in picks]


# --- context scaling and concurrency ------------------------------------------------------
def bench_context_scaling(backend, plan: Plan) -> dict:
    config = backend.model.config
    span = plan.headline_span
    rows, skipped = [], []
    for ctx in plan.contexts:
        if ctx + span > config.max_positions:
            skipped.append({"context": ctx, "reason": f"the model has {config.max_positions} positions "
                            f"(rotary tables and training); {ctx} context + {span} span tokens do not fit"})
            continue
        step, kv, _ = step_timer(backend, ctx, span, 1)
        seconds = timed(step, backend.device, max(1, plan.step_reps // 3))
        ids = __import__("torch").tensor([random_context(backend, ctx)], device=backend.device)
        sync(backend.device)
        started = time.perf_counter()
        for start in range(0, ctx, 2048):
            backend.model.prefill(ids[:, start:start + 2048], kv, start)
        sync(backend.device)
        prefill = time.perf_counter() - started
        rows.append({"context": ctx, "span": span, "step_ms": round(seconds * 1000, 4),
                     "cold_prefill_ms": round(prefill * 1000, 3),
                     "note": "a keystroke re-uses the cached context: its cost is a few tokens of prefill, then steps"})
    trained = getattr(config, "context_tokens", None)
    return {"rows": rows, "skipped": skipped, "trained_context_tokens": trained,
            "served_context_tokens": backend.max_context_tokens}


def bench_concurrency(model_dir, device: str, plan: Plan) -> dict:
    """N clients, each its own document, calling Engine.complete from their own threads."""
    from denoiser.backend import DecodeSettings
    from denoiser.engine import Engine
    from denoiser.native_backend import NativeBackend
    from fim import ContextOptions, build_request

    text = SAMPLE_SOURCE.read_text(encoding="utf-8")
    lines = text.splitlines()
    options = ContextOptions(context_tokens=plan.headline_context, max_span_tokens_line=plan.headline_span)
    rows = []
    for clients in plan.clients:
        backend = NativeBackend(model_dir, device, max_documents=max(plan.clients), max_batch=max(plan.clients))
        engine = Engine(backend)
        latencies: list[float] = []
        lock = threading.Lock()
        barrier = threading.Barrier(clients)

        def client(c: int) -> None:
            barrier.wait()
            line = 30 + 7 * c % max(1, len(lines) - 40)
            for r in range(plan.requests_per_client):
                # Typing: each request sees one more character of the line (a completion-cache miss).
                column = min(len(lines[line]), 4 + r)
                request = build_request(text, line, column, path=f"client{c}.py", language_id="python",
                                        options=options)
                done = engine.complete(request, DecodeSettings(steps=plan.decode_steps), document=f"client{c}")
                with lock:
                    latencies.append(done.elapsed_ms)

        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        rows.append({"clients": clients, "requests": len(latencies), "latency_ms": percentiles(latencies),
                     "requests_per_s": round(len(latencies) / wall, 2), "batching": backend.batching_stats()})
    return {"level": "engine: one thread per client, each its own document (the server's worker is one of them)",
            "rows": rows}


# --- end to end over LSP ----------------------------------------------------------------------
async def lsp_session(model_dir: Path, device: str, plan: Plan) -> dict:
    from lsprotocol import types
    from pygls.lsp.client import LanguageClient

    client = LanguageClient("parafill-bench", "0.1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    await client.start_io(sys.executable, "-m", "lsp_server", "serve", "--device", device, "--log-level", "error",
                          env=env)
    server_pid = getattr(getattr(client, "_server", None), "pid", None)
    settings = {"parafill": {"model": str(model_dir), "debounceMs": 0, "contextTokens": plan.headline_context,
                             "spanTokensLine": plan.headline_span, "steps": plan.decode_steps}}
    await client.initialize_async(types.InitializeParams(
        capabilities=types.ClientCapabilities(text_document=types.TextDocumentClientCapabilities(
            inline_completion=types.InlineCompletionClientCapabilities(),
            completion=types.CompletionClientCapabilities())),
        initialization_options=settings))
    client.initialized(types.InitializedParams())
    load_started = time.perf_counter()
    status = {}
    while time.perf_counter() - load_started < 300:
        status = plain_json(await client.protocol.send_request_async("parafill/status", {}))
        if status.get("state") in ("ready", "error"):
            break
        await asyncio.sleep(0.1)
    if status.get("state") != "ready":
        raise RuntimeError(f"the server did not load the model: {status.get('message')}")
    load_s = time.perf_counter() - load_started

    text = SAMPLE_SOURCE.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    cut = len(lines) // 2
    typed = "".join(lines[cut:])[: plan.keystrokes]
    uri = "file:///bench/session.py"
    document = "".join(lines[:cut])
    version = 1
    client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=types.TextDocumentItem(
        uri=uri, language_id="python", version=version, text=document)))
    latencies: dict[str, list[float]] = {"inline_automatic": [], "inline_invoked": [], "completion_invoked": []}

    async def timed_request(kind: str, coroutine) -> None:
        started = time.perf_counter()
        await coroutine
        latencies[kind].append((time.perf_counter() - started) * 1000)

    def position_at_end(doc: str) -> types.Position:
        rows = doc.split("\n")
        return types.Position(line=len(rows) - 1, character=len(rows[-1].encode("utf-16-le")) // 2)

    def change(doc_before: str, at: types.Position, new: str) -> None:
        nonlocal version
        version += 1
        client.text_document_did_change(types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
            content_changes=[types.TextDocumentContentChangePartial(range=types.Range(start=at, end=at), text=new)]))

    def inline(kind) -> object:
        return client.text_document_inline_completion_async(types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri), position=position_at_end(document),
            context=types.InlineCompletionContext(trigger_kind=kind)))

    for i, char in enumerate(typed):
        change(document, position_at_end(document), char)
        document += char
        if i % 25 == 24:  # an edit far above the cursor: the context's cached K/V is reused only up to it
            change(document, types.Position(line=2, character=0), "# edited\n")
            document = "\n".join(document.split("\n")[:2] + ["# edited"] + document.split("\n")[2:])
        await timed_request("inline_automatic", inline(types.InlineCompletionTriggerKind.Automatic))
        if i % 10 == 9:
            await timed_request("inline_invoked", inline(types.InlineCompletionTriggerKind.Invoked))
        if i % 15 == 14 or (plan.quick and i == len(typed) - 1):
            await timed_request("completion_invoked", client.text_document_completion_async(types.CompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri), position=position_at_end(document),
                context=types.CompletionContext(trigger_kind=types.CompletionTriggerKind.Invoked))))
    status = plain_json(await client.protocol.send_request_async("parafill/status", {}))
    server_peak_kib = _peak_rss_kib(server_pid)
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    every = [v for values in latencies.values() for v in values]
    return {"keystrokes": len(typed), "debounce_ms": 0, "model_load_s": round(load_s, 2),
            "latency_ms": {"all": percentiles(every), **{k: percentiles(v) for k, v in latencies.items()}},
            "server_peak_rss_mib": round(server_peak_kib / 1024, 1) if server_peak_kib else None,
            "server_status": status}


def plain_json(value):
    """pygls turns JSON objects of custom methods into named tuples; back to dicts."""
    if hasattr(value, "_asdict"):
        return {k: plain_json(v) for k, v in value._asdict().items()}
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    return value


def _peak_rss_kib(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# --- report --------------------------------------------------------------------------------
def headline(report: dict, plan: Plan) -> dict:
    rows = [r for r in report["denoiser"]["rows"] if r["span"] == plan.headline_span and r["batch"] == 1]
    ar = report["autoregressive"]["tokens_per_s"]
    out = {"span": plan.headline_span, "context": report["denoiser"]["context"], "autoregressive_tokens_per_s": ar}
    if rows:
        out["step"] = {k: v for k, v in rows[0].items() if k in ("step_ms", "gflop") or "bound" in k}
        by_steps = rows[0]["tokens_per_s_by_steps"]
        out["denoiser_tokens_per_s_by_steps"] = by_steps
        out["ratio_to_autoregressive_by_steps"] = {s: round(v / ar, 2) for s, v in by_steps.items()}
    fills = report.get("real_fills") or {}
    if "denoiser" in fills:
        # What one `parafill complete` costs after warm-up (cold context): the CPU latency that matters.
        out["complete_cold_context_ms"] = fills["denoiser"]["latency_ms"]
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    fig.suptitle(f"parafill bench — {report['model']['name']} on {report['device']['name']}", fontsize=10)
    ax = axes[0][0]
    e2e = report.get("e2e_lsp")
    if e2e:
        kinds = [k for k, v in e2e["latency_ms"].items() if v["n"]]
        for i, p in enumerate(("p50", "p90", "p99")):
            ax.bar([x + i * 0.25 for x in range(len(kinds))], [e2e["latency_ms"][k][p] for k in kinds], 0.25, label=p)
        ax.set_xticks([x + 0.25 for x in range(len(kinds))], kinds, fontsize=7)
        ax.legend()
    ax.set_title("end-to-end LSP latency (ms)")
    ax = axes[0][1]
    rows = [r for r in report["denoiser"]["rows"] if r["batch"] == 1]
    for r in rows:
        steps = sorted(int(s) for s in r["tokens_per_s_by_steps"])
        ax.plot(steps, [r["tokens_per_s_by_steps"][str(s)] for s in steps], marker="o", label=f"span {r['span']}")
    ax.axhline(report["autoregressive"]["tokens_per_s"], color="k", linestyle="--", label="autoregressive")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("denoising steps per span")
    ax.set_title("tokens/s, batch 1 (same weights)")
    ax.legend(fontsize=7)
    ax = axes[1][0]
    scaling = report["context_scaling"]["rows"]
    ax.plot([r["context"] for r in scaling], [r["step_ms"] for r in scaling], marker="o", label="step")
    ax.plot([r["context"] for r in scaling], [r["cold_prefill_ms"] for r in scaling], marker="s", label="cold prefill")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_title("context scaling (ms)")
    ax.legend()
    ax = axes[1][1]
    conc = report["concurrency"]["rows"]
    for p in ("p50", "p99"):
        ax.plot([r["clients"] for r in conc], [r["latency_ms"][p] for r in conc], marker="o", label=f"latency {p}")
    ax.set_xlabel("concurrent clients")
    ax.set_title("concurrency: request latency (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_soak(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        from tools import soak
    except ImportError:
        print("parafill bench: error: --soak needs tools/soak.py, which this copy of parafill lacks", file=sys.stderr)
        return 2
    forwarded = ["--operations", str(args.soak)]
    if args.model:
        forwarded += ["--model", args.model]
    if args.tiny:
        forwarded.append("--tiny")
    forwarded += ["--device", args.device, *rest]
    result = soak.main(forwarded)
    return result if isinstance(result, int) else 0


def resolve_model(args: argparse.Namespace, workdir: Path) -> Path:
    from denoiser.loading import default_model_dir

    if args.tiny:
        from tools.tiny_native import make_tiny_model

        return make_tiny_model(workdir / "tiny-model", **(TINY_SHAPE_QUICK if args.quick else TINY_SHAPE))
    model_dir = Path(args.model).expanduser() if args.model else default_model_dir()
    if not (model_dir / "config.json").is_file():
        hint = "pass --model DIR" if args.model is None else "check the path"
        raise SystemExit(f"parafill bench: error: {model_dir}: no config.json; {hint}, or use --tiny for a random "
                         "model of the default shape")
    return model_dir


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--train" in argv:
        from tools import train_bench

        return train_bench.main([a for a in argv if a != "--train"])
    if "--contended" in argv:
        from tools import contention_bench

        return contention_bench.main([a for a in argv if a != "--contended"])
    if "--open-models" in argv:
        from tools import open_model_bench

        return open_model_bench.main(["--cpu-costs", *[a for a in argv if a != "--open-models"]])
    if "--typing" in argv:
        from tools import typing_bench

        return typing_bench.main([a for a in argv if a != "--typing"])
    if "--engine" in argv:
        from tools import engine_bench

        return engine_bench.main([a for a in argv if a != "--engine"])
    args, rest = build_parser().parse_known_args(argv)
    args.argv = argv
    if args.soak is not None:
        return run_soak(args, rest)
    if rest:
        build_parser().error(f"unrecognised arguments: {' '.join(rest)}")
    plan = Plan(args.quick)
    with tempfile.TemporaryDirectory(prefix="parafill-bench-") as tmp:
        model_dir = resolve_model(args, Path(tmp))
        report = run(model_dir, args, plan)
        name = "tiny-random" if args.tiny else model_dir.name
        report["model"]["name"] = name
        stem = f"{slug(report['device']['name'])[:48]}__{slug(name)}{'__quick' if plan.quick else ''}"
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        json_path = out / f"{stem}.json"
        json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if not args.no_plot:
            plot(report, out / f"{stem}.png")
    print(json.dumps(report["headline"], indent=2))
    print(f"parafill bench: wrote {json_path}", file=sys.stderr)
    return 0


def run(model_dir: Path, args: argparse.Namespace, plan: Plan) -> dict:
    import torch

    from denoiser.native_backend import NativeBackend

    backend = NativeBackend(model_dir, args.device, max_documents=max(plan.clients))
    device = backend.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bandwidth = memory_bandwidth(device, plan)
    report: dict = {
        "command": " ".join(["parafill", "bench", *args.argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": plan.quick,
        "decode": {"steps": plan.decode_steps or "adaptive (0)", "confidence_threshold": Settings().confidence_threshold},
        "device": {**describe_device(device), "bandwidth": bandwidth},
        "model": {"dir": str(model_dir), "parameters": backend.parameters, "dtype": str(backend.dtype).replace("torch.", ""),
                  "config": backend.config.to_json(), "step_runner": type(backend.batcher.step_runner).__name__,
                  "cpu_precision": backend.cpu_precision, "cpu_compiled": backend.cpu_compiled},
    }
    report["device"]["matmul"] = matmul_rate(device, backend.dtype)
    rates = {report["device"]["matmul"]["dtype"]: report["device"]["matmul"]}
    for dtype in set(step_dtypes(backend).values()) - set(rates):
        rates[dtype] = report["device"][f"matmul_{dtype}"] = matmul_rate(device, getattr(torch, dtype))
    report["denoiser"] = bench_denoiser(backend, plan, bandwidth["gbps"], rates)
    dtypes = report["denoiser"]["flop_dtypes"]
    at = ", ".join(f"{kind} at {rates[dtype]['gflops']:g} GFLOP/s {dtype}" for kind, dtype in dtypes.items())
    for row in report["denoiser"]["rows"]:
        model_bound = "".join(f"; {row[key]:.1f}x the bound with every FLOP in {key[len('x_bound_'):]}"
                              for key in row if key.startswith("x_bound_"))
        print(f"step span {row['span']:>3} batch {row['batch']:>2} context {row['context']}: {row['step_ms']:.2f} ms, "
              f"{row['gflop']:.3f} GFLOP, {row['bound_ms']:.2f} ms with {at} "
              f"({row['x_bound']:.1f}x the bound{model_bound})"
              + (f"; uncompiled {row['step_ms_uncompiled']:.2f} ms" if "step_ms_uncompiled" in row else ""),
              file=sys.stderr)
    report["autoregressive"] = bench_autoregressive(backend, plan)
    report["real_fills"] = real_fills(backend, plan)
    report["context_scaling"] = bench_context_scaling(backend, plan)
    report["concurrency"] = bench_concurrency(model_dir, str(device), plan)
    report["headline"] = headline(report, plan)
    report["e2e_lsp"] = None if args.no_lsp else asyncio.run(lsp_session(model_dir, str(device.type), plan))
    report["memory"] = {
        "bench_process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "server_peak_rss_mib": report["e2e_lsp"]["server_peak_rss_mib"] if report["e2e_lsp"] else None,
        "gpu_peak_allocated_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
    }
    return report


if __name__ == "__main__":
    sys.exit(main())
