"""scripts/prepare_alpaca.py, prepare_dolly.py and prepare_json.py: in-process (download mocked) and as CLIs."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lit_gpt.prepare
from lit_gpt.config import Config
from lit_gpt.data import DataError, load_prepared, load_prepared_dir
from lit_gpt.model import IGNORE_INDEX
from lit_gpt.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]

ALPACA = [
    {"instruction": "Add the two numbers.", "input": "12 and 30", "output": "The answer is 42."},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris is the capital of France."},
] * 10


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory, request) -> Path:
    """The tiny checkpoint's tokenizer and config with block_size 2048 (the tiny tokenizer needs many tokens
    for prompts it was not trained on). Weights are not needed to prepare data."""
    src = request.getfixturevalue("checkpoint_dir")
    out = tmp_path_factory.mktemp("long_checkpoint")
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, out / f.name)
    dataclasses.replace(Config.from_checkpoint(src), block_size=2048).to_file(out / "model_config.yaml")
    return out


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def mock_download(monkeypatch, payload: bytes) -> list[str]:
    urls = []

    def fake_urlopen(url, timeout=None):
        urls.append(url)
        return FakeResponse(payload)

    monkeypatch.setattr(lit_gpt.prepare, "urlopen", fake_urlopen)
    return urls


def test_prepare_alpaca_downloads_and_prepares(monkeypatch, long_checkpoint, tmp_path):
    payload = json.dumps(ALPACA).encode()
    urls = mock_download(monkeypatch, payload)
    script = load_script("prepare_alpaca")
    dest = tmp_path / "alpaca"
    script.prepare(long_checkpoint, destination_path=dest, sha256=hashlib.sha256(payload).hexdigest())
    assert urls == [script.URL] and (dest / "alpaca_data.json").read_bytes() == payload
    train, val = load_prepared_dir(dest, tokenizer=Tokenizer(long_checkpoint), block_size=2048)
    assert (len(train), len(val)) == (19, 1)  # 5% of 20
    meta = json.loads((dest / "metadata.json").read_text())
    assert meta["mask_prompt"] is True and meta["max_seq_length"] == "2048" and meta["truncated"] == 0
    ids, labels = train[0]
    assert labels[0] == IGNORE_INDEX and labels[-1] == ids[-1] == Tokenizer(long_checkpoint).eos_id
    # a second run reuses the downloaded file
    script.prepare(long_checkpoint, destination_path=dest)
    assert len(urls) == 1


def test_prepare_alpaca_checksum_mismatch(monkeypatch, long_checkpoint, tmp_path):
    mock_download(monkeypatch, b"[]")
    script = load_script("prepare_alpaca")
    with pytest.raises(DataError, match=r"Checksum mismatch.*expected sha256 0+, got [0-9a-f]{64}"):
        script.prepare(long_checkpoint, destination_path=tmp_path / "a", sha256="0" * 64)
    assert not (tmp_path / "a" / "alpaca_data.json").exists()  # a bad download is not kept


def test_prepare_alpaca_network_error(monkeypatch, long_checkpoint, tmp_path):
    def offline(url, timeout=None):
        raise OSError("no route to host")

    monkeypatch.setattr(lit_gpt.prepare, "urlopen", offline)
    with pytest.raises(DataError, match="Could not download .*alpaca_data.json.*--data_file"):
        load_script("prepare_alpaca").prepare(long_checkpoint, destination_path=tmp_path / "a")


def test_prepare_dolly_field_mapping(long_checkpoint, tmp_path):
    records = [
        {"instruction": "Name a fruit.", "context": "", "response": "Apple.", "category": "open_qa"},
        {"instruction": "Summarize.", "context": "The fox jumps.", "response": "A fox jumps.", "category": "summarization"},
    ] * 5
    data = tmp_path / "dolly.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    load_script("prepare_dolly").prepare(long_checkpoint, destination_path=tmp_path / "d", data_file=data, val_split_fraction=0.2)
    train = load_prepared(tmp_path / "d" / "train.safetensors")
    tok = Tokenizer(long_checkpoint)
    texts = {tok.decode(train[i][0], skip_special=True) for i in range(len(train))}
    assert any("### Input:\nThe fox jumps." in t and t.endswith("A fox jumps.") for t in texts)


def test_prepare_json_custom_fields(long_checkpoint, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"q": f"Add {i} and {i}.", "a": str(2 * i)}) + "\n" for i in range(10)))
    script = load_script("prepare_json")
    script.prepare(long_checkpoint, data, destination_path=tmp_path / "o", instruction_field="q", output_field="a",
                   mask_prompt=False, val_split_fraction=0.0)
    train = load_prepared(tmp_path / "o" / "train.safetensors")
    assert len(train) == 10 and not train.mask_prompt
    assert torch.equal(train[0][0], train[0][1])  # mask_prompt=False: the prompt carries loss too
    with pytest.raises(DataError, match=r"mine.jsonl, line 1: missing the output field 'output'.*--output_field"):
        script.prepare(long_checkpoint, data, destination_path=tmp_path / "o2", instruction_field="q")


def test_prepare_json_nested_seed_tasks_schema(long_checkpoint, tmp_path):
    """The schema of Stanford Alpaca's seed_tasks.jsonl: {id, name, instruction, instances: [{input, output}]}."""
    tasks = [
        {"id": f"seed_task_{i}", "name": f"t{i}", "instruction": f"Task {i}.",
         "instances": [{"input": "", "output": f"Done {i}."}, {"input": f"x{i}", "output": f"y{i}"}],
         "is_classification": False}
        for i in range(5)
    ]
    data = tmp_path / "seed_tasks.jsonl"
    data.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    script = load_script("prepare_json")
    with pytest.raises(DataError, match=r"line 1: missing the output field 'output'.*--instances_field instances"):
        script.prepare(long_checkpoint, data, destination_path=tmp_path / "s")
    script.prepare(long_checkpoint, data, destination_path=tmp_path / "s", instances_field="instances")
    meta = json.loads((tmp_path / "s" / "metadata.json").read_text())
    assert meta["num_examples"] == 10 and meta["train"]["num_samples"] + meta["val"]["num_samples"] == 10


