"""Training: the one loop every finetune script runs (`fit`), and what it is made of -- Fabric setup, the
optimizer, the learning-rate schedule, validation, a sample response, progress and logs.

A finetune script builds its model (base checkpoint + its PEFT method), then calls `fit`, then saves. `fit`
knows nothing method-specific: it trains whatever parameters the method left with requires_grad, and saves
through the `save` function the script gives it. Plain functions and one small class, no hooks.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from lightning_fabric import Fabric
from lightning_fabric.strategies import FSDPStrategy
from tqdm import tqdm

from lit_gpt.args import EvalArgs, TrainArgs
from lit_gpt.checkpoint import base_fingerprint, check_valid_checkpoint_dir
from lit_gpt.data import BatchStream, DataPosition, collate, prepared_data_fingerprint, shared_prefix_length
from lit_gpt.generation import generate
from lit_gpt.model import IGNORE_INDEX
from lit_gpt.outputs import (
    HISTORY_KEY,
    HPARAMS_FILE,
    LOG_FILE,
    RESUME_FILE,
    claim_out_dir,
    disk_errors,
    latest_step_dir,
    load_resume_state,
    release_out_dir,
    remove_stale_temporaries,
    run_hyperparameters,
    save_resume_state,
)
from lit_gpt.quantize import check_quantize, logical_numel
from lit_gpt.utils import choose_precision, reuse_freed_host_memory


# --- the loop -----------------------------------------------------------------------------------------------
def fit(
    fabric: Fabric,
    model: nn.Module,
    tokenizer,
    train_data,
    val_data,
    out_dir: Path,
    train: TrainArgs,
    eval: EvalArgs,
    resume: bool,
    hparams: dict[str, Any],
    save: Callable[[Path], None],
) -> None:
    """The training loop of every finetune script: train `model`'s trainable parameters on `train_data`.

    Validates before the first step, every `eval.interval` steps and at the end (printing a sample response);
    every `train.save_interval` steps calls `save(out_dir / "step-NNNNNN")` and writes the resume state, from
    which `resume=True` continues exactly (same weights, optimizer, data position and RNG). A resume that would
    change what the run trains, on what or how (`hparams` against the saved run) is refused; the changes it may
    make (more steps, another eval interval, ...) are printed and recorded in `hparams` (see
    `lit_gpt.outputs.load_resume_state`). The final save is the caller's. `model` is the bare model as the PEFT
    method left it; Fabric wraps it here. First rank 0 claims `out_dir` (another live run there is an error) and
    cleans up what a killed save left in it.
    """
    if fabric.is_global_zero:
        claim_out_dir(out_dir)  # before the cleanup: a live run's save in progress is not stale
        cleaned = remove_stale_temporaries(out_dir)
        if cleaned:
            fabric.print(f"Cleaned up after an interrupted save in {out_dir}: {'; '.join(cleaned)}.")
    report_parameters(fabric, model)
    optimizer = adamw(model, train, fabric)
    raw_model = model  # Fabric's wrapper runs forward/backward; the bare model is sampled, saved and resumed
    model, optimizer = fabric.setup(prepare_model_for_training(model, train), optimizer)
    step, position = 0, DataPosition()
    if resume:
        step, position, changes = load_resume_state(fabric, out_dir, raw_model, optimizer, hparams)
        fabric.print(f"Resuming from step {step} (epoch {position.epoch}, sample {position.index}).")
        if changes:
            listed = "; ".join(f"{key} {before!r} -> {after!r}" for key, (before, after) in changes.items())
            fabric.print(f"Changed on resume: {listed} (recorded in {HPARAMS_FILE} under '{HISTORY_KEY}').")

    total_steps = train.total_steps(len(train_data))
    stream = BatchStream(train_data, train, fabric.global_rank, fabric.world_size, fabric.device.type)
    stream.position = position
    progress = ProgressLog(fabric, out_dir, total_steps, start_step=step)
    if step == 0:
        with progress.paused():  # time outside the training steps stays out of the reported speed
            val_loss = validate(fabric, model, val_data, eval, train.micro_batch_size, stream.share_prefix)
        progress.log(0, {"val_loss": val_loss})
        progress.write(f"step 0: val loss {val_loss:.4f}")
    running_loss = torch.zeros((), device=fabric.device)
    # Closed on the way out of an error too: the error message then starts on a line of its own.
    with contextlib.closing(progress), _saying_what_survives_an_interrupt(out_dir, lambda: step):
        while step < total_steps:
            set_lr(optimizer, lr_at(step, train, total_steps))
            micro_batches = stream.next_step()
            # Weight each micro-batch by its share of the step's loss-carrying tokens (over all devices), so the
            # loss is the same token mean whatever the micro batch size, accumulation or device count.
            step_supervised = global_sum(fabric, sum(b.supervised for b in micro_batches))
            for i, batch in enumerate(micro_batches):
                weight = batch.supervised * fabric.world_size / max(step_supervised, 1)
                with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
                    loss = model(**batch.model_inputs(fabric.device)) * weight
                    fabric.backward(loss)
                running_loss += loss.detach()
            if train.grad_clip > 0:
                fabric.clip_gradients(model, optimizer, max_norm=train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1, sum(b.tokens for b in micro_batches), sum(b.supervised for b in micro_batches))
            if step % train.log_interval == 0 or step == total_steps:
                steps_logged = step % train.log_interval or train.log_interval
                train_loss = float(fabric.all_reduce(running_loss, reduce_op="sum")) / fabric.world_size / steps_logged
                running_loss.zero_()
                progress.log(step, {"train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                                    **progress.throughput()}, show=True)
            if step % eval.interval == 0 or step == total_steps:
                with progress.paused():
                    val_loss = validate(fabric, model, val_data, eval, train.micro_batch_size, stream.share_prefix)
                    prompt, response = sample_response(raw_model, tokenizer, val_data, eval.max_new_tokens,
                                                       fabric.device)
                progress.log(step, {"val_loss": val_loss}, show=True)
                progress.write(f"step {step}: val loss {val_loss:.4f}\n{prompt}{response}")
            if step % train.save_interval == 0 and step < total_steps:
                with progress.paused():
                    save(out_dir / f"step-{step:06d}")
                    save_resume_state(fabric, out_dir, raw_model, optimizer, step, stream.position, hparams)


@contextlib.contextmanager
def _saying_what_survives_an_interrupt(out_dir: Path, current_step: Callable[[], int]):
    """Ctrl-C in the loop ends the run with what the user needs next: the last complete save and how to resume."""
    try:
        yield
    except KeyboardInterrupt:
        latest = latest_step_dir(out_dir)
        if (out_dir / RESUME_FILE).is_file() and latest is not None:
            note = (f"the last save is {latest} with {RESUME_FILE}: run the same command with "
                    "--resume true to continue from there.")
        else:
            note = "nothing was saved yet (the first save comes after --train.save_interval steps)."
        raise KeyboardInterrupt(f"stopped at step {current_step()}; {note}") from None


# --- Fabric ------------------------------------------------------------------------------------------------
def accelerator() -> str:
    """The best device type here: cuda, mps or cpu."""
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def setup_fabric(devices: int, precision: str, strategy: str) -> Fabric:
    """Fabric on the best available accelerator (CUDA, MPS, CPU), with DDP/FSDP for `devices` > 1.

    `precision` is a Fabric precision string (see `lit_gpt.utils.choose_precision` for the default).
    `strategy`: "auto" (DDP when devices > 1), "ddp" or "fsdp".
    """
    if strategy == "fsdp":
        strategy = FSDPStrategy(state_dict_type="full", limit_all_gathers=True, cpu_offload=False)
    elif strategy == "auto" and devices > 1:
        strategy = "ddp"
    elif strategy not in ("auto", "ddp"):
        raise ValueError(f"--strategy must be one of auto, ddp, fsdp; got {strategy!r}.")
    if accelerator() == "cpu":
        reuse_freed_host_memory()  # activations live in host memory: stop page-faulting them in every step
    return Fabric(accelerator=accelerator(), devices=devices, strategy=strategy, precision=precision)


def check_run_args(
    checkpoint_dir: Path, data_dir: Path, out_dir: Path, devices: int, train: TrainArgs, eval: EvalArgs, resume: bool
) -> None:
    """Validate a finetune run's arguments before any process starts: flags, paths, and a writable out_dir."""
    if devices < 1:
        raise ValueError(f"--devices must be at least 1, got {devices}.")
    train.validate(devices)
    eval.validate()
    check_valid_checkpoint_dir(checkpoint_dir)
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(
            f"--data_dir {str(data_dir)!r} does not exist. Prepare data first, e.g. "
            f"`python scripts/prepare_alpaca.py --checkpoint_dir {checkpoint_dir} --destination_path {data_dir}`."
        )
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write_test", delete=True)
        probe.close()
    except OSError as e:
        raise PermissionError(f"--out_dir {str(out_dir)!r} is not writable ({e.strerror}). Choose another --out_dir.") from None
    if not resume and (Path(out_dir) / RESUME_FILE).exists():
        print(
            f"note: {out_dir} holds an earlier run's {RESUME_FILE}; this run starts from scratch and overwrites it "
            "(pass --resume to continue that run instead).",
            file=sys.stderr,
        )


