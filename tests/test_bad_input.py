"""A corpus of bad input, each case ending in a clear error that says where the problem is (exit code 2 and one
`error:` message from a script, no traceback), grouped by the mechanism that catches it:

* text that is not valid Unicode (`lit_gpt.tokenizer.check_text`), wherever text enters: a prompt, a chat
  message, a dataset record;
* values that would make a command meaningless: generation lengths, records with nothing in them, numbers that
  are not finite;
* weights that are NaN or infinite, or not floating point at all (`lit_gpt.checkpoint.check_weight`), in a base
  checkpoint or a method's file;
* files that are truncated, binary, invalid or hold the wrong kind of value (`lit_gpt.files.read_yaml`/`read_json`
  for side files, and the readers of tokenizers, weights, resume states, prepared data and GGUF files): the error
  names the file, and a pickle in a resume state is refused, never run;
* numeric flags outside their range, named by the flag.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import sys

import pytest
import torch
from lightning_fabric import Fabric

from lit_gpt import lora, outputs
from lit_gpt.checkpoint import WEIGHTS_FILE, CheckpointError, base_fingerprint, load_weights_file, save_safetensors
from lit_gpt.config import Config
from lit_gpt.data import DataError
from lit_gpt.hf_config import hf_config_from_config
from lit_gpt.loading import load_base_model, load_finetuned
from lit_gpt.model import GPT
from lit_gpt.prepare import load_examples
from lit_gpt.tokenizer import Tokenizer

from conftest import REPO_ROOT, make_checkpoint_dir, run_script_in_process, torch_threads

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


# --- files that are corrupt, truncated or not what they should be ------------------------------------------
# Each case: (what it reads, file to damage relative to that input, how). Every one must end in one clear error
# that names the file. The inputs: a checkpoint (read by generate/base.py), a LoRA output directory (read by
# generate/finetuned.py), a run to resume (finetune/lora.py --resume true), prepared data (finetune/lora.py), a
# GGUF file (scripts/convert_gguf_checkpoint.py), Hugging Face files (scripts/convert_hf_checkpoint.py) and a
# --config file.
def truncate(keep: int):
    return lambda path: path.write_bytes(path.read_bytes()[:keep])


def write(content):
    return lambda path: path.write_bytes(content if isinstance(content, bytes) else content.encode())


def edit_text(old: str, new: str):
    return lambda path: path.write_text(path.read_text().replace(old, new))


def retype_tensor(name: str, dtype: torch.dtype):
    def damage(path):
        state = load_weights_file(path)
        key = name if name in state else sorted(state)[0]
        state[key] = state[key].to(dtype)
        save_safetensors(state, path)
    return damage


def replace_tensor(name: str, make):
    def damage(path):
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        state[name] = make(state[name])
        save_safetensors(state, path, metadata=metadata)
    return damage


class RunsCode:
    """A pickle that would run a command if it were ever unpickled."""

    def __reduce__(self):
        return (os.system, ("touch pwned-by-a-pickle",))


BINARY = bytes(range(128, 256)) * 2
CORRUPT_FILES = [
    # checkpoint: tokenizer files
    ("checkpoint", "tokenizer.json", truncate(300)),
    ("checkpoint", "tokenizer.json", write(BINARY)),
    ("checkpoint", "tokenizer.json", write("")),
    ("checkpoint", "tokenizer.json", write("[1, 2]")),
    ("checkpoint", "tokenizer.model", write(BINARY)),  # (tokenizer.json removed: sentencepiece is read)
    ("checkpoint", "tokenizer_config.json", write("{bad json")),
    ("checkpoint", "tokenizer_config.json", write("[]")),
    ("checkpoint", "generation_config.json", write(BINARY)),
    # checkpoint: model config
    ("checkpoint", "model_config.yaml", write(BINARY)),
    ("checkpoint", "model_config.yaml", write("n_layer: [2,\n")),
    ("checkpoint", "model_config.yaml", write("- 1\n- 2\n")),
    ("checkpoint", "model_config.yaml", write("")),
    ("checkpoint", "model_config.yaml", edit_text("n_layer: 2", "n_layer: two")),
    ("checkpoint", "model_config.yaml", edit_text("n_layer: 2", "n_layer: -1")),
    ("checkpoint", "model_config.yaml", edit_text("n_layer: 2", "n_layers: 2")),
    # checkpoint: weights
    ("checkpoint", WEIGHTS_FILE, retype_tensor("blocks.0.attn.proj.weight", torch.int32)),
    ("checkpoint", WEIGHTS_FILE, retype_tensor("ln_f.weight", torch.bool)),
    ("checkpoint", WEIGHTS_FILE, truncate(1000)),
    ("checkpoint", WEIGHTS_FILE, write(b"\xff" * 8 + b"{}")),
    # a LoRA output directory
    ("finetuned", "hyperparameters.yaml", write(BINARY)),
    ("finetuned", "hyperparameters.yaml", write("method: [lora\n")),
    ("finetuned", "hyperparameters.yaml", write("- lora\n")),
    ("finetuned", "hyperparameters.yaml", edit_text("method: lora", "method: magic")),
    ("finetuned", "hyperparameters.yaml", edit_text("settings:", "settings:\n  rank: 8")),
    ("finetuned", "hyperparameters.yaml", edit_text("  r: 2", "  r: two")),
    ("finetuned", "lora.safetensors", retype_tensor("blocks.0.attn.query.lora_A", torch.int64)),
    ("finetuned", "lora.safetensors", truncate(300)),
    # a run to resume
    ("resume", outputs.RESUME_FILE, truncate(2000)),
    ("resume", outputs.RESUME_FILE, write(BINARY)),
    ("resume", outputs.RESUME_FILE, write(b"")),
    ("resume", outputs.RESUME_FILE, lambda path: torch.save({"step": 1, "payload": RunsCode()}, path)),
    ("resume", outputs.RESUME_FILE, lambda path: torch.save([1, 2], path)),
    ("resume", outputs.RESUME_FILE, lambda path: torch.save({"step": 1}, path)),
    # prepared data
    ("data", "train.safetensors", truncate(200)),
    ("data", "train.safetensors", write(BINARY)),
    ("data", "train.safetensors", replace_tensor("offsets", lambda t: t.flip(0))),
    ("data", "train.safetensors", replace_tensor("tokens", lambda t: t.float())),
    ("data", "train.safetensors", replace_tensor("prompt_lengths", lambda t: t[:-1])),
    # a GGUF file
    ("gguf", "model.gguf", truncate(30)),
    ("gguf", "model.gguf", truncate(700)),
    ("gguf", "model.gguf", lambda path: path.write_bytes(path.read_bytes()[:8] + (2**60).to_bytes(8, "little")
                                                         + path.read_bytes()[16:])),
    ("gguf", "model.gguf", write(BINARY)),
    # Hugging Face files
    ("hf", "config.json", write("{bad json")),
    ("hf", "config.json", write(BINARY)),
    ("hf", "model.safetensors.index.json", write('{"metadata": {}}')),
    # a --config file
    ("config", "flags.yaml", write(BINARY)),
    ("config", "flags.yaml", write("train: {learning_rate: [\n")),
]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple:
    """(checkpoint, prepared data, a LoRA run's out_dir after 2 steps with a resume state) to copy and damage."""
    from lit_gpt.prepare import Example, prepare_instruction_data

    root = tmp_path_factory.mktemp("lora_run")
    checkpoint = make_checkpoint_dir(root / "checkpoint")
    data = root / "data"
    prepare_instruction_data([Example("Add 1 and 2.", "", "3")] * 4, checkpoint, data, val_split_fraction=0.0,
                             progress=False)
    shutil.copy(data / "train.safetensors", data / "val.safetensors")
    out_dir = root / "run"
    argv = sys.argv
    sys.argv = ["finetune/lora.py", *_lora_flags(checkpoint, data, out_dir), "--lora_r", "2"]
    try:
        with torch_threads(1):
            runpy.run_path(str(REPO_ROOT / "finetune/lora.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return checkpoint, data, out_dir


def _lora_flags(checkpoint, data, out_dir) -> list[str]:
    return ["--checkpoint_dir", str(checkpoint), "--data_dir", str(data), "--out_dir", str(out_dir),
            "--precision", "32-true", "--train.micro_batch_size", "2", "--train.global_batch_size", "2",
            "--train.max_steps", "2", "--train.save_interval", "1", "--eval.interval", "100", "--eval.max_iters", "1",
            "--eval.max_new_tokens", "1"]


def tiny_gguf(path) -> None:
    """A small, valid GGUF file (two float tensors and a little metadata)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind, name, damage", CORRUPT_FILES,
                         ids=[f"{kind}-{name}-{i}" for i, (kind, name, _) in enumerate(CORRUPT_FILES)])
def test_a_corrupt_file_is_one_clear_error_that_names_it(kind, name, damage, lora_run, tmp_path, monkeypatch, capsys):
    checkpoint, data, run = lora_run
    if kind == "checkpoint":
        target_dir = shutil.copytree(checkpoint, tmp_path / "checkpoint")
        if name == "tokenizer.model":
            (target_dir / "tokenizer.json").unlink()
        command = ["generate/base.py", "--checkpoint_dir", str(target_dir), "--prompt", "hi", "--max_new_tokens", "2"]
    elif kind in ("finetuned", "resume"):
        target_dir = shutil.copytree(run, tmp_path / "run")
        if kind == "finetuned":
            target_dir = target_dir / "final"
            command = ["generate/finetuned.py", "--finetuned_dir", str(target_dir), "--prompt", "hi",
                       "--max_new_tokens", "2"]
        else:
            command = ["finetune/lora.py", *_lora_flags(checkpoint, data, target_dir), "--lora_r", "2",
                       "--resume", "true"]
    elif kind == "data":
        target_dir = shutil.copytree(data, tmp_path / "data")
        command = ["finetune/lora.py", *_lora_flags(checkpoint, target_dir, tmp_path / "out")]
    elif kind == "gguf":
        target_dir = tmp_path
        tiny_gguf(tmp_path / name)
        command = ["scripts/convert_gguf_checkpoint.py", "--checkpoint_dir", str(tmp_path / "converted"),
                   "--gguf_path", str(tmp_path / name)]
    elif kind == "hf":
        target_dir = tmp_path / "hf"
        target_dir.mkdir()
        (target_dir / "config.json").write_text(json.dumps(hf_config_from_config(Config.from_checkpoint(checkpoint))))
        (target_dir / name).touch()
        command = ["scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(target_dir)]
    else:
        target_dir = tmp_path
        (tmp_path / name).write_text("train: {learning_rate: 0.001}\n")
        command = ["finetune/lora.py", "--config", str(tmp_path / name)]
    damage(target_dir / name)
    monkeypatch.chdir(tmp_path)  # where the pickle would leave its mark
    code, _, err = run_script_in_process(*command, monkeypatch=monkeypatch, capsys=capsys)
    assert_one_clear_error(code, err, str(target_dir / name))
    assert not (tmp_path / "pwned-by-a-pickle").exists()


# --- numeric flags out of their range -----------------------------------------------------------------------
FLAGS_OUT_OF_RANGE = [
    ("generate/base.py", "--num_samples", "0"),
    ("generate/base.py", "--temperature", "-1"),
    ("generate/base.py", "--top_p", "1.5"),
    ("generate/base.py", "--top_k", "0"),
    ("finetune/lora.py", "--lora_r", "0"),
    ("finetune/lora.py", "--lora_alpha", "-1"),
    ("finetune/lora.py", "--lora_dropout", "1.0"),
    ("finetune/adapter.py", "--adapter_start_layer", "99"),
    ("finetune/adapter.py", "--adapter_prompt_length", "0"),
    ("finetune/lora.py", "--devices", "0"),
    ("finetune/lora.py", "--train.seed", "-1"),
    ("finetune/lora.py", "--train.learning_rate", "0"),
    ("finetune/lora.py", "--eval.max_iters", "0"),
    ("eval/loss.py", "--batch_size", "0"),
    ("scripts/prepare_json.py", "--val_split_fraction", "1.0"),
    ("scripts/prepare_json.py", "--max_seq_length", "1"),
]


@pytest.mark.parametrize("script, flag, value", FLAGS_OUT_OF_RANGE)
def test_a_numeric_flag_out_of_its_range_is_named(script, flag, value, lora_run, tmp_path, monkeypatch, capsys):
    checkpoint, data, _ = lora_run
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"instruction": "Add 1 and 2.", "output": "3"}] * 4))
    inputs = {
        "generate": ["--checkpoint_dir", str(checkpoint), "--prompt", "hi", "--max_new_tokens", "2"],
        "finetune": _lora_flags(checkpoint, data, tmp_path / "out"),
        "eval": ["--checkpoint_dir", str(checkpoint), "--data_dir", str(data)],
        "scripts": ["--checkpoint_dir", str(checkpoint), "--data_file", str(records), "--destination_path",
                    str(tmp_path / "prepared")],
    }[script.split("/")[0]]
    code, _, err = run_script_in_process(script, *inputs, flag, value, monkeypatch=monkeypatch, capsys=capsys)
    assert_one_clear_error(code, err, flag.lstrip("-").split(".")[-1], value)
