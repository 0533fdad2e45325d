"""The speed/memory switches of training change how the loss is computed, never its value."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, SUBPROCESS_ENV, make_checkpoint_dir, tiny_llama_config
from lit_gpt.args import TrainArgs
from lit_gpt.data import MIN_SHARED_PREFIX, InstructionDataset, collate, collate_packed, shared_prefix_length
from lit_gpt.model import GPT, IGNORE_INDEX, supervised_cross_entropy
from lit_gpt import adapter, lora
from lit_gpt.training import BatchStream, DataPosition


def _samples(n: int, seed: int = 0, vocab: int = 64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 14, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 3] = IGNORE_INDEX  # a masked prompt
        out.append((ids, labels))
    return out


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
    from lit_gpt.model import fused_head_terms

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


def test_rms_norm_backward_equals_autograd_through_rms_norm():
    from lit_gpt.model import RMSNorm, RMSNormFunction

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


def test_packed_rows_give_each_sample_its_unpacked_loss():
    torch.manual_seed(0)
    model = GPT(tiny_llama_config(vocab_size=64, block_size=64)).eval()
    samples = _samples(5)
    input_ids, targets, positions = collate_packed([samples[:3], samples[3:]])
    packed = model(input_ids, targets=targets, positions=positions)
    x, y = collate(samples)
    unpacked = model(x, targets=y)  # both are means over the same supervised tokens
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = GPT(tiny_llama_config(vocab_size=64, block_size=64))
    x, y = collate(_samples(3))
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


def _template_batch(template_length: int = 10, seed: int = 0):
    """Three samples that all begin with the same masked template, as collate batches them."""
    g = torch.Generator().manual_seed(seed)
    template = torch.randint(0, 64, (template_length,), generator=g)
    samples = []
    for length, prompt in ((9, 4), (14, 6), (6, 2)):  # after the template: own prompt tokens, then a response
        ids = torch.cat((template, torch.randint(0, 64, (length,), generator=g)))
        labels = ids.clone()
        labels[: template_length + prompt] = IGNORE_INDEX
        samples.append((ids, labels))
    return collate(samples)


def test_shared_prefix_length_is_the_template_without_loss():
    x, y = _template_batch(template_length=10)
    assert shared_prefix_length(x, y) == 10
    y[1, 8] = 5  # a position that carries loss ends the shared part there
    assert shared_prefix_length(x, y) == 8
    assert shared_prefix_length(x[:1], y[:1]) == 0  # one row: nothing to share
    short_x, short_y = _template_batch(template_length=MIN_SHARED_PREFIX - 1)
    assert shared_prefix_length(short_x, short_y) == 0  # too short to pay off
    same = x[:1].repeat(2, 1)
    assert shared_prefix_length(same, torch.full_like(same, IGNORE_INDEX)) == x.size(1) - 1  # a row keeps a token


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
    x, y = _template_batch(template_length=10)
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


def _templated_dataset() -> InstructionDataset:
    """8 samples that all begin with the same 12-token template, which carries no loss."""
    template = list(range(40, 52))
    sequences = [torch.tensor(template + [i % 7 + 1] * (3 + i % 5)) for i in range(8)]
    return InstructionDataset.from_sequences(sequences, [len(template) + 1] * 8)


def test_batches_carry_their_shared_prefix_unless_turned_off(monkeypatch):
    import lit_gpt.training

    monkeypatch.setattr(lit_gpt.training, "accelerator", lambda: "cpu")  # the default depends on the device
    dataset = _templated_dataset()
    for flags, expected in (({}, 12), ({"shared_prefix": True}, 12), ({"shared_prefix": False}, 0),
                            ({"shared_prefix": True, "compile": True}, 0)):
        train = TrainArgs(micro_batch_size=4, global_batch_size=4, **flags)
        batch = BatchStream(dataset, train, rank=0, world_size=1).next_step()[0]
        assert batch.shared_prefix == expected
        assert ("shared_prefix" in batch.model_inputs("cpu")) == (expected > 0)


def test_shared_prefix_is_off_by_default_on_a_gpu(monkeypatch):
    import lit_gpt.training

    dataset = _templated_dataset()
    monkeypatch.setattr(lit_gpt.training, "accelerator", lambda: "cuda")
    for flags, expected in (({}, 0), ({"shared_prefix": True}, 12)):
        train = TrainArgs(micro_batch_size=4, global_batch_size=4, **flags)
        assert BatchStream(dataset, train, rank=0, world_size=1).next_step()[0].shared_prefix == expected


def _dataset(n: int) -> InstructionDataset:
    samples = _samples(n, seed=1)
    return InstructionDataset.from_sequences([ids for ids, _ in samples], [len(ids) // 3 for ids, _ in samples])


def _segments(batch) -> list[tuple[int, ...]]:
    """The samples inside packed rows: runs of positions 0, 1, 2, ... (padding is a run of length 1)."""
    out = []
    for ids, pos in zip(batch.input_ids.tolist(), batch.positions.tolist()):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        out += [tuple(ids[a:b]) for a, b in zip(starts, starts[1:]) if b - a > 1]
    return out


def test_packing_uses_every_sample_once_per_epoch():
    dataset = _dataset(23)  # every sample has >= 3 input tokens, so padding runs (length 1) are not samples
    train = TrainArgs(micro_batch_size=2, global_batch_size=4, packing=True, seed=3)
    stream = BatchStream(dataset, train, rank=0, world_size=1)
    packed = []
    while len(packed) < len(dataset):
        for batch in stream.next_step():
            assert batch.input_ids.size(1) <= stream.row_length
            packed += _segments(batch)
    expected = sorted(tuple(dataset[i][0][:-1].tolist()) for i in range(len(dataset)))
    assert sorted(packed[: len(dataset)]) == expected


def test_a_restored_position_continues_with_the_same_batches():
    dataset = _dataset(30)
    for packing in (False, True):
        train = TrainArgs(micro_batch_size=2, global_batch_size=4, packing=packing, seed=5)
        first = BatchStream(dataset, train, rank=0, world_size=1)
        for _ in range(3):
            first.next_step()
        saved = DataPosition(first.position.epoch, first.position.index)
        expected = [first.next_step() for _ in range(6)]
        second = BatchStream(dataset, train, rank=0, world_size=1)
        second.position = saved
        for want in expected:
            got = second.next_step()
            for a, b in zip(want, got):
                assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)


TRAINING_LOAD_SCRIPT = r"""
import json, sys
from pathlib import Path
from lightning_fabric import Fabric
from lit_gpt.quantize import build_base_for_training
def status(key):  # VmRSS / VmHWM of this process, bytes
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS, so import-time peaks do not count
before = status("VmRSS")
model = build_base_for_training(fabric, Path(sys.argv[1]), "32-true", None)
print(json.dumps({"peak": status("VmHWM") - before, "params": sum(p.numel() * 4 for p in model.parameters())}))
"""


def test_loading_a_training_base_holds_one_copy_of_the_weights(tmp_path):
    """The finetune scripts read the base tensor by tensor into the model instead of reading the whole state
    dict and copying it in: loading peaks at about the model's size, not twice it. (On a GPU the full state
    dict used to sit in host memory: 15 GB for a 7B base.) Measured here: 1.11x the weights, 2.11x before."""
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
