"""The open diffusion models parafill knows by name, and how a model name is read.

`--model` and the `model` setting take a directory, a catalogue name
(`dream-coder-7b`, see `CATALOGUE`) or `hf:ORG/NAME[@REVISION]` for any
Hugging Face repository of a supported family. `parse_model_name` tells them
apart; `denoiser.hub_cache` finds a named model in the local Hugging Face cache;
only `parafill model pull` (tools/hub_download.py) downloads one.

Plain data and string rules: no torch, no network, no file access, so the CLI
can read a name (and say what is wrong with it) before anything heavy loads.

Sources of the facts below (checked through stored copies of the projects'
pages; none was downloaded here):
- Repository ids: Open-dLLM's README links `fredzzp/open-dcoder-0.5B`;
  DreamOn's README links `Dream-org/DreamOn-v0-7B`; the Hugging Face pages of
  `Dream-org/Dream-v0-Base-7B`, `Dream-org/Dream-Coder-v0-Instruct-7B`,
  `apple/DiffuCoder-7B-Base`, `apple/DiffuCoder-7B-Instruct`,
  `GSAI-ML/LLaDA-8B-Base` and `GSAI-ML/LLaDA-8B-Instruct` were seen.
  `Dream-org/Dream-Coder-v0-Base-7B` is used by others' published scripts
  (pinned at revision 2346ccd3), its page was not seen.
- Sizes on disk: from the repositories' file listings (bf16 safetensors):
  DiffuCoder 15.2 GB, Dream-Coder Instruct 15.2 GB, LLaDA 6 shards ≈ 16.0 GB.
  Dream 7B, Dream-Coder Base and DreamOn are Qwen2.5-7B-shaped bf16 models
  like those, so ≈ 15.2 GB is assumed, not seen. Open-dCoder 0.5B's size was
  not seen (0.49 B parameters: ≈ 1 GB in bf16, ≈ 2 GB in fp32).
- Licences (`licence`, with where it was confirmed in `licence_source`), read in
  stored copies of the Hugging Face pages, not live:
  confirmed: DiffuCoder-7B-Base and -Instruct `apple-amlr` (each card's README
  commit changing "unknown" to "apple-amlr"); LLaDA-8B-Base `mit` (its README
  front matter) and LLaDA-8B-Instruct `mit` (README commit 9ebed6d changed
  apache-2.0 to mit); Open-dCoder 0.5B states none (its hub page shows no licence
  tag; Open-dLLM's GitHub repository has no LICENSE file either).
  NOT confirmed on the model's own card, marked "(unverified)" in `licence`:
  Dream-v0-Base-7B (the stored page shows no licence line; Dream-v0-Instruct-7B's
  card says apache-2.0), Dream-Coder-v0-Base-7B (the Instruct card says
  apache-2.0), DreamOn-v0-7B (a third-party reproduction note calls the checkpoint
  Apache-2.0). `parafill model pull` shows the licence the hub records, which wins
  over this table.
- Shapes (`shape`, what `python -m tools.open_model_bench --cpu-costs` builds when
  the real weights are not in the cache): DiffuCoder-7B-Instruct's config.json
  (seen: 28 layers, hidden 3584, 28 heads, 4 KV heads, intermediate 18944,
  vocab 152064, untied) stands for every Dream-family 7B, all Qwen2.5-7B-shaped;
  LLaDA-8B-Instruct's config.json (seen: d_model 4096, 32 layers, 32 heads and
  KV heads, mlp 12288, embedding 126464). Open-dCoder 0.5B's config.json was not
  seen: Qwen2.5-Coder-0.5B's shape is assumed (24 layers, hidden 896, 14 heads,
  2 KV heads, intermediate 4864, vocab 151936, tied embeddings).
- HumanEval-infilling pass@1, fixed-length (the average-length setting of
  DreamOn): Open-dLLM's README, "Code Infilling" table.
- Tokenizer files: Dream-Coder-v0-Instruct-7B ships vocab.json + merges.txt +
  added_tokens.json and no tokenizer.json (its file list, seen), and DiffuCoder
  carries the same tokenization_dream.py; the loader rebuilds the fast tokenizer
  from those files (denoiser/open_models/hf_tokenizer.py). `pull` checks the
  hub's file list and refuses before downloading anything when neither
  tokenizer.json nor vocab.json + merges.txt is there.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

# Families, as denoiser.open_models.families names them (kept in step by a test).
DREAM = "dream"
LLADA = "llada"
OPEN_DCODER = "open-dcoder"
NATIVE = "parafill"

QUALITY_SOURCE = ("Open-dLLM README, Code Infilling table (HumanEval-infilling pass@1, "
                  "fixed average length as in DreamOn): https://github.com/pengzhangzhi/Open-dLLM")

LAYOUTS = {
    DREAM: "<bos> prefix <mask>×n suffix <eos>",
    LLADA: "<bos> prefix <mask>×n suffix",
    OPEN_DCODER: "prefix <mask>×n suffix (no special tokens)",
    NATIVE: "<fim_suffix> suffix <fim_prefix> prefix <fim_middle> <mask>×n",
}


@dataclass(frozen=True)
class ModelShape:
    """The transformer's numbers, as the family's config.json gives them (see the module docstring for sources)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    rope_theta: float
    max_positions: int


