"""--quantize (lit_gpt/quantize.py): bitsandbytes 4/8-bit frozen base weights, on CPU.

What is proven here:
- each quantized weight is within its format's rounding error of the float weight, and the layers (plain,
  LoRA, Adapter-v2) compute through exactly that quantized weight; gradients reach the trainable parameters
  and the input, never the quantized weight;
- loading streams the checkpoint: peak memory is about the quantized size (subprocess, ~100M-parameter
  random checkpoint), while a full-precision load peaks at the full size;
- finetune/lora.py, adapter.py and adapter_v2.py with --quantize bnb.nf4 lower the loss, change only the
  method's weights and save only them; generate/*.py load them quantized; --devices 2 trains (slow);
- bad input (unknown mode, int8-training, MPS, mixed precision, FSDP, no bitsandbytes, merging into a
  quantized weight, --quantize on full.py) fails with a message that says what to do.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import lightning_fabric  # noqa: F401  (imported now: its log handler must bind the real stderr, not a test's capsys)
import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_file

bnb = pytest.importorskip("bitsandbytes")

from lit_gpt import lora, quantize  # noqa: E402
from lit_gpt.adapter_v2 import AdapterV2Linear  # noqa: E402
from lit_gpt.args import EvalArgs, TrainArgs  # noqa: E402
from lit_gpt.checkpoint import WEIGHTS_FILE  # noqa: E402
from lit_gpt.loading import load_base_model  # noqa: E402
from lit_gpt.kernels import Linear  # noqa: E402
from lit_gpt.prepare import Example, prepare_instruction_data  # noqa: E402
from lit_gpt.quantize import QuantizeError, check_quantize  # noqa: E402

from conftest import SUBPROCESS_ENV, make_checkpoint_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FOUR_BIT = ["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """The float matrix a bitsandbytes parameter stands for."""
    if hasattr(weight, "quant_state"):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    return weight.data.float() * weight.SCB[:, None] / 127


# --- the quantized weights and layers ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", FOUR_BIT)
def test_4bit_weight_is_within_half_a_code_step_of_each_blocks_absmax(mode):
    """4-bit: each block of 64 weights is scaled by its absmax into [-1, 1] and rounded to the nearest of 16
    code values, so |w - q(w)| <= absmax_block * (largest gap between neighbouring codes) / 2: 0.139 for NF4
    (between 0.723 and 1.0), 0.167 for FP4. Double quantization stores the absmaxes themselves in 8 bits
    (minus their mean, blockwise over 256 of them), so the codes are scaled by a rounded absmax' and the
    bound gains |absmax' - absmax| (codes are at most 1 in magnitude)."""
    torch.manual_seed(0)
    w = torch.randn(96, 256) * torch.linspace(0.1, 3, 96)[:, None]  # rows of different scales
    q = quantize.quantize_weight(w, mode, "cpu")
    assert q.dtype == torch.uint8 and q.numel() == w.numel() // 2 and not q.requires_grad
    blocksize = q.quant_state.blocksize
    assert blocksize == 64
    code = bnb.functional.get_4bit_type(mode.removeprefix("bnb.").split("-")[0], device="cpu").sort().values
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    absmax = w.reshape(-1, blocksize).abs().amax(dim=1, keepdim=True)
    error = (w - dequantized(q)).reshape(-1, blocksize).abs()
    bound = absmax * half_gap + 1e-6
    state = q.quant_state
    if mode.endswith("-dq"):
        assert state.nested
        stored = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        bound = bound + (stored[:, None] - absmax).abs()
        assert float(((stored[:, None] - absmax).abs() / absmax).median()) < 0.01  # 8 bits: small for most blocks
    assert (error <= bound).all(), float((error / absmax).max())
    assert float((error / absmax).mean()) < half_gap / 2  # and typically well inside it


