"""LoRA: the layer against the paper's formula, merge, targeting, dropout placement, parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import tiny_llama_config
from lit_gpt import lora
from lit_gpt.config import Config
from lit_gpt.lora import LoRALinear, LoRASettings
from lit_gpt.kernels import Linear
from lit_gpt.model import GPT


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    """Give every lora_B random values, so that the LoRA path actually contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_matches_reference_formula(bias):
    torch.manual_seed(0)
    base = nn.Linear(12, 7, bias=bias)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.0)
    randomize_lora(layer)
    x = torch.randn(3, 5, 12)
    W, A, B = base.weight, layer.lora_A, layer.lora_B
    expected = x @ W.T + (8 / 4) * (x @ A.T @ B.T)  # h = W x + (alpha / r) B A x  (Hu et al. eq. 3)
    if bias:
        expected = expected + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    # the wrapper keeps the wrapped layer's Parameter objects and names
    assert layer.weight is base.weight and layer.bias is base.bias
    assert {n for n, _ in layer.named_parameters()} == {"weight", "lora_A", "lora_B"} | ({"bias"} if bias else set())


def test_lora_init_is_b_zero_a_random():
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()
    bound = 1 / 16**0.5  # kaiming-uniform with a=sqrt(5), as nn.Linear: U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound


def test_dropout_only_on_lora_path():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.5).train()
    x = torch.randn(4, 16)
    # With B = 0 the output is the base output exactly even in training mode: x itself is never dropped.
    assert torch.equal(layer(x), base(x))
    randomize_lora(layer)
    # Dropout sits on the LoRA input: make it drop everything and the base output must come back.
    layer.dropout = nn.Dropout(p=1.0)
    assert torch.equal(layer(x), base(x))
    layer.dropout = nn.Dropout(p=0.5)
    assert not torch.equal(layer(x), base(x))
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T))


def test_shared_dropout_gives_one_mask_per_input_tensor():
    torch.manual_seed(0)
    dropout = lora.SharedDropout(0.5).train()
    x, y = torch.randn(64, 16), torch.randn(64, 16)
    first = dropout(x)
    assert dropout(x) is first  # a second reader of the same input (the value after the query) gets the same mask
    assert not torch.equal(dropout(y) != 0, first != 0)  # another input draws its own
    again = dropout(x)
    assert not torch.equal(again != 0, first != 0)  # the memory holds only the last input
    assert 0.3 < (first == 0).float().mean() < 0.7
    kept = first != 0
    torch.testing.assert_close(first[kept], x[kept] * 2.0)  # survivors scaled by 1 / (1 - p), as nn.Dropout
    dropout.eval()
    assert dropout(x) is x


def test_lora_layers_reading_one_input_share_their_dropout_mask():
    torch.manual_seed(0)
    model = GPT(tiny_llama_config())
    lora.apply(model, lora.LoRASettings(dropout=0.5, query=True, key=True, value=True))
    attn = model.blocks[0].attn
    assert attn.query.dropout is attn.value.dropout is model.blocks[1].attn.key.dropout
    model.train()
    x = torch.randn(2, 8, model.config.n_embd)
    seen = []
    for layer in (attn.query, attn.key, attn.value):
        handle = layer.dropout.register_forward_hook(lambda module, args, out: seen.append(out))
        layer(x)
        handle.remove()
    assert seen[0] is seen[1] is seen[2]
    # The shared module holds no tensors: the state dict has only base and LoRA keys.
    assert not any("dropout" in k for k in model.state_dict())


def test_merge_unmerge_layer():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8, dropout=0.0)
    randomize_lora(layer)
    x = torch.randn(4, 16)
    before, w0 = layer(x), layer.weight.detach().clone()
    layer.merge_weights()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge_weights()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


ALL_TARGETS = dict(query=True, key=True, value=True, projection=True, mlp=True, head=True)


