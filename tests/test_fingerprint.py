"""The base fingerprint: a hash of the whole weights file, cached beside it, compatible with legacy values.

`base_fingerprint` is what a finetune run records as the base it was trained on; `load_finetuned` and `--resume`
compare it with the base they are given. These tests change a base where the legacy fingerprint (size plus first
and last MiB) could not see it, check that the second call costs no read, and that runs recorded with the legacy
value still load and resume on their base (and only on it).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from lightning_fabric import Fabric

from lit_gpt import checkpoint, lora, outputs
from lit_gpt.checkpoint import (
    FINGERPRINT_CACHE_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    base_fingerprint,
    file_fingerprint,
    load_weights_file,
    safetensors_header,
    same_base,
    save_safetensors,
)
from lit_gpt.config import Config
from lit_gpt.data import DataPosition
from lit_gpt.loading import load_finetuned
from lit_gpt.model import GPT

from conftest import make_checkpoint_dir

MiB = 1 << 20


def whole_file_sha256(path: Path) -> str:
    """The documented value, computed independently: "sha256:" + the first 32 hex digits of the whole file's hash."""
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:32]


def lora_output_dir(base: Path, out: Path, recorded_fingerprint: str) -> Path:
    """A LoRA output directory as a run on `base` would save it (untrained weights), recording `recorded_fingerprint`."""
    settings = lora.LoRASettings(r=2)
    model = lora.apply(GPT(Config.from_checkpoint(base)), settings)
    hparams = outputs.run_hyperparameters("lora", settings, checkpoint_dir=base)
    hparams["base_fingerprint"] = recorded_fingerprint
    outputs.save_output_dir(Fabric(accelerator="cpu", devices=1), out, lora.state_dict_to_save(model),
                            lora.WEIGHTS_FILE, hparams, base)
    return out


@pytest.fixture
def count_opens(monkeypatch):
    """The resolved paths `open` is called with, in order (the weights file is read only through `open`)."""
    opened: list[Path] = []
    real_open = builtins.open

    def recording_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            opened.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    return opened


# --- what is hashed -----------------------------------------------------------------------------------------
def test_a_base_changed_in_the_middle_gets_another_fingerprint_and_its_lora_weights_are_refused(tmp_path):
    base = make_checkpoint_dir(tmp_path / "base", n_embd=256, intermediate_size=1024)
    weights = base / WEIGHTS_FILE
    size = weights.stat().st_size
    assert size > 3 * MiB, "the test needs bytes outside the first and last MiB"
    before, legacy_before = base_fingerprint(base), file_fingerprint(weights)
    out = lora_output_dir(base, tmp_path / "final", before)
    load_finetuned(out)  # the base it was trained on

    # Change one value of a tensor that lies wholly outside the first and last MiB: same size, same header.
    header = safetensors_header(weights)
    name = next(n for n, info in header.items() if info["start"] > 1.5 * MiB
                and info["start"] + info["data_offsets"][1] - info["data_offsets"][0] < size - 1.5 * MiB)
    state = load_weights_file(weights)
    state[name].view(-1)[0] += 1.0
    save_safetensors(state, weights)
    assert weights.stat().st_size == size
    assert file_fingerprint(weights) == legacy_before  # the legacy fingerprint cannot see this change

    after = base_fingerprint(base)
    assert after != before
    assert after == whole_file_sha256(weights)
    with pytest.raises(CheckpointError, match=rf"trained on another base checkpoint .*\(fingerprint {before} vs {after}\)"):
        load_finetuned(out)


def test_the_fingerprint_is_the_documented_whole_file_hash_with_its_scheme_prefix(checkpoint_dir):
    value = base_fingerprint(checkpoint_dir)
    assert value == whole_file_sha256(checkpoint_dir / WEIGHTS_FILE)
    assert value.startswith("sha256:") and len(value) == len("sha256:") + 32
    assert not checkpoint.is_legacy_fingerprint(value)
    assert checkpoint.is_legacy_fingerprint(file_fingerprint(checkpoint_dir / WEIGHTS_FILE))