def test_int8_weight_is_within_half_a_step_of_each_rows_absmax():
    """LLM.int8(): each row is scaled by absmax/127 and rounded to an int8 code, so |w - q(w)| is half a step
    (absmax_row / 254) for exact rounding. bitsandbytes' CPU kernel stores the row scale SCB in half precision
    and rounds in reduced precision, so a few codes land one past the nearest (measured: 0.526 step at
    worst): the bound is one step, and the mean error must be that of rounding to nearest (1/4 step)."""
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 2
    q = quantize.quantize_weight(w, "bnb.int8", "cpu")
    assert q.dtype == torch.int8
    absmax = w.abs().amax(dim=1, keepdim=True)
    assert float(((q.SCB[:, None] - absmax).abs() / absmax).max()) < 1e-3
    steps = (w - dequantized(q)).abs() / (q.SCB[:, None] / 127)
    assert float(steps.max()) <= 1.0
    assert float(steps.mean()) < 0.27


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.fp4-dq", "bnb.int8"])
def test_layers_compute_through_the_quantized_weight(mode):
    """Plain, LoRA and Adapter-v2 layers equal x @ q(W)ᵀ (+ their update); gradients reach x and the PEFT
    parameters, and the quantized weight has none."""
    torch.manual_seed(0)
    w, bias, x = torch.randn(40, 64), torch.randn(40), torch.randn(3, 5, 64)
    q = quantize.quantize_weight(w, mode, "cpu")
    reference = x @ dequantized(q).T + bias
    atol = 1e-4 if mode != "bnb.int8" else 0.05 * float(reference.abs().max())  # int8 also quantizes x
    plain = quantize.QuantizedLinear(64, 40, device="meta")
    plain.weight, plain.bias = q, nn.Parameter(bias)
    torch.testing.assert_close(plain(x), reference, atol=atol, rtol=0)

    wrapped = lora.LoRALinear(plain, r=4, alpha=8)
    assert wrapped.weight is q and wrapped.lora_A.dtype == torch.float32
    nn.init.normal_(wrapped.lora_B)
    delta = 2.0 * x @ (wrapped.lora_B @ wrapped.lora_A).T
    xg = x.clone().requires_grad_(True)
    out = wrapped(xg)
    torch.testing.assert_close(out, reference + delta, atol=atol, rtol=0)
    out.sum().backward()
    assert xg.grad is not None and wrapped.lora_A.grad is not None and q.grad is None

    v2 = AdapterV2Linear(plain)
    with torch.no_grad():
        v2.adapter_scale.uniform_(0.5, 1.5)
        v2.adapter_bias.normal_()
    torch.testing.assert_close(v2(x), v2.adapter_scale * (reference + v2.adapter_bias), atol=2 * atol, rtol=0)

    with pytest.raises(QuantizeError, match="scripts/merge_lora.py"):
        wrapped.merge_weights()


@pytest.mark.parametrize("tie", [False, True])
def test_load_base_model_quantizes_every_untied_linear(tmp_path, tie):
    directory = make_checkpoint_dir(tmp_path / "ckpt", n_embd=64, intermediate_size=128, tie_embeddings=tie)
    full, _ = load_base_model(directory)
    model, config = load_base_model(directory, quantize="bnb.nf4")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 7 * config.n_layer + 1
    for name, module in linears.items():
        if name == "lm_head" and tie:
            assert type(module) is Linear and module.weight is model.wte.weight  # the embedding stays float
        else:
            assert type(module) is quantize.QuantizedLinear and quantize.is_quantized(module.weight), name
    assert not any(p.is_meta for p in model.parameters())
    idx = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        logits, reference = model(idx), full(idx)
    # Each weight is off by <= 0.14 x its block's absmax; over 2 layers the logits stay close, not equal.
    assert 0 < float((logits - reference).abs().max()) < 0.5 * float(reference.abs().max())


# --- peak memory of loading --------------------------------------------------------------------------------
MEMORY_SCRIPT = r"""
import json, resource, sys, torch
from lit_gpt.loading import load_base_model
import bitsandbytes  # imported before the baseline: its import alone is ~100 MB
def status(key):  # VmRSS / VmHWM of this process, bytes
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS, so import-time peaks do not count
before = status("VmRSS")
model, _ = load_base_model(sys.argv[1], quantize=None if sys.argv[2] == "none" else sys.argv[2])
with torch.no_grad():  # touch every weight: a plain safetensors load is lazy (mmap) until used
    sum(float(p.float().sum()) for p in model.parameters())
stored = sum(p.untyped_storage().nbytes() for p in model.parameters())
stored += sum(p.quant_state.absmax.nbytes for p in model.parameters() if getattr(p, "quant_state", None) is not None)
print(json.dumps({"peak": status("VmHWM") - before, "stored": stored}))
"""


@pytest.mark.slow
def test_quantized_load_peaks_near_the_quantized_size(tmp_path):
    """A 6-layer, 1024-wide model (~100M parameters, 405 MB in fp32): a full load peaks at >= its full size;
    an NF4 load at <= its quantized size (0.5 byte/param + one fp32 absmax per 64) plus 8 x the largest
    float tensor (the one tensor being read, its copy, and bitsandbytes' CPU quantization temporaries),
    which is well under half of the full load's peak. Peaks are VmHWM after resetting it (clear_refs 5),
    so import-time allocations do not count: measured 414 MB full, 160 MB NF4 (58 MB stored)."""
    writer = "import sys; sys.path.insert(0, 'tests'); from conftest import make_checkpoint_dir; " \
             "from pathlib import Path; make_checkpoint_dir(Path(sys.argv[1]), n_layer=6, n_embd=1024, n_head=16, " \
             "n_query_groups=16, intermediate_size=4096)"
    directory = tmp_path / "big"
    subprocess.run([sys.executable, "-c", writer, str(directory)], cwd=ROOT, check=True, env=SUBPROCESS_ENV)
    file_size = (directory / WEIGHTS_FILE).stat().st_size
    largest = 4096 * 1024 * 4

    def measure(mode: str) -> dict:
        result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(directory), mode], cwd=ROOT,
                                capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    full, nf4 = measure("none"), measure("bnb.nf4")
    print(f"\nfile {file_size / 1e6:.0f} MB; full load peak {full['peak'] / 1e6:.0f} MB; "
          f"nf4 load peak {nf4['peak'] / 1e6:.0f} MB (quantized model {nf4['stored'] / 1e6:.0f} MB)")
    assert full["peak"] >= 0.95 * file_size
    assert nf4["stored"] <= 0.15 * file_size  # 4 bits + absmax ~ 1/7 of fp32
    assert nf4["peak"] <= nf4["stored"] + 8 * largest
    assert nf4["peak"] < 0.5 * full["peak"]


