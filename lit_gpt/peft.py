"""The PEFT registry and the three helpers every method module shares.

Every method module (`lit_gpt.lora`, `lit_gpt.adapter`, `lit_gpt.adapter_v2`) has the same contract:

    Settings                    its settings dataclass (fields become `--lora_<field>` / `--adapter_<field>` CLI flags)
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
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn
import yaml

from lit_gpt.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    check_valid_checkpoint_dir,
    load_into_model,
    load_weights_file,
    model_state_dict,
    tied_parameters,
)
from lit_gpt.config import Config
from lit_gpt.model import GPT, pack_weights


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


# --- loading a finetuned output directory ---------------------------------------------------------------
HPARAMS_FILE = "hyperparameters.yaml"
WEIGHTS_FILES = {"lora": "lora.safetensors", "adapter": "adapter.safetensors", "adapter_v2": "adapter_v2.safetensors"}


def read_hyperparameters(finetuned_dir: str | Path) -> dict[str, Any]:
    """The `hyperparameters.yaml` a finetune run wrote into its output directory."""
    path = Path(finetuned_dir) / HPARAMS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: --finetuned_dir must be an output directory of a finetune run "
            "(e.g. out/lora/final), which holds the weights and the hyperparameters.yaml that describes them."
        )
    return yaml.safe_load(path.read_text())


def load_finetuned(
    finetuned_dir: str | Path,
    method: str,
    checkpoint_dir: Optional[str | Path] = None,
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
    quantize: Optional[str] = None,
) -> tuple[GPT, dict[str, Any]]:
    """Rebuild a PEFT-finetuned model: base checkpoint + the method's weights, settings from hyperparameters.yaml.

    Args:
        finetuned_dir: a finetune output directory (hyperparameters.yaml + `<method>.safetensors`).
        method: the method the caller expects ("lora", "adapter", "adapter_v2"); another one is an error.
        checkpoint_dir: the base checkpoint; default: the one the run was trained on (from hyperparameters.yaml).
        device, dtype: where and in which dtype to hold the weights (dtype None: as stored).
        quantize: hold the base linear weights in 4 or 8 bits ("bnb.nf4", ...; see `lit_gpt.quantize`), read
            and quantized one tensor at a time; the method's own weights stay in `dtype`.

    Returns (model in eval mode, hyperparameters). Fails clearly when the weights were trained on another
    base checkpoint (fingerprint mismatch) or do not fit the model. Linear layers the method left plain are
    packed for faster decoding, as by `lit_gpt.generation.load_model` (see `lit_gpt.model.pack_weights`).
    """
    from lit_gpt.training import base_fingerprint

    finetuned_dir = Path(finetuned_dir)
    hparams = read_hyperparameters(finetuned_dir)
    saved_method = hparams.get("method")
    if saved_method != method:
        hint = f"use generate/{saved_method}.py" if saved_method in _METHOD_MODULES else "use generate/base.py"
        raise ValueError(
            f"{finetuned_dir} holds {saved_method!r} weights, not {method!r}: {hint} for this directory."
        )
    checkpoint_dir = check_valid_checkpoint_dir(checkpoint_dir or hparams["checkpoint_dir"])
    fingerprint = base_fingerprint(checkpoint_dir)
    if hparams.get("base_fingerprint") not in (None, fingerprint):
        raise CheckpointError(
            f"The {method} weights in {finetuned_dir} were trained on another base checkpoint than "
            f"{checkpoint_dir} (fingerprint {hparams['base_fingerprint']} vs {fingerprint}). Pass the base they "
            f"were trained on with --checkpoint_dir (the run used {hparams.get('checkpoint_dir')})."
        )
    module = importlib.import_module(_METHOD_MODULES[method])
    settings = settings_from_dict(method, hparams.get("settings") or {})
    if quantize is not None:
        from lit_gpt.quantize import load_base_model

        model, _ = load_base_model(checkpoint_dir, quantize, device, dtype)
        module.apply(model, settings)  # new method parameters on `device` in the compute dtype, overwritten below
        peft_names, peft_path = module.peft_parameter_names(model), finetuned_dir / WEIGHTS_FILES[method]
        peft_state = load_weights_file(peft_path, device=device)
        if dtype is not None:
            peft_state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in peft_state.items()}
        load_into_model(model, peft_state, peft_path, allowed_missing=set(model.state_dict()) - peft_names)
        missing = peft_names - set(peft_state)
        if missing:
            raise CheckpointError(f"{peft_path} lacks {len(missing)} {method} tensors (e.g. {sorted(missing)[:3]}).")
        return model.eval(), hparams
    config = Config.from_checkpoint(checkpoint_dir)
    with torch.device("meta"):
        model = module.apply(GPT(config), settings)
    ties = tied_parameters(model)
    model = model.to_empty(device=device)  # every tensor is overwritten below; nothing is initialised twice
    for name, source in ties.items():  # to_empty() gives each module its own tensor: tie them again
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))
    if dtype is not None:
        model = model.to(dtype)
    peft_names = module.peft_parameter_names(model)
    base_path, peft_path = checkpoint_dir / WEIGHTS_FILE, finetuned_dir / WEIGHTS_FILES[method]
    base = load_weights_file(base_path, device=device)
    # Adapter-v2 also trains the norms, which the base checkpoint holds too: the finetuned values win.
    load_into_model(model, base, base_path, allowed_missing=peft_names)
    peft_state = load_weights_file(peft_path, device=device)
    load_into_model(model, peft_state, peft_path, allowed_missing=set(model.state_dict()) - peft_names)
    missing = peft_names - set(peft_state)
    if missing:
        raise CheckpointError(f"{peft_path} lacks {len(missing)} {method} tensors (e.g. {sorted(missing)[:3]}).")
    model.max_seq_length = config.block_size  # rebuild the RoPE tables, which to_empty() left uninitialised
    pack_weights(model)  # layers the method left plain compute as one product each (see lit_gpt.model.linears)
    return model.eval(), hparams
