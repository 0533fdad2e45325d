"""What a finetune run writes into its `--out_dir`, and reads back when it resumes.

    out/lora/
      final/                     the trained weights, self-described (see `save_output_dir`):
        lora.safetensors           the method's tensors only (a full finetune: lit_model.safetensors)
        hyperparameters.yaml       method, its settings, base checkpoint and its fingerprint, every flag
        model_config.yaml, tokenizer.json, ...   the base checkpoint's, as hard links to .base_files/
      step-000100/               the same, every --train.save_interval steps
      .base_files/               one copy of the base's model_config.yaml and tokenizer files, taken at the
                                 run's first save (again if the base's files change): every saved directory
                                 hard-links them, so each is complete on its own (generate from it, copy it
                                 anywhere) while a multi-MB tokenizer.json takes its disk space once per run
      resume_state.pt            trainable weights, optimizer, step, data position, RNG, and what the run is:
                                 `--resume true` continues it exactly (see `resume_differences`)
      metrics.csv                losses, learning rate, speed (written by `lit_gpt.training.ProgressLog`)
      .run.lock                  held by the live run (`claim_out_dir`): a second run here is refused

Where the disk cannot hard-link (another filesystem, FAT, some network mounts) the side files are copied
instead. A linked file is the same file in every directory: to change, say, final/tokenizer_config.json, replace
it (write a new file, then rename it over the old one) rather than editing it in place.

Every file is written atomically (a killed run leaves the old version or the new one, never half of one),
and nothing is unpickled when read back: the resume state goes through `torch.load(weights_only=True)`.
A save is assembled under a temporary name in out_dir (`.step-000100.<8 random characters>/`,
`.resume_state.pt.<8 random characters>.tmp`; a directory being replaced waits as `.step-000100.old/`);
what a killed save left there is removed when the next run in that out_dir starts (`remove_stale_temporaries`).
A save that fails because the disk is full, over quota, read-only or not writable raises a `SaveError` that
names what survived; nothing half-written is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import json
import os
import pickle
import re
import shutil
import socket
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

import torch
import torch.nn as nn
import yaml
from lightning_fabric import Fabric
from safetensors import SafetensorError

from lit_gpt.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_EXTRA_FILES,
    TOKENIZER_FILES,
    base_fingerprint,
    is_legacy_fingerprint,
    same_base,
    save_safetensors,
)
from lit_gpt.data import DataPosition
from lit_gpt.files import SaveError, file_problem, first_line, read_yaml

HPARAMS_FILE = "hyperparameters.yaml"
RESUME_FILE = "resume_state.pt"
LOG_FILE = "metrics.csv"
HISTORY_KEY = "resumed"  # hyperparameters.yaml: [{"step": N, "changes": {key: [before, after]}}, ...] per resume

# hyperparameters.yaml is written by the run it describes; a broken one cannot be rebuilt from the weights alone.
HPARAMS_REMEDY = (
    "It is written by the finetune run it describes: use an output directory as the run wrote it (its final or "
    "step-* directory, or a copy of it), or train again."
)

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
    return read_yaml(path, HPARAMS_REMEDY)


# --- output directories -------------------------------------------------------------------------------------
BASE_FILES_DIR = ".base_files"  # in out_dir: the one copy of the base's side files that saved directories link
SIDE_FILES = (CONFIG_FILE, *TOKENIZER_FILES, *TOKENIZER_EXTRA_FILES)


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
    either the previous directory or the new one. The base's config and tokenizer files are hard links to one
    copy in `out_dir.parent/.base_files` (copies where the disk cannot link): every directory is complete on
    its own, and they take disk space once. Too little free space for the weights, or a full, read-only or
    unwritable disk, raises a `SaveError` naming what survived; nothing half-written is left behind.
    """
    if fabric.is_global_zero:
        root = out_dir.parent
        with disk_errors(out_dir):
            root.mkdir(parents=True, exist_ok=True)
            metadata = {"method": str(hparams["method"]), "hyperparameters": json.dumps(hparams, default=str)}
            hparams_text = yaml.safe_dump(hparams, sort_keys=False)
            to_copy = _base_files_to_copy(root, checkpoint_dir)
            header = sum(len(k) + len(v) for k, v in metadata.items()) + 200 * len(weights)
            check_free_space(out_dir, _tensor_bytes(weights) + header + len(hparams_text.encode())
                             + sum((checkpoint_dir / name).stat().st_size for name in to_copy))
            side_files = _refresh_base_files(root, checkpoint_dir, to_copy)
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{out_dir.name}."))
            try:
                os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); an output directory is an ordinary readable one
                save_safetensors(weights, tmp / weights_file, metadata=metadata)
                (tmp / HPARAMS_FILE).write_text(hparams_text)
                for path in side_files:
                    _link_or_copy(path, tmp / path.name)
                _replace_dir(tmp, out_dir)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    fabric.barrier()


