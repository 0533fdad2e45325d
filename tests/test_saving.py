"""Saves that survive the disk: a full, read-only or unwritable disk during a finetune run's save, side files that
take disk space once per run, and what a killed save leaves behind (see `lit_gpt.outputs`).

What is proven here:
- a save that fails on the disk (ENOSPC, EACCES, a safetensors I/O error, a failed resume-state write) ends the
  script with exit code 2 and one "error:" line that names the directory, the reason and the intact previous
  checkpoint, and says what to do; nothing half-written is left, the previous step directory still loads, and
  `--resume true` continues from it once the disk has room; any other OSError propagates unchanged;
- too little free space is refused before anything is written;
- every saved directory holds hard links to one copy of the base's config and tokenizer files (copies where
  the disk cannot link), each loads alone after being copied elsewhere, and a changed base file reaches later
  saves without changing earlier ones;
- the temporaries of a killed save are removed when the next run in that out_dir starts, fresh or resumed, a
  replaced directory caught mid-swap is put back, and nothing else in out_dir is touched.

The end-to-end test of SIGKILL at random moments, inside saves included, is in test_finetune_scripts.py.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import lit_gpt.outputs as outputs
from lit_gpt.files import SaveError
from lit_gpt.loading import load_finetuned
from lit_gpt.outputs import BASE_FILES_DIR, SIDE_FILES, remove_stale_temporaries, save_output_dir
from lit_gpt.prepare import Example, prepare_instruction_data
from lit_gpt.tokenizer import Tokenizer

from conftest import make_checkpoint_dir, run_script_in_process

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HPARAMS = {"method": "lora", "settings": {}}
ZERO = SimpleNamespace(is_global_zero=True, barrier=lambda: None)  # all save_output_dir needs of a Fabric


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_checkpoint_dir(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def data(base, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    examples = [Example(instruction="Add 12 and 30.", input="", output="42"),
                Example(instruction="Name a quick animal.", input="", output="The quick brown fox.")]
    prepare_instruction_data(examples, base, directory, val_split_fraction=0.0, progress=False)
    shutil.copy(directory / "train.safetensors", directory / "val.safetensors")
    return directory


def lora_flags(base: Path, data: Path, out_dir: Path, steps: int = 6, save_interval: int = 2) -> list[str]:
    return ["--checkpoint_dir", str(base), "--data_dir", str(data), "--out_dir", str(out_dir), "--precision",
            "32-true", "--train.max_steps", str(steps), "--train.save_interval", str(save_interval),
            "--train.micro_batch_size", "1", "--train.global_batch_size", "2", "--eval.interval", "1000",
            "--eval.max_new_tokens", "2"]


def fail_on_call(function, n: int, error: BaseException):
    """`function`, except that its `n`th call (1-based) raises `error`."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise error
        return function(*args, **kwargs)

    return wrapper


def always_raise(error: BaseException):
    def raise_it(*args, **kwargs):
        raise error

    return raise_it


