"""lit_gpt.loading: the start-up of the generate/eval scripts, the base-checkpoint loader and the loader of any
finetune output directory (the method read from its hyperparameters.yaml)."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import yaml
from lightning_fabric import Fabric

from lit_gpt import adapter, adapter_v2, lora, outputs
from lit_gpt.checkpoint import WEIGHTS_FILE, CheckpointError, base_fingerprint, load_weights_file, model_state_dict
from lit_gpt.config import Config
from lit_gpt.kernels import Linear
from lit_gpt.loading import load_base_model, load_finetuned, start_inference
from lit_gpt.model import GPT
from lit_gpt.peft import METHODS

from conftest import make_checkpoint_dir

SETTINGS = {
    "lora": lora.LoRASettings(r=4, alpha=8, dropout=0.0, key=True, mlp=True),
    "adapter": adapter.AdapterSettings(prompt_length=3, start_layer=1),
    "adapter_v2": adapter_v2.AdapterV2Settings(prompt_length=3, start_layer=1),
}


def write_finetuned_dir(method: str, checkpoint_dir, out, seed: int = 3, settings=None):
    """An output directory as finetune/<method>.py writes it, with the method's weights moved off their init;
    returns (directory, the model those weights came from)."""
    module = METHODS[method]
    settings = settings or SETTINGS[method]
    torch.manual_seed(seed)
    model = module.apply(GPT(Config.from_checkpoint(checkpoint_dir)), settings)
    with torch.no_grad():
        for name in sorted(module.peft_parameter_names(model)):
            model.get_parameter(name).add_(0.3 * torch.randn_like(model.get_parameter(name)))
    base = load_weights_file(checkpoint_dir / WEIGHTS_FILE)
    own = module.peft_parameter_names(model)
    model.load_state_dict({k: v for k, v in base.items() if k not in own}, strict=False)
    hparams = outputs.run_hyperparameters(method, settings, checkpoint_dir=checkpoint_dir)
    hparams["base_fingerprint"] = base_fingerprint(checkpoint_dir)
    outputs.save_output_dir(Fabric(accelerator="cpu", devices=1), out, module.state_dict_to_save(model),
                            module.WEIGHTS_FILE, hparams, checkpoint_dir)
    return out, model.eval()


def test_every_registered_method_keeps_the_contract():
    """What the loop, the loaders and the scripts rely on: each module names itself and its weights file, and
    has the contract's functions (lit_gpt/peft.py's docstring)."""
    files = set()
    for name, module in METHODS.items():
        assert module.NAME == name
        assert module.WEIGHTS_FILE == f"{name}.safetensors" and module.WEIGHTS_FILE != WEIGHTS_FILE
        files.add(module.WEIGHTS_FILE)
        for function in ("apply", "peft_parameter_names", "mark_trainable", "state_dict_to_save"):
            assert callable(getattr(module, function)), (name, function)
        assert isinstance(module.Settings(), module.Settings)  # every setting has a default
    assert len(files) == len(METHODS)


# --- load_base_model -----------------------------------------------------------------------------------------
def test_base_model_for_inference_is_packed_in_eval_mode_and_for_training_is_not(checkpoint_dir):
    model, config = load_base_model(checkpoint_dir)
    assert not model.training and config.name == Config.from_checkpoint(checkpoint_dir).name
    q, k = model.blocks[0].attn.query.weight, model.blocks[0].attn.key.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()  # packed: one buffer per group
    trained, _ = load_base_model(checkpoint_dir, fabric=Fabric(accelerator="cpu", devices=1))
    assert trained.training and all(p.requires_grad for p in trained.parameters())
    q, k = trained.blocks[0].attn.query.weight, trained.blocks[0].attn.key.weight
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    idx = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), trained(idx), rtol=0, atol=0)  # same weights, same function


def test_a_truncated_weights_file_is_named(tmp_path):
    directory = make_checkpoint_dir(tmp_path / "ckpt")
    data = (directory / WEIGHTS_FILE).read_bytes()
    (directory / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"lit_model\.safetensors.*truncated or corrupt"):
        load_base_model(directory)


# --- load_base_model (moved from test_generation.py) ----------------------------------------------------------------------------------------------
def test_load_base_model_matches_the_saved_weights(checkpoint_dir):
    from lit_gpt.checkpoint import WEIGHTS_FILE, load_weights_file

    model, config = load_base_model(checkpoint_dir, dtype=torch.bfloat16)
    saved = load_weights_file(checkpoint_dir / WEIGHTS_FILE)
    assert config.name == "tiny-llama" and not model.training
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert tensor.dtype == torch.bfloat16
            assert torch.equal(tensor, saved[name].to(torch.bfloat16))
    assert not any(t.is_meta for t in model.state_dict().values())
    assert model.max_seq_length == config.block_size


def test_load_base_model_keeps_tied_embeddings_tied(tmp_path):
    from conftest import make_checkpoint_dir

    model, _ = load_base_model(make_checkpoint_dir(tmp_path, tie_embeddings=True))
    assert model.lm_head.weight is model.wte.weight and not model.lm_head.weight.is_meta


def test_load_base_model_on_an_invalid_dir_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*download.py"):
        load_base_model(tmp_path / "nope")


# --- load_finetuned ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_a_finetuned_dir_loads_as_the_model_that_wrote_it(method, checkpoint_dir, tmp_path):
    """Any method, read from hyperparameters.yaml: the loaded model computes what the saved one did, and its
    state dict holds exactly the base tensors plus the method's."""
    out, reference = write_finetuned_dir(method, checkpoint_dir, tmp_path / "final")
    model, hparams = load_finetuned(out)
    assert hparams["method"] == method and not model.training
    assert set(model_state_dict(model)) == set(model_state_dict(reference))
    idx = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx))


