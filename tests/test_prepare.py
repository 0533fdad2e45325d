"""lit_gpt.prepare and lit_gpt.prompts: the prompt template, reading and checking records, splitting,
tokenizing with prompt masking and truncation, writing prepared data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_gpt.data import DataError, InstructionDataset, collate, load_prepared_dir
from lit_gpt.model import IGNORE_INDEX
from lit_gpt.prepare import (
    Example,
    load_examples,
    prepare_instruction_data,
    read_records,
    split_train_val,
    tokenize_examples,
)
from lit_gpt.prompts import RESPONSE_MARKER, alpaca_prompt
from lit_gpt.tokenizer import Tokenizer


def extract_response(text: str) -> str:
    """The part of a generated `text` after the last response marker, stripped (the whole text if there is none)."""
    _, marker, response = text.rpartition(RESPONSE_MARKER)
    return (response if marker else text).strip()


def get_batch(
    dataset: InstructionDataset, indices, pad_id: int = 0, max_seq_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`collate` the samples `indices` of `dataset`: (input_ids (B, T), targets (B, T))."""
    return collate([dataset[int(i)] for i in indices], pad_id=pad_id, max_seq_length=max_seq_length)


# --- prompts ---------------------------------------------------------------------------------------------
def test_alpaca_prompt_without_input():
    assert alpaca_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert alpaca_prompt("Say hi.", "  ") == alpaca_prompt("Say hi.")  # whitespace-only input = no input


def test_alpaca_prompt_with_input():
    assert alpaca_prompt("Add.", "2 and {3}") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n"
        "### Input:\n2 and {3}\n\n### Response:\n"
    )


def test_extract_response():
    assert extract_response(alpaca_prompt("Add.", "2 and 3") + " 5 \n") == "5"
    assert extract_response("no marker") == "no marker"
    assert alpaca_prompt("x").rstrip().endswith(RESPONSE_MARKER)


# --- reading ---------------------------------------------------------------------------------------------
def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_read_json_and_jsonl(tmp_path):
    records = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": 7}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    write_jsonl(tmp_path / "d.jsonl", records)
    write_jsonl(tmp_path / "lines.json", records)  # JSON lines under a .json name
    for name in ("d.json", "d.jsonl", "lines.json"):
        assert read_records(tmp_path / name) == records
    examples = load_examples(tmp_path / "d.jsonl")
    assert examples[0] == Example("a", "", "b", "line 1")
    assert examples[1] == Example("c", "d", "7", "line 2")  # numbers become text


def test_custom_field_names(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "context": None, "response": "r"}])
    fields = {"instruction": "prompt", "input": "context", "output": "response"}
    assert load_examples(path, fields=fields) == [Example("p", "", "r", "line 1")]


def test_malformed_json_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON at line 3"):
        read_records(bad)
    bad_lines = tmp_path / "bad.jsonl"
    bad_lines.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: malformed JSON on line 3"):
        read_records(bad_lines)


def test_missing_and_wrong_fields_name_record_and_field(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(DataError, match=r"d\.json, record 1: missing the output field 'output'") as e:
        load_examples(path)
    assert "keys present: ['instruction']" in str(e.value)
    path.write_text(json.dumps([{"output": "b"}]))
    with pytest.raises(DataError, match=r"record 0: missing the instruction field 'instruction'"):
        load_examples(path)
    path.write_text(json.dumps([{"instruction": "a", "output": ["b"]}]))
    with pytest.raises(DataError, match=r"record 0: the output field 'output' must be text, got list"):
        load_examples(path)
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, "just a string"]))
    with pytest.raises(DataError, match=r"record 1: expected a JSON object"):
        load_examples(path)
    path.write_text(json.dumps({"data": [{"instruction": "a", "output": "b"}]}))
    with pytest.raises(DataError, match=r"expected a JSON list of records, got dict.*'data'"):
        load_examples(path)


