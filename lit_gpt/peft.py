"""The PEFT methods this project has, and the contract every one of them keeps.

A method is one module in `lit_gpt/` (`lora.py`, `adapter.py`, `adapter_v2.py`, `bottleneck.py`) with:

    NAME                        its name, as `hyperparameters.yaml` records it ("lora")
    WEIGHTS_FILE                the file its trained tensors are saved to ("lora.safetensors")
    Settings                    its settings dataclass (fields become `--lora_<field>` / `--adapter_<field>` flags)
    apply(model, settings)      swap/wrap layers of a built GPT in place; returns the model
    peft_parameter_names(model) the names of the parameters the method trains and saves (one source)
    mark_trainable(model)       requires_grad=True exactly on those names, False everywhere else
    state_dict_to_save(model)   exactly those tensors
    merge(model)                optional: fold the trained update into the base weights (LoRA)
    NOT_MERGEABLE               optional: why the method cannot be merged (said when a merge is asked for)

plus a thin `finetune/<name>.py` script and its tests. Nothing else knows what a method does: the training
loop (`lit_gpt.training.fit`), the loader of finetune output directories (`lit_gpt.loading.load_finetuned`),
generation and evaluation find the module here by the `method` stored in `hyperparameters.yaml`::

    module = METHODS[hparams["method"]]
    model = module.apply(base_model, settings_from_dict(module.NAME, hparams["settings"]))

Adding a method is that module, its script, its tests and one line in `METHODS` below
(tutorials/add_a_method.md walks through it). The helpers the modules share live in `lit_gpt.parameters`.
"""

from __future__ import annotations

from dataclasses import fields
from types import ModuleType
from typing import Any, get_type_hints

from lit_gpt import adapter, adapter_v2, bottleneck, lora
from lit_gpt.files import type_mismatch

METHODS: dict[str, ModuleType] = {module.NAME: module for module in (lora, adapter, adapter_v2, bottleneck)}

# A full finetune saves every weight as a complete checkpoint directory: it has no method module.
FULL = "full"


def method_module(method: str) -> ModuleType:
    """The module of PEFT method `method` ("lora", ...); a ValueError naming the known methods otherwise."""
    if method not in METHODS:
        raise ValueError(f"Unknown PEFT method {method!r}; known methods: {sorted(METHODS)}.")
    return METHODS[method]


def settings_from_dict(method: str, values: dict[str, Any]) -> Any:
    """Rebuild a method's settings dataclass from a plain dict, e.g. one read from `hyperparameters.yaml`.

    `values` holds field names without the CLI prefix (``{"r": 8, "alpha": 16}`` for LoRA); fields not
    given keep their defaults, unknown fields are an error (a typo must not silently change the model).
    """
    cls = method_module(method).Settings
    if not isinstance(values, dict):
        raise ValueError(f"{method} settings must be a mapping of field names to values, got {values!r}.")
    known = {f.name for f in fields(cls)}
    unknown = sorted(map(str, set(values) - known))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields are {sorted(known)}.")
    hints = get_type_hints(cls)
    for key, value in values.items():
        expected = type_mismatch(value, hints[key])
        if expected:
            raise ValueError(f"{cls.__name__}.{key} is {value!r}, which is not {expected}.")
    return cls(**values)
