"""End to end: the five finetune scripts on a tiny model and tiny prepared data (CPU), and scripts/merge_lora.py.

What is proven here (DESIGN practices 8, 10-12):
- every script writes its output directory (weights, hyperparameters.yaml, model config, tokenizer), periodic
  checkpoints, metrics.csv (train and val loss) and loss_curve.png, and the matching generate script loads it;
- learning happened: every saved (= trainable) tensor changed, the base weights file is untouched, and a full
  finetune changes every parameter;
- each method overfits four instruction/answer pairs (train loss / 10) and greedy generation through the
  generate script then answers a training instruction with its training answer;
- a run killed with SIGKILL and resumed with --resume true ends bit-identical to an uninterrupted run, also
  after several kills at random moments, inside saves included, each leaving a loadable latest checkpoint;
- --devices 2 (two CPU processes over gloo) logs the same train loss as one process with twice the micro batch;
- bad input fails with "error: ..." naming the flag or file, and no traceback;
- merged LoRA weights give the unmerged model's logits, and the merged directory is a normal checkpoint.

Training runs in this process (the scripts' `setup` loaded from their files, or `runpy` with a command line)
wherever possible; subprocesses only where a process must die, or Fabric must launch processes. Torch runs
on one thread: on a small shared machine, tiny matmuls on two contended threads are ~25x slower.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lit_gpt.args import EvalArgs, TrainArgs
from lit_gpt.checkpoint import WEIGHTS_FILE, CheckpointError, load_weights_file, save_safetensors
from lit_gpt.loading import load_base_model, load_finetuned
from lit_gpt.peft import METHODS
from lit_gpt.prepare import Example, prepare_instruction_data
from lit_gpt.prompts import alpaca_prompt
from lit_gpt.tokenizer import Tokenizer

from conftest import SUBPROCESS_ENV, make_checkpoint_dir, run_script_in_process

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [  # distinct first answer tokens, words the tiny tokenizer knows
    ("Add 12 and 30.", "42"),
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Name a quick animal.", "The quick brown fox."),
    ("Write a Unicode word.", "café"),
]
WEIGHTS = {"lora": "lora.safetensors", "adapter": "adapter.safetensors", "adapter_v2": "adapter_v2.safetensors",
           "bottleneck": "bottleneck.safetensors",
           "full": WEIGHTS_FILE}
GENERATE = {"lora": "generate/lora.py", "adapter": "generate/adapter.py", "adapter_v2": "generate/adapter_v2.py",
            "bottleneck": "generate/bottleneck.py",
            "full": "generate/base.py"}
# Settings under which each method memorises PAIRS in STEPS steps on the tiny base below.
RUNS = {
    "lora": dict(lr=2e-2, settings=dict(lora_r=8, lora_alpha=16, lora_dropout=0.05, lora_mlp=True)),
    "adapter": dict(lr=3e-1, settings=dict(adapter_start_layer=0, adapter_prompt_length=16)),
    "adapter_v2": dict(lr=5e-2, settings=dict(adapter_start_layer=0)),
    # AdapterH's MLP adapters alone cannot tell the four instructions apart on this random base (loss stalls at
    # 0.39); parallel adapters on query and value let attention do it (0.02).
    "bottleneck": dict(lr=1e-2, settings=dict(bottleneck_size=16, bottleneck_targets=(
        "query:parallel,value:parallel,fc_1:before,fc_2:before,mlp_proj:after"))),
    "full": dict(lr=3e-3, settings={}),
}
STEPS, SAVE_INTERVAL = 150, 50


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_script(relative: str):
    """A script file loaded as a module (its `setup`/`main` callable in-process, no interpreter start-up)."""
    name = "script_" + relative.removesuffix(".py").replace("/", "_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]



def run_subprocess(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=SUBPROCESS_ENV)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def losses(out_dir: Path, name: str) -> dict[int, float]:
    with open(out_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == name}


def train_args(**overrides) -> TrainArgs:
    values = dict(micro_batch_size=2, global_batch_size=4, learning_rate=1e-2, warmup_steps=0, weight_decay=0.01,
                  max_steps=STEPS, save_interval=SAVE_INTERVAL, log_interval=1)
    values.update(overrides)
    return TrainArgs(**values)


# --- fixtures: a tiny base, tiny data, one training run per method -----------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random checkpoint with a sharper final norm (x3), like a trained model's.

    A random init gives near-uniform logits that the methods which keep the final norm and LM head frozen
    (LLaMA-Adapter) cannot sharpen: they could never get the loss of memorised answers near zero.
    """
    directory = make_checkpoint_dir(tmp_path_factory.mktemp("base"), n_embd=64, intermediate_size=128)
    state = load_weights_file(directory / WEIGHTS_FILE)
    state["ln_f.weight"] = state["ln_f.weight"] * 3
    save_safetensors(state, directory / WEIGHTS_FILE)
    return directory