def start_run(
    method: str,
    settings: Any,
    checkpoint_dir: Path,
    data_dir: Path,
    out_dir: Path,
    precision: Optional[str],
    devices: int,
    strategy: str,
    resume: bool,
    quantize: Optional[str],
    train: TrainArgs,
    eval: EvalArgs,
) -> tuple[Fabric, dict[str, Any]]:
    """Check a finetune run's flags and paths before any process starts, pick its precision, and make its Fabric.

    Returns (fabric, the run's hyperparameters as `hyperparameters.yaml` records them: method, settings, every
    flag, the precision chosen, the quantization, and fingerprints of the base weights and of the prepared data).
    `settings` is the method's settings dataclass (None for a full finetune); `quantize` must be None for a
    method that cannot quantize its base.
    """
    hparams = run_hyperparameters(
        method, settings, checkpoint_dir=checkpoint_dir, data_dir=data_dir, devices=devices, train=train, eval=eval
    )
    check_run_args(checkpoint_dir, data_dir, out_dir, devices, train, eval, resume)
    hparams["precision"] = precision = choose_precision(precision, accelerator())
    hparams["quantize"] = check_quantize(quantize, accelerator(), precision, strategy)
    hparams["base_fingerprint"] = base_fingerprint(checkpoint_dir)
    hparams["data_fingerprint"] = prepared_data_fingerprint(data_dir)
    return setup_fabric(devices, precision, strategy), hparams


