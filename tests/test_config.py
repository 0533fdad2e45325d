"""The named-config table and the Config class: every entry builds, sizes match the published checkpoints.

Everything runs on the meta device (no memory, no network), so even the 70B entries are cheap.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch
import yaml

from lit_gpt.config import Config, configs
from lit_gpt.model import GPT

NAMES = [c["name"] for c in configs]


@functools.lru_cache(maxsize=None)
def n_params(name: str) -> int:
    """Number of parameters of `GPT(Config.from_name(name))`, a tied embedding counted once.

    Builds the model on the meta device, so no memory is allocated: a 70B config is counted in a blink.
    Equal to transformers' `model.num_parameters()` for the same checkpoint. (The hub's "params" badge
    counts the tensors stored in the files, so it is larger where a file stores a tied lm_head too.)
    """
    with torch.device("meta"):
        model = GPT(Config.from_name(name))
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once


# --- the table ---------------------------------------------------------------------------------------------
def test_names_are_unique():
    duplicates = [name for name, n in Counter(NAMES).items() if n > 1]
    assert not duplicates


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_builds_a_config_and_a_model(name):
    config = Config.from_name(name)
    assert config.name == name
    org, _, repo_name = config.hf_repo.partition("/")
    assert org and repo_name == name, f"hf_repo {config.hf_repo!r} should be '<org>/{name}'"
    assert config.vocab_size <= config.padded_vocab_size
    assert config.rope_n_elem > 0
    with torch.device("meta"):
        model = GPT(config)
    assert len(model.blocks) == config.n_layer


def test_entries_only_use_config_fields():
    # Config(**entry) would raise on a typo anyway; this names the offending entry.
    from dataclasses import fields

    known = {f.name for f in fields(Config)}
    for entry in configs:
        assert set(entry) <= known, (entry["name"], set(entry) - known)


def test_partial_rotary():
    assert Config.from_name("pythia-70m").rope_n_elem == 16  # 25% of head_size 64
    assert Config.from_name("phi-2").rope_n_elem == 32  # 40% of head_size 80
    assert Config.from_name("RedPajama-INCITE-7B-Base").rope_n_elem == 128  # NeoX layout, but full rotary


def test_size_variants_share_an_architecture():
    def arch(name):
        values = vars(Config.from_name(name)).copy()
        del values["name"], values["hf_repo"]
        return values

    assert arch("pythia-1b") == arch("pythia-1b-deduped")
    assert arch("Llama-2-7b-hf") == arch("Llama-2-7b-chat-hf")
    assert arch("gemma-7b") == arch("gemma-7b-it")
    assert arch("falcon-40b") == arch("falcon-40b-instruct")
    # The Qwen2.5 instruct configs cap positions at 32768 where the base 7B says 131072; nothing else differs.
    assert {**arch("Qwen2.5-7B"), "block_size": 32768} == arch("Qwen2.5-7B-Instruct")


# --- parameter counts --------------------------------------------------------------------------------------
# `model.num_parameters()` of the transformers model (a tied embedding counts once), the figure the model
# cards quote. Each follows from the config.json alone, e.g. Llama-2-7b:
# 2 * 32000 * 4096 (embedding, untied lm_head) + 32 * (4 * 4096^2 attention + 3 * 4096 * 11008 MLP
# + 2 * 4096 norms) + 4096 final norm = 6,738,415,616.
PUBLISHED_SIZES = {
    "pythia-70m": 70_426_624,
    "pythia-1b": 1_011_781_632,  # with the checkpoint's 50304 embedding rows, not the 50254 tokens
    "SmolLM2-135M": 134_515_008,  # tied embeddings
    "Llama-2-7b-hf": 6_738_415_616,
    "Llama-2-13b-hf": 13_015_864_320,
    "Llama-2-70b-hf": 68_976_648_192,
    "Meta-Llama-3-8B": 8_030_261_248,
    "Llama-3.2-1B": 1_235_814_400,  # tied embeddings
    "Mistral-7B-v0.1": 7_241_732_096,
    "phi-2": 2_779_683_840,
    "gemma-2b": 2_506_172_416,
    "gemma-7b": 8_537_680_896,
    "Qwen2.5-0.5B": 494_032_768,  # tied embeddings
    "falcon-7b": 6_921_720_704,  # tied embeddings (transformers' default, config.json does not untie)
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_parameter_count_matches_the_published_checkpoint(name):
    assert n_params(name) == PUBLISHED_SIZES[name]


# --- cross-check with transformers -------------------------------------------------------------------------
# The Hugging Face config.json of a checkpoint (the keys that shape the weights), built into the transformers
# model on the meta device. The reference then owes nothing to our model code.
HF_CONFIGS = {
    "pythia-70m": dict(
        model_type="gpt_neox", vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
        intermediate_size=2048, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
    ),
    "pythia-12b": dict(
        model_type="gpt_neox", vocab_size=50688, hidden_size=5120, num_hidden_layers=36, num_attention_heads=40,
        intermediate_size=20480, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
    ),
    "stablelm-base-alpha-7b": dict(
        model_type="gpt_neox", vocab_size=50432, hidden_size=6144, num_hidden_layers=16, num_attention_heads=48,
        intermediate_size=24576, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
    ),
    "RedPajama-INCITE-Base-3B-v1": dict(
        model_type="gpt_neox", vocab_size=50432, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
        intermediate_size=10240, rotary_pct=1.0, use_parallel_residual=False, tie_word_embeddings=False,
    ),
    "falcon-7b": dict(
        model_type="falcon", vocab_size=65024, hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
        multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False,
    ),
    "falcon-40b": dict(
        model_type="falcon", vocab_size=65024, hidden_size=8192, num_hidden_layers=60, num_attention_heads=128,
        num_kv_heads=8, parallel_attn=True, new_decoder_architecture=True, bias=False,
    ),
    "Llama-2-7b-chat-hf": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
    ),
    "Llama-3.1-8B": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
    ),
    "Llama-3.2-3B": dict(
        model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
    ),
    "Mistral-7B-Instruct-v0.2": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
    ),
    "phi-2": dict(
        model_type="phi", vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
        num_attention_heads=32, partial_rotary_factor=0.4, tie_word_embeddings=False,
    ),
    "gemma-2b": dict(
        model_type="gemma", vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
        num_attention_heads=8, num_key_value_heads=1, head_dim=256,
    ),
    "gemma-7b": dict(
        model_type="gemma", vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=16, head_dim=256,
    ),
    "Qwen2.5-1.5B": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "Qwen2.5-7B": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
    ),
    "SmolLM2-360M": dict(
        model_type="llama", vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
        num_attention_heads=15, num_key_value_heads=5, tie_word_embeddings=True,
    ),
}  # fmt: skip
# These keep query, key and value as separate Linear layers, as we do, so every weight shape must match too
# (GPT-NeoX and Falcon fuse them into one matrix; for those only the total is compared).
SEPARATE_QKV = {"llama", "mistral", "phi", "gemma", "qwen2"}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_parameters_match_the_transformers_model(name):
    transformers = pytest.importorskip("transformers")
    hf = dict(HF_CONFIGS[name])
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
        ours = GPT(Config.from_name(name))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf_model.parameters())
    if hf_config.model_type in SEPARATE_QKV:
        # A multiset of shapes: torch Linear stores (out, in) in both models.
        assert Counter(tuple(p.shape) for p in ours.parameters()) == Counter(
            tuple(p.shape) for p in hf_model.parameters()
        )


# --- lookup and validation ---------------------------------------------------------------------------------
def test_from_name_unknown_suggests_close_names():
    with pytest.raises(ValueError, match="Unknown model name 'Llama-2-7b'") as excinfo:
        Config.from_name("Llama-2-7b")
    assert "Llama-2-7b-hf" in str(excinfo.value)


def test_from_name_overrides():
    config = Config.from_name("pythia-70m", n_layer=2, block_size=64)
    assert (config.n_layer, config.block_size, config.n_embd) == (2, 64, 512)


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(n_embd=64, n_head=6), "n_embd=64 is not divisible by n_head=6"),
        (dict(n_embd=64, n_head=8, n_query_groups=3), "n_head=8 must be a multiple of n_query_groups=3"),
        (dict(rotary_percentage=0.0), "rotary_percentage=0.0"),
        (dict(shared_attention_norm=True, parallel_residual=False), "shared_attention_norm needs parallel_residual"),
        (dict(norm_plus_one=True, norm_class="LayerNorm"), "norm_plus_one applies only to RMSNorm"),
        (dict(vocab_size=100, padded_vocab_size=64), "padded_vocab_size=64"),
    ],
)
def test_invalid_configs_explain_themselves(values, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        Config(name="broken", **values)
    assert "'broken'" in str(excinfo.value)


def test_head_size_may_differ_from_n_embd_over_n_head():
    config = Config.from_name("gemma-7b")
    assert config.head_size * config.n_head == 4096 != config.n_embd


# --- model_config.yaml -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Llama-3.1-8B-Instruct", "gemma-7b", "Qwen2.5-0.5B", "phi-2"])
def test_file_round_trip(tmp_path, name):
    config = Config.from_name(name)
    path = tmp_path / "model_config.yaml"
    config.to_file(path)
    loaded = Config.from_file(path)
    assert loaded == config
    assert Config.from_checkpoint(tmp_path) == config


def test_from_file_rejects_unknown_keys(tmp_path):
    path = tmp_path / "model_config.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "n_layer": 2, "n_layers": 3}))
    with pytest.raises(ValueError, match="unknown config keys") as excinfo:
        Config.from_file(path)
    assert str(path) in str(excinfo.value)
    assert "n_layers" in str(excinfo.value)


def test_from_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_config.yaml"):
        Config.from_file(tmp_path / "model_config.yaml")
