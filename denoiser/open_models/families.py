"""Which open diffusion LLM a config.json describes, and how its checkpoint is laid out.

Each supported family maps to a `FamilySpec`: its transformer shape (read from
config.json), the checkpoint's tensor names, whether its logits are shifted by
one position, and how it lays out a fill-in-the-middle prompt. Facts here were
checked against the families' published modelling code:

- Dream (Dream-v0, Dream-Coder, DiffuCoder share it): `model_type` "Dream",
  `DreamModel`; Qwen2 layout (q/k/v biases, GQA, RoPE, RMSNorm, SwiGLU),
  bidirectional attention; generation shifts logits right by one
  (`cat([logits[:, :1], logits[:, :-1]])`), mask token `<|mask|>`
  (config `mask_token_id`, 151666 in the 7B models). Infilling as DreamOn's
  quickstart documents: `<bos> prefix <mask>*n suffix <eos>`.
- LLaDA: `model_type` "llada", `LLaDAModelLM`; OLMo-derived names under
  `model.transformer.` (wte, blocks.N.{q,k,v}_proj / attn_out / ff_proj (gate) /
  up_proj / ff_out (down) / attn_norm / ff_norm, ln_f, ff_out), no shift, mask id
  126336. Only `block_type` "llama" with RMSNorm, SiLU, RoPE is supported.
- Open-dCoder (Open-dLLM): a plain `qwen2` / `Qwen2ForCausalLM` checkpoint
  trained as a masked diffusion model; its sampler shifts logits like Dream and
  infills as `prefix <mask>*n suffix` with the tokenizer's mask token.

This module reads dicts only; it never touches tensors or files.
"""
from __future__ import annotations

from dataclasses import dataclass

from denoiser.backend import ModelLoadError
from denoiser.catalogue import DREAM, LLADA, OPEN_DCODER, family_of_config

LLADA_DEFAULT_MASK_ID = 126336


