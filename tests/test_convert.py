"""Checkpoint conversion: config mapping, HF -> ours -> HF round trip, and clear errors on bad input.

Logit parity with transformers lives in test_model_parity.py; the tiny families are shared from there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from lit_gpt.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError  # noqa: E402
from lit_gpt.config import Config  # noqa: E402
from lit_gpt.convert import convert_hf_checkpoint as convert_hf  # noqa: E402
from lit_gpt.convert import convert_lit_checkpoint as convert_lit  # noqa: E402
from lit_gpt.convert import fuse_qkv, split_qkv  # noqa: E402
from lit_gpt.hf_config import config_from_hf, hf_config_from_config  # noqa: E402
from test_model_parity import FAMILIES, load_ours, load_script, make_hf_model, save_hf  # noqa: E402


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# --- config mapping --------------------------------------------------------------------------------------
# What each tiny family must become (fields that distinguish the families).
EXPECTED = {
    "gpt_neox_parallel": dict(parallel_residual=True, rotary_percentage=0.25, norm_class="LayerNorm", bias=True),
    "gpt_neox_sequential": dict(parallel_residual=False, rotary_percentage=0.5),
    "falcon_7b": dict(n_query_groups=1, shared_attention_norm=True, parallel_residual=True, bias=False,
                      tie_embeddings=True, intermediate_size=256),  # fmt: skip
    "falcon_40b": dict(n_query_groups=2, shared_attention_norm=False, parallel_residual=True, tie_embeddings=False),
    "llama2_mha": dict(n_query_groups=4, norm_class="RMSNorm", mlp_class="GatedMLP", activation="silu"),
    "llama2_gqa": dict(n_query_groups=2, rope_scaling=None),
    "llama3": dict(rope_base=500000.0, rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                         original_max_seq_len=32)),  # fmt: skip
    "mistral": dict(block_size=48, n_query_groups=2),  # capped at the sliding window
    "phi2": dict(rotary_percentage=0.4, lm_head_bias=True, shared_attention_norm=True, activation="gelu_tanh"),
    "gemma_mqa": dict(n_query_groups=1, norm_plus_one=True, scale_embeddings=True, tie_embeddings=True,
                      activation="gelu_tanh"),  # fmt: skip
    "gemma_mha_wide_heads": dict(n_embd=48, head_size=16, n_query_groups=4),
    "qwen2.5": dict(qkv_bias=True, bias=False, tie_embeddings=True, rope_base=1000000.0),
    "smollm2": dict(n_head=6, n_query_groups=2, tie_embeddings=True, rope_base=100000.0),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_from_hf(family):
    config_class, kwargs = FAMILIES[family]
    hf = getattr(transformers, config_class)(**kwargs).to_dict()
    hf["architectures"] = [config_class.replace("Config", "ForCausalLM")]
    config = Config.from_hf_config(hf, name=family)
    assert config.name == family
    for key, value in EXPECTED[family].items():
        assert getattr(config, key) == value, key
    # The inverse writes a config.json that maps back to the same Config.
    assert config_from_hf(Config, hf_config_from_config(config), name=family) == config


def test_legacy_config_keys():
    """Pre-transformers-5 config.json files keep RoPE settings at the top level."""
    llama31 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "intermediate_size": 14336, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
               "rope_theta": 500000.0, "hidden_act": "silu", "_name_or_path": "meta-llama/Llama-3.1-8B",
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}}  # fmt: skip
    c = Config.from_hf_config(llama31)
    assert (c.name, c.hf_repo, c.rope_base, c.n_query_groups) == ("Llama-3.1-8B", "meta-llama/Llama-3.1-8B", 5e5, 8)
    assert c.rope_scaling == dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)

    pythia = {"architectures": ["GPTNeoXForCausalLM"], "vocab_size": 50304, "hidden_size": 768,
              "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "rotary_pct": 0.25,
              "rotary_emb_base": 10000, "use_parallel_residual": True, "max_position_embeddings": 2048}  # fmt: skip
    c = Config.from_hf_config(pythia)
    assert (c.rotary_percentage, c.rope_n_elem, c.parallel_residual) == (0.25, 16, True)

    gemma = {"architectures": ["GemmaForCausalLM"], "vocab_size": 256000, "hidden_size": 3072, "head_dim": 256,
             "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
             "intermediate_size": 24576, "hidden_act": "gelu", "hidden_activation": None}  # fmt: skip
    c = Config.from_hf_config(gemma)
    assert (c.head_size, c.activation, c.tie_embeddings, c.block_size) == (256, "gelu_tanh", True, 8192)


def test_unsupported_architecture_and_settings():
    with pytest.raises(ValueError, match="Unsupported architecture.*Supported architectures: GPTNeoXForCausalLM"):
        Config.from_hf_config({"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    falcon = FAMILIES["falcon_7b"][1]
    hf = dict(transformers.FalconConfig(**falcon, alibi=True).to_dict(), architectures=["FalconForCausalLM"])
    with pytest.raises(ValueError, match="alibi"):
        Config.from_hf_config(hf)
    llama = dict(transformers.LlamaConfig(**FAMILIES["llama2_mha"][1]).to_dict(), architectures=["LlamaForCausalLM"])
    llama["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="RoPE type 'yarn' is not supported"):
        Config.from_hf_config(llama)


@pytest.mark.parametrize("n_head,n_groups", [(4, 4), (4, 1), (8, 2)])
def test_split_and_fuse_qkv_are_inverse(n_head, n_groups):
    D, C = 3, 5
    fused = torch.randn(n_groups * (n_head // n_groups + 2) * D, C)
    q, k, v = split_qkv(fused, n_head, n_groups, D)
    assert (q.shape, k.shape, v.shape) == ((n_head * D, C), (n_groups * D, C), (n_groups * D, C))
    assert torch.equal(fuse_qkv(q, k, v, n_head, n_groups, D), fused)
    # Group g's first query head sits right at the start of the group's block of rows.
    per_group = n_head // n_groups
    assert torch.equal(q[per_group * D : per_group * D + D], fused[(per_group + 2) * D : (per_group + 2) * D + D])


# --- round trip HF -> ours -> HF ---------------------------------------------------------------------------
@pytest.mark.parametrize("keep_hf_config", [True, False], ids=["original_config", "derived_config"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_bit_exact(family, keep_hf_config, tmp_path):
    hf_model = make_hf_model(family)
    hf_dir = save_hf(hf_model, tmp_path / "hf")
    convert_hf(hf_dir)
    if not keep_hf_config:  # convert back from model_config.yaml alone (e.g. a finetuned checkpoint)
        (hf_dir / "config.json").unlink()
    (hf_dir / "tokenizer.json").write_text("{}")  # stands in for a real tokenizer: it must be copied
    load_script("convert_lit_checkpoint").main(hf_dir, tmp_path / "back")  # the script's entry point
    out = tmp_path / "back"

    original, back = read_safetensors(hf_dir / "model.safetensors"), read_safetensors(out / "model.safetensors")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    assert (out / "tokenizer.json").read_text() == "{}"

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    if keep_hf_config:
        assert type(reloaded) is type(hf_model)
    idx = torch.randint(0, hf_model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.allclose(reloaded(idx).logits, hf_model(idx).logits, atol=1e-5, rtol=0)


# --- bad input -------------------------------------------------------------------------------------------
def test_missing_dir_config_or_weights(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_hf(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        convert_hf(tmp_path)
    make_hf_model("llama2_mha").config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="No Hugging Face weights"):
        convert_hf(tmp_path)
    with pytest.raises(CheckpointError, match="is missing lit_model.safetensors"):
        convert_lit(tmp_path, tmp_path / "out")


def test_unsupported_architecture_in_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    with pytest.raises(ValueError, match="Supported architectures"):
        convert_hf(tmp_path)


def test_truncated_safetensors_names_the_file(tmp_path):
    save_hf(make_hf_model("llama2_mha"), tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        convert_hf(tmp_path)
    assert not (tmp_path / WEIGHTS_FILE).exists() and not (tmp_path / CONFIG_FILE).exists()


def test_missing_shard_is_named(tmp_path):
    make_hf_model("llama2_mha").save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        convert_hf(tmp_path)


class Payload:  # an arbitrary object a malicious pickle could carry
    def __init__(self):
        self.x = 1


def test_pickle_with_arbitrary_object_is_rejected(tmp_path):
    make_hf_model("llama2_mha").config.save_pretrained(tmp_path)
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "evil": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*Only plain tensors are loaded"):
        convert_hf(tmp_path)


def test_unknown_tensor_name_is_reported(tmp_path):
    hf_model = make_hf_model("llama2_mha")
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    hf_model.config.save_pretrained(tmp_path)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="q_norm"):
        convert_hf(tmp_path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    # config.json disagrees with the weights: caught at conversion
    hf_model = make_hf_model("llama2_gqa")
    save_hf(hf_model, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "intermediate_size": 64}))
    with pytest.raises(CheckpointError, match="do not fit the model config.*mlp"):
        convert_hf(tmp_path)
    # model_config.yaml edited after conversion: caught when loading
    (tmp_path / "config.json").write_text(json.dumps(hf))
    convert_hf(tmp_path)
    values = yaml.safe_load((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump({**values, "n_embd": 32}))
    with pytest.raises(CheckpointError, match="do not fit the model config.*shape mismatches"):
        load_ours(tmp_path)


@pytest.mark.slow  # two subprocesses: ~10 s of interpreter start-up on 2 cores
def test_cli_runs_from_repo_root(tmp_path):
    """`python scripts/convert_hf_checkpoint.py --checkpoint_dir DIR` works (the package is pip-installed)."""
    import subprocess
    import sys

    save_hf(make_hf_model("phi2"), tmp_path / "hf")
    root = Path(__file__).resolve().parents[1]
    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "o")
    for cmd in (
        ["scripts/convert_hf_checkpoint.py", "--checkpoint_dir", hf_dir],
        ["scripts/convert_lit_checkpoint.py", "--checkpoint_dir", hf_dir, "--output_dir", out],
    ):
        subprocess.run([sys.executable, *cmd], cwd=root, check=True, capture_output=True)
    assert (tmp_path / "o" / "model.safetensors").is_file()
    shutil.rmtree(tmp_path / "o")
