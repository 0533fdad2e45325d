"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021), https://arxiv.org/abs/2106.09685

A chosen linear layer keeps its frozen weight W and learns a low-rank update B·A beside it::

                 x (..., in)
                 │
        ┌────────┴─────────┐
        │                  dropout (LoRA path only)
        │                  │
   W (out × in)       A (r × in)     kaiming-uniform
    frozen            │
        │             B (out × r)    zeros, so B·A = 0 at step 0
        │             │
        │             × alpha / r
        └──── + ──────┘
              │
         h = W x + b + (alpha / r) · B A dropout(x)        (..., out)

After training, `merge` folds (alpha / r)·B·A into W and puts plain `nn.Linear` layers back, so the model
is a base GPT again and its state dict has exactly the base keys.

`LoRALinear` keeps the wrapped layer's parameters under their own names (`weight`, `bias`), so a base
checkpoint loads into a LoRA model with only `lora_A`/`lora_B` missing. LoRA can target the query, key,
value and output projections of attention, all MLP linears, and the LM head (with tied embeddings the
LM head's base weight stays the embedding matrix).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt import quantize
from lit_gpt.checkpoint import tied_keys
from lit_gpt.kernels import Linear
from lit_gpt.model import GPT
from lit_gpt.parameters import declared_parameter_names, mark_only_trainable, select_state


NAME = "lora"  # as hyperparameters.yaml records the method
WEIGHTS_FILE = "lora.safetensors"  # what finetune/lora.py saves: the trained tensors only


@dataclass
class LoRASettings:
    """Which linears get LoRA and with what rank. Finetune scripts expose these as `--lora_<field>`."""

    r: int = 8  # rank of the update B·A
    alpha: float = 16  # the update is scaled by alpha / r
    dropout: float = 0.05  # dropout on the LoRA input path only
    query: bool = True
    key: bool = False
    value: bool = True
    projection: bool = False  # attention output projection
    mlp: bool = False  # every linear of the MLP (fc, or fc_1 / fc_2, and proj)
    head: bool = False  # the LM head

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got --lora_r {self.r}.")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got --lora_alpha {self.alpha}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got --lora_dropout {self.dropout}.")
        if not any((self.query, self.key, self.value, self.projection, self.mlp, self.head)):
            raise ValueError(
                "LoRA targets no layer: set at least one of --lora_query, --lora_key, --lora_value, "
                "--lora_projection, --lora_mlp, --lora_head to true."
            )


Settings = LoRASettings  # the contract's name for it (lit_gpt.peft)


class SharedDropout(nn.Dropout):
    """Dropout that returns the same dropped tensor to every caller passing the same input tensor.

    The query, key and value LoRA layers of a block read one normalised input (as do an MLP's fc_1 and
    fc_2). Giving them one mask, as a fused q/k/v LoRA does (litgpt's LoRAQKVLinear), halves the random
    number work of the default q+v LoRA: drawing the masks was ~5% of a CPU step on SmolLM2-135M. Any
    other input (the next block's) gets a fresh mask. Only weak references are kept, so no tensor lives
    longer than autograd needs it.
    """

    def __init__(self, p: float) -> None:
        super().__init__(p)
        self._last_input: Optional[weakref.ref] = None  # weak references to the last input and its output
        self._last_output: Optional[weakref.ref] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or torch.compiler.is_compiling():
            return super().forward(x)
        if self._last_input is not None and self._last_input() is x:
            out = self._last_output()
            if out is not None:
                return out
        if x.is_cpu:
            # A uniform draw and a comparison: on the CPU, bernoulli_ (what F.dropout draws) took 2.3 ms for a
            # (4, 160, 576) mask and uniform_ 1.3; forward and backward 3.1 instead of 4.6 ms.
            keep = torch.empty_like(x).uniform_().ge_(self.p).mul_(1.0 / (1.0 - self.p))  # 0 or 1 / (1 - p)
            out = x * keep
        else:
            out = super().forward(x)
        self._last_input, self._last_output = weakref.ref(x), weakref.ref(out)
        return out


