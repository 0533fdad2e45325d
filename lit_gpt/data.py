"""Instruction data: read JSON/JSONL, split, tokenize with prompt masking, save/load without pickle, batch.

The pipeline, as the `scripts/prepare_*.py` scripts run it::

    examples = load_examples("my_data.jsonl", fields={"instruction": "prompt", "output": "response"})
    prepare_instruction_data(examples, checkpoint_dir, "data/mine", source="my_data.jsonl")
    # -> data/mine/train.safetensors, data/mine/val.safetensors, data/mine/metadata.json

and as a finetune script consumes it::

    train, val = load_prepared_dir("data/mine", tokenizer, block_size)  # or load_prepared(one file)
    order = epoch_order(len(train), epoch, seed)            # the position in the data is (epoch, index)
    input_ids, targets = get_batch(train, order[i : i + micro_batch_size])  # (B, T) each
    loss = model(input_ids, targets=targets)

One sample is the token sequence t_0..t_{n-1} = encode(prompt) + encode(response) + [EOS], where
prompt = alpaca_prompt(instruction, input). Its labels l_0..l_{n-1} equal the tokens, except that the
prompt tokens are IGNORE_INDEX when `mask_prompt` is on (the default everywhere): the model is trained
only to write the response and the EOS. The prompt and the response are encoded separately and
concatenated, so the masked tokens are exactly `encode(prompt)`, which is also what the model is given
at inference.

The shift to next-token targets happens once, in :func:`collate`:
    input_ids = t_0 .. t_{n-2}        targets = l_1 .. l_{n-1}
so `targets[:, j]` is the label of the token that follows `input_ids[:, j]`. A sample of n tokens gives
n - 1 input positions. `max_seq_length` counts the n tokens of a sample (prompt + response + EOS).

Too-long samples, at preparation: a sample longer than `max_seq_length` is truncated (its end, usually
the EOS, is cut) and counted; a sample whose prompt alone leaves no room for a single response token is
an error naming the record (or, with `skip_long_prompts=True`, dropped with a count and a warning).

Prepared files are safetensors (no pickle): a flat int32 token buffer, int64 offsets and int32 prompt
lengths, with the preparation settings (tokenizer fingerprint, max_seq_length, mask_prompt, counts,
source) in the file's metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union
from urllib.request import urlopen

import torch

from lit_gpt.model import IGNORE_INDEX
from lit_gpt.prompts import alpaca_prompt

PathLike = Union[str, Path]

FORMAT = "lit_gpt.instruction_data.v1"
ALPACA_FIELDS = {"instruction": "instruction", "input": "input", "output": "output"}
DEFAULT_VAL_SPLIT_FRACTION = 0.05
DEFAULT_SEED = 42
TRAIN_FILE, VAL_FILE, METADATA_FILE = "train.safetensors", "val.safetensors", "metadata.json"


class DataError(ValueError):
    """Bad input data or settings. The message names the file, record and field, and says what to do.

    Scripts catch it at the top level and print the message without a traceback.
    """


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


def _read(path: PathLike) -> tuple[list[Any], list[str]]:
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
    return _read(path)[0]


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
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
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
        required field or holds a non-text value, and when there are no records at all.
    """
    fields = {**ALPACA_FIELDS, **(fields or {})}
    unknown = set(fields) - set(ALPACA_FIELDS)
    if unknown:
        raise DataError(f"Unknown field roles {sorted(unknown)}: the roles are {sorted(ALPACA_FIELDS)}.")
    if len(records) == 0:
        raise DataError(f"{source}: the dataset is empty (no records). Check that you passed the right file.")
    where = list(where) if where is not None else [f"record {i}" for i in range(len(records))]
    examples = []
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
                    f"{json.dumps(value)[:80]}"
                )
            values[role] = text
        examples.append(Example(where=loc, **values))
    return examples


def load_examples(
    path: PathLike, fields: Optional[dict[str, str]] = None, instances_field: Optional[str] = None
) -> list[Example]:
    """Read a JSON/JSONL file and check its records (see :func:`read_records` and :func:`to_examples`).

    `instances_field`: records nest their samples in a list under this key (see :func:`flatten_instances`).
    """
    records, where = _read(path)
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
    from tqdm import tqdm

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


def tokenizer_fingerprint(checkpoint_dir: PathLike) -> str:
    """sha256 over the tokenizer files of a checkpoint dir: data prepared with one tokenizer fits only it."""
    from lit_gpt.checkpoint import TOKENIZER_FILES

    h = hashlib.sha256()
    for name in (*TOKENIZER_FILES, "tokenizer_config.json"):
        f = Path(checkpoint_dir) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# The prepared dataset
