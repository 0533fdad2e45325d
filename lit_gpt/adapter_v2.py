"""LLaMA-Adapter V2 (Gao et al. 2023), https://arxiv.org/abs/2304.15010

Adapter v2 = the LLaMA-Adapter prompt and gate (`lit_gpt.adapter`), plus

* bias and scale tuning: every linear layer (attention q/k/v/proj, MLP, LM head) learns a per-output
  scale s (init 1) and bias b (init 0) around its frozen weight::

        x ─► W x + bias ─► + adapter_bias ─► × adapter_scale ─► y      y = s ⊙ (W x + bias + b)

  This is the paper's parametrisation (scale outside the bias, Sec. 3.1 "bias tuning"); `s·(Wx + bias) + b`
  would be the same function family with the same count. With s = 1, b = 0 the output is bit-identical
  to the base layer.
* trainable normalisation layers: every `nn.LayerNorm` and `RMSNorm` (chosen by module type).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from lit_gpt import adapter, quantize
from lit_gpt.model import GPT, RMSNorm
from lit_gpt.parameters import declared_parameter_names, mark_only_trainable, select_state

NORM_TYPES = (nn.LayerNorm, RMSNorm)  # whole modules of these types train in Adapter v2


NAME = "adapter_v2"  # as hyperparameters.yaml records the method
WEIGHTS_FILE = "adapter_v2.safetensors"  # what finetune/adapter_v2.py saves: the trained tensors only


@dataclass
class AdapterV2Settings(adapter.AdapterSettings):
    """Adaption prompt size and placement, as for Adapter v1 (`--adapter_<field>` in the scripts, as for Adapter v1).

    Bias/scale tuning and norm tuning always apply to the whole model; they have no settings.
    """


Settings = AdapterV2Settings  # the contract's name for it (lit_gpt.peft)


class AdapterV2Linear(nn.Module):
    """A frozen linear layer with a trainable per-output scale and bias: y = s ⊙ (W x + bias + b).

    Takes over `linear`'s `weight` and `bias` Parameter objects (no copy, ties preserved).
    Shapes: x (..., in_features) -> (..., out_features); adapter_scale, adapter_bias (out_features,).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        w, dtype = linear.weight, quantize.weight_dtype(linear.weight)  # a quantized base: its compute dtype
        self.adapter_scale = nn.Parameter(torch.ones(self.out_features, device=w.device, dtype=dtype))
        self.adapter_bias = nn.Parameter(torch.zeros(self.out_features, device=w.device, dtype=dtype))

    def adapter_params(self) -> list[str]:
        return ["adapter_scale", "adapter_bias"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter_scale * (quantize.linear(x, self.weight, self.bias) + self.adapter_bias)

    def affine_terms(self) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(weight, bias + b, s): as the LM head, this layer runs inside the model's fused loss
        (`lit_gpt.kernels.fused_head_terms`). None for a quantized weight, which the fused loss cannot multiply."""
        if quantize.is_quantized(self.weight):
            return None
        shift = self.adapter_bias if self.bias is None else self.bias + self.adapter_bias
        return self.weight, shift, self.adapter_scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def apply(model: GPT, settings: AdapterV2Settings) -> GPT:
    """Adapter v1 attention from `settings.start_layer` on, then every `nn.Linear` wrapped in
    `AdapterV2Linear`, in place. Returns `model`."""
    adapter.apply(model, settings)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):  # plain or quantized linears; the wrappers are not nn.Linear
                setattr(parent, name, AdapterV2Linear(child))
    return model


def peft_parameter_names(model: GPT) -> set[str]:
    """Prompts, gates, scales and biases (declared by the layers) plus every parameter of every norm layer."""
    names = declared_parameter_names(model)
    for prefix, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            names.update(f"{prefix}.{name}" for name, _ in module.named_parameters())
    return names


def mark_trainable(model: GPT) -> None:
    """Only the Adapter v2 parameters train; every other parameter is frozen."""
    mark_only_trainable(model, peft_parameter_names(model))


def state_dict_to_save(model: GPT) -> dict[str, torch.Tensor]:
    """The Adapter v2 tensors only (including the norm weights), keyed like the model's state dict."""
    return select_state(model, peft_parameter_names(model))