def assert_one_error_line(code: int, err: str, *names: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: ") and err.count("error:") == 1, err
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


def temporaries(out_dir: Path) -> list[str]:
    """Names in out_dir that a save uses while it writes (there should be none once it returns or fails)."""
    return sorted(p.name for p in out_dir.iterdir() if p.name.startswith((".step-", ".final", ".resume_state")))


# --- a save that fails on the disk -----------------------------------------------------------------------------
@pytest.mark.parametrize("target, error, says", [
    ("lit_gpt.checkpoint.save_file", OSError(errno.ENOSPC, "No space left on device"), "Free space on that disk"),
    ("lit_gpt.checkpoint.save_file", OSError(errno.EACCES, "Permission denied"), "writable"),
    ("lit_gpt.checkpoint.save_file", SafetensorError("Error while serializing: I/O error: No space left on device "
                                                     "(os error 28)"), "Free space on that disk"),
    ("torch.save", OSError(errno.ENOSPC, "No space left on device"), "Free space on that disk"),
], ids=["enospc", "eacces", "safetensors-io-error", "resume-state-enospc"])
def test_a_save_on_a_full_or_unwritable_disk_is_one_error_and_the_run_resumes_from_what_survived(
    target, error, says, base, data, tmp_path, monkeypatch, capsys
):
    out_dir = tmp_path / "out"
    module, name = target.rsplit(".", 1)
    function = getattr(__import__(module, fromlist=[name]), name)
    # The second save (step 4) fails: step 2 and its resume state were written before.
    with monkeypatch.context() as m:
        m.setattr(target, fail_on_call(function, 2, error))
        code, _, err = run_script_in_process("finetune/lora.py", *lora_flags(base, data, out_dir),
                                             monkeypatch=monkeypatch, capsys=capsys)
    # A failed weights save leaves step 2 as the latest; a failed resume-state save comes after step 4's weights.
    failed, latest = ("resume_state.pt", "step-000004") if target == "torch.save" else ("step-000004", "step-000002")
    reason = os.strerror(error.errno if isinstance(error, OSError) else errno.ENOSPC)
    message = assert_one_error_line(code, err, f"Could not save {out_dir / failed}: {reason}", "intact",
                                    str(out_dir / latest), str(out_dir / "resume_state.pt"), says, "--resume true")
    print(message)
    assert temporaries(out_dir) == [], "a failed save left its temporary behind"
    assert not (out_dir / "final").exists()
    assert (out_dir / "step-000004").exists() == (target == "torch.save")  # a failed step save leaves no dir
    state = torch.load(out_dir / "resume_state.pt", weights_only=True)
    assert state["step"] == 2  # the previous resume state, untouched
    load_finetuned(out_dir / "step-000002", method="lora")

    code, out, err = run_script_in_process("finetune/lora.py", *lora_flags(base, data, out_dir), "--resume", "true",
                                           monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert "Resuming from step 2" in out
    load_finetuned(out_dir / "final", method="lora")


def test_a_log_write_on_a_read_only_disk_is_one_error_naming_the_intact_checkpoint(base, data, tmp_path, monkeypatch,
                                                                                   capsys):
    """metrics.csv is appended every step: a disk that turns read-only mid-run (found by hand, remounting a tmpfs)
    used to end in a raw OSError traceback from the log."""
    out_dir = tmp_path / "out"
    real_open = open

    def open_that_fails_after_step_2(file, mode="r", *args, **kwargs):
        if str(file) == str(out_dir / "metrics.csv") and "a" in mode and (out_dir / "step-000002").exists():
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_that_fails_after_step_2)
    code, _, err = run_script_in_process("finetune/lora.py", *lora_flags(base, data, out_dir),
                                         monkeypatch=monkeypatch, capsys=capsys)
    assert_one_error_line(code, err, f"Could not save {out_dir / 'metrics.csv'}: Read-only file system", "intact",
                          str(out_dir / "step-000002"), "--resume true")


HOLD_OUT_DIR = """
import sys, time
from pathlib import Path
from lit_gpt.outputs import claim_out_dir
claim_out_dir(Path(sys.argv[1]))
print("claimed", flush=True)
time.sleep(120)
"""


def test_a_second_run_in_an_out_dir_a_live_run_holds_is_refused_and_a_dead_runs_claim_is_not(
    base, data, tmp_path, monkeypatch, capsys
):
    """Two runs in one out_dir (the command started twice, or --resume while the first still runs) used to both
    finish "successfully", writing each other's checkpoints and log."""
    out_dir = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_OUT_DIR, str(out_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        code, _, err = run_script_in_process("finetune/lora.py", *lora_flags(base, data, out_dir),
                                             monkeypatch=monkeypatch, capsys=capsys)
        assert_one_error_line(code, err, f"--out_dir {out_dir.resolve()} is in use by another finetune run",
                              f"process {holder.pid}", "choose another --out_dir")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    code, _, err = run_script_in_process("finetune/lora.py", *lora_flags(base, data, out_dir),
                                         monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err  # the killed holder's lock went with it


def test_another_os_error_propagates_unchanged(base, tmp_path, monkeypatch):
    """Only the disk's refusals become a SaveError: an I/O error is a fault to see in full."""
    monkeypatch.setattr("lit_gpt.checkpoint.save_file", always_raise(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError) as raised:
        save_output_dir(ZERO, tmp_path / "step-000001", {"w": torch.ones(3)}, "lora.safetensors", HPARAMS, base)
    assert type(raised.value) is OSError and raised.value.errno == errno.EIO
    assert temporaries(tmp_path) == [] and not (tmp_path / "step-000001").exists()


def test_torch_save_on_a_full_disk_keeps_the_reason(tmp_path):
    """torch's zip writer turns a failed write into "RuntimeError: unexpected pos ...": the resume state is written
    through a file that keeps the OSError, so a full disk is still recognised as one."""

    class FullDisk(io.RawIOBase):
        def __init__(self):
            self.written = 0

        def writable(self):
            return True

        def write(self, data):
            if self.written + len(data) > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return len(data)

    with pytest.raises(OSError) as raised:
        outputs._save_torch({"x": torch.zeros(10_000)}, FullDisk())
    assert raised.value.errno == errno.ENOSPC
    with pytest.raises(SaveError, match="No space left on device"):
        with outputs.disk_errors(tmp_path / "resume_state.pt"):
            outputs._save_torch({"x": torch.zeros(10_000)}, FullDisk())


def test_too_little_free_space_is_refused_before_anything_is_written(base, data, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "out"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=50_000))
    code, _, err = run_script_in_process("finetune/lora.py", *lora_flags(base, data, out_dir),
                                         monkeypatch=monkeypatch, capsys=capsys)
    message = assert_one_error_line(code, err, f"Could not save {out_dir / 'step-000002'}", "needs about",
                                    "50.0 KB free", "no earlier checkpoint", "Free space")
    print(message)
    written = sorted(p.name for p in out_dir.iterdir())
    assert not [n for n in written if n.startswith(("step-", ".step-", BASE_FILES_DIR, "resume_state"))], written

    # The check counts what a save writes: the resume state too, and a disk with room passes.
    weights = {"w": torch.ones(100_000)}  # 400 kB
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1_500_000))
    save_output_dir(ZERO, tmp_path / "roomy" / "step-000001", weights, "lora.safetensors", HPARAMS, base)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1_300_000))
    with pytest.raises(SaveError, match="needs about 1.5 MB and the disk has 1.3 MB free"):
        save_output_dir(ZERO, tmp_path / "roomy" / "step-000002", weights, "lora.safetensors", HPARAMS, base)
    assert sorted(p.name for p in (tmp_path / "roomy").iterdir()) == [BASE_FILES_DIR, "step-000001"]


