"""Frozen base weights in 4 or 8 bits with bitsandbytes: QLoRA finetuning (Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314) and quantized generation.

Every frozen linear weight of the base model (attention q/k/v/proj, MLP, an untied LM head) becomes a
bitsandbytes parameter; embeddings, norms and every PEFT parameter stay in the run's float dtype::

    checkpoint tensor (out × in, float) ──► bnb.nn.Params4bit  (NF4/FP4 codes, 2 per byte, + absmax per block)
                                       └──► bnb.nn.Int8Params  (int8 rows + one scale per row, LLM.int8())

    x ─► quantize.linear(x, weight, bias) ─► bnb.matmul_4bit / bnb.matmul for a quantized weight,
                                            lit_gpt.model.linear (F.linear) for a float one

`linear` is the one base path of every linear layer: the plain layers become `QuantizedLinear` (an
`nn.Linear` whose forward calls it) and the PEFT wrappers (`LoRALinear`, `AdapterV2Linear`) call it for
their frozen part. The wrappers keep the quantized Parameter under its usual name (`weight`), so LoRA or
adapter weights saved from a quantized run load into a full-precision model and vice versa: only the
trained tensors are ever saved, and they are ordinary float tensors.

Modes (`--quantize`):
    bnb.nf4, bnb.nf4-dq   4-bit NormalFloat (QLoRA's data type); -dq also quantizes the per-block scales
                          ("double quantization", ~0.4 bit/param less)
    bnb.fp4, bnb.fp4-dq   4-bit float
    bnb.int8              LLM.int8() weights (8 bit); for generation and for a frozen PEFT base
    bnb.int8-training     rejected with an explanation: it keeps 16-bit weights so that they can train

`load_base_model` reads the checkpoint one tensor at a time onto a model built on the meta device and
quantizes each linear weight as it is read, so peak memory is the quantized model plus one float tensor,
never the full-precision model. bitsandbytes' own `Linear4bit` is not used as the layer: on CPUs with
AVX512-BF16 its forward repacks the weight in place at the first no-grad call (for inference), which would
change the path of training after a validation pass; and Lightning's `BitsandbytesPrecision` quantizes on
CUDA only. Both use the same bitsandbytes parameters and kernels as here.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from lit_gpt.model import Linear
from lit_gpt.model import linear as model_linear

MODES = ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8", "bnb.int8-training")
MIN_BNB_VERSION = (0, 45)
QUANTIZE_PRECISIONS = ("32-true", "bf16-true", "16-true")  # the float dtype the quantized layers compute in


class QuantizeError(ValueError):
    """--quantize cannot run with these settings; the message says what to use instead."""


def check_quantize(quantize: Optional[str], device_type: str, precision: str, strategy: str = "auto") -> Optional[str]:
    """Validate a `--quantize` value against the device, precision and strategy; returns it (None: no quantization).

    Raises a QuantizeError that says what to do: an unknown mode, int8-training, MPS, a mixed or 64-bit
    precision, FSDP, or bitsandbytes missing or too old.
    """
    if quantize is None:
        return None
    if quantize not in MODES:
        raise QuantizeError(f"Unknown --quantize {quantize!r}: choose one of {', '.join(MODES[:-1])}.")
    if quantize == "bnb.int8-training":
        raise QuantizeError(
            "--quantize bnb.int8-training keeps the weights in 16 bits and quantizes only the matmuls, so that the "
            "weights themselves can train (bitsandbytes' has_fp16_weights=True). Here the base weights are frozen, "
            "so it would save no memory: use --quantize bnb.int8 (8-bit frozen weights) or bnb.nf4 / bnb.nf4-dq "
            "(4-bit, QLoRA)."
        )
    if device_type == "mps":
        raise QuantizeError(
            f"--quantize {quantize} needs bitsandbytes, which has no Apple MPS backend. On a Mac, drop --quantize and "
            "use --precision 16-true (half the memory of 32-true), or run on CPU (slow) or a CUDA GPU."
        )
    if precision not in QUANTIZE_PRECISIONS:
        raise QuantizeError(
            f"--quantize {quantize} needs a '-true' precision for the layers to compute in, got --precision "
            f"{precision!r}: use --precision bf16-true (CUDA), 32-true (CPU) or 16-true."
        )
    if strategy == "fsdp":
        raise QuantizeError(
            f"--quantize {quantize} does not work with --strategy fsdp: FSDP flattens parameters of one dtype and "
            "would lose the bitsandbytes quantization state. Use --strategy ddp (one quantized copy per device; "
            "the 4-bit base is small enough to replicate)."
        )
    bnb_module()
    return quantize


def bnb_module():
    """`import bitsandbytes`, or a QuantizeError that says how to install it (>= 0.45 runs on CPU too)."""
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError as e:
        raise QuantizeError(
            f"--quantize needs bitsandbytes, which cannot be imported ({e}). Install it with "
            "`pip install 'bitsandbytes>=0.45'` (or `pip install -e \".[quantize]\"`), or drop --quantize."
        ) from None
    version = tuple(int(p) for p in bnb.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_BNB_VERSION:
        raise QuantizeError(
            f"bitsandbytes {bnb.__version__} is too old for --quantize (it needs >= 0.45, the first release that "
            "runs 4-bit layers on CPU): `pip install -U 'bitsandbytes>=0.45'`."
        )
    return bnb


def quantize_weight(weight: torch.Tensor, mode: str, device: torch.device | str) -> nn.Parameter:
    """A frozen bitsandbytes parameter holding `weight` (out_features, in_features), quantized on `device`.

    The float dtype of `weight` is the dtype the layer computes in (`compute_dtype`). 4-bit modes use
    bitsandbytes' default block size (64 weights share one absmax scale).
    """
    bnb = bnb_module()
    if mode == "bnb.int8":
        param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        quant_type, _, dq = mode.removeprefix("bnb.").partition("-")
        param = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type, compress_statistics=bool(dq))
    param = param.to(device)  # bitsandbytes quantizes on the first move to a real device
    param.compute_dtype = weight.dtype
    return param


def is_quantized(weight: torch.Tensor) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit parameter."""
    return hasattr(weight, "quant_state") or hasattr(weight, "SCB")


