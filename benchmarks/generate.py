"""Generation speed: ours vs Hugging Face transformers `generate` vs litgpt 0.5.13, same weights, one run.

Greedy decoding of `--max_new_tokens` tokens (EOS ignored, so every tool produces exactly that many), KV
cache on, fp32 on CPU, at batch 1 and at batch `--batch_size` (the same prompt in every row: litgpt's batched
generation takes no padding). Reports time to first token (prefill + first token; at batch > 1 a separate
one-token run), decode tokens/s (all rows together) and the ratios ours / peer, as medians over `--repeats`
alternating runs, and writes a JSON file. litgpt runs in its own environment
(`benchmarks/.venv-peers/litgpt`, the one `benchmarks/finetune.py` creates) on a litgpt-format copy of the
weights, through `benchmarks/litgpt_generate.py`; `--litgpt false` leaves it out.

Example (CPU, the embedded model; transformers runs in this process, so this Python needs it):
    python scripts/convert_gguf_checkpoint.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct
    pip install transformers==5.23.0
    python benchmarks/generate.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from lit_gpt.cli import run_cli
from lit_gpt.generation import generate, generate_batch
from lit_gpt.loading import load_base_model
from lit_gpt.tokenizer import Tokenizer

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"
ROOT = Path(__file__).resolve().parents[1]


def _finetune_harness():
    """benchmarks/finetune.py as a module: its peer-environment and checkpoint-conversion helpers."""
    spec = importlib.util.spec_from_file_location("finetune_harness", ROOT / "benchmarks" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _time_ours(model, prompt_ids: torch.Tensor, max_new_tokens: int, batch_size: int, compile: bool = False):
    if batch_size == 1:
        start = time.perf_counter()
        tokens = generate(model, prompt_ids, max_new_tokens, temperature=0.0, compile=compile)
        first = next(tokens)
        ttft = time.perf_counter() - start
        rest = list(tokens)
        return ttft, time.perf_counter() - start, [first, *rest]
    prompts = [prompt_ids] * batch_size
    start = time.perf_counter()
    generate_batch(model, prompts, 1)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    rows = generate_batch(model, prompts, max_new_tokens)
    return ttft, time.perf_counter() - start, rows


def _ours_for(peer: str) -> str:
    """Which of our rows a peer's row is compared with: compiled with compiled, eager with eager."""
    return "ours compiled" if peer.endswith("compiled") else "ours"


@torch.inference_mode()
def _time_hf(model, prompt_ids: torch.Tensor, max_new_tokens: int, batch_size: int, compile: bool = False):
    ids = prompt_ids[None].expand(batch_size, -1)
    common = dict(do_sample=False, use_cache=True, attention_mask=torch.ones_like(ids), pad_token_id=0)
    if compile:  # transformers' own compiled generation: a static cache and its CompileConfig, allowed on CPU
        from transformers import CompileConfig

        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # by default transformers compiles only on accelerators
        common.update(cache_implementation="static", compile_config=compile_config)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **common)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **common)
    total = time.perf_counter() - start
    rows = out[:, ids.size(1) :].tolist()
    return ttft, total, rows[0] if batch_size == 1 else rows


def _litgpt_runs(checkpoint_dir: Path, prompt_ids: torch.Tensor, max_new_tokens: int, batch_size: int,
                 repeats: int) -> dict:
    """Time litgpt in its own environment; returns {batch size: [(ttft, total, tokens), ...]}."""
    harness = _finetune_harness()
    work = ROOT / "benchmarks" / "results" / "finetune_work"
    args = argparse.Namespace(checkpoint_dir=checkpoint_dir.resolve(), litgpt_model_name=None)
    litgpt_bin = harness.ensure_venv(ROOT / "benchmarks" / ".venv-peers" / "litgpt", harness.PEER_PACKAGES["litgpt"])
    hf_dir = harness.hf_checkpoint(args, work)
    litgpt_dir = harness.litgpt_checkpoint(args, work, hf_dir, str(litgpt_bin / "python"))
    out_file = work / "litgpt_generate.json"
    subprocess.run(
        [str(litgpt_bin / "python"), "benchmarks/litgpt_generate.py", "--checkpoint_dir", str(litgpt_dir),
         "--prompt_ids", ",".join(str(int(t)) for t in prompt_ids), "--max_new_tokens", str(max_new_tokens),
         "--batch_size", str(batch_size), "--repeats", str(repeats), "--threads", str(torch.get_num_threads()),
         "--out_file", str(out_file)],
        cwd=ROOT, check=True,
    )
    runs = json.loads(out_file.read_text())["runs"]
    return {int(b): [(r["ttft_s"], r["total_s"], r["tokens"]) for r in rs] for b, rs in runs.items()}


