"""litgpt 0.5.13's generation timed like ours, for `benchmarks/generate.py` (runs in the litgpt peer environment).

Loads a litgpt checkpoint (the one `benchmarks/finetune.py` converts), then times greedy decoding with
litgpt's own `generate_fn` (batch 1) and `batched_generate_fn` (batch `--batch_size`, the same prompt in
every row: litgpt's batched generation takes no padding), KV cache on, no stop tokens, fp32 on CPU.
Writes per-repeat (time to first token, total seconds, tokens) as JSON. Example:
    benchmarks/.venv-peers/litgpt/bin/python benchmarks/litgpt_generate.py \
        --checkpoint_dir benchmarks/results/finetune_work/litgpt_checkpoint --prompt_ids 1,2,3 --out_file /tmp/g.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None) -> dict:
    from litgpt.config import Config
    from litgpt.generate.base import batched_generate_fn, generate_fn
    from litgpt.model import GPT

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint_dir", type=Path, required=True)
    p.add_argument("--prompt_ids", required=True, help="comma-separated token ids")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out_file", type=Path, required=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = Config.from_file(args.checkpoint_dir / "model_config.yaml")
    model = GPT(config)
    model.load_state_dict(torch.load(args.checkpoint_dir / "lit_model.pth", weights_only=True, mmap=True), assign=True)
    model.eval()
    prompt = torch.tensor([int(t) for t in args.prompt_ids.split(",")])
    total_len = prompt.numel() + args.max_new_tokens

    @torch.inference_mode()
    def run(batch_size: int, max_new_tokens: int) -> tuple[float, float, list]:
        model.max_seq_length = total_len
        model.set_kv_cache(batch_size=batch_size, device=torch.device("cpu"))
        start = time.perf_counter()
        if batch_size == 1:
            steps = generate_fn(model, prompt, prompt.numel() + max_new_tokens, temperature=0.0,
                                include_prompt=False, include_eos=True)
        else:
            steps = batched_generate_fn(model, prompt.expand(batch_size, -1), prompt.numel() + max_new_tokens,
                                        sample_args={"temperature": 0.0}, include_prompt=False, include_eos=True)
        tokens, ttft = [], None
        for step in steps:
            if ttft is None:
                ttft = time.perf_counter() - start
            tokens.append([int(t) for t in step] if batch_size > 1 else int(step))
        total = time.perf_counter() - start
        model.clear_kv_cache()
        rows = [list(row) for row in zip(*tokens)] if batch_size > 1 else tokens  # step-major -> one list per row
        return ttft, total, rows

    result = {"litgpt_config": config.name, "runs": {}}
    for batch_size in (1, args.batch_size):
        run(batch_size, min(8, args.max_new_tokens))  # warm-up (the KV cache holds max_new_tokens)
        repeats = [run(batch_size, args.max_new_tokens) for _ in range(args.repeats)]
        result["runs"][str(batch_size)] = [{"ttft_s": t, "total_s": s, "tokens": tok} for t, s, tok in repeats]
    args.out_file.write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
