"""CPU span steps compiled by torch's inductor, in the background.

Run op by op, a span step on a CPU spends about a third of its time between its
matmuls: some twenty small ops per layer (norms, rotary, residual adds, the gated
MLP's elementwise work) on [span, 256] tensors, each a few microseconds of
dispatch, and a dozen passes over [span, vocabulary] logits in the output head.
Compiled, those fuse into a few C++ loops and the matmuls run on weights packed
once (inductor's freezing). The attention stays `kernels.span_attention_cpu`,
called through a custom op the compiler does not look into, so the cached
context may have any length without a new compile.

Compiling takes seconds per shape (batch rows x span bucket), so it never runs on
a request's path: the first step of a shape runs eagerly and queues the shape,
one background thread at the lowest OS priority compiles it (and the output head,
once), and later steps run compiled. Any failure (no C++ compiler, an inductor
error) turns compilation off, logged once, and the eager passes serve on.

Same maths as `CpuInference.hidden` and `CpuInference._head_rows`, up to
rounding. Must not compile on a caller's thread (`compile_now` aside, for
benchmarks and tests), nor call a compiled graph with inputs it was not compiled
for (that would recompile right there).
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from denoiser.model import HEAD_CANDIDATES, HEAD_ROWS, LOG2_E, top_ids
from kernels.span_attention import span_attention_cpu

log = logging.getLogger(__name__)

# Graphs compiled per model: a language server meets a few span buckets at one row, at one or
# two thread counts (each graph's loops are compiled for the thread count of its compile).
MAX_GRAPHS = 12
SETTINGS = ("auto", "off")
# freezing: weights folded in as constants and packed once; one compile thread: no worker pool
# beside the server; a C++ wrapper: the graph's kernels called from C++, not Python, per step.
INDUCTOR_OPTIONS = {"freezing": True, "compile_threads": 1, "cpp_wrapper": True}


def _span_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_span: Tensor, v_span: Tensor,
                    ctx_len: Tensor) -> Tensor:
    lens = ctx_len.tolist()
    # One length for every row (always, at one row): the plain call, without per-row bookkeeping.
    return span_attention_cpu(q, k_cache, v_cache, k_span, v_span, lens[0] if len(set(lens)) == 1 else ctx_len)


# An op of its own, so that the compiler calls the CPU attention as it is: registered with the
# dispatcher directly (a `torch.library.custom_op` adds some microseconds of Python per call).
_LIBRARY = torch.library.Library("parafill", "FRAGMENT")
_LIBRARY.define("span_attention_cpu(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_span, Tensor v_span, "
                "Tensor ctx_len) -> Tensor")
_LIBRARY.impl("span_attention_cpu", _span_attention, "CPU")


@torch.library.register_fake("parafill::span_attention_cpu")
def _(q, k_cache, v_cache, k_span, v_span, ctx_len):
    return torch.empty_like(q)


def resolve_cpu_compile(setting: str | None = None) -> bool:
    """Whether CPU span steps compile: `setting`, else PARAFILL_CPU_COMPILE, else "auto"
    (on where `unavailable_reason` finds nothing missing)."""
    raw = setting if setting is not None else os.environ.get("PARAFILL_CPU_COMPILE", "auto")
    value = raw.strip().lower()
    if value not in SETTINGS:
        raise ValueError(f"CPU compile setting {raw!r} is not one of {', '.join(SETTINGS)} "
                         "(check PARAFILL_CPU_COMPILE)")
    if value == "off":
        return False
    reason = unavailable_reason()
    if reason:
        log.info("CPU span steps run uncompiled: %s", reason)
    return reason is None


def unavailable_reason() -> str | None:
    """Why inductor cannot compile here (None when it can): it needs a C++ compiler."""
    compilers = [os.environ.get("CXX"), "c++", "g++", "clang++"]
    if not any(name and shutil.which(name) for name in compilers):
        return "no C++ compiler found (install g++ or clang++, or set CXX)"
    return None


class _Linear(nn.Module):
    """x @ weight.T in the weight's dtype (output in that dtype, as `CpuLinear`)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)