class LoRALinear(nn.Module):
    """A linear layer plus a trainable low-rank update; computes W x + b + (alpha / r)·B A dropout(x).

    Takes over `linear`'s `weight` and `bias` Parameter objects (no copy, ties preserved). `dropout` is a
    probability, or a dropout module shared with the model's other LoRA layers (see `SharedDropout`).
    Shapes: x (..., in_features) -> (..., out_features); lora_A (r, in_features), lora_B (out_features, r).
    """

    def __init__(self, linear: nn.Linear, r: int, alpha: float, dropout: Union[float, nn.Module] = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        w, dtype = linear.weight, quantize.weight_dtype(linear.weight)  # a quantized base: its compute dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=dtype))
        self.scaling = alpha / r
        if isinstance(dropout, nn.Module):
            self.dropout = dropout
        else:
            self.dropout = SharedDropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # True while B·A is folded into `weight` (then the LoRA path is skipped)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A as nn.Linear's default init (kaiming-uniform, as the paper's reference code), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def adapter_params(self) -> list[str]:
        return ["lora_A", "lora_B"]

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r)·B·A, (out_features, in_features), in the weight's dtype."""
        return (self.scaling * (self.lora_B.float() @ self.lora_A.float())).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = quantize.linear(x, self.weight, self.bias)  # F.linear, or bitsandbytes' matmul for a quantized weight
        if self.merged:
            return out
        # The scaling multiplies the r-wide intermediate, not the (..., out_features) output: r columns instead.
        low_rank = F.linear(self.dropout(x), self.lora_A) * self.scaling  # (..., r)
        return out + F.linear(low_rank, self.lora_B)  # (..., out_features)

    @torch.no_grad()
    def merge_weights(self) -> None:
        """Fold the update into `weight` in place (reversible with `unmerge_weights`)."""
        if quantize.is_quantized(self.weight):
            raise quantize.merge_error(f"LoRALinear({self.in_features}, {self.out_features})")
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge_weights(self) -> None:
        """Take the update back out of `weight` (exact up to floating-point rounding)."""
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        r = self.lora_A.size(0)
        return f"in_features={self.in_features}, out_features={self.out_features}, r={r}, scaling={self.scaling}"


def _targets(model: GPT, settings: LoRASettings) -> Iterator[tuple[nn.Module, str]]:
    """(parent module, child name) of every linear layer the settings select."""
    for block in model.blocks:
        for wanted, name in (
            (settings.query, "query"),
            (settings.key, "key"),
            (settings.value, "value"),
            (settings.projection, "proj"),
        ):
            if wanted:
                yield block.attn, name
        if settings.mlp:
            for name, child in list(block.mlp.named_children()):
                if isinstance(child, (nn.Linear, LoRALinear)):
                    yield block.mlp, name
    if settings.head:
        yield model, "lm_head"


def apply(model: GPT, settings: LoRASettings) -> GPT:
    """Wrap the selected linears of `model` in `LoRALinear`, in place. Returns `model`.

    New LoRA parameters follow the wrapped weight's device and dtype. Call `mark_trainable` next.
    All LoRA layers share one `SharedDropout`, so layers that read the same input get one mask.
    """
    dropout = SharedDropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
    for parent, name in list(_targets(model, settings)):
        linear = getattr(parent, name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Cannot apply LoRA to {name!r}: it is a {type(linear).__name__}, not nn.Linear "
                            "(was LoRA applied twice?).")
        setattr(parent, name, LoRALinear(linear, settings.r, settings.alpha, dropout))
    return model


def peft_parameter_names(model: GPT) -> set[str]:
    """Names of every `lora_A` / `lora_B` in the model: what trains and what is saved."""
    return declared_parameter_names(model)


def mark_trainable(model: GPT) -> None:
    """Only the LoRA parameters train; every base parameter is frozen."""
    mark_only_trainable(model, peft_parameter_names(model))


def state_dict_to_save(model: GPT) -> dict[str, torch.Tensor]:
    """The LoRA tensors only, keyed like the model's state dict (e.g. `blocks.0.attn.query.lora_A`)."""
    return select_state(model, peft_parameter_names(model))


def merge(model: GPT) -> GPT:
    """Fold every LoRA update into its base weight and put plain `Linear` layers back. Returns `model`.

    Afterwards the model is a base GPT (state-dict keys exactly the base keys) and computes the same
    function as before, up to floating-point rounding. Not reversible (the LoRA tensors are dropped).
    """
    shared = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in tied_keys(model)}
    wrappers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, module in wrappers:
        if id(module.weight) in shared:
            raise ValueError(
                f"Cannot merge LoRA into {name!r}: its weight is tied to the token embedding, so merging would "
                "change the input embedding too. Keep the LoRA weights unmerged for this model, or finetune "
                "with --lora_head false."
            )
    for name, module in wrappers:
        module.merge_weights()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        plain = Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight, plain.bias = module.weight, module.bias  # the merged Parameters, no copy
        setattr(parent, child, plain)
    return model