# --------------------------------------------------------------------------------------------------
class InstructionDataset:
    """Tokenized samples in one flat buffer: sample i is `tokens[offsets[i]:offsets[i + 1]]`.

    Attributes:
        tokens: (total,) int32, all samples back to back.
        offsets: (n + 1,) int64, sample boundaries.
        prompt_lengths: (n,) int32, tokens of each sample that belong to the prompt.
        mask_prompt: whether labels hide the prompt tokens (IGNORE_INDEX).
        metadata: preparation settings (all strings): tokenizer_fingerprint, max_seq_length, source, ...
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        offsets: torch.Tensor,
        prompt_lengths: torch.Tensor,
        mask_prompt: bool = True,
        metadata: Optional[dict[str, str]] = None,
    ) -> None:
        if offsets.ndim != 1 or len(offsets) != len(prompt_lengths) + 1 or int(offsets[-1]) != len(tokens):
            raise DataError(
                f"Inconsistent dataset: {len(tokens)} tokens, {len(offsets)} offsets, {len(prompt_lengths)} samples."
            )
        self.tokens, self.offsets, self.prompt_lengths = tokens, offsets, prompt_lengths
        self.mask_prompt = mask_prompt
        self.metadata = dict(metadata or {})

    @classmethod
    def from_sequences(
        cls,
        seqs: Sequence[torch.Tensor],
        prompt_lengths: Sequence[int],
        mask_prompt: bool = True,
        metadata: Optional[dict[str, str]] = None,
    ) -> "InstructionDataset":
        """Pack 1-D token tensors (and each one's prompt length) into one dataset."""
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
        offsets = torch.zeros(len(seqs) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        tokens = torch.cat(list(seqs)).to(torch.int32) if seqs else torch.zeros(0, dtype=torch.int32)
        return cls(tokens, offsets, torch.tensor(list(prompt_lengths), dtype=torch.int32), mask_prompt, metadata)

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of sample i, both (n_i,) int64; labels = tokens with the prompt masked if asked.

        These are NOT shifted: :func:`collate` turns them into next-token (input_ids, targets).
        """
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a dataset of {len(self)}")
        i = i % len(self)
        ids = self.tokens[self.offsets[i] : self.offsets[i + 1]].to(torch.int64)
        labels = ids.clone()
        if self.mask_prompt:
            labels[: int(self.prompt_lengths[i])] = IGNORE_INDEX
        return ids, labels

    @property
    def lengths(self) -> torch.Tensor:
        """(n,) int64: tokens per sample (prompt + response + EOS, after truncation)."""
        return self.offsets[1:] - self.offsets[:-1]

    def save(self, path: PathLike) -> None:
        """Write the dataset as one safetensors file (atomic), metadata in its header."""
        from lit_gpt.checkpoint import save_safetensors

        metadata = {**self.metadata, "format": FORMAT, "mask_prompt": str(self.mask_prompt), "num_samples": str(len(self))}
        tensors = {"tokens": self.tokens, "offsets": self.offsets, "prompt_lengths": self.prompt_lengths}
        save_safetensors(tensors, path, metadata=metadata)


def load_prepared(path: PathLike) -> InstructionDataset:
    """Load a dataset written by :func:`prepare_instruction_data` (e.g. data/alpaca/train.safetensors).

    Safetensors only; nothing is unpickled. Raises DataError with the command to run when it is missing.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        present = sorted(p.name for p in path.iterdir())
        raise DataError(
            f"{path} is a directory; pass one of its files, e.g. {path / TRAIN_FILE} (it contains: {present})."
        )
    if not path.is_file():
        raise DataError(
            f"Prepared data {str(path)!r} does not exist. Create it with "
            f"`python scripts/prepare_alpaca.py --checkpoint_dir <checkpoint> --destination_path {path.parent}` "
            "(or scripts/prepare_json.py for your own data)."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable safetensors file ({e}). Prepare the data again.") from None
    missing = {"tokens", "offsets", "prompt_lengths"} - set(tensors)
    if metadata.get("format") != FORMAT or missing:
        raise DataError(
            f"{path} is not prepared instruction data (format {metadata.get('format')!r}, expected {FORMAT!r}). "
            "Prepare it with scripts/prepare_alpaca.py or scripts/prepare_json.py."
        )
    return InstructionDataset(
        tensors["tokens"],
        tensors["offsets"],
        tensors["prompt_lengths"],
        mask_prompt=metadata.get("mask_prompt") == "True",
        metadata=metadata,
    )


def check_prepared_data(dataset: InstructionDataset, checkpoint_dir: PathLike, path: PathLike = "the data") -> None:
    """Raise a DataError when `dataset` was tokenized for another tokenizer than checkpoint_dir's."""
    expected = dataset.metadata.get("tokenizer_fingerprint")
    actual = tokenizer_fingerprint(checkpoint_dir)
    if expected is not None and expected != actual:
        raise DataError(
            f"{path} was tokenized with a different tokenizer ({dataset.metadata.get('checkpoint_dir', '?')}) than "
            f"the one in {checkpoint_dir}. Prepare it again: `python scripts/prepare_alpaca.py --checkpoint_dir "
            f"{checkpoint_dir}` (or the prepare script you used)."
        )


def load_prepared_dir(
    data_dir: PathLike, tokenizer=None, block_size: Optional[int] = None
) -> tuple[InstructionDataset, InstructionDataset]:
    """(train, val) from `data_dir`/train.safetensors and val.safetensors, checked against the model.

    Args:
        tokenizer: when given, the data must have been tokenized by the same tokenizer files (fingerprint)
            and hold no id beyond its vocabulary.
        block_size: when given, no sample may need more positions than the model has (n - 1 <= block_size).
    Raises DataError, with the command that fixes it, on any mismatch.
    """
    data_dir = Path(data_dir)
    train, val = load_prepared(data_dir / TRAIN_FILE), load_prepared(data_dir / VAL_FILE)
    for name, dataset in ((TRAIN_FILE, train), (VAL_FILE, val)):
        path = data_dir / name
        if tokenizer is not None:
            check_prepared_data(dataset, tokenizer.checkpoint_dir, path)
            if len(dataset.tokens) and int(dataset.tokens.max()) >= tokenizer.vocab_size:
                raise DataError(
                    f"{path} holds token id {int(dataset.tokens.max())}, beyond the vocabulary ({tokenizer.vocab_size}) "
                    f"of the tokenizer in {tokenizer.checkpoint_dir}. Prepare the data again with --checkpoint_dir "
                    f"{tokenizer.checkpoint_dir}."
                )
        if block_size is not None and len(dataset) and int(dataset.lengths.max()) - 1 > block_size:
            raise DataError(
                f"{path}: the longest sample has {int(dataset.lengths.max())} tokens but the model's block_size is only "
                f"{block_size}. Prepare the data again with --max_seq_length {block_size} (or less)."
            )
    return train, val


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
    from lit_gpt.checkpoint import CONFIG_FILE, TOKENIZER_FILES
    from lit_gpt.config import Config

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
    from lit_gpt.config import Config
    from lit_gpt.tokenizer import Tokenizer

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


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------
def epoch_order(
    n: int,
    epoch: int,
    seed: int = DEFAULT_SEED,
    shuffle: bool = True,
    lengths: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    window: Optional[int] = None,
) -> list[int]:
    """The order in which epoch `epoch` visits samples 0..n-1: a function of its arguments only.

    Since the order of an epoch does not depend on what was consumed before, the position in the data
    is just (epoch, index into this list): resuming at sample k of epoch e means continuing with
    `epoch_order(n, e, seed)[k:]`.

    Length grouping, when `lengths` (e.g. `dataset.lengths`) is given: shuffle, sort by length (longest
    first) within windows of `window` samples (default 64 * batch_size), cut into batches of
    `batch_size` (default window // 64, else 1) and shuffle the batches, all seeded. Consecutive
    `batch_size` slices then hold samples of similar length, hence little padding. A last, smaller batch
    stays last, so the list stays aligned to batch_size.
    """
    if batch_size is None:
        batch_size = max(1, window // 64) if window else 1
    window = window or 64 * batch_size
    if n < 0 or epoch < 0 or batch_size < 1 or window < 1:
        raise DataError(f"epoch_order needs n, epoch >= 0 and batch_size, window >= 1; got {n, epoch, batch_size, window}.")
    rng = random.Random(f"epoch_order:{seed}:{epoch}")
    order = list(range(n))
    if shuffle:
        rng.shuffle(order)
    if lengths is None:
        return order
    if len(lengths) != n:
        raise DataError(f"epoch_order: {len(lengths)} lengths given for {n} samples.")
    lengths = lengths.tolist() if isinstance(lengths, torch.Tensor) else [int(x) for x in lengths]
    for start in range(0, n, window):
        order[start : start + window] = sorted(order[start : start + window], key=lambda i: -lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    last = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    if shuffle:
        rng.shuffle(batches)
    return [i for batch in batches + last for i in batch]


def collate(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int = 0, max_seq_length: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch (ids, labels) samples into next-token (input_ids, targets), right-padded to the longest.

    Given a sample's tokens t_0..t_{n-1} and labels l_0..l_{n-1} (l_i = t_i or IGNORE_INDEX):
        input_ids = t_0 .. t_{n-2}        targets = l_1 .. l_{n-1}
    Padding is `pad_id` in input_ids and IGNORE_INDEX in targets, so it carries no loss (and, on the
    right of a causal model, does not change the real positions).

    Args:
        samples: (ids (n_i,), labels (n_i,)) pairs, as `InstructionDataset[i]` returns.
        max_seq_length: when given, keep at most this many positions (inputs and targets cut alike).
    Returns:
        input_ids (B, T) int64 and targets (B, T) int64, T = max(n_i) - 1 (capped at max_seq_length).
    """
    if not samples:
        raise DataError("collate: no samples to batch.")
    T = max(len(ids) for ids, _ in samples) - 1
    if max_seq_length is not None:
        T = min(T, max_seq_length)
    T = max(T, 0)
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.int64)
    targets = torch.full((len(samples), T), IGNORE_INDEX, dtype=torch.int64)
    for b, (ids, labels) in enumerate(samples):
        m = min(len(ids) - 1, T)
        if m > 0:
            input_ids[b, :m] = ids[:m]
            targets[b, :m] = labels[1 : m + 1]
    return input_ids, targets


# Below this many tokens, computing a shared prefix once saves less than its bookkeeping costs.
MIN_SHARED_PREFIX = 8


def shared_prefix_length(input_ids: torch.Tensor, targets: torch.Tensor) -> int:
    """How many leading positions every row of a batch has in common, with no loss at any of them.

    That is the instruction template most data starts with; the model computes those positions once
    (`GPT.forward(shared_prefix=...)`). 0 when there is one row or fewer than MIN_SHARED_PREFIX such
    positions. At most T - 1, so every row keeps a position of its own.

    Args:
        input_ids, targets: (B, T), as `collate` makes them.
    """
    B, T = input_ids.shape
    if B < 2 or T < 2:
        return 0
    shared = (input_ids == input_ids[:1]).all(dim=0) & (targets == IGNORE_INDEX).all(dim=0)  # (T,)
    not_shared = (~shared).nonzero()
    length = min(int(not_shared[0]) if len(not_shared) else T, T - 1)
    return length if length >= MIN_SHARED_PREFIX else 0


def collate_packed(
    rows: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack several samples into each row: (input_ids, targets, positions), each (B, T).

    Each sample contributes its next-token pairs exactly as in `collate` (t_0..t_{n-2} -> l_1..l_{n-1}), back to
    back; `positions` restart at 0 for every sample, which is also how the model tells samples apart (see
    `lit_gpt.model.packed_causal_mask`), so no token attends across samples and each sample's loss is what
    it would be alone. The padding at the end of a row gets position 0 (a sample of its own) and no loss.
    """
    if not rows or not any(rows):
        raise DataError("collate_packed: no samples to batch.")
    T = max(sum(len(ids) - 1 for ids, _ in row) for row in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.int64)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.int64)
    positions = torch.zeros((len(rows), T), dtype=torch.int64)
    for b, row in enumerate(rows):
        start = 0
        for ids, labels in row:
            m = len(ids) - 1
            input_ids[b, start : start + m] = ids[:m]
            targets[b, start : start + m] = labels[1 : m + 1]
            positions[b, start : start + m] = torch.arange(m)
            start += m
    return input_ids, targets, positions


def get_batch(
    dataset: InstructionDataset, indices: Iterable[int], pad_id: int = 0, max_seq_length: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`collate` the samples `indices` of `dataset`: (input_ids (B, T), targets (B, T))."""
    return collate([dataset[int(i)] for i in indices], pad_id=pad_id, max_seq_length=max_seq_length)


def longest_sample(dataset: InstructionDataset) -> tuple[int, int]:
    """(index, length in tokens) of the longest sample: run it first to hit peak memory at once."""
    if len(dataset) == 0:
        raise DataError("The dataset is empty.")
    lengths = dataset.lengths
    i = int(torch.argmax(lengths))
    return i, int(lengths[i])
