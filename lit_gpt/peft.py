"""The PEFT registry and the three helpers every method module shares.

Every method module (`lit_gpt.lora`, `lit_gpt.adapter`, `lit_gpt.adapter_v2`) has the same contract:

    Settings                    its settings dataclass (fields become `--<method>_<field>` CLI flags)
    apply(model, settings)      swap/wrap layers of a built GPT in place; returns the model
    peft_parameter_names(model) the names of the parameters the method trains and saves (one source)
    mark_trainable(model)       requires_grad=True exactly on those names, False everywhere else
    state_dict_to_save(model)   exactly those tensors

so code that only knows the method name (generate, merge, eval) can rebuild a finetuned model from the
`method` and settings stored in `hyperparameters.yaml`::

    module = METHODS[hparams["method"]]
    model = module.apply(GPT(config), settings_from_dict(hparams["method"], hparams["settings"]))

A PEFT layer declares its own parameters with an ``adapter_params() -> list[str]`` method (names local to
the layer); nothing here looks at parameter-name substrings.
"""

from __future__ import annotations

import importlib
from dataclasses import fields
from typing import Any, Iterable

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


def settings_from_dict(method: str, values: dict[str, Any]) -> Any:
    """Rebuild a method's settings dataclass from a plain dict, e.g. one read from `hyperparameters.yaml`.

    `values` holds field names without the CLI prefix (``{"r": 8, "alpha": 16}`` for LoRA); fields not
    given keep their defaults, unknown fields are an error (a typo must not silently change the model).
    """
    if method not in _METHOD_MODULES:
        raise ValueError(f"Unknown PEFT method {method!r}; known methods: {sorted(_METHOD_MODULES)}.")
    cls = importlib.import_module(_METHOD_MODULES[method]).Settings
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields are {sorted(known)}.")
    return cls(**values)


_METHOD_MODULES = {"lora": "lit_gpt.lora", "adapter": "lit_gpt.adapter", "adapter_v2": "lit_gpt.adapter_v2"}


def __getattr__(name: str) -> Any:
    """`METHODS`, the registry ``{"lora": lit_gpt.lora, "adapter": ..., "adapter_v2": ...}``.

    Built on first access because the method modules import the helpers above from this module.
    """
    if name == "METHODS":
        return {method: importlib.import_module(module) for method, module in _METHOD_MODULES.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
