"""Model configuration: one dataclass, and a table of named configs for the supported families.

Families differ only by the values in this file. Every field below says which family needs it.
A checkpoint directory carries its own `model_config.yaml`; the config is read from there, never
guessed from a directory name.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, get_type_hints

import yaml

from lit_gpt.files import file_problem, read_json, read_yaml, type_mismatch
from lit_gpt.hf_config import config_from_hf  # the mapping is long; it lives beside this file


# model_config.yaml is written by the conversion scripts; a broken one is best replaced by converting again.
CONFIG_REMEDY = (
    "It is written when a checkpoint is converted: convert the checkpoint again (scripts/convert_hf_checkpoint.py, "
    "scripts/convert_gguf_checkpoint.py or scripts/download.py)."
)


@dataclass
class Config:
    name: str = ""
    hf_repo: str = ""  # "org/name" on the Hugging Face hub, used by scripts/download.py

    # --- sizes -------------------------------------------------------------------------------------
    block_size: int = 4096  # longest sequence the model was trained for (positions)
    # the tokenizer's base vocabulary, HF `tokenizer.vocab_size`; special tokens added on top of it
    # (Qwen's <|im_end|>, Llama 3's <|eot_id|>) have ids in [vocab_size, padded_vocab_size)
    vocab_size: int = 50254
    padded_vocab_size: Optional[int] = None  # rows of the embedding (>= vocab_size); defaults to vocab_size
    n_layer: int = 16
    n_embd: int = 4096
    n_head: int = 32
    head_size: Optional[int] = None  # defaults to n_embd // n_head; Gemma-7B: 256 with n_embd 3072, 16 heads
    n_query_groups: Optional[int] = None  # key/value heads: n_head = MHA, 1 = MQA (Falcon-7B), else GQA
    intermediate_size: Optional[int] = None  # MLP hidden width; defaults to 4 * n_embd

    # --- attention and positions -------------------------------------------------------------------
    rotary_percentage: float = 1.0  # fraction of head_size that is rotated (Pythia 0.25, Phi-2 0.4)
    rope_base: float = 10000.0
    # Llama 3.1+ frequency scaling: {"factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}
    rope_scaling: Optional[dict[str, float]] = None

    # --- block layout ------------------------------------------------------------------------------
    parallel_residual: bool = False  # x + attn(norm_1(x)) + mlp(norm_2(x))  (Pythia, Falcon, Phi-2)
    shared_attention_norm: bool = False  # parallel blocks that use norm_1 for both branches (Falcon-7B, Phi-2)
    norm_class: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    norm_eps: float = 1e-5
    norm_plus_one: bool = False  # RMSNorm scales by (1 + weight) (Gemma)
    mlp_class: Literal["MLP", "GatedMLP"] = "MLP"  # fc -> act -> proj, or proj(act(fc_1 x) * fc_2 x) (Llama, Gemma)
    activation: Literal["gelu", "gelu_tanh", "silu"] = "gelu"  # silu + GatedMLP = SwiGLU; gelu_tanh + GatedMLP = GeGLU
    bias: bool = True  # bias on the attention output projection and the MLP linears
    qkv_bias: Optional[bool] = None  # bias on query/key/value; defaults to `bias` (Qwen2.5: True with bias=False)
    lm_head_bias: bool = False  # Phi-2

    # --- embeddings --------------------------------------------------------------------------------
    tie_embeddings: bool = False  # lm_head shares the token embedding (Gemma, SmolLM2, Llama 3.2, small Qwen2.5)
    scale_embeddings: bool = False  # multiply embeddings by sqrt(n_embd) (Gemma)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = "custom"
        for key in ("block_size", "vocab_size", "n_layer", "n_embd", "n_head"):
            if getattr(self, key) < 1:
                raise ValueError(f"Config {self.name!r}: {key}={getattr(self, key)} must be at least 1.")
        if self.padded_vocab_size is None:
            self.padded_vocab_size = self.vocab_size
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"Config {self.name!r}: padded_vocab_size={self.padded_vocab_size} (embedding rows) is smaller than "
                f"vocab_size={self.vocab_size}."
            )
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ValueError(
                    f"Config {self.name!r}: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; set head_size."
                )
            self.head_size = self.n_embd // self.n_head
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.n_head % self.n_query_groups:
            raise ValueError(
                f"Config {self.name!r}: n_head={self.n_head} must be a multiple of n_query_groups={self.n_query_groups}."
            )
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if not 0.0 < self.rotary_percentage <= 1.0:
            raise ValueError(f"Config {self.name!r}: rotary_percentage={self.rotary_percentage} must be in (0, 1].")
        if self.shared_attention_norm and not self.parallel_residual:
            raise ValueError(f"Config {self.name!r}: shared_attention_norm needs parallel_residual=True.")
        if self.norm_plus_one and self.norm_class != "RMSNorm":
            raise ValueError(f"Config {self.name!r}: norm_plus_one applies only to RMSNorm.")

    # --- derived -----------------------------------------------------------------------------------
    @property
    def rope_n_elem(self) -> int:
        """How many channels of each head are rotated (always even)."""
        return int(self.rotary_percentage * self.head_size) // 2 * 2

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        """The named config from the family table, e.g. ``Config.from_name("Llama-2-7b-hf")``."""
        by_name = {c["name"]: c for c in configs}
        if name not in by_name:
            close = difflib.get_close_matches(name, by_name, n=5, cutoff=0.4)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ValueError(
                f"Unknown model name {name!r}.{hint} See lit_gpt/config.py for the {len(by_name)} supported names, "
                "or convert a checkpoint with its Hugging Face config.json (scripts/convert_hf_checkpoint.py)."
            )
        return cls(**{**by_name[name], **overrides})

    @classmethod
    def from_file(cls, path: str | Path) -> "Config":
        """Read a `model_config.yaml` written by :meth:`to_file`; a key, type or value that cannot be this config's
        is a FileError that names the file and the key."""
        data = read_yaml(path, CONFIG_REMEDY)
        if not data:
            raise file_problem(path, "is empty", CONFIG_REMEDY)
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise file_problem(path, f"has unknown config keys {unknown} (known keys: {sorted(known)})", CONFIG_REMEDY)
        hints = get_type_hints(cls)
        for key, value in data.items():
            expected = type_mismatch(value, hints[key])
            if expected:
                raise file_problem(path, f"sets {key} to {value!r}, which is not {expected}", CONFIG_REMEDY)
        try:
            return cls(**data)
        except ValueError as e:
            raise file_problem(path, f"is not a consistent model config: {e}", CONFIG_REMEDY) from None

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "Config":
        return cls.from_file(Path(checkpoint_dir) / "model_config.yaml")

    def to_file(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(asdict(self), sort_keys=False))

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any] | str | Path, name: str = "") -> "Config":
        """Build a Config from a Hugging Face `config.json` (a dict or a path to the file).

        Supports the architectures of the family table: GPTNeoX, Falcon, Llama, Mistral, Phi, Gemma, Qwen2.
        """
        if not isinstance(hf_config, dict):
            hf_config = read_json(hf_config, "Download the model's config.json again (scripts/download.py).")
        return config_from_hf(cls, hf_config, name=name)


# ------------------------------------------------------------------------------------------------------
# The family table: one dict per checkpoint, the Hugging Face config it mirrors noted above each group.
#
# Conventions, the same for every family:
#   * name is the Hugging Face repo name (the part after the slash); hf_repo is "org/name".
#   * block_size is `max_position_embeddings` of that repo's config.json unless a comment says otherwise.
#   * padded_vocab_size is the number of embedding rows in the checkpoint (`vocab_size` in config.json).
#   * vocab_size is the tokenizer's base vocabulary, HF `tokenizer.vocab_size` (added tokens excluded).
#     Tokens added on top of it (the GPT-NeoX whitespace runs 50254-50276, StableLM-tuned's <|USER|>,
#     Qwen's <|im_start|>, Llama 3's <|begin_of_text|> and <|eot_id|>) sit in [vocab_size,
#     padded_vocab_size): never crop logits to vocab_size.
#   * Variants that differ only in their weights (base / chat / instruct / deduped) share one dict.
# ------------------------------------------------------------------------------------------------------
configs: list[dict[str, Any]] = []


def _variants(base: dict[str, Any], org: str, names: list[str]) -> None:
    """Append one table entry per repo name, all with the architecture in `base`."""
    for name in names:
        configs.append(dict(name=name, hf_repo=f"{org}/{name}", **base))


# --- GPT-NeoX layout: Pythia, StableLM-alpha, RedPajama-INCITE ------------------------------------------
# LayerNorm, gelu MLP (4 * n_embd), bias everywhere, untied lm_head, rotary on the first 25% of each head,
# parallel residual with two norms: x + attn(norm_1(x)) + mlp(norm_2(x)). They share the GPT-NeoX-20B
# tokenizer: 50254 base tokens (padded_vocab_size varies with each run's padding multiple).
_gpt_neox = dict(
    vocab_size=50254,
    rotary_percentage=0.25,
    rope_base=10000.0,
    parallel_residual=True,
    norm_class="LayerNorm",
    norm_eps=1e-5,
    mlp_class="MLP",
    activation="gelu",
    bias=True,
)

# Pythia: https://huggingface.co/EleutherAI/pythia-1b/blob/main/config.json (same URL with each size)
# Each size also comes trained on the deduplicated Pile ("-deduped"), with the same architecture.
for _size, _layers, _embd, _heads, _padded in [
    ("70m", 6, 512, 8, 50304),
    ("160m", 12, 768, 12, 50304),
    ("410m", 24, 1024, 16, 50304),
    ("1b", 16, 2048, 8, 50304),
    ("1.4b", 24, 2048, 16, 50304),
    ("2.8b", 32, 2560, 32, 50304),
    ("6.9b", 32, 4096, 32, 50432),
    ("12b", 36, 5120, 40, 50688),
]:
    _variants(
        dict(_gpt_neox, block_size=2048, padded_vocab_size=_padded, n_layer=_layers, n_embd=_embd, n_head=_heads),
        "EleutherAI",
        [f"pythia-{_size}", f"pythia-{_size}-deduped"],
    )

# StableLM-alpha: https://huggingface.co/stabilityai/stablelm-base-alpha-3b/blob/main/config.json
#                 https://huggingface.co/stabilityai/stablelm-base-alpha-7b/blob/main/config.json
# "tuned" = the chat finetunes (their tokenizer adds <|SYSTEM|>, <|USER|>, <|ASSISTANT|> as 50277-50279).
_variants(
    dict(_gpt_neox, block_size=4096, padded_vocab_size=50688, n_layer=16, n_embd=4096, n_head=32),
    "stabilityai",
    ["stablelm-base-alpha-3b", "stablelm-tuned-alpha-3b"],
)
_variants(
    dict(_gpt_neox, block_size=4096, padded_vocab_size=50432, n_layer=16, n_embd=6144, n_head=48),
    "stabilityai",
    ["stablelm-base-alpha-7b", "stablelm-tuned-alpha-7b"],
)

# RedPajama-INCITE: https://huggingface.co/togethercomputer/RedPajama-INCITE-Base-3B-v1/blob/main/config.json
#                   https://huggingface.co/togethercomputer/RedPajama-INCITE-7B-Base/blob/main/config.json
# GPT-NeoX with `use_parallel_residual: false` (sequential blocks) and full rotary (`rotary_pct: 1.0`).
_redpajama = dict(_gpt_neox, block_size=2048, padded_vocab_size=50432, rotary_percentage=1.0, parallel_residual=False)
_variants(
    dict(_redpajama, n_layer=32, n_embd=2560, n_head=32),
    "togethercomputer",
    [f"RedPajama-INCITE-{_kind}-3B-v1" for _kind in ("Base", "Chat", "Instruct")],
)
_variants(
    dict(_redpajama, n_layer=32, n_embd=4096, n_head=32),
    "togethercomputer",
    [f"RedPajama-INCITE-7B-{_kind}" for _kind in ("Base", "Chat", "Instruct")],
)

# --- Falcon -----------------------------------------------------------------------------------------------
# https://huggingface.co/tiiuae/falcon-7b/blob/main/config.json
# https://huggingface.co/tiiuae/falcon-40b/blob/main/config.json
# LayerNorm, gelu MLP (4 * n_embd), no biases, parallel residual, 2048-token training context. The
# config.json files do not set `tie_word_embeddings`, so the transformers default (True) applies: the
# lm_head is the embedding (an `lm_head.weight` stored in the files is ignored by transformers).
_falcon = dict(
    block_size=2048,
    vocab_size=65024,
    padded_vocab_size=65024,
    rotary_percentage=1.0,
    rope_base=10000.0,
    parallel_residual=True,
    norm_class="LayerNorm",
    norm_eps=1e-5,
    mlp_class="MLP",
    activation="gelu",
    bias=False,
    tie_embeddings=True,
)
# 7B: multi-query attention (`multi_query: true`), one norm shared by both branches (`parallel_attn`).
_variants(
    dict(_falcon, n_layer=32, n_embd=4544, n_head=71, n_query_groups=1, shared_attention_norm=True),
    "tiiuae",
    ["falcon-7b", "falcon-7b-instruct"],
)
# 40B: `new_decoder_architecture: true`, 8 key/value heads and two norms (ln_attn, ln_mlp) on the block input.
_variants(
    dict(_falcon, n_layer=60, n_embd=8192, n_head=128, n_query_groups=8),
    "tiiuae",
    ["falcon-40b", "falcon-40b-instruct"],
)

# --- Llama layout: Llama 2/3, Mistral, Qwen2.5, SmolLM2 ------------------------------------------------
# RMSNorm, SwiGLU (GatedMLP + silu), no biases, sequential blocks, full rotary.
_llama = dict(
    rotary_percentage=1.0,
    parallel_residual=False,
    norm_class="RMSNorm",
    norm_eps=1e-5,
    mlp_class="GatedMLP",
    activation="silu",
    bias=False,
)

# Llama 2: https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json (13b, 70b alike)
_llama_2 = dict(_llama, block_size=4096, vocab_size=32000, padded_vocab_size=32000, rope_base=10000.0)
for _size, _layers, _embd, _heads, _groups, _inter in [
    ("7b", 32, 4096, 32, 32, 11008),
    ("13b", 40, 5120, 40, 40, 13824),
    ("70b", 80, 8192, 64, 8, 28672),
]:
    _variants(
        dict(
            _llama_2, n_layer=_layers, n_embd=_embd, n_head=_heads, n_query_groups=_groups, intermediate_size=_inter
        ),
        "meta-llama",
        [f"Llama-2-{_size}-hf", f"Llama-2-{_size}-chat-hf"],
    )

# Llama 3 and 3.x: 128000 base tokens + 256 special tokens = 128256 embedding rows; rope_theta 500000.
_llama_3 = dict(_llama, vocab_size=128000, padded_vocab_size=128256, rope_base=500000.0, n_query_groups=8)
# Llama 3.1 and 3.2 stretch the 8192-token RoPE to 131072 positions (`rope_type: "llama3"`).
_llama_3_1_scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
_llama_3_2_scaling = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
# https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json
_variants(
    dict(_llama_3, block_size=8192, n_layer=32, n_embd=4096, n_head=32, intermediate_size=14336),
    "meta-llama",
    ["Meta-Llama-3-8B", "Meta-Llama-3-8B-Instruct"],
)
# https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
_variants(
    dict(
        _llama_3,
        block_size=131072,
        n_layer=32,
        n_embd=4096,
        n_head=32,
        intermediate_size=14336,
        rope_scaling=_llama_3_1_scaling,
    ),
    "meta-llama",
    ["Llama-3.1-8B", "Llama-3.1-8B-Instruct"],
)
# https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json (3B alike); tied embeddings
for _size, _layers, _embd, _heads in [("1B", 16, 2048, 32), ("3B", 28, 3072, 24)]:
    _variants(
        dict(
            _llama_3,
            block_size=131072,
            n_layer=_layers,
            n_embd=_embd,
            n_head=_heads,
            intermediate_size=8192,
            rope_scaling=_llama_3_2_scaling,
            tie_embeddings=True,
        ),
        "meta-llama",
        [f"Llama-3.2-{_size}", f"Llama-3.2-{_size}-Instruct"],
    )

# Mistral: https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json
_mistral = dict(
    _llama,
    vocab_size=32000,
    padded_vocab_size=32000,
    n_layer=32,
    n_embd=4096,
    n_head=32,
    n_query_groups=8,
    intermediate_size=14336,
)
# v0.1 has `max_position_embeddings: 32768` but attends through a 4096-token sliding window. We do not
# implement sliding windows, so block_size is 4096: within it, full causal attention is exactly the same.
_variants(
    dict(_mistral, block_size=4096, rope_base=10000.0),
    "mistralai",
    ["Mistral-7B-v0.1", "Mistral-7B-Instruct-v0.1"],
)
# https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.2/blob/main/config.json: no sliding window.
_variants(dict(_mistral, block_size=32768, rope_base=1000000.0), "mistralai", ["Mistral-7B-Instruct-v0.2"])

# Qwen2.5: https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json (1.5B, 3B, 7B alike)
# Bias on query/key/value only, RMSNorm eps 1e-6, rope_theta 1e6. The tokenizer has 151643 base tokens
# (+22 special ones, <|endoftext|> being the first base-vocabulary extension at 151643).
# block_size: the base 1.5B and 7B configs say 131072; the 0.5B and 3B configs and every -Instruct config
# say 32768 (the instruct model cards reach 131072 only with YaRN scaling, which we do not implement).
_qwen_2_5 = dict(_llama, vocab_size=151643, norm_eps=1e-6, rope_base=1000000.0, qkv_bias=True)
for _size, _layers, _embd, _heads, _groups, _inter, _padded, _tied, _base_block in [
    ("0.5B", 24, 896, 14, 2, 4864, 151936, True, 32768),
    ("1.5B", 28, 1536, 12, 2, 8960, 151936, True, 131072),
    ("3B", 36, 2048, 16, 2, 11008, 151936, True, 32768),
    ("7B", 28, 3584, 28, 4, 18944, 152064, False, 131072),
]:
    _qwen = dict(
        _qwen_2_5,
        padded_vocab_size=_padded,
        n_layer=_layers,
        n_embd=_embd,
        n_head=_heads,
        n_query_groups=_groups,
        intermediate_size=_inter,
        tie_embeddings=_tied,
    )
    _variants(dict(_qwen, block_size=_base_block), "Qwen", [f"Qwen2.5-{_size}"])
    _variants(dict(_qwen, block_size=32768), "Qwen", [f"Qwen2.5-{_size}-Instruct"])

# SmolLM2: https://huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json (360M, 1.7B alike)
# Tied embeddings; rope_theta 100000 (135M, 360M) and 130000 (1.7B).
for _size, _layers, _embd, _heads, _groups, _inter, _rope in [
    ("135M", 30, 576, 9, 3, 1536, 100000.0),
    ("360M", 32, 960, 15, 5, 2560, 100000.0),
    ("1.7B", 24, 2048, 32, 32, 8192, 130000.0),
]:
    _variants(
        dict(
            _llama,
            block_size=8192,
            vocab_size=49152,
            padded_vocab_size=49152,
            n_layer=_layers,
            n_embd=_embd,
            n_head=_heads,
            n_query_groups=_groups,
            intermediate_size=_inter,
            rope_base=_rope,
            tie_embeddings=True,
        ),
        "HuggingFaceTB",
        [f"SmolLM2-{_size}", f"SmolLM2-{_size}-Instruct"],
    )

# --- Phi-2 --------------------------------------------------------------------------------------------
# https://huggingface.co/microsoft/phi-2/blob/main/config.json
# Parallel block with one shared LayerNorm, rotary on 32 of 80 channels (`partial_rotary_factor: 0.4`),
# gelu_new (= tanh-approximated gelu), bias everywhere including the lm_head. 50257 GPT-2 tokens
# (CodeGen's whitespace tokens are added on top), 51200 embedding rows.
_variants(
    dict(
        block_size=2048,
        vocab_size=50257,
        padded_vocab_size=51200,
        n_layer=32,
        n_embd=2560,
        n_head=32,
        intermediate_size=10240,
        rotary_percentage=0.4,
        rope_base=10000.0,
        parallel_residual=True,
        shared_attention_norm=True,
        norm_class="LayerNorm",
        norm_eps=1e-5,
        mlp_class="MLP",
        activation="gelu_tanh",
        bias=True,
        lm_head_bias=True,
    ),
    "microsoft",
    ["phi-2"],
)

# --- Gemma --------------------------------------------------------------------------------------------
# https://huggingface.co/google/gemma-2b/blob/main/config.json
# https://huggingface.co/google/gemma-7b/blob/main/config.json
# RMSNorm scaling by (1 + weight), eps 1e-6; GeGLU (GatedMLP + tanh gelu, `hidden_activation:
# gelu_pytorch_tanh`); head_size 256 (so 16 * 256 = 4096 != n_embd 3072 for 7B); embeddings tied and
# multiplied by sqrt(n_embd). "-it" = instruction tuned.
_gemma = dict(
    block_size=8192,
    vocab_size=256000,
    padded_vocab_size=256000,
    head_size=256,
    rotary_percentage=1.0,
    rope_base=10000.0,
    parallel_residual=False,
    norm_class="RMSNorm",
    norm_eps=1e-6,
    norm_plus_one=True,
    mlp_class="GatedMLP",
    activation="gelu_tanh",
    bias=False,
    tie_embeddings=True,
    scale_embeddings=True,
)
_variants(
    dict(_gemma, n_layer=18, n_embd=2048, n_head=8, n_query_groups=1, intermediate_size=16384),
    "google",
    ["gemma-2b", "gemma-2b-it"],
)
_variants(
    dict(_gemma, n_layer=28, n_embd=3072, n_head=16, n_query_groups=16, intermediate_size=24576),
    "google",
    ["gemma-7b", "gemma-7b-it"],
)