QWEN25_05B = ModelShape(24, 896, 14, 2, 4864, 151936, True, 1000000.0, 32768)
QWEN25_7B = ModelShape(28, 3584, 28, 4, 18944, 152064, False, 1000000.0, 131072)
LLADA_8B = ModelShape(32, 4096, 32, 32, 12288, 126464, False, 500000.0, 4096)

UNVERIFIED = " (unverified)"


@dataclass(frozen=True)
class CatalogueEntry:
    name: str  # what users type: --model NAME, `parafill model pull NAME`
    repo_id: str  # Hugging Face repository
    family: str  # DREAM | LLADA | OPEN_DCODER
    parameters_b: float  # billions of parameters
    disk_gb: float  # approximate size of the safetensors download, GB (10^9 bytes)
    licence: str  # the card's licence id, "… (unverified)" where the card itself was not seen
    licence_source: str  # where the licence was confirmed, or why it is unverified
    shape: ModelShape
    summary: str
    humaneval_infill: float | None = None  # published pass@1 (%), QUALITY_SOURCE
    revision: str = "main"

    @property
    def layout(self) -> str:
        return LAYOUTS[self.family]

    @property
    def licence_verified(self) -> bool:
        return not self.licence.endswith(UNVERIFIED)


_HF = "https://huggingface.co/"
CATALOGUE: tuple[CatalogueEntry, ...] = (
    CatalogueEntry("open-dcoder-0.5b", "fredzzp/open-dcoder-0.5B", OPEN_DCODER, 0.49, 1.0, "not stated",
                   f"{_HF}fredzzp/open-dcoder-0.5B: no licence on the page; github.com/pengzhangzhi/Open-dLLM "
                   "has no LICENSE file (its base, Qwen2.5-Coder-0.5B, is apache-2.0)", QWEN25_05B,
                   "Open-dCoder 0.5B (Open-dLLM): small code diffusion model, the one that fits a laptop CPU",
                   humaneval_infill=32.5),
    CatalogueEntry("dream-7b", "Dream-org/Dream-v0-Base-7B", DREAM, 7.6, 15.2, "apache-2.0" + UNVERIFIED,
                   f"not on {_HF}Dream-org/Dream-v0-Base-7B (no licence line seen); "
                   f"{_HF}Dream-org/Dream-v0-Instruct-7B says apache-2.0", QWEN25_7B,
                   "Dream 7B base: general diffusion LLM (Qwen2.5-7B shape)", humaneval_infill=39.4),
    CatalogueEntry("dream-coder-7b", "Dream-org/Dream-Coder-v0-Base-7B", DREAM, 7.6, 15.2, "apache-2.0" + UNVERIFIED,
                   f"Base card not seen; {_HF}Dream-org/Dream-Coder-v0-Instruct-7B says apache-2.0", QWEN25_7B,
                   "Dream-Coder 7B base: Dream adapted to code", humaneval_infill=55.3),
    CatalogueEntry("diffucoder-7b-base", "apple/DiffuCoder-7B-Base", DREAM, 7.6, 15.2, "apple-amlr",
                   f"{_HF}apple/DiffuCoder-7B-Base/commit/a2c33054cbe99b9ab7af074f09b1d13943157ff1", QWEN25_7B,
                   "DiffuCoder 7B base (Apple): code diffusion model; research-only licence",
                   humaneval_infill=54.8),
    CatalogueEntry("diffucoder-7b-instruct", "apple/DiffuCoder-7B-Instruct", DREAM, 7.6, 15.2, "apple-amlr",
                   f"{_HF}apple/DiffuCoder-7B-Instruct/commit/4fdd4580064ca5d11808069ce78f88d068753c96", QWEN25_7B,
                   "DiffuCoder 7B instruct (Apple): instruction-tuned; research-only licence"),
    CatalogueEntry("llada-8b-base", "GSAI-ML/LLaDA-8B-Base", LLADA, 8.0, 16.0, "mit",
                   f"{_HF}GSAI-ML/LLaDA-8B-Base/blob/main/README.md (license: mit)", LLADA_8B,
                   "LLaDA 8B base: general diffusion LLM (LLaMA-like)", humaneval_infill=48.3),
    CatalogueEntry("llada-8b-instruct", "GSAI-ML/LLaDA-8B-Instruct", LLADA, 8.0, 16.0, "mit",
                   f"{_HF}GSAI-ML/LLaDA-8B-Instruct/commit/9ebed6d05ed8f3da701191cc54daffd15d2183a0", LLADA_8B,
                   "LLaDA 8B instruct: instruction-tuned LLaDA"),
    CatalogueEntry("dreamon-7b", "Dream-org/DreamOn-v0-7B", DREAM, 7.6, 15.2, "apache-2.0" + UNVERIFIED,
                   "card not seen; a third-party reproduction note calls the checkpoint Apache-2.0", QWEN25_7B,
                   "DreamOn 7B: Dream-Coder trained for variable-length infilling; parafill decodes it as a "
                   "fixed-length Dream model (its expand/delete tokens are not used)"),
)

