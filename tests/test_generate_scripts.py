"""generate/base.py and generate/chat.py run end to end on the tiny checkpoint, in a subprocess like a user would."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_script_in_process
from lit_gpt.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
STATS = re.compile(r"(\d+) tokens in [\d.]+ s, [\d.]+ tokens/s; peak memory [\d.]+ GB \((process peak RSS|CUDA max allocated)")
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )



def test_base_streams_a_greedy_completion_and_reports_stats(checkpoint_dir):
    prompt = "The capital of France"
    result = run(
        "generate/base.py", "--checkpoint_dir", str(checkpoint_dir), "--prompt", prompt,
        "--max_new_tokens", "12", "--temperature", "0", "--num_samples", "2",
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    samples = result.stdout.split(prompt)[1:]
    assert len(samples) == 2 and samples[0] == samples[1]  # greedy: both samples are the same
    stats = STATS.findall(result.stderr)
    assert len(stats) == 2 and all(int(n) <= 12 for n, _ in stats), result.stderr
    assert "Sample 1/2" in result.stderr and "Sample 2/2" in result.stderr

    # The same completion as lit_gpt.generation in-process (greedy, stopping at EOS).
    import torch

    from lit_gpt.generation import generate
    from lit_gpt.loading import load_base_model

    tokenizer = Tokenizer(checkpoint_dir)
    model, _ = load_base_model(checkpoint_dir)
    ids = list(generate(model, tokenizer.encode(prompt), 12, stop_ids=tokenizer.stop_ids))
    assert samples[0] == tokenizer.decode(torch.tensor(ids, dtype=torch.long)) + "\n"
    assert int(stats[0][0]) == len(ids)


def test_chat_answers_one_prompt_with_the_chat_template(fresh_checkpoint_dir):
    config_file = fresh_checkpoint_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    result = run(
        "generate/chat.py", "--checkpoint_dir", str(fresh_checkpoint_dir), "--prompt", "What is the capital of France?",
        "--max_new_tokens", "8", "--temperature", "0",
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert ">> You" not in result.stdout  # non-interactive: the reply only
    assert len(STATS.findall(result.stderr)) == 1, result.stderr


def test_chat_without_a_template_says_to_use_base(checkpoint_dir, monkeypatch, capsys):
    code, _, err = run_script_in_process(
        "generate/chat.py", "--checkpoint_dir", str(checkpoint_dir), "--prompt", "hi", monkeypatch=monkeypatch, capsys=capsys
    )
    assert code != 0
    assert "no chat template" in err and "generate/base.py" in err


def test_base_on_a_missing_checkpoint_dir_exits_without_a_traceback(tmp_path):
    result = run("generate/base.py", "--checkpoint_dir", str(tmp_path / "nope"), "--prompt", "hi")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "does not exist" in result.stderr and "scripts/download.py" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("script", ["generate/base.py", "generate/chat.py"])
def test_an_empty_checkpoint_dir_says_what_is_missing(tmp_path, script, monkeypatch, capsys):
    code, out, err = run_script_in_process(script, "--checkpoint_dir", str(tmp_path), monkeypatch=monkeypatch, capsys=capsys)
    assert code != 0 and out == ""
    assert "is missing lit_model.safetensors, model_config.yaml" in err and "scripts/download.py" in err


def test_bad_sampling_settings_fail_before_loading(checkpoint_dir, monkeypatch, capsys):
    code, out, err = run_script_in_process(
        "generate/base.py", "--checkpoint_dir", str(checkpoint_dir), "--top_p", "0",
        monkeypatch=monkeypatch, capsys=capsys,
    )
    assert code != 0 and out == ""
    assert "top_p must be in (0, 1], got 0.0" in err and "Loaded" not in err
