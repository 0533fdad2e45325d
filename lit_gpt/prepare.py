"""Offline preparation of instruction data: read JSON/JSONL, check, tokenize with prompt masking, split, write.

What the `scripts/prepare_*.py` scripts run::

    examples = load_examples("my_data.jsonl", fields={"instruction": "prompt", "output": "response"})
    prepare_instruction_data(examples, checkpoint_dir, "data/mine", source="my_data.jsonl")
    # -> data/mine/train.safetensors, data/mine/val.safetensors, data/mine/metadata.json

Reading: a record is a JSON object with an instruction, an optional input and an output (the keys can be
renamed, and samples nested in a list under one key can be flattened). Every bad record is a DataError that
names the file, the record ("line 7") and the field.

One prepared sample is the token sequence t_0..t_{n-1} = encode(prompt) + encode(response) + [EOS], where
prompt = alpaca_prompt(instruction, input). Its labels equal the tokens, except that the prompt tokens are
IGNORE_INDEX when `mask_prompt` is on (the default everywhere): the model is trained only to write the
response and the EOS. The prompt and the response are encoded separately and concatenated, so the masked
tokens are exactly `encode(prompt)`, which is also what the model is given at inference. (The labels are
made at load time from the stored prompt length; `lit_gpt.data.collate` shifts them to next-token targets.)
`max_seq_length` counts the n tokens of a sample (prompt + response + EOS).

Too-long samples: a sample longer than `max_seq_length` is truncated (its end, usually the EOS, is cut) and
counted; a sample whose prompt alone leaves no room for a single response token is an error naming the
record (or, with `skip_long_prompts=True`, dropped with a count and a warning).

The samples are split into train and val with a seeded shuffle, and each split is written as one
safetensors file (no pickle; `lit_gpt.data.InstructionDataset`): a flat int32 token buffer, int64 offsets
and int32 prompt lengths, with the preparation settings (tokenizer fingerprint, max_seq_length,
mask_prompt, source, ...) in the file's metadata. metadata.json beside them summarizes the run (counts,
truncated and skipped samples, settings).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.request import urlopen

import torch
from tqdm import tqdm

from lit_gpt.checkpoint import CONFIG_FILE, TOKENIZER_FILES
from lit_gpt.config import Config
from lit_gpt.data import (
    DEFAULT_SEED,
    METADATA_FILE,
    TRAIN_FILE,
    VAL_FILE,
    DataError,
    InstructionDataset,
    PathLike,
    tokenizer_fingerprint,
)
from lit_gpt.prompts import alpaca_prompt
from lit_gpt.tokenizer import Tokenizer, check_text

ALPACA_FIELDS = {"instruction": "instruction", "input": "input", "output": "output"}
DEFAULT_VAL_SPLIT_FRACTION = 0.05


# --------------------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One instruction sample, as read from the source. `where` locates it for error messages."""

    instruction: str
    input: str
    output: str
    where: str = ""