def _base_files_to_copy(root: Path, checkpoint_dir: Path) -> list[str]:
    """The base's side files that `root/.base_files` lacks or holds an older version of."""
    store = root / BASE_FILES_DIR
    return [name for name in SIDE_FILES
            if (checkpoint_dir / name).is_file() and not _same_file(checkpoint_dir / name, store / name)]


def _same_file(source: Path, copy: Path) -> bool:
    """Whether `copy` holds what `source` does. copy2 keeps the mtime, so size and mtime settle it without
    reading either file, unless the disk rounds mtimes (then the bytes are compared)."""
    try:
        a, b = source.stat(), copy.stat()
    except FileNotFoundError:
        return False
    if a.st_size != b.st_size:
        return False
    return a.st_mtime_ns == b.st_mtime_ns or source.read_bytes() == copy.read_bytes()


def _refresh_base_files(root: Path, checkpoint_dir: Path, to_copy: list[str]) -> list[Path]:
    """Bring `root/.base_files` up to date with the base's side files; returns the paths to link from there.

    A file is never rewritten in place: earlier saved directories link the old version, which must not change
    under them. The new version is copied beside it and renamed over it, so they keep theirs.
    """
    store = root / BASE_FILES_DIR
    store.mkdir(exist_ok=True)
    for name in to_copy:
        fd, tmp = tempfile.mkstemp(dir=store, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copy2(checkpoint_dir / name, tmp)
            os.replace(tmp, store / name)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    present = [name for name in SIDE_FILES if (checkpoint_dir / name).is_file()]
    for name in set(SIDE_FILES) - set(present):  # the base dropped it: a new save must not carry it
        (store / name).unlink(missing_ok=True)
    return [store / name for name in present]


# os.link's ways of saying "not here": another filesystem, a filesystem without hard links (EPERM on FAT and
# some network mounts), or the file's link limit reached. The file is copied instead.
_NO_HARD_LINKS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        shutil.copy2(source, target)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename the finished directory `tmp` to `out_dir`, replacing an existing one (a re-save after a resume).

    A directory cannot be renamed over another, so the old one steps aside as `.<name>.old` first; if the
    rename fails it is put back, and if the process is killed in between `remove_stale_temporaries` puts it
    back at the next start.
    """
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- saves that fail: a full, read-only or unwritable disk ---------------------------------------------------
# The errors that come from the disk, not from the program: they become a SaveError that says what survived.
_DISK_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG,
                *([errno.EDQUOT] if hasattr(errno, "EDQUOT") else [])}
SAVE_MARGIN = 1 << 20  # bytes beyond the estimate that a save wants free: file headers, the filesystem's blocks


@contextlib.contextmanager
def disk_errors(target: Path) -> Iterator[None]:
    """Turn a save of `target` failing on the disk (full, over quota, read-only, no permission, file too large)
    into a `SaveError` that names `target`, the reason, the previous checkpoint (intact: every save writes a
    temporary and renames it into place) and what to do. Any other error propagates unchanged.

    safetensors reports an I/O error as a SafetensorError with "(os error N)" in its text: that N counts too.
    """
    try:
        yield
    except SaveError:
        raise
    except OSError as e:
        if e.errno not in _DISK_ERRNOS and not isinstance(e, PermissionError):
            raise
        raise SaveError(save_failure(target, f"{e.strerror or e} (errno {e.errno})", e.errno)) from e
    except SafetensorError as e:
        match = re.search(r"\(os error (\d+)\)", str(e))
        code = int(match.group(1)) if match else None
        if code not in _DISK_ERRNOS:
            raise
        raise SaveError(save_failure(target, f"{os.strerror(code)} (errno {code})", code)) from e


def check_free_space(target: Path, needed: int) -> None:
    """Refuse, before anything is written, a save of `target` that needs about `needed` bytes when its disk has
    less free (plus `SAVE_MARGIN` and 1%): a `SaveError` like a failed save's. A disk that cannot say is not
    checked (the save then fails, if it does, as it writes)."""
    try:
        free = shutil.disk_usage(target.parent).free
    except OSError:
        return
    wanted = needed + needed // 100 + SAVE_MARGIN
    if free < wanted:
        reason = f"it needs about {_size(wanted)} and the disk has {_size(free)} free"
        raise SaveError(save_failure(target, reason, errno.ENOSPC))


def save_failure(target: Path, reason: str, code: Optional[int]) -> str:
    """The message of a failed save of `target` (a directory or file in a run's out_dir): what failed and why,
    which checkpoint is intact, and how to go on."""
    root = target.parent
    resume = root / RESUME_FILE
    intact = _previous_checkpoint(root, target)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"Make {root} writable (or copy it to a writable disk and pass that as --out_dir)"
    elif code == errno.EFBIG:
        fix = f"Copy {root} to a filesystem that allows files this large (not FAT32) and pass that as --out_dir"
    else:
        fix = f"Free space on that disk (or copy {root} to a disk with room and pass that as --out_dir)"
    if resume.is_file():
        then = f"then run the same command with --resume true: it continues from {resume.name}."
    else:
        then = "then run the command again."
    kept = (f"the previous checkpoint is intact: {' and '.join(str(p) for p in intact)}" if intact
            else f"there is no earlier checkpoint in {root}")
    return f"Could not save {target}: {reason}. Nothing half-written was left behind, and {kept}. {fix}, {then}"


def _previous_checkpoint(root: Path, target: Path) -> list[Path]:
    """What a failed save of `target` leaves to continue from: the latest step directory (`target` itself when it
    existed before: its previous version stays) and the resume state."""
    latest = target if target.is_dir() else latest_step_dir(root)
    return [p for p in (latest, root / RESUME_FILE) if p is not None and p.exists()]


def latest_step_dir(out_dir: Path) -> Optional[Path]:
    """The newest complete `step-NNNNNN` directory in a run's out_dir, or None."""
    steps = sorted(p for p in out_dir.glob("step-*") if _STEP_DIR.fullmatch(p.name) and p.is_dir())
    return steps[-1] if steps else None


def _tensor_bytes(value: Any) -> int:
    """The bytes of the tensors in `value` (nested dicts, lists and tuples of tensors and plain values)."""
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# --- one run per output directory ------------------------------------------------------------------------------
LOCK_FILE = ".run.lock"
_held_locks: dict[Path, Any] = {}  # open lock files, kept for the life of the process (closing one releases it)


def claim_out_dir(out_dir: Path) -> None:
    """Hold `out_dir` for this process until it exits, or raise a ValueError when another live run holds it.

    Two runs in one out_dir (the same command started twice, or --resume while the first run still lives) would
    write each other's checkpoints, resume state and log, and each would remove the other's saves in progress as
    stale. The claim is an advisory lock (`fcntl.flock`) on `out_dir/.run.lock`, which the operating system
    releases when the process ends however it ends, so a killed run never leaves out_dir claimed. Where file
    locks do not exist (Windows), nothing is checked.
    """
    try:
        import fcntl
    except ImportError:
        return
    out_dir = Path(out_dir).resolve()
    if out_dir in _held_locks:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = open(out_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(
            f"--out_dir {out_dir} is in use by another finetune run ({holder}), which is still running. Wait for it "
            "to finish or stop it (then --resume true continues it), or choose another --out_dir."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    _held_locks[out_dir] = handle


def release_out_dir(out_dir: Path) -> None:
    """Let another run use `out_dir` before this process exits (the end of a run; see `claim_out_dir`)."""
    handle = _held_locks.pop(Path(out_dir).resolve(), None)
    if handle is not None:
        handle.close()


# --- what a killed save leaves behind ------------------------------------------------------------------------
# The temporary names saves use in out_dir (tempfile's random part: 8 of "a-z0-9_"), and nothing else.
_RANDOM = r"[a-z0-9_]{8}"
_STEP_DIR = re.compile(r"step-\d+")
_SAVED_DIR = r"(?:step-\d+|final)"
_STALE_DIRS = re.compile(rf"\.{_SAVED_DIR}\.{_RANDOM}")
_OLD_DIRS = re.compile(rf"\.({_SAVED_DIR})\.old")
_STALE_FILES = re.compile(
    rf"\.(?:{re.escape(RESUME_FILE)}|{re.escape(LOG_FILE)})\.{_RANDOM}\.tmp|\.write_test{_RANDOM}")
_STALE_BASE_FILES = re.compile(rf"\.(?:{'|'.join(map(re.escape, SIDE_FILES))})\.{_RANDOM}\.tmp")


def remove_stale_temporaries(out_dir: Path) -> list[str]:
    """Remove what saves killed mid-way left in `out_dir`; returns what was done, one phrase each.

    Only the names saves give their temporaries, directly in `out_dir` (and in its `.base_files`): a directory
    being assembled (`.step-000100.<random>`, `.final.<random>`), a resume state or metrics file being written
    (`.resume_state.pt.<random>.tmp`, `.metrics.csv.<random>.tmp`), the writability probe (`.write_test<random>`).
    A replaced directory waiting as `.step-000100.old` is deleted, or renamed back when the kill came before its
    successor took its place. Anything else in `out_dir` is left alone. Call it when no save can be running.
    """
    done: list[str] = []
    if not out_dir.is_dir():
        return done
    places = [(out_dir, _STALE_FILES), (out_dir / BASE_FILES_DIR, _STALE_BASE_FILES)]
    for directory, stale_files in places:
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.is_symlink():
                continue
            if path.is_file() and stale_files.fullmatch(path.name):
                path.unlink()
                done.append(f"removed {path.relative_to(out_dir)}")
            elif directory == out_dir and path.is_dir() and _STALE_DIRS.fullmatch(path.name):
                shutil.rmtree(path)
                done.append(f"removed {path.name}")
            elif directory == out_dir and path.is_dir() and (old := _OLD_DIRS.fullmatch(path.name)):
                live = out_dir / old.group(1)
                if live.exists():
                    shutil.rmtree(path)
                    done.append(f"removed {path.name}")
                else:
                    os.replace(path, live)
                    done.append(f"restored {live.name} from {path.name}")
    return done


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
        with disk_errors(path):
            check_free_space(path, _tensor_bytes(state) + (1 << 16))  # + the pickled structure around the tensors
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{RESUME_FILE}.", suffix=".tmp")
            os.close(fd)
            try:
                with open(tmp, "wb") as f:
                    _save_torch(state, f)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    fabric.barrier()


class _KeepWriteError:
    """A file for torch.save that keeps the OSError of a failed write: torch's zip writer turns it into a
    RuntimeError without the reason ("unexpected pos 704 vs 598"), which would hide a full disk."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def _save_torch(state: dict[str, Any], file: BinaryIO) -> None:
    writer = _KeepWriteError(file)
    try:
        torch.save(state, writer)
    except RuntimeError:
        if writer.error is not None:
            raise writer.error from None
        raise


RESUME_REMEDY = (
    "Start the run over without --resume (or in another --out_dir); the step-* directories beside it keep the "
    "weights of the earlier saves."
)
# What `save_resume_state` writes, with the type each entry must have when read back.
_RESUME_ENTRIES = {"trainable": dict, "optimizer": dict, "step": int, "epoch": int, "index": int, "rng": torch.Tensor}


def read_resume_state(path: Path) -> dict[str, Any]:
    """The state `save_resume_state` wrote to `path`, read without unpickling any object (`weights_only=True`).

    A truncated or corrupt file, one that holds Python objects other than tensors and plain values (refused, never
    executed), or one that lacks an entry is a FileError that names the file.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = first_line(e) if "weights_only" not in str(e) else (
            "it holds Python objects other than tensors and plain values, which are never unpickled")
        raise file_problem(path, f"is not a resume state this project wrote ({reason})", RESUME_REMEDY) from None
    except Exception as e:  # truncated zip archives, garbage bytes and empty files fail in many ways
        reason = first_line(e, "the file is empty" if path.stat().st_size == 0 else "")
        raise file_problem(path, f"is truncated or corrupt ({type(e).__name__}: {reason})", RESUME_REMEDY) from None
    if not isinstance(state, dict):
        raise file_problem(path, f"holds a {type(state).__name__}, not a resume state", RESUME_REMEDY)
    wrong = [key for key, kind in _RESUME_ENTRIES.items() if not isinstance(state.get(key), kind)]
    if wrong:
        raise file_problem(path, f"is not a complete resume state: {', '.join(wrong)} missing or of the wrong type",
                           RESUME_REMEDY)
    return state


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
    state = read_resume_state(path)
    changes = None
    if "run" in state:
        saved_run = dict(state["run"])
        legacy = saved_run.get("base_fingerprint")
        # A run started before whole-file base fingerprints recorded a legacy one: if it is this base's by the
        # legacy scheme, it is the same base, recorded the old way (and the next save records the new value).
        if is_legacy_fingerprint(legacy) and hparams.get("checkpoint_dir") is not None:
            if same_base(legacy, hparams["checkpoint_dir"]):
                saved_run["base_fingerprint"] = base_fingerprint(hparams["checkpoint_dir"])
        refused, changes = resume_differences(saved_run, run_description(hparams, model, fabric.world_size))
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