_BY_NAME = {entry.name: entry for entry in CATALOGUE}

HF_PREFIX = "hf:"
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HF_ID = re.compile(rf"({_REPO_PART})/({_REPO_PART})(?:@([A-Za-z0-9._/-]+))?")


class ModelNameError(ValueError):
    """A model name that cannot be read; the message says what is expected."""


@dataclass(frozen=True)
class ModelRef:
    """A model named by catalogue name or hf: id, resolved to a repository and revision."""

    text: str  # what the user wrote
    repo_id: str
    revision: str
    entry: CatalogueEntry | None = None

    @property
    def pull_command(self) -> str:
        return f"parafill model pull {self.text}"


def lookup(name: str) -> CatalogueEntry | None:
    return _BY_NAME.get(name.strip().lower())


def parse_model_name(text: str) -> ModelRef | None:
    """A `ModelRef` for a catalogue name or an `hf:` id; None for anything else (a directory).

    Catalogue names win over a relative directory of the same name: write
    `./dream-7b` for the directory. Raises `ModelNameError` for a malformed `hf:` id.
    """
    text = text.strip()
    if text.lower().startswith(HF_PREFIX):
        spec = text[len(HF_PREFIX):]
        match = _HF_ID.fullmatch(spec)
        if not match or ".." in spec or "--" in spec:
            raise ModelNameError(f"{text!r}: expected hf:ORG/NAME or hf:ORG/NAME@REVISION, "
                                 "e.g. hf:apple/DiffuCoder-7B-Base")
        org, name, revision = match.groups()
        entry = next((e for e in CATALOGUE if e.repo_id.lower() == f"{org}/{name}".lower()), None)
        # The catalogue's spelling, so one model has one folder in the cache however it was typed.
        repo_id = entry.repo_id if entry else f"{org}/{name}"
        return ModelRef(text, repo_id, revision or "main", entry)
    entry = lookup(text)
    if entry is not None:
        return ModelRef(entry.name, entry.repo_id, entry.revision, entry)
    return None


def family_of_config(config: dict) -> str | None:
    """The family a config.json names, or None (`detect_family` of the open models uses it; no torch here)."""
    if config.get("architecture") == "parafill-span-denoiser":
        return NATIVE
    model_type = str(config.get("model_type", "")).lower()
    architectures = [str(a).lower() for a in config.get("architectures") or []]
    if model_type == "dream" or any(a.startswith("dream") for a in architectures):
        return DREAM
    if model_type == "llada" or any(a.startswith("llada") for a in architectures):
        return LLADA
    if model_type == "qwen2" or "qwen2forcausallm" in architectures:
        return OPEN_DCODER
    return None


# What `pull` fetches from a repository: the weights as safetensors and the small
# files that describe them. Never pickles (.bin/.pt/...: loading them can run
# code), never code files (modeling_*.py), never other formats (gguf, onnx, ...).
WANTED_FILES = ("*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt", "README.md", "LICENSE*", "LICENCE*", "NOTICE*")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# What the loader cannot do without (besides at least one *.safetensors): each entry is
# a set of alternatives, any one of which will do.
NEEDED = (("config.json",), ("tokenizer.json", "vocab.json + merges.txt"))


def missing_needed(names: set[str]) -> list[str]:
    """The needed files (or alternatives) absent from a repository's file `names`."""
    def present(option: str) -> bool:
        return all(part in names for part in option.split(" + "))
    return [" or ".join(options) for options in NEEDED if not any(present(o) for o in options)]


def is_wanted(path: str) -> bool:
    """Whether `pull` downloads the repository file `path` (top level only)."""
    if "/" in path or path.lower().endswith(PICKLE_SUFFIXES):
        return False
    return any(fnmatch.fnmatch(path, pattern) for pattern in WANTED_FILES)