@pytest.fixture(scope="module")
def base_hash(base) -> str:
    return sha256(base / WEIGHTS_FILE)


@pytest.fixture(scope="module")
def data(base, tmp_path_factory) -> Path:
    """PAIRS prepared with the base's tokenizer; the validation file holds the same four samples."""
    directory = tmp_path_factory.mktemp("data")
    examples = [Example(instruction=i, input="", output=o) for i, o in PAIRS]
    prepare_instruction_data(examples, base, directory, val_split_fraction=0.0, progress=False)
    shutil.copy(directory / "train.safetensors", directory / "val.safetensors")
    return directory


@pytest.fixture(scope="module")
def trained(base, base_hash, data, tmp_path_factory):
    """method -> out_dir of one in-process run of finetune/<method>.py (each method trains once per module)."""
    cache: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in cache:
            out_dir = tmp_path_factory.mktemp(f"out_{method}")
            run = RUNS[method]
            load_script(f"finetune/{method}.py").setup(
                checkpoint_dir=base, data_dir=data, out_dir=out_dir, precision="32-true",
                train=train_args(learning_rate=run["lr"]), eval=EvalArgs(interval=SAVE_INTERVAL, max_new_tokens=8),
                **run["settings"],
            )
            cache[method] = out_dir
        return cache[method]

    return get


METHOD_NAMES = ["lora", "adapter", "adapter_v2", "bottleneck", "full"]


# --- each script end to end --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_script_writes_a_self_describing_output_dir(method, trained, base, data):
    out_dir = trained(method)
    final = out_dir / "final"
    for name in (WEIGHTS[method], "hyperparameters.yaml", "model_config.yaml", "tokenizer.json"):
        assert (final / name).is_file(), f"{final} lacks {name}: {sorted(p.name for p in final.iterdir())}"
    steps = sorted(p.name for p in out_dir.glob("step-*"))
    assert steps == ["step-000050", "step-000100"]  # every save_interval, the last step is 'final'
    assert all((out_dir / s / WEIGHTS[method]).is_file() for s in steps)
    assert (out_dir / "resume_state.pt").is_file() and (out_dir / "loss_curve.png").stat().st_size > 0
    assert final.stat().st_mode & 0o777 == 0o755  # readable like any directory, not mkdtemp's 0700

    hparams = yaml.safe_load((final / "hyperparameters.yaml").read_text())
    assert hparams["method"] == method
    assert Path(hparams["checkpoint_dir"]) == base and Path(hparams["data_dir"]) == data
    assert hparams["train"]["max_steps"] == STEPS and hparams["precision"] == "32-true"
    expected_settings = {k.split("_", 1)[1]: v for k, v in RUNS[method]["settings"].items()}  # --lora_r: r
    assert expected_settings.items() <= (hparams["settings"] or {}).items()

    train_loss, val_loss = losses(out_dir, "train_loss"), losses(out_dir, "val_loss")
    assert sorted(train_loss) == list(range(1, STEPS + 1))
    assert sorted(val_loss) == [0, 50, 100, 150]
    assert all(math.isfinite(v) for v in [*train_loss.values(), *val_loss.values()])

    if method != "full":  # settings and base come from hyperparameters.yaml alone
        model, _ = load_finetuned(final, method=method)
        assert METHODS[method].peft_parameter_names(model) == set(load_file(final / WEIGHTS[method]))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_trained_tensor_changed_and_the_base_did_not(method, trained, base, base_hash):
    out_dir = trained(method)
    final = load_file(out_dir / "final" / WEIGHTS[method])
    first = load_file(out_dir / "step-000050" / WEIGHTS[method])
    base_state = load_file(base / WEIGHTS_FILE)
    assert sha256(base / WEIGHTS_FILE) == base_hash  # the base checkpoint is never written

    # What was saved is exactly what trained (the resume state holds the trainable parameters).
    resume = torch.load(out_dir / "resume_state.pt", weights_only=True)
    assert set(resume["trainable"]) == set(final)
    unchanged = [k for k in final if torch.equal(final[k], first[k])]
    assert not unchanged, f"{method}: tensors that stopped changing after step 50: {unchanged[:5]}"

    if method == "full":
        assert set(final) == set(base_state)
        unchanged = [k for k in final if torch.equal(final[k], base_state[k])]
        assert not unchanged, f"full finetune left parameters at their base values: {unchanged}"
        return
    initial = {"lora_B": 0.0, "adapter_gate": 0.0, "adapter_bias": 0.0, "adapter_scale": 1.0, "bottleneck_up": 0.0}
    for name, tensor in final.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in initial:
            assert not torch.all(tensor == initial[leaf]), f"{name} is still at its initial value {initial[leaf]}"
        if name in base_state:  # Adapter-v2's norms: trained copies of base tensors
            assert not torch.equal(tensor, base_state[name]), f"{name} equals the base value"
    assert set(final).isdisjoint(base_state) or method == "adapter_v2"


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_overfits_four_answers_and_generates_one_greedily(method, trained, monkeypatch, capsys):
    out_dir = trained(method)
    train_loss = losses(out_dir, "train_loss")
    first, last = train_loss[1], train_loss[STEPS]
    assert last < first / 10, f"{method}: train loss {first:.4f} -> {last:.4f}, not down 10x"

    final = out_dir / "final"
    for instruction, answer in PAIRS:
        if method == "full":  # a full finetune is a normal checkpoint: generate/base.py, prompt spelled out
            prompt = alpaca_prompt(instruction)
            args = ["--checkpoint_dir", str(final), "--prompt", prompt]
        else:
            prompt = ""
            args = ["--finetuned_dir", str(final), "--prompt", instruction]
        code, out, err = run_script_in_process(
            GENERATE[method], *args, "--temperature", "0", "--max_new_tokens", "20", "--precision", "32-true",
            monkeypatch=monkeypatch, capsys=capsys,
        )
        assert code == 0, err
        assert out.startswith(prompt)
        assert out[len(prompt):].strip() == answer, f"{method} answered {instruction!r} with {out[len(prompt):]!r}"
    print(f"{method}: train loss {first:.4f} -> {last:.4f}; all {len(PAIRS)} answers reproduced greedily")


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_generate_finetuned_reads_the_method_and_answers_like_the_method_script(method, trained, monkeypatch, capsys):
    """generate/finetuned.py takes the output directory of any method, a full finetune included, and gives the
    answers the method's own script gave (it reads the method from hyperparameters.yaml)."""
    final = trained(method) / "final"
    for instruction, answer in PAIRS:
        code, out, err = run_script_in_process(
            "generate/finetuned.py", "--finetuned_dir", str(final), "--prompt", instruction, "--temperature", "0",
            "--max_new_tokens", "20", "--precision", "32-true", monkeypatch=monkeypatch, capsys=capsys,
        )
        assert code == 0, err
        assert out.strip() == answer, f"{method} answered {instruction!r} with {out!r}"