@pytest.mark.parametrize(
    "content, message",
    [
        ("[]", "the dataset is empty"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', r"record 1: missing the output field 'output'"),
        ('[{"instruction": "a", "output": "b"},\n {"instruction": }]', r"malformed JSON at line 2"),
    ],
)
def test_bad_input_in_process(long_checkpoint, tmp_path, content, message):
    data = tmp_path / "bad.json"
    data.write_text(content)
    with pytest.raises(DataError, match=message):
        load_script("prepare_alpaca").prepare(long_checkpoint, destination_path=tmp_path / "o", data_file=data)


def test_sample_longer_than_the_context(checkpoint_dir, tmp_path):
    """checkpoint_dir has block_size 128: a long prompt cannot fit and is named (or skipped on request)."""
    records = [{"instruction": "Say hi.", "output": "Hi."}] * 4 + [{"instruction": "word " * 300, "output": "ok"}]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records))
    script = load_script("prepare_alpaca")
    with pytest.raises(DataError, match=r"record 4 \(\d+ prompt tokens\).*block_size 128.*--skip_long_prompts"):
        script.prepare(checkpoint_dir, destination_path=tmp_path / "o", data_file=data)
    with pytest.warns(UserWarning, match="record 4"):
        script.prepare(checkpoint_dir, destination_path=tmp_path / "o", data_file=data, skip_long_prompts=True)
    meta = json.loads((tmp_path / "o" / "metadata.json").read_text())
    assert meta["skipped"] == 1 and meta["train"]["num_samples"] + meta["val"]["num_samples"] == 4


def test_unwritable_destination(long_checkpoint, tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(ALPACA))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match="Cannot write to .*a_file.*--destination_path"):
        load_script("prepare_alpaca").prepare(long_checkpoint, destination_path=tmp_path / "a_file" / "x", data_file=data)


# --- through the command line: clean messages, non-zero exit ---------------------------------------------
def test_cli_success_and_clean_errors(long_checkpoint, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Add {i}.", "response": f"{i}"}) + "\n" for i in range(6)))
    ok = run_script("prepare_json", "--checkpoint_dir", long_checkpoint, "--data_file", data, "--destination_path",
                    tmp_path / "o", "--instruction_field", "prompt", "--output_field", "response")
    assert ok.returncode == 0, ok.stderr
    assert "mask_prompt=True" in ok.stdout and (tmp_path / "o" / "train.safetensors").is_file()

    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n')
    bad = run_script("prepare_json", "--checkpoint_dir", long_checkpoint, "--data_file", data, "--destination_path",
                     tmp_path / "o2", "--instruction_field", "prompt", "--output_field", "response")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "d.jsonl: malformed JSON on line 2" in bad.stderr


def test_cli_checksum_mismatch_of_existing_download(long_checkpoint, tmp_path):
    """An alpaca_data.json already in the destination is checked against --sha256 (no network needed)."""
    dest = tmp_path / "alpaca"
    dest.mkdir()
    (dest / "alpaca_data.json").write_text(json.dumps(ALPACA))
    bad = run_script("prepare_alpaca", "--checkpoint_dir", long_checkpoint, "--destination_path", dest,
                     "--sha256", "ab" * 32)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "Checksum mismatch" in bad.stderr and "remove it to download again" in bad.stderr


def test_prepare_real_math_data(shared_data, long_checkpoint, tmp_path):
    """The 3,260 records of ../shared/data/math_data.json (Alpaca fields plus `answer`) with the tiny tokenizer."""
    script = load_script("prepare_alpaca")
    script.prepare(long_checkpoint, destination_path=tmp_path / "math", data_file=shared_data / "math_data.json")
    meta = json.loads((tmp_path / "math" / "metadata.json").read_text())
    assert meta["num_examples"] == 3260 and meta["skipped"] == 0
    assert (meta["train"]["num_samples"], meta["val"]["num_samples"]) == (3097, 163)
    train = load_prepared(tmp_path / "math" / "train.safetensors")
    ids, labels = train[0]
    text = Tokenizer(long_checkpoint).decode(ids[labels != IGNORE_INDEX], skip_special=True)
    assert "The answer is" in text


def test_bad_settings_fail_before_downloading(monkeypatch, long_checkpoint, tmp_path):
    urls = mock_download(monkeypatch, b"[]")
    script = load_script("prepare_alpaca")
    with pytest.raises(DataError, match="needs model_config.yaml and a tokenizer.*scripts/download.py"):
        script.prepare(tmp_path / "no_checkpoint", destination_path=tmp_path / "a")
    with pytest.raises(DataError, match="max_seq_length 4096 is out of range: the model's block_size is 2048"):
        script.prepare(long_checkpoint, destination_path=tmp_path / "a", max_seq_length=4096)
    with pytest.raises(DataError, match=r"val_split_fraction must be in \[0, 1\), got 1.5"):
        script.prepare(long_checkpoint, destination_path=tmp_path / "a", val_split_fraction=1.5)
    assert urls == []