def test_the_layers_a_method_left_plain_are_packed_for_decoding_and_its_own_are_not(checkpoint_dir, tmp_path):
    """LLaMA-Adapter changes attention, not the projections: they run as one packed product. LoRA on query and
    value leaves no q/k/v group plain, so that group is left unpacked (the MLP's fc_1/fc_2 still pack)."""
    def shares_storage(a, b):
        return a.weight.untyped_storage().data_ptr() == b.weight.untyped_storage().data_ptr()

    adapter_dir, _ = write_finetuned_dir("adapter", checkpoint_dir, tmp_path / "adapter")
    model, _ = load_finetuned(adapter_dir)
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    assert shares_storage(attn.query, attn.key) and shares_storage(mlp.fc_1, mlp.fc_2)
    lora_dir, _ = write_finetuned_dir("lora", checkpoint_dir, tmp_path / "lora", settings=lora.LoRASettings())
    model, _ = load_finetuned(lora_dir, method="lora")  # the default LoRA: query and value
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert not shares_storage(attn.query, attn.key) and shares_storage(mlp.fc_1, mlp.fc_2)


def test_loading_a_finetuned_dir_does_not_move_the_global_rng(checkpoint_dir, tmp_path):
    """The method's layers are initialised and then overwritten: a seeded generation must sample the same
    tokens whether or not a PEFT model was loaded after the seed."""
    out, _ = write_finetuned_dir("lora", checkpoint_dir, tmp_path / "final")
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    load_finetuned(out)
    assert torch.equal(torch.rand(3), expected)


def test_a_full_finetune_dir_loads_as_a_complete_checkpoint(checkpoint_dir, tmp_path):
    out = tmp_path / "full"
    base = load_weights_file(checkpoint_dir / WEIGHTS_FILE)
    hparams = outputs.run_hyperparameters("full", None, checkpoint_dir=checkpoint_dir)
    outputs.save_output_dir(Fabric(accelerator="cpu", devices=1), out, base, WEIGHTS_FILE, hparams, checkpoint_dir)
    model, saved = load_finetuned(out)
    assert saved["method"] == "full"
    assert all(torch.equal(model_state_dict(model)[k], v) for k, v in base.items())


def test_the_wrong_method_or_an_unknown_one_is_refused_by_name(checkpoint_dir, tmp_path):
    out, _ = write_finetuned_dir("adapter", checkpoint_dir, tmp_path / "final")
    with pytest.raises(ValueError, match=r"holds 'adapter' weights, not 'lora'.*generate/finetuned.py"):
        load_finetuned(out, method="lora")
    hparams = yaml.safe_load((out / "hyperparameters.yaml").read_text())
    (out / "hyperparameters.yaml").write_text(yaml.safe_dump({**hparams, "method": "prefix"}))
    with pytest.raises(ValueError, match=r"names method 'prefix'; known methods: \['adapter', 'adapter_v2'"):
        load_finetuned(out)


def test_settings_come_from_the_directory_not_from_defaults(checkpoint_dir, tmp_path):
    """A rank-4 LoRA with key and MLP targets loads as such, although the defaults are rank 8 on query and value."""
    out, _ = write_finetuned_dir("lora", checkpoint_dir, tmp_path / "final")
    model, hparams = load_finetuned(out)
    assert hparams["settings"] == asdict(SETTINGS["lora"])
    assert isinstance(model.blocks[0].mlp.fc_1, lora.LoRALinear) and model.blocks[0].mlp.fc_1.lora_A.shape[0] == 4
    assert type(model.blocks[0].attn.proj) is Linear  # not a target: left plain


# --- start_inference -----------------------------------------------------------------------------------------
def test_start_inference_checks_its_flags_and_seeds():
    runtime = start_inference(seed=7)
    drawn = torch.rand(2)
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.rand(2))
    assert runtime.device_type == "cpu" and runtime.precision == "32-true" and runtime.dtype == torch.float32
    assert runtime.quantize is None and runtime.device == torch.device("cpu")
    with pytest.raises(ValueError, match="Unknown precision 'fp8'"):
        start_inference(precision="fp8")
    with pytest.raises(ValueError, match="Unknown --quantize 'int3'"):
        start_inference(quantize="int3")
