"""Generation speed: ours vs Hugging Face transformers `generate`, same weights, same prompt, one run.

Greedy decoding of `--max_new_tokens` tokens (EOS ignored, so both produce exactly that many) at batch 1,
KV cache on for both. Reports time to first token (prefill + first sample), decode tokens/s and the
ratio ours / transformers, as medians over `--repeats` alternating runs, and writes a JSON file.

Example (CPU, the embedded model):
    python scripts/convert_gguf_checkpoint.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct
    python benchmarks/generate.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lit_gpt.cli import run_cli
from lit_gpt.convert import convert_lit_checkpoint
from lit_gpt.generation import generate, load_model
from lit_gpt.tokenizer import Tokenizer

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"


def _time_ours(model, prompt_ids: torch.Tensor, max_new_tokens: int) -> tuple[float, float, list[int]]:
    start = time.perf_counter()
    tokens = generate(model, prompt_ids, max_new_tokens, temperature=0.0)
    first = next(tokens)
    ttft = time.perf_counter() - start
    rest = list(tokens)
    total = time.perf_counter() - start
    return ttft, total, [first, *rest]


@torch.inference_mode()
def _time_hf(model, prompt_ids: torch.Tensor, max_new_tokens: int) -> tuple[float, float, list[int]]:
    ids = prompt_ids[None]
    mask = torch.ones_like(ids)
    common = dict(do_sample=False, use_cache=True, attention_mask=mask, pad_token_id=0)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **common)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **common)
    total = time.perf_counter() - start
    return ttft, total, out[0, ids.size(1) :].tolist()


def main(
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    max_new_tokens: int = 128,
    repeats: int = 5,
    threads: int = 0,
    out_file: Path = Path("benchmarks/results/generate.json"),
) -> dict:
    """Benchmark greedy generation of ours against transformers on CPU in fp32.

    Args:
        checkpoint_dir: a converted checkpoint (ours); it is converted to HF format in a temp dir for transformers.
        max_new_tokens: tokens generated per run.
        repeats: timed runs per implementation (after one warm-up each), alternating.
        threads: torch threads (0: torch's default, one per core).
        out_file: where to write the JSON results.
    """
    import transformers

    if threads:
        torch.set_num_threads(threads)
    tokenizer = Tokenizer(checkpoint_dir)
    prompt_ids = tokenizer.encode(PROMPT)
    ours, config = load_model(checkpoint_dir, device="cpu", dtype=torch.float32)
    # Ours never stops early here: no stop ids. transformers: min_new_tokens forces the same length.
    with tempfile.TemporaryDirectory() as hf_dir:
        convert_lit_checkpoint(checkpoint_dir, Path(hf_dir))
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    _time_ours(ours, prompt_ids, 8)  # warm-up
    _time_hf(hf, prompt_ids, 8)
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "transformers": []}
    tokens = {}
    for _ in range(repeats):
        ttft, total, tokens["ours"] = _time_ours(ours, prompt_ids, max_new_tokens)
        runs["ours"].append((ttft, total))
        ttft, total, tokens["transformers"] = _time_hf(hf, prompt_ids, max_new_tokens)
        runs["transformers"].append((ttft, total))

    result = {
        "model": config.name,
        "device": "cpu",
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "prompt_tokens": len(prompt_ids),
        "new_tokens": max_new_tokens,
        "repeats": repeats,
        "same_tokens": tokens["ours"] == tokens["transformers"],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for name, values in runs.items():
        result[name] = {
            "ttft_s": statistics.median(v[0] for v in values),
            "tokens_per_s": statistics.median(max_new_tokens / v[1] for v in values),
            "tokens_per_s_min": min(max_new_tokens / v[1] for v in values),
            "tokens_per_s_max": max(max_new_tokens / v[1] for v in values),
        }
    result["ratio_tokens_per_s"] = result["ours"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    result["ratio_ttft"] = result["ours"]["ttft_s"] / result["transformers"]["ttft_s"]

    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    print(f"{config.name}, CPU fp32, {torch.get_num_threads()} threads, batch 1, "
          f"{len(prompt_ids)} prompt tokens, {max_new_tokens} new tokens, median of {repeats}")
    print(f"{'':14}{'tokens/s':>10}{'TTFT (s)':>10}")
    for name in ("ours", "transformers"):
        print(f"{name:14}{result[name]['tokens_per_s']:>10.1f}{result[name]['ttft_s']:>10.3f}")
    print(f"ratio ours/transformers: tokens/s {result['ratio_tokens_per_s']:.2f}x, TTFT {result['ratio_ttft']:.2f}x; "
          f"same greedy tokens: {result['same_tokens']}")
    print(f"wrote {out_file}")
    return result


if __name__ == "__main__":
    run_cli(main)