def read_records_with_locations(path: PathLike) -> tuple[list[Any], list[str]]:
    """Records of a JSON list or JSONL file, plus a location string per record ("line 7", "record 6")."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(f"Data file {str(path)!r} {what}. Pass a JSON (list of records) or JSONL file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}). Save it as UTF-8 JSON or JSONL.") from None
    is_jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    if not is_jsonl:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            # A JSONL file named .json fails with "Extra data" at the start of line 2: read it as JSONL.
            if not (e.msg == "Extra data" and text[: e.pos].strip() and text[: e.pos].rstrip().endswith("}")):
                raise DataError(
                    f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}. "
                    "Expected a JSON list of records (or one JSON object per line in a .jsonl file)."
                ) from None
            is_jsonl = True
        else:
            if not isinstance(data, list):
                hint = ""
                if isinstance(data, dict):
                    lists = [k for k, v in data.items() if isinstance(v, list)]
                    hint = f" It is an object with keys {sorted(data)[:10]}"
                    hint += f"; extract the list under {lists[0]!r} into its own file." if lists else "."
                raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}.{hint}")
            return data, [f"record {i}" for i in range(len(data))]
    records, where = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: malformed JSON on line {lineno}, column {e.colno}: {e.msg}. "
                "A JSONL file holds one complete JSON object per line."
            ) from None
        where.append(f"line {lineno}")
    return records, where


def read_records(path: PathLike) -> list[Any]:
    """The records of a JSON file (a list of objects) or a JSONL file (one object per line).

    The format follows the extension (.jsonl/.ndjson = JSONL); a .json file that holds JSON lines is
    read as JSONL too. Malformed JSON raises a DataError naming the file and line.
    """
    return read_records_with_locations(path)[0]


def flatten_instances(
    records: Sequence[Any], instances_field: str, source: str = "data", where: Optional[Sequence[str]] = None
) -> tuple[list[dict], list[str]]:
    """Expand nested records: each `{..., instances_field: [{...}, ...]}` gives one record per instance.

    An instance's own keys win over its parent's. This reads e.g. Stanford Alpaca's `seed_tasks.jsonl`,
    `{"instruction": ..., "instances": [{"input": ..., "output": ...}]}`.
    Returns (flat records, their locations such as "line 3, instances[1]").
    """
    where = list(where) if where is not None else [f"record {i}" for i in range(len(records))]
    flat, flat_where = [], []
    for record, loc in zip(records, where):
        instances = record.get(instances_field) if isinstance(record, dict) else None
        if not isinstance(instances, list) or not all(isinstance(x, dict) for x in instances):
            keys = f"keys: {sorted(record)}" if isinstance(record, dict) else f"it is a {type(record).__name__}"
            raise DataError(f"{source}, {loc}: no list of objects under {instances_field!r} ({keys}).")
        parent = {k: v for k, v in record.items() if k != instances_field}
        for j, instance in enumerate(instances):
            flat.append({**parent, **instance})
            flat_where.append(f"{loc}, {instances_field}[{j}]")
    return flat, flat_where


def _text(value: Any) -> Optional[str]:
    """A field's text: a string as it is, a finite number written out; None for anything else (NaN included)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    return None


def to_examples(
    records: Sequence[Any],
    source: str = "data",
    fields: Optional[dict[str, str]] = None,
    where: Optional[Sequence[str]] = None,
) -> list[Example]:
    """Check raw records and turn them into Examples.

    Args:
        records: JSON objects (dicts).
        source: the file name, for error messages.
        fields: which key of a record holds each part: {"instruction": ..., "input": ..., "output": ...};
            missing entries default to the Alpaca names. `input` is optional in every record (missing,
            null or "" = no input); `instruction` and `output` are required (strings; numbers are
            converted to text).
        where: a location per record for error messages ("line 7"); default "record <index>".
    Raises:
        DataError naming the source, the record and the field, when a record is not an object, lacks a
        required field, holds a value that is not text or a finite number, holds text that is not valid
        Unicode, or has every field empty; and when there are no records at all. Records with an empty output
        are kept, with a warning that counts them.
    """
    fields = {**ALPACA_FIELDS, **(fields or {})}
    unknown = set(fields) - set(ALPACA_FIELDS)
    if unknown:
        raise DataError(f"Unknown field roles {sorted(unknown)}: the roles are {sorted(ALPACA_FIELDS)}.")
    if len(records) == 0:
        raise DataError(f"{source}: the dataset is empty (no records). Check that you passed the right file.")
    where = list(where) if where is not None else [f"record {i}" for i in range(len(records))]
    examples, empty = [], []
    for record, loc in zip(records, where):
        if not isinstance(record, dict):
            raise DataError(
                f"{source}, {loc}: expected a JSON object with {fields['instruction']!r} and "
                f"{fields['output']!r} fields, got {type(record).__name__}: {json.dumps(record)[:80]}"
            )
        values = {}
        for role, key in fields.items():
            value = record.get(key)
            if value is None and role == "input":
                value = ""
            if value is None:
                nested = [k for k, v in record.items() if isinstance(v, list) and v and isinstance(v[0], dict) and key in v[0]]
                hint = (
                    f" Its {nested[0]!r} list holds objects with {key!r}: flatten them "
                    f"(scripts/prepare_json.py --instances_field {nested[0]})."
                    if nested
                    else f" Name the key that holds the {role} (scripts/prepare_json.py --{role}_field KEY)."
                )
                raise DataError(
                    f"{source}, {loc}: missing the {role} field {key!r} (keys present: {sorted(record)}).{hint}"
                )
            text = _text(value)
            if text is None:
                raise DataError(
                    f"{source}, {loc}: the {role} field {key!r} must be text, got {type(value).__name__}: "
                    f"{json.dumps(value)[:80]} (a number is written out as text, but only a finite one)"
                )
            try:
                check_text(text, f"The {role} field {key!r}")
            except ValueError as e:
                raise DataError(f"{source}, {loc}: {e}") from None
            values[role] = text
        if not any(text.strip() for text in values.values()):
            raise DataError(
                f"{source}, {loc}: every field is empty ({', '.join(repr(k) for k in fields.values())}): the record "
                "has nothing to learn from. Remove it, or name the keys that hold the text (--instruction_field, "
                "--input_field, --output_field)."
            )
        if not values["output"].strip():
            empty.append(loc)
        examples.append(Example(where=loc, **values))
    if empty:
        warnings.warn(
            f"{source}: {len(empty)} of {len(records)} records have an empty output field {fields['output']!r} "
            f"({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}). They are kept: they teach the model to "
            "end its answer at once. Fill them in or remove them if that is not what you want.",
            stacklevel=2,
        )
    return examples


