"""Finetuning throughput: ours vs litgpt 0.5.13 vs transformers + peft, same model, data and settings, on CPU.

The workload: SmolLM2-135M-Instruct in fp32, math_data.json prepared with max_seq_length 512, micro batch 4
(no gradient accumulation), AdamW at lr 3e-4 and weight decay 0.01 with each tool's default warm-up (100
steps), and for LoRA r=8, alpha=16, dropout 0.05 on the query and value projections only. Ours and hf clip
gradients at 1.0 (ours' default); litgpt's finetune scripts reject --train.max_norm, so litgpt does not clip
(a few hundred thousand trainable values: negligible). Each tool runs
`--warmup + --steps` optimizer steps in a fresh process; the first `--warmup` are not measured. Rounds
alternate the tools (ours, litgpt, hf, then litgpt, hf, ours, ...: each round starts one tool later) so
that a noisy machine hurts them alike;
every figure is a median over `--repeats` rounds with its min-max, and each ratio ours / peer is taken
within a round, then summarised.

* ours: `finetune/<method>.py`; step times, token counts and losses come from its metrics.csv.
* litgpt: `litgpt finetune_<method>` on a litgpt-format copy of the same weights (our checkpoint →
  `lit_gpt.convert.convert_lit_checkpoint` → `litgpt convert_to_litgpt`), data through its own JSON
  module (same file, prompt masking on, its own split and shuffle: litgpt cannot take our order). Step
  times and losses come from its CSV log; token counts from `benchmarks/litgpt_batches.py`, which rebuilds
  its batches.
* hf (LoRA only): `benchmarks/hf_peft_lora.py`, a plain transformers + peft loop over our prepared data,
  in shuffled order and padded to each batch's longest sample, as a plain loop or the HF Trainer does
  (ours groups samples of similar length by default: that saving is part of what is measured).

Loss parity (LoRA, when hf runs): `--parity_steps` steps of ours and of hf on the very same batches (ours
with --train.group_by_length false, both with LoRA dropout 0 so that no random mask differs), and the
largest relative difference of their per-step losses, which should stay within 1e-4.

Reported per tool: optimizer steps/s, supervised (loss-carrying) tokens/s, non-padding tokens/s, peak RSS of
the process (GB, including model loading), and the training loss at each step. Also the "useful" model FLOPs
per step against this CPU's own fp32 matmul ceiling (a timed `torch.mm`): frozen weights cost a forward and
an input-gradient matmul (4 N per token), the LM head counts only at supervised positions, attention is
causal (fwd + bwd = 6 L d n^2 per sample of n tokens, with each step's mean sample length), LoRA weights 6 N.

The peers are benchmark-only dependencies, installed here, not by the project: two virtual environments
under benchmarks/.venv-peers/ that see, after their own installs, every package of the Python running this
harness (this project, torch, lightning-fabric; see `ensure_venv`), and reuse its torch: a constraints file
pins it, so pip never installs another. litgpt 0.5.13 pins huggingface-hub<1.4 and jsonargparse<=4.41
(we have newer ones), and since Lightning imports transformers through torchmetrics, its environment also
gets the transformers its own `extra` pins (<4.57); peft gets a second one, with the transformers 5.x that
the hf peer is about (pinned to the version the project tests against), which needs huggingface-hub>=1.31.

A round costs each tool its loading plus (warmup + steps) x its step time: on this 2-core CPU, 40-70 s per
tool for LoRA with --warmup 2 --steps 6 (3-5 s a step), so `--repeats 2` over three tools takes ~6 min,
parity steps included. Example (CPU, the embedded model):
    python scripts/convert_gguf_checkpoint.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct
    python benchmarks/finetune.py --repeats 3 --steps 20
    python benchmarks/finetune.py --method adapter_v2 --tools ours,litgpt --repeats 3
    python benchmarks/finetune.py --tools ours --extra_ours "--train.group_by_length false" --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from lit_gpt.checkpoint import WEIGHTS_FILE, file_fingerprint
from lit_gpt.config import Config
from lit_gpt.convert import convert_lit_checkpoint
from lit_gpt.utils import precision_to_dtype

ROOT = Path(__file__).resolve().parents[1]
LITGPT_VERSION = "0.5.13"
PEFT_VERSION = "0.21.2"
TRANSFORMERS_VERSION = "5.23.0"  # the hf peer; the version of the project's `test` extra
# What each peer environment installs (besides what it reuses from this Python's site-packages).
PEER_PACKAGES = {
    "litgpt": [f"litgpt=={LITGPT_VERSION}", "transformers>=4.51.3,<4.57"],
    "hf": [f"peft=={PEFT_VERSION}", f"transformers=={TRANSFORMERS_VERSION}"],
}
# A peer environment's .pth file that adds the harness's site-packages directories (see `ensure_venv`).
PEER_PTH = "_harness_site_packages.pth"
TOOLS = ("ours", "litgpt", "hf")
METHODS = ("lora", "adapter", "adapter_v2")
FAR = 100_000  # an interval no run reaches: no evaluation or checkpoint inside the measured steps
METRICS = ("steps_per_s", "supervised_tokens_per_s", "tokens_per_s", "peak_rss_gb", "mfu")
GPU_METRICS = ("peak_gpu_gb",)  # on CUDA: torch.cuda.max_memory_allocated over the whole run, as each tool prints it
# How each tool prints its peak CUDA memory at the end of a run (ours: lit_gpt.training.finish; litgpt: its
# finetuning performance report).
PEAK_GPU_PATTERNS = {"ours": r"Peak GPU memory: ([\d.]+) GB", "litgpt": r"Memory Used\s*:\s*([\d.]+) GB"}
PARITY_RTOL = 1e-4


# --- setup: peer environments, data, checkpoints ----------------------------------------------------------
def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def site_dirs() -> list[str]:
    """The site-packages directories this interpreter's installed packages live in, in import order.

    In a virtual environment these are its own (and the base interpreter's when it was made with
    --system-site-packages); for a plain interpreter, the system ones (and the user's, where enabled).
    """
    dirs: list[str] = []
    for dist in importlib.metadata.distributions():
        where = os.path.realpath(dist.locate_file(""))
        # Only site directories: not a source tree that is on the path as the working directory.
        if os.path.basename(where) in ("site-packages", "dist-packages") and where not in dirs:
            dirs.append(where)
    return dirs


def peer_pth(dirs: list[str]) -> str:
    """The .pth file that lets a peer environment see `dirs` after its own site-packages.

    `site.addsitedir` (not a bare path line) also runs the .pth files found there, which is how editable
    installs (`pip install -e .`) put the project on the path.
    """
    return "".join(f"import site; site.addsitedir({d!r})\n" for d in dirs)


def ensure_venv(venv: Path, packages: list[str]) -> Path:
    """Create `venv` for a peer, pip-install `packages` into it and return its bin/.

    The peer sees its own installs first, then every package of the Python running this harness: a .pth
    file in its site-packages adds this interpreter's site-packages directories (`site_dirs`). So the peer
    imports this project and its dependencies from a user's virtual environment too, where
    `venv --system-site-packages` would expose the base interpreter's packages instead of the user's.
    torch (and lightning, where this interpreter has it) is pinned to this interpreter's version through a
    constraints file, so no peer can pull in another build. A stamp records the packages and the directories
    the peer sees; on any difference (other packages, another interpreter, a peer made by older code) the
    environment is made again from scratch.
    """
    stamp, bin_dir = venv / "installed.json", venv / "bin"
    torch_version = torch.__version__.split("+")[0]
    dirs = site_dirs()
    wanted = {"packages": packages, "torch": torch_version, "site_dirs": dirs}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted and (bin_dir / "python").exists():
        return bin_dir
    log(f"creating the peer environment {venv} with {' '.join(packages) or 'no packages of its own'}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True)
    python = str(bin_dir / "python")
    if packages:  # the peer's own pip, installed before the peer sees ours (which may be older, or missing)
        subprocess.run([python, "-m", "ensurepip", "--upgrade", "--default-pip"], check=True,
                       stdout=subprocess.DEVNULL)
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / PEER_PTH).write_text(peer_pth(dirs))
    pins = [f"torch=={torch_version}"]
    try:  # litgpt needs the whole `lightning` bundle, which we do not (we use lightning-fabric)
        pins.append(f"lightning=={importlib.metadata.version('lightning')}")
    except importlib.metadata.PackageNotFoundError:
        pass
    constraints = venv / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    if packages:
        pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(constraints)]
        done = subprocess.run([*pip, *packages], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip could not install {packages} into {venv}:\n{done.stdout}{done.stderr}")
    # The torch and the lit_gpt the peer would import (found, not imported: that takes seconds), checked away
    # from the repository, whose lit_gpt/ would otherwise be found in the working directory.
    check = ("import importlib.metadata, importlib.util; v = importlib.metadata.version('torch').split('+')[0]; "
             f"assert v == {torch_version!r}, f'torch {{v}}'; "
             "assert importlib.util.find_spec('lit_gpt'), 'No module named lit_gpt'")
    done = subprocess.run([python, "-c", check], capture_output=True, text=True, cwd=venv)
    if done.returncode != 0:
        raise RuntimeError(
            f"the peer environment {venv} cannot import this torch ({torch_version}) and this project from "
            f"{sys.executable}'s site-packages {dirs}:\n{done.stderr.strip()}\nRun the harness with the Python "
            f"where the project is installed (pip install -e .), or pass --peer_python.")
    stamp.write_text(json.dumps(wanted))
    return bin_dir


def cached(directory: Path, key: dict, build) -> Path:
    """Build `directory` with `build(directory)` unless it was built before from the same `key`."""
    stamp = directory / ".built-from.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == key:
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    build(directory)
    stamp.write_text(json.dumps(key))
    return directory


def prepare_data(args, work: Path) -> Path:
    key = {"data_file": str(args.data_file.resolve()), "size": args.data_file.stat().st_size,
           "tokenizer": file_fingerprint(args.checkpoint_dir / "tokenizer.json")
           if (args.checkpoint_dir / "tokenizer.json").is_file() else "",
           "model": Config.from_checkpoint(args.checkpoint_dir).name,  # picks the prompt style
           "max_seq_length": args.max_seq_length,
           "val_split_fraction": args.val_split_fraction}

    def build(directory: Path) -> None:
        log(f"preparing {args.data_file} into {directory}")
        subprocess.run(
            [sys.executable, "scripts/prepare_json.py", "--checkpoint_dir", str(args.checkpoint_dir),
             "--data_file", str(args.data_file), "--destination_path", str(directory),
             "--max_seq_length", str(args.max_seq_length), "--val_split_fraction", str(args.val_split_fraction)],
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    return cached(work / "data", key, build)


def hf_checkpoint(args, work: Path) -> Path:
    key = {"base": file_fingerprint(args.checkpoint_dir / WEIGHTS_FILE)}

    def build(directory: Path) -> None:
        log(f"converting {args.checkpoint_dir} to Hugging Face format in {directory}")
        convert_lit_checkpoint(args.checkpoint_dir, directory)

    return cached(work / "hf", key, build)


def litgpt_checkpoint(args, work: Path, hf_dir: Path, litgpt_python: str) -> Path:
    name = args.litgpt_model_name or Config.from_checkpoint(args.checkpoint_dir).name
    key = {"base": file_fingerprint(args.checkpoint_dir / WEIGHTS_FILE), "model_name": name}

    def build(directory: Path) -> None:
        log(f"converting to litgpt's format ({name}) in {directory}")
        for f in hf_dir.iterdir():
            if f.is_file() and not f.name.startswith("."):
                os.symlink(f.resolve(), directory / f.name)
        subprocess.run([litgpt_python, "-m", "litgpt", "convert_to_litgpt", str(directory), "--model_name", name],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (directory / "model.safetensors").unlink()  # litgpt trains from lit_model.pth; the HF copy is in hf/

    return cached(work / "litgpt_checkpoint", key, build)


def random_checkpoint(args, work: Path, fmt: str, python: str) -> Path:
    """A checkpoint of config `--random_init` with random weights in `fmt` ("ours" or "litgpt"), made once.

    The vocabulary is --checkpoint_dir's, whose tokenizer files it copies (the data is tokenized with them).
    """
    tokenizer_config = Config.from_checkpoint(args.checkpoint_dir)
    overrides = [f"vocab_size={tokenizer_config.vocab_size}", f"padded_vocab_size={tokenizer_config.padded_vocab_size}",
                 *args.random_override]
    dtype = str(precision_to_dtype(args.precision)).removeprefix("torch.")  # the weights' dtype under --precision
    key = {"name": args.random_init, "overrides": overrides, "dtype": dtype,
           "tokenizer": file_fingerprint(args.checkpoint_dir / "tokenizer.json")}

    def build(directory: Path) -> None:
        log(f"writing {args.random_init} with random weights ({fmt} format, {dtype}) to {directory}")
        cmd = [python, "benchmarks/random_checkpoint.py", "--format", fmt, "--name", args.random_init, "--out_dir",
               str(directory), "--tokenizer_dir", str(args.checkpoint_dir), "--dtype", dtype]
        for o in overrides:
            cmd += ["--override", o]
        subprocess.run(cmd, cwd=ROOT, check=True)

    return cached(work / f"random-{args.random_init}-{fmt}", key, build)


def split_flags(text: str) -> list[str]:
    """Split a flags string on spaces, keeping "double-quoted parts" together (shell-like, enough for flags)."""
    text = text.strip()
    return [part for part in next(csv.reader([text], delimiter=" ", quotechar='"', skipinitialspace=True))] if text else []


def join_command(cmd: list[str]) -> str:
    """A command as one string to paste into a shell (arguments with spaces or quotes single-quoted)."""
    return " ".join(f"'{c}'" if any(ch in c for ch in " \"{}$") else c for c in cmd)


# --- running one tool -------------------------------------------------------------------------------------
def run_measured(cmd: list[str], log_file: Path) -> tuple[float, float]:
    """Run `cmd` from the repository root, output to `log_file`; return (wall seconds, peak RSS in GB).

    The peak RSS is the child's own (os.wait4), the largest over it and any process it waited for.
    """
    start = time.perf_counter()
    with open(log_file, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "5"})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"exit code {proc.returncode}: {join_command(cmd)}\n--- last lines of {log_file} ---\n{tail}")
    return wall, usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def peak_gpu_gb(tool: str, log_file: Path) -> Optional[float]:
    """The peak CUDA memory (GB) that `tool` printed in `log_file`, or None (a CPU run prints none)."""
    found = re.findall(PEAK_GPU_PATTERNS[tool], log_file.read_text(errors="replace"))
    return float(found[-1]) if found else None


def method_flags(method: str) -> list[str]:
    """The method's own settings, spelled the same way by ours and litgpt."""
    if method == "lora":
        return ["--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--lora_query", "true",
                "--lora_key", "false", "--lora_value", "true", "--lora_projection", "false", "--lora_mlp", "false",
                "--lora_head", "false"]
    return []


def run_ours(args, ctx, out_dir: Path) -> dict:
    total = args.warmup + args.steps
    cmd = [sys.executable, f"finetune/{args.method}.py", "--checkpoint_dir", str(args.checkpoint_dir),
           "--data_dir", str(ctx["data_dir"]), "--out_dir", str(out_dir), "--precision", args.precision,
           "--train.micro_batch_size", str(args.micro_batch_size), "--train.global_batch_size",
           str(args.micro_batch_size), "--train.max_steps", str(total), "--train.learning_rate", str(args.lr),
           "--train.log_interval", "1", "--train.save_interval", str(FAR), "--eval.interval", str(FAR),
           "--eval.max_iters", "1", "--eval.max_new_tokens", "1", *method_flags(args.method), *args.extra_ours]
    wall, rss = run_measured(cmd, out_dir.with_suffix(".log"))
    gpu = peak_gpu_gb("ours", out_dir.with_suffix(".log"))
    rows: dict[int, dict[str, float]] = {}
    with open(out_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            rows.setdefault(int(row["step"]), {})[row["name"]] = float(row["value"])
    steps = []
    for step in range(1, total + 1):
        r = rows[step]
        steps.append({"step": step, "time_s": r["step_time_s"], "tokens": round(r["tokens_per_s"] * r["step_time_s"]),
                      "supervised": round(r["supervised_tokens_per_s"] * r["step_time_s"]), "loss": r["train_loss"]})
    return {"steps": steps, "wall_s": wall, "peak_rss_gb": rss, "peak_gpu_gb": gpu, "command": join_command(cmd)}


def run_litgpt(args, ctx, out_dir: Path) -> dict:
    total = args.warmup + args.steps
    optimizer = json.dumps({"class_path": "torch.optim.AdamW", "init_args": {"lr": args.lr, "weight_decay": 0.01}})
    cmd = [ctx["litgpt_python"], "benchmarks/litgpt_run.py", f"finetune_{args.method}", str(ctx["litgpt_checkpoint"]),
           "--out_dir", str(out_dir), "--precision", args.precision, "--data", "JSON", "--data.json_path",
           str(args.data_file), "--data.val_split_fraction", str(args.val_split_fraction), "--data.mask_prompt", "true",
           "--train.micro_batch_size", str(args.micro_batch_size), "--train.global_batch_size",
           str(args.micro_batch_size), "--train.max_steps", str(total), "--train.max_seq_length",
           str(args.max_seq_length), "--train.log_interval", "1", "--train.save_interval",
           str(FAR), "--eval.interval", str(FAR), "--eval.initial_validation", "false", "--eval.final_validation",
           "false", "--eval.max_new_tokens", "1", "--optimizer", optimizer, "--logger_name", "csv",
           *method_flags(args.method), *args.extra_litgpt]
    wall, rss = run_measured(cmd, out_dir.with_suffix(".log"))
    gpu = peak_gpu_gb("litgpt", out_dir.with_suffix(".log"))
    logs = sorted((out_dir / "logs" / "csv").glob("version_*/metrics.csv"))
    if not logs:
        raise RuntimeError(f"litgpt wrote no CSV log under {out_dir / 'logs' / 'csv'}")
    by_iter: dict[int, dict[str, float]] = {}
    with open(logs[-1]) as f:
        for row in csv.DictReader(f):
            values = {k: float(v) for k, v in row.items() if v not in ("", None)}
            # Two rows per logged iteration (its ThroughputMonitor's and its metrics), both keyed by the iteration
            # in "step" (the metrics' own "step" is the optimizer step: the same here, without accumulation).
            if "step" in values:
                by_iter.setdefault(int(values["step"]), {}).update(values)
    counts = ctx["litgpt_counts"]
    steps, previous = [], 0.0
    for it in range(1, total + 1):  # no gradient accumulation: one iteration per step
        r = by_iter[it]
        # Seconds between successive log calls (like ours' windows); `time` is cumulative since the loop began.
        step_time = r["time"] - previous if "time" in r else r["iter_time"]
        previous = r.get("time", previous + step_time)
        steps.append({"step": it, "time_s": step_time, "tokens": counts[it - 1]["tokens"],
                      "supervised": counts[it - 1]["supervised"], "loss": r["loss"],
                      "logged_tokens": r.get("tokens")})
    # litgpt logs cumulative non-padding tokens (sample lengths); check that the rebuilt batches are its batches.
    expected = 0
    match = True
    for s, c in zip(steps, counts):
        expected += c["tokens"] + args.micro_batch_size
        match &= s["logged_tokens"] is None or abs(s["logged_tokens"] - expected) <= args.micro_batch_size
    return {"steps": steps, "wall_s": wall, "peak_rss_gb": rss, "peak_gpu_gb": gpu, "command": join_command(cmd),
            "batches_match_log": match}


def run_hf(args, ctx, out_dir: Path) -> dict:
    if args.method != "lora":
        raise ValueError("the transformers + peft peer runs LoRA only")
    total = args.warmup + args.steps
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [ctx["hf_python"], "benchmarks/hf_peft_lora.py", "--hf_dir", str(ctx["hf_dir"]),
           "--data_dir", str(ctx["data_dir"]), "--out_file", str(out_dir / "steps.json"), "--steps", str(total),
           "--micro_batch_size", str(args.micro_batch_size), "--global_batch_size", str(args.micro_batch_size),
           "--learning_rate", str(args.lr), *args.extra_hf]
    wall, rss = run_measured(cmd, out_dir.with_suffix(".log"))
    result = json.loads((out_dir / "steps.json").read_text())
    return {"steps": result["steps"], "wall_s": wall, "peak_rss_gb": rss, "command": join_command(cmd),
            "versions": result["versions"]}


RUNNERS = {"ours": run_ours, "litgpt": run_litgpt, "hf": run_hf}


def loss_parity(args, ctx, work: Path) -> dict:
    """Ours and hf for `--parity_steps` steps on the same batches, without dropout: their losses at every step."""
    same = argparse.Namespace(**{**vars(args), "warmup": 0, "steps": args.parity_steps})
    same.extra_ours = [*args.extra_ours, "--train.group_by_length", "false", "--lora_dropout", "0"]
    same.extra_hf = [*args.extra_hf, "--group_by_length", "false", "--lora_dropout", "0"]
    losses, times = {}, {}
    for tool in ("ours", "hf"):
        out_dir = work / "runs" / f"{tool}-parity"
        shutil.rmtree(out_dir, ignore_errors=True)
        log(f"loss parity: {tool}, {args.parity_steps} steps on the same batches, no dropout")
        steps = RUNNERS[tool](same, ctx, out_dir)["steps"]
        losses[tool], times[tool] = [s["loss"] for s in steps], [s["time_s"] for s in steps]
    rel = [abs(o - h) / abs(h) for o, h in zip(losses["ours"], losses["hf"])]
    # The same batches also give a like-for-like speed ratio (no length grouping for either); step 1 warms up.
    speedup = [h / o for o, h in zip(times["ours"][1:], times["hf"][1:])]
    return {"steps": args.parity_steps, "losses": losses, "step_times_s": times, "max_rel_diff": max(rel),
            "rtol": PARITY_RTOL, "within_rtol": max(rel) <= PARITY_RTOL,
            "same_batch_speedup": spread(speedup) if speedup else None}


# --- FLOPs and the matmul ceiling -------------------------------------------------------------------------
def matmul_ceiling(precision: str = "32-true", repeats: int = 10) -> dict:
    """This machine's matmul speed (GFLOP/s): best and median of `repeats` timed square `torch.mm`s.

    On a CUDA GPU: 8192^3 in the training precision's dtype (bf16 for "bf16-*"); on the CPU: 2048^3 in fp32.
    """
    cuda = torch.cuda.is_available()
    size = 8192 if cuda else 2048
    dtype = torch.bfloat16 if cuda and precision.startswith("bf16") else torch.float16 if cuda and precision.startswith(
        "16") else torch.float32
    device = "cuda" if cuda else "cpu"
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        torch.mm(a, b)
    rates = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        rates.append(2 * size**3 / (time.perf_counter() - start) / 1e9)
    del a, b
    if cuda:
        torch.cuda.empty_cache()  # the tools run in their own processes: leave them the memory
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "device": torch.cuda.get_device_name() if cuda
            else platform.processor() or "cpu", "threads": torch.get_num_threads(), "best_gflops": max(rates),
            "median_gflops": statistics.median(rates)}


def model_sizes(checkpoint_dir: Path, method: str) -> dict:
    """Parameter counts for the FLOPs estimate, from the config (model built on the meta device)."""
    from lit_gpt.model import GPT

    config = Config.from_checkpoint(checkpoint_dir)
    with torch.device("meta"):
        model = GPT(config)
    embedding = {id(model.wte.weight), id(model.lm_head.weight)}
    blocks = sum(p.numel() for p in model.parameters() if id(p) not in embedding)
    # The method's trainable weights (LoRA on q and v: r (C + out) each, per layer); small, counted as 6 N.
    r = 8
    trainable = 0
    if method == "lora":
        q_out, v_out = config.n_head * config.head_size, config.n_query_groups * config.head_size
        trainable = config.n_layer * r * (2 * config.n_embd + q_out + v_out)
    return {"blocks": blocks, "head": config.n_embd * config.padded_vocab_size, "layers": config.n_layer,
            "attn_dim": config.n_head * config.head_size, "trainable": trainable}


def step_flops(sizes: dict, tokens: int, supervised: int, batch: int) -> float:
    """Useful model FLOPs of one optimizer step (see the module docstring)."""
    mean_len = tokens / max(batch, 1)
    attention = 6 * sizes["layers"] * sizes["attn_dim"] * mean_len**2 * batch
    return 4 * sizes["blocks"] * tokens + 6 * sizes["trainable"] * tokens + 4 * sizes["head"] * supervised + attention


# --- summarising ------------------------------------------------------------------------------------------
def summarise_run(run: dict, warmup: int, sizes: dict, batch: int, ceiling: float) -> dict:
    measured = [s for s in run["steps"] if s["step"] > warmup]
    seconds = sum(s["time_s"] for s in measured)
    flops = sum(step_flops(sizes, s["tokens"], s["supervised"], batch) for s in measured)
    return {
        "steps_per_s": len(measured) / seconds,
        "supervised_tokens_per_s": sum(s["supervised"] for s in measured) / seconds,
        "tokens_per_s": sum(s["tokens"] for s in measured) / seconds,
        "peak_rss_gb": run["peak_rss_gb"],
        "peak_gpu_gb": run.get("peak_gpu_gb"),
        "mfu": flops / seconds / (ceiling * 1e9),
        "gflops_per_s": flops / seconds / 1e9,
        "measured_steps": len(measured),
    }


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: dict, digits: int = 3) -> str:
    return f"{s['median']:.{digits}g} ({s['min']:.{digits}g}-{s['max']:.{digits}g})"


