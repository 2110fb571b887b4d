"""The default model's training loop (MDLM + next-token loss); `parafill train` runs it.

Each example is a FIM cut of a real file. The span loss is MDLM: mask each
span position with probability t ~ U(0, 1), cross-entropy on masked positions
weighted 1/t. The causal part of the sequence holds the context followed by
the middle and <eos>, so the same pass also trains next-token prediction
(the autoregressive baseline) at little extra cost; span queries never see
that causal copy of the middle (see `model.training_mask`).

Training runs in stretches (`--minutes`), saving a safetensors checkpoint
(weights, optimizer moments, step, data position) that the next stretch
resumes from, so a laptop that sleeps or a rented machine that goes away
loses at most the steps since the last save.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from denoiser.checkpoint import load_native_model
from denoiser.config import MASK_ID, PAD_ID, ModelConfig
from denoiser.model import SpanDenoiser, training_mask
from denoiser.tokenizer import CodeTokenizer
from training.corpus.shards import train_files as corpus_train_files
from training.examples import TokenExample
from training.export import save_native_model
from training.grow import load_grown
from training.step import autocast, compiled, resolve_precision, step_flops
from training.train_data import SPAN_CHOICES, ExampleStream, PrefetchStream, fit_span, fixed_batches, read_corpus


@dataclass(frozen=True)
class TrainSettings:
    context_tokens: int = 256
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 200
    total_steps: int = 20000
    weight_decay: float = 0.1
    ar_weight: float = 0.5
    ar_positions: int = 64
    pad_weight: float = 0.1
    seed: int = 0
    # Cool-down: from step `cooldown_from`, the rate falls linearly from the schedule's value there
    # to 0 over `cooldown_steps` steps, and training ends (a run can be cooled when its loss flattens).
    cooldown_from: int | None = None
    cooldown_steps: int = 0

    @property
    def last_step(self) -> int:
        if self.cooldown_from is None:
            return self.total_steps
        return min(self.total_steps, self.cooldown_from + self.cooldown_steps)


def collate(examples: list[TokenExample], span: int, rng: torch.Generator, device, region: int | None = None):
    """Tensors for one batch: ids, positions, mask, and the targets of both losses.

    `region` (the causal part's length) defaults to the longest example; a fixed
    one gives every batch of a span the same shapes, which a compiled step needs.
    """
    b = len(examples)
    causal_lens = [len(e.context) + len(e.middle) for e in examples]
    region = max(causal_lens) if region is None else region
    if max(causal_lens) > region:
        raise ValueError(f"an example of {max(causal_lens)} tokens does not fit the region of {region}")
    ids = torch.full((b, region + span), PAD_ID, dtype=torch.long)
    positions = torch.zeros((b, region + span), dtype=torch.long)
    span_target = torch.full((b, span), PAD_ID, dtype=torch.long)
    for i, e in enumerate(examples):
        seq = e.context + e.middle
        ids[i, : len(seq)] = torch.tensor(seq)
        positions[i, :region] = torch.arange(region)
        positions[i, region:] = torch.arange(len(e.context), len(e.context) + span)
        span_target[i, : len(e.middle)] = torch.tensor(e.middle)
    # MDLM noise: one t per example, each span position masked with probability t.
    t = torch.rand(b, 1, generator=rng).clamp(min=0.02)
    masked = torch.rand(b, span, generator=rng) < t
    masked[torch.arange(b), torch.randint(0, span, (b,), generator=rng)] = True
    ids[:, region:] = torch.where(masked, MASK_ID, span_target)
    ctx_len = torch.tensor([len(e.context) for e in examples])
    causal_len = torch.tensor(causal_lens)
    mask = training_mask(causal_len, ctx_len, region, span)
    return {
        "ids": ids.to(device), "positions": positions.to(device), "mask": mask.to(device),
        "span_target": span_target.to(device), "masked": masked.to(device), "t": t.to(device),
        "causal_len": causal_len.to(device), "ctx_len": ctx_len.to(device), "region": region,
    }


def losses(model: SpanDenoiser, batch: dict, settings: TrainSettings, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = model.forward_hidden(batch["ids"], batch["positions"], batch["mask"])
    region = batch["region"]
    span_logits = model.logits(hidden[:, region:]).float()
    ce = F.cross_entropy(span_logits.transpose(1, 2), batch["span_target"], reduction="none")
    # <pad> fills most of a short middle's span: at full weight it drowns the
    # middle and <eos> (the first CPU-trained model learned "all pad" and little else).
    weight = torch.where(batch["span_target"] == PAD_ID, settings.pad_weight, 1.0)
    mdlm = (ce * weight * batch["masked"] / batch["t"]).sum() / batch["masked"].numel()
    # Next-token loss on a sample of causal positions: all middle positions plus
    # random context positions (the full LM head over every position costs too much).
    b = hidden.shape[0]
    n = settings.ar_positions
    ctx_len, causal_len = batch["ctx_len"], batch["causal_len"]
    pick_ctx = (torch.rand(b, n, generator=rng).to(hidden.device) * (causal_len - 1).unsqueeze(1)).long()
    # Every middle position (a middle is at most span tokens; the rest are masked out
    # by `valid`): a fixed count keeps shapes static and never reads a tensor back.
    span = batch["span_target"].shape[1]
    pick_middle = (ctx_len - 1).unsqueeze(1) + torch.arange(span, device=hidden.device).unsqueeze(0)
    pick = torch.cat([pick_ctx, pick_middle], 1)
    valid = pick < (causal_len - 1).unsqueeze(1)
    pick = pick.clamp(max=region - 2)
    h = torch.gather(hidden, 1, pick.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    target = torch.gather(batch["ids"], 1, pick + 1)
    ar_ce = F.cross_entropy(model.logits(h).float().transpose(1, 2), target, reduction="none")
    ar = (ar_ce * valid).sum() / valid.sum().clamp(min=1)
    return mdlm, ar


def optimizer_step(model, optimizer, batch: dict, settings: TrainSettings, noise: torch.Generator,
                   precision: str, loss_fn=losses) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of both losses: forward under the precision's autocast, backward, clip, update."""
    with autocast(batch["ids"].device, precision):
        mdlm, ar = loss_fn(model, batch, settings, noise)
        loss = mdlm + settings.ar_weight * ar
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return mdlm, ar


def lr_at(step: int, s: TrainSettings) -> float:
    if s.cooldown_from is not None and step >= s.cooldown_from:
        left = 1 - (step - s.cooldown_from) / max(1, s.cooldown_steps)
        return _scheduled(s.cooldown_from, s) * max(0.0, left)
    return _scheduled(step, s)


def _scheduled(step: int, s: TrainSettings) -> float:
    """Linear warm-up, then a cosine down to a tenth of the peak at `total_steps`."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.total_steps - s.warmup_steps))
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(path: Path, model, optimizer, step: int, tokens: int, stream_state) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    moments = {}
    names = {p: n for n, p in model.named_parameters()}
    for p, st in optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            moments[f"{names[p]}::{key}"] = st[key].detach().cpu().contiguous()
    save_file(moments, str(path / "optimizer.safetensors"))
    (path / "state.json").write_text(json.dumps({"step": step, "tokens": tokens, "config": model.config.to_json(), "rng": stream_state}))


def load_checkpoint(path: Path, model, optimizer) -> tuple[int, int, object]:
    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    moments = load_file(str(path / "optimizer.safetensors"))
    step = state["step"]
    for name, p in model.named_parameters():
        if f"{name}::exp_avg" in moments:
            optimizer.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": moments[f"{name}::exp_avg"].to(p.device),
                "exp_avg_sq": moments[f"{name}::exp_avg_sq"].to(p.device),
            }
    return step, state["tokens"], state["rng"]


@torch.no_grad()
def validate(model, batches, settings, device, precision: str) -> dict:
    # Eager on purpose: compiling the no-grad graphs of three span lengths costs
    # minutes on a CPU, for a pass that runs every few hundred steps.
    model.eval()
    rng = torch.Generator().manual_seed(1234)
    totals = {"mdlm": 0.0, "ar": 0.0}
    for examples, span in batches:
        batch = collate(examples, span, rng, device, region=settings.context_tokens + span)
        with autocast(device, precision):
            mdlm, ar = losses(model, batch, settings, rng)
        totals["mdlm"] += mdlm.item() / len(batches)
        totals["ar"] += ar.item() / len(batches)
    model.train()
    return totals


def run(args) -> None:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    settings = TrainSettings(
        context_tokens=args.context_tokens, batch_size=args.batch_size, lr=args.lr,
        total_steps=args.total_steps, warmup_steps=args.warmup_steps, seed=args.seed,
        ar_positions=args.ar_positions, pad_weight=args.pad_weight,
        cooldown_from=args.cooldown_from, cooldown_steps=args.cooldown_steps,
    )
    tokenizer = CodeTokenizer.load(Path(args.tokenizer))
    corpus = Path(args.corpus)
    try:
        train_paths = corpus_train_files(corpus)
    except FileNotFoundError as exc:
        raise SystemExit(f"--corpus: {exc}") from exc
    valid_files = read_corpus(corpus / "valid.jsonl.gz")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=args.d_model, n_layers=args.n_layers,
        n_heads=args.n_heads, d_ff=args.d_ff, max_positions=args.max_positions,
        context_tokens=args.context_tokens,
    )
    model = SpanDenoiser(config)
    model.init_weights(torch.Generator().manual_seed(settings.seed))
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.95), fused=True,
    )
    precision = resolve_precision(args.precision, device)
    loss_fn = compiled(losses, args.compile)
    print(f"training in {precision}{', compiled' if args.compile else ''} on {device}"
          f"{f' ({torch.get_num_threads()} threads)' if device.type == 'cpu' else ''}", file=sys.stderr)
    step, tokens, stream_seed = 0, 0, settings.seed
    ckpt = out / "checkpoint"
    if (ckpt / "state.json").exists():
        step, tokens, stream_seed = load_checkpoint(ckpt, model, optimizer)
        print(f"resumed from {ckpt} at step {step} ({tokens / 1e6:.1f}M tokens)", file=sys.stderr)
    elif args.init:
        init_model, _, _ = load_native_model(Path(args.init), device)
        try:
            added = load_grown(model, init_model)
        except ValueError as e:
            raise SystemExit(f"--init {args.init}: {e}") from None
        if added:
            print(f"grown from {init_model.config.n_layers} layers: blocks {added} start as the identity",
                  file=sys.stderr)
    seed = hash((stream_seed, step)) & 0xFFFFFFFF
    if args.data_workers:
        stream = PrefetchStream(train_paths, Path(args.tokenizer), settings.context_tokens, seed,
                                args.data_workers, settings.batch_size)
        next_batch = stream.batch
    else:
        train_files = [record for path in train_paths for record in read_corpus(path)]
        local = ExampleStream(train_files, tokenizer, settings.context_tokens, seed)
        next_batch = lambda: local.batch(settings.batch_size)  # noqa: E731
    valid_stream = ExampleStream(valid_files, tokenizer, settings.context_tokens, seed=999)
    valid_batches = fixed_batches(valid_stream, settings.batch_size, [span for span in (16, 32, 64) for _ in range(2)])
    noise = torch.Generator().manual_seed(step + 17)
    log = open(out / "log.jsonl", "a", encoding="utf-8")
    start, start_tokens, flops = time.monotonic(), tokens, 0.0
    deadline = start + args.minutes * 60
    span_rng = random.Random(step)
    last_print = 0.0
    try:
        while step < settings.last_step and time.monotonic() < deadline:
            span = span_rng.choice(SPAN_CHOICES)
            examples = [fit_span(e, span) for e in next_batch()]
            batch = collate(examples, span, noise, device, region=settings.context_tokens + span)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, settings)
            mdlm, ar = optimizer_step(model, optimizer, batch, settings, noise, precision, loss_fn)
            step += 1
            tokens += sum(len(e.context) + len(e.middle) for e in examples) + len(examples) * span
            flops += step_flops(config, len(examples), settings.context_tokens + 2 * span,
                                span + settings.ar_positions + span)
            if step % args.save_every == 0:
                save_checkpoint(ckpt, model, optimizer, step, tokens, settings.seed)
            now = time.monotonic()
            validating = step % args.valid_every == 0
            printing = now - last_print > 2 or validating
            if not (printing or validating or step % args.log_every == 0):
                continue  # reading a loss back waits for the GPU: only when it is shown
            rate = (tokens - start_tokens) / max(1e-9, now - start)
            gflops = flops / max(1e-9, now - start) / 1e9
            record = {"step": step, "tokens": tokens, "mdlm": round(mdlm.item(), 4), "ar": round(ar.item(), 4),
                      "lr": lr_at(step, settings), "tokens_per_s": round(rate), "gflops": round(gflops, 1),
                      "precision": precision, "minutes": round((now - start) / 60, 2)}
            if validating:
                record["valid"] = validate(model, valid_batches, settings, device, precision)
            if step % args.log_every == 0 or validating:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if printing:
                bar = "#" * int(30 * step / settings.last_step)
                print(f"\r[{bar:<30}] step {step}/{settings.last_step} mdlm {record['mdlm']:.3f} ar {record['ar']:.3f} "
                      f"{rate / 1000:.1f}k tok/s {gflops:.0f} GFLOP/s {(now - start) / 60:.1f} min"
                      + (f" valid {record['valid']}" if validating else ""),
                      end="\n" if validating else "", file=sys.stderr, flush=True)
                last_print = now
    finally:
        if args.data_workers:
            stream.close()
    save_checkpoint(ckpt, model, optimizer, step, tokens, settings.seed)
    print(f"\nsaved {ckpt} at step {step} ({tokens / 1e6:.1f}M tokens)", file=sys.stderr)
    if args.export:
        card = Path(args.card).read_text(encoding="utf-8") if args.card else "# parafill model\n"
        save_native_model(model.float().cpu(), Path(args.tokenizer), Path(args.export), int8=args.int8, card=card)
        print(f"exported {args.export}", file=sys.stderr)
