"""Frozen base weights in 4 or 8 bits with bitsandbytes: QLoRA finetuning (Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314) and quantized generation.

Every frozen linear weight of the base model (attention q/k/v/proj, MLP, an untied LM head) becomes a
bitsandbytes parameter; embeddings, norms and every PEFT parameter stay in the run's float dtype::

    checkpoint tensor (out × in, float) ──► bnb.nn.Params4bit  (NF4/FP4 codes, 2 per byte, + absmax per block)
                                       └──► bnb.nn.Int8Params  (int8 rows + one scale per row, LLM.int8())

    x ─► quantize.linear(x, weight, bias) ─► bnb.matmul_4bit / bnb.matmul for a quantized weight,
                                            lit_gpt.kernels.linear (F.linear) for a float one

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

`lit_gpt.loading.load_base_model` reads the checkpoint one tensor at a time onto a model built on the meta
device and quantizes each linear weight as it is read (`quantize_weight`), so peak memory is the quantized
model plus one float tensor, never the full-precision model. bitsandbytes' own `Linear4bit` is not used as
the layer: on CPUs with AVX512-BF16 its forward repacks the weight in place at the first no-grad call (for
inference), which would change the path of training after a validation pass; and Lightning's
`BitsandbytesPrecision` quantizes on CUDA only. Both use the same bitsandbytes parameters and kernels as here.
"""

from __future__ import annotations

import importlib
import logging
from typing import Optional

import torch
import torch.nn as nn

from lit_gpt import kernels

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
        return kernels.linear(x, weight, bias)
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


def merge_error(name: str) -> QuantizeError:
    return QuantizeError(
        f"Cannot merge LoRA into {name!r}: its base weight is quantized, and folding the small update into 4- or "
        "8-bit codes would round it away. Merge into the full-precision base with `python scripts/merge_lora.py "
        "--finetuned_dir <run>/final --out_dir <merged>` (it reads the base checkpoint file, not the quantized copy)."
    )