def report(result: dict) -> None:
    tools, summary = result["tools"], result["summary"]
    print(f"\nFinetuning ({result['settings']['method']}), {result['settings']['steps']} measured steps after "
          f"{result['settings']['warmup']} warm-up, {result['settings']['repeats']} round(s); median (min-max)")
    gpu = any("peak_gpu_gb" in s for s in summary.values())
    header = ["tool", "steps/s", "supervised tok/s", "tokens/s", "peak RSS GB", *(["peak GPU GB"] if gpu else []),
              "useful MFU %"]
    rows = []
    for tool in tools:
        if tool not in summary:
            continue
        s = summary[tool]
        mfu = {k: 100 * v if k != "n" else v for k, v in s["mfu"].items()}
        rows.append([tool, fmt(s["steps_per_s"]), fmt(s["supervised_tokens_per_s"]), fmt(s["tokens_per_s"]),
                     fmt(s["peak_rss_gb"]), *([fmt(s["peak_gpu_gb"])] if gpu else []), fmt(mfu, 2)])
    for peer, ratio in result["ratios"].items():
        rows.append([f"ours/{peer}", fmt(ratio["steps_per_s"]), fmt(ratio["supervised_tokens_per_s"]),
                     fmt(ratio["tokens_per_s"]), fmt(ratio["peak_rss_gb"]),
                     *([fmt(ratio["peak_gpu_gb"])] if gpu else []), ""])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    c = result["machine"]["matmul"]
    print(f"{c['dtype']} matmul ceiling on {c['device']}: {c['best_gflops']:.1f} GFLOP/s best, "
          f"{c['median_gflops']:.1f} median ({c['size']}^3 torch.mm, {c['threads']} threads); MFU uses the best.")
    losses = result["loss_by_step"]
    steps = sorted({int(k) for tool in losses.values() for k in tool})
    if steps:
        print("\ntraining loss by step (median over rounds; each tool in its own batch order):")
        print("step  " + "  ".join(f"{t:>8}" for t in losses))
        for step in steps:
            print(f"{step:>4}  " + "  ".join(
                f"{losses[t][str(step)]:>8.4f}" if str(step) in losses[t] else f"{'':>8}" for t in losses))
    parity = result.get("loss_parity")
    if parity:
        verdict = "within" if parity["within_rtol"] else "NOT within"
        print(f"\nloss parity, ours vs hf on the same {parity['steps']} batches without dropout: largest relative "
              f"difference {parity['max_rel_diff']:.1e} ({verdict} {parity['rtol']:.0e})")
        for step, (o, h) in enumerate(zip(parity["losses"]["ours"], parity["losses"]["hf"]), start=1):
            print(f"{step:>4}  ours {o:.6f}  hf {h:.6f}")
        if parity.get("same_batch_speedup"):
            print(f"on those same batches (no length grouping for either), ours/hf step speed after step 1: "
                  f"{fmt(parity['same_batch_speedup'])}")
    for tool, errors in result["errors"].items():
        for e in errors:
            print(f"\n{tool} failed: {e}", file=sys.stderr)


