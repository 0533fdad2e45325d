"""Bottleneck adapters (lit_gpt/bottleneck.py): the formulas, the parameter counts of LLM-Adapters' arithmetic,
placement on families with other MLPs, the identity at step 0, and the errors a user can meet.

The contract every method keeps (trainable set = saved set, learning, KV-cached decoding, overfitting) is in
test_peft_contract.py; the script end to end (training, generation, resume, merge refusal) in
test_finetune_scripts.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lit_gpt import bottleneck
from lit_gpt.bottleneck import BottleneckLinear, BottleneckSettings
from lit_gpt.config import Config
from lit_gpt.model import GPT

from conftest import tiny_llama_config


def added_parameters(config: Config, settings: BottleneckSettings) -> int:
    with torch.device("meta"):  # a 7B model costs nothing to build on the meta device
        model = bottleneck.apply(GPT(config), settings)
    params = dict(model.named_parameters())
    return sum(params[name].numel() for name in bottleneck.peft_parameter_names(model))


# --- parameter counts against LLM-Adapters' arithmetic ------------------------------------------------------
@pytest.mark.parametrize("preset, expected", [
    ("adapterh", 3 * 2 * 4096 * 256 * 32),  # before gate_proj and up_proj, after down_proj: 201,326,592
    ("adapterp", 1 * 2 * 4096 * 256 * 32),  # after down_proj: 67,108,864
    ("parallel", 3 * 2 * 4096 * 256 * 32),  # beside q, k, v (4096 -> 4096 each): 201,326,592
])
def test_llama_7b_counts_equal_llm_adapters_arithmetic(preset, expected):
    assert expected in (201_326_592, 67_108_864)
    assert added_parameters(Config.from_name("Llama-2-7b-hf"), BottleneckSettings(preset=preset)) == expected


def test_counts_on_a_grouped_query_family():
    """Llama-3-8B: 8 key/value heads of 128, so key and value map 4096 -> 1024; the MLP is 4096 wide in and out."""
    config = Config.from_name("Meta-Llama-3-8B")
    size, layers = 256, 32
    query = 4096 * size + size * 4096
    key_value = 4096 * size + size * 1024
    assert added_parameters(config, BottleneckSettings(preset="parallel")) == layers * (query + 2 * key_value)
    assert added_parameters(config, BottleneckSettings(preset="adapterh")) == layers * 3 * 2 * 4096 * size


def test_a_plain_mlp_family_gets_adapterh_before_fc_and_after_proj():
    """Falcon-7B's MLP is fc -> proj (no fc_1/fc_2): AdapterH puts one adapter before fc, one after proj."""
    config = Config.from_name("falcon-7b")
    assert added_parameters(config, BottleneckSettings(preset="adapterh")) == 32 * 2 * (2 * 4544 * 256)


# --- the formulas, against a plain computation ------------------------------------------------------------
@pytest.mark.parametrize("placement", ["before", "after", "parallel"])
@pytest.mark.parametrize("learned", [False, True])
def test_each_placement_computes_its_formula(placement, learned):
    torch.manual_seed(0)
    linear = nn.Linear(12, 20, bias=True)
    settings = BottleneckSettings(size=5, scaling=0.7, learned_scaling=learned, init="bert")
    layer = BottleneckLinear(linear, placement, settings)
    with torch.no_grad():
        if learned:
            layer.bottleneck_scale.fill_(1.3)
    s = 1.3 if learned else 0.7
    W, b, D, U = linear.weight, linear.bias, layer.bottleneck_down, layer.bottleneck_up
    x = torch.randn(3, 4, 12)

    def adapter(z):  # s * up(tanh(down(z)))
        return s * (torch.tanh(z @ D.T) @ U.T)

    expected = {
        "before": lambda: (x + adapter(x)) @ W.T + b,
        "after": lambda: (x @ W.T + b) + adapter(x @ W.T + b),
        "parallel": lambda: (x @ W.T + b) + adapter(x),
    }[placement]()
    torch.testing.assert_close(layer(x), expected)
    assert D.shape == (5, 20 if placement == "after" else 12)
    assert U.shape == (12 if placement == "before" else 20, 5)


def test_the_adapter_runs_in_float32_in_a_bfloat16_model():
    torch.manual_seed(0)
    layer = BottleneckLinear(nn.Linear(16, 16, bias=False), "parallel", BottleneckSettings(size=4, init="bert"))
    x = torch.randn(2, 16)
    reference = layer.bottleneck(x)  # float32 throughout
    layer.to(torch.bfloat16)
    out = layer.bottleneck(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    expected = 1.0 * torch.tanh(x.bfloat16().float() @ layer.bottleneck_down.float().T) @ layer.bottleneck_up.float().T
    torch.testing.assert_close(out, expected.bfloat16())  # one rounding at the end, not one per product
    torch.testing.assert_close(out.float(), reference, rtol=3e-2, atol=1e-3)


# --- the model at step 0 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(bottleneck.PRESETS))
def test_zero_up_init_starts_as_the_base_model_and_bert_init_does_not(preset):
    config = tiny_llama_config()
    torch.manual_seed(0)
    base = GPT(config).eval()
    x = torch.randint(0, config.vocab_size, (2, 10))
    expected = base(x)
    zero_up = bottleneck.apply(GPT(config), BottleneckSettings(preset=preset, size=8))
    zero_up.load_state_dict(base.state_dict(), strict=False)
    assert torch.equal(zero_up.eval()(x), expected)
    bert = bottleneck.apply(GPT(config), BottleneckSettings(preset=preset, size=8, init="bert"))
    bert.load_state_dict(base.state_dict(), strict=False)
    assert not torch.allclose(bert.eval()(x), expected, atol=1e-6)


# --- settings a user can get wrong ------------------------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    (dict(preset="houlsby"), "--bottleneck_preset 'houlsby' is not one of"),
    (dict(targets="mlp:after"), "'mlp:after' is not 'layer:placement'"),
    (dict(targets="fc_2:beside"), "'fc_2:beside' is not 'layer:placement'"),
    (dict(size=0), "--bottleneck_size 0"),
    (dict(activation="swish"), "--bottleneck_activation 'swish'"),
    (dict(dropout=1.0), "--bottleneck_dropout 1.0"),
    (dict(init="xavier"), "--bottleneck_init 'xavier'"),
])
def test_bad_settings_name_the_flag(values, message):
    with pytest.raises(ValueError, match=message):
        BottleneckSettings(**values)


def test_a_placement_this_family_lacks_is_an_error_that_lists_its_mlp():
    with pytest.raises(ValueError, match=r"matches no layer of this model \(its MLP has \['act', 'fc_1', 'fc_2', 'proj'\]"):
        bottleneck.apply(GPT(tiny_llama_config()), BottleneckSettings(targets="fc:before"))


def test_targets_override_the_preset():
    settings = BottleneckSettings(preset="adapterp", targets="fc_2:parallel, mlp_proj:parallel")
    model = bottleneck.apply(GPT(tiny_llama_config()), settings)
    wrapped = {name: m.placement for name, m in model.named_modules() if isinstance(m, BottleneckLinear)}
    assert wrapped == {f"blocks.{i}.mlp.{layer}": "parallel" for i in range(2) for layer in ("fc_2", "proj")}