def logical_numel(weight: torch.Tensor) -> int:
    """How many weights a parameter stands for: a 4-bit parameter packs two per stored byte."""
    quant_state = getattr(weight, "quant_state", None)
    return int(torch.Size(quant_state.shape).numel()) if quant_state is not None else weight.numel()


def weight_dtype(weight: torch.Tensor) -> torch.dtype:
    """The float dtype a layer with this weight computes in: `weight.dtype`, or the one it was quantized from."""
    if not is_quantized(weight):
        return weight.dtype
    if getattr(weight, "quant_state", None) is not None:
        return weight.quant_state.dtype
    return getattr(weight, "compute_dtype", torch.get_default_dtype())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weightᵀ + bias for a float or bitsandbytes-quantized weight. x (..., in) -> (..., out).

    Gradients flow to `x` (and `bias`) through bitsandbytes' autograd functions; the quantized weight is frozen.
    """
    if not is_quantized(weight):
        return model_linear(x, weight, bias)
    bnb = bnb_module()
    if getattr(weight, "quant_state", None) is not None:
        return bnb.matmul_4bit(x, weight.t(), bias=bias, quant_state=weight.quant_state)
    state = bnb.MatmulLtState()  # LLM.int8(): int8 rows + per-row scales, no outlier decomposition
    state.CB, state.SCB, state.has_fp16_weights, state.is_training = weight.data, weight.SCB, False, x.requires_grad
    # bitsandbytes logs at every call that non-fp16 inputs are cast to fp16 (thousands of lines per answer).
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_int8_cast_notice)  # once: a set
    return bnb.matmul(x, weight, bias=bias, state=state)


def _drop_int8_cast_notice(record: logging.LogRecord) -> bool:
    return "inputs will be cast" not in record.getMessage()


class QuantizedLinear(nn.Linear):
    """An `nn.Linear` whose frozen `weight` is a bitsandbytes parameter; same names (`weight`, `bias`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def load_base_model(checkpoint_dir: Path | str, quantize: Optional[str], device, dtype: Optional[torch.dtype]):
    """The GPT of a checkpoint directory with its linear weights quantized as they are read; (model, config).

    Built on the meta device; each tensor of lit_model.safetensors is read alone, cast to `dtype` (None: as
    stored), moved to `device` and, for a linear weight that is not tied to the embedding, quantized there
    (`quantize` None: kept as it is), so the peak is the model plus one float tensor. The keys are verified
    as in `load_into_model` (none may be missing). Quantized weights are frozen; every other floating-point
    parameter requires grad (`mark_trainable` decides after a PEFT method is applied).
    """
    from lit_gpt.checkpoint import WEIGHTS_FILE, check_state_dict_keys, check_valid_checkpoint_dir
    from lit_gpt.config import Config
    from lit_gpt.model import GPT

    checkpoint_dir = check_valid_checkpoint_dir(checkpoint_dir, need_tokenizer=False)
    config = Config.from_checkpoint(checkpoint_dir)
    path = checkpoint_dir / WEIGHTS_FILE
    with torch.device("meta"):
        model = GPT(config)
    tied = {id(model.wte.weight)} if config.tie_embeddings else set()
    targets = {f"{name}.weight" for name, m in model.named_modules() if type(m) in (nn.Linear, Linear) and id(m.weight) not in tied}
    header = _safetensors_header(path)
    check_state_dict_keys(model, {k: torch.Size(v["shape"]) for k, v in header.items()}, path)
    with open(path, "rb") as f:
        for key, info in header.items():
            owner_name, _, attr = key.rpartition(".")
            owner = model.get_submodule(owner_name)
            tensor = _read_tensor(f, info)
            if tensor.is_floating_point() and dtype is not None:
                tensor = tensor.to(dtype)
            if key in targets and quantize is not None:
                layer = QuantizedLinear(owner.in_features, owner.out_features, bias=False, device="meta")
                layer.weight, layer.bias = quantize_weight(tensor.to(device), quantize, device), owner.bias
                parent_name, _, child = owner_name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
            elif attr in owner._parameters:
                setattr(owner, attr, nn.Parameter(tensor.to(device), requires_grad=tensor.is_floating_point()))
            else:
                owner._buffers[attr] = tensor.to(device)
            del tensor
            _release_freed_memory()
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    model.max_seq_length = config.block_size  # build the RoPE tables on `device`
    return model.eval(), config


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _safetensors_header(path: Path) -> dict[str, dict]:
    """{name: {"dtype", "shape", "data_offsets"}} of a safetensors file (its documented JSON header)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {name: {**info, "start": 8 + size + info["data_offsets"][0]} for name, info in header.items()}


def _read_tensor(f, info: dict) -> torch.Tensor:
    """One tensor of an open safetensors file, read with a plain file read (no mmap: the process never maps
    the whole file, so its resident memory holds only what was read and kept)."""
    start, end = info["data_offsets"]
    dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    if end == start:
        return torch.empty(info["shape"], dtype=dtype)
    f.seek(info["start"])
    buffer = bytearray(end - start)
    f.readinto(buffer)
    return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])


def _release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    bitsandbytes' CPU quantization allocates temporaries of many sizes; glibc keeps the freed ones in its
    heap, and over hundreds of layers that fragmentation grew the process by more than the quantized model.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def build_base_for_training(fabric, checkpoint_dir: Path, precision: str, quantize: Optional[str]):
    """The base GPT the finetune scripts start from, on `fabric`'s device, before a PEFT method is applied.

    On one device or with DDP, and whenever `quantize` is given, `load_base_model` reads the checkpoint tensor
    by tensor straight onto the device (one copy per DDP rank), so the host never holds the whole state dict:
    loading a 7B base for GPU training peaked at 15 GB of host memory when it did. Unquantized under FSDP, the
    model is built on the meta device by `fabric.init_module` and the state dict assigned before Fabric shards it.
    """
    from lightning_fabric.strategies import FSDPStrategy

    from lit_gpt.checkpoint import WEIGHTS_FILE, load_into_model, load_weights_file
    from lit_gpt.config import Config
    from lit_gpt.model import GPT
    from lit_gpt.utils import precision_to_dtype

    if quantize is not None or not isinstance(fabric.strategy, FSDPStrategy):
        model, _ = load_base_model(checkpoint_dir, quantize, fabric.device, precision_to_dtype(precision))
        return model.train()
    with fabric.init_module(empty_init=True):  # base weights are loaded below
        model = GPT(Config.from_checkpoint(checkpoint_dir))
    load_into_model(model, load_weights_file(checkpoint_dir / WEIGHTS_FILE), checkpoint_dir / WEIGHTS_FILE)
    return model


def merge_error(name: str) -> QuantizeError:
    return QuantizeError(
        f"Cannot merge LoRA into {name!r}: its base weight is quantized, and folding the small update into 4- or "
        "8-bit codes would round it away. Merge into the full-precision base with `python scripts/merge_lora.py "
        "--finetuned_dir <run>/final --out_dir <merged>` (it reads the base checkpoint file, not the quantized copy)."
    )