# --- main -------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct"))
    p.add_argument("--data_file", type=Path, default=ROOT.parent / "shared" / "data" / "math_data.json")
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--tools", default="ours,litgpt,hf", help="comma-separated, run in this order every round")
    p.add_argument("--repeats", type=int, default=3, help="rounds (each runs every tool once)")
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps run first and not measured")
    p.add_argument("--parity_steps", type=int, default=5,
                   help="steps of the loss-parity check of ours vs hf on the same batches (0: skip it)")
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--max_seq_length", type=int, default=512)
    p.add_argument("--val_split_fraction", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--precision", default="32-true", help="for ours and litgpt, e.g. bf16-true on a GPU")
    p.add_argument("--random_init", default=None, metavar="NAME",
                   help="train a model of config NAME (e.g. Llama-2-7b-hf) with random weights instead of "
                        "--checkpoint_dir's, which gives only the tokenizer (see benchmarks/random_checkpoint.py)")
    p.add_argument("--random_override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for --random_init, for both tools (repeatable), e.g. n_layer=2")
    p.add_argument("--peer_python", default=None,
                   help="run the peers with this interpreter, installing nothing (it must import litgpt / peft)")
    # Extra flags per tool, appended last (so they override): --extra_ours "--precision bf16-true".
    # A single flag without a space needs '=': --extra_ours="--train.group_by_length=false".
    p.add_argument("--extra_ours", default="", help="extra flags for finetune/<method>.py")
    p.add_argument("--extra_litgpt", default="", help="extra flags for litgpt finetune_<method>")
    p.add_argument("--extra_hf", default="", help="extra flags for benchmarks/hf_peft_lora.py")
    p.add_argument("--litgpt_model_name", default=None, help="litgpt's config name (default: ours)")
    p.add_argument("--venv_dir", type=Path, default=ROOT / "benchmarks" / ".venv-peers")
    p.add_argument("--work_dir", type=Path, default=ROOT / "benchmarks" / "results" / "finetune_work",
                   help="prepared data, converted checkpoints (reused) and each run's output")
    p.add_argument("--out_file", type=Path, default=ROOT / "benchmarks" / "results" / "finetune.json")
    args = p.parse_args(argv)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(args.tools) - set(TOOLS)
    if unknown:
        p.error(f"--tools: unknown {sorted(unknown)}; choose from {','.join(TOOLS)}")
    if args.method != "lora" and "hf" in args.tools:
        log(f"note: the transformers + peft peer runs LoRA only; leaving hf out for --method {args.method}")
        args.tools.remove("hf")
    for name in ("extra_ours", "extra_litgpt", "extra_hf"):
        setattr(args, name, split_flags(getattr(args, name)))
    if not args.data_file.is_file():
        p.error(f"--data_file {args.data_file} does not exist (math_data.json lives in ../shared/data)")
    args.checkpoint_dir = args.checkpoint_dir.resolve()
    if args.random_init and args.parity_steps and "hf" in args.tools:
        log("note: no loss parity with --random_init (the tools' random weights differ)")
        args.parity_steps = 0
    args.data_file = args.data_file.resolve()
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    ctx: dict = {}
    for peer in ("hf", "litgpt"):
        if peer in args.tools:
            ctx[f"{peer}_python"] = args.peer_python or str(ensure_venv(args.venv_dir / peer, PEER_PACKAGES[peer]) / "python")
    if args.random_init:
        # Ours from here on is the random-weight checkpoint: its config also gives the FLOPs and the prompt style.
        args.checkpoint_dir = random_checkpoint(args, work, "ours", sys.executable)
        if "litgpt" in args.tools:
            ctx["litgpt_checkpoint"] = random_checkpoint(args, work, "litgpt", ctx["litgpt_python"])
    ctx["data_dir"] = prepare_data(args, work)
    if "hf" in args.tools or ("litgpt" in args.tools and not args.random_init):
        ctx["hf_dir"] = hf_checkpoint(args, work)
    if "litgpt" in args.tools:
        if not args.random_init:
            ctx["litgpt_checkpoint"] = litgpt_checkpoint(args, work, ctx["hf_dir"], ctx["litgpt_python"])
        counts_file = work / "litgpt_batches.json"
        subprocess.run(
            [ctx["litgpt_python"], "benchmarks/litgpt_batches.py", "--checkpoint_dir",
             str(ctx["litgpt_checkpoint"]), "--json_path", str(args.data_file), "--val_split_fraction",
             str(args.val_split_fraction), "--micro_batch_size", str(args.micro_batch_size), "--max_seq_length",
             str(args.max_seq_length), "--batches", str(args.warmup + args.steps), "--out_file", str(counts_file)],
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        ctx["litgpt_counts"] = json.loads(counts_file.read_text())

    ceilings = [matmul_ceiling(args.precision)]
    sizes = model_sizes(args.checkpoint_dir, args.method)
    runs: list[dict] = []
    errors: dict[str, list[str]] = {}
    started = time.perf_counter()
    for round_ in range(args.repeats):
        # Each round starts one tool later (ours, litgpt, hf; litgpt, hf, ours; ...), so that a load that drifts
        # during a round does not always favour the same tool.
        k = round_ % len(args.tools)
        for tool in args.tools[k:] + args.tools[:k]:
            out_dir = work / "runs" / f"{tool}-{args.method}-{round_}"
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            log(f"round {round_ + 1}/{args.repeats}: {tool}")
            try:
                run = RUNNERS[tool](args, ctx, out_dir)
            except Exception as e:  # one failing tool must not lose the others' numbers
                errors.setdefault(tool, []).append(str(e))
                log(f"{tool} failed: {str(e).splitlines()[0]}")
                continue
            run.update(tool=tool, round=round_)
            runs.append(run)
            step_s = statistics.median(s["time_s"] for s in run["steps"] if s["step"] > args.warmup)
            log(f"  {tool}: median step {step_s:.2f} s, wall {run['wall_s']:.0f} s, peak RSS {run['peak_rss_gb']:.2f} GB")
        ceilings.append(matmul_ceiling(args.precision))
    parity = None
    if args.parity_steps > 0 and "hf" in args.tools and "ours" in args.tools:
        try:
            parity = loss_parity(args, ctx, work)
        except Exception as e:
            errors.setdefault("parity", []).append(str(e))
    ceiling = {**{k: ceilings[0][k] for k in ("size", "dtype", "device", "threads")},
               "best_gflops": max(c["best_gflops"] for c in ceilings),
               "median_gflops": statistics.median(c["median_gflops"] for c in ceilings)}

    for run in runs:
        run["summary"] = summarise_run(run, args.warmup, sizes, args.micro_batch_size, ceiling["best_gflops"])
    summary, loss_by_step = {}, {}
    on_gpu = bool(runs) and all(r.get("peak_gpu_gb") is not None for r in runs)
    metrics = (*METRICS, *GPU_METRICS) if on_gpu else METRICS
    for tool in args.tools:
        mine = [r for r in runs if r["tool"] == tool]
        if not mine:
            continue
        summary[tool] = {m: spread([r["summary"][m] for r in mine]) for m in (*metrics, "gflops_per_s")}
        steps = sorted({s["step"] for r in mine for s in r["steps"]})
        loss_by_step[tool] = {str(k): statistics.median(s["loss"] for r in mine for s in r["steps"] if s["step"] == k)
                              for k in steps}
    ratios = {}
    for peer in args.tools:
        if peer == "ours":
            continue
        pairs = [(o, p) for o in runs for p in runs if o["tool"] == "ours" and p["tool"] == peer
                 and o["round"] == p["round"]]
        if pairs:
            ratios[peer] = {m: spread([o["summary"][m] / p["summary"][m] for o, p in pairs]) for m in metrics}

    result = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tools": args.tools,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "matmul": ceiling, "load_average": os.getloadavg()},
        "model_sizes": sizes,
        "summary": summary,
        "ratios": ratios,
        "loss_by_step": loss_by_step,
        "loss_parity": parity,
        "errors": errors,
        "runs": runs,
        "wall_s": time.perf_counter() - started,
    }
    args.out_file.parent.mkdir(parents=True, exist_ok=True)
    args.out_file.write_text(json.dumps(result, indent=1))
    report(result)
    print(f"\n{len(runs)} runs in {result['wall_s'] / 60:.1f} min; results in {args.out_file}")
    return result


if __name__ == "__main__":
    main()
