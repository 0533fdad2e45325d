"""One LoRA training step of the model alone, ours vs litgpt 0.5.13: forward, loss, backward and AdamW on one
fixed batch, with no data loading, logging or Fabric. It separates the model's speed from the scripts'.

Both models are built in-process with random weights in bf16 (Llama-2-7b-hf's shape with a 49,152-token
vocabulary by default), LoRA r=8 on query and value, on one (B, T) batch of random tokens whose first 45%
positions carry no loss. Ours computes its loss at the supervised positions only (`GPT.forward(targets=)`);
litgpt computes its chunked LM head and cross entropy over every position, as `litgpt finetune_lora` does.
Prints the median step time and peak CUDA memory of each, and a torch.profiler table of ours.

    python benchmarks/model_step.py                       # on a GPU, in a Python where litgpt imports
    python benchmarks/model_step.py --device cpu --n_layer 2 --n_embd 256 --n_head 4 --intermediate_size 512

Measured on an H100 (n_layer 32, B 4, T 400), by the first form of this script, whose batch also had no loss
after position 300 of its first row: ours 123.5 ms, litgpt 161.1 ms; peak 21.6 against 23.4 GB.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(tool: str, overrides: dict, device: str, T: int):
    """(model, trainable parameters) of `tool` with LoRA on query and value, random bf16 weights."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            if tool == "ours":
                from lit_gpt import lora
                from lit_gpt.config import Config
                from lit_gpt.model import GPT

                model = GPT(Config.from_name("Llama-2-7b-hf", **overrides))
                lora.apply(model, lora.LoRASettings(r=8, alpha=16, dropout=0.05))
                lora.mark_trainable(model)
            else:
                from litgpt.lora import GPT, Config, mark_only_lora_as_trainable

                model = GPT(Config.from_name("Llama-2-7b-hf", **overrides, lora_r=8, lora_alpha=16,
                                             lora_dropout=0.05, lora_query=True, lora_value=True))
                mark_only_lora_as_trainable(model)
                model.max_seq_length = T
    finally:
        torch.set_default_dtype(torch.float32)
    return model.train(), [p for p in model.parameters() if p.requires_grad]


def step_function(tool: str, model, optimizer, idx: torch.Tensor, targets: torch.Tensor):
    if tool == "ours":
        def step():
            model(idx, targets=targets).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        from litgpt.utils import chunked_cross_entropy

        def step():
            logits = model(idx, lm_head_chunk_size=128)  # what litgpt's finetune_lora does
            logits[-1] = logits[-1][..., :-1, :]
            chunked_cross_entropy(logits, targets[..., 1:]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tools", default="ours,litgpt")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=400)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--repeats", type=int, default=8)
    for key in ("n_layer", "n_embd", "n_head", "n_query_groups", "intermediate_size"):
        p.add_argument(f"--{key}", type=int, default=None, help="override of Llama-2-7b-hf's value")
    args = p.parse_args()
    overrides = {"vocab_size": args.vocab, "padded_vocab_size": args.vocab}
    for key in ("n_layer", "n_embd", "n_head", "n_query_groups", "intermediate_size"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if "n_head" in overrides and "n_query_groups" not in overrides:
        overrides["n_query_groups"] = overrides["n_head"]  # Llama-2-7B has no grouped queries
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    torch.manual_seed(0)
    B, T = args.batch, args.length
    idx = torch.randint(0, args.vocab, (B, T), device=args.device)
    targets = torch.randint(0, args.vocab, (B, T), device=args.device)
    targets[:, : int(0.45 * T)] = -100  # the prompt: no loss

    for tool in [t.strip() for t in args.tools.split(",") if t.strip()]:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        model, trainable = build(tool, overrides, args.device, T)
        step = step_function(tool, model, torch.optim.AdamW(trainable, lr=1e-4), idx, targets)
        for _ in range(3):
            step()
        sync()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        peak = f", peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB" if cuda else ""
        print(f"{tool}: {statistics.median(times) * 1e3:.1f} ms a step (median of {args.repeats}){peak}", flush=True)
        if tool == "ours":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                for _ in range(2):
                    step()
                sync()
            print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=20,
                                            max_name_column_width=50))
        del model, trainable, step
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
