"""Left-padded batched generation computes, for every row, what that row computes alone."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama_config
from lit_gpt import adapter, lora
from lit_gpt.generation import generate, generate_batch
from lit_gpt.model import GPT


def _perturbed(model: GPT) -> GPT:
    """Move every parameter off its init (so PEFT layers are not the identity)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("peft", [None, "lora", "adapter"])
def test_batched_greedy_equals_one_prompt_at_a_time(peft):
    torch.manual_seed(0)
    model = GPT(tiny_llama_config(vocab_size=64, block_size=64, rotary_percentage=0.5))
    if peft == "lora":
        lora.apply(model, lora.LoRASettings(r=4, alpha=8, dropout=0.0))
    elif peft == "adapter":
        adapter.apply(model, adapter.AdapterSettings(prompt_length=3, start_layer=0))
    model = _perturbed(model)
    prompts = [torch.randint(0, 64, (n,)) for n in (3, 11, 6, 1)]
    one_by_one = [list(generate(model, p, 15, temperature=0.0)) for p in prompts]
    assert generate_batch(model, prompts, 15) == one_by_one


def test_padded_rows_get_the_logits_they_get_alone():
    torch.manual_seed(1)
    model = _perturbed(GPT(tiny_llama_config(vocab_size=64, block_size=64)))
    short, long = torch.randint(0, 64, (4,)), torch.randint(0, 64, (9,))
    with torch.no_grad():
        alone = model(short[None])[0, -1]
        model.set_kv_cache(batch_size=2, max_seq_length=9)
        batch = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), short]), long])
        logits = model(batch, input_pos=torch.arange(9), pad_lengths=torch.tensor([5, 0]), last_only=True)
    torch.testing.assert_close(logits[0, -1], alone, rtol=0, atol=1e-5)


def test_batched_generation_stops_each_row_at_its_stop_id():
    torch.manual_seed(2)
    model = _perturbed(GPT(tiny_llama_config(vocab_size=64, block_size=64)))
    prompts = [torch.randint(0, 64, (n,)) for n in (2, 5)]
    free = generate_batch(model, prompts, 10)
    stop = free[0][3]
    stopped = generate_batch(model, prompts, 10, stop_ids={stop})
    assert stopped[0] == free[0][: free[0].index(stop)]
    expected_1 = free[1][: free[1].index(stop)] if stop in free[1] else free[1]
    assert stopped[1] == expected_1


def test_too_long_prompt_is_a_clear_error():
    model = GPT(tiny_llama_config(vocab_size=64, block_size=16)).eval()
    with pytest.raises(ValueError, match="longest prompt has 20 tokens"):
        generate_batch(model, [torch.zeros(20, dtype=torch.long)], 4)
