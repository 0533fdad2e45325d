"""lit_gpt.kernels: each piece of speed machinery computes what its plain PyTorch reference computes.

References: F.linear for `linear` and for packed `linears`; autograd through F.rms_norm for `RMSNormFunction`;
plain masked attention, row by row, for `SharedPrefix`; F.cross_entropy over the full logits for the fused
LM-head loss (`cross_entropy_sum`, `LinearCrossEntropy`).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_gpt import kernels
from lit_gpt.generation import generate
from lit_gpt.kernels import (
    Linear,
    RMSNormFunction,
    SharedPrefix,
    fused_head_terms,
    linear,
    linears,
    pack_linears,
    pack_weights,
    packed_weight,
)
from lit_gpt.model import GPT, IGNORE_INDEX, RMSNorm, supervised_cross_entropy

from conftest import tiny_llama_config, torch_threads


# --- linear: few-row products split over the CPU threads ------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 3, 64, 65])  # 65 rows: past the split threshold, plain F.linear
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_split_linear_equals_f_linear(rows, threads):
    torch.manual_seed(0)
    # Small integers: every product and sum is exact in fp32, so any summation order gives identical results.
    weight = torch.randint(-4, 5, (1536, 96)).float()  # 1536 rows: divisible by 1, 2 and 3 threads
    bias = torch.randint(-4, 5, (1536,)).float()
    x = torch.randint(-4, 5, (rows, 1, 96)).float().requires_grad_()
    with torch_threads(threads):
        got = linear(x, weight, bias)
    expected = torch.nn.functional.linear(x, weight, bias)
    assert got.shape == expected.shape == (rows, 1, 1536)
    assert torch.equal(got, expected)
    (grad,) = torch.autograd.grad(got.sum(), x)
    assert torch.equal(grad, torch.autograd.grad(expected.sum(), x)[0])


def test_thread_split_linear_follows_its_weight_and_does_not_keep_it_alive():
    import gc
    import weakref

    weight = torch.randint(-4, 5, (1536, 96)).float()
    x = torch.randint(-4, 5, (1, 1, 96)).float()
    with torch_threads(2):
        first = linear(x, weight)  # caches the weight's per-thread blocks
        weight.mul_(2)  # changed in place, as merging LoRA weights does
        assert torch.equal(linear(x, weight), 2 * first)
        weight.data = torch.ones_like(weight)  # new storage under the same tensor
        assert torch.equal(linear(x, weight), torch.nn.functional.linear(x, weight))
        trainable = torch.nn.Parameter(weight.clone())
        linear(x, trainable).sum().backward()  # a weight that takes gradients gets them
        assert torch.equal(trainable.grad, x.reshape(1, 96).expand(1536, 96))
        gone, key = weakref.ref(weight), id(weight)
        assert key in kernels._THREAD_BLOCKS
        del weight
        gc.collect()
        assert gone() is None  # the cache holds no reference to the weight
        assert key not in kernels._THREAD_BLOCKS  # and forgets it when it goes


@pytest.mark.slow  # compiles a small graph (~10 s cold on 2 cores)
def test_thread_split_linear_compiles_into_one_graph():
    # fullgraph=True fails on any graph break: the split (and its thread count) is traced, not skipped.
    weight = torch.randint(-4, 5, (1536, 96)).float()
    x = torch.randint(-4, 5, (1, 1, 96)).float()
    with torch_threads(2):
        torch._dynamo.reset()
        try:
            got = torch.compile(linear, fullgraph=True, dynamic=False)(x, weight)
        finally:
            torch._dynamo.reset()
    assert torch.equal(got, torch.nn.functional.linear(x, weight))


def test_model_linear_layers_keep_plain_linear_state_dicts():
    model = GPT(tiny_llama_config())
    assert isinstance(model.lm_head, torch.nn.Linear) and isinstance(model.blocks[0].attn.query, Linear)
    plain = torch.nn.Linear(model.config.n_embd, model.config.padded_vocab_size, bias=False)
    assert plain.state_dict().keys() == model.lm_head.state_dict().keys()


# --- linears: packed weights, one product per group ------------------------------------------------------
def _packed_copy(model: GPT) -> GPT:
    packed = GPT(model.config).eval()
    packed.load_state_dict(model.state_dict())
    return pack_weights(packed)


def test_packed_weights_keep_parameters_and_outputs():
    torch.manual_seed(0)
    model = GPT(tiny_llama_config(bias=True)).eval()  # biases too: they are packed like the weights
    packed = _packed_copy(model)
    attn, mlp = packed.blocks[0].attn, packed.blocks[0].mlp
    with torch.inference_mode():
        assert packed_weight((attn.query, attn.key, attn.value)) is not None
        assert packed_weight((mlp.fc_1, mlp.fc_2)) is not None
        assert attn.key.weight.data_ptr() == attn.query.weight.data_ptr() + attn.query.weight.nbytes
        idx = torch.randint(0, 320, (2, 11))
        torch.testing.assert_close(packed(idx), model(idx))
    assert packed.state_dict().keys() == model.state_dict().keys()
    for name, tensor in packed.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    prompt = torch.tensor([3, 17, 42, 5, 9])
    assert list(generate(packed, prompt, 10)) == list(generate(model, prompt, 10))


def test_packed_layers_run_one_by_one_when_packing_no_longer_holds():
    from lit_gpt import lora

    model = _packed_copy(GPT(tiny_llama_config()))
    attn = model.blocks[0].attn
    group = (attn.query, attn.key, attn.value)
    assert packed_weight(group) is None  # gradients enabled and the weights require them: separate products
    with torch.no_grad():
        assert packed_weight(group) is not None
        model.double()  # cast after packing: the buffer no longer holds the weights
        assert packed_weight(group) is None
    model = _packed_copy(GPT(tiny_llama_config()))
    lora.apply(model, lora.LoRASettings(r=2, alpha=4, query=True, value=True))
    attn = model.blocks[0].attn
    with torch.no_grad():  # LoRA-wrapped query and value must add their update: no shared product
        assert packed_weight((attn.query, attn.key, attn.value)) is None


def test_a_packed_model_saves_and_reloads(tmp_path):
    from lit_gpt.checkpoint import load_weights_file, save_safetensors

    model = _packed_copy(GPT(tiny_llama_config()))
    save_safetensors(model.state_dict(), tmp_path / "model.safetensors")  # views of one buffer: copied out
    saved = load_weights_file(tmp_path / "model.safetensors")
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[name], tensor) for name, tensor in model.state_dict().items())


def test_packed_linears_equal_f_linear_layer_by_layer():
    torch.manual_seed(0)
    layers = [Linear(96, out_features) for out_features in (512, 256, 256)]  # query, key, value of a GQA layer
    with torch.no_grad():  # small integers: exact in fp32, so one product over the buffer must match bit for bit
        for layer in layers:
            layer.weight.copy_(torch.randint(-4, 5, layer.weight.shape))
            layer.bias.copy_(torch.randint(-4, 5, layer.bias.shape))
    separate = [(layer.weight.detach().clone(), layer.bias.detach().clone()) for layer in layers]
    pack_linears(*layers)
    x = torch.randint(-4, 5, (2, 3, 96)).float()
    with torch.no_grad(), torch_threads(2):  # decoding's case: few rows, the product split over the threads
        assert packed_weight(layers) is not None  # the one-product path is the one under test
        got = linears(x, *layers)
    assert len(got) == 3
    for y, (weight, bias) in zip(got, separate):
        assert torch.equal(y, F.linear(x, weight, bias))


@pytest.mark.parametrize("mlp_class", ["GatedMLP", "MLP"])
def test_pack_weights_packs_query_key_value_and_a_gated_mlps_fc_1_fc_2(mlp_class):
    config = tiny_llama_config(mlp_class=mlp_class, activation="silu" if mlp_class == "GatedMLP" else "gelu")
    model = pack_weights(GPT(config).eval())
    with torch.no_grad():
        for block in model.blocks:
            assert packed_weight((block.attn.query, block.attn.key, block.attn.value)) is not None
            if mlp_class == "GatedMLP":
                assert packed_weight((block.mlp.fc_1, block.mlp.fc_2)) is not None
            else:  # fc and proj read different inputs: nothing to pack
                assert packed_weight((block.mlp.fc, block.mlp.proj)) is None


# --- RMSNorm: the closed-form backward -----------------------------------------------------------------------
def test_rms_norm_backward_equals_autograd_through_rms_norm():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-5), (x, weight))
    norm = RMSNorm(16, eps=1e-5)  # float32, on the CPU, with gradients: the hand-written backward is taken
    with torch.no_grad():
        norm.weight.normal_()
    x32 = x.detach().float().requires_grad_()
    expected = torch.autograd.grad(F.rms_norm(x32, (16,), norm.weight, 1e-5).pow(2).sum(), (x32, norm.weight))
    got = torch.autograd.grad(norm(x32).pow(2).sum(), (x32, norm.weight))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    assert norm(x32).grad_fn.name() == "RMSNormFunctionBackward"


# --- SharedPrefix: rows that begin with the same tokens ------------------------------------------------------
def _plain_attention(q, k, v, mask):
    """Reference: softmax(q k^T / sqrt(D)) v, keys/values repeated per query group; mask None = causal."""
    if mask is None:
        mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool).tril()
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


def test_shared_prefix_attention_equals_each_row_attending_alone():
    torch.manual_seed(0)
    B, T, P, H, G, D = 3, 9, 4, 4, 2, 8

    def rows(heads):  # (B, T, heads, D); every row's first P tokens are the same, as a shared prefix's are
        t = torch.randn(B, T, heads, D)
        t[1:, :P] = t[:1, :P]
        return t

    q, k, v = rows(H), rows(G), rows(G)
    alone = _plain_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None)  # (B, H, T, D)
    layout = SharedPrefix(P, rows=B, row_length=T)
    N = P + B * (T - P)
    assert torch.equal(layout.positions, layout.flatten(torch.arange(T).expand(B, T))[0])
    flat = [layout.flatten(t).transpose(1, 2) for t in (q, k, v)]  # (1, heads, N, D)
    assert flat[0].shape == (1, H, N, D)
    got = layout.attend(*flat, _plain_attention)
    torch.testing.assert_close(got, layout.flatten(alone.transpose(1, 2)).transpose(1, 2))


def test_shared_prefix_must_be_shorter_than_the_rows():
    with pytest.raises(ValueError, match="shared prefix of 9 tokens needs rows longer than it"):
        SharedPrefix(9, rows=2, row_length=9)


# --- the LM head and its loss, fused -------------------------------------------------------------------------
def test_loss_at_supervised_positions_equals_full_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(3, 9, 16)
    targets = torch.randint(0, 50, (3, 9))
    targets[0, :5] = IGNORE_INDEX
    targets[2, 7:] = IGNORE_INDEX
    reference = F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    for chunk_size in (1, 4, 1024):
        torch.testing.assert_close(supervised_cross_entropy(head, hidden, targets, chunk_size), reference)


@pytest.mark.parametrize("head_kind", ["linear", "wrapped"])  # the fused path, and plain autograd for other heads
def test_loss_gradients_equal_autograd_through_full_cross_entropy(head_kind):
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 50)  # weight and bias both train here, as in full finetuning
    head = linear if head_kind == "linear" else torch.nn.Sequential(linear)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 9))
    targets[1, :6] = IGNORE_INDEX
    reference = F.cross_entropy(linear(hidden).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    expected = torch.autograd.grad(3.0 * reference, (hidden, linear.weight, linear.bias))
    loss = supervised_cross_entropy(head, hidden, targets, chunk_size=5)
    got = torch.autograd.grad(3.0 * loss, (hidden, linear.weight, linear.bias))  # an upstream scale is applied
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    with torch.no_grad():  # validation: the loss alone, nothing kept
        torch.testing.assert_close(supervised_cross_entropy(head, hidden, targets, chunk_size=5), reference)


@pytest.mark.parametrize("bias", [True, False])
def test_adapter_v2_head_runs_in_the_fused_loss_with_the_same_loss_and_gradients(bias):
    from lit_gpt.adapter_v2 import AdapterV2Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 50, bias=bias)
    head = AdapterV2Linear(linear)
    with torch.no_grad():  # away from the identity at init, so that scale and bias matter
        head.adapter_scale.uniform_(0.5, 1.5)
        head.adapter_bias.normal_()
    linear.weight.requires_grad_(False)  # frozen, as Adapter v2 trains it
    assert fused_head_terms(head) is not None  # the fused path is taken, not plain autograd
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 9))
    targets[0, :4] = IGNORE_INDEX
    trained = [hidden, head.adapter_scale, head.adapter_bias] + ([linear.bias] if bias else [])
    logits = head.adapter_scale * (hidden @ linear.weight.T + (linear.bias if bias else 0) + head.adapter_bias)
    reference = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    expected = torch.autograd.grad(reference, trained)
    loss = supervised_cross_entropy(head, hidden, targets, chunk_size=4)
    torch.testing.assert_close(loss, reference)
    for got, want in zip(torch.autograd.grad(loss, trained), expected):
        torch.testing.assert_close(got, want)