@pytest.mark.parametrize("tie", [False, True])
def test_merged_model_equals_unmerged_and_has_base_keys(tie):
    config = tiny_llama_config(tie_embeddings=tie)
    torch.manual_seed(0)
    model = GPT(config)
    base_keys = list(model.state_dict())
    targets = dict(ALL_TARGETS, head=not tie)  # a tied head cannot be merged (see the next test)
    lora.apply(model, LoRASettings(r=4, alpha=8, dropout=0.1, **targets))
    randomize_lora(model)
    model.eval()
    x = torch.randint(0, config.padded_vocab_size, (2, 12))
    with torch.no_grad():
        unmerged = model(x)
        lora.merge(model)
        merged = model(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert list(model.state_dict()) == base_keys
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(m) is Linear for n, m in model.named_modules() if n.endswith(("query", "proj", "fc_1", "lm_head")))
    if tie:
        assert model.lm_head.weight is model.wte.weight


def test_tied_head_keeps_tie_and_refuses_to_merge():
    config = tiny_llama_config(tie_embeddings=True)
    model = lora.apply(GPT(config), LoRASettings(head=True))
    assert model.lm_head.weight is model.wte.weight
    lora.mark_trainable(model)
    assert not model.wte.weight.requires_grad
    assert {"lm_head.lora_A", "lm_head.lora_B"} <= lora.peft_parameter_names(model)
    with pytest.raises(ValueError, match="tied to the token embedding"):
        lora.merge(model)
    assert isinstance(model.lm_head, LoRALinear)  # refused before touching anything


@pytest.mark.parametrize(
    "flags, expected",
    [
        (dict(), {"attn.query", "attn.value"}),
        (dict(query=False, value=False, key=True), {"attn.key"}),
        (dict(query=False, value=False, projection=True), {"attn.proj"}),
        (dict(query=False, value=False, mlp=True), {"mlp.fc_1", "mlp.fc_2", "mlp.proj"}),
        (dict(query=False, value=False, head=True), {"lm_head"}),
    ],
)
def test_targeting_wraps_exactly_the_chosen_modules(flags, expected):
    config = tiny_llama_config()
    model = lora.apply(GPT(config), LoRASettings(**flags))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    want = {f"blocks.{i}.{e}" for i in range(config.n_layer) for e in expected if e != "lm_head"}
    want |= {"lm_head"} & expected
    assert wrapped == want


def test_mlp_targets_plain_mlp_linears():
    config = tiny_llama_config(mlp_class="MLP", activation="gelu")
    model = lora.apply(GPT(config), LoRASettings(query=False, value=False, mlp=True))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {f"blocks.{i}.mlp.{n}" for i in range(config.n_layer) for n in ("fc", "proj")}


def test_settings_validation_names_the_flag():
    with pytest.raises(ValueError, match="--lora_r 0"):
        LoRASettings(r=0)
    with pytest.raises(ValueError, match="targets no layer"):
        LoRASettings(query=False, value=False)
    with pytest.raises(TypeError, match="applied twice"):
        lora.apply(lora.apply(GPT(tiny_llama_config()), LoRASettings()), LoRASettings())


def test_llama_7b_trainable_count_on_meta_device():
    # LLaMA-7B: 32 layers, n_embd 4096, 32 heads, SwiGLU 11008, vocab 32000.
    # LoRA r=8 on query and value: each wrapped 4096x4096 linear adds A (8x4096) + B (4096x8) = 65,536;
    # 2 per layer x 32 layers = 4,194,304.
    config = Config(
        name="llama-7b-dims", n_layer=32, n_embd=4096, n_head=32, intermediate_size=11008, vocab_size=32000,
        norm_class="RMSNorm", mlp_class="GatedMLP", activation="silu", bias=False,
    )
    with torch.device("meta"):
        model = GPT(config)
        lora.apply(model, LoRASettings(r=8, query=True, value=True))
    lora.mark_trainable(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * (8 * 4096 + 4096 * 8) * 32 == 4_194_304
    assert sum(t.numel() for t in lora.state_dict_to_save(model).values()) == trainable