# --- the cache ----------------------------------------------------------------------------------------------
def test_the_second_call_reads_nothing_and_a_touched_or_resized_file_is_hashed_again(fresh_checkpoint_dir,
                                                                                      count_opens):
    weights = (fresh_checkpoint_dir / WEIGHTS_FILE).resolve()
    first = base_fingerprint(fresh_checkpoint_dir)
    assert count_opens.count(weights) == 1
    entry = json.loads((fresh_checkpoint_dir / FINGERPRINT_CACHE_FILE).read_text())
    stat = weights.stat()
    assert entry == {"path": str(weights), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "fingerprint": first}

    assert base_fingerprint(fresh_checkpoint_dir) == first
    assert count_opens.count(weights) == 1, "the second call read the weights file again"

    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: same bytes, another mtime
    assert base_fingerprint(fresh_checkpoint_dir) == first
    assert count_opens.count(weights) == 2

    with open(weights, "ab") as f:  # another size (mtime kept, so only the size tells)
        f.write(b"\0" * 8)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    count_opens.clear()
    resized = base_fingerprint(fresh_checkpoint_dir)
    assert count_opens.count(weights) == 1
    assert resized != first and resized == whole_file_sha256(weights)


def test_a_copied_checkpoint_with_its_cache_is_hashed_again_under_its_own_path(fresh_checkpoint_dir, tmp_path,
                                                                                count_opens):
    first = base_fingerprint(fresh_checkpoint_dir)
    copy = Path(shutil.copytree(fresh_checkpoint_dir, tmp_path / "copy"))  # copy2 keeps size and mtime_ns
    assert (copy / FINGERPRINT_CACHE_FILE).is_file()
    count_opens.clear()
    assert base_fingerprint(copy) == first
    assert count_opens.count((copy / WEIGHTS_FILE).resolve()) == 1


@pytest.mark.parametrize("content", ["{not json", "[]", '{"fingerprint": 3}', "", "\xff\xfe binary"])
def test_a_corrupt_cache_file_is_ignored_and_replaced(fresh_checkpoint_dir, content):
    expected = whole_file_sha256(fresh_checkpoint_dir / WEIGHTS_FILE)
    cache = fresh_checkpoint_dir / FINGERPRINT_CACHE_FILE
    cache.write_text(content, encoding="latin-1")
    assert base_fingerprint(fresh_checkpoint_dir) == expected
    assert json.loads(cache.read_text())["fingerprint"] == expected


