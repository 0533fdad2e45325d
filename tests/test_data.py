"""lit_gpt.data: the prepared-file format and its checks, epoch order, collate, shared prefix, packing, and the
training loop's BatchStream."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import random_samples, template_batch
from lit_gpt.args import TrainArgs
from lit_gpt.data import (
    MIN_SHARED_PREFIX,
    BatchStream,
    DataError,
    DataPosition,
    InstructionDataset,
    collate,
    epoch_order,
    load_prepared,
    load_prepared_dir,
    shared_prefix_length,
)
from lit_gpt.model import IGNORE_INDEX
from lit_gpt.prepare import Example, prepare_instruction_data
from lit_gpt.tokenizer import Tokenizer


def longest_sample(dataset: InstructionDataset) -> tuple[int, int]:
    """(index, length in tokens) of the longest sample."""
    lengths = dataset.lengths
    i = int(torch.argmax(lengths))
    return i, int(lengths[i])


# --- storage ---------------------------------------------------------------------------------------------
def test_safetensors_round_trip(tmp_path):
    seqs = [torch.tensor([1, 5, 6, 7, 2]), torch.tensor([1, 9, 2]), torch.tensor([1, 3, 4, 8, 9, 10, 2])]
    ds = InstructionDataset.from_sequences(seqs, [2, 1, 4], mask_prompt=True, metadata={"source": "x"})
    ds.save(tmp_path / "train.safetensors")
    loaded = load_prepared(tmp_path / "train.safetensors")
    assert len(loaded) == 3 and loaded.lengths.tolist() == [5, 3, 7]
    assert loaded.mask_prompt and loaded.metadata["source"] == "x"
    for i in range(3):
        assert torch.equal(loaded[i][0], ds[i][0]) and torch.equal(loaded[i][1], ds[i][1])
    assert loaded[0][1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 6, 7, 2]
    assert loaded[-1][0].tolist() == seqs[-1].tolist()
    assert longest_sample(loaded) == (2, 7)
    with pytest.raises(IndexError):
        loaded[3]
    # an empty split (val_split_fraction 0) round-trips too
    InstructionDataset.from_sequences([], [], True).save(tmp_path / "val.safetensors")
    assert len(load_prepared(tmp_path / "val.safetensors")) == 0


def test_load_prepared_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist.*scripts/prepare_alpaca.py"):
        load_prepared(tmp_path / "train.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="not a readable safetensors file"):
        load_prepared(tmp_path / "junk.safetensors")
    with pytest.raises(DataError, match="is a directory"):
        load_prepared(tmp_path)


def test_load_prepared_dir_rejects_another_tokenizer(checkpoint_dir, fresh_checkpoint_dir, tmp_path):
    examples = [Example(f"Add {i} and {i}.", "", f"{2 * i}", f"record {i}") for i in range(5)]
    prepare_instruction_data(examples, checkpoint_dir, tmp_path / "d", progress=False)
    config = json.loads((fresh_checkpoint_dir / "tokenizer_config.json").read_text())
    (fresh_checkpoint_dir / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    with pytest.raises(DataError, match="different tokenizer.*Prepare it again"):
        load_prepared_dir(tmp_path / "d", tokenizer=Tokenizer(fresh_checkpoint_dir))


# --- order and batches -----------------------------------------------------------------------------------
def test_epoch_order_is_deterministic_per_epoch():
    a = epoch_order(50, epoch=3, seed=7)
    assert sorted(a) == list(range(50))
    assert a == epoch_order(50, epoch=3, seed=7)  # no hidden state: resuming recomputes the same order
    assert a != epoch_order(50, epoch=4, seed=7) and a != epoch_order(50, epoch=3, seed=8)
    assert epoch_order(5, 0, shuffle=False) == [0, 1, 2, 3, 4]


def test_epoch_order_resume_matches_uninterrupted_run():
    """Consuming epochs 0..2 in one go equals resuming at (epoch 1, index 17) from scratch."""
    n, batch = 23, 4
    stream = [i for e in range(3) for i in epoch_order(n, e, seed=1)]
    # a "new process" knows only (epoch=1, index=17)
    resumed = epoch_order(n, 1, seed=1)[17:] + epoch_order(n, 2, seed=1)
    assert stream[n + 17 :] == resumed
    assert len(stream) == 3 * n and batch  # each epoch visits every sample once


def test_group_by_length():
    lengths = [(i * 37) % 101 for i in range(300)]
    order = epoch_order(300, 2, seed=5, lengths=lengths, batch_size=4, window=64)
    assert sorted(order) == list(range(300))
    assert order == epoch_order(300, 2, seed=5, lengths=lengths, batch_size=4, window=64)
    assert order != epoch_order(300, 3, seed=5, lengths=lengths, batch_size=4, window=64)

    def padding(o):
        return sum(4 * max(lengths[i] for i in o[s : s + 4]) - sum(lengths[i] for i in o[s : s + 4]) for s in range(0, 300, 4))

    assert padding(order) < padding(epoch_order(300, 2, seed=5)) / 3
    # batch_size defaults to window // 64 (the training stream passes only window); a short batch stays last
    odd = epoch_order(10, 0, seed=0, lengths=list(range(10)), batch_size=4)
    assert sorted(odd) == list(range(10)) and odd[8:] == [1, 0]  # one window: the two shortest form the last batch
    assert epoch_order(8, 0, lengths=[1] * 8, window=128) == epoch_order(8, 0, lengths=[1] * 8, batch_size=2)
    with pytest.raises(DataError, match="3 lengths given for 8 samples"):
        epoch_order(8, 0, lengths=[1, 2, 3])


def test_collate_shifts_and_pads():
    a = (torch.tensor([10, 11, 12, 13]), torch.tensor([IGNORE_INDEX, IGNORE_INDEX, 12, 13]))
    b = (torch.tensor([20, 21]), torch.tensor([IGNORE_INDEX, 21]))
    input_ids, targets = collate([a, b], pad_id=0)
    assert input_ids.tolist() == [[10, 11, 12], [20, 0, 0]]  # t_0 .. t_{n-2}
    assert targets.tolist() == [[IGNORE_INDEX, 12, 13], [21, IGNORE_INDEX, IGNORE_INDEX]]  # l_1 .. l_{n-1}
    input_ids, targets = collate([a, b], pad_id=7, max_seq_length=2)
    assert input_ids.tolist() == [[10, 11], [20, 7]] and targets.tolist() == [[IGNORE_INDEX, 12], [21, IGNORE_INDEX]]
    assert input_ids.dtype == targets.dtype == torch.int64


# --- shared prefix ---------------------------------------------------------------------------------------
def test_shared_prefix_length_is_the_template_without_loss():
    x, y = template_batch(template_length=10)
    assert shared_prefix_length(x, y) == 10
    y[1, 8] = 5  # a position that carries loss ends the shared part there
    assert shared_prefix_length(x, y) == 8
    assert shared_prefix_length(x[:1], y[:1]) == 0  # one row: nothing to share
    short_x, short_y = template_batch(template_length=MIN_SHARED_PREFIX - 1)
    assert shared_prefix_length(short_x, short_y) == 0  # too short to pay off
    same = x[:1].repeat(2, 1)
    assert shared_prefix_length(same, torch.full_like(same, IGNORE_INDEX)) == x.size(1) - 1  # a row keeps a token


# --- the training loop's batch stream --------------------------------------------------------------------
def _templated_dataset() -> InstructionDataset:
    """8 samples that all begin with the same 12-token template, which carries no loss."""
    template = list(range(40, 52))
    sequences = [torch.tensor(template + [i % 7 + 1] * (3 + i % 5)) for i in range(8)]
    return InstructionDataset.from_sequences(sequences, [len(template) + 1] * 8)


def test_batches_carry_their_shared_prefix_unless_turned_off():
    dataset = _templated_dataset()
    for flags, expected in (({}, 12), ({"shared_prefix": True}, 12), ({"shared_prefix": False}, 0),
                            ({"shared_prefix": True, "compile": True}, 0)):
        train = TrainArgs(micro_batch_size=4, global_batch_size=4, **flags)
        batch = BatchStream(dataset, train, rank=0, world_size=1, device_type="cpu").next_step()[0]
        assert batch.shared_prefix == expected
        assert ("shared_prefix" in batch.model_inputs("cpu")) == (expected > 0)


def test_shared_prefix_is_off_by_default_on_a_gpu():
    dataset = _templated_dataset()
    for flags, expected in (({}, 0), ({"shared_prefix": True}, 12)):
        train = TrainArgs(micro_batch_size=4, global_batch_size=4, **flags)
        assert BatchStream(dataset, train, rank=0, world_size=1, device_type="cuda").next_step()[0].shared_prefix == expected


def _dataset(n: int) -> InstructionDataset:
    samples = random_samples(n, seed=1)
    return InstructionDataset.from_sequences([ids for ids, _ in samples], [len(ids) // 3 for ids, _ in samples])


def _segments(batch) -> list[tuple[int, ...]]:
    """The samples inside packed rows: runs of positions 0, 1, 2, ... (padding is a run of length 1)."""
    out = []
    for ids, pos in zip(batch.input_ids.tolist(), batch.positions.tolist()):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        out += [tuple(ids[a:b]) for a, b in zip(starts, starts[1:]) if b - a > 1]
    return out


def test_packing_uses_every_sample_once_per_epoch():
    dataset = _dataset(23)  # every sample has >= 3 input tokens, so padding runs (length 1) are not samples
    train = TrainArgs(micro_batch_size=2, global_batch_size=4, packing=True, seed=3)
    stream = BatchStream(dataset, train, rank=0, world_size=1, device_type="cpu")
    packed = []
    while len(packed) < len(dataset):
        for batch in stream.next_step():
            assert batch.input_ids.size(1) <= stream.row_length
            packed += _segments(batch)
    expected = sorted(tuple(dataset[i][0][:-1].tolist()) for i in range(len(dataset)))
    assert sorted(packed[: len(dataset)]) == expected


def test_a_restored_position_continues_with_the_same_batches():
    dataset = _dataset(30)
    for packing in (False, True):
        train = TrainArgs(micro_batch_size=2, global_batch_size=4, packing=packing, seed=5)
        first = BatchStream(dataset, train, rank=0, world_size=1, device_type="cpu")
        for _ in range(3):
            first.next_step()
        saved = DataPosition(first.position.epoch, first.position.index)
        expected = [first.next_step() for _ in range(6)]
        second = BatchStream(dataset, train, rank=0, world_size=1, device_type="cpu")
        second.position = saved
        for want in expected:
            got = second.next_step()
            for a, b in zip(want, got):
                assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
