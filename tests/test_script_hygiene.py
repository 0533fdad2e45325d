"""Rules that keep the standalone scripts from drifting apart (see ../shared/DESIGN.md, practices 9-11)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lit_gpt.args import EvalArgs, TrainArgs

ROOT = Path(__file__).resolve().parents[1]
FINETUNE_SCRIPTS = sorted((ROOT / "finetune").glob("*.py"))
ALL_SCRIPTS = sorted(
    p for folder in ("finetune", "generate", "scripts", "eval", "benchmarks") for p in (ROOT / folder).glob("*.py")
)
# What a script may not import: another script, or a script folder (scripts are leaves, DESIGN 9).
SCRIPT_MODULES = {"finetune", "generate", "scripts", "eval", "benchmarks", "tests", "conftest"} | {
    p.stem for p in ALL_SCRIPTS
}
# The peers only benchmarks may import (they measure them); every other package a user script imports must be
# a declared dependency (test_every_package_the_code_imports_is_a_declared_dependency).
BENCHMARK_PEERS = {"transformers", "peft", "litgpt"}


def _function_source(path: Path, name: str) -> str:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.unparse(node)
    raise AssertionError(f"{path} has no top-level function {name!r}")


def test_finetune_scripts_exist():
    names = {p.name for p in FINETUNE_SCRIPTS}
    assert {"lora.py", "adapter.py", "adapter_v2.py", "full.py"} <= names


def test_no_finetune_script_has_a_training_loop_of_its_own():
    """The loop lives once, in lit_gpt.training.fit: every script calls it, none steps an optimizer itself."""
    for path in FINETUNE_SCRIPTS:
        tree = ast.parse(path.read_text())
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        calls = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
        assert "fit" not in functions, f"{path.name} defines its own fit()"
        assert "training.fit" in calls, f"{path.name} does not call training.fit"
        assert not calls & {"optimizer.step", "fabric.backward", "loss.backward"}, f"{path.name} has a loop of its own"


def _lines(path: Path, name: str) -> list[str]:
    return _function_source(path, name).splitlines()


def test_main_differs_only_in_the_method_lines():
    """main() tells the same story in every finetune script, in the same order: the PEFT scripts' are identical,
    and full finetuning's is theirs without the two lines that apply the method and mark what trains."""
    reference = _lines(ROOT / "finetune" / "lora.py", "main")
    method_lines = ["    method.apply(model, settings)", "    method.mark_trainable(model)"]
    assert all(line in reference for line in method_lines)
    for path in FINETUNE_SCRIPTS:
        expected = [line for line in reference if line not in method_lines] if path.name == "full.py" else reference
        assert _lines(path, "main") == expected, f"main() in {path.name} drifted from lora.py's"


def test_peft_scripts_save_alike_and_set_up_alike():
    """save() is one line per PEFT script (its method module names the weights file), and setup() ends with the
    same two calls: start the run, launch main."""
    peft_scripts = [p for p in FINETUNE_SCRIPTS if p.name != "full.py"]
    reference = ROOT / "finetune" / "lora.py"
    for path in peft_scripts:
        body = [line for line in _lines(path, "save") if '"""' not in line]
        assert body == [line for line in _lines(reference, "save") if '"""' not in line], path.name
    for path in FINETUNE_SCRIPTS:
        tail = _lines(path, "setup")[-2:]
        expected = _lines(reference, "setup")[-2:]
        if path.name == "full.py":  # no method module and no --quantize: the method is FULL, quantize None
            expected = [line.replace("method.NAME", "FULL").replace(" quantize,", " None,") for line in expected]
        assert tail == expected, f"setup() of {path.name} ends differently from lora.py's: {tail}"


@pytest.mark.parametrize("path", ALL_SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_import_only_lit_gpt_and_libraries(path):
    """Scripts are leaves: no script imports another script, and no sys.path hacks."""
    source = path.read_text()
    assert "sys.path" not in source, f"{path.name} manipulates sys.path"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module or ""]
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path.name} uses a relative import")
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            assert top not in SCRIPT_MODULES, f"{path.name} imports {module}, a script: move what it needs to lit_gpt/"
            assert top not in BENCHMARK_PEERS or path.parent.name == "benchmarks", f"{path.name} imports {module}"


