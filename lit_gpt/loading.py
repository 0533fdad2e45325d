"""Getting a model ready to run: one start-up for the generate and eval scripts, one loader for a base
checkpoint directory, one for any finetune output directory.

    runtime = start_inference(precision=None, quantize=None, seed=1234)       # device, precision, Fabric
    model, config = load_base_model("checkpoints/SmolLM2-135M-Instruct", runtime.device, runtime.dtype)
    model, hparams = load_finetuned("out/lora/final", device=runtime.device, dtype=runtime.dtype)

`load_base_model` is also how the finetune scripts build the model they train (pass their `fabric`), and
`load_finetuned` reads the method and its settings from the directory's `hyperparameters.yaml`, so neither
the scripts nor this module know anything method-specific: a method's module (found in `lit_gpt.peft.METHODS`)
says how to apply it and which file holds its weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from lightning_fabric import Fabric
from lightning_fabric.strategies import FSDPStrategy

from lit_gpt.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    check_weight,
    check_state_dict_keys,
    check_valid_checkpoint_dir,
    fingerprint_in_scheme_of,
    load_into_model,
    load_weights_file,
    read_tensor,
    safetensors_header,
    same_base,
)
from lit_gpt.config import Config
from lit_gpt.files import file_problem
from lit_gpt.kernels import pack_weights
from lit_gpt.model import GPT
from lit_gpt.outputs import HPARAMS_FILE, HPARAMS_REMEDY, read_hyperparameters
from lit_gpt.peft import FULL, METHODS, method_module, settings_from_dict
from lit_gpt.quantize import QuantizedLinear, check_quantize, quantize_weight
from lit_gpt.utils import choose_device_type, choose_precision, precision_to_dtype, release_freed_host_memory

PathLike = Union[str, Path]
# Finetune output directories that hold a complete checkpoint (loaded as a base): a full finetune, a merged LoRA.
COMPLETE_CHECKPOINT_METHODS = (FULL, "lora_merged")


# --- start-up -----------------------------------------------------------------------------------------------
@dataclass
class Runtime:
    """Where and how a generate or eval script runs a model (see `start_inference`)."""

    fabric: Fabric
    device_type: str  # "cuda", "mps" or "cpu"
    precision: str  # a Fabric precision string, e.g. "32-true"
    quantize: Optional[str]  # a --quantize mode, or None

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are held in under `precision`."""
        return precision_to_dtype(self.precision)


def start_inference(precision: Optional[str] = None, quantize: Optional[str] = None, seed: Optional[int] = None) -> Runtime:
    """The start-up every generate and eval script shares: the best device here, a precision it runs (default:
    the best one, see `lit_gpt.utils.choose_precision`), a checked `--quantize` mode, a one-device Fabric and,
    when `seed` is given, a seeded RNG. Bad values raise a ValueError that names the flag."""
    torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls on the GPUs that have it; no-op on CPU
    device_type = choose_device_type()
    precision = choose_precision(precision, device_type)
    quantize = check_quantize(quantize, device_type, precision)
    fabric = Fabric(accelerator=device_type, devices=1, precision=precision)
    if seed is not None:
        torch.manual_seed(seed)
    return Runtime(fabric, device_type, precision, quantize)


