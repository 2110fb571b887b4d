"""A Hugging Face-style model directory on disk: checks first, then streamed weights.

`inspect_directory` does every cheap check before any heavy work: config.json
parses, no pickle-only checkpoint (pickles can run code when loaded, so they are
never opened), every shard the index names exists, every tensor the family needs
is present with the right shape (read from the safetensors headers only).
`estimate_bytes` / `check_fits` refuse a model too large for the device.
`stream_weights` then reads tensors one at a time through safetensors' memory
mapping, casts each to the target dtype and moves it to the device, so host
memory stays bounded by one tensor, never a full copy of the model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from denoiser.backend import ModelLoadError
from denoiser.open_models.families import FamilySpec, family_spec

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"
# Tensors some exporters keep that carry nothing the model needs.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)

Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class CheckpointPlan:
    model_dir: Path
    config: dict
    spec: FamilySpec
    # tensor name -> shard file holding it
    locations: dict[str, Path]
    stored_bytes: int


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir}: not a directory; --model expects a local model directory")
    if not path.exists():
        raise ModelLoadError(f"{path}: missing; a model directory needs config.json next to its *.safetensors files")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return config


def _shard_files(model_dir: Path) -> dict[str, Path] | list[Path]:
    """Tensor-name map from the index when there is one, else the list of *.safetensors files."""
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: unreadable or has no 'weight_map' ({exc})") from exc
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).exists()})
        if missing:
            raise ModelLoadError(
                f"{model_dir}: shard(s) {', '.join(missing)} named in {INDEX_NAME} are missing; "
                "the download is incomplete: fetch the missing files again"
            )
        return {name: model_dir / f for name, f in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(
                f"{model_dir}: only pickle checkpoints ({', '.join(pickles)}); parafill loads safetensors only, "
                "because loading a pickle can run arbitrary code. Download the model's *.safetensors files "
                "or convert them with a tool you trust."
            )
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights found")
    return files


def _headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """name -> (file, shape, dtype) from the safetensors headers; reads no tensor data."""
    out: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    sl = handle.get_slice(name)
                    out[name] = (f, tuple(sl.get_shape()), str(sl.get_dtype()))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{f}: corrupt or truncated safetensors file ({exc}); download it again") from exc
    return out


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def inspect_directory(model_dir: Path | str) -> CheckpointPlan:
    """All checks that need no tensor data; raises ModelLoadError with the fix."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    spec = family_spec(config)
    shards = _shard_files(model_dir)
    files = sorted(set(shards.values())) if isinstance(shards, dict) else shards
    headers = _headers(files)
    if isinstance(shards, dict):
        lost = sorted(n for n, f in shards.items() if n not in headers or headers[n][0] != f)
        if lost:
            raise ModelLoadError(f"{model_dir}: {INDEX_NAME} lists {lost[:3]} but the shards do not hold them; the files do not belong together")
    expected = spec.expected_tensors()
    missing = [n for n in expected if n not in headers]
    if missing:
        raise ModelLoadError(
            f"{model_dir}: checkpoint lacks {len(missing)} tensor(s) a {spec.family} model needs, e.g. {missing[:3]}; "
            "the weights do not match config.json (wrong family, or an incomplete download)"
        )
    wrong = [(n, headers[n][1], shp) for n, shp in expected.items() if headers[n][1] != shp]
    if wrong:
        n, got, want = wrong[0]
        raise ModelLoadError(f"{model_dir}: tensor {n} has shape {got}, config.json implies {want}; config and weights disagree")
    allowed_extra = {spec.lm_head_name or "lm_head.weight", "model.transformer.ff_out.weight", "lm_head.weight"} if spec.shape.tie_embeddings else set()
    extra = [n for n in headers if n not in expected and n not in allowed_extra and not n.endswith(IGNORABLE_SUFFIXES)]
    if extra:
        raise ModelLoadError(
            f"{model_dir}: checkpoint holds tensors a {spec.family} model of this config does not have, e.g. {extra[:3]}; "
            "config.json does not describe these weights"
        )
    stored = 0
    for n in expected:
        _, shp, dt = headers[n]
        count = 1
        for d in shp:
            count *= d
        stored += count * _DTYPE_BYTES.get(dt, 4)
    return CheckpointPlan(model_dir, config, spec, {n: headers[n][0] for n in expected}, stored)


def estimate_bytes(spec: FamilySpec, dtype: torch.dtype, max_tokens: int = 4096, *, int8: bool = False) -> int:
    """Weights in `dtype` plus a dual-cache K/V of `max_tokens` positions and activation headroom.

    With `int8`, the projections (and the output head, a second copy when tied)
    take a byte per weight, the embedding table two (bf16), activations fp32."""
    s = spec.shape
    elt = torch.empty((), dtype=dtype).element_size()
    weights = s.parameter_count() * elt
    if int8:
        elt = 4
        embedding = s.vocab_size * s.hidden_size
        head = embedding  # own head, or the tied one's int8 copy
        projections = s.parameter_count() - embedding - (0 if s.tie_embeddings else head)
        weights = 2 * embedding + head + projections
    kv = 2 * s.num_layers * s.num_kv_heads * s.head_dim * max_tokens * elt
    activations = max_tokens * (4 * s.hidden_size + 2 * s.intermediate_size) * 4 + 256 * s.vocab_size * 4
    return weights + kv + activations


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(spec: FamilySpec, device: torch.device, dtype: torch.dtype, available: int | None = None, *,
               int8: bool = False) -> int:
    """Refuse a model whose estimated footprint exceeds the device's free memory."""
    need = estimate_bytes(spec, dtype, int8=int8)
    have = available if available is not None else available_bytes(device)
    if have is not None and need > have:
        gib = 1024 ** 3
        raise ModelLoadError(
            f"this {spec.family} model needs about {need / gib:.1f} GiB on {device} in "
            f"{'int8' if int8 else str(dtype).replace('torch.', '')}, "
            f"but only {have / gib:.1f} GiB is free; use a smaller model, a bigger device, or free memory first"
        )
    return need


def stream_weights(plan: CheckpointPlan, device: torch.device, dtype: torch.dtype,
                   progress: Progress | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor on device in dtype), one tensor resident on the host at a time."""
    by_file: dict[Path, list[str]] = {}
    for name, f in plan.locations.items():
        by_file.setdefault(f, []).append(name)
    total = len(plan.locations)
    done = 0
    for f, names in sorted(by_file.items()):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for name in names:
                    # get_tensor reads from the memory-mapped file; .to() makes the one device copy.
                    tensor = handle.get_tensor(name).to(device=device, dtype=dtype)
                    done += 1
                    if progress is not None and (done == total or done % 16 == 0):
                        progress(f"loading {f.name}", 100.0 * done / total)
                    yield name, tensor
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{f}: read failed while loading ({exc}); the file may be truncated") from exc
