"""lit_gpt.generation: sampling filters, KV-cached generation == uncached forward passes, stops, errors."""

from __future__ import annotations

import math

import pytest
import torch

from lit_gpt.generation import generate, sample, top_p_filter
from lit_gpt.model import GPT
from lit_gpt.utils import choose_precision, precision_to_dtype

from conftest import tiny_llama_config


# --- sample --------------------------------------------------------------------------------------------------
def test_greedy_is_argmax():
    logits = torch.randn(3, 50)
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=0.7, top_k=1), logits.argmax(-1))
    assert sample(logits[0]).shape == ()


def test_top_k_only_draws_the_k_largest():
    logits = torch.tensor([0.0, 5.0, 1.0, 4.0, 3.0, -2.0])
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, temperature=5.0, top_k=3, generator=g)) for _ in range(300)}
    assert drawn == {1, 3, 4}


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.5, 0.05, 0.3, 0.15])
    logits = probs.log()
    kept = lambda p: set(torch.isfinite(top_p_filter(logits, p)).nonzero().flatten().tolist())  # noqa: E731
    assert kept(0.5) == {0}  # the top token alone reaches 0.5
    assert kept(0.6) == {0, 2}
    assert kept(0.8) == {0, 2}  # 0.5 + 0.3 reaches 0.8
    assert kept(0.81) == {0, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}
    assert kept(1e-6) == {0}  # the most likely token always survives
    # batched rows are filtered independently
    batch = torch.stack([logits, logits.flip(0)])
    assert torch.isfinite(top_p_filter(batch, 0.6)).tolist() == [[True, False, True, False], [False, True, False, True]]


def test_top_p_sampling_draws_only_from_the_nucleus():
    logits = torch.tensor([0.5, 0.05, 0.3, 0.15]).log()
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, temperature=1.0, top_p=0.6, generator=g)) for _ in range(300)}
    assert drawn == {0, 2}


