"""scripts/download.py with the hub client mocked: what is fetched, the conversion, and hub failures explained."""

from __future__ import annotations

import fnmatch
import importlib.util
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def download():
    """scripts/download.py as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location("download_script", ROOT / "scripts" / "download.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_hub(repo_files: dict[str, bytes | Path]):
    """A stand-in for snapshot_download that copies the repo files matching allow_patterns into local_dir."""
    calls = []

    def snapshot_download(repo_id, *, local_dir, allow_patterns, token=None, **kwargs):
        calls.append(dict(repo_id=repo_id, allow_patterns=list(allow_patterns), token=token))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for name, content in repo_files.items():
            if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                if isinstance(content, Path):
                    shutil.copy(content, Path(local_dir) / name)
                else:
                    (Path(local_dir) / name).write_bytes(content)
        return str(local_dir)

    return snapshot_download, calls


def test_downloads_config_tokenizer_and_safetensors_only_then_converts(download, tmp_path):
    repo = {name: b"x" for name in [
        "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "pytorch_model.bin", "consolidated.safetensors", "README.md", "onnx/model.onnx", "training_args.bin",
    ]}
    snapshot_download, calls = fake_hub(repo)
    out = tmp_path / "ckpt"
    converted = mock.Mock(return_value=mock.Mock(name="config"))
    with mock.patch.object(download, "snapshot_download", snapshot_download), \
            mock.patch.object(download, "convert_hf_checkpoint", converted):
        download.main(repo_id="org/model", checkpoint_dir=out, access_token="hf_secret", dtype="bfloat16")
    assert len(calls) == 1
    assert calls[0]["repo_id"] == "org/model" and calls[0]["token"] == "hf_secret"
    assert {"config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= set(calls[0]["allow_patterns"])
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
    ]
    converted.assert_called_once_with(out, dtype=torch.bfloat16)


def test_falls_back_to_bin_weights_when_the_repo_has_no_safetensors(download, tmp_path, capsys):
    repo = {name: b"x" for name in ["config.json", "tokenizer.model", "pytorch_model.bin", "README.md"]}
    snapshot_download, calls = fake_hub(repo)
    with mock.patch.object(download, "snapshot_download", snapshot_download), \
            mock.patch.object(download, "convert_hf_checkpoint") as converted:
        download.main(repo_id="org/old-model", checkpoint_dir=tmp_path)
    assert len(calls) == 2
    assert not any(p.endswith(".bin") for p in calls[0]["allow_patterns"])
    assert "pytorch_model.bin" in calls[1]["allow_patterns"]
    assert (tmp_path / "pytorch_model.bin").is_file()
    assert "no safetensors weights" in capsys.readouterr().err
    converted.assert_called_once()


def test_default_dir_is_checkpoints_org_name(download, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snapshot_download, _ = fake_hub({"config.json": b"{}", "model.safetensors": b"x"})
    with mock.patch.object(download, "snapshot_download", snapshot_download), \
            mock.patch.object(download, "convert_hf_checkpoint") as converted:
        download.main(repo_id="HuggingFaceTB/SmolLM2-135M")
    converted.assert_called_once_with(Path("checkpoints/HuggingFaceTB/SmolLM2-135M"), dtype=None)


def test_a_repo_without_convertible_weights_says_so(download, tmp_path):
    snapshot_download, _ = fake_hub({"config.json": b"{}", "model.gguf": b"x"})
    with mock.patch.object(download, "snapshot_download", snapshot_download), \
            pytest.raises(ValueError, match="no transformers weights.*GGUF"):
        download.main(repo_id="org/gguf-only", checkpoint_dir=tmp_path)


def test_download_and_real_conversion_give_a_loadable_checkpoint(download, checkpoint_dir, tmp_path):
    """End to end without the network: the 'hub' serves an HF copy of the tiny checkpoint."""
    from lit_gpt.checkpoint import WEIGHTS_FILE, load_weights_file
    from lit_gpt.convert import convert_lit_checkpoint
    from lit_gpt.loading import load_base_model

    hf_dir = convert_lit_checkpoint(checkpoint_dir, tmp_path / "hf")
    snapshot_download, _ = fake_hub({p.name: p for p in Path(hf_dir).iterdir()})
    out = tmp_path / "checkpoints" / "org" / "tiny"
    with mock.patch.object(download, "snapshot_download", snapshot_download):
        download.main(repo_id="org/tiny", checkpoint_dir=out)
    model, _ = load_base_model(out)
    original = load_weights_file(checkpoint_dir / WEIGHTS_FILE)
    for name, tensor in original.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def _http_error(cls, status: int):
    return cls(f"{status} Client Error", response=mock.Mock(status_code=status, headers={}))


@pytest.mark.parametrize(
    "error, token, expected",
    [
        (_http_error(GatedRepoError, 403), None, ["gated model", "accept the licence", "--access_token", "HF_TOKEN",
                                                  "https://huggingface.co/meta-llama/Llama-3.2-1B"]),
        (_http_error(GatedRepoError, 403), "hf_x", ["gated model", "licence request may still be pending"]),
        (_http_error(RepositoryNotFoundError, 404), None, ["was not found", "Check the spelling", "--access_token"]),
        (LocalEntryNotFoundError("Cannot find the requested files: check your internet connection"), None,
         ["hub is unreachable", "convert_gguf_checkpoint.py", "checkpoints/SmolLM2-135M-Instruct"]),
        (ConnectionError("[Errno -2] Name or service not known"), None, ["hub is unreachable"]),
    ],
    ids=["gated", "gated-with-token", "not-found", "offline", "connection-error"],
)
def test_hub_failures_become_one_paragraph_that_says_what_to_do(download, tmp_path, error, token, expected):
    with mock.patch.object(download, "snapshot_download", side_effect=error), \
            mock.patch.object(download, "convert_hf_checkpoint") as converted, \
            pytest.raises(ValueError) as raised:
        download.main(repo_id="meta-llama/Llama-3.2-1B", checkpoint_dir=tmp_path, access_token=token)
    message = str(raised.value)
    assert "\n" not in message and raised.value.__cause__ is None
    for text in expected:
        assert text in message
    converted.assert_not_called()


def test_unknown_errors_are_not_disguised(download, tmp_path):
    with mock.patch.object(download, "snapshot_download", side_effect=KeyError("bug")), pytest.raises(KeyError):
        download.main(repo_id="org/name", checkpoint_dir=tmp_path)


def test_without_repo_id_lists_the_supported_repos(download, capsys):
    download.main()
    out = capsys.readouterr().out
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in out and "EleutherAI/pythia-70m" in out


def test_the_script_exits_with_the_message_and_no_traceback(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "scripts/download.py", "--repo_id", "not-a-repo-id"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--repo_id must look like 'org/name'" in result.stderr
