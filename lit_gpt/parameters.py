"""Choosing a model's parameters by what its PEFT layers declare: which train, and which are saved.

Every method module builds its `peft_parameter_names`, `mark_trainable` and `state_dict_to_save` from these
three functions, so what trains and what is saved come from one source. A PEFT layer declares its own
parameters with an ``adapter_params() -> list[str]`` method (names local to the layer); nothing here looks at
parameter-name substrings.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from lit_gpt.checkpoint import model_state_dict


def declared_parameter_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that the model's PEFT layers declare through `adapter_params()`."""
    names = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "adapter_params"):
            names.update(f"{prefix}.{name}" if prefix else name for name in module.adapter_params())
    return names


def mark_only_trainable(model: nn.Module, names: Iterable[str]) -> None:
    """requires_grad=True on the parameters in `names`, False on every other parameter."""
    names = set(names)
    unknown = names - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"Cannot mark unknown parameters as trainable: {sorted(unknown)[:5]}")
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)


def select_state(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The model's tensors whose names are in `names` (tied duplicates dropped), ready to save."""
    names = set(names)
    return model_state_dict(model, keep=names.__contains__)
