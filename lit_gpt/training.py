"""What the finetune loops call: Fabric setup, the data stream, LR schedule, validation, saving and resuming.

Plain functions and two small classes with no hooks: the loop itself stays visible in each
`finetune/*.py` script (and is identical across them).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from lightning_fabric import Fabric
from lightning_fabric.strategies import FSDPStrategy
import torch
import torch.nn as nn
import yaml

from lit_gpt.args import EvalArgs, TrainArgs
from lit_gpt.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_EXTRA_FILES,
    TOKENIZER_FILES,
    WEIGHTS_FILE,
    file_fingerprint,
    save_safetensors,
)
from lit_gpt.model import IGNORE_INDEX
from lit_gpt.utils import reuse_freed_host_memory

HPARAMS_FILE = "hyperparameters.yaml"
RESUME_FILE = "resume_state.pt"
LOG_FILE = "metrics.csv"


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
    from lit_gpt.checkpoint import check_valid_checkpoint_dir

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


def report_parameters(fabric: Fabric, model: nn.Module) -> None:
    """Print how many parameters train and how many are frozen (quantized weights counted unpacked)."""
    from lit_gpt.quantize import logical_numel

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(logical_numel(p) for p in model.parameters())
    fabric.print(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)")


def finish(fabric: Fabric, out_dir: Path) -> None:
    """End of a run: draw the loss curve and say where everything is."""
    if fabric.is_global_zero:
        png = plot_loss_curve(out_dir)
        fabric.print(f"Final weights: {out_dir / 'final'}")
        fabric.print(f"Metrics: {out_dir / LOG_FILE}" + (f", loss curve: {png}" if png else ""))
        if torch.cuda.is_available():
            fabric.print(f"Peak GPU memory: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")


# --- data --------------------------------------------------------------------------------------------------
@dataclass
class DataPosition:
    """Where the run is in the (infinite, epoch after epoch) sample order. Saved for exact resume."""

    epoch: int = 0
    index: int = 0  # next position within the epoch's order


def uses_shared_prefix(train: TrainArgs, device_type: str) -> bool:
    """Whether batches on `device_type` compute their common prompt template once (`GPT.forward(shared_prefix=)`):
    as --train.shared_prefix says, by default only on the CPU (slower on a GPU, see TrainArgs.shared_prefix),
    and never for a compiled model (a compiled graph takes no layout)."""
    share = device_type == "cpu" if train.shared_prefix is None else train.shared_prefix
    return share and not train.compile


class BatchStream:
    """Micro-batches for one optimizer step, for this rank, from a deterministic per-epoch order.

    The order of epoch e depends only on (seed, e), so resuming is just restoring `position`.
    One optimizer step takes `global_batch_size` consecutive samples of the order; rank r's micro-batch m
    is the slice [m * micro * world + r * micro, ... + micro) of them, so N devices with micro batch b see
    the same samples per micro-step as 1 device with micro batch N * b.
    """

    def __init__(self, dataset, train: TrainArgs, rank: int, world_size: int, pad_id: int = 0) -> None:
        from lit_gpt.data import epoch_order

        if len(dataset) == 0:
            raise ValueError("The training set is empty: prepare data with scripts/prepare_alpaca.py first.")
        self.dataset, self.train, self.rank, self.world, self.pad_id = dataset, train, rank, world_size, pad_id
        self._epoch_order = epoch_order
        self.position = DataPosition()
        self.row_length = int(max(dataset.lengths)) - 1 if train.packing else 0
        self._order: Optional[list[int]] = None
        self._order_epoch = -1
        self.share_prefix = uses_shared_prefix(train, accelerator())

    def _order_for(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            lengths = getattr(self.dataset, "lengths", None) if self.train.group_by_length else None
            self._order = self._epoch_order(
                len(self.dataset),
                epoch=epoch,
                seed=self.train.seed,
                lengths=lengths,
                window=self.train.micro_batch_size * self.world * 64,
            )
            self._order_epoch = epoch
        return self._order

    def _take(self, n: int) -> list[int]:
        """The next `n` sample indices of the order, moving on to the next epoch when one ends."""
        out: list[int] = []
        while len(out) < n:
            order = self._order_for(self.position.epoch)
            chunk = order[self.position.index : self.position.index + n - len(out)]
            out += chunk
            self.position.index += len(chunk)
            if self.position.index >= len(order):
                self.position = DataPosition(self.position.epoch + 1, 0)
        return out

    def next_step(self) -> list[MicroBatch]:
        """This rank's micro-batches for the next optimizer step."""
        from lit_gpt.data import collate, shared_prefix_length

        if self.train.packing:
            return self._next_packed_step()
        micro = self.train.micro_batch_size
        indices = self._take(self.train.global_batch_size)
        batches = []
        for start in range(0, len(indices), micro * self.world):
            samples = [self.dataset[i] for i in indices[start + self.rank * micro : start + (self.rank + 1) * micro]]
            input_ids, targets = collate(samples, pad_id=self.pad_id)
            prefix = shared_prefix_length(input_ids, targets) if self.share_prefix else 0
            tokens = sum(len(s[0]) - 1 for s in samples)
            batches.append(MicroBatch.of(input_ids, targets, tokens=tokens, shared_prefix=prefix))
        return batches

    def _next_packed_step(self) -> list[MicroBatch]:
        """`global_batch_size` packed rows of up to `row_length` tokens, filled with consecutive samples."""
        from lit_gpt.data import collate_packed

        rows: list[list] = []
        while len(rows) < self.train.global_batch_size:
            row, used = [], 0
            while True:
                # Peek before taking, so the saved position never includes a sample that went into no row.
                index = self._order_for(self.position.epoch)[self.position.index]
                n = int(self.dataset.lengths[index]) - 1
                if row and used + n > self.row_length:
                    break
                row.append(self.dataset[self._take(1)[0]])
                used += n
            rows.append(row)
        micro = self.train.micro_batch_size
        batches = []
        for start in range(0, len(rows), micro * self.world):
            mine = rows[start + self.rank * micro : start + (self.rank + 1) * micro]
            input_ids, targets, positions = collate_packed(mine, pad_id=self.pad_id)
            tokens = sum(len(s[0]) - 1 for row in mine for s in row)
            batches.append(MicroBatch.of(input_ids, targets, tokens=tokens, positions=positions))
        return batches


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T), IGNORE_INDEX where no loss
    supervised: int  # targets that carry loss
    tokens: int  # non-padding input tokens
    positions: Optional[torch.Tensor] = None  # (B, T) for packed rows
    shared_prefix: int = 0  # leading tokens all rows share with no loss, computed once (data.shared_prefix_length)

    @classmethod
    def of(cls, input_ids, targets, tokens: int, positions=None, shared_prefix: int = 0) -> "MicroBatch":
        return cls(input_ids, targets, int((targets != IGNORE_INDEX).sum()), tokens, positions, shared_prefix)

    def model_inputs(self, device) -> dict[str, Any]:
        """Keyword arguments of `model(...)` for this batch, on `device`: the loss comes back."""
        inputs = {"idx": self.input_ids, "targets": self.targets}
        if self.positions is not None:
            inputs["positions"] = self.positions
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        if self.shared_prefix:
            inputs["shared_prefix"] = self.shared_prefix
        return inputs


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
    from tqdm import tqdm

    from lit_gpt.data import collate, shared_prefix_length

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
    from lit_gpt.generation import generate

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
            with open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["step", "name", "value"])
                writer.writeheader()
                writer.writerows(rows)
        if fabric.is_global_zero:
            from tqdm import tqdm

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
        with open(self.path, "a", newline="") as f:
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