class _SpanPass(nn.Module):
    """`CpuInference.hidden` as a module, its weights as parameters (what freezing packs)."""

    def __init__(self, model, cpu, dtype: torch.dtype):
        super().__init__()
        self.blocks_of = cpu._blocks
        self.embed = nn.Parameter(model.embed.weight.detach(), requires_grad=False)
        self.norms = nn.ParameterList()
        self.linears = nn.ModuleList()
        for block in model.blocks:
            self.norms.extend([nn.Parameter(block.attn_norm.weight.detach(), requires_grad=False),
                               nn.Parameter(block.mlp_norm.weight.detach(), requires_grad=False)])
            self.linears.extend(_Linear(w.weight.detach().to(dtype)) for w in (block.qkv, block.out, block.gate_up, block.down))

    def forward(self, span_ids: Tensor, k_cache: Tensor, v_cache: Tensor, cos: Tensor, sin: Tensor,
                ctx_len: Tensor) -> Tensor:
        n, lin = self.norms, self.linears
        layers = [(n[2 * i], lin[4 * i], lin[4 * i + 1], n[2 * i + 1], lin[4 * i + 2], lin[4 * i + 3])
                  for i in range(len(n) // 2)]

        def attend(layer, q, k, v):
            return torch.ops.parafill.span_attention_cpu(q, k_cache[layer], v_cache[layer], k, v, ctx_len)

        return self.blocks_of(F.embedding(span_ids, self.embed), layers, cos, sin, attend)


class _ScreenedHead(nn.Module):
    """`CpuInference._head_rows` with the bf16 screen, over normalised rows x [N, d] (N dynamic)."""

    def __init__(self, model):
        super().__init__()
        embed = model.embed.weight.detach()
        self.screen = _Linear((embed * LOG2_E).to(torch.bfloat16))
        self.embed = nn.Parameter(embed, requires_grad=False)

    def forward(self, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.screen(x).float() + bias
        candidates = top_ids(logits, HEAD_CANDIDATES).sort(dim=-1).values  # ties: the lowest id
        exact = (self.embed[candidates] * x.unsqueeze(1)).sum(-1) * LOG2_E + bias[candidates]
        best, at = exact.max(dim=-1)
        token = candidates.gather(-1, at.unsqueeze(-1)).squeeze(-1)
        logits = logits.scatter(-1, candidates, exact)
        return token, (logits - best.unsqueeze(-1)).exp2().sum(dim=-1).reciprocal()


class CompiledCpuStep:
    """A CPU span step's body (`CpuInference.hidden`, per rows x span length) and output head
    (`CpuInference._head_rows`, when screened in bf16), compiled in the background.

    Call `hidden` and `head` as the eager passes; they answer None while what they would run is
    not compiled yet for this shape and thread count (and queue it), or once compiling failed
    (`disabled` says why). Compiled: `ready`, jobs ("hidden", rows, span, threads) and
    ("head", threads).
    """

    def __init__(self, model, cpu, *, max_graphs: int = MAX_GRAPHS):
        self.cpu = cpu
        self.config = model.config
        self.max_graphs = max_graphs
        self._modules = {"hidden": _SpanPass(model, cpu, cpu.matmul_dtype).eval()}
        if cpu.screen_head is not None:
            self._modules["head"] = _ScreenedHead(model).eval()
        self._compiled: dict[str, object] = {}  # made by the first compile: importing the compiler takes a second
        self.ready: set[tuple] = set()
        self.disabled: str | None = None
        self._queued: set = set()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def hidden(self, span_ids: Tensor, kv, ctx_len: int | Tensor) -> Tensor | None:
        rows, span = span_ids.shape
        job = ("hidden", rows, span, torch.get_num_threads())
        if job not in self.ready:
            self._request(job)
            return None
        if kv.k.shape[3] < 2:  # a dynamic size of 0 or 1 would not pass the compiled graph's guards
            return None
        return self._hidden(span_ids, kv.k[:, :rows], kv.v[:, :rows], ctx_len)

    def head(self, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor] | None:
        if "head" not in self._modules:
            return None
        job = ("head", torch.get_num_threads())
        if job not in self.ready:
            self._request(job)
            return None
        if not 2 <= x.shape[0] <= HEAD_ROWS:  # the row counts the head was compiled for
            return None
        return self._head(x, bias)

    def compile_now(self, rows: int, span: int) -> bool:
        """Compile one shape and the head on this thread, for its thread count (benchmarks,
        tests); True once both are ready."""
        threads = torch.get_num_threads()
        jobs = [("hidden", rows, span, threads)] + ([("head", threads)] if "head" in self._modules else [])
        for job in jobs:
            self._compile(job)
        return all(job in self.ready for job in jobs)

    def wait(self, timeout: float) -> bool:
        """Wait until what was queued is compiled or compiling failed; False on timeout."""
        worker = self._worker
        if worker is None:
            return True
        self._queue.put(None)  # the worker stops after what was queued before
        worker.join(timeout)
        return not worker.is_alive()

    def _hidden(self, span_ids: Tensor, k: Tensor, v: Tensor, ctx_len: int | Tensor) -> Tensor:
        rows, span = span_ids.shape
        if isinstance(ctx_len, Tensor):
            lens = ctx_len.to(dtype=torch.int32).view(rows)
        else:
            lens = torch.full((rows,), ctx_len, dtype=torch.int32)
        positions = lens.view(rows, 1).long() + torch.arange(span)
        cos, sin = self.cpu.cos[positions].unsqueeze(2), self.cpu.sin[positions].unsqueeze(2)
        # The context's capacity varies by document: one graph serves every capacity.
        torch._dynamo.mark_dynamic(k, 3)
        torch._dynamo.mark_dynamic(v, 3)
        with torch.no_grad():
            return self._compiled["hidden"](span_ids, k, v, cos, sin, lens)

    def _head(self, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        torch._dynamo.mark_dynamic(x, 0)  # one graph for any number of rows still masked
        with torch.no_grad():
            return self._compiled["head"](x, bias)

    def _request(self, job) -> None:
        with self._lock:
            if self.disabled or job in self._queued or len(self._queued) >= self.max_graphs:
                return
            self._queued.add(job)
            self._queue.put(job)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="parafill-compile", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        try:  # the lowest priority: a user's completions keep the cores while this compiles
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        while (job := self._queue.get()) is not None:
            self._compile(job)

    def _compile(self, job: tuple) -> None:
        """Compile a job (see `ready`) by running it once on zeros, at its thread count."""
        if self.disabled or job in self.ready:
            return
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_inductor_cache()))
        c = self.config
        try:
            import torch._inductor.config as inductor_config

            name = job[0]
            torch.set_num_threads(job[-1])  # this thread's count: what the compiled loops will use
            if name not in self._compiled:
                self._compiled[name] = torch.compile(self._modules[name], fullgraph=True,
                                                     options={"guard_filter_fn": _guards_to_keep})
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=self.max_graphs), \
                    inductor_config.patch(INDUCTOR_OPTIONS):
                if name == "head":
                    self._head(torch.zeros(HEAD_ROWS, c.d_model), torch.zeros(c.vocab_size))
                else:
                    # The cached context's length is dynamic: a small one compiles for all.
                    rows, span = job[1:3]
                    kv = torch.zeros((c.n_layers, rows, c.n_heads, 64, c.head_dim))
                    self._hidden(torch.zeros((rows, span), dtype=torch.long), kv, kv.clone(), 16)
        except Exception as exc:  # never lose an answer to a compiler problem: eager serves on
            self.disabled = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log.warning("compiling the CPU span step failed, it runs uncompiled from now on: %s", self.disabled)
            return
        self.ready.add(job)
        log.info("compiled the CPU span step's %s for %s", job[0], ", ".join(map(str, job[1:])))


# The guards a compiled step keeps: its inputs' dtypes and shapes, which module's frozen weights
# it holds (parameter identity), the shapes' ranges, and the global state (grad mode and the
# thread count its loops were compiled for). Dropped: guards on this private module's structure
# and the functions it calls, which never change; checked on every call they cost about as much
# as the head's elementwise work.
_KEPT_GUARDS = {"TENSOR_MATCH", "ID_MATCH", "SHAPE_ENV", "GLOBAL_STATE", "GRAD_MODE"}


def _guards_to_keep(entries) -> list[bool]:
    return [entry.guard_type in _KEPT_GUARDS and (entry.guard_type != "ID_MATCH" or isinstance(entry.value, nn.Parameter))
            for entry in entries]


def _inductor_cache():
    from denoiser.adapted import cache_dir

    return cache_dir() / "compiled"