# --- exact resume after a real kill ------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical_to_an_uninterrupted_run(base, data, tmp_path, monkeypatch, capsys):
    # LoRA with dropout (the RNG must be restored), micro batch 1 of a global 2 over 4 samples (resumes land
    # mid-epoch, so the data position matters), many short steps (the run cannot finish before it is killed).
    steps, save_interval = 120, 5
    flags = [
        "--checkpoint_dir", str(base), "--data_dir", str(data), "--precision", "32-true",
        "--lora_dropout", "0.2", "--lora_mlp", "true", "--train.learning_rate", "1e-2", "--train.warmup_steps", "3",
        "--train.micro_batch_size", "1", "--train.global_batch_size", "2", "--train.max_steps", str(steps),
        "--train.save_interval", str(save_interval), "--eval.interval", "1000", "--eval.max_new_tokens", "4",
    ]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "finetune/lora.py", *flags, "--out_dir", str(killed)], cwd=ROOT,
                            env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while not (killed / "resume_state.pt").exists():
            assert proc.poll() is None, f"the run ended before saving a resume state:\n{proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no resume_state.pt after 240 s"
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed: raise steps"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final").exists()
    killed_at = int(torch.load(killed / "resume_state.pt", weights_only=True)["step"])
    assert 0 < killed_at < steps and killed_at % save_interval == 0

    code, out, err = run_script_in_process("finetune/lora.py", *flags, "--out_dir", str(killed), "--resume", "true",
                                        monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert f"Resuming from step {killed_at}" in out

    uninterrupted = tmp_path / "uninterrupted"
    code, _, err = run_script_in_process("finetune/lora.py", *flags, "--out_dir", str(uninterrupted),
                                      monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err

    resumed_w, reference_w = load_file(killed / "final/lora.safetensors"), load_file(uninterrupted / "final/lora.safetensors")
    assert resumed_w.keys() == reference_w.keys()
    different = [k for k in reference_w if not torch.equal(resumed_w[k], reference_w[k])]
    assert not different, f"resumed from step {killed_at}: {len(different)} tensors differ, e.g. {different[:3]}"
    assert losses(killed, "train_loss") == losses(uninterrupted, "train_loss")
    print(f"killed after the resume state of step {killed_at} of {steps}; resumed run bit-identical")


# Run a finetune script (argv: out_dir, n, script, flags...) that is killed with SIGKILL at the n-th rename into
# out_dir: inside a save (a weights file, a step directory, the resume state, a side file, the log rewrite),
# just before the rename that would complete it. No test hook in the code under test: os.replace is wrapped here.
KILL_AT_NTH_RENAME = """
import os, runpy, signal, sys
out_dir, n, script = os.path.abspath(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rename, calls = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if os.path.abspath(os.fspath(dst)).startswith(out_dir + os.sep):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.slow
def test_resume_after_kills_at_random_moments_and_inside_saves_is_bit_identical(base, data, tmp_path, monkeypatch,
                                                                                capsys):
    """Four SIGKILLs at seeded random moments of a run that saves every step, each followed by --resume true: two
    land inside a save by construction (the n-th rename into out_dir kills the process), two after a random delay.
    After every kill the latest step directory and the resume state load; what a killed save left behind is gone
    once the next run has started; and the run ends bit-identical to an uninterrupted one (weights and losses)."""
    rng = random.Random(1234)
    steps = 80
    flags = [
        "--checkpoint_dir", str(base), "--data_dir", str(data), "--precision", "32-true",
        "--lora_dropout", "0.2", "--lora_mlp", "true", "--train.learning_rate", "1e-2", "--train.warmup_steps", "3",
        "--train.micro_batch_size", "1", "--train.global_batch_size", "2", "--train.max_steps", str(steps),
        "--train.save_interval", "1", "--eval.interval", "1000", "--eval.max_new_tokens", "4",
    ]
    killed = tmp_path / "killed"
    flags_killed = [*flags, "--out_dir", str(killed)]
    resume_file = killed / "resume_state.pt"

    def temporaries() -> set[str]:  # the hidden names a save gives what it has not finished
        hidden = {p.name for p in killed.iterdir() if p.name.startswith(".") and p.name not in (".base_files", ".run.lock")}
        return hidden | {f".base_files/{p.name}" for p in (killed / ".base_files").glob(".*")}

    report, left_behind = [], set()
    started = time.monotonic()
    for cycle, how in enumerate(["in a save", "after a delay", "in a save", "after a delay"]):
        resume = ["--resume", "true"] if cycle else []
        before = resume_file.stat().st_ino if cycle else None
        if how == "in a save":
            # A fresh run renames 3 side files into .base_files, then 3 files a step (weights, step dir, resume
            # state); a resumed run first rewrites metrics.csv. The first kill comes after step 2's resume state.
            n = rng.randint(10, 30) if cycle == 0 else rng.randint(1, 30)
            command = [sys.executable, "-c", KILL_AT_NTH_RENAME, str(killed), str(n), "finetune/lora.py"]
            proc = subprocess.Popen([*command, *flags_killed, *resume], cwd=ROOT, env=SUBPROCESS_ENV,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == -signal.SIGKILL, f"not killed at rename {n}:\n{err.decode()[-3000:]}"
            what = f"at rename {n}"
        else:
            delay = rng.uniform(0.0, 0.25)
            proc = subprocess.Popen([sys.executable, "finetune/lora.py", *flags_killed, *resume], cwd=ROOT,
                                    env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 240
            try:  # wait for this run's first resume state, then a little more
                while not resume_file.exists() or resume_file.stat().st_ino == before:
                    assert proc.poll() is None, f"the run ended before saving:\n{proc.stderr.read().decode()[-3000:]}"
                    assert time.monotonic() < deadline, "no new resume_state.pt after 240 s"
                    time.sleep(0.002)
                time.sleep(delay)
                assert proc.poll() is None, "the run finished before it could be killed: raise steps"
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.kill()
                proc.wait()
                proc.stderr.close()
            assert proc.returncode == -signal.SIGKILL
            what = f"{delay * 1000:.0f} ms after a save"
        # What the previous kill left was cleaned up when this run started (names are random: never reused).
        assert not (left_behind & temporaries()), f"not cleaned up: {left_behind & temporaries()}"
        left_behind = {name for name in temporaries() if not name.endswith(".old")}
        assert not (killed / "final").exists()
        state = torch.load(resume_file, weights_only=True)
        step_dirs = sorted(killed.glob("step-*"))
        assert killed / f"step-{state['step']:06d}" in step_dirs  # the weights of the resume state's step
        load_finetuned(step_dirs[-1], method="lora")
        report.append(f"killed {what}: resume state at step {state['step']}, latest {step_dirs[-1].name}, "
                      f"left {sorted(temporaries()) or 'nothing'}")

    code, out, err = run_script_in_process("finetune/lora.py", *flags_killed, "--resume", "true",
                                           monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert f"Resuming from step {state['step']}" in out
    assert temporaries() == set()
    assert any("left nothing" not in line for line in report), "no kill left a temporary: the cleanup went untested"
    elapsed = time.monotonic() - started

    uninterrupted = tmp_path / "uninterrupted"
    code, _, err = run_script_in_process("finetune/lora.py", *flags, "--out_dir", str(uninterrupted),
                                         monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    resumed_w = load_file(killed / "final/lora.safetensors")
    reference_w = load_file(uninterrupted / "final/lora.safetensors")
    assert resumed_w.keys() == reference_w.keys()
    different = [k for k in reference_w if not torch.equal(resumed_w[k], reference_w[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert losses(killed, "train_loss") == losses(uninterrupted, "train_loss")
    assert sorted(losses(killed, "train_loss")) == list(range(1, steps + 1))
    print("\n".join(report) + f"\nkilled and resumed runs took {elapsed:.1f} s; resumed run bit-identical")


def test_ctrl_c_says_what_was_saved_and_the_run_resumes(base, data, tmp_path, monkeypatch, capsys):
    """Ctrl-C (SIGINT) in the training loop ends with exit code 130 and one line naming the last save and the
    --resume command, not a traceback; the run then resumes from that save."""
    flags = ["--checkpoint_dir", str(base), "--data_dir", str(data), "--precision", "32-true", "--out_dir",
             str(tmp_path / "run"), "--train.micro_batch_size", "1", "--train.global_batch_size", "1",
             "--train.max_steps", "100000", "--train.save_interval", "2", "--eval.interval", "100000"]
    proc = subprocess.Popen([sys.executable, "finetune/lora.py", *flags], cwd=ROOT, env=SUBPROCESS_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "resume_state.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no save before the interrupt"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("interrupted: stopped at step ") and "--resume true" in last_line, err
    saved = last_line.split("the last save is ")[1].split(" with ")[0]
    assert Path(saved).is_dir() and load_finetuned(saved)[1]["method"] == "lora"
    code, out, err = run_script_in_process("finetune/lora.py", *flags[:-6], "--train.max_steps", "6",
                                           "--train.save_interval", "2", "--eval.interval", "100000", "--resume",
                                           "true", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "Resuming from step" in out, err


# --- two CPU processes --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_devices_match_one_device_with_twice_the_micro_batch(base, data, tmp_path):
    """Also with validation data that does not split evenly: 3 samples, so one process validates 2 batches and
    the other 1; both must finish, with the same validation loss as one process."""
    steps = 4
    uneven = tmp_path / "uneven"
    prepare_instruction_data([Example(instruction=i, input="", output=o) for i, o in PAIRS[:3]], base, uneven,
                             val_split_fraction=0.0, progress=False)
    os.replace(uneven / "train.safetensors", uneven / "val.safetensors")
    shutil.copy(data / "train.safetensors", uneven / "train.safetensors")
    data = uneven
    common = dict(learning_rate=1e-2, max_steps=steps, save_interval=1000, global_batch_size=4)
    load_script("finetune/lora.py").setup(
        checkpoint_dir=base, data_dir=data, out_dir=tmp_path / "one", precision="32-true", devices=1,
        lora_dropout=0.0, train=train_args(micro_batch_size=2, **common), eval=EvalArgs(interval=1000, max_new_tokens=2),
    )
    result = run_subprocess(
        "finetune/lora.py", "--checkpoint_dir", str(base), "--data_dir", str(data), "--out_dir", str(tmp_path / "two"),
        "--precision", "32-true", "--devices", "2", "--lora_dropout", "0", "--train.learning_rate", "1e-2",
        "--train.warmup_steps", "0", "--train.weight_decay", "0.01", "--train.max_steps", str(steps),
        "--train.micro_batch_size", "1", "--train.global_batch_size", "4", "--train.save_interval", "1000",
        "--eval.interval", "1000", "--eval.max_new_tokens", "2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    hparams = yaml.safe_load((tmp_path / "two/final/hyperparameters.yaml").read_text())
    assert hparams["devices"] == 2
    one, two = losses(tmp_path / "one", "train_loss"), losses(tmp_path / "two", "train_loss")
    assert sorted(one) == sorted(two) == list(range(1, steps + 1))
    # Same samples per step and the same token-weighted loss; only float summation order differs.
    print("train loss, 1 device x micro 2:", one, "\n           2 devices x micro 1:", two)
    print(f"max relative difference {max(abs(two[s] - one[s]) / abs(one[s]) for s in one):.1e}")
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), f"step {step}: {two[step]} vs {one[step]}"
    assert one[steps] < one[1]  # and it trained
    val_one, val_two = losses(tmp_path / "one", "val_loss"), losses(tmp_path / "two", "val_loss")
    assert sorted(val_one) == sorted(val_two) == [0, steps]
    for step in val_one:
        assert val_two[step] == pytest.approx(val_one[step], rel=1e-5), f"val loss at step {step}"
    w1, w2 = load_file(tmp_path / "one/final/lora.safetensors"), load_file(tmp_path / "two/final/lora.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


# --- bad input ----------------------------------------------------------------------------------------------
def _finetune_flags(base, data, out_dir, *extra):
    return ["--checkpoint_dir", str(base), "--data_dir", str(data), "--out_dir", str(out_dir),
            "--train.max_steps", "1", "--precision", "32-true", *extra]


def assert_clean_error(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: "), err
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


def test_unwritable_out_dir_is_named(base, data, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, _, err = run_script_in_process("finetune/lora.py", *_finetune_flags(base, data, blocker / "sub"),
                                      monkeypatch=monkeypatch, capsys=capsys)
    assert_clean_error(code, err, "--out_dir", str(blocker / "sub"))


def test_read_only_out_dir_is_named(base, data, tmp_path, monkeypatch, capsys):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):
            pytest.skip("permissions are not enforced for this user (root): covered by the file-path case")
        code, _, err = run_script_in_process("finetune/adapter.py", *_finetune_flags(base, data, read_only / "run"),
                                          monkeypatch=monkeypatch, capsys=capsys)
        assert_clean_error(code, err, "--out_dir", "not writable")
    finally:
        read_only.chmod(0o755)


def test_missing_data_dir_is_named_with_the_prepare_command(base, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no_data"
    code, _, err = run_script_in_process("finetune/adapter_v2.py", *_finetune_flags(base, missing, tmp_path / "out"),
                                      monkeypatch=monkeypatch, capsys=capsys)
    assert_clean_error(code, err, "--data_dir", str(missing), "prepare_")


def test_global_batch_not_a_multiple_of_micro_batch_times_devices(base, data, tmp_path, monkeypatch, capsys):
    flags = _finetune_flags(base, data, tmp_path / "out", "--train.micro_batch_size", "2",
                            "--train.global_batch_size", "6", "--devices", "2")
    code, _, err = run_script_in_process("finetune/full.py", *flags, monkeypatch=monkeypatch, capsys=capsys)
    assert_clean_error(code, err, "--train.global_batch_size (6)", "--train.micro_batch_size (2)", "--devices (2)")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_resume_without_a_saved_state(base, data, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "fresh"
    code, _, err = run_script_in_process("finetune/lora.py", *_finetune_flags(base, data, out_dir, "--resume", "true"),
                                      monkeypatch=monkeypatch, capsys=capsys)
    assert_clean_error(code, err, "--resume", str(out_dir / "resume_state.pt"))
    assert not (out_dir / "final").exists()


def _lora_run_flags(base, data, out_dir, **changes) -> list[str]:
    """The command line of the `trained("lora")` run (see RUNS and train_args), with some values changed."""
    values = {"--checkpoint_dir": base, "--data_dir": data, "--out_dir": out_dir, "--precision": "32-true",
              "--train.micro_batch_size": 2, "--train.global_batch_size": 4, "--train.learning_rate": RUNS["lora"]["lr"],
              "--train.warmup_steps": 0, "--train.weight_decay": 0.01, "--train.max_steps": STEPS,
              "--train.save_interval": SAVE_INTERVAL, "--train.log_interval": 1, "--eval.interval": SAVE_INTERVAL,
              "--eval.max_new_tokens": 8, **{f"--{k}": v for k, v in RUNS["lora"]["settings"].items()}}
    values.update({f"--{k}": v for k, v in changes.items()})
    return [str(item) for pair in values.items() for item in pair]


@pytest.fixture
def saved_lora_run(trained, tmp_path) -> Path:
    """A copy of the LoRA run's output dir: its resume state is at step 100 of 150."""
    out_dir = tmp_path / "run"
    shutil.copytree(trained("lora"), out_dir)
    return out_dir


@pytest.mark.parametrize("changes, listed", [
    ({"train.learning_rate": 1e-3}, ["train.learning_rate: 0.02 in the saved run, 0.001 now"]),
    ({"lora_r": 16}, ["settings.r: 8 in the saved run, 16 now", "trainable parameters: 20 differ"]),
    ({"train.global_batch_size": 2, "train.seed": 7}, ["train.global_batch_size: 4", "train.seed: 1337"]),
    ({"data_dir": "{other_data}"}, ["data_fingerprint"]),
])
def test_resume_refuses_a_run_that_would_not_be_the_run_it_claims_to_be(
    changes, listed, saved_lora_run, base, data, tmp_path, monkeypatch, capsys
):
    """Another learning rate, LoRA rank, batch geometry, seed or dataset would silently make another run (a
    different rank used to end in a raw tensor-size error): each difference is listed, and nothing is restored
    or written."""
    other_data = tmp_path / "other_data"
    shutil.copytree(data, other_data)
    shutil.copy(other_data / "train.safetensors", other_data / "val.safetensors")
    examples = [Example(instruction="Say yes.", input="", output="yes")] * 4
    prepare_instruction_data(examples, base, other_data, val_split_fraction=0.0, progress=False)
    shutil.copy(other_data / "train.safetensors", other_data / "val.safetensors")
    changes = {k: str(v).format(other_data=other_data) for k, v in changes.items()}
    before = sha256(saved_lora_run / "resume_state.pt")
    code, _, err = run_script_in_process("finetune/lora.py", *_lora_run_flags(base, data, saved_lora_run, **changes),
                                         "--resume", "true", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "error: --resume:" in err and "start a new run" in err, err
    for text in listed:
        assert text in err, f"{text!r} not in {err!r}"
    assert sha256(saved_lora_run / "resume_state.pt") == before


def test_resume_may_run_longer_and_validate_less_often_and_says_so(saved_lora_run, base, data, monkeypatch, capsys):
    """More steps and another eval interval are legitimate mid-run: printed, and recorded in hyperparameters.yaml
    so that it never claims the run used the new values all along."""
    flags = _lora_run_flags(base, data, saved_lora_run, **{"train.max_steps": STEPS + 10, "eval.interval": 60})
    code, out, err = run_script_in_process("finetune/lora.py", *flags, "--resume", "true",
                                           monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert "Changed on resume: eval.interval 50 -> 60; train.max_steps 150 -> 160" in out + err
    hparams = yaml.safe_load((saved_lora_run / "final" / "hyperparameters.yaml").read_text())
    assert hparams["train"]["max_steps"] == STEPS + 10
    assert hparams["resumed"] == [{"step": 100, "changes": {"eval.interval": [50, 60], "train.max_steps": [150, 160]}}]
    assert sorted(losses(saved_lora_run, "train_loss")) == list(range(1, STEPS + 11))


def test_adapter_weights_on_another_base_fail_the_fingerprint_check(trained, tmp_path, monkeypatch, capsys):
    other = make_checkpoint_dir(tmp_path / "other_base", seed=1, n_embd=64, intermediate_size=128)  # same shapes
    final = trained("adapter") / "final"
    code, _, err = run_script_in_process("generate/adapter.py", "--finetuned_dir", str(final), "--checkpoint_dir",
                                      str(other), "--max_new_tokens", "2", monkeypatch=monkeypatch, capsys=capsys)
    assert_clean_error(code, err, "another base checkpoint", "--checkpoint_dir", str(other))
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_finetuned(final, other, method="adapter")


def test_generate_lora_on_an_adapter_dir_names_the_right_script(trained, monkeypatch, capsys):
    final = trained("adapter") / "final"
    code, _, err = run_script_in_process("generate/lora.py", "--finetuned_dir", str(final), "--max_new_tokens", "2",
                                      monkeypatch=monkeypatch, capsys=capsys)
    assert_clean_error(code, err, "'adapter'", "'lora'", "generate/finetuned.py")


@pytest.mark.slow
def test_cli_errors_leave_no_traceback_in_a_real_process(base, tmp_path):
    missing = tmp_path / "no_data"
    result = run_subprocess("finetune/lora.py", *_finetune_flags(base, missing, tmp_path / "out"))
    assert_clean_error(result.returncode, result.stderr, "--data_dir", str(missing))


# --- merge_lora ---------------------------------------------------------------------------------------------
def test_merged_checkpoint_matches_the_lora_model_and_is_a_normal_checkpoint(trained, tmp_path, monkeypatch, capsys):
    final = trained("lora") / "final"
    merged = tmp_path / "merged"
    code, out, err = run_script_in_process("scripts/merge_lora.py", "--finetuned_dir", str(final), "--out_dir",
                                        str(merged), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    for name in (WEIGHTS_FILE, "model_config.yaml", "tokenizer.json", "tokenizer_config.json"):
        assert (merged / name).is_file()

    assert set(load_file(merged / WEIGHTS_FILE)) == set(load_file(trained("full") / "final" / WEIGHTS_FILE))
    tokenizer = Tokenizer(merged)
    idx = tokenizer.encode(alpaca_prompt(PAIRS[1][0]) + PAIRS[1][1])[None]
    # In float64 the only difference left is the rounding of the merged float32 weights.
    report = []
    for dtype, tolerance in ((torch.float64, 1e-5), (torch.float32, 1e-4)):
        lora_model, _ = load_finetuned(final, dtype=dtype, method="lora")
        merged_model, _ = load_base_model(merged, dtype=dtype)
        with torch.no_grad():
            expected, actual = lora_model(idx), merged_model(idx)
        difference = float((actual - expected).abs().max())
        report.append(f"{dtype}: max |merged - unmerged| logit {difference:.1e} (|logits| <= {float(expected.abs().max()):.1f})")
        assert difference < tolerance, report[-1]

    # generate/base.py answers like the LoRA model did (greedy), with no LoRA code involved.
    instruction, answer = PAIRS[0]
    prompt = alpaca_prompt(instruction)
    code, out, err = run_script_in_process("generate/base.py", "--checkpoint_dir", str(merged), "--prompt", prompt,
                                        "--temperature", "0", "--max_new_tokens", "20", "--precision", "32-true",
                                        monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert out[len(prompt):].strip() == answer

    hf_dir = tmp_path / "hf"
    code, out, err = run_script_in_process("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", str(merged),
                                        "--output_dir", str(hf_dir), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in hf_dir.iterdir()}
    hf_state = load_file(hf_dir / "model.safetensors")
    assert sum(t.numel() for t in hf_state.values()) == sum(p.numel() for p in merged_model.parameters())
    print("\n".join(report))


@pytest.mark.parametrize("method, reason", [("adapter", "do not fold into the base weights"),
                                            ("bottleneck", "non-linear, so it cannot be folded")])
def test_merge_refuses_an_adapter_dir_and_says_why(method, reason, trained, tmp_path, monkeypatch, capsys):
    final = trained(method) / "final"
    code, _, err = run_script_in_process("scripts/merge_lora.py", "--finetuned_dir", str(final), "--out_dir",
                                      str(tmp_path / "m"), monkeypatch=monkeypatch, capsys=capsys)
    assert_clean_error(code, err, "--finetuned_dir", f"'{method}'", reason, "generate/finetuned.py")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("head", [False, True])
def test_merge_on_a_tied_embedding_base(head, tmp_path, monkeypatch, capsys):
    """A tied base (SmolLM2, Gemma, Llama 3.2) merges and stays tied; LoRA on its tied LM head cannot be folded
    in (it would change the input embedding too), and the error says what to do instead."""
    from lit_gpt import lora
    from lit_gpt.config import Config
    from lit_gpt.checkpoint import base_fingerprint
    from lit_gpt.model import GPT

    tied = make_checkpoint_dir(tmp_path / "tied", tie_embeddings=True)
    settings = lora.LoRASettings(head=head, mlp=True)
    torch.manual_seed(0)
    model = lora.apply(GPT(Config.from_checkpoint(tied)), settings)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.1)  # a non-zero update, as after training
    finetuned = tmp_path / "finetuned"
    save_safetensors(lora.state_dict_to_save(model), finetuned / "lora.safetensors")
    hparams = {"method": "lora", "settings": {"head": head, "mlp": True}, "checkpoint_dir": str(tied),
               "base_fingerprint": base_fingerprint(tied)}
    (finetuned / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams))
    code, _, err = run_script_in_process("scripts/merge_lora.py", "--finetuned_dir", str(finetuned), "--out_dir",
                                      str(tmp_path / "m"), monkeypatch=monkeypatch, capsys=capsys)
    if head:
        assert_clean_error(code, err, "lm_head", "tied", "--lora_head false")
        assert not (tmp_path / "m").exists()
        return
    assert code == 0, err
    merged, _ = load_base_model(tmp_path / "m")
    assert merged.lm_head.weight is merged.wte.weight
    unmerged, _ = load_finetuned(finetuned, method="lora")
    idx = torch.arange(1, 20)[None]
    with torch.no_grad():
        assert float((merged(idx) - unmerged(idx)).abs().max()) < 1e-5
        assert float((merged(idx) - load_base_model(tied)[0](idx)).abs().max()) > 1e-3  # the update is in there


def test_merge_is_done_in_full_precision_and_keeps_the_base_dtype(tmp_path, monkeypatch, capsys):
    """A bf16 base: W + (alpha / r)·B·A is computed in float32 from the stored weights, then stored in bf16."""
    from lit_gpt import lora
    from lit_gpt.config import Config
    from lit_gpt.model import GPT

    base_dir = make_checkpoint_dir(tmp_path / "base")
    state = {k: v.to(torch.bfloat16) for k, v in load_weights_file(base_dir / WEIGHTS_FILE).items()}
    save_safetensors(state, base_dir / WEIGHTS_FILE)
    model = lora.apply(GPT(Config.from_checkpoint(base_dir)), lora.LoRASettings(r=4, alpha=8))
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.1)
    finetuned = tmp_path / "finetuned"
    save_safetensors(lora.state_dict_to_save(model), finetuned / "lora.safetensors")
    (finetuned / "hyperparameters.yaml").write_text(yaml.safe_dump(
        {"method": "lora", "settings": {"r": 4, "alpha": 8}, "checkpoint_dir": str(base_dir)}))
    code, _, err = run_script_in_process("scripts/merge_lora.py", "--finetuned_dir", str(finetuned), "--out_dir",
                                      str(tmp_path / "m"), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    merged = load_file(tmp_path / "m" / WEIGHTS_FILE)
    assert merged.keys() == state.keys() and all(t.dtype == torch.bfloat16 for t in merged.values())
    query = model.blocks[0].attn.query
    expected = (state["blocks.0.attn.query.weight"].float() + query.delta_weight().detach()).to(torch.bfloat16)
    assert torch.equal(merged["blocks.0.attn.query.weight"], expected)
    assert torch.equal(merged["blocks.0.attn.key.weight"], state["blocks.0.attn.key.weight"])  # no LoRA there
