"""The speed/memory switches of training change how the loss is computed, never its value."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import (
    REPO_ROOT,
    SUBPROCESS_ENV,
    make_checkpoint_dir,
    random_samples,
    template_batch,
    tiny_llama_config,
)
from lit_gpt.args import TrainArgs
from lit_gpt.data import InstructionDataset, collate, collate_packed, shared_prefix_length
from lit_gpt.model import GPT, IGNORE_INDEX
from lit_gpt import adapter, lora


def test_packed_rows_give_each_sample_its_unpacked_loss():
    torch.manual_seed(0)
    model = GPT(tiny_llama_config(vocab_size=64, block_size=64)).eval()
    samples = random_samples(5)
    input_ids, targets, positions = collate_packed([samples[:3], samples[3:]])
    packed = model(input_ids, targets=targets, positions=positions)
    x, y = collate(samples)
    unpacked = model(x, targets=y)  # both are means over the same supervised tokens
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = GPT(tiny_llama_config(vocab_size=64, block_size=64))
    x, y = collate(random_samples(3))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        loss = model(x, targets=y)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", ["none", "lora", "adapter"])
def test_shared_prefix_gives_the_same_loss_and_gradients(method):
    torch.manual_seed(0)
    model = GPT(tiny_llama_config(vocab_size=64, block_size=64, n_layer=2))
    if method == "lora":
        lora.apply(model, lora.LoRASettings(r=4, dropout=0.0, query=True, value=True))
    elif method == "adapter":
        adapter.apply(model, adapter.AdapterSettings(prompt_length=3, start_layer=0))
    for name, p in model.named_parameters():  # PEFT layers start as a no-op; make them count
        if "lora_B" in name or "adapter_gate" in name:
            torch.nn.init.normal_(p, std=0.5)
    x, y = template_batch(template_length=10)
    results = []
    for shared in (0, shared_prefix_length(x, y)):
        model.zero_grad()
        loss = model(x, targets=y, shared_prefix=shared)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert results[1][0] != 0 and len(results[1][1]) == len(results[0][1])
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


TRAINING_LOAD_SCRIPT = r"""
import json, sys
from pathlib import Path
from lightning_fabric import Fabric
from lit_gpt.loading import load_base_model
def status(key):  # VmRSS / VmHWM of this process, bytes
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS, so import-time peaks do not count
before = status("VmRSS")
model, _ = load_base_model(Path(sys.argv[1]), dtype=None, fabric=fabric)
print(json.dumps({"peak": status("VmHWM") - before, "params": sum(p.numel() * 4 for p in model.parameters())}))
"""


def test_loading_a_training_base_holds_one_copy_of_the_weights(tmp_path):
    """The finetune scripts read the base tensor by tensor into the model instead of reading the whole state
    dict and copying it in: loading peaks at about the model's size, not twice it. (On a GPU the full state
    dict used to sit in host memory: 15 GB for a 7B base.) Measured here: 1.14x the weights, 2.11x before."""
    directory = make_checkpoint_dir(tmp_path / "base", n_layer=4, n_embd=512, n_head=8, n_query_groups=8,
                                    intermediate_size=2048)
    result = subprocess.run([sys.executable, "-c", TRAINING_LOAD_SCRIPT, str(directory)], cwd=REPO_ROOT,
                            capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["params"] > 50e6  # big enough that a second copy stands far above allocator noise
    assert measured["peak"] < 1.4 * measured["params"], measured


def test_the_optimizer_is_fused_adamw_with_the_run_settings():
    from lit_gpt import training

    model = torch.nn.Linear(3, 4)
    model.frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    params = [model.weight, model.bias]
    optimizer = training.adamw(model, TrainArgs(learning_rate=3e-3, weight_decay=0.1))
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["fused"]) == (3e-3, 0.1, True)
    assert [id(p) for p in group["params"]] == [id(p) for p in params]  # the trainable ones, not the frozen one
    reference = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params], lr=3e-3, weight_decay=0.1)
    for p, q in zip(params, reference.param_groups[0]["params"]):
        p.grad = q.grad = torch.ones_like(p)
    optimizer.step()
    reference.step()
    for p, q in zip(params, reference.param_groups[0]["params"]):
        torch.testing.assert_close(p, q)  # the same update as the per-tensor loop


def test_the_optimizer_is_not_fused_under_fsdp():
    from types import SimpleNamespace

    from lightning_fabric.strategies import FSDPStrategy

    from lit_gpt import training

    fsdp_fabric = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))  # FSDP itself needs GPUs
    optimizer = training.adamw(torch.nn.Linear(3, 2), TrainArgs(), fsdp_fabric)
    assert not optimizer.param_groups[0]["fused"]


def _templated_varied_dataset(n: int = 11) -> InstructionDataset:
    """n samples of different lengths that begin with one 12-token template carrying no loss."""
    g = torch.Generator().manual_seed(3)
    template = list(range(40, 52))
    sequences, prompts = [], []
    for i in range(n):
        own = torch.randint(1, 40, (2 + (7 * i) % 11,), generator=g).tolist()
        sequences.append(torch.tensor(template + own))
        prompts.append(len(template) + 1)
    return InstructionDataset.from_sequences(sequences, prompts)


@pytest.mark.parametrize("share_prefix", [False, True])
def test_validation_loss_is_the_token_mean_over_the_first_batches_whatever_the_batching(share_prefix):
    from lightning_fabric import Fabric

    from lit_gpt import training
    from lit_gpt.args import EvalArgs

    torch.manual_seed(0)
    model = GPT(tiny_llama_config(vocab_size=64, block_size=64, n_layer=2))
    dataset = _templated_varied_dataset(11)
    assert shared_prefix_length(*collate([dataset[i] for i in range(4)])) >= 12  # there is a prefix to share
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    for max_iters, micro in ((2, 4), (100, 3)):  # the first 8 samples; all 11
        n = min(len(dataset), max_iters * micro)
        with torch.no_grad():  # reference: each sample alone, summed over its loss-carrying tokens
            total, count = 0.0, 0
            for i in range(n):
                x, y = collate([dataset[i]])
                supervised = int((y != IGNORE_INDEX).sum())
                total += float(model(x, targets=y)) * supervised
                count += supervised
        got = training.validate(fabric, model, dataset, EvalArgs(max_iters=max_iters), micro, share_prefix)
        assert got == pytest.approx(total / count, rel=1e-6)
    assert model.training  # validation hands the model back in training mode


def test_time_spent_paused_is_left_out_of_the_training_speed(tmp_path):
    import time

    from lightning_fabric import Fabric

    from lit_gpt import training

    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    progress = training.ProgressLog(fabric, tmp_path, total_steps=2, start_step=0)
    with progress.paused():  # a validation run, say
        time.sleep(0.5)
    progress.update(1, tokens=100, supervised=50)
    speed = progress.throughput()
    progress.close()
    assert speed["step_time_s"] < 0.25, speed  # the 0.5 s pause is not a step's time
    assert speed["tokens_per_s"] > 400, speed