# --- the scripts ------------------------------------------------------------------------------------------
PAIRS = [("Add 12 and 30.", "42"), ("What is the capital of France?", "Paris is the capital of France."),
         ("Name a quick animal.", "The quick brown fox."), ("Write a Unicode word.", "café")]
RUNS = {"lora": dict(lr=2e-2, settings=dict(lora_r=8, lora_mlp=True)),
        "adapter": dict(lr=3e-1, settings=dict(adapter_start_layer=0)),
        "adapter_v2": dict(lr=5e-2, settings=dict(adapter_start_layer=0))}
STEPS = 30


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_checkpoint_dir(tmp_path_factory.mktemp("qbase"), n_embd=64, intermediate_size=128)


@pytest.fixture(scope="module")
def data(base, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("qdata")
    examples = [Example(instruction=i, input="", output=o) for i, o in PAIRS]
    prepare_instruction_data(examples, base, directory, val_split_fraction=0.0, progress=False)
    shutil.copy(directory / "train.safetensors", directory / "val.safetensors")
    return directory


def load_script(relative: str):
    name = "qscript_" + relative.removesuffix(".py").replace("/", "_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def train_args(**overrides) -> TrainArgs:
    values = dict(micro_batch_size=2, global_batch_size=4, warmup_steps=0, max_steps=STEPS, save_interval=1000,
                  log_interval=1)
    return TrainArgs(**{**values, **overrides})


def val_losses(out_dir: Path) -> dict[int, float]:
    with open(out_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == "val_loss"}


@pytest.mark.parametrize("method", ["lora", "adapter", "adapter_v2"])
def test_finetune_with_nf4_base_learns_and_saves_only_the_method_weights(method, base, data, tmp_path,
                                                                          monkeypatch, capsys):
    out_dir = tmp_path / "out"
    run = RUNS[method]
    load_script(f"finetune/{method}.py").setup(
        checkpoint_dir=base, data_dir=data, out_dir=out_dir, precision="32-true", quantize="bnb.nf4",
        train=train_args(learning_rate=run["lr"]), eval=EvalArgs(interval=STEPS, max_new_tokens=4),
        **run["settings"],
    )
    losses = val_losses(out_dir)
    assert losses[STEPS] < 0.8 * losses[0], losses
    final = out_dir / "final"
    hparams = yaml.safe_load((final / "hyperparameters.yaml").read_text())
    assert hparams["quantize"] == "bnb.nf4"
    saved = load_file(str(final / f"{method}.safetensors"))

    # The saved set is exactly the method's parameters of a model built the same way, all float, all changed.
    module = {"lora": lora, "adapter": __import__("lit_gpt.adapter").adapter,
              "adapter_v2": __import__("lit_gpt.adapter_v2").adapter_v2}[method]
    from lit_gpt.peft import settings_from_dict

    fresh, _ = load_base_model(base, "cpu", torch.float32, "bnb.nf4")
    module.apply(fresh, settings_from_dict(method, hparams["settings"]))
    assert set(saved) == module.peft_parameter_names(fresh)
    assert all(t.is_floating_point() for t in saved.values())
    initial = dict(fresh.named_parameters())
    changed = [k for k, v in saved.items() if not torch.equal(v, initial[k])]
    assert len(changed) >= len(saved) - 1  # (an adapter gate can stay 0 only where its prompt had no effect)

    # Generation loads the base quantized plus the saved weights.
    script = f"generate/{method}.py"
    monkeypatch.setattr(sys, "argv", [script, "--finetuned_dir", str(final), "--prompt", PAIRS[0][0],
                                      "--temperature", "0", "--max_new_tokens", "3", "--quantize", "bnb.nf4"])
    runpy.run_path(str(ROOT / script), run_name="__main__")
    err = capsys.readouterr().err
    assert "tokens/s" in err


def test_training_changes_only_the_lora_weights(base):
    """In-process: a few optimizer steps on an NF4 base leave every quantized byte and every frozen float alone."""
    model, config = load_base_model(base, "cpu", torch.float32, "bnb.nf4")
    lora.apply(model, lora.LoRASettings(r=4, mlp=True))
    lora.mark_trainable(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    idx = torch.randint(0, config.vocab_size, (2, 12))
    for _ in range(3):
        loss = model(idx, targets=idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trainable = lora.peft_parameter_names(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]) != (name in trainable and "lora_" in name), name


def test_generate_base_and_chat_quantized(base, tmp_path, monkeypatch, capsys):
    chat_dir = shutil.copytree(base, tmp_path / "chat")
    config = json.loads((chat_dir / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    (chat_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    for script, mode, directory in (("generate/base.py", "bnb.nf4-dq", base), ("generate/chat.py", "bnb.int8", chat_dir),
                                    ("generate/base.py", "bnb.fp4", base)):
        monkeypatch.setattr(sys, "argv", [script, "--checkpoint_dir", str(directory), "--prompt", "The quick",
                                          "--max_new_tokens", "4", "--temperature", "0", "--quantize", mode])
        runpy.run_path(str(ROOT / script), run_name="__main__")
        assert "tokens" in capsys.readouterr().err


@pytest.mark.slow
def test_two_cpu_processes_train_a_quantized_base(base, data, tmp_path):
    out_dir = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "finetune/lora.py", "--checkpoint_dir", str(base), "--data_dir", str(data),
         "--out_dir", str(out_dir), "--devices", "2", "--quantize", "bnb.nf4", "--precision", "32-true",
         "--lora_mlp", "true", "--train.learning_rate", "2e-2", "--train.micro_batch_size", "1",
         "--train.global_batch_size", "4", "--train.max_steps", str(STEPS), "--train.warmup_steps", "0",
         "--train.log_interval", "5", "--eval.interval", str(STEPS), "--eval.max_new_tokens", "2"],
        cwd=ROOT, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = val_losses(out_dir)
    assert losses[STEPS] < 0.8 * losses[0], losses
    assert (out_dir / "final" / "lora.safetensors").is_file()


# --- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(quantize="bnb.int4"), "Unknown --quantize 'bnb.int4'"),
        (dict(quantize="bnb.int8-training"), "use --quantize bnb.int8"),
        (dict(quantize="bnb.nf4", device_type="mps"), "no Apple MPS backend.*--precision 16-true"),
        (dict(quantize="bnb.nf4", precision="bf16-mixed"), "needs a '-true' precision.*bf16-true"),
        (dict(quantize="bnb.nf4", strategy="fsdp"), "--strategy ddp"),
    ],
)
def test_bad_combinations_say_what_to_do(kwargs, message):
    args = {"device_type": "cpu", "precision": "32-true", "strategy": "auto", **kwargs}
    with pytest.raises(QuantizeError, match=message):
        check_quantize(args.pop("quantize"), **args)


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(QuantizeError, match=r"pip install 'bitsandbytes>=0.45'"):
        check_quantize("bnb.nf4", "cpu", "32-true")
    assert check_quantize(None, "cpu", "32-true") is None  # no --quantize: bitsandbytes is not needed


def test_old_bitsandbytes_is_rejected(monkeypatch):
    monkeypatch.setattr(bnb, "__version__", "0.42.0")
    with pytest.raises(QuantizeError, match=">= 0.45"):
        check_quantize("bnb.nf4", "cpu", "32-true")


def test_cli_errors(base, data, tmp_path, monkeypatch, capsys):
    def run(script, *args):
        monkeypatch.setattr(sys, "argv", [script, *args])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        return exit_info.value.code, capsys.readouterr().err

    common = ["--checkpoint_dir", str(base), "--data_dir", str(data), "--out_dir", str(tmp_path / "o")]
    code, err = run("finetune/lora.py", *common, "--quantize", "bnb.int4")
    assert code != 0 and "Unknown --quantize" in err and "Traceback" not in err
    code, err = run("finetune/lora.py", *common, "--quantize", "bnb.nf4", "--precision", "bf16-mixed")
    assert code != 0 and "'-true' precision" in err
    code, err = run("finetune/full.py", *common, "--quantize", "bnb.nf4")
    assert code != 0 and "quantize" in err  # full finetuning has no --quantize (see its docstring)
    code, err = run("generate/base.py", "--checkpoint_dir", str(base), "--quantize", "bnb.int8-training")
    assert code != 0 and "bnb.int8" in err


def test_lora_merge_of_a_quantized_model_points_to_merge_lora(base):
    model, _ = load_base_model(base, "cpu", torch.float32, "bnb.nf4")
    lora.apply(model, lora.LoRASettings())
    with pytest.raises(QuantizeError, match="merge_lora.py"):
        lora.merge(model)