def test_a_stale_cache_entry_is_not_believed(fresh_checkpoint_dir):
    weights = fresh_checkpoint_dir / WEIGHTS_FILE
    stat = weights.stat()
    stale = {"path": str(weights.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns - 1,
             "fingerprint": "sha256:" + "0" * 32}
    (fresh_checkpoint_dir / FINGERPRINT_CACHE_FILE).write_text(json.dumps(stale))
    assert base_fingerprint(fresh_checkpoint_dir) == whole_file_sha256(weights)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to a read-only directory")
def test_a_read_only_checkpoint_directory_is_fingerprinted_without_a_cache(fresh_checkpoint_dir):
    expected = whole_file_sha256(fresh_checkpoint_dir / WEIGHTS_FILE)
    os.chmod(fresh_checkpoint_dir, 0o555)
    try:
        assert base_fingerprint(fresh_checkpoint_dir) == expected
        assert base_fingerprint(fresh_checkpoint_dir) == expected
        assert not (fresh_checkpoint_dir / FINGERPRINT_CACHE_FILE).exists()
    finally:
        os.chmod(fresh_checkpoint_dir, 0o755)


def test_a_cache_that_cannot_be_written_is_skipped_silently(fresh_checkpoint_dir, monkeypatch):
    """What a read-only or full disk does, also where the tests run as root (for whom chmod does not protect)."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", refuse)
    expected = whole_file_sha256(fresh_checkpoint_dir / WEIGHTS_FILE)
    assert base_fingerprint(fresh_checkpoint_dir) == expected
    assert not (fresh_checkpoint_dir / FINGERPRINT_CACHE_FILE).exists()
    assert not [p for p in fresh_checkpoint_dir.iterdir() if p.name.endswith(".tmp")]


def test_hashing_a_large_file_says_so_once_and_a_small_one_says_nothing(fresh_checkpoint_dir, monkeypatch, capsys):
    capsys.readouterr()
    base_fingerprint(fresh_checkpoint_dir)
    assert capsys.readouterr().err == ""
    (fresh_checkpoint_dir / FINGERPRINT_CACHE_FILE).unlink()
    monkeypatch.setattr(checkpoint, "ANNOUNCE_ABOVE", 1000)  # pretend the tiny file is a big one
    base_fingerprint(fresh_checkpoint_dir)
    err = capsys.readouterr().err
    assert err.startswith(f"Fingerprinting {fresh_checkpoint_dir / WEIGHTS_FILE} (") and "once; cached" in err
    assert err.count("\n") == 1
    base_fingerprint(fresh_checkpoint_dir)  # cached: silent
    assert capsys.readouterr().err == ""


# --- runs recorded with the legacy fingerprint ----------------------------------------------------------------
def test_lora_weights_recorded_with_a_legacy_fingerprint_load_on_their_base_only(checkpoint_dir, tmp_path):
    legacy = file_fingerprint(checkpoint_dir / WEIGHTS_FILE)
    assert base_fingerprint(checkpoint_dir) != legacy  # so what follows goes through the legacy comparison
    out = lora_output_dir(checkpoint_dir, tmp_path / "final", legacy)
    assert same_base(legacy, checkpoint_dir)
    load_finetuned(out)

    other = make_checkpoint_dir(tmp_path / "other", seed=1)
    other_legacy = file_fingerprint(other / WEIGHTS_FILE)
    assert not same_base(legacy, other)
    assert not same_base("blake3:" + "0" * 32, checkpoint_dir)  # an unknown scheme is another base
    with pytest.raises(CheckpointError, match=rf"another base checkpoint .*\(fingerprint {legacy} vs {other_legacy}\)"):
        load_finetuned(out, checkpoint_dir=other)


def resume_from(out_dir: Path, saved_fingerprint: str, base: Path) -> dict:
    """Save a resume state whose run recorded `saved_fingerprint`, then resume it on `base` (as start_run would
    describe the run now); returns the resuming run's hyperparameters."""
    fabric = Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    hparams = outputs.run_hyperparameters("lora", None, checkpoint_dir=str(base), train={"learning_rate": 1e-3})
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs.save_resume_state(fabric, out_dir, model, optimizer, 5, DataPosition(0, 7),
                              {**hparams, "base_fingerprint": saved_fingerprint})
    current = {**hparams, "base_fingerprint": base_fingerprint(base)}
    step, position, changes = outputs.load_resume_state(fabric, out_dir, model, optimizer, current)
    assert (step, position) == (5, DataPosition(0, 7))
    assert changes == {}
    return current


def test_a_run_started_with_a_legacy_fingerprint_resumes_on_its_base(checkpoint_dir, tmp_path):
    legacy = file_fingerprint(checkpoint_dir / WEIGHTS_FILE)
    assert base_fingerprint(checkpoint_dir) != legacy
    hparams = resume_from(tmp_path / "out", legacy, checkpoint_dir)
    assert hparams[outputs.HISTORY_KEY] == []  # no change recorded: it is the same base


def test_a_run_started_with_another_base_s_legacy_fingerprint_is_refused(checkpoint_dir, tmp_path):
    other = make_checkpoint_dir(tmp_path / "other", seed=1)
    other_legacy = file_fingerprint(other / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=rf"base_fingerprint: '{other_legacy}' in the saved run, 'sha256:"):
        resume_from(tmp_path / "out", other_legacy, checkpoint_dir)
