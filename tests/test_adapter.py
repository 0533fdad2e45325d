"""LLaMA-Adapter: zero-init gate, the attention against a hand-written reference, the prefix cache rules,
and the trainable-parameter count of StableLM-alpha-3B."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_llama_config
from lit_gpt import adapter
from lit_gpt.adapter import AdapterAttention, AdapterSettings
from lit_gpt.config import Config
from lit_gpt.model import GPT, CausalSelfAttention


def test_layers_from_start_layer_are_swapped_and_keep_their_projections():
    config = tiny_llama_config(n_layer=4)
    model = GPT(config)
    before = [(b.attn.query.weight, b.attn.value.weight, b.attn.proj.weight) for b in model.blocks]
    adapter.apply(model, AdapterSettings(prompt_length=3, start_layer=2))
    assert [type(b.attn) for b in model.blocks] == [CausalSelfAttention] * 2 + [AdapterAttention] * 2
    for block, (q, v, p) in zip(model.blocks, before):
        assert block.attn.query.weight is q and block.attn.value.weight is v and block.attn.proj.weight is p
    assert model.blocks[3].attn.adapter_wte.weight.shape == (3, config.n_embd)
    assert adapter.peft_parameter_names(model) == {
        f"blocks.{i}.attn.{n}" for i in (2, 3) for n in ("adapter_wte.weight", "adapter_gate")
    }


def test_start_layer_beyond_the_model_is_rejected():
    with pytest.raises(ValueError, match="start_layer 2 leaves no layer.*2 layers"):
        adapter.apply(GPT(tiny_llama_config(n_layer=2)), AdapterSettings(start_layer=2))


def reference_adapter_attention(attn: AdapterAttention, x, cos, sin) -> torch.Tensor:
    """LLaMA-Adapter attention written out with explicit matmuls and softmaxes (paper eq. 7-8)."""
    B, T, _ = x.shape
    H, G, D = attn.config.n_head, attn.config.n_query_groups, attn.config.head_size
    q, k, v = attn.project_qkv(x, cos, sin)  # (B, H, T, D), (B, G, T, D) x 2
    k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    prompt = attn.adapter_wte.weight  # (P, C)
    pk = attn.key(prompt).view(-1, G, D).transpose(0, 1).repeat_interleave(H // G, dim=0)  # (H, P, D), no RoPE
    pv = attn.value(prompt).view(-1, G, D).transpose(0, 1).repeat_interleave(H // G, dim=0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    seq = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
    pro = (q @ pk.transpose(-1, -2) / math.sqrt(D)).softmax(-1) @ pv  # every token sees the whole prompt
    y = seq + torch.tanh(attn.adapter_gate) * pro
    return attn.proj(y.transpose(1, 2).reshape(B, T, H * D))


def test_adapter_attention_matches_reference():
    torch.manual_seed(0)
    model = adapter.apply(GPT(tiny_llama_config()), AdapterSettings(prompt_length=5, start_layer=0))
    attn = model.blocks[1].attn
    with torch.no_grad():
        attn.adapter_gate.normal_()
    x = torch.randn(2, 7, model.config.n_embd)
    cos, sin = model.cos[:7], model.sin[:7]
    out = attn(x, cos, sin, None, None)
    torch.testing.assert_close(out, reference_adapter_attention(attn, x, cos, sin), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the gate matters: closed, the output is different
        attn.adapter_gate.zero_()
        assert (out - attn(x, cos, sin, None, None)).abs().max() > 1e-3


def test_zero_gate_equals_base_model():
    torch.manual_seed(0)
    base = GPT(tiny_llama_config())
    torch.manual_seed(0)
    model = adapter.apply(GPT(tiny_llama_config()), AdapterSettings(prompt_length=4, start_layer=0))
    x = torch.randint(0, 320, (2, 9))
    assert torch.equal(model(x), base(x))


def _cache_of(model: GPT):
    return model.blocks[-1].attn._prefix_cache


def test_prefix_kv_cached_only_at_inference_and_cleared():
    torch.manual_seed(0)
    model = adapter.apply(GPT(tiny_llama_config()), AdapterSettings(prompt_length=4, start_layer=0))
    adapter.mark_trainable(model)
    x = torch.randint(0, 320, (1, 6))

    with torch.no_grad():  # a validation pass: no KV cache -> nothing cached
        model(x)
    assert _cache_of(model) is None

    model.set_kv_cache(batch_size=1)
    model(x)  # gradients enabled (training) with a KV cache lying around -> still nothing cached
    assert _cache_of(model) is None
    with torch.no_grad():  # generation: KV cache and no gradients -> cached
        model(x, input_pos=torch.arange(6))
        cached = _cache_of(model)
        assert cached is not None
        model(x[:, :1], input_pos=torch.tensor([6]))
        assert _cache_of(model) is cached  # reused for the next token

    # A training step with the cache still present: the prompt gets a gradient and the cache is not used.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    with torch.no_grad():
        for b in model.blocks:
            b.attn.adapter_gate.fill_(0.5)
    model(x, targets=x).backward()
    assert model.blocks[-1].attn.adapter_wte.weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():  # the prompt changed in place -> the stale entry is recomputed, not reused
        model(x[:, :1], input_pos=torch.tensor([7]))
    assert _cache_of(model) is not cached
    pk, _ = _cache_of(model)[1:]
    attn = model.blocks[-1].attn
    torch.testing.assert_close(pk[0, :, :, :].transpose(0, 1).reshape(4, -1), attn.key(attn.adapter_wte.weight).detach())

    model.clear_kv_cache()
    assert all(b.attn._prefix_cache is None and b.attn.kv_cache is None for b in model.blocks)


def test_settings_validation():
    with pytest.raises(ValueError, match="prompt_length"):
        AdapterSettings(prompt_length=0)
    with pytest.raises(TypeError, match="applied twice"):
        s = AdapterSettings(start_layer=0)
        adapter.apply(adapter.apply(GPT(tiny_llama_config()), s), s)


def stablelm_3b() -> Config:
    """stabilityai/stablelm-base-alpha-3b: GPT-NeoX layout, parallel residual, LayerNorm with bias."""
    config = Config.from_name("stablelm-base-alpha-3b")
    assert (config.n_layer, config.n_embd, config.n_head, config.padded_vocab_size, config.intermediate_size) == (
        16, 4096, 32, 50688, 16384,
    )
    assert config.parallel_residual and config.norm_class == "LayerNorm" and config.bias and config.mlp_class == "MLP"
    return config


def test_stablelm_3b_adapter_trainable_count_on_meta_device():
    # Per adapted layer: prompt 10 x 4096 = 40,960 + gate 32 (one per head) = 40,992.
    # Layers 2..15 are adapted: 14 x 40,992 = 573,888.
    # The Lit-GPT docs say "~500k" for StableLM 3B: that is 14 x 40,960 = 573,440 for the prompts (+ 448 for
    # Lit-GPT's per-head gating factors, the same shape as ours), rounded down. Nothing else trains: no
    # LM head, no norms.
    with torch.device("meta"):
        model = adapter.apply(GPT(stablelm_3b()), AdapterSettings(prompt_length=10, start_layer=2))
    adapter.mark_trainable(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 14 * (10 * 4096 + 32) == 573_888
