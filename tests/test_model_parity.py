"""Our GPT against Hugging Face transformers, one tiny random model per family.

For every family: build a tiny config with transformers' own config class, random weights (norm weights and
biases perturbed too, so they are really compared), `save_pretrained`, run our conversion script's function,
then compare
  * logits of a full forward pass (fp32, max abs diff <= 1e-5), and
  * 20 greedy decoding steps with our KV cache against `generate(do_sample=False)`.
The HF side is built from transformers only, never from our code. No network.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lit_gpt.checkpoint import WEIGHTS_FILE, load_into_model, load_weights_file  # noqa: E402
from lit_gpt.config import Config  # noqa: E402
from lit_gpt.convert import convert_hf_checkpoint as convert_hf  # noqa: E402
from lit_gpt.model import GPT  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT_LEN, NEW_TOKENS = 8, 20


def load_script(name: str):
    """Import scripts/<name>.py as a module (scripts are leaves, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Tiny config per family, in the HF config class's own terms. Comments name the real checkpoint mimicked.
_llama = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, rms_norm_eps=1e-5)  # fmt: skip
FAMILIES = {
    # Pythia / StableLM-alpha: parallel residual, partial rotary (rotary_pct)
    "gpt_neox_parallel": ("GPTNeoXConfig", dict(vocab_size=160, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=True,
        max_position_embeddings=128)),  # fmt: skip
    # RedPajama-INCITE: sequential residual, partial rotary
    "gpt_neox_sequential": ("GPTNeoXConfig", dict(vocab_size=160, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=False,
        max_position_embeddings=128)),  # fmt: skip
    # Falcon-7B: multi-query, one shared norm, parallel, no biases, tied embeddings
    "falcon_7b": ("FalconConfig", dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        multi_query=True, new_decoder_architecture=False, parallel_attn=True, bias=False)),  # fmt: skip
    # Falcon-40B: new decoder architecture, grouped kv heads, two norms per block
    "falcon_40b": ("FalconConfig", dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
        num_kv_heads=2, new_decoder_architecture=True, parallel_attn=True, bias=False,
        tie_word_embeddings=False)),  # fmt: skip
    "llama2_mha": ("LlamaConfig", dict(_llama, num_key_value_heads=4)),
    "llama2_gqa": ("LlamaConfig", dict(_llama, num_key_value_heads=2)),
    # Llama 3.1: GQA + llama3 rope scaling (original context 32, so all three frequency bands occur)
    "llama3": ("LlamaConfig", dict(_llama, num_key_value_heads=2, rope_parameters=dict(rope_type="llama3",
        rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),  # fmt: skip
    # Mistral-7B-v0.1: GQA + sliding window (block_size becomes the window: exact within it)
    "mistral": ("MistralConfig", dict(_llama, num_key_value_heads=2, sliding_window=48, head_dim=16)),
    # Phi-2: parallel, shared LayerNorm, partial rotary 0.4, biases everywhere incl. lm_head
    "phi2": ("PhiConfig", dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, partial_rotary_factor=0.4, max_position_embeddings=128)),  # fmt: skip
    # Gemma-2B: multi-query, GeGLU, (1 + w) RMSNorm, scaled embeddings, tied
    "gemma_mqa": ("GemmaConfig", dict(_llama, num_key_value_heads=1, head_dim=16)),
    # Gemma-7B: multi-head with head_dim != hidden_size / heads (48 / 4 = 12, head_dim 16)
    "gemma_mha_wide_heads": ("GemmaConfig", dict(_llama, hidden_size=48, num_key_value_heads=4, head_dim=16)),
    # Qwen2.5-0.5B: qkv bias only, GQA, tied embeddings
    "qwen2.5": ("Qwen2Config", dict(_llama, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),  # fmt: skip
    # SmolLM2-135M: Llama with tied embeddings, 3 query heads per kv head
    "smollm2": ("LlamaConfig", dict(_llama, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
        tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=100000.0))),  # fmt: skip
}