# --- side files: one copy per run, hard-linked ------------------------------------------------------------------
def test_saved_dirs_hard_link_one_copy_of_the_side_files_and_each_loads_alone(base, data, tmp_path, monkeypatch,
                                                                             capsys):
    out_dir = tmp_path / "out"
    code, _, err = run_script_in_process("finetune/lora.py", *lora_flags(base, data, out_dir),
                                         monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    saved = [out_dir / "step-000002", out_dir / "step-000004", out_dir / "final"]
    side = [name for name in SIDE_FILES if (base / name).is_file()]
    assert "tokenizer.json" in side and "model_config.yaml" in side
    for name in side:
        inodes = {(d / name).stat().st_ino for d in [*saved, out_dir / BASE_FILES_DIR]}
        assert len(inodes) == 1, f"{name}: {len(inodes)} separate copies"
        assert (base / name).stat().st_ino not in inodes  # never a link into the base checkpoint itself
        assert (out_dir / BASE_FILES_DIR / name).read_bytes() == (base / name).read_bytes()

    # Each directory is complete on its own: copied elsewhere, with the run's copy gone, it loads.
    shutil.rmtree(out_dir / BASE_FILES_DIR)
    reference = Tokenizer(base).encode("What is the capital of France?")
    for directory in saved:
        copy = shutil.copytree(directory, tmp_path / "elsewhere" / directory.name)
        model, hparams = load_finetuned(copy, method="lora")
        assert hparams["method"] == "lora"
        assert torch.equal(Tokenizer(copy).encode("What is the capital of France?"), reference)


def test_a_changed_base_file_reaches_later_saves_and_leaves_earlier_ones_alone(tmp_path):
    base = make_checkpoint_dir(tmp_path / "base")
    weights = {"w": torch.ones(3)}
    save_output_dir(ZERO, tmp_path / "out" / "step-000001", weights, "lora.safetensors", HPARAMS, base)
    save_output_dir(ZERO, tmp_path / "out" / "step-000002", weights, "lora.safetensors", HPARAMS, base)
    before = (base / "tokenizer_config.json").read_text()
    (base / "tokenizer_config.json").write_text(before.replace("}", ', "chat_template": "{{ x }}"}'))
    save_output_dir(ZERO, tmp_path / "out" / "step-000003", weights, "lora.safetensors", HPARAMS, base)

    first, second, third = (tmp_path / "out" / f"step-00000{i}" / "tokenizer_config.json" for i in (1, 2, 3))
    assert first.read_text() == second.read_text() == before
    assert third.read_text() == (base / "tokenizer_config.json").read_text() != before
    assert first.stat().st_ino == second.stat().st_ino != third.stat().st_ino
    assert third.stat().st_ino == (tmp_path / "out" / BASE_FILES_DIR / "tokenizer_config.json").stat().st_ino
    tokenizer = tmp_path / "out" / "step-000003" / "tokenizer.json"
    assert tokenizer.stat().st_ino == (tmp_path / "out" / "step-000001" / "tokenizer.json").stat().st_ino


def test_side_files_are_copied_where_the_disk_cannot_hard_link(base, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "link", always_raise(OSError(errno.EXDEV, "Invalid cross-device link")))
    out = tmp_path / "step-000001"
    save_output_dir(ZERO, out, {"w": torch.ones(3)}, "lora.safetensors", HPARAMS, base)
    for name in ("tokenizer.json", "model_config.yaml"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert (out / "tokenizer.json").stat().st_ino != (tmp_path / BASE_FILES_DIR / "tokenizer.json").stat().st_ino


# --- what a killed save leaves behind ---------------------------------------------------------------------------
def leave_stale_temporaries(out_dir: Path) -> tuple[list[str], list[str]]:
    """The names a save killed at various points leaves in out_dir (as tempfile and the save code name them),
    and files a user keeps there that merely look similar: (stale, the user's)."""
    stale_dir = out_dir / ".step-000004.k3j2h_g0"  # mkdtemp(prefix=".step-000004."), killed while writing
    stale_dir.mkdir()
    (stale_dir / ".lora.safetensors.ab12cd34.tmp").write_bytes(b"half a file")
    (out_dir / ".final.zz9yx8w7").mkdir()
    shutil.copytree(out_dir / "step-000002", out_dir / ".step-000002.old")  # killed after the swap, before rmtree
    (out_dir / ".resume_state.pt.x1y2z3w4.tmp").write_bytes(b"half a file")
    (out_dir / ".metrics.csv.q1w2e3r4.tmp").write_text("step,name,value\n")
    (out_dir / ".write_testabcdefgh").write_text("")
    (out_dir / BASE_FILES_DIR / ".tokenizer.json.qwertyui.tmp").write_text("{")
    stale = [".step-000004.k3j2h_g0", ".final.zz9yx8w7", ".step-000002.old", ".resume_state.pt.x1y2z3w4.tmp",
             ".metrics.csv.q1w2e3r4.tmp", ".write_testabcdefgh", f"{BASE_FILES_DIR}/.tokenizer.json.qwertyui.tmp"]
    users = ["notes.txt", ".hidden_user_file", ".step-000002.backup", ".resume_state.pt.bak", "step-000002.old",
             ".final.mine", ".resume_state.pt.abcdefgh", f"{BASE_FILES_DIR}/notes.txt"]
    for name in users:
        (out_dir / name).write_text("the user's")
    return stale, users


@pytest.mark.parametrize("resume", [False, True], ids=["new-run", "resume"])
def test_a_killed_saves_temporaries_are_removed_at_the_next_start_and_nothing_else(
    resume, base, data, tmp_path, monkeypatch, capsys
):
    out_dir = tmp_path / "out"
    code, _, err = run_script_in_process("finetune/lora.py", *lora_flags(base, data, out_dir, steps=4),
                                         monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    stale, users = leave_stale_temporaries(out_dir)
    flags = lora_flags(base, data, out_dir, steps=6) + (["--resume", "true"] if resume else [])
    code, out, err = run_script_in_process("finetune/lora.py", *flags, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("Cleaned up after an interrupted save"))
    print(line)
    for name in stale:
        assert not (out_dir / name).exists(), f"{name} is still there"
        assert name in line
    for name in users:
        assert (out_dir / name).read_text() == "the user's", f"{name} was touched"
    assert (out_dir / "step-000002" / "lora.safetensors").is_file() and (out_dir / "final").is_dir()


def test_a_directory_caught_mid_replace_is_put_back(base, tmp_path):
    """Killed between moving step-000004 aside and renaming its successor into place: the old one is complete,
    so it is restored rather than deleted."""
    save_output_dir(ZERO, tmp_path / "step-000004", {"w": torch.ones(3)}, "lora.safetensors", HPARAMS, base)
    os.replace(tmp_path / "step-000004", tmp_path / ".step-000004.old")
    (tmp_path / ".step-000004.abcdefgh").mkdir()
    done = remove_stale_temporaries(tmp_path)
    assert done == ["removed .step-000004.abcdefgh", "restored step-000004 from .step-000004.old"]
    assert torch.equal(load_file(tmp_path / "step-000004" / "lora.safetensors")["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [BASE_FILES_DIR, "step-000004"]
    assert remove_stale_temporaries(tmp_path) == []