def main(
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    max_new_tokens: int = 128,
    batch_size: int = 8,
    repeats: int = 3,
    threads: int = 0,
    litgpt: bool = True,
    compile: bool = False,
    out_file: Path = Path("benchmarks/results/generate.json"),
) -> dict:
    """Benchmark greedy generation of ours against transformers and litgpt on CPU in fp32.

    Args:
        checkpoint_dir: a converted checkpoint (ours); it is converted to HF and litgpt formats for the peers.
        max_new_tokens: tokens generated per row and run.
        batch_size: the second batch size measured (besides 1).
        repeats: timed runs per implementation and batch size (after one warm-up each), alternating.
        threads: torch threads (0: torch's default, one per core).
        litgpt: also time litgpt 0.5.13 (needs its peer environment; created on first use).
        compile: also time compiled decoding at batch 1: ours with `generate(compile=True)` against transformers
            with a static cache and its compiled forward. The compile time is reported apart (first call).
        out_file: where to write the JSON results.
    """
    try:
        import transformers
    except ModuleNotFoundError as e:
        raise SystemExit(f"benchmarks/generate.py times transformers in this process, and this Python has none: "
                         f"pip install transformers=={_finetune_harness().TRANSFORMERS_VERSION} (the version the "
                         f"figures in benchmarks/README.md were measured with)") from e

    if threads:
        torch.set_num_threads(threads)
    tokenizer = Tokenizer(checkpoint_dir)
    prompt_ids = tokenizer.encode(PROMPT)
    ours, config = load_base_model(checkpoint_dir, device="cpu", dtype=torch.float32)
    hf_dir = _finetune_harness().hf_checkpoint(
        argparse.Namespace(checkpoint_dir=Path(checkpoint_dir).resolve()), ROOT / "benchmarks" / "results" / "finetune_work")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    batch_sizes = (1, batch_size)
    runs: dict[int, dict[str, list]] = {b: {"ours": [], "transformers": []} for b in batch_sizes}
    for b in batch_sizes:
        _time_ours(ours, prompt_ids, 8, b)  # warm-up
        _time_hf(hf, prompt_ids, 8, b)
        for _ in range(repeats):
            runs[b]["ours"].append(_time_ours(ours, prompt_ids, max_new_tokens, b))
            runs[b]["transformers"].append(_time_hf(hf, prompt_ids, max_new_tokens, b))
    compile_s = {}
    if compile:  # batch 1 only: our batched generation has no compiled path
        runs[1].update({"ours compiled": [], "transformers compiled": []})
        start = time.perf_counter()
        _time_ours(ours, prompt_ids, max_new_tokens, 1, compile=True)  # compiles (cache length as timed below)
        compile_s["ours compiled"] = time.perf_counter() - start
        start = time.perf_counter()
        _time_hf(hf, prompt_ids, max_new_tokens, 1, compile=True)
        compile_s["transformers compiled"] = time.perf_counter() - start
        for _ in range(repeats):
            runs[1]["ours compiled"].append(_time_ours(ours, prompt_ids, max_new_tokens, 1, compile=True))
            runs[1]["transformers compiled"].append(_time_hf(hf, prompt_ids, max_new_tokens, 1, compile=True))
    if litgpt:
        del hf  # free its memory before the litgpt process loads its own copy
        for b, values in _litgpt_runs(Path(checkpoint_dir), prompt_ids, max_new_tokens, batch_size, repeats).items():
            runs[b]["litgpt"] = values

    result = {
        "model": config.name, "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(),
        "prompt_tokens": len(prompt_ids), "new_tokens": max_new_tokens, "repeats": repeats,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "first_compiled_call_s": compile_s,
    }
    for b in batch_sizes:
        entry = {}
        for name, values in runs[b].items():
            rates = [b * max_new_tokens / v[1] for v in values]
            entry[name] = {"ttft_s": statistics.median(v[0] for v in values), "tokens_per_s": statistics.median(rates),
                           "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates)}
        reference = runs[b]["ours"][-1][2]
        entry["same_tokens"] = {name: values[-1][2] == reference for name, values in runs[b].items() if name != "ours"}
        entry["ratios"] = {  # a compiled peer is compared with ours compiled, every other peer with ours
            peer: {"tokens_per_s": entry[_ours_for(peer)]["tokens_per_s"] / entry[peer]["tokens_per_s"],
                   "ttft": entry[_ours_for(peer)]["ttft_s"] / entry[peer]["ttft_s"]}
            for peer in runs[b] if not peer.startswith("ours")}
        result[f"batch_{b}"] = entry

    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    print(f"{config.name}, CPU fp32, {torch.get_num_threads()} threads, {len(prompt_ids)} prompt tokens, "
          f"{max_new_tokens} new tokens per row, median of {repeats}")
    print(f"{'batch':>5}  {'tool':22}{'tokens/s':>10}{'TTFT (s)':>10}{'ours/tool tok/s':>17}{'same tokens':>13}")
    for b in batch_sizes:
        entry = result[f"batch_{b}"]
        for name in runs[b]:
            ratio = f"{entry['ratios'][name]['tokens_per_s']:.2f}x" if name in entry["ratios"] else ""
            same = str(entry["same_tokens"][name]) if name != "ours" else ""
            print(f"{b:>5}  {name:22}{entry[name]['tokens_per_s']:>10.1f}{entry[name]['ttft_s']:>10.3f}"
                  f"{ratio:>17}{same:>13}")
    if compile_s:
        print(f"first compiled call (compiling + {max_new_tokens} tokens): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()))
    print(f"wrote {out_file}")
    return result


if __name__ == "__main__":
    run_cli(main)