# --- saving ------------------------------------------------------------------------------------------------
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (what resume needs besides the optimizer)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_output_dir(
    fabric: Fabric,
    out_dir: Path,
    weights: dict[str, torch.Tensor],
    weights_file: str,
    hparams: dict[str, Any],
    checkpoint_dir: Path,
) -> None:
    """Write a self-describing output directory atomically (rank 0): weights, hyperparameters, config, tokenizer.

    The directory is assembled under a temporary name and renamed into place, so a killed run leaves
    either the previous directory or the new one.
    """
    if fabric.is_global_zero:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); an output directory is an ordinary readable one
        try:
            metadata = {"method": str(hparams["method"]), "hyperparameters": json.dumps(hparams, default=str)}
            save_safetensors(weights, tmp / weights_file, metadata=metadata)
            (tmp / HPARAMS_FILE).write_text(yaml.safe_dump(hparams, sort_keys=False))
            for name in (CONFIG_FILE, *TOKENIZER_FILES, *TOKENIZER_EXTRA_FILES):
                if (checkpoint_dir / name).is_file():
                    shutil.copy2(checkpoint_dir / name, tmp / name)
            if out_dir.exists():
                old = out_dir.with_name(f".{out_dir.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out_dir, old)
                os.replace(tmp, out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    fabric.barrier()


def base_fingerprint(checkpoint_dir: Path) -> str:
    """Identifies the base weights so finetuned weights cannot silently be loaded onto another model."""
    return file_fingerprint(checkpoint_dir / WEIGHTS_FILE)


def run_hyperparameters(method: str, settings: Any, **values: Any) -> dict[str, Any]:
    """The hyperparameters.yaml content: method, its settings, and everything else the run was given."""
    out: dict[str, Any] = {"method": method, "settings": asdict(settings) if settings is not None else {}}
    for key, value in values.items():
        out[key] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
    return json.loads(json.dumps(out, default=str))  # plain types only, so yaml.safe_dump works


def save_resume_state(
    fabric: Fabric,
    out_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    position: DataPosition,
) -> None:
    """Everything needed to continue exactly: trainable weights, optimizer, step, data position, RNG (all ranks)."""
    rng = torch.get_rng_state()
    rng_all = fabric.all_gather(rng.to(fabric.device)).cpu() if fabric.world_size > 1 else rng[None]
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    cuda_all = None
    if cuda_rng is not None:
        cuda_all = fabric.all_gather(cuda_rng.to(fabric.device)).cpu() if fabric.world_size > 1 else cuda_rng[None]
    state = {
        "trainable": {k: v.cpu() for k, v in trainable_state(model).items()},
        "optimizer": optimizer.state_dict(),
        "step": step,
        "epoch": position.epoch,
        "index": position.index,
        "rng": rng_all.reshape(fabric.world_size, -1),
        "cuda_rng": cuda_all,
    }
    if fabric.is_global_zero:
        path = out_dir / RESUME_FILE
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{RESUME_FILE}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    fabric.barrier()


def load_resume_state(
    fabric: Fabric, out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, DataPosition]:
    """Restore what `save_resume_state` wrote; returns (step, data position)."""
    path = out_dir / RESUME_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume was given but {path} does not exist: no earlier run saved a checkpoint in --out_dir {out_dir}. "
            "Drop --resume to start a new run, or point --out_dir at the run to continue."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    trainable = {k for k, p in params.items() if p.requires_grad}
    if set(state["trainable"]) != trainable:
        raise ValueError(
            f"{path} was saved by a run with different trainable parameters (method or settings changed). "
            "Resume with the same flags as the original run."
        )
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"][fabric.global_rank].clone())
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"][fabric.global_rank].clone())
    return int(state["step"]), DataPosition(int(state["epoch"]), int(state["index"]))
