"""A plain transformers + peft LoRA training loop: the "hf" peer of `benchmarks/finetune.py`.

It trains on the data `finetune/lora.py` sees, the way a plain loop (or the HF Trainer, whose
`group_by_length` is off by default) would: the prepared train.safetensors read with
`lit_gpt.data.load_prepared`, in shuffled order (`lit_gpt.data.BatchStream` with length grouping off,
same seed, micro and global batch size), right-padded to each batch's longest sample by
`lit_gpt.data.collate`, with -100 wherever no loss is wanted. `--group_by_length true` gives it our
length-grouped order instead. With the same order, seed and `--lora_dropout 0`, its batches and losses
are those of `finetune/lora.py --train.group_by_length false --lora_dropout 0` (the harness checks this).
The loss is the token mean of the cross-entropy over those targets (the
batch is already shifted, so the logits are not shifted again), and the learning rate follows
`lit_gpt.training.lr_at`, as in ours. Gradient clipping and AdamW settings match ours' defaults.

By default no attention mask is passed: the padding is on the right of a causal model, so it changes no
real position, and this keeps transformers on its fastest (is_causal) attention path. `--attention_mask true`
passes the usual padding mask instead.

It runs in the peers' virtual environment that `benchmarks/finetune.py` creates (peft is no project
dependency) and writes per-step times, token counts and losses as JSON. Example:
    benchmarks/.venv-peers/hf/bin/python benchmarks/hf_peft_lora.py --hf_dir /tmp/hf-smollm2 \
        --data_dir benchmarks/results/finetune_work/data --steps 23 --out_file /tmp/hf_steps.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lit_gpt.args import TrainArgs
from lit_gpt.data import TRAIN_FILE, BatchStream, load_prepared
from lit_gpt.training import lr_at, set_lr


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def padding_mask(input_ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """(B, T) 1/0 mask of the real tokens of a right-padded batch: each row up to its last non-pad id."""
    positions = torch.arange(input_ids.size(1)).expand_as(input_ids)
    last = torch.where(input_ids != pad_id, positions, -1).amax(dim=1, keepdim=True)
    return (positions <= last).long()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hf_dir", type=Path, required=True, help="a Hugging Face model directory (config + safetensors)")
    p.add_argument("--data_dir", type=Path, required=True, help="data prepared by scripts/prepare_json.py")
    p.add_argument("--out_file", type=Path, required=True, help="where the per-step JSON goes")
    p.add_argument("--steps", type=int, default=23, help="optimizer steps to run (warm-up steps included)")
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--global_batch_size", type=int, default=4)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--group_by_length", type=_bool, default=False, help="our length-grouped order (default: shuffled)")
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--target_modules", default="q_proj,v_proj")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attention_mask", type=_bool, default=False)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import peft
    import transformers

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    t_load = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=dtype)
    config = peft.LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules.split(","),
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    load_s = time.perf_counter() - t_load

    train = TrainArgs(
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        max_steps=args.steps,
        seed=args.seed,
        group_by_length=args.group_by_length,
    )
    train.validate(devices=1)
    stream = BatchStream(load_prepared(args.data_dir / TRAIN_FILE), train, rank=0, world_size=1, device_type="cpu")

    steps = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        set_lr(optimizer, lr_at(step, train, args.steps))
        micro_batches = stream.next_step()
        step_supervised = sum(b.supervised for b in micro_batches)
        step_loss = 0.0
        for batch in micro_batches:
            mask = padding_mask(batch.input_ids) if args.attention_mask else None
            logits = model(input_ids=batch.input_ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=-100
            )
            weight = batch.supervised / max(step_supervised, 1)
            (loss * weight).backward()
            step_loss += float(loss.detach()) * weight
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(
            {
                "step": step + 1,
                "time_s": time.perf_counter() - t0,
                "tokens": sum(b.tokens for b in micro_batches),
                "supervised": step_supervised,
                "loss": step_loss,
            }
        )
        print(f"step {step + 1}: loss {step_loss:.4f}, {steps[-1]['time_s']:.2f} s", flush=True)

    result = {
        "tool": "transformers+peft",
        "versions": {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__},
        "trainable_parameters": sum(p.numel() for p in trainable),
        "load_s": load_s,
        "steps": steps,
    }
    args.out_file.parent.mkdir(parents=True, exist_ok=True)
    args.out_file.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