# --- a base checkpoint --------------------------------------------------------------------------------------
def load_base_model(
    checkpoint_dir: PathLike,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    quantize: Optional[str] = None,
    fabric: Optional[Fabric] = None,
) -> tuple[GPT, Config]:
    """The GPT of a checkpoint directory with its weights loaded; returns (model, config).

    The directory is validated first (a CheckpointError names what is missing and how to get it). The model is
    built on the meta device, so nothing is spent on random initialisation, and lit_model.safetensors is read
    one tensor at a time, cast to `dtype` (None: as stored) and moved to `device`, so the host never holds a
    second copy of the weights. Every parameter must come from the file, with no unexpected key.

    Args:
        quantize: hold each linear weight not tied to the embedding in 4 or 8 bits ("bnb.nf4", ... see
            `lit_gpt.quantize`), quantized as it is read: the peak is the quantized model plus one float tensor.
        fabric: the model is for training under this Fabric: it goes to `fabric.device` (under FSDP it stays on
            the CPU in the stored dtype, for Fabric to shard) and comes back in train mode. Without it the model
            is for inference: eval mode, and each block's q/k/v and fc_1/fc_2 weights packed into one buffer
            per group for faster decoding (`lit_gpt.kernels.pack_weights`: same parameters, state dict, outputs).
    """
    if fabric is not None:
        sharded = isinstance(fabric.strategy, FSDPStrategy) and quantize is None
        device, dtype = ("cpu", None) if sharded else (fabric.device, dtype)
        model, config = _read_base_model(checkpoint_dir, device, dtype, quantize)
        return model.train(), config
    model, config = _read_base_model(checkpoint_dir, device, dtype, quantize)
    pack_weights(model)  # q/k/v and fc_1/fc_2 in one product each: faster decoding, same outputs
    return model.eval(), config


def _read_base_model(
    checkpoint_dir: PathLike,
    device: Union[str, torch.device],
    dtype: Optional[torch.dtype],
    quantize: Optional[str],
) -> tuple[GPT, Config]:
    """What `load_base_model` does before it picks train or inference mode: build on the meta device, then read
    the weights tensor by tensor onto `device` (in `dtype`, quantized when asked), checked against the model."""
    checkpoint_dir = check_valid_checkpoint_dir(checkpoint_dir, need_tokenizer=False)
    config = Config.from_checkpoint(checkpoint_dir)
    path = checkpoint_dir / WEIGHTS_FILE
    with torch.device("meta"):
        model = GPT(config)
    tied = {id(model.wte.weight)} if config.tie_embeddings else set()
    to_quantize = set()
    if quantize is not None:
        to_quantize = {f"{name}.weight" for name, m in model.named_modules()
                       if isinstance(m, nn.Linear) and id(m.weight) not in tied}
    header = safetensors_header(path)
    check_state_dict_keys(model, {k: torch.Size(v["shape"]) for k, v in header.items()}, path)
    with open(path, "rb") as f:
        for key, info in header.items():
            owner_name, _, attr = key.rpartition(".")
            owner = model.get_submodule(owner_name)
            tensor = read_tensor(f, info)
            check_weight(path, key, tensor)
            if tensor.is_floating_point() and dtype is not None:
                tensor = tensor.to(dtype)
            if key in to_quantize:
                layer = QuantizedLinear(owner.in_features, owner.out_features, bias=False, device="meta")
                layer.weight, layer.bias = quantize_weight(tensor.to(device), quantize, device), owner.bias
                parent_name, _, child = owner_name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
            elif attr in owner._parameters:
                setattr(owner, attr, nn.Parameter(tensor.to(device), requires_grad=tensor.is_floating_point()))
            else:
                owner._buffers[attr] = tensor.to(device)
            del tensor
            if quantize is not None:
                release_freed_host_memory()  # bitsandbytes' temporaries fragment the heap
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    model.max_seq_length = config.block_size  # build the RoPE tables on `device`
    return model, config