@pytest.mark.parametrize("path", [p for p in ALL_SCRIPTS if p.parent.name != "benchmarks"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_user_scripts_run_through_run_cli(path):
    """Every user-facing script's command line goes through lit_gpt.cli.run_cli, so a wrong flag, a missing file
    or a missing package ends in one `error: ...` line, not a traceback."""
    tree = ast.parse(path.read_text())
    main_blocks = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    assert main_blocks, f"{path.name} has no `if __name__ == \"__main__\":` block"
    calls = {ast.unparse(node.func) for node in ast.walk(main_blocks[0]) if isinstance(node, ast.Call)}
    assert "run_cli" in calls, f"{path.name}'s __main__ block does not call run_cli (it calls {sorted(calls)})"


@pytest.mark.parametrize("path", ALL_SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_have_a_docstring_with_an_example(path):
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "python " in doc, f"{path.name}: the module docstring needs a runnable example command"


def _source_without_validate(path: Path) -> str:
    """args.py minus its validate() methods: checking a flag is not the same as honouring it."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            node.body = [n for n in node.body if not (isinstance(n, ast.FunctionDef) and n.name == "validate")]
    return ast.unparse(tree)


def test_every_train_and_eval_field_is_honoured_somewhere():
    """Each TrainArgs/EvalArgs field is read by the training code, not only validated (no silently ignored flag)."""
    lit_gpt_files = [p for p in (ROOT / "lit_gpt").glob("*.py") if p.name != "args.py"]
    sources = "\n".join(p.read_text() for p in [*FINETUNE_SCRIPTS, *lit_gpt_files])
    sources += _source_without_validate(ROOT / "lit_gpt" / "args.py")
    for cls in (TrainArgs, EvalArgs):
        for field in cls.__dataclass_fields__:
            assert f".{field}" in sources, f"{cls.__name__}.{field} is never read outside validate()"


def test_peft_generate_scripts_differ_only_in_their_method():
    """generate/lora.py, adapter.py and adapter_v2.py are one thin entry point with a different METHOD (and
    docstring) over lit_gpt.generation.answer_instruction, which generate/finetuned.py runs for any method."""

    def body(name: str) -> list[str]:
        tree = ast.parse((ROOT / "generate" / name).read_text())
        tree.body = [
            node for node in tree.body[1:]  # drop the module docstring
            if not (isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "METHOD" for t in node.targets))
        ]
        return ast.unparse(tree).splitlines()

    reference = body("lora.py")
    for name in ("adapter.py", "adapter_v2.py", "bottleneck.py"):
        assert body(name) == reference, f"generate/{name} drifted from generate/lora.py"


def test_importing_the_library_leaves_out_heavy_packages_it_does_not_need():
    """Every script pays at start-up for what lit_gpt imports. Fabric comes from `lightning-fabric`: the
    `lightning` bundle would also load its Trainer and torchmetrics, and through them transformers, scipy
    and matplotlib (~4.5 s on a 2-core CPU). transformers is only for tests and benchmarks, matplotlib only for
    the loss-curve plot, imported when it is drawn."""
    code = (
        "import importlib, pkgutil, sys, lit_gpt\n"
        "for module in pkgutil.iter_modules(lit_gpt.__path__): importlib.import_module('lit_gpt.' + module.name)\n"
        "print(' '.join(sorted(set(name.split('.')[0] for name in sys.modules))))"
    )
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split())
    assert "lit_gpt" in loaded and "lightning_fabric" in loaded
    assert not loaded & {"lightning", "torchmetrics", "transformers", "scipy", "matplotlib"}


def test_every_package_the_code_imports_is_a_declared_dependency():
    """A fresh `pip install -e .` must bring everything the library and the user-facing scripts import, even
    lazily; packages for one option belong to an extra (plot: matplotlib; quantize: bitsandbytes, imported by
    name in lit_gpt.quantize). Our test environment has many packages installed, so only this check notices
    a package that a user's fresh environment would lack (gguf, for the embedded model, once did)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = {_distribution_name(req) for req in project["dependencies"] + extras["plot"] + extras["quantize"]}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for folder in ("lit_gpt", "finetune", "generate", "eval", "scripts"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for top in {name.split(".")[0] for name in names} - set(sys.stdlib_module_names) - {"lit_gpt"}:
                    owners = {_distribution_name(d) for d in distributions.get(top, [top])}
                    if not owners & declared:
                        missing.setdefault(top, path.relative_to(ROOT).as_posix())
    assert not missing, f"imported but not in pyproject.toml's dependencies (module: first file): {missing}"


def _distribution_name(requirement: str) -> str:
    """'jsonargparse[signatures]>=4.27' -> 'jsonargparse'; 'PyYAML' -> 'pyyaml' (PEP 503 normalised)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()