def test_empty_and_missing_files(tmp_path):
    for name, text in (("e.json", "[]"), ("e.jsonl", "\n\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=f"{name}: the dataset is empty"):
            load_examples(tmp_path / name)
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "nope.json")


def test_nested_instances(tmp_path):
    """The shape of Stanford Alpaca's seed_tasks.jsonl: samples nested under `instances`."""
    tasks = [
        {"id": "t0", "instruction": "Greet.", "instances": [{"input": "", "output": "Hi."}], "is_classification": False},
        {"id": "t1", "instruction": "Sum.", "instances": [{"input": "1 2", "output": "3"}, {"input": "2 2", "output": "4"}]},
    ]
    path = write_jsonl(tmp_path / "seed_tasks.jsonl", tasks)
    with pytest.raises(DataError, match=r"line 1: missing the output field 'output'.*--instances_field instances"):
        load_examples(path)
    examples = load_examples(path, instances_field="instances")
    assert [(e.instruction, e.input, e.output) for e in examples] == [
        ("Greet.", "", "Hi."), ("Sum.", "1 2", "3"), ("Sum.", "2 2", "4")
    ]
    assert examples[2].where == "line 2, instances[1]"
    write_jsonl(path, [{"instruction": "x", "instances": "oops"}])
    with pytest.raises(DataError, match=r"line 1: no list of objects under 'instances'"):
        load_examples(path, instances_field="instances")


# --- splitting -------------------------------------------------------------------------------------------
def test_split_is_deterministic_and_complete():
    items = list(range(100))
    train, val = split_train_val(items, 0.1, seed=42)
    assert (train, val) == split_train_val(items, 0.1, seed=42)
    assert len(val) == 10 and sorted(train + val) == items
    assert split_train_val(items, 0.1, seed=1) != (train, val)
    assert len(split_train_val(items[:3], 0.05, seed=0)[1]) == 1  # at least one validation sample
    assert split_train_val(items[:3], 0.0, seed=0)[1] == []
    with pytest.raises(DataError, match="no training sample would be left"):
        split_train_val(items[:1], 0.05)
    with pytest.raises(DataError, match=r"in \[0, 1\)"):
        split_train_val(items, 1.0)


# --- tokenizing ------------------------------------------------------------------------------------------
EXAMPLES = [
    Example("Add the two numbers.", "12 and 30", "The answer is 42.", "record 0"),
    Example("What is the capital of France?", "", "Paris is the capital of France.", "record 1"),
    Example("Say nothing.", "", "", "record 2"),
]


def test_labels_mask_exactly_the_prompt(checkpoint_dir):
    tok = Tokenizer(checkpoint_dir)
    seqs, prompt_lengths, stats = tokenize_examples(EXAMPLES, tok, max_seq_length=512, progress=False)
    assert stats == {"truncated": 0, "skipped": 0}
    dataset = InstructionDataset.from_sequences(seqs, prompt_lengths, mask_prompt=True)
    for ex, (ids, labels), p in zip(EXAMPLES, (dataset[i] for i in range(3)), prompt_lengths):
        prompt_ids = tok.encode(alpaca_prompt(ex.instruction, ex.input))
        assert p == len(prompt_ids) and torch.equal(ids[:p], prompt_ids)
        assert (labels[:p] == IGNORE_INDEX).all() and torch.equal(labels[p:], ids[p:])
        assert ids[-1] == tok.eos_id and ids.dtype == labels.dtype == torch.int64
        assert tok.decode(ids[p:], skip_special=True).strip() == ex.output
    unmasked = InstructionDataset.from_sequences(seqs, prompt_lengths, mask_prompt=False)
    assert torch.equal(unmasked[0][1], unmasked[0][0])


def test_truncation_is_counted(checkpoint_dir):
    tok = Tokenizer(checkpoint_dir)
    full, prompts, _ = tokenize_examples(EXAMPLES, tok, 512, progress=False)
    limit = max(prompts) + 1  # every prompt fits, the longer responses do not
    seqs, prompts2, stats = tokenize_examples(EXAMPLES, tok, limit, progress=False)
    assert stats == {"truncated": sum(1 for s in full if len(s) > limit), "skipped": 0}
    assert stats["truncated"] >= 1 and prompts2 == prompts
    assert [len(s) for s in seqs] == [min(len(s), limit) for s in full]
    assert all(torch.equal(a, b[: len(a)]) for a, b in zip(seqs, full))  # the end is cut


def test_prompt_longer_than_max_seq_length_names_the_record(checkpoint_dir):
    tok = Tokenizer(checkpoint_dir)
    long = Example("word " * 600, "", "short", "line 3")
    with pytest.raises(DataError, match=r"f.jsonl: 1 sample\(s\).*line 3 \(\d+ prompt tokens\).*--skip_long_prompts"):
        tokenize_examples(EXAMPLES + [long], tok, 512, progress=False, source="f.jsonl")
    with pytest.warns(UserWarning, match="line 3"):
        seqs, _, stats = tokenize_examples(EXAMPLES + [long], tok, 512, progress=False, skip_long_prompts=True)
    assert len(seqs) == 3 and stats["skipped"] == 1


def test_collated_batch_trains_the_model(checkpoint_dir):
    """The targets convention matches the model's loss: only response tokens (and EOS) carry loss."""
    import dataclasses

    from lit_gpt.config import Config
    from lit_gpt.model import GPT

    tok = Tokenizer(checkpoint_dir)
    seqs, prompts, _ = tokenize_examples(EXAMPLES, tok, 512, progress=False)
    ds = InstructionDataset.from_sequences(seqs, prompts)
    input_ids, targets = get_batch(ds, [0, 1, 2])
    n_supervised = sum(len(s) - p for s, p in zip(seqs, prompts))
    assert int((targets != IGNORE_INDEX).sum()) == n_supervised
    model = GPT(dataclasses.replace(Config.from_checkpoint(checkpoint_dir), block_size=512))
    loss = model(input_ids, targets=targets)
    assert torch.isfinite(loss)


# --- writing ---------------------------------------------------------------------------------------------
def test_prepare_and_load_dir(checkpoint_dir, tmp_path):
    out = tmp_path / "prepared"
    examples = [Example(f"Add {i} and {i}.", "", f"The answer is {2 * i}.", f"record {i}") for i in range(20)]
    summary = prepare_instruction_data(examples, checkpoint_dir, out, source="mem", val_split_fraction=0.1, progress=False)
    assert summary["train"]["num_samples"] == 18 and summary["val"]["num_samples"] == 2
    assert json.loads((out / "metadata.json").read_text())["mask_prompt"] is True
    train, val = load_prepared_dir(out, tokenizer=Tokenizer(checkpoint_dir), block_size=128)
    assert len(train) == 18 and train.metadata["max_seq_length"] == "128" and train.metadata["split"] == "train"
    with pytest.raises(DataError, match="block_size is only 4"):
        load_prepared_dir(out, block_size=4)


def test_prepare_errors(checkpoint_dir, tmp_path):
    with pytest.raises(DataError, match="max_seq_length 1000 is out of range.*block_size is 128"):
        prepare_instruction_data(EXAMPLES, checkpoint_dir, tmp_path / "a", max_seq_length=1000, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match="Cannot write to.*--destination_path"):
        prepare_instruction_data(EXAMPLES, checkpoint_dir, blocker / "sub", progress=False)
    with pytest.raises(DataError, match="needs model_config.yaml and a tokenizer"):
        prepare_instruction_data(EXAMPLES, tmp_path, tmp_path / "b", progress=False)
