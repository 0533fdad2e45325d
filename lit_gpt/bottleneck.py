"""Bottleneck adapters: series (Houlsby et al. 2019; Pfeiffer et al. 2020) and parallel (He et al. 2022), as the
LLM-Adapters project (Hu et al. 2023, https://arxiv.org/abs/2304.01933) places them around linear layers.

A bottleneck is a small two-layer network, width `size`, added to the stream around a frozen linear layer W::

    b(z) = s · up(act(down(dropout(z))))          down: (size × in), up: (out × size), no biases

    series, before W:   y = W (x + b(x))          the adapter edits the linear's input
    series, after W:    y = W x + b(W x)          ... or its output
    parallel:           y = W x + b(x)            beside the linear: in_features -> out_features

`s` is a fixed scaling, or a trainable scalar ("learned"). The adapter runs in float32 whatever the model's dtype.
The presets name LLM-Adapters' placements in this project's layer names, so they apply to every family:

    adapterh   series before every MLP input linear (fc, or fc_1 and fc_2) and after the MLP output (mlp.proj)
               (LLaMA: in front of gate_proj and up_proj, after down_proj)
    adapterp   series after the MLP output (mlp.proj) only
    parallel   parallel beside query, key and value

With `init="zero-up"` (the default) `up` starts at zero, so step 0 computes exactly the base model; `init="bert"`
draws both projections from N(0, 0.02) as LLM-Adapters does (the model then does not start as the base model).

A bottleneck is non-linear (`act`), so unlike LoRA it cannot be folded into the base weights: the adapted model
always runs the adapter layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt import quantize
from lit_gpt.model import GPT
from lit_gpt.parameters import declared_parameter_names, mark_only_trainable, select_state

NAME = "bottleneck"  # as hyperparameters.yaml records the method
WEIGHTS_FILE = "bottleneck.safetensors"  # what finetune/bottleneck.py saves: the trained tensors only
NOT_MERGEABLE = "a bottleneck adapter is non-linear, so it cannot be folded into the base weights"

# preset -> {layer name: placement}. Layer names: query, key, value, projection (attention output), fc (a plain
# MLP's input), fc_1 and fc_2 (a gated MLP's inputs), mlp_proj (the MLP output). A name a family lacks is skipped.
PRESETS: dict[str, dict[str, str]] = {
    "adapterh": {"fc": "before", "fc_1": "before", "fc_2": "before", "mlp_proj": "after"},
    "adapterp": {"mlp_proj": "after"},
    "parallel": {"query": "parallel", "key": "parallel", "value": "parallel"},
}
LAYER_NAMES = ("query", "key", "value", "projection", "fc", "fc_1", "fc_2", "mlp_proj")
PLACEMENTS = ("before", "after", "parallel")
ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu, "silu": F.silu, "gelu": F.gelu}
INITS = ("zero-up", "bert")


@dataclass
class BottleneckSettings:
    """Where the adapters go and what they are. Finetune scripts expose these as `--bottleneck_<field>`.

    preset: "adapterh", "adapterp" or "parallel" (see the module docstring).
    targets: overrides the preset's placement: comma-separated "layer:placement" pairs, e.g.
        "fc_2:parallel,mlp_proj:parallel" (layers: query, key, value, projection, fc, fc_1, fc_2, mlp_proj;
        placements: before, after, parallel). Empty: the preset's.
    size: the bottleneck width (LLM-Adapters: 256).
    activation: tanh (LLM-Adapters' default), relu, silu or gelu.
    dropout: on the adapter's input only.
    scaling: the adapter output is multiplied by this.
    learned_scaling: make the scaling a trainable scalar starting at `scaling` (LLM-Adapters' "learned").
    init: "zero-up" (up = 0: step 0 is the base model) or "bert" (down and up from N(0, 0.02), as LLM-Adapters).
    """

    preset: str = "adapterh"
    targets: str = ""
    size: int = 256
    activation: str = "tanh"
    dropout: float = 0.0
    scaling: float = 1.0
    learned_scaling: bool = False
    init: str = "zero-up"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"--bottleneck_preset {self.preset!r} is not one of {sorted(PRESETS)}.")
        self.placement()  # names a bad --bottleneck_targets now
        if self.size < 1:
            raise ValueError(f"Bottleneck size must be >= 1, got --bottleneck_size {self.size}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"--bottleneck_activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Bottleneck dropout must be in [0, 1), got --bottleneck_dropout {self.dropout}.")
        if self.init not in INITS:
            raise ValueError(f"--bottleneck_init {self.init!r} is not one of {list(INITS)}.")

    def placement(self) -> dict[str, str]:
        """{layer name: placement}: the preset's, or `targets` when given."""
        if not self.targets.strip():
            return dict(PRESETS[self.preset])
        placement = {}
        for item in self.targets.split(","):
            layer, _, where = item.strip().partition(":")
            if layer not in LAYER_NAMES or where not in PLACEMENTS:
                raise ValueError(
                    f"--bottleneck_targets: {item.strip()!r} is not 'layer:placement' with a layer in "
                    f"{list(LAYER_NAMES)} and a placement in {list(PLACEMENTS)} (e.g. 'fc_2:parallel,mlp_proj:after')."
                )
            placement[layer] = where
        return placement


Settings = BottleneckSettings  # the contract's name for it (lit_gpt.peft)


class BottleneckLinear(nn.Module):
    """A frozen linear layer with a bottleneck adapter before it, after it or beside it (see the module docstring).

    Takes over `linear`'s `weight` and `bias` Parameter objects (no copy, ties preserved).
    Shapes: x (..., in_features) -> (..., out_features); bottleneck_down (size, width), bottleneck_up (width', size)
    with width = in_features before and beside the linear, out_features after it, and width' = in_features before
    it, out_features otherwise.
    """

    def __init__(self, linear: nn.Module, placement: str, settings: BottleneckSettings) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.placement = placement
        reads = self.out_features if placement == "after" else self.in_features
        writes = self.in_features if placement == "before" else self.out_features
        w, dtype = linear.weight, quantize.weight_dtype(linear.weight)  # a quantized base: its compute dtype
        self.bottleneck_down = nn.Parameter(torch.empty(settings.size, reads, device=w.device, dtype=dtype))
        self.bottleneck_up = nn.Parameter(torch.empty(writes, settings.size, device=w.device, dtype=dtype))
        if settings.learned_scaling:
            self.bottleneck_scale = nn.Parameter(torch.full((1,), settings.scaling, device=w.device, dtype=dtype))
        else:
            self.bottleneck_scale = settings.scaling
        self.act = ACTIVATIONS[settings.activation]
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.init = settings.init
        self.reset_bottleneck_parameters()

    def reset_bottleneck_parameters(self) -> None:
        nn.init.normal_(self.bottleneck_down, std=0.02)
        if self.init == "bert":
            nn.init.normal_(self.bottleneck_up, std=0.02)
        else:
            nn.init.zeros_(self.bottleneck_up)

    def adapter_params(self) -> list[str]:
        learned = isinstance(self.bottleneck_scale, nn.Parameter)
        return ["bottleneck_down", "bottleneck_up", *(["bottleneck_scale"] if learned else [])]

    def bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        """s · up(act(down(dropout(z)))), computed in float32 and returned in z's dtype. z (..., width)."""
        hidden = self.act(F.linear(self.dropout(z).float(), self.bottleneck_down.float()))  # (..., size)
        out = F.linear(hidden, self.bottleneck_up.float())
        scale = self.bottleneck_scale
        return (out * (scale.float() if isinstance(scale, torch.Tensor) else scale)).to(z.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "before":
            return quantize.linear(x + self.bottleneck(x), self.weight, self.bias)
        y = quantize.linear(x, self.weight, self.bias)
        return y + self.bottleneck(y if self.placement == "after" else x)

    def extra_repr(self) -> str:
        size = self.bottleneck_down.size(0)
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.placement}, size={size}"


def _targets(model: GPT, settings: BottleneckSettings) -> Iterator[tuple[nn.Module, str, str]]:
    """(parent module, child name, placement) of every linear the settings select that this family has."""
    placement = settings.placement()
    for block in model.blocks:
        for layer, where in placement.items():
            parent, child = {"query": (block.attn, "query"), "key": (block.attn, "key"),
                             "value": (block.attn, "value"), "projection": (block.attn, "proj"),
                             "mlp_proj": (block.mlp, "proj")}.get(layer, (block.mlp, layer))
            if hasattr(parent, child):
                yield parent, child, where


def apply(model: GPT, settings: BottleneckSettings) -> GPT:
    """Wrap the selected linears of `model` in `BottleneckLinear`, in place. Returns `model`.

    A placement that matches no layer of this family (e.g. only fc_1 on a model with a plain MLP) is an error.
    New parameters follow the wrapped weight's device and dtype. Call `mark_trainable` next.
    """
    targets = list(_targets(model, settings))
    if not targets:
        raise ValueError(
            f"The bottleneck placement {settings.placement()} matches no layer of this model (its MLP has "
            f"{sorted(n for n, _ in model.blocks[0].mlp.named_children())}). Choose other --bottleneck_targets."
        )
    for parent, name, where in targets:
        linear = getattr(parent, name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Cannot put a bottleneck adapter on {name!r}: it is a {type(linear).__name__}, not "
                            "nn.Linear (was a method applied twice?).")
        setattr(parent, name, BottleneckLinear(linear, where, settings))
    return model


def peft_parameter_names(model: GPT) -> set[str]:
    """Names of every adapter's down and up projections (and learned scales): what trains and what is saved."""
    return declared_parameter_names(model)


def mark_trainable(model: GPT) -> None:
    """Only the adapter parameters train; every base parameter is frozen."""
    mark_only_trainable(model, peft_parameter_names(model))


def state_dict_to_save(model: GPT) -> dict[str, torch.Tensor]:
    """The adapter tensors only, keyed like the model's state dict (e.g. `blocks.0.mlp.proj.bottleneck_up`)."""
    return select_state(model, peft_parameter_names(model))
