"""Model configuration: one dataclass, and a table of named configs for the supported families.

Families differ only by the values in this file. Every field below says which family needs it.
A checkpoint directory carries its own `model_config.yaml`; the config is read from there, never
guessed from a directory name.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


@dataclass
class Config:
    name: str = ""
    hf_repo: str = ""  # "org/name" on the Hugging Face hub, used by scripts/download.py

    # --- sizes -------------------------------------------------------------------------------------
    block_size: int = 4096  # longest sequence the model was trained for (positions)
    vocab_size: int = 50254  # tokens the tokenizer produces
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
        if self.padded_vocab_size is None:
            self.padded_vocab_size = self.vocab_size
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
        """Read a `model_config.yaml` written by :meth:`to_file`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Model config {str(path)!r} does not exist.")
        data = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {unknown}. Known keys: {sorted(known)}.")
        return cls(**data)

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
        from lit_gpt.hf_config import config_from_hf  # the mapping is long; it lives beside this file

        if not isinstance(hf_config, dict):
            hf_config = json.loads(Path(hf_config).read_text())
        return config_from_hf(cls, hf_config, name=name)


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is >= ``n``."""
    return n if n % k == 0 else n + k - (n % k)


# ------------------------------------------------------------------------------------------------------
# The family table: one dict per checkpoint, the Hugging Face config it mirrors noted above each group.
# ------------------------------------------------------------------------------------------------------
configs: list[dict[str, Any]] = []

# SmolLM2: https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/blob/main/config.json
for _size, _layers, _embd, _heads, _groups, _inter in [
    ("135M", 30, 576, 9, 3, 1536),
    ("360M", 32, 960, 15, 5, 2560),
    ("1.7B", 24, 2048, 32, 32, 8192),
]:
    for _suffix in ("", "-Instruct"):
        configs.append(
            dict(
                name=f"SmolLM2-{_size}{_suffix}",
                hf_repo=f"HuggingFaceTB/SmolLM2-{_size}{_suffix}",
                block_size=8192,
                vocab_size=49152,
                n_layer=_layers,
                n_embd=_embd,
                n_head=_heads,
                n_query_groups=_groups,
                intermediate_size=_inter,
                rope_base=100000.0 if _size != "1.7B" else 130000.0,
                norm_class="RMSNorm",
                norm_eps=1e-5,
                mlp_class="GatedMLP",
                activation="silu",
                bias=False,
                tie_embeddings=True,
            )
        )