def make_hf_model(family: str, seed: int = 0):
    """A tiny random transformers model of `family`, fp32, eager attention, every parameter perturbed."""
    config_class, kwargs = FAMILIES[family]
    hf_config = getattr(transformers, config_class)(initializer_range=0.1, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1/0 and biases at 0: move them so they are checked
            p.add_(torch.randn_like(p) * 0.1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def save_hf(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def load_ours(checkpoint_dir: Path) -> GPT:
    config = Config.from_checkpoint(checkpoint_dir)
    model = GPT(config)
    load_into_model(model, load_weights_file(checkpoint_dir / WEIGHTS_FILE), checkpoint_dir / WEIGHTS_FILE)
    return model.eval()


@torch.no_grad()
def greedy_ours(model: GPT, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with our KV cache: prefill the prompt, then one token per step.

    Returns the new tokens (B, steps) and the logits each was chosen from (B, steps, V).
    """
    B, T = prompt.shape
    model.set_kv_cache(B, max_seq_length=T + steps)
    step_logits = [model(prompt, input_pos=torch.arange(T))[:, -1]]
    tokens = [step_logits[-1].argmax(-1, keepdim=True)]
    for pos in range(T, T + steps - 1):
        step_logits.append(model(tokens[-1], input_pos=torch.tensor([pos]))[:, -1])
        tokens.append(step_logits[-1].argmax(-1, keepdim=True))
    model.clear_kv_cache()
    return torch.cat(tokens, dim=1), torch.stack(step_logits, dim=1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_with_transformers(family, tmp_path, record_property):
    hf_model = make_hf_model(family)
    convert_hf(save_hf(hf_model, tmp_path))
    ours = load_ours(tmp_path)

    torch.manual_seed(1)
    vocab = hf_model.config.vocab_size
    idx = torch.randint(0, vocab, (2, 16))
    with torch.no_grad():
        expected = hf_model(idx).logits
        actual = ours(idx)
    diff = (actual - expected).abs().max().item()
    record_property("max_abs_diff", diff)
    print(f"{family}: max abs logits diff {diff:.2e}")
    assert actual.shape == expected.shape
    assert diff <= 1e-5, f"{family}: logits differ by {diff}"

    # Greedy decoding: same tokens, and the logits of every step agree (a stronger check of the KV cache
    # than the tokens alone, which can repeat for tiny random models).
    prompt = idx[:1, :PROMPT_LEN]
    hf_out = hf_model.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS, return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    our_tokens, our_logits = greedy_ours(ours, prompt, NEW_TOKENS)
    assert our_tokens.tolist() == hf_out.sequences[:, PROMPT_LEN:].tolist()
    step_diff = (our_logits - torch.stack(hf_out.logits, dim=1)).abs().max().item()
    record_property("max_abs_diff_decoding", step_diff)
    print(f"{family}: max abs logits diff while decoding {step_diff:.2e}")
    assert step_diff <= 1e-5, f"{family}: KV-cached decoding logits differ by {step_diff}"


@pytest.mark.parametrize("sharded", [False, True])
def test_parity_from_bin_files(tmp_path, sharded):
    """pytorch_model.bin, or shards named by pytorch_model.bin.index.json, convert like safetensors."""
    hf_model = make_hf_model("gpt_neox_parallel")
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    hf_model.config.save_pretrained(tmp_path)
    if sharded:
        names = sorted(sd)
        shards = {"pytorch_model-1.bin": names[::2], "pytorch_model-2.bin": names[1::2]}
        for file, keys in shards.items():
            torch.save({k: sd[k] for k in keys}, tmp_path / file)
        weight_map = {k: file for file, keys in shards.items() for k in keys}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(sd, tmp_path / "pytorch_model.bin")
    convert_hf(tmp_path)
    idx = torch.randint(0, 160, (1, 12))
    with torch.no_grad():
        assert (load_ours(tmp_path)(idx) - hf_model(idx).logits).abs().max() <= 1e-5


def test_parity_from_sharded_checkpoint(tmp_path):
    """Shards named by model.safetensors.index.json are all read; a fused-qkv family to exercise splitting."""
    hf_model = make_hf_model("falcon_40b")
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    convert_hf(tmp_path)
    idx = torch.randint(0, 160, (1, 12))
    with torch.no_grad():
        assert (load_ours(tmp_path)(idx) - hf_model(idx).logits).abs().max() <= 1e-5


def test_dtype_option_and_default_keeps_dtype(tmp_path):
    hf_model = make_hf_model("qwen2.5").to(torch.bfloat16)
    convert_hf(save_hf(hf_model, tmp_path))
    assert {t.dtype for t in load_weights_file(tmp_path / WEIGHTS_FILE).values()} == {torch.bfloat16}
    load_script("convert_hf_checkpoint").main(tmp_path, dtype="float32")  # the script's entry point
    assert {t.dtype for t in load_weights_file(tmp_path / WEIGHTS_FILE).values()} == {torch.float32}