def report_parameters(fabric: Fabric, model: nn.Module) -> None:
    """Print how many parameters train and how many are frozen (quantized weights counted unpacked)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(logical_numel(p) for p in model.parameters())
    fabric.print(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)")


def finish(fabric: Fabric, out_dir: Path) -> None:
    """End of a run: draw the loss curve and say where everything is."""
    if fabric.is_global_zero:
        release_out_dir(out_dir)
        png = plot_loss_curve(out_dir)
        fabric.print(f"Final weights: {out_dir / 'final'}")
        fabric.print(f"Metrics: {out_dir / LOG_FILE}" + (f", loss curve: {png}" if png else ""))
        if torch.cuda.is_available():
            fabric.print(f"Peak GPU memory: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")


def adamw(model: nn.Module, train: TrainArgs, fabric: Optional[Fabric] = None) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters (those with requires_grad, as the PEFT method's
    `mark_trainable` left them) with the run's learning rate and weight decay.

    On CPU and CUDA it is torch's fused kernel (one call per step): on the CPU the default per-tensor loop
    took 24 ms a step over Adapter v2's 539 tensors on SmolLM2-135M, the fused kernel 3.7 ms (LoRA: 6.6 -> 1.0).
    Under FSDP (a `fabric` with that strategy) it stays torch's default: fused AdamW and FSDP's sharded
    optimizer state have a history of not getting along, and we have no multi-GPU machine to test it on.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    sharded = fabric is not None and isinstance(fabric.strategy, FSDPStrategy)
    fused = not sharded and bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                                 for p in params)
    return torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay, fused=fused or None)


def prepare_model_for_training(model: nn.Module, train: TrainArgs) -> nn.Module:
    """Apply the speed/memory switches of TrainArgs: activation checkpointing and torch.compile."""
    model.activation_checkpointing = train.activation_checkpointing
    if train.compile:
        # dynamic=True: batch lengths vary from step to step; one graph serves them all.
        model = torch.compile(model, dynamic=True)
    return model


def global_sum(fabric: Fabric, value: float) -> float:
    """Sum a number over all ranks (no communication on one device)."""
    if fabric.world_size == 1:
        return value
    return float(fabric.all_reduce(torch.tensor(float(value), device=fabric.device), reduce_op="sum"))


# --- learning-rate schedule --------------------------------------------------------------------------------
def lr_at(step: int, train: TrainArgs, total_steps: int) -> float:
    """Linear warmup for `warmup_steps`, then cosine decay to `min_learning_rate` at `total_steps`."""
    if step < train.warmup_steps:
        return train.learning_rate * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return train.min_learning_rate + (train.learning_rate - train.min_learning_rate) * cosine


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --- validation and samples --------------------------------------------------------------------------------
@torch.no_grad()
def validate(
    fabric: Fabric, model: nn.Module, dataset, eval_args: EvalArgs, micro_batch_size: int, share_prefix: bool = False
) -> float:
    """Token-weighted mean loss over the first `eval_args.max_iters` micro-batches' worth of validation samples,
    over all ranks.

    Those samples are batched shortest first, so a batch holds samples of similar length (2% padding instead
    of ~26% on math_data.json), and with `share_prefix` a batch's common prompt template is computed once
    (`GPT.forward(shared_prefix=...)`, as in training; not for a compiled model): 67 -> 50 s for its 163
    validation samples on 2 CPU cores. The loss is the same token mean whatever the batching. A progress bar
    shows on rank 0.

    NaN when the validation set is empty (data prepared with --val_split_fraction 0): there is nothing to measure.
    """
    if len(dataset) == 0:
        return float("nan")
    n = min(len(dataset), eval_args.max_iters * micro_batch_size)
    lengths = getattr(dataset, "lengths", None)
    lengths = lengths[:n].tolist() if lengths is not None else [len(dataset[i][0]) for i in range(n)]
    order = sorted(range(n), key=lengths.__getitem__)
    batches = [order[start : start + micro_batch_size] for start in range(0, n, micro_batch_size)]
    mine = batches[fabric.global_rank :: fabric.world_size]
    model.eval()
    loss_sum, count = 0.0, 0
    for indices in tqdm(mine, desc="validate", unit="batch", leave=False, dynamic_ncols=True,
                        disable=not fabric.is_global_zero):
        input_ids, targets = collate([dataset[i] for i in indices])
        supervised = int((targets != IGNORE_INDEX).sum())
        if supervised:
            prefix = shared_prefix_length(input_ids, targets) if share_prefix else 0
            loss = model(input_ids.to(fabric.device), targets=targets.to(fabric.device), shared_prefix=prefix)
            loss_sum += float(loss) * supervised
            count += supervised
    model.train()
    loss_sum, count = global_sum(fabric, loss_sum), global_sum(fabric, count)
    return loss_sum / max(count, 1)


@torch.no_grad()
def sample_response(model: nn.Module, tokenizer, dataset, max_new_tokens: int, device) -> tuple[str, str]:
    """Greedy response to the prompt of the first validation sample: (prompt text, generated text).

    ("", "") when the validation set is empty.
    """
    if len(dataset) == 0:
        return "", ""
    input_ids, labels = dataset[0]
    prompt_len = int((labels == IGNORE_INDEX).sum()) or len(input_ids)
    prompt = input_ids[:prompt_len].to(device)
    was_training = model.training
    model.eval()
    # generate() sizes the KV cache, caps the length at block_size, and drops the cache when it is done.
    tokens = list(generate(model, prompt, max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=tokenizer.stop_ids))
    model.train(was_training)
    return tokenizer.decode(prompt), tokenizer.decode(torch.tensor(tokens, dtype=torch.long))


# --- progress and logs -------------------------------------------------------------------------------------
class ProgressLog:
    """Progress bar (loss, tokens/s, ETA) on rank 0 and a CSV of metrics in the output directory."""

    def __init__(self, fabric: Fabric, out_dir: Path, total_steps: int, start_step: int) -> None:
        self.fabric, self.path = fabric, out_dir / LOG_FILE
        self.bar = None
        if fabric.is_global_zero and self.path.exists():
            # A new run starts a new log; a resumed run drops what the killed run logged after its last save.
            with open(self.path) as f:
                rows = [row for row in csv.DictReader(f) if int(row["step"]) <= start_step] if start_step else []
            # Rewritten beside it and renamed over it: a run killed right here keeps the log it had.
            with disk_errors(self.path):
                fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{LOG_FILE}.", suffix=".tmp")
            try:
                with open(fd, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=["step", "name", "value"])
                    writer.writeheader()
                    writer.writerows(rows)
                os.chmod(tmp, 0o644)  # mkstemp creates 0600; a log is an ordinary readable file
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        if fabric.is_global_zero:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.t0, self.tokens = time.perf_counter(), 0
        self.postfix: dict[str, str] = {}
        self.window = {"t0": self.t0, "steps": 0, "tokens": 0, "supervised": 0}  # since the last throughput()
        self.tb = _tensorboard_writer(out_dir) if fabric.is_global_zero else None

    def log(self, step: int, metrics: dict[str, float], show: bool = False) -> None:
        """Append metrics to metrics.csv (and TensorBoard); `show` puts them on the progress bar too."""
        if not self.fabric.is_global_zero:
            return
        new = not self.path.exists()
        with disk_errors(self.path), open(self.path, "a", newline="") as f:  # a full or read-only disk: named
            writer = csv.DictWriter(f, fieldnames=["step", "name", "value"])
            if new:
                writer.writeheader()
            for name, value in metrics.items():
                writer.writerow({"step": step, "name": name, "value": f"{value:.6g}"})
        if self.tb is not None:
            for name, value in metrics.items():
                self.tb.add_scalar(name, value, step)
        if show:
            self.postfix.update({k: f"{v:.4g}" for k, v in metrics.items() if k in ("train_loss", "val_loss")})

    def update(self, steps: int, tokens: int, supervised: int = 0) -> None:
        """Advance the bar by `steps`; `tokens` are the non-padding tokens they processed (this rank),
        `supervised` the tokens that carried loss."""
        self.tokens += tokens
        self.window["steps"] += steps
        self.window["tokens"] += tokens
        self.window["supervised"] += supervised
        if self.bar is not None:
            elapsed = time.perf_counter() - self.t0
            tokens_per_s = self.tokens * self.fabric.world_size / max(elapsed, 1e-9)
            self.bar.set_postfix({**self.postfix, "tok/s": f"{tokens_per_s:.0f}"}, refresh=False)
            self.bar.update(steps)

    def throughput(self) -> dict[str, float]:
        """Speed since the last call (all ranks): seconds per step, non-padding and supervised tokens per second.

        Measured on the host clock: on a GPU it is exact over a logging window, not per step.
        """
        now = time.perf_counter()
        w, elapsed = self.window, max(now - self.window["t0"], 1e-9)
        world = self.fabric.world_size
        out = {
            "step_time_s": elapsed / max(w["steps"], 1),
            "tokens_per_s": w["tokens"] * world / elapsed,
            "supervised_tokens_per_s": w["supervised"] * world / elapsed,
        }
        self.window = {"t0": now, "steps": 0, "tokens": 0, "supervised": 0}
        return out

    @contextlib.contextmanager
    def paused(self):
        """Leave the time spent inside (validation, sample generation, saving) out of the tokens/s, the
        logged throughput and the progress bar's rate and ETA: they describe training steps only."""
        start = time.perf_counter()
        try:
            yield
        finally:
            pause = time.perf_counter() - start
            self.t0 += pause
            self.window["t0"] += pause
            if self.bar is not None:
                self.bar.unpause()  # tqdm: restart its clock from its last print, so the pause is not a slow step

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.fabric.is_global_zero:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _tensorboard_writer(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def plot_loss_curve(out_dir: Path) -> Optional[Path]:
    """Draw train and validation loss from metrics.csv into loss_curve.png (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(out_dir / LOG_FILE) as f:
        for row in csv.DictReader(f):
            if row["name"] in ("train_loss", "val_loss"):
                xs, ys = series.setdefault(row["name"], ([], []))
                xs.append(int(row["step"]))
                ys.append(float(row["value"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if name == "val_loss" else None, label=name.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(out_dir.name)
    ax.legend()
    ax.grid(alpha=0.3)
    path = out_dir / "loss_curve.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