def test_sampling_is_reproducible_with_a_seeded_generator():
    logits = torch.randn(4, 100)
    a = [sample(logits, 1.0, 20, 0.9, torch.Generator().manual_seed(7)) for _ in range(3)]
    b = [sample(logits, 1.0, 20, 0.9, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([2.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    cold = sum(int(sample(logits, 0.05, generator=g)) == 0 for _ in range(200))
    hot = sum(int(sample(logits, 100.0, generator=g)) == 0 for _ in range(600))
    assert cold == 200
    assert 120 < hot < 280  # ~ uniform: 1/3 of 600


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(temperature=1.0, top_k=0), "top_k must be >= 1"),
        (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_sampling_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(torch.randn(10), **kwargs)


# --- generate ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    model = GPT(tiny_llama_config(vocab_size=64, block_size=32)).eval()
    with torch.no_grad():  # larger weights than the default init, so that outputs vary from step to step
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def uncached_generate(model, prompt, n, temperature=0.0, top_k=None, top_p=1.0, generator=None, stop_ids=()):
    """Reference: a full forward pass over the whole sequence for every new token, no KV cache."""
    seq, out = prompt.clone(), []
    with torch.no_grad():
        for _ in range(n):
            if seq.numel() > model.config.block_size:
                break
            token = sample(model(seq[None])[0, -1], temperature, top_k, top_p, generator)
            if int(token) in stop_ids:
                break
            out.append(int(token))
            seq = torch.cat([seq, token.view(1)])
    return out


def test_cached_greedy_generation_equals_uncached_forward_passes(model):
    prompt = torch.tensor([3, 17, 42, 5, 9])
    cached = list(generate(model, prompt, max_new_tokens=20))
    assert cached == uncached_generate(model, prompt, 20)
    assert len(cached) == 20 and len(set(cached)) > 3  # not a degenerate repeat, so the check means something


@pytest.mark.slow  # compiling takes ~30 s on 2 cores
def test_compiled_decoding_gives_the_eager_tokens(model):
    prompt = torch.tensor([3, 17, 42, 5, 9])
    eager = list(generate(model, prompt, max_new_tokens=12))
    compiled = list(generate(model, prompt, max_new_tokens=12, compile=True))
    assert compiled == eager and len(set(eager)) > 3
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert list(generate(model, prompt, max_new_tokens=12, compile=True)) == eager  # the compiled step is reused
    longer = torch.tensor([3, 17, 42, 5, 9, 11, 2, 30])  # another prompt length: same rounded-up cache, no recompile
    assert list(generate(model, longer, max_new_tokens=12, compile=True)) == list(generate(model, longer, 12))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_cached_sampling_equals_uncached_with_the_same_seed(model):
    prompt = torch.tensor([1, 2, 3])
    settings = dict(temperature=0.9, top_k=20, top_p=0.95)
    cached = list(generate(model, prompt, 15, generator=torch.Generator().manual_seed(3), **settings))
    reference = uncached_generate(model, prompt, 15, generator=torch.Generator().manual_seed(3), **settings)
    assert cached == reference


def test_generation_stops_at_a_stop_id_without_yielding_it(model):
    prompt = torch.tensor([3, 17, 42, 5, 9])
    full = list(generate(model, prompt, max_new_tokens=20))
    stop = full[6]
    first = full.index(stop)
    assert list(generate(model, prompt, 20, stop_ids={stop})) == full[:first]
    assert list(generate(model, prompt, 20, stop_ids=[stop, 999])) == full[:first]


def test_generation_stops_when_the_context_is_full(model):
    block = model.config.block_size
    prompt = torch.arange(block - 3) % 64
    out = list(generate(model, prompt, max_new_tokens=100))
    assert len(out) == 4  # positions block-3 .. block-1 are fed; the token after the last is still produced
    assert out == uncached_generate(model, prompt, 100)
    assert len(list(generate(model, torch.arange(block) % 64, 10))) == 1


def test_generate_restores_the_model_for_training(model):
    model.max_seq_length = 20
    it = generate(model, torch.tensor([1, 2, 3]), 5)
    next(it)
    assert model.blocks[0].attn.kv_cache is not None
    it.close()  # the caller stops early
    assert model.blocks[0].attn.kv_cache is None
    assert model.max_seq_length == 20 and not model.cos.is_inference()
    model.max_seq_length = model.config.block_size


def test_too_long_prompt_is_a_clear_error_at_call_time(model):
    with pytest.raises(ValueError, match="The prompt has 40 tokens but tiny-llama's context .* is 32 tokens"):
        generate(model, torch.zeros(40, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="1-D"):
        generate(model, torch.zeros(1, 4, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="empty"):
        generate(model, torch.zeros(0, dtype=torch.long), 5)
    assert list(generate(model, torch.tensor([1]), 0)) == []


# --- utils ---------------------------------------------------------------------------------------------------
def test_choose_precision_defaults_and_errors():
    assert choose_precision(None, "cpu") == "32-true"
    assert choose_precision(None, "mps") == "16-true"
    assert choose_precision("bf16-true", "cpu") == "bf16-true"
    with pytest.raises(ValueError, match="not supported on CPU"):
        choose_precision("16-mixed", "cpu")
    with pytest.raises(ValueError, match="Unknown precision 'fp8'"):
        choose_precision("fp8", "cpu")
    assert precision_to_dtype("bf16-true") == torch.bfloat16 and precision_to_dtype("bf16-mixed") == torch.float32


@pytest.mark.parametrize("has_bf16", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_warns_but_runs(monkeypatch, capsys, has_bf16):
    import lit_gpt.utils

    monkeypatch.setattr(lit_gpt.utils, "_cpu_has_bf16", lambda: has_bf16)
    assert choose_precision("bf16-true", "cpu") == "bf16-true"
    warned = "no bfloat16 instructions" in capsys.readouterr().err
    assert warned != has_bf16
    assert choose_precision("32-true", "cpu") == "32-true" and "warning" not in capsys.readouterr().err


def test_choose_precision_on_a_cuda_gpu_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    assert choose_precision(None, "cuda") == "16-true"
    with pytest.raises(ValueError, match="Tesla T4 does not support.*--precision 16-true"):
        choose_precision("bf16-true", "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert choose_precision(None, "cuda") == "bf16-true"


def num_parameters(module: torch.nn.Module, requires_grad: bool | None = None) -> int:
    """Number of parameter elements in `module` (tied parameters counted once).

    `requires_grad` True/False counts only trainable/frozen parameters; None counts all.
    """
    return sum(
        p.numel() for p in module.parameters() if requires_grad is None or p.requires_grad == requires_grad
    )


def test_num_parameters_counts_tied_weights_once():
    model = GPT(tiny_llama_config(tie_embeddings=True))
    total = num_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    model.wte.weight.requires_grad_(False)
    assert num_parameters(model, requires_grad=False) == model.wte.weight.numel()
    assert num_parameters(model, requires_grad=True) == total - model.wte.weight.numel()
    assert math.isclose(num_parameters(model, True) + num_parameters(model, False), total)
