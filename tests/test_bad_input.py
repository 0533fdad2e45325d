"""A corpus of bad input, each case ending in a clear error that says where the problem is (exit code 2 and one
`error:` message from a script, no traceback), grouped by the mechanism that catches it:

* text that is not valid Unicode (`lit_gpt.tokenizer.check_text`), wherever text enters: a prompt, a chat
  message, a dataset record;
* values that would make a command meaningless: generation lengths, records with nothing in them, numbers that
  are not finite;
* weights that are NaN or infinite (`lit_gpt.checkpoint.check_finite`), in a base checkpoint or a method's file.
"""

from __future__ import annotations

import json

import pytest
import torch
from lightning_fabric import Fabric

from lit_gpt import lora, outputs
from lit_gpt.checkpoint import WEIGHTS_FILE, CheckpointError, base_fingerprint, load_weights_file, save_safetensors
from lit_gpt.config import Config
from lit_gpt.data import DataError
from lit_gpt.loading import load_base_model, load_finetuned
from lit_gpt.model import GPT
from lit_gpt.prepare import load_examples
from lit_gpt.tokenizer import Tokenizer

from conftest import make_checkpoint_dir, run_script_in_process

LONE_SURROGATE = "\ud800"  # what a JSON "\ud800" escape decodes to
UNDECODABLE_BYTE = b"caf\xe9".decode("utf-8", "surrogateescape")  # a Latin-1 byte in a UTF-8 command line


def assert_one_clear_error(code: int, err: str, *names: str) -> None:
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().startswith("error: "), err
    for name in names:
        assert name in err, f"{name!r} not in {err!r}"


def give_a_chat_template(checkpoint_dir) -> None:
    """Make the tiny checkpoint an 'instruct' one, which generate/chat.py requires."""
    tokenizer_config = checkpoint_dir / "tokenizer_config.json"
    config = json.loads(tokenizer_config.read_text()) if tokenizer_config.is_file() else {}
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer_config.write_text(json.dumps(config))


# --- text that is not valid Unicode -------------------------------------------------------------------------
@pytest.mark.parametrize("text, position", [(f"ok {LONE_SURROGATE} then", 3), (UNDECODABLE_BYTE, 3)])
def test_the_tokenizer_names_where_text_is_not_unicode(text, position, checkpoint_dir):
    with pytest.raises(ValueError, match=f"not valid Unicode at character {position}"):
        Tokenizer(checkpoint_dir).encode(text)


@pytest.mark.parametrize("script, flag", [("generate/base.py", "--prompt"), ("generate/chat.py", "--prompt"),
                                          ("generate/chat.py", "--system")])
@pytest.mark.parametrize("text", [f"What is {LONE_SURROGATE}?", f"Say {UNDECODABLE_BYTE}"])
def test_a_prompt_that_is_not_unicode_is_one_clear_error(script, flag, text, fresh_checkpoint_dir, monkeypatch,
                                                          capsys):
    give_a_chat_template(fresh_checkpoint_dir)
    args = ["--checkpoint_dir", str(fresh_checkpoint_dir), flag, text, "--max_new_tokens", "2"]
    if flag == "--system":
        args += ["--prompt", "hi"]
    code, _, err = run_script_in_process(script, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert_one_clear_error(code, err, f"{flag} is not valid Unicode", "Save the input as UTF-8")


def test_a_chat_message_that_is_not_unicode_is_refused_and_the_chat_goes_on(fresh_checkpoint_dir, monkeypatch,
                                                                             capsys):
    give_a_chat_template(fresh_checkpoint_dir)
    typed = iter([f"bad {UNDECODABLE_BYTE}", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    code, _, err = run_script_in_process("generate/chat.py", "--checkpoint_dir", str(fresh_checkpoint_dir),
                                         monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "Your message is not valid Unicode at character 7" in err and "Traceback" not in err, err


@pytest.mark.parametrize("field", ["instruction", "input", "output"])
def test_a_record_that_is_not_unicode_is_named(field, tmp_path):
    records = [{"instruction": "Add.", "input": "1 and 2", "output": "3"} for _ in range(3)]
    records[1][field] = f"x {LONE_SURROGATE}"
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))  # json writes the lone surrogate as the escape "\ud800"
    with pytest.raises(DataError, match=f"data.json, record 1: The {field} field '{field}' is not valid Unicode"):
        load_examples(path)


# --- values that would make a command meaningless -----------------------------------------------------------
@pytest.mark.parametrize("script", ["generate/base.py", "generate/chat.py"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_generation_length_below_one_is_refused(script, value, checkpoint_dir, monkeypatch, capsys):
    code, _, err = run_script_in_process(script, "--checkpoint_dir", str(checkpoint_dir), "--prompt", "hi",
                                         "--max_new_tokens", value, monkeypatch=monkeypatch, capsys=capsys)
    assert_one_clear_error(code, err, f"--max_new_tokens must be at least 1, got {value}")


@pytest.mark.parametrize("record, message", [
    ({"instruction": "", "input": "", "output": ""}, "every field is empty"),
    ({"instruction": " ", "output": "\n"}, "every field is empty"),
    ({"instruction": "Half of 3?", "output": float("nan")}, "must be text, got float: NaN"),
    ({"instruction": "Big?", "output": float("inf")}, "must be text, got float: Infinity"),
])
def test_a_record_with_nothing_to_learn_is_named(record, message, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"instruction": "Add 1 and 2.", "output": "3"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=f"data.jsonl, line 2: .*{message}"):
        load_examples(path)


def test_records_with_an_empty_output_are_counted_and_kept(tmp_path):
    records = [{"instruction": f"Q{i}", "output": "" if i % 2 else "A"} for i in range(6)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    with pytest.warns(UserWarning, match=r"3 of 6 records have an empty output field 'output' \(record 1, record 3"):
        assert len(load_examples(path)) == 6


# --- weights that are NaN or infinite -----------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_base_checkpoint_with_non_finite_weights_is_named_broken(bad, tmp_path, monkeypatch, capsys):
    directory = make_checkpoint_dir(tmp_path / "ckpt")
    state = load_weights_file(directory / WEIGHTS_FILE)
    state["blocks.1.mlp.fc_2.weight"][3, 4] = bad
    save_safetensors(state, directory / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match=r"is broken: its tensor 'blocks.1.mlp.fc_2.weight' holds NaN"):
        load_base_model(directory)
    code, _, err = run_script_in_process("generate/base.py", "--checkpoint_dir", str(directory), "--prompt", "hi",
                                         monkeypatch=monkeypatch, capsys=capsys)
    assert_one_clear_error(code, err, "is broken", "blocks.1.mlp.fc_2.weight")


def test_finetuned_weights_that_diverged_are_named_broken(checkpoint_dir, tmp_path):
    settings = lora.LoRASettings(r=2)
    model = lora.apply(GPT(Config.from_checkpoint(checkpoint_dir)), settings)
    state = lora.state_dict_to_save(model)
    state["blocks.0.attn.value.lora_B"] = torch.full_like(state["blocks.0.attn.value.lora_B"], float("nan"))
    hparams = outputs.run_hyperparameters("lora", settings, checkpoint_dir=checkpoint_dir)
    hparams["base_fingerprint"] = base_fingerprint(checkpoint_dir)
    out = tmp_path / "final"
    outputs.save_output_dir(Fabric(accelerator="cpu", devices=1), out, state, lora.WEIGHTS_FILE, hparams, checkpoint_dir)
    with pytest.raises(CheckpointError, match=r"lora.safetensors' is broken: .*'blocks.0.attn.value.lora_B'.*diverged"):
        load_finetuned(out)