# --- a finetune output directory ----------------------------------------------------------------------------
def load_finetuned(
    finetuned_dir: PathLike,
    checkpoint_dir: Optional[PathLike] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    quantize: Optional[str] = None,
    method: Optional[str] = None,
) -> tuple[GPT, dict[str, Any]]:
    """Rebuild the model a finetune run produced, whatever its method; returns (model in eval mode, hyperparameters).

    The method and its settings come from the directory's hyperparameters.yaml: a PEFT method's weights
    (`<method>.safetensors`) go onto its base checkpoint; a full finetune (or a merged LoRA) is a complete
    checkpoint of its own.

    Args:
        finetuned_dir: a finetune output directory, e.g. out/lora/final or out/lora/step-000100.
        checkpoint_dir: the base checkpoint; default: the one the run was trained on (from hyperparameters.yaml).
            It must be the same weights: a fingerprint mismatch is an error that names both.
        device, dtype, quantize: as for `load_base_model`; the method's own weights are cast to `dtype` and never
            quantized.
        method: the method the caller expects ("lora", ...); another one is an error that says which script
            to use instead. None accepts any method.
    """
    finetuned_dir = Path(finetuned_dir)
    if not finetuned_dir.is_dir():
        raise FileNotFoundError(
            f"--finetuned_dir {str(finetuned_dir)!r} does not exist. Pass the output directory of a finetune run, "
            "e.g. out/lora/final."
        )
    hparams = read_hyperparameters(finetuned_dir)
    saved = hparams.get("method")
    if saved not in METHODS and saved not in COMPLETE_CHECKPOINT_METHODS:
        known = sorted([*METHODS, *COMPLETE_CHECKPOINT_METHODS])
        raise file_problem(finetuned_dir / HPARAMS_FILE, f"names method {saved!r}; known methods: {known}",
                           HPARAMS_REMEDY)
    if method is not None and saved != method:
        raise ValueError(
            f"{finetuned_dir} holds {saved!r} weights, not {method!r} (its {HPARAMS_FILE} says so). To use whatever "
            f"it holds, generate with `python generate/finetuned.py --finetuned_dir {finetuned_dir}` (or evaluate "
            "without --method): the method is read from that file."
        )
    if saved in COMPLETE_CHECKPOINT_METHODS:
        model, _ = load_base_model(finetuned_dir, device, dtype, quantize)
        return model, hparams

    module = method_module(saved)
    weights_path = finetuned_dir / module.WEIGHTS_FILE
    if not weights_path.is_file():
        present = sorted(p.name for p in finetuned_dir.iterdir())
        raise FileNotFoundError(
            f"{finetuned_dir} says method {saved!r} but has no {module.WEIGHTS_FILE} (it contains {present}). "
            "Point --finetuned_dir at the `final` (or `step-*`) directory of the run."
        )
    if checkpoint_dir is None and not isinstance(hparams.get("checkpoint_dir"), str):
        raise file_problem(finetuned_dir / HPARAMS_FILE, "does not name the base checkpoint (checkpoint_dir)",
                           "Pass the base the weights were trained on with --checkpoint_dir.")
    checkpoint_dir = check_valid_checkpoint_dir(checkpoint_dir or hparams["checkpoint_dir"])
    recorded = hparams.get("base_fingerprint")
    # A legacy (partial-hash) value from a run before whole-file fingerprints is checked the legacy way.
    if recorded is not None and not same_base(recorded, checkpoint_dir):
        fingerprint = fingerprint_in_scheme_of(recorded, checkpoint_dir)
        raise CheckpointError(
            f"The {saved} weights in {finetuned_dir} were trained on another base checkpoint than "
            f"{checkpoint_dir} (fingerprint {recorded} vs {fingerprint}). Pass the base they "
            f"were trained on with --checkpoint_dir (the run used {hparams.get('checkpoint_dir')})."
        )
    try:
        settings = settings_from_dict(saved, hparams.get("settings") or {})
    except ValueError as e:
        raise file_problem(finetuned_dir / HPARAMS_FILE, f"holds settings the {saved} method cannot take: {e}",
                           HPARAMS_REMEDY) from None

    model, _ = _read_base_model(checkpoint_dir, device, dtype, quantize)
    # The method's new parameters are overwritten below: their random initialisation must not move the global
    # RNG, or a seeded generation would sample differently than with the weights built in place.
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        module.apply(model, settings)
    peft_names = module.peft_parameter_names(model)
    peft_state = load_weights_file(weights_path, device=device)
    for name, tensor in peft_state.items():
        check_weight(weights_path, name, tensor)
    if dtype is not None:
        peft_state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in peft_state.items()}
    # Adapter-v2 also trains the norms, which the base checkpoint holds too: the finetuned values win.
    load_into_model(model, peft_state, weights_path, allowed_missing=set(model.state_dict()) - peft_names)
    missing = peft_names - set(peft_state)
    if missing:
        raise CheckpointError(f"{weights_path} lacks {len(missing)} {saved} tensors (e.g. {sorted(missing)[:3]}).")
    pack_weights(model)  # the groups of layers the method left plain (see lit_gpt.kernels.pack_weights)
    return model.eval(), hparams
