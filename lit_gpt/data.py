"""Prepared instruction data at run time: the file format, and how samples become batches.

Its consumers are the training loop, which takes one optimizer step's micro-batches at a time from a
:class:`BatchStream`, and validation (`lit_gpt.training.validate`, also run by `eval/loss.py`), which batches
the val split with :func:`collate`::

    train, val = load_prepared_dir("data/mine", tokenizer, block_size)   # checked against the model
    stream = BatchStream(train, train_args, fabric.global_rank, fabric.world_size, fabric.device.type)
    stream.position = position                                          # (epoch, index): resuming is this
    for batch in stream.next_step():                                    # MicroBatch: input_ids, targets (B, T)
        loss = model(**batch.model_inputs(fabric.device))

The files are written by `lit_gpt.prepare` (the `scripts/prepare_*.py` scripts), which also says how a
sample's tokens and labels are made. A prepared directory holds train.safetensors, val.safetensors and
metadata.json. Each .safetensors file (no pickle) is an :class:`InstructionDataset`: a flat int32 token
buffer, int64 offsets and int32 prompt lengths, with the preparation settings (tokenizer fingerprint,
max_seq_length, mask_prompt, counts, source) in the file's metadata.

Sample i is its tokens t_0..t_{n-1} and labels l_0..l_{n-1}: the tokens, with the prompt's positions set to
IGNORE_INDEX when the data was prepared with mask_prompt. The shift to next-token targets happens once,
in :func:`collate` (and :func:`collate_packed`):
    input_ids = t_0 .. t_{n-2}        targets = l_1 .. l_{n-1}
so `targets[:, j]` is the label of the token that follows `input_ids[:, j]`. A sample of n tokens gives
n - 1 input positions.

Epoch e visits the samples in `epoch_order(n, e, seed)`, a function of its arguments only, so the position
in the data is just (epoch, index) (:class:`DataPosition`). On top of that order, length grouping batches
samples of similar length together, packing puts several samples in one row, and a prompt template that
every row of a batch starts with is computed once (:func:`shared_prefix_length`).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from safetensors import SafetensorError, safe_open
import torch

from lit_gpt.args import TrainArgs
from lit_gpt.checkpoint import TOKENIZER_FILES, file_fingerprint, save_safetensors
from lit_gpt.model import IGNORE_INDEX

PathLike = Union[str, Path]

FORMAT = "lit_gpt.instruction_data.v1"
# The layout of a prepared directory (lit_gpt.prepare writes it, load_prepared_dir reads it).
TRAIN_FILE, VAL_FILE, METADATA_FILE = "train.safetensors", "val.safetensors", "metadata.json"
# The default seed of an epoch's order, and of the train/val split in lit_gpt.prepare (which imports it
# from here: data.py cannot import prepare.py, which imports data.py).
DEFAULT_SEED = 42


class DataError(ValueError):
    """Bad input data or settings. The message names the file, record and field, and says what to do.

    Raised by both preparation (lit_gpt.prepare) and loading. Scripts catch it at the top level (it is a
    ValueError, see lit_gpt.cli) and print the message without a traceback.
    """


# --------------------------------------------------------------------------------------------------
# The prepared dataset
# --------------------------------------------------------------------------------------------------
def prepared_data_fingerprint(data_dir: PathLike) -> Optional[str]:
    """Identifies a prepared directory's train and val files (`file_fingerprint` of each), so that a resumed run
    can tell that it still trains on the same data; None when they are not there (loading them says so)."""
    paths = [Path(data_dir) / name for name in (TRAIN_FILE, VAL_FILE)]
    if not all(path.is_file() for path in paths):
        return None
    return hashlib.sha256(" ".join(file_fingerprint(path) for path in paths).encode()).hexdigest()[:16]


def tokenizer_fingerprint(checkpoint_dir: PathLike) -> str:
    """sha256 over the tokenizer files of a checkpoint dir: data prepared with one tokenizer fits only it."""
    h = hashlib.sha256()
    for name in (*TOKENIZER_FILES, "tokenizer_config.json"):
        f = Path(checkpoint_dir) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


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
        metadata = {**self.metadata, "format": FORMAT, "mask_prompt": str(self.mask_prompt), "num_samples": str(len(self))}
        tensors = {"tokens": self.tokens, "offsets": self.offsets, "prompt_lengths": self.prompt_lengths}
        save_safetensors(tensors, path, metadata=metadata)


def load_prepared(path: PathLike) -> InstructionDataset:
    """Load one file of a dataset written by `lit_gpt.prepare` (e.g. data/alpaca/train.safetensors).

    Safetensors only; nothing is unpickled. Raises DataError with the command to run when it is missing.
    """
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
    problem = _layout_problem(tensors["tokens"], tensors["offsets"], tensors["prompt_lengths"])
    if problem:
        raise DataError(f"{path} is damaged: {problem}. Prepare the data again.")
    return InstructionDataset(
        tensors["tokens"],
        tensors["offsets"],
        tensors["prompt_lengths"],
        mask_prompt=metadata.get("mask_prompt") == "True",
        metadata=metadata,
    )


def _layout_problem(tokens: torch.Tensor, offsets: torch.Tensor, prompt_lengths: torch.Tensor) -> Optional[str]:
    """What is wrong with the three tensors of a prepared file, or None: integer ids that are not negative,
    offsets from 0 to len(tokens) that never go down, one prompt length per sample within its sample."""
    for name, tensor in (("tokens", tokens), ("offsets", offsets), ("prompt_lengths", prompt_lengths)):
        if tensor.ndim != 1 or tensor.is_floating_point() or tensor.dtype == torch.bool:
            return f"{name} is a {tensor.ndim}-d {str(tensor.dtype).removeprefix('torch.')} tensor, not 1-d integers"
    if len(offsets) != len(prompt_lengths) + 1:
        return f"it has {len(offsets)} sample offsets for {len(prompt_lengths)} samples (one more is needed)"
    if int(offsets[0]) != 0 or int(offsets[-1]) != len(tokens):
        return f"its samples span tokens {int(offsets[0])} to {int(offsets[-1])}, but it holds {len(tokens)} tokens"
    lengths = offsets[1:] - offsets[:-1]
    if bool((lengths < 0).any()) or bool((prompt_lengths < 0).any()) or bool((prompt_lengths > lengths).any()):
        return "some sample has a negative length or a prompt longer than itself"
    if len(tokens) and int(tokens.min()) < 0:
        return f"it holds the negative token id {int(tokens.min())}"
    return None


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


# --------------------------------------------------------------------------------------------------
# Order and batches
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


# --------------------------------------------------------------------------------------------------
# The training loop's batch stream
# --------------------------------------------------------------------------------------------------
@dataclass
class DataPosition:
    """Where the run is in the (infinite, epoch after epoch) sample order. Saved for exact resume."""

    epoch: int = 0
    index: int = 0  # next position within the epoch's order


def uses_shared_prefix(train: TrainArgs, device_type: str) -> bool:
    """Whether batches on `device_type` compute their common prompt template once (`GPT.forward(shared_prefix=)`):
    as --train.shared_prefix says, by default only on the CPU (slower on a GPU, see TrainArgs.shared_prefix),
    and never for a compiled model (a compiled graph takes no layout)."""
    share = device_type == "cpu" if train.shared_prefix is None else train.shared_prefix
    return share and not train.compile


class BatchStream:
    """Micro-batches for one optimizer step, for this rank, from a deterministic per-epoch order.

    The order of epoch e depends only on (seed, e), so resuming is just restoring `position`.
    One optimizer step takes `global_batch_size` consecutive samples of the order; rank r's micro-batch m
    is the slice [m * micro * world + r * micro, ... + micro) of them, so N devices with micro batch b see
    the same samples per micro-step as 1 device with micro batch N * b.

    `device_type` is where the model runs ("cpu", "cuda", "mps"; e.g. `fabric.device.type`): it decides
    whether batches carry their shared prefix by default (see :func:`uses_shared_prefix`).
    """

    def __init__(
        self, dataset, train: TrainArgs, rank: int, world_size: int, device_type: str, pad_id: int = 0
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("The training set is empty: prepare data with scripts/prepare_alpaca.py first.")
        self.dataset, self.train, self.rank, self.world, self.pad_id = dataset, train, rank, world_size, pad_id
        self.position = DataPosition()
        self.row_length = int(max(dataset.lengths)) - 1 if train.packing else 0
        self._order: Optional[list[int]] = None
        self._order_epoch = -1
        self.share_prefix = uses_shared_prefix(train, device_type)

    def _order_for(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            lengths = getattr(self.dataset, "lengths", None) if self.train.group_by_length else None
            self._order = epoch_order(
                len(self.dataset),
                epoch=epoch,
                seed=self.train.seed,
                lengths=lengths,
                window=self.train.micro_batch_size * self.world * 64,
            )
            self._order_epoch = epoch
        return self._order

    def _take(self, n: int) -> list[int]:
        """The next `n` sample indices of the order, moving on to the next epoch when one ends."""
        out: list[int] = []
        while len(out) < n:
            order = self._order_for(self.position.epoch)
            chunk = order[self.position.index : self.position.index + n - len(out)]
            out += chunk
            self.position.index += len(chunk)
            if self.position.index >= len(order):
                self.position = DataPosition(self.position.epoch + 1, 0)
        return out

    def next_step(self) -> list[MicroBatch]:
        """This rank's micro-batches for the next optimizer step."""
        if self.train.packing:
            return self._next_packed_step()
        micro = self.train.micro_batch_size
        indices = self._take(self.train.global_batch_size)
        batches = []
        for start in range(0, len(indices), micro * self.world):
            samples = [self.dataset[i] for i in indices[start + self.rank * micro : start + (self.rank + 1) * micro]]
            input_ids, targets = collate(samples, pad_id=self.pad_id)
            prefix = shared_prefix_length(input_ids, targets) if self.share_prefix else 0
            tokens = sum(len(s[0]) - 1 for s in samples)
            batches.append(MicroBatch.of(input_ids, targets, tokens=tokens, shared_prefix=prefix))
        return batches

    def _next_packed_step(self) -> list[MicroBatch]:
        """`global_batch_size` packed rows of up to `row_length` tokens, filled with consecutive samples."""
        rows: list[list] = []
        while len(rows) < self.train.global_batch_size:
            row, used = [], 0
            while True:
                # Peek before taking, so the saved position never includes a sample that went into no row.
                index = self._order_for(self.position.epoch)[self.position.index]
                n = int(self.dataset.lengths[index]) - 1
                if row and used + n > self.row_length:
                    break
                row.append(self.dataset[self._take(1)[0]])
                used += n
            rows.append(row)
        micro = self.train.micro_batch_size
        batches = []
        for start in range(0, len(rows), micro * self.world):
            mine = rows[start + self.rank * micro : start + (self.rank + 1) * micro]
            input_ids, targets, positions = collate_packed(mine, pad_id=self.pad_id)
            tokens = sum(len(s[0]) - 1 for row in mine for s in row)
            batches.append(MicroBatch.of(input_ids, targets, tokens=tokens, positions=positions))
        return batches


@dataclass
class MicroBatch:
    """One forward/backward pass of the training loop: the model's inputs, and the token counts that weight its
    loss in the optimizer step."""

    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T), IGNORE_INDEX where no loss
    supervised: int  # targets that carry loss
    tokens: int  # non-padding input tokens
    positions: Optional[torch.Tensor] = None  # (B, T) for packed rows
    shared_prefix: int = 0  # leading tokens all rows share with no loss, computed once (shared_prefix_length)

    @classmethod
    def of(cls, input_ids, targets, tokens: int, positions=None, shared_prefix: int = 0) -> "MicroBatch":
        return cls(input_ids, targets, int((targets != IGNORE_INDEX).sum()), tokens, positions, shared_prefix)

    def model_inputs(self, device) -> dict[str, Any]:
        """Keyword arguments of `model(...)` for this batch, on `device`: the loss comes back."""
        inputs = {"idx": self.input_ids, "targets": self.targets}
        if self.positions is not None:
            inputs["positions"] = self.positions
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        if self.shared_prefix:
            inputs["shared_prefix"] = self.shared_prefix
        return inputs

