"""The contract every PEFT method keeps (DESIGN 4-6, 12): one source for what trains and what is saved,
verified base-checkpoint loads, caches that never leak into training (Lit-GPT #1287), KV-cached decoding
equal to full forward passes, and that learning actually happens."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from conftest import tiny_llama_config
from lit_gpt import adapter, adapter_v2, bottleneck, lora
from lit_gpt.checkpoint import WEIGHTS_FILE, CheckpointError, load_into_model, load_weights_file, tied_keys
from lit_gpt.config import Config
from lit_gpt.model import GPT
from lit_gpt.peft import METHODS, settings_from_dict

SETTINGS = {
    "lora": lora.LoRASettings(r=4, alpha=8, dropout=0.05, key=True, projection=True, mlp=True, head=True),
    "adapter": adapter.AdapterSettings(prompt_length=4, start_layer=1),
    "adapter_v2": adapter_v2.AdapterV2Settings(prompt_length=4, start_layer=1),
    "bottleneck": bottleneck.BottleneckSettings(targets="query:parallel,fc_1:before,fc_2:before,mlp_proj:after",
                                                size=8, dropout=0.1, learned_scaling=True),
}
method_names = pytest.mark.parametrize("method", sorted(SETTINGS))


def build(method: str, config: Config, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = METHODS[method].apply(GPT(config), SETTINGS[method])
    METHODS[method].mark_trainable(model)
    return model


def perturb_peft_parameters(model: GPT, method: str, seed: int = 1) -> None:
    """Move every PEFT parameter off its identity init, so the tests exercise the adapter paths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in sorted(METHODS[method].peft_parameter_names(model)):
            params[name].add_(0.2 * torch.randn(params[name].shape, generator=g))


def test_registry_and_settings_round_trip():
    assert METHODS == {"lora": lora, "adapter": adapter, "adapter_v2": adapter_v2, "bottleneck": bottleneck}
    for method, settings in SETTINGS.items():
        assert settings_from_dict(method, asdict(settings)) == settings
        assert isinstance(settings_from_dict(method, {}), METHODS[method].Settings)  # all defaults
    assert settings_from_dict("lora", {"r": 16}).r == 16
    with pytest.raises(ValueError, match=r"no field\(s\) \['rank'\]"):
        settings_from_dict("lora", {"rank": 16})
    with pytest.raises(ValueError, match="Unknown PEFT method 'prefix'"):
        settings_from_dict("prefix", {})


