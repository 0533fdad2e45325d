"""The finetuning benchmark's peer environments see the packages of the Python that runs the harness.

The common install is a virtual environment: `pip install -e .` puts this project and its dependencies
there, not in the base interpreter. A peer environment made with `venv --system-site-packages` from such
a Python sees the base interpreter's packages instead, and its runs fail on `import lit_gpt`. Here a
stand-in for the user's environment (a venv without system packages, given this interpreter's packages
and one package that only it has) runs `benchmarks/finetune.py`'s `ensure_venv` offline, for a peer with no
packages of its own (pip, were it called, would do nothing), in a few seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

HARNESS = REPO_ROOT / "benchmarks" / "finetune.py"
ONLY_IN_USER_ENV = "only_in_the_user_env"


def purelib(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def clean_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def user_env(tmp_path_factory) -> Path:
    """A user's virtual environment (no system packages) with torch, this project and a package of its own.

    Installing is replaced by a .pth file that adds this interpreter's site-packages (torch, lightning-fabric,
    ...) and the repository (lit_gpt), so the base interpreter's packages are not what it sees.
    """
    venv = tmp_path_factory.mktemp("user") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_packages = purelib(venv / "bin" / "python")
    ours = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    lines = [f"import site; site.addsitedir({p!r})" for p in ours] + [str(REPO_ROOT)]
    (site_packages / "_installed_here.pth").write_text("\n".join(lines) + "\n")
    (site_packages / ONLY_IN_USER_ENV).mkdir()
    (site_packages / ONLY_IN_USER_ENV / "__init__.py").write_text("")
    metadata = site_packages / f"{ONLY_IN_USER_ENV}-1.0.dist-info"  # installed as pip would record it
    metadata.mkdir()
    (metadata / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {ONLY_IN_USER_ENV}\nVersion: 1.0\n")
    return venv


@pytest.fixture(scope="module")
def peers(user_env) -> dict[str, Path]:
    """Two peer environments made by the harness's `ensure_venv(peer, [])`, run with the user's Python.

    "fresh" is made from nothing; "stale" starts as the older code left it: a --system-site-packages venv with
    a stamp that knew only the packages and torch. Both calls run in one process (importing the harness takes
    seconds); pip, if called, does nothing.
    """
    import torch

    root = user_env.parent
    fresh, stale = root / "fresh", root / "stale"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(stale)], check=True)
    (stale / "installed.json").write_text(json.dumps({"packages": [], "torch": torch.__version__.split("+")[0]}))
    script = f"""
import importlib.util, subprocess
from pathlib import Path
spec = importlib.util.spec_from_file_location("harness", {str(HARNESS)!r})
harness = importlib.util.module_from_spec(spec)
spec.loader.exec_module(harness)
run = subprocess.run
def offline(cmd, *args, **kwargs):  # pip would need the network; there is nothing to install anyway
    if "pip" in cmd:
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run(cmd, *args, **kwargs)
subprocess.run = offline
for peer in ({str(fresh)!r}, {str(stale)!r}):
    harness.ensure_venv(Path(peer), [])
"""
    done = subprocess.run([str(user_env / "bin" / "python"), "-c", script], cwd=root, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"fresh": fresh, "stale": stale}


def test_a_peer_environment_sees_the_project_and_packages_of_the_users_venv(user_env, peers, tmp_path):
    peer = peers["fresh"]
    probe = ("import importlib.util, json, sys; "
             f"print(json.dumps([[m for m in ('lit_gpt', 'lightning_fabric', 'torch', {ONLY_IN_USER_ENV!r}) "
             "if importlib.util.find_spec(m) is None], sys.path]))")
    done = subprocess.run([str(peer / "bin" / "python"), "-c", probe], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, check=True)
    missing, path = json.loads(done.stdout)
    assert missing == [], f"the peer cannot import {missing}; its sys.path: {path}"
    # The peer's own installs (litgpt's older transformers, ...) come before the user's packages.
    mine, theirs = str(purelib(peer / "bin" / "python")), str(purelib(user_env / "bin" / "python"))
    assert path.index(mine) < path.index(theirs), path


def test_a_peer_environment_made_by_the_older_code_is_made_again(peers, tmp_path):
    peer = peers["stale"]
    assert "include-system-site-packages = false" in (peer / "pyvenv.cfg").read_text()
    assert "site_dirs" in json.loads((peer / "installed.json").read_text())
    done = subprocess.run([str(peer / "bin" / "python"), "-c", f"import {ONLY_IN_USER_ENV}"], cwd=tmp_path,
                          env=clean_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