@dataclass(frozen=True)
class TransformerShape:
    """The numbers that define a Qwen2/LLaMA-style bidirectional transformer."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    qkv_bias: bool
    tie_embeddings: bool
    max_positions: int
    input_scale: float = 1.0
    logit_scale: float = 1.0

    def parameter_count(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        head = 0 if self.tie_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + head


@dataclass(frozen=True)
class FamilySpec:
    """How one family's checkpoint and prompt are laid out."""

    family: str
    shape: TransformerShape
    shift_logits: bool
    # Names of the checkpoint tensors: global ones and a per-layer template with "{i}".
    embed_name: str
    final_norm_name: str
    lm_head_name: str | None
    layer_names: dict[str, str]
    config_mask_id: int | None
    # Prompt layout: add the tokenizer's <bos> before the prefix / <eos> after the suffix.
    bos_before_prefix: bool
    eos_after_suffix: bool

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the checkpoint must hold, with its shape."""
        s = self.shape
        h, q, kv = s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        shapes = {
            "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,),
            "gate_proj": (s.intermediate_size, h), "up_proj": (s.intermediate_size, h),
            "down_proj": (h, s.intermediate_size), "attn_norm": (h,), "mlp_norm": (h,),
        }
        out: dict[str, tuple[int, ...]] = {self.embed_name: (s.vocab_size, h), self.final_norm_name: (h,)}
        if self.lm_head_name is not None:
            out[self.lm_head_name] = (s.vocab_size, h)
        for i in range(s.num_layers):
            for role, template in self.layer_names.items():
                if role.endswith("_bias") and not s.qkv_bias:
                    continue
                out[template.format(i=i)] = shapes[role]
        return out


_QWEN2_LAYER = {
    "q_proj": "model.layers.{i}.self_attn.q_proj.weight",
    "k_proj": "model.layers.{i}.self_attn.k_proj.weight",
    "v_proj": "model.layers.{i}.self_attn.v_proj.weight",
    "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "o_proj": "model.layers.{i}.self_attn.o_proj.weight",
    "gate_proj": "model.layers.{i}.mlp.gate_proj.weight",
    "up_proj": "model.layers.{i}.mlp.up_proj.weight",
    "down_proj": "model.layers.{i}.mlp.down_proj.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
}

_LLADA_LAYER = {
    "q_proj": "model.transformer.blocks.{i}.q_proj.weight",
    "k_proj": "model.transformer.blocks.{i}.k_proj.weight",
    "v_proj": "model.transformer.blocks.{i}.v_proj.weight",
    "q_bias": "model.transformer.blocks.{i}.q_proj.bias",
    "k_bias": "model.transformer.blocks.{i}.k_proj.bias",
    "v_bias": "model.transformer.blocks.{i}.v_proj.bias",
    "o_proj": "model.transformer.blocks.{i}.attn_out.weight",
    "gate_proj": "model.transformer.blocks.{i}.ff_proj.weight",
    "up_proj": "model.transformer.blocks.{i}.up_proj.weight",
    "down_proj": "model.transformer.blocks.{i}.ff_out.weight",
    "attn_norm": "model.transformer.blocks.{i}.attn_norm.weight",
    "mlp_norm": "model.transformer.blocks.{i}.ff_norm.weight",
}

SUPPORTED = "Dream / Dream-Coder / DiffuCoder (model_type 'Dream'), LLaDA (model_type 'llada'), Open-dCoder (model_type 'qwen2')"


def detect_family(config: dict) -> str:
    """Name the family of a config.json dict ("dream", "llada", "open-dcoder"), or raise ModelLoadError."""
    # A Qwen2 checkpoint is only usable if it was trained as a masked diffusion model
    # (Open-dCoder); the loader checks the tokenizer has a mask token.
    family = family_of_config(config)
    if family in (DREAM, LLADA, OPEN_DCODER):
        return family
    raise ModelLoadError(
        f"unsupported architecture (model_type={config.get('model_type')!r}, "
        f"architectures={config.get('architectures')!r}); parafill runs {SUPPORTED}. "
        "Point --model at one of those, or leave it unset for the built-in model."
    )


def _need(config: dict, key: str, family: str):
    if key not in config:
        raise ModelLoadError(f"config.json lacks {key!r}, which a {family} config must have; is the file complete?")
    return config[key]


def _rope_theta(config: dict, default: float) -> float:
    if "rope_theta" in config:
        return float(config["rope_theta"])
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", default))


def _refuse_rope_scaling(config: dict) -> None:
    scaling = config.get("rope_scaling")
    if scaling and str(scaling.get("rope_type", scaling.get("type", "default"))) != "default":
        raise ModelLoadError(f"config.json asks for rope_scaling {scaling!r}; parafill supports plain RoPE only")


def _qwen2_shape(config: dict, family: str) -> TransformerShape:
    _refuse_rope_scaling(config)
    hidden = int(_need(config, "hidden_size", family))
    heads = int(_need(config, "num_attention_heads", family))
    return TransformerShape(
        vocab_size=int(_need(config, "vocab_size", family)),
        hidden_size=hidden,
        num_layers=int(_need(config, "num_hidden_layers", family)),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate_size=int(_need(config, "intermediate_size", family)),
        rope_theta=_rope_theta(config, 10000.0),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        qkv_bias=True,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_positions=int(config.get("max_position_embeddings", 32768)),
    )


def _llada_shape(config: dict) -> TransformerShape:
    checks = {
        "block_type": ("llama", config.get("block_type", "llama")),
        "layer_norm_type": ("rms", config.get("layer_norm_type", "rms")),
        "activation_type": ("silu", config.get("activation_type", "silu")),
    }
    for key, (want, got) in checks.items():
        if str(got) != want:
            raise ModelLoadError(f"LLaDA config has {key}={got!r}; parafill supports only {want!r} (the published LLaDA 8B layout)")
    if not config.get("rope", True) or config.get("alibi", False):
        raise ModelLoadError("LLaDA config without RoPE (or with ALiBi) is not supported")
    if config.get("include_bias", False):
        raise ModelLoadError("LLaDA config with include_bias=true is not supported (published models have none)")
    if int(config.get("block_group_size", 1)) != 1:
        raise ModelLoadError("LLaDA config with block_group_size != 1 is not supported")
    if config.get("attention_layer_norm", False):
        raise ModelLoadError("LLaDA config with attention_layer_norm (q/k norms) is not supported")
    d_model = int(_need(config, "d_model", LLADA))
    heads = int(_need(config, "n_heads", LLADA))
    vocab = int(config.get("embedding_size") or _need(config, "vocab_size", LLADA))
    mlp = config.get("mlp_hidden_size") or int(config.get("mlp_ratio", 4) * d_model)
    return TransformerShape(
        vocab_size=vocab,
        hidden_size=d_model,
        num_layers=int(_need(config, "n_layers", LLADA)),
        num_heads=heads,
        num_kv_heads=int(config.get("n_kv_heads") or heads),
        head_dim=d_model // heads,
        intermediate_size=int(mlp),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        qkv_bias=bool(config.get("include_qkv_bias", False)),
        tie_embeddings=bool(config.get("weight_tying", False)),
        max_positions=int(config.get("max_sequence_length", 4096)),
        input_scale=float(d_model ** 0.5) if config.get("input_emb_norm", False) else 1.0,
        logit_scale=float(1 / d_model ** 0.5) if config.get("scale_logits", False) else 1.0,
    )


def family_spec(config: dict) -> FamilySpec:
    """Everything parafill needs to know about a config.json, or a ModelLoadError naming what is wrong."""
    family = detect_family(config)
    if family == LLADA:
        shape = _llada_shape(config)
        return FamilySpec(
            family=LLADA, shape=shape, shift_logits=False,
            embed_name="model.transformer.wte.weight",
            final_norm_name="model.transformer.ln_f.weight",
            lm_head_name=None if shape.tie_embeddings else "model.transformer.ff_out.weight",
            layer_names=_LLADA_LAYER,
            config_mask_id=int(config.get("mask_token_id", LLADA_DEFAULT_MASK_ID)),
            bos_before_prefix=True, eos_after_suffix=False,
        )
    shape = _qwen2_shape(config, family)
    mask_id = config.get("mask_token_id")
    return FamilySpec(
        family=family, shape=shape, shift_logits=True,
        embed_name="model.embed_tokens.weight",
        final_norm_name="model.norm.weight",
        lm_head_name=None if shape.tie_embeddings else "lm_head.weight",
        layer_names=_QWEN2_LAYER,
        config_mask_id=int(mask_id) if mask_id is not None else None,
        bos_before_prefix=family == DREAM, eos_after_suffix=family == DREAM,
    )
