"""Task-accuracy evaluation: answer extraction, eval/accuracy.py and eval/loss.py end to end, batched == unbatched.

The batched path (prompts sorted by length, left-padded, KV-cached) must give exactly the predictions of a
plain loop that generates one record at a time with `lit_gpt.generation.generate` (greedy), on the tiny
checkpoint (base and LoRA) and, marked slow, on the real SmolLM2-135M-Instruct with AddSub records.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lightning_fabric import Fabric
import pytest
import torch
import yaml

from lit_gpt.checkpoint import WEIGHTS_FILE, load_weights_file, save_safetensors
from lit_gpt.data import DataError
from lit_gpt.evaluation import (
    answer_type_of,
    evaluate,
    extract_choice,
    extract_number,
    is_correct,
    load_eval_model,
    load_eval_records,
    parse_options,
    score,
    summarize,
)
from lit_gpt.generation import generate
from lit_gpt.prepare import Example, prepare_instruction_data
from lit_gpt.tokenizer import Tokenizer

from conftest import make_checkpoint_dir, run_script_in_process

RECORDS = [
    {"instruction": "Add the two numbers.", "input": "12 and 30", "output": "42", "answer": 42},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris", "answer": "7"},
    {"instruction": "Name a quick animal.", "answer": 3.5},
    {"instruction": "The quick brown fox jumps over the lazy dog. How many words?", "input": "", "answer": 9},
    {"instruction": "Unicode: café, naïve. Count the accents.", "input": "", "answer": "1,000"},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")



def unbatched_responses(model, tokenizer, records, max_new_tokens: int) -> list[str]:
    """The reference: one record at a time through `generate` (greedy), no padding, no sorting."""
    responses = []
    for record in records:
        tokens = list(generate(model, tokenizer.encode(record.prompt), max_new_tokens, stop_ids=tokenizer.stop_ids))
        responses.append(tokenizer.decode(tokens, skip_special=True).strip())
    return responses


# --- answer extraction -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "response, expected",
    [
        ("The answer is 42.", 42),
        ("3 + 4 = 7. So she has 7 apples left.", 7),  # the LAST number
        ("First 12, then 30, so 42", 42),
        ("It costs 1,000 dollars", 1000),
        ("a population of 12,345,678 people", 12345678),
        ("The temperature dropped to -5 degrees", -5),
        ("Answer: -3.25", -3.25),
        ("She paid $2.50 for it.", 2.5),  # a sentence's final period is not a decimal point
        ("It is .5 of the cake", 0.5),
        ("pages 3-5", 5),  # a hyphen between numbers is not a minus sign
        ("x-2", 2),
        ("the list 1, 2, 3", 3),  # ", " between numbers is not a thousands separator
        ("12,34", 34),  # not a thousands group: two numbers
        ("I do not know.", None),
        ("", None),
    ],
)
def test_extract_number_takes_the_last_number(response, expected):
    assert extract_number(response) == expected


@pytest.mark.parametrize(
    "response, options, expected",
    [
        ("The answer is (C).", None, "C"),
        ("B", None, "B"),
        ("Between A and D, I pick D.", None, "D"),
        ("Answer: E) 12 apples", None, "E"),
        ("the answer is eleven", {"A": "ten", "B": "eleven", "C": "twelve"}, "B"),
        ("no idea", {"A": "ten"}, None),
        ("Apples are red.", None, None),  # "A" inside a word is not a choice
    ],
)
def test_extract_choice(response, options, expected):
    assert extract_choice(response, options) == expected


def test_parse_options_from_the_question():
    assert parse_options("Pick one: A) ten B) eleven C) twelve") == {"A": "ten", "B": "eleven", "C": "twelve"}
    assert parse_options("(A) red\n(B) blue") == {"A": "red", "B": "blue"}


def test_numeric_comparison_has_a_small_tolerance():
    assert is_correct(7, 7, "number") and is_correct(7.0004, "7", "number") and is_correct(1000, "1,000", "number")
    assert not is_correct(7.01, 7, "number") and not is_correct(None, 7, "number")
    assert is_correct("B", "b", "choice") and is_correct("B", "eleven", "choice", {"A": "ten", "B": "eleven"})
    assert not is_correct("A", "B", "choice")


def test_answer_type_is_detected_from_the_answers():
    assert answer_type_of([1, "2", "1,000", 3.5, "-4"]) == "number"
    assert answer_type_of(["A", "c", "(E)"]) == "choice"
    with pytest.raises(DataError, match="--answer_type"):
        answer_type_of(["A", "seven"])


def test_score_and_summary():
    records = load_eval_records_from(RECORDS[:2])
    predictions = score(records, ["So 12 + 30 = 42.", "Paris"], "number")
    assert [p["extracted"] for p in predictions] == [42, None]
    assert [p["correct"] for p in predictions] == [True, False]
    assert summarize(predictions) == {"accuracy": 0.5, "correct": 1, "total": 2, "no_answer": 1}


def load_eval_records_from(records, tmp=None):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.json"
        path.write_text(json.dumps(records))
        return load_eval_records(path)


# --- bad input ------------------------------------------------------------------------------------------------
def test_records_without_an_answer_name_the_file_and_record(tmp_path):
    path = tmp_path / "no_answer.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [RECORDS[0], {"instruction": "Hi", "output": "Hello"}]) + "\n")
    with pytest.raises(DataError, match=r"no_answer.jsonl, line 2: no 'answer' field \(keys present: \['instruction', 'output'\]\)"):
        load_eval_records(path)
    assert len(load_eval_records(path, limit=1)) == 1  # only the records evaluated are checked


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    """The tiny checkpoint with room for Alpaca prompts (~140 tiny-tokenizer tokens) plus a response."""
    return make_checkpoint_dir(tmp_path_factory.mktemp("tiny_256"), block_size=256)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval_data") / "tiny.json"
    path.write_text(json.dumps(RECORDS))
    return path


@pytest.fixture(scope="module")
def lora_dir(checkpoint_dir, tmp_path_factory) -> Path:
    """A LoRA output directory as finetune/lora.py writes it, with non-zero (so not identity) LoRA weights."""
    from lit_gpt import lora, outputs
    from lit_gpt.checkpoint import base_fingerprint
    from lit_gpt.config import Config
    from lit_gpt.model import GPT

    settings = lora.LoRASettings(r=4, alpha=8, dropout=0.0, mlp=True)
    torch.manual_seed(3)
    model = lora.apply(GPT(Config.from_checkpoint(checkpoint_dir)), settings)
    with torch.no_grad():
        for name in lora.peft_parameter_names(model):
            model.get_parameter(name).normal_(0, 0.3)
    hparams = outputs.run_hyperparameters("lora", settings, checkpoint_dir=checkpoint_dir)
    hparams["base_fingerprint"] = base_fingerprint(checkpoint_dir)
    out = tmp_path_factory.mktemp("lora_out") / "final"
    outputs.save_output_dir(Fabric(accelerator="cpu", devices=1), out, lora.state_dict_to_save(model),
                            lora.WEIGHTS_FILE, hparams, checkpoint_dir)
    return out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data_file", "missing.json"], "Data file 'missing.json' does not exist"),
        (["--data_file", "{data}", "--checkpoint_dir", "no/such/dir"], "Checkpoint directory 'no/such/dir' does not exist"),
        (["--data_file", "{data}", "--finetuned_dir", "out/nothing/final"], "--finetuned_dir 'out/nothing/final' does not exist"),
        (["--data_file", "{data}", "--finetuned_dir", "{lora}", "--method", "adapter"], "holds 'lora' weights, not 'adapter'"),
        (["--data_file", "{data}", "--finetuned_dir", "{ckpt}"], "hyperparameters.yaml' does not exist"),
        (["--data_file", "{data}", "--checkpoint_dir", "{ckpt}", "--answer_type", "letters"], "--answer_type must be one of"),
        (["--data_file", "{data}", "--checkpoint_dir", "{ckpt}", "--limit", "0"], "--limit must be at least 1"),
        (["--data_file", "{data}", "--checkpoint_dir", "{ckpt}", "--batch_size", "0"], "--batch_size must be at least 1"),
        (["--data_file", "{data}"], "Pass --checkpoint_dir"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, data_file, checkpoint_dir, lora_dir, tmp_path, monkeypatch, capsys):
    args = [a.format(data=data_file, ckpt=checkpoint_dir, lora=lora_dir) for a in args]
    code, out, err = run_script_in_process("eval/accuracy.py", *args, "--out_dir", str(tmp_path / "o"), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err, err


def test_adapter_dir_without_its_weights_is_a_clear_error(lora_dir, data_file, tmp_path, monkeypatch, capsys):
    """A directory that says "adapter" but holds something else (e.g. a LoRA run's files) is refused by name."""
    bad = tmp_path / "adapter_final"
    bad.mkdir()
    hparams = yaml.safe_load((lora_dir / "hyperparameters.yaml").read_text())
    (bad / "hyperparameters.yaml").write_text(yaml.safe_dump({**hparams, "method": "adapter"}))
    (bad / "lora.safetensors").write_bytes((lora_dir / "lora.safetensors").read_bytes())
    code, _, err = run_script_in_process("eval/accuracy.py", "--data_file", str(data_file), "--finetuned_dir", str(bad),
                              monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "says method 'adapter' but has no adapter.safetensors" in err and "Traceback" not in err


def test_no_answer_field_via_the_script(checkpoint_dir, tmp_path, monkeypatch, capsys):
    path = tmp_path / "plain_alpaca.json"
    path.write_text(json.dumps([{"instruction": "Hi", "input": "", "output": "Hello"}]))
    code, _, err = run_script_in_process("eval/accuracy.py", "--data_file", str(path), "--checkpoint_dir", str(checkpoint_dir),
                              monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "plain_alpaca.json, record 0: no 'answer' field" in err and "eval/loss.py" in err


# --- the script on the tiny checkpoint ----------------------------------------------------------------------
def test_accuracy_counts_what_the_model_answers(tmp_path, monkeypatch, capsys):
    """A model that always writes "4" is right exactly on the records whose answer is 4."""
    ckpt = make_checkpoint_dir(tmp_path / "ckpt", lm_head_bias=True, block_size=256)
    state = load_weights_file(ckpt / WEIGHTS_FILE)
    four = Tokenizer(ckpt).encode("4", bos=False).tolist()
    assert len(four) == 1
    state["lm_head.bias"] = torch.zeros_like(state["lm_head.bias"])
    state["lm_head.bias"][four[0]] = 1e4
    save_safetensors(state, ckpt / WEIGHTS_FILE)
    answers = [4, "4", 5, "4.0", -4, "1,004"]
    records = [{"instruction": f"Question {i}", "input": "", "answer": a} for i, a in enumerate(answers)]
    data = tmp_path / "answers.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "eval"
    code, stdout, err = run_script_in_process("eval/accuracy.py", "--checkpoint_dir", str(ckpt), "--data_file", str(data),
                                   "--max_new_tokens", "1", "--batch_size", "4", "--out_dir", str(out),
                                   monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert "accuracy 50.0% (3/6)" in stdout
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["response"] for p in predictions] == ["4"] * 6
    assert [p["correct"] for p in predictions] == [True, True, False, True, False, False]
    assert set(predictions[0]) >= {"instruction", "response", "extracted", "answer", "correct"}
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["correct"], summary["total"], summary["answer_type"]) == (3, 6, "number")
    assert math.isclose(summary["accuracy"], 0.5)

    code, stdout, _ = run_script_in_process("eval/accuracy.py", "--checkpoint_dir", str(ckpt), "--data_file", str(data),
                                 "--max_new_tokens", "1", "--limit", "2", "--out_dir", str(out),
                                 monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "accuracy 100.0% (2/2)" in stdout


@pytest.mark.parametrize("finetuned", [False, True], ids=["base", "lora"])
def test_batched_predictions_equal_one_record_at_a_time(finetuned, checkpoint_dir, lora_dir, data_file):
    model, tokenizer, what = load_eval_model(checkpoint_dir, lora_dir if finetuned else None)
    assert what.startswith("lora weights" if finetuned else "base checkpoint")
    records = load_eval_records(data_file)
    batched = evaluate(model, tokenizer, records, max_new_tokens=12, batch_size=3, progress=False)
    reference = score(records, unbatched_responses(model, tokenizer, records, 12), "number")
    assert batched == reference
    assert len({p["response"] for p in batched}) > 1  # the prompts really got different continuations


def test_loss_script_matches_validate(checkpoint_dir, lora_dir, tmp_path, monkeypatch, capsys):
    data_dir = tmp_path / "prepared"
    examples = [Example(instruction=r["instruction"], input=r.get("input", ""), output=str(r["answer"])) for r in RECORDS]
    prepare_instruction_data(examples, checkpoint_dir, data_dir, val_split_fraction=0.4, progress=False)
    results = {}
    for name, flag in (("base", ["--checkpoint_dir", str(checkpoint_dir)]), ("lora", ["--finetuned_dir", str(lora_dir)])):
        out_file = tmp_path / f"{name}.json"
        code, stdout, err = run_script_in_process("eval/loss.py", "--data_dir", str(data_dir), *flag, "--out_file", str(out_file),
                                       monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0, err
        results[name] = json.loads(out_file.read_text())
        assert f"val loss {results[name]['loss']:.4f}" in stdout
        assert math.isclose(results[name]["perplexity"], math.exp(results[name]["loss"]))
    assert results["base"]["loss"] != results["lora"]["loss"]
    assert 0 < results["base"]["loss"] < 20

    code, _, err = run_script_in_process("eval/loss.py", "--data_dir", str(tmp_path / "none"), "--checkpoint_dir",
                              str(checkpoint_dir), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err


# --- the real model -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_batched_equals_unbatched_on_smollm2_addsub(shared_data, smollm2_checkpoint):
    records = load_eval_records(shared_data / "math_eval" / "AddSub.json", limit=16)
    model, tokenizer, _ = load_eval_model(smollm2_checkpoint)
    batched = evaluate(model, tokenizer, records, max_new_tokens=32, batch_size=8, progress=False)
    reference = score(records, unbatched_responses(model, tokenizer, records, 32), "number")
    assert [p["response"] for p in batched] == [p["response"] for p in reference]
    assert batched == reference