@method_names
def test_trainable_set_equals_saved_set(method):
    module = METHODS[method]
    model = build(method, tiny_llama_config(tie_embeddings=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    saved = module.state_dict_to_save(model)
    assert trainable and trainable == set(saved) == module.peft_parameter_names(model)
    params = dict(model.named_parameters())
    assert all(torch.equal(saved[n], params[n]) for n in saved)
    # and they are few: the base model is frozen
    assert sum(t.numel() for t in saved.values()) < 0.5 * sum(p.numel() for p in model.parameters())


@method_names
def test_base_checkpoint_loads_with_exactly_the_peft_keys_missing(method, checkpoint_dir):
    module = METHODS[method]
    config = Config.from_checkpoint(checkpoint_dir)
    base_sd = load_weights_file(checkpoint_dir / WEIGHTS_FILE)
    model = build(method, config, seed=123)  # different random base weights than the checkpoint
    peft = module.peft_parameter_names(model)

    missing = set(model.state_dict()) - set(base_sd) - tied_keys(model)
    assert missing == peft - set(base_sd)
    if method != "adapter_v2":  # Adapter v2 also trains the (base) norm weights, which the checkpoint has
        assert missing == peft
    assert not set(base_sd) - set(model.state_dict())  # no unexpected keys: the wrappers kept the names

    load_into_model(model, base_sd, checkpoint_dir, allowed_missing=peft)
    base = GPT(config)
    load_into_model(base, base_sd, checkpoint_dir)
    x = torch.randint(0, config.padded_vocab_size, (2, 8))
    model.eval()
    assert torch.equal(model(x), base(x))  # base weights in place, PEFT layers still at identity

    broken = dict(base_sd)
    del broken["blocks.0.attn.key.weight"]
    with pytest.raises(CheckpointError, match="missing 1 tensors"):
        load_into_model(build(method, config), broken, checkpoint_dir, allowed_missing=peft)


@method_names
def test_after_no_grad_passes_every_trainable_parameter_learns(method):
    """Regression test for Lit-GPT #1287: inference passes must not freeze any adapter parameter."""
    config = tiny_llama_config()
    model = build(method, config)
    x = torch.randint(0, config.padded_vocab_size, (2, 10))

    model.eval()
    with torch.no_grad():  # the sanity validation before training
        model(x, targets=x)
        model.set_kv_cache(batch_size=2)  # and a generated sample, with no clear_kv_cache() afterwards
        model(x, input_pos=torch.arange(10))
        model(x[:, :1], input_pos=torch.tensor([10]))
    model.train()
    model.eval()
    model.train()

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    # weight_decay=0: a parameter may only move because it got a gradient
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    got_grad = set()
    for _ in range(2):
        loss = model(x[:, :-1], targets=x[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        got_grad |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        optimizer.step()

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got_grad == expected
    assert changed == expected  # every trainable parameter moved, no frozen one did


def greedy(model: GPT, prompt: torch.Tensor, steps: int, cached: bool) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding, either re-running the whole sequence or feeding one token at a time through the KV cache."""
    tokens, logits_seen = prompt.clone(), []
    if cached:
        model.set_kv_cache(batch_size=1)
        logits = model(tokens, input_pos=torch.arange(tokens.size(1)))[:, -1]
    for _ in range(steps):
        if not cached:
            logits = model(tokens)[:, -1]
        logits_seen.append(logits)
        nxt = logits.argmax(-1, keepdim=True)
        pos = tokens.size(1)
        tokens = torch.cat([tokens, nxt], dim=1)
        if cached:
            logits = model(nxt, input_pos=torch.tensor([pos]))[:, -1]
    model.clear_kv_cache()
    return tokens[0].tolist(), logits_seen


@method_names
def test_kv_cached_greedy_decoding_equals_full_forward(method):
    config = tiny_llama_config()
    model = build(method, config).eval()
    perturb_peft_parameters(model, method)
    prompt = torch.randint(0, config.padded_vocab_size, (1, 5))
    with torch.no_grad():
        full_tokens, full_logits = greedy(model, prompt, steps=12, cached=False)
        cached_tokens, cached_logits = greedy(model, prompt, steps=12, cached=True)
    assert cached_tokens == full_tokens
    for a, b in zip(cached_logits, full_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(getattr(m, "_prefix_cache", None) is None for m in model.modules())


@method_names
def test_overfits_a_few_samples(method):
    """Learning happens: on 2 random sequences the loss falls 10x within a few hundred steps.

    About 30 (LoRA), 110 (Adapter), 10 (Adapter v2) and 25 (bottleneck, AdapterH) steps, 0.2-1.5 s
    each on one idle core. The
    prompt-only Adapter has the least capacity on a random frozen model, so it gets the larger step size.
    """
    config = tiny_llama_config(
        vocab_size=64, n_embd=128, n_head=8, n_query_groups=4, intermediate_size=256, block_size=16
    )
    settings, lr = {
        "lora": (lora.LoRASettings(r=8, alpha=16, dropout=0.0), 5e-2),  # the default targets: query and value
        "adapter": (adapter.AdapterSettings(prompt_length=16, start_layer=0), 1e-1),
        "adapter_v2": (adapter_v2.AdapterV2Settings(prompt_length=16, start_layer=0), 5e-2),
        "bottleneck": (bottleneck.BottleneckSettings(preset="adapterh", size=16), 1e-2),
    }[method]
    torch.manual_seed(0)
    model = METHODS[method].apply(GPT(config), settings)
    METHODS[method].mark_trainable(model)
    data = torch.randint(0, config.padded_vocab_size, (2, 9))
    x, y = data[:, :-1], data[:, 1:]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    first = model(x, targets=y).item()
    for step in range(400):
        loss = model(x, targets=y)
        if loss.item() < first / 10:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 10, f"{method}: loss {first:.3f} -> {loss.item():.3f} after {step} steps"
