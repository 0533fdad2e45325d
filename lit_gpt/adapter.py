"""LLaMA-Adapter (Zhang et al. 2023), https://arxiv.org/abs/2303.16199

From `start_layer` on, every attention layer learns an adaption prompt of `prompt_length` vectors. The
prompt goes through the layer's own (frozen) key and value projections, without RoPE: it has no position.
Every token attends to the prompt without a causal mask, in a softmax of its own, and that result enters
through a per-head gate initialised at zero, so at step 0 the model is exactly the base model::

    x (B, T, C) ─ query/key/value + RoPE ─► q, k, v ─► causal attention(q, k, v) ─────────────┐
                                             │                                                 + ─► proj
    prompt (P, C) ─ key/value, no RoPE ─► pk, pv ─► attention(q, pk, pv), no mask ─► × tanh(g) ┘

Gate: tanh of a zero-initialised factor per head, as the paper's released code does (Lit-GPT uses the
factor without tanh). Both start at 0 with the same gradient (tanh'(0) = 1); the tanh bounds the
prompt's share to at most the size of the ordinary attention output, so a large learning rate cannot
let the untrained prompt swamp the frozen model.

Caching: the prompt's keys and values depend only on weights, so during KV-cached generation they are
computed once and reused. They are cached ONLY at inference -- gradients disabled and a KV cache in use
-- and are recomputed whenever the weights or the KV cache change; `clear_cache()` drops them.
A cache that survived into training would cut the prompt out of the graph so that only the gate
learns (Lit-GPT #1287).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from lit_gpt.config import Config
from lit_gpt.model import GPT, CausalSelfAttention
from lit_gpt.quantize import weight_dtype
from lit_gpt.parameters import declared_parameter_names, mark_only_trainable, select_state


NAME = "adapter"  # as hyperparameters.yaml records the method
WEIGHTS_FILE = "adapter.safetensors"  # what finetune/adapter.py saves: the trained tensors only


@dataclass
class AdapterSettings:
    """Size and placement of the adaption prompt. Finetune scripts expose these as `--adapter_<field>`."""

    prompt_length: int = 10  # P: learned prompt vectors per adapted layer
    start_layer: int = 2  # layers with index >= start_layer get a prompt

    def __post_init__(self) -> None:
        if self.prompt_length < 1:
            raise ValueError(f"Adapter prompt_length must be >= 1, got --adapter_prompt_length {self.prompt_length}.")
        if self.start_layer < 0:
            raise ValueError(f"Adapter start_layer must be >= 0, got --adapter_start_layer {self.start_layer}.")


Settings = AdapterSettings  # the contract's name for it (lit_gpt.peft)


class AdapterAttention(CausalSelfAttention):
    """Causal self-attention plus a gated adaption prompt. Same forward as the base class; `attend` adds
    the prompt's contribution.

    Parameters added: `adapter_wte.weight` (P, C), the prompt; `adapter_gate` (1, H, 1, 1), zero-init.
    """

    def __init__(self, config: Config, prompt_length: int) -> None:
        super().__init__(config)
        self.adapter_wte = nn.Embedding(prompt_length, config.n_embd)
        self.adapter_gate = nn.Parameter(torch.zeros(1, config.n_head, 1, 1))
        self._prefix_cache: Optional[tuple] = None  # (validity key, pk, pv), inference only

    @classmethod
    def from_attention(cls, attn: CausalSelfAttention, prompt_length: int) -> "AdapterAttention":
        """An AdapterAttention that takes over `attn`'s projections (same Parameter objects, no copy).

        The new prompt and gate follow the device and dtype of `attn.query.weight`.
        """
        w, dtype = attn.query.weight, weight_dtype(attn.query.weight)  # a quantized base: its compute dtype
        with torch.device("meta"):  # a shell: its own projections are replaced right below
            new = cls(attn.config, prompt_length)
        new.query, new.key, new.value, new.proj, new.kv_cache = attn.query, attn.key, attn.value, attn.proj, attn.kv_cache
        new.adapter_wte = nn.Embedding(prompt_length, attn.config.n_embd, device=w.device, dtype=dtype)
        new.adapter_gate = nn.Parameter(torch.zeros_like(new.adapter_gate, device=w.device, dtype=dtype))
        return new

    def adapter_params(self) -> list[str]:
        return ["adapter_wte.weight", "adapter_gate"]

    def prefix_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the prompt, (1, G, P, D) each; no RoPE. Cached only at inference."""
        inference = self.kv_cache is not None and not torch.is_grad_enabled()
        prompt, kw, vw = self.adapter_wte.weight, self.key.weight, self.value.weight
        # `_version` counts in-place updates (optimizer steps, load_state_dict): a changed weight is a new key.
        key = (id(self.kv_cache), prompt._version, kw._version, vw._version) if inference else None
        if inference and self._prefix_cache is not None and self._prefix_cache[0] == key:
            return self._prefix_cache[1], self._prefix_cache[2]
        P, D = prompt.size(0), self.config.head_size
        pk = self.key(prompt).view(1, P, -1, D).transpose(1, 2)
        pv = self.value(prompt).view(1, P, -1, D).transpose(1, 2)
        self._prefix_cache = (key, pk, pv) if inference else None
        return pk, pv

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Base attention over the sequence plus the gated attention over the prompt. Returns (B, H, T, D)."""
        y = super().attend(q, k, v, mask)
        B, _, T, _ = q.shape
        pk, pv = self.prefix_kv()
        P = pk.size(2)
        sees_all = torch.ones(1, 1, dtype=torch.bool, device=q.device).expand(T, P)  # no causal mask on the prompt
        y_prompt = super().attend(q, pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1), sees_all)
        return y + torch.tanh(self.adapter_gate).to(y.dtype) * y_prompt

    def clear_cache(self) -> None:
        super().clear_cache()
        self._prefix_cache = None


def apply(model: GPT, settings: AdapterSettings) -> GPT:
    """Swap in `AdapterAttention` for the blocks with index >= `settings.start_layer`, in place. Returns `model`."""
    n_layer = len(model.blocks)
    if settings.start_layer >= n_layer:
        raise ValueError(
            f"--adapter_start_layer {settings.start_layer} leaves no layer to adapt: the model has {n_layer} "
            f"layers (0..{n_layer - 1})."
        )
    for block in list(model.blocks)[settings.start_layer :]:
        if isinstance(block.attn, AdapterAttention):
            raise TypeError("The model already has adapter attention layers (was the adapter applied twice?).")
        block.attn = AdapterAttention.from_attention(block.attn, settings.prompt_length)
    return model


def peft_parameter_names(model: GPT) -> set[str]:
    """Names of every adaption prompt and gate: what trains and what is saved."""
    return declared_parameter_names(model)


def mark_trainable(model: GPT) -> None:
    """Only the prompts and gates train; every base parameter is frozen."""
    mark_only_trainable(model, peft_parameter_names(model))


def state_dict_to_save(model: GPT) -> dict[str, torch.Tensor]:
    """The prompt and gate tensors only, keyed like the model's state dict."""
    return select_state(model, peft_parameter_names(model))
