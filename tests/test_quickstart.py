"""The README quickstart works when pasted: its code block, run exactly as written in a fresh clone.

The block between `<!-- quickstart -->` and `<!-- /quickstart -->` in README.md is run with bash in a
`git clone` of this repository at HEAD (so only committed files count), inside a virtual environment that
sees the installed packages (--system-site-packages): its `pip install -e .` then points the venv, not
this environment, at the clone. The run must print the accuracy before and after finetuning, improve it,
and leave the loss curve, the results table and the predictions where it says.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

ACCURACY = re.compile(r"accuracy (\d+\.\d)% \((\d+)/(\d+)\)")


def quickstart_block(readme: str) -> str:
    """The shell code inside the ```bash fence between the quickstart markers."""
    match = re.search(r"<!-- quickstart -->(.*?)<!-- /quickstart -->", readme, re.DOTALL)
    assert match, "README.md has no <!-- quickstart --> ... <!-- /quickstart --> block"
    code = re.search(r"```(?:bash|sh|shell)\n(.*?)```", match.group(1), re.DOTALL)
    assert code, "the quickstart block holds no ```bash code fence"
    return code.group(1)


def test_the_readme_has_a_quickstart_block():
    code = quickstart_block((REPO_ROOT / "README.md").read_text())
    assert "scripts/quickstart.sh" in code
    assert (REPO_ROOT / "scripts" / "quickstart.sh").is_file()


@pytest.mark.slow
def test_quickstart_block_runs_in_a_fresh_clone(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True, timeout=120)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "VIRTUAL_ENV": str(venv),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PYTHONPATH", None)
    code = quickstart_block((clone / "README.md").read_text())
    result = subprocess.run(["bash", "-c", code], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]

    # The scripts ran the clone's code, not this checkout's.
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import lit_gpt; print(lit_gpt.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert Path(where.strip()).is_relative_to(clone), where

    accuracies = ACCURACY.findall(result.stdout)
    assert len(accuracies) == 2, result.stdout[-3000:]
    (before, _, total_before), (after, _, total_after) = accuracies
    assert total_before == total_after
    assert float(after) > float(before), f"accuracy before {before}%, after {after}%"

    out = clone / "out" / "quickstart"
    for artefact in ("lora/loss_curve.png", "results.md", "eval_before/predictions.jsonl",
                     "eval_after/predictions.jsonl", "lora/final/lora.safetensors"):
        assert (out / artefact).is_file(), f"{artefact} missing; output:\n{result.stdout[-3000:]}"
        assert str(Path("out/quickstart") / artefact).rsplit("/", 1)[0] in result.stdout  # it says where
    table = (out / "results.md").read_text()
    assert "| base model |" in table and "| LoRA" in table and f"{float(after):.1f}%" in table
    assert (out / "lora" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
