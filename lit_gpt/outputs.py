"""What a finetune run writes into its `--out_dir`, and reads back when it resumes.

    out/lora/
      final/                     the trained weights, self-described (see `save_output_dir`):
        lora.safetensors           the method's tensors only (a full finetune: lit_model.safetensors)
        hyperparameters.yaml       method, its settings, base checkpoint and its fingerprint, every flag
        model_config.yaml, tokenizer.json, ...   copied from the base checkpoint
      step-000100/               the same, every --train.save_interval steps
      resume_state.pt            trainable weights, optimizer, step, data position, RNG, and what the run is:
                                 `--resume true` continues it exactly (see `resume_differences`)
      metrics.csv                losses, learning rate, speed (written by `lit_gpt.training.ProgressLog`)

Every file is written atomically (a killed run leaves the old version or the new one, never half of one),
and nothing is unpickled when read back: the resume state goes through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import yaml
from lightning_fabric import Fabric

from lit_gpt.checkpoint import CONFIG_FILE, TOKENIZER_EXTRA_FILES, TOKENIZER_FILES, save_safetensors
from lit_gpt.data import DataPosition

HPARAMS_FILE = "hyperparameters.yaml"
RESUME_FILE = "resume_state.pt"
LOG_FILE = "metrics.csv"
HISTORY_KEY = "resumed"  # hyperparameters.yaml: [{"step": N, "changes": {key: [before, after]}}, ...] per resume

# What may change when a run resumes, because it changes how long the run goes on, how often it logs, validates
# and saves, where its inputs are (their fingerprints must still match) or how fast it computes, not what it
# learns from which samples. Every other difference between the saved run and the resuming command is refused.
RESUMABLE_CHANGES = (
    "checkpoint_dir", "data_dir", "version",
    "train.max_steps", "train.epochs", "train.log_interval", "train.save_interval",
    "train.activation_checkpointing", "train.compile", "train.shared_prefix",
    "eval.interval", "eval.max_iters", "eval.max_new_tokens",
)


# --- hyperparameters.yaml -----------------------------------------------------------------------------------
def run_hyperparameters(method: str, settings: Any, **values: Any) -> dict[str, Any]:
    """The hyperparameters.yaml content: method, its settings, and everything else the run was given."""
    out: dict[str, Any] = {"method": method, "settings": asdict(settings) if settings is not None else {}}
    for key, value in values.items():
        out[key] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
    return json.loads(json.dumps(out, default=str))  # plain types only, so yaml.safe_dump works


def read_hyperparameters(finetuned_dir: str | Path) -> dict[str, Any]:
    """The `hyperparameters.yaml` a finetune run wrote into its output directory."""
    path = Path(finetuned_dir) / HPARAMS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: --finetuned_dir must be an output directory of a finetune run "
            "(e.g. out/lora/final), which holds the weights and the hyperparameters.yaml that describes them."
        )
    return yaml.safe_load(path.read_text())


# --- output directories -------------------------------------------------------------------------------------
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


# --- resume state -------------------------------------------------------------------------------------------
def run_description(hparams: dict[str, Any], model: nn.Module, world_size: int) -> dict[str, Any]:
    """What makes a run the run it is, flattened to dotted keys ({"train.learning_rate": 3e-4, ...}): every
    hyperparameter (method, settings, flags, precision, the base and data fingerprints), the number of
    processes, the project version, and each trainable parameter's shape and dtype. Plain values only, so the
    resume state stays loadable with `torch.load(weights_only=True)`."""
    description = _flatten({k: v for k, v in hparams.items() if k != HISTORY_KEY})
    description["world_size"] = world_size
    description["version"] = _project_version()
    for name, p in model.named_parameters():
        if p.requires_grad:
            description[f"trainable.{name}"] = f"{tuple(p.shape)} {str(p.dtype).removeprefix('torch.')}"
    return description


def _project_version() -> str:
    try:
        return importlib.metadata.version("lit-gpt-peft")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never pip-installed
        return "unknown"


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> tuple[dict, dict]:
    """(refused, allowed): the keys whose values differ between a saved run's description and the resuming
    command's, {key: [saved value, current value]} (a key one side lacks has the value None there), split by
    `RESUMABLE_CHANGES`."""
    refused, allowed = {}, {}
    for key in sorted(set(saved) | set(current)):
        before, after = saved.get(key), current.get(key)
        if before != after:
            (allowed if key in RESUMABLE_CHANGES else refused)[key] = [before, after]
    return refused, allowed


def _refusal(path: Path, refused: dict[str, list]) -> str:
    lines = []
    trainable = {k: v for k, v in refused.items() if k.startswith("trainable.")}
    for key, (before, after) in refused.items():
        if not key.startswith("trainable."):
            lines.append(f"  {key}: {before!r} in the saved run, {after!r} now")
    if trainable:
        example = next(iter(trainable.items()))
        lines.append(f"  trainable parameters: {len(trainable)} differ in name, shape or dtype (e.g. {example[0]}: "
                     f"{example[1][0]!r} in the saved run, {example[1][1]!r} now)")
    return (
        f"--resume: {path} was saved by a run that differs from this command in what it trains, on what or how:\n"
        + "\n".join(lines)
        + f"\nResume with the saved run's values (its {HPARAMS_FILE} in {path.parent}/step-* lists them), or start a "
        "new run: another --out_dir, or drop --resume to start over in this one. Only these may change on resume: "
        + ", ".join(RESUMABLE_CHANGES) + "."
    )


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (what resume needs besides the optimizer)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_resume_state(
    fabric: Fabric,
    out_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    position: DataPosition,
    hparams: dict[str, Any],
) -> None:
    """Everything needed to continue exactly: trainable weights, optimizer, step, data position, RNG (all ranks),
    and what the run is (`run_description` of `hparams`, and the history of earlier resumes)."""
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
        "run": run_description(hparams, model, fabric.world_size),
        "history": list(hparams.get(HISTORY_KEY, [])),
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
    fabric: Fabric, out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, hparams: dict[str, Any]
) -> tuple[int, DataPosition, Optional[dict[str, list]]]:
    """Restore what `save_resume_state` wrote; returns (step, data position, the changes this resume makes).

    First the saved run's description is compared with this command's (`run_description` of `hparams`): a
    difference outside `RESUMABLE_CHANGES` (another learning rate, LoRA rank, dataset, batch size, base, ...)
    raises a ValueError that lists each one, before anything is restored. The allowed changes, {key: [before,
    after]}, are appended to `hparams[HISTORY_KEY]` (with the step), so that hyperparameters.yaml says which
    values the run used when. None for a resume state written before descriptions were saved (not checked).
    """
    path = out_dir / RESUME_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume was given but {path} does not exist: no earlier run saved a checkpoint in --out_dir {out_dir}. "
            "Drop --resume to start a new run, or point --out_dir at the run to continue."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    changes = None
    if "run" in state:
        refused, changes = resume_differences(state["run"], run_description(hparams, model, fabric.world_size))
        if refused:
            raise ValueError(_refusal(path, refused))
        history = list(state.get("history", []))
        if changes:
            history.append({"step": int(state["step"]), "changes": changes})
        hparams[HISTORY_KEY] = history
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
    return int(state["step"]), DataPosition(int(state["epoch"]), int(state["index"])), changes
