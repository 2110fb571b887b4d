"""CPU span steps compiled ahead of time by torch's inductor, in a background process.

Run op by op, a span step on a CPU spends about a third of its time between its
matmuls: some twenty small ops per layer (norms, rotary, residual adds, the gated
MLP's elementwise work) on [span, 256] tensors, each a few microseconds of
dispatch, and a dozen passes over [span, vocabulary] logits in the output head.
Compiled (AOTInductor), those fuse into a few C++ loops run by a C++ wrapper, and
the matmuls run on weights packed once. The attention stays
`kernels.span_attention_cpu`, an op of its own the compiler calls as it is, so the
cached context may have any length without a new compile.

Compiling takes half a minute per shape (batch rows x thread count; the span
length is dynamic), so it never runs on a request's path, nor in the server's
process, whose threads it would hold up (the compiler is Python and keeps the
GIL): the first step of a shape runs eagerly and queues the shape; a child
process at the lowest OS priority compiles it into a package under
`~/.cache/parafill/compiled/<weights hash>/`; the server loads the package
(milliseconds) and later steps run it. The next start finds the packages there.
Packages hold the layers' bf16 weights, not the fp32 embedding (an input). Any
failure (no C++ compiler, an inductor error) turns compilation off for the model,
logged once, and the eager passes serve on.

Same maths as `CpuInference.hidden` and `CpuInference._head_rows`, up to
rounding. Must not compile on a caller's thread (`compile_now` aside, for
benchmarks and tests).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from denoiser.backend import setting_choice
from denoiser.model import HEAD_CANDIDATES, HEAD_ROWS, LOG2_E, top_ids
from kernels.span_attention import span_attention_cpu

log = logging.getLogger(__name__)

# Graphs compiled per model: a language server meets a few span buckets at one row, at one or
# two thread counts (each graph's loops are compiled for the thread count of its compile).
MAX_GRAPHS = 12
SETTINGS = ("auto", "off")
# freezing: weights folded in as constants and packed once; one compile thread: the child keeps
# to its one low-priority process.
INDUCTOR_OPTIONS = {"freezing": True, "compile_threads": 1}
# Bumped when what a package holds changes: packages of another format are compiled again.
PACKAGE_FORMAT = 1
COMPILE_TIMEOUT_S = 900
# Held while a worker writes the weights' folder or loads a package (milliseconds): the process's
# exit waits for it rather than tear torch down under a loader (an abort at exit).
_WRITING_OR_LOADING = threading.Lock()
atexit.register(lambda: _WRITING_OR_LOADING.acquire(timeout=10))
# Models whose packages the cache keeps (about 30 MB each): the base model and a few adapted ones.
KEPT_MODELS = 6


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
    if setting_choice(setting, "PARAFILL_CPU_COMPILE", SETTINGS, "CPU compile setting") == "off":
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
    """`CpuInference.hidden` after the embedding, as a module, its layers' weights as parameters
    (what freezing packs). The embedding stays out: a package holds no fp32 copy of it."""

    def __init__(self, model, cpu, dtype: torch.dtype):
        super().__init__()
        self.blocks_of = cpu._blocks
        self.norms = nn.ParameterList()
        self.linears = nn.ModuleList()
        for block in model.blocks:
            self.norms.extend([nn.Parameter(block.attn_norm.weight.detach(), requires_grad=False),
                               nn.Parameter(block.mlp_norm.weight.detach(), requires_grad=False)])
            self.linears.extend(_Linear(linear.weight.detach().to(dtype))
                                for linear in (block.qkv, block.out, block.gate_up, block.down))

    def forward(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, cos: Tensor, sin: Tensor,
                ctx_len: Tensor) -> Tensor:
        n, lin = self.norms, self.linears
        layers = [(n[2 * i], lin[4 * i], lin[4 * i + 1], n[2 * i + 1], lin[4 * i + 2], lin[4 * i + 3])
                  for i in range(len(n) // 2)]

        def attend(layer, q, k, v):
            return torch.ops.parafill.span_attention_cpu(q, k_cache[layer], v_cache[layer], k, v, ctx_len)

        return self.blocks_of(x, layers, cos, sin, attend)


class _ScreenedHead(nn.Module):
    """`CpuInference._head_rows` with the bf16 screen, over normalised rows x [N, d] (N dynamic).
    The fp32 embedding it rescores with is an input: a package holds no copy of it."""

    def __init__(self, model):
        super().__init__()
        self.screen = _Linear((model.embed.weight.detach() * LOG2_E).to(torch.bfloat16))

    def forward(self, x: Tensor, bias: Tensor, embed: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.screen(x).float() + bias
        candidates = top_ids(logits, HEAD_CANDIDATES).sort(dim=-1).values  # ties: the lowest id
        exact = (embed[candidates] * x.unsqueeze(1)).sum(-1) * LOG2_E + bias[candidates]
        best, at = exact.max(dim=-1)
        token = candidates.gather(-1, at.unsqueeze(-1)).squeeze(-1)
        logits = logits.scatter(-1, candidates, exact)
        return token, (logits - best.unsqueeze(-1)).exp2().sum(dim=-1).reciprocal()


class CompiledCpuStep:
    """A CPU span step's body (`CpuInference.hidden`, per rows x span length x threads) and output
    head (`CpuInference._head_rows`, when screened in bf16, per thread count), compiled by child
    processes and loaded when ready.

    Call `hidden` and `head` as the eager passes; they answer None while what they would run is
    not compiled yet (and queue it), when the inputs are laid out otherwise than compiled for, or
    once compiling failed (`disabled` says why). Ready: `ready`, jobs ("hidden", rows, threads)
    (any span length) and ("head", threads).
    """

    def __init__(self, model, cpu, *, max_graphs: int = MAX_GRAPHS):
        self.cpu = cpu
        self.model = model
        self.max_graphs = max_graphs
        self.screened = cpu.screen_head is not None
        self.ready: set[tuple] = set()
        self.disabled: str | None = None
        self._runners: dict[tuple, object] = {}
        self._folder: Path | None = None  # the weights' folder in the cache, made by the first job
        self._queued: set = set()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def hidden(self, span_ids: Tensor, kv, ctx_len: int | Tensor) -> Tensor | None:
        rows, span = span_ids.shape
        job = ("hidden", rows, torch.get_num_threads())
        runner = self._runners.get(job)
        if runner is None:
            self._request(job)
            return None
        k, v = kv.k[:, :rows], kv.v[:, :rows]
        # Compiled for whole, contiguous caches of at least two positions (rows of a larger
        # batch tensor are strided otherwise).
        if k.shape[3] < 2 or span < 2 or not (k.is_contiguous() and v.is_contiguous()):
            return None
        lens, cos, sin = _rotary_inputs(self.cpu, rows, span, ctx_len)
        return runner.run([F.embedding(span_ids, self.cpu.embed), k, v, cos, sin, lens])[0]

    def head(self, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor] | None:
        if not self.screened:
            return None
        job = ("head", torch.get_num_threads())
        runner = self._runners.get(job)
        if runner is None:
            self._request(job)
            return None
        if not 2 <= x.shape[0] <= HEAD_ROWS or not x.is_contiguous():  # what the head was compiled for
            return None
        token, confidence = runner.run([x, bias, self.cpu.embed])
        return token, confidence

    def compile_now(self, rows: int) -> bool:
        """Compile (or load) the pass for `rows` (any span length) and the head on this thread, for
        its thread count (benchmarks, tests); True once both are ready."""
        threads = torch.get_num_threads()
        jobs = [("hidden", rows, threads)] + ([("head", threads)] if self.screened else [])
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

    def _request(self, job: tuple) -> None:
        with self._lock:
            if self.disabled or job in self._queued or len(self._queued) >= self.max_graphs:
                return
            self._queued.add(job)
            self._queue.put(job)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="parafill-compile", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        self._load_compiled()
        while (job := self._queue.get()) is not None:
            self._compile(job)

    def _load_compiled(self) -> None:
        """Load every package an earlier run compiled for these weights: a shape queued behind
        another's compile would otherwise wait for it."""
        try:
            with _WRITING_OR_LOADING:
                folder = self._folder_of_weights()
                found = [(_job_of(path.name), path) for path in folder.glob("*.pt2")]
                for job, path in found:
                    if job is not None and job not in self.ready and (job[0] == "hidden" or self.screened):
                        self._runners[job] = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
                        self.ready.add(job)
        except Exception as exc:  # a package that does not load is compiled again when asked for
            log.info("could not load a compiled CPU step: %s", exc)

    def _compile(self, job: tuple) -> None:
        """Load the job's package, compiling it in a child process first if the cache lacks it."""
        if self.disabled or job in self.ready:
            return
        try:
            with _WRITING_OR_LOADING:
                package = self._package(job)
            if not package.exists():
                self._run_child(job, package)
            with _WRITING_OR_LOADING:
                runner = torch._C._aoti.AOTIModelPackageLoader(str(package), "model", False, 1, -1)
        except Exception as exc:  # never lose an answer to a compiler problem: eager serves on
            self.disabled = f"{type(exc).__name__}: {exc}".strip().splitlines()[-1][:300]
            log.warning("compiling the CPU span step failed, it runs uncompiled from now on: %s", self.disabled)
            return
        self._runners[job] = runner
        self.ready.add(job)
        log.info("compiled the CPU span step's %s for %s", job[0], ", ".join(map(str, job[1:])))

    def _folder_of_weights(self) -> Path:
        if self._folder is None:
            self._folder = _weights_folder(self.model, self.cpu.matmul_dtype, self.screened)
        return self._folder

    def _package(self, job: tuple) -> Path:
        return self._folder_of_weights() / _package_name(job)

    def _run_child(self, job: tuple, package: Path) -> None:
        log_path = package.with_suffix(".log")
        root = str(Path(__file__).resolve().parents[1])
        scratch = package.parent.parent / "tmp"  # the compiler's temporary files stay in the cache too
        scratch.mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               "TORCHINDUCTOR_CACHE_DIR": str(package.parent.parent / "inductor"), "TMPDIR": str(scratch),
               "PARAFILL_CPU_COMPILE": "off"}
        with open(log_path, "w", encoding="utf-8") as log_file:
            done = subprocess.run(
                [sys.executable, "-m", "denoiser.cpu_compile", str(package.parent), json.dumps(list(job))],
                check=False, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0 or not package.exists():
            text = log_path.read_text(encoding="utf-8", errors="replace")
            lines = [line for line in text.splitlines() if line.strip()]
            raise RuntimeError(lines[-1] if lines else f"the compiler process exited with {done.returncode}")
        log_path.unlink()


def _rotary_inputs(cpu, rows: int, span: int, ctx_len: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The span pass's context lengths [rows] and rotary tables [rows, span, 1, 2, D/2]."""
    if isinstance(ctx_len, Tensor):
        lens = ctx_len.to(dtype=torch.int32).reshape(rows).contiguous()
    else:
        lens = torch.full((rows,), ctx_len, dtype=torch.int32)
    positions = lens.view(rows, 1).long() + torch.arange(span)
    return lens, cpu.cos[positions].unsqueeze(2), cpu.sin[positions].unsqueeze(2)


def _package_name(job: tuple) -> str:
    return f"hidden-{job[1]}-t{job[2]}.pt2" if job[0] == "hidden" else f"head-t{job[1]}.pt2"


def _job_of(name: str) -> tuple | None:
    """The job a package file name holds (`_package_name`), None for other files."""
    stem = name.removesuffix(".pt2")
    parts = stem.split("-")
    try:
        if parts[0] == "hidden" and len(parts) == 3 and parts[2].startswith("t"):
            return ("hidden", int(parts[1]), int(parts[2][1:]))
        if parts[0] == "head" and len(parts) == 2 and parts[1].startswith("t"):
            return ("head", int(parts[1][1:]))
    except ValueError:
        pass
    return None


def _weights_folder(model, dtype: torch.dtype, screened: bool) -> Path:
    """The cache folder of these weights and settings, with what a child process needs to build
    the model again (config.json, spec.json, weights.safetensors)."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    spec = {"dtype": str(dtype).replace("torch.", ""), "screened": screened, "format": PACKAGE_FORMAT,
            "torch": torch.__version__}
    digest = hashlib.sha256(json.dumps([model.config.to_json(), spec], sort_keys=True).encode())
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].numpy().tobytes())
    folder = _compiled_cache() / digest.hexdigest()[:24]
    if not (folder / "weights.safetensors").exists():
        prune_compiled(_compiled_cache(), KEPT_MODELS - 1)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(model.config.to_json()), encoding="utf-8")
        (folder / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        partial = folder / f"weights.{os.getpid()}.partial"
        save_file(state, str(partial))
        os.replace(partial, folder / "weights.safetensors")
    return folder


def prune_compiled(cache: Path, keep: int) -> None:
    """Remove all but the `keep` most recently made weights' folders under `cache` (models
    adapted again and again would otherwise pile up packages)."""
    folders = sorted((p for p in cache.glob("*") if (p / "spec.json").exists()),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for folder in folders[keep:]:
        shutil.rmtree(folder, ignore_errors=True)


def _compiled_cache() -> Path:
    from denoiser.adapted import cache_dir

    return cache_dir() / "compiled"


def _compile_in_this_process(folder: Path, job: tuple) -> None:
    """The child's work: build the model from `folder`, export the job's module with its dynamic
    sizes, and compile it into the job's package (written whole or not at all)."""
    import torch._inductor
    from safetensors.torch import load_file

    from denoiser.config import ModelConfig
    from denoiser.model import CpuInference, SpanDenoiser

    spec = json.loads((folder / "spec.json").read_text(encoding="utf-8"))
    config = ModelConfig.from_json(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    model = SpanDenoiser(config)
    model.load_state_dict(load_file(str(folder / "weights.safetensors")))
    model.eval()
    cpu = CpuInference(model, getattr(torch, spec["dtype"]), screen_head=spec["screened"])
    torch.set_num_threads(job[-1])  # the compiled loops keep this count
    if job[0] == "head":
        module = _ScreenedHead(model).eval()
        rows = torch.export.Dim("rows", min=2, max=HEAD_ROWS)
        args = (torch.zeros(HEAD_ROWS, config.d_model), torch.zeros(config.vocab_size), model.embed.weight.detach())
        dynamic = ({0: rows}, {}, {})
    else:
        _, rows, threads = job
        module = _SpanPass(model, cpu, cpu.matmul_dtype).eval()
        capacity = torch.export.Dim("capacity", min=2, max=config.max_positions)
        span = torch.export.Dim("span", min=2, max=config.max_positions)
        kv = torch.zeros((config.n_layers, rows, config.n_heads, 64, config.head_dim))
        lens, cos, sin = _rotary_inputs(cpu, rows, 16, 16)
        args = (torch.zeros((rows, 16, config.d_model)), kv, kv.clone(), cos, sin, lens)
        dynamic = ({1: span}, {3: capacity}, {3: capacity}, {1: span}, {1: span}, {})
    package = folder / _package_name(job)
    with torch.no_grad():
        exported = torch.export.export(module, args, dynamic_shapes=dynamic)
        partial = package.with_name(f"{package.stem}.{os.getpid()}.partial.pt2")
        torch._inductor.aoti_compile_and_package(exported, package_path=str(partial), inductor_configs=INDUCTOR_OPTIONS)
    os.replace(partial, package)


if __name__ == "__main__":
    if hasattr(os, "nice"):
        os.nice(19)  # compile while a user's completions keep the cores
    _compile_in_this_process(Path(sys.argv[1]), tuple(json.loads(sys.argv[2])))