def load_examples(
    path: PathLike, fields: Optional[dict[str, str]] = None, instances_field: Optional[str] = None
) -> list[Example]:
    """Read a JSON/JSONL file and check its records (see :func:`read_records` and :func:`to_examples`).

    `instances_field`: records nest their samples in a list under this key (see :func:`flatten_instances`).
    """
    records, where = read_records_with_locations(path)
    if instances_field:
        records, where = flatten_instances(records, instances_field, source=str(path), where=where)
    return to_examples(records, source=str(path), fields=fields, where=where)


def download(url: str, path: PathLike, sha256: Optional[str] = None) -> Path:
    """Download `url` to `path` (atomically) unless it is already there; verify `sha256` when given.

    Raises DataError on a network failure or a checksum mismatch (the bad file is not kept).
    """
    path = Path(path)
    if path.is_file():
        data = path.read_bytes()
        print(f"Using {path} (already downloaded)")
    else:
        print(f"Downloading {url} -> {path}")
        try:
            with urlopen(url, timeout=60) as response:
                data = response.read()
        except OSError as e:  # URLError, HTTPError, timeouts
            raise DataError(
                f"Could not download {url}: {e}. Download it yourself and pass the file with --data_file."
            ) from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256.lower():
        where = f"{path} (remove it to download again)" if path.is_file() else "the download"
        raise DataError(
            f"Checksum mismatch for {url}: expected sha256 {sha256}, got {digest} for {where}. The file changed "
            "upstream or is corrupt. If you trust it, pass --sha256 null (or the new checksum)."
        )
    if not path.is_file():
        _check_writable(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    print(f"sha256 {digest}" + (" (verified)" if sha256 else " (not verified: no checksum given)"))
    return path


# --------------------------------------------------------------------------------------------------
# Splitting and tokenizing
# --------------------------------------------------------------------------------------------------
def split_train_val(items: Sequence[Any], val_fraction: float, seed: int = DEFAULT_SEED) -> tuple[list, list]:
    """Shuffle `items` with `seed` and split off round(len * val_fraction) of them (at least 1 when > 0).

    Deterministic: the same items, fraction and seed always give the same split (Python's `random`,
    stable across versions and platforms). Returns (train, val), each in shuffled order.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_split_fraction must be in [0, 1), got {val_fraction}.")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(items) * val_fraction)) if val_fraction > 0 else 0
    if len(items) - n_val < 1:
        raise DataError(
            f"Cannot split {len(items)} sample(s) with val_split_fraction {val_fraction}: no training sample would "
            "be left. Add data or pass --val_split_fraction 0."
        )
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer,
    max_seq_length: int,
    mask_prompt: bool = True,
    skip_long_prompts: bool = False,
    source: str = "data",
    progress: bool = True,
    block_size: Optional[int] = None,
) -> tuple[list[torch.Tensor], list[int], dict[str, int]]:
    """Tokenize examples as `encode(prompt) + encode(output) + [EOS]`, truncated to `max_seq_length` tokens.

    Args:
        tokenizer: a lit_gpt Tokenizer (BOS follows the checkpoint's default; EOS is always appended).
        max_seq_length: most tokens per sample; longer samples lose their end and are counted as truncated.
        skip_long_prompts: drop samples whose prompt leaves no room for a response token (with a warning)
            instead of raising a DataError that names them.
        block_size: the model's context, only for the advice in error messages.
    Returns:
        (token id tensors (n_i,) int64, prompt lengths, stats {"truncated", "skipped"}).
    """
    if tokenizer.eos_id is None:
        raise DataError(
            f"The tokenizer in {tokenizer.checkpoint_dir} has no EOS token, so a finetuned model could not learn to "
            "stop. Set `eos_token` in its tokenizer_config.json."
        )
    seqs, prompt_lengths, too_long, truncated = [], [], [], 0
    for ex in tqdm(examples, desc="Tokenizing", unit="sample", disable=not progress):
        prompt = tokenizer.encode(alpaca_prompt(ex.instruction, ex.input))
        response = tokenizer.encode(ex.output, bos=False, eos=True)
        if len(prompt) >= max_seq_length:
            too_long.append((ex.where, len(prompt)))
            continue
        ids = torch.cat([prompt, response])
        if len(ids) > max_seq_length:
            ids, truncated = ids[:max_seq_length], truncated + 1
        seqs.append(ids)
        prompt_lengths.append(len(prompt))
    if too_long:
        shown = ", ".join(f"{loc} ({n} prompt tokens)" for loc, n in too_long[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        message = (
            f"{source}: {len(too_long)} sample(s) have a prompt of max_seq_length={max_seq_length} tokens or more, "
            f"leaving no room for the response: {shown}{more}."
        )
        if not skip_long_prompts:
            if block_size is not None and max_seq_length >= block_size:
                advice = f" They do not fit the model's context (block_size {block_size}): shorten those records, or"
            else:
                limit = f" (up to the model's block_size {block_size})" if block_size else ""
                advice = f" Raise --max_seq_length{limit}, shorten those records, or"
            raise DataError(message + advice + " pass --skip_long_prompts true to leave them out.")
        warnings.warn(message + " They are skipped (skip_long_prompts=True).", stacklevel=2)
    if not seqs:
        raise DataError(f"{source}: no sample is left to prepare.")
    return seqs, prompt_lengths, {"truncated": truncated, "skipped": len(too_long)}


# --------------------------------------------------------------------------------------------------
# Writing the prepared data
# --------------------------------------------------------------------------------------------------
def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise DataError(
            f"Cannot write to {str(directory)!r}: {e.strerror or e}. Choose another --destination_path."
        ) from None


def check_prepare_settings(
    checkpoint_dir: PathLike,
    destination_path: PathLike,
    val_split_fraction: float = DEFAULT_VAL_SPLIT_FRACTION,
    max_seq_length: Optional[int] = None,
) -> int:
    """Fail fast, before any download or tokenizing, on a bad checkpoint, destination or setting.

    Returns the max_seq_length to use: the given one, or the model's block_size when None.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / CONFIG_FILE).is_file() or not any((checkpoint_dir / f).is_file() for f in TOKENIZER_FILES):
        present = sorted(p.name for p in checkpoint_dir.iterdir()) if checkpoint_dir.is_dir() else "it does not exist"
        raise DataError(
            f"Checkpoint directory {str(checkpoint_dir)!r} needs {CONFIG_FILE} and a tokenizer "
            f"({' or '.join(TOKENIZER_FILES)}) to prepare data (contents: {present}). Download one first: "
            "`python scripts/download.py --repo_id <org/name>`."
        )
    if not 0 <= val_split_fraction < 1:
        raise DataError(f"val_split_fraction must be in [0, 1), got {val_split_fraction}.")
    _check_writable(Path(destination_path))
    block_size = Config.from_checkpoint(checkpoint_dir).block_size
    if max_seq_length is None:
        return block_size
    if not 2 <= max_seq_length <= block_size:
        raise DataError(
            f"max_seq_length {max_seq_length} is out of range: the model's block_size is {block_size} "
            f"(in {checkpoint_dir / CONFIG_FILE}); use 2..{block_size}."
        )
    return max_seq_length


def prepare_instruction_data(
    examples: Sequence[Example],
    checkpoint_dir: PathLike,
    destination_path: PathLike,
    source: str = "data",
    val_split_fraction: float = DEFAULT_VAL_SPLIT_FRACTION,
    seed: int = DEFAULT_SEED,
    mask_prompt: bool = True,
    max_seq_length: Optional[int] = None,
    skip_long_prompts: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `examples` with the checkpoint's tokenizer, split, and write train/val safetensors.

    Args:
        checkpoint_dir: holds model_config.yaml (block_size) and the tokenizer.
        destination_path: gets train.safetensors, val.safetensors and metadata.json.
        max_seq_length: most tokens per sample; None = the model's block_size. Cannot exceed block_size.
        the rest: see :func:`split_train_val` and :func:`tokenize_examples`.
    Returns:
        the summary written to metadata.json (counts, settings).
    """
    checkpoint_dir, destination_path = Path(checkpoint_dir), Path(destination_path)
    max_seq_length = check_prepare_settings(checkpoint_dir, destination_path, val_split_fraction, max_seq_length)
    block_size = Config.from_checkpoint(checkpoint_dir).block_size
    tokenizer = Tokenizer(checkpoint_dir)
    print(
        f"Preparing {len(examples)} samples from {source}: mask_prompt={mask_prompt}, max_seq_length={max_seq_length} "
        f"(block_size {block_size}), val_split_fraction={val_split_fraction}, seed={seed}"
    )
    seqs, prompt_lengths, stats = tokenize_examples(
        examples, tokenizer, max_seq_length, mask_prompt, skip_long_prompts, source, progress, block_size
    )
    train_idx, val_idx = split_train_val(range(len(seqs)), val_split_fraction, seed)
    settings = {
        "source": str(source),
        "checkpoint_dir": str(checkpoint_dir),
        "tokenizer_fingerprint": tokenizer_fingerprint(checkpoint_dir),
        "prompt_template": "alpaca",
        "max_seq_length": str(max_seq_length),
        "seed": str(seed),
        "val_split_fraction": str(val_split_fraction),
    }
    summary: dict[str, Any] = {**settings, "mask_prompt": mask_prompt, "num_examples": len(examples), **stats}
    for name, idx in ((TRAIN_FILE, train_idx), (VAL_FILE, val_idx)):
        split = name.split(".")[0]
        dataset = InstructionDataset.from_sequences(
            [seqs[i] for i in idx], [prompt_lengths[i] for i in idx], mask_prompt, {**settings, "split": split}
        )
        dataset.save(destination_path / name)
        lengths = dataset.lengths
        summary[split] = {
            "num_samples": len(dataset),
            "num_tokens": len(dataset.tokens),
            "max_length": int(lengths.max()) if len(dataset) else 0,
        }
    (destination_path / METADATA_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"Wrote {summary['train']['num_samples']} train and {summary['val']['num_samples']} val samples to "
        f"{destination_path}; {stats['truncated']} truncated to {max_seq_length} tokens"
        + (f", {stats['skipped']} skipped (prompt too long)" if stats["skipped"] else "")
    )
    return summary

