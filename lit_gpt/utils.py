"""Small generic helpers: which device and precision to run on, peak memory, host memory reuse."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from typing import Optional

import torch

# Lightning Fabric precision strings this project uses, and the dtype the weights are held in for each.
PRECISION_DTYPES = {
    "32-true": torch.float32,
    "16-true": torch.float16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float32,
    "bf16-mixed": torch.float32,
    "64-true": torch.float64,
}


def choose_device_type() -> str:
    """"cuda" when a CUDA GPU is visible, else "mps" (Apple silicon), else "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def choose_precision(requested: Optional[str], device_type: str) -> str:
    """The Lightning Fabric precision string to run with on `device_type` ("cuda", "mps" or "cpu").

    `requested` None picks the default for the device:
        cuda: "bf16-true" when the GPU has native bf16 (Ampere or newer), else "16-true"
        mps:  "16-true" (bf16 needs macOS 14 or newer, fp16 works everywhere)
        cpu:  "32-true" (half precision on CPU is slow and loses accuracy)
    A requested precision the device cannot run raises a ValueError that names a working alternative.
    """
    if device_type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"Unknown device type {device_type!r}: expected 'cuda', 'mps' or 'cpu'.")
    if requested is None:
        if device_type == "cuda":
            return "bf16-true" if _cuda_has_bf16() else "16-true"
        return "16-true" if device_type == "mps" else "32-true"

    requested = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}.get(requested, requested)
    if requested not in PRECISION_DTYPES:
        raise ValueError(
            f"Unknown precision {requested!r}: choose one of {', '.join(PRECISION_DTYPES)} "
            "(or leave it unset to use the device's default)."
        )
    if requested.startswith("bf16"):
        if device_type == "cuda" and not _cuda_has_bf16():
            name = torch.cuda.get_device_name()
            raise ValueError(
                f"Precision {requested!r} needs bfloat16, which {name} does not support natively. "
                f"Use --precision {requested.replace('bf16', '16')} (float16) or --precision 32-true instead."
            )
        if device_type == "mps" and not _mps_has_bf16():
            raise ValueError(
                f"Precision {requested!r} needs bfloat16, which this Mac's MPS backend does not support "
                "(it needs macOS 14 or newer). Use --precision 16-true instead."
            )
    if requested.startswith("bf16") and device_type == "cpu" and not _cpu_has_bf16():
        print(
            f"warning: --precision {requested}: this CPU has no bfloat16 instructions (avx512_bf16 or amx_bf16), "
            "so bf16 matmuls are emulated: 8x slower than fp32 on our AVX2 test machine. "
            "--precision 32-true is the fast choice here.",
            file=sys.stderr,
        )
    if requested == "16-mixed" and device_type == "cpu":
        raise ValueError(
            "Precision '16-mixed' (float16 autocast) is not supported on CPU. Use --precision bf16-mixed, "
            "--precision bf16-true or --precision 32-true instead."
        )
    if requested == "64-true" and device_type == "mps":
        raise ValueError("MPS does not support float64. Use --precision 32-true instead.")
    return requested


def precision_to_dtype(precision: str) -> torch.dtype:
    """The dtype the weights are held in under a Fabric precision string ("bf16-true" -> torch.bfloat16)."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"Unknown precision {precision!r}: choose one of {', '.join(PRECISION_DTYPES)}.")
    return PRECISION_DTYPES[precision]


def _cuda_has_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def _cpu_has_bf16() -> bool:
    """Whether the CPU has bfloat16 matmul instructions; True when it cannot tell (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return True
    return not flags or "avx512_bf16" in flags or "amx_bf16" in flags


def _mps_has_bf16() -> bool:
    try:
        torch.ones(1, dtype=torch.bfloat16, device="mps")
        return True
    except (RuntimeError, TypeError):
        return False


def peak_memory(device: torch.device) -> str:
    """Human-readable peak memory: CUDA max allocated on a GPU, otherwise this process's peak resident set."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB (CUDA max allocated)"
    if device.type == "mps":
        return f"{torch.mps.driver_allocated_memory() / 1e9:.2f} GB (MPS driver allocated, current)"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kilobytes on Linux
    return f"{peak_bytes / 1e9:.2f} GB (process peak RSS)"


# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # the largest value glibc accepts on 64-bit systems


def reuse_freed_host_memory() -> bool:
    """Keep freed host memory in the process for the next step instead of handing it back to the OS (glibc).

    A CPU training step allocates and frees the same activation buffers every step. With glibc's defaults,
    buffers above an adaptive size threshold are mmap-ed fresh and returned on free, so every step
    page-faults them in again (a 118 MB logits buffer took 110 ms just to zero-fill). Serving buffers up to
    32 MiB from the heap and never trimming it made a SmolLM2-135M LoRA step ~5% faster on our 2-core CPU.
    The cost: the process keeps its peak heap size until it exits. Meant for CPU training and generation;
    returns False (and changes nothing) on other C libraries.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_host_memory() -> None:
    """Give freed heap memory back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    bitsandbytes' CPU quantization allocates temporaries of many sizes; glibc keeps the freed ones in its
    heap, and over hundreds of layers that fragmentation grew the process by more than the quantized model.
    `lit_gpt.loading.load_base_model` calls this after each tensor it reads.
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
