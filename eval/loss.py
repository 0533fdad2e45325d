"""Validation loss and perplexity of a base or finetuned model on prepared data (scripts/prepare_*.py output).

The loss is the token-weighted mean cross-entropy over the response tokens (the prompt is masked when the
data was prepared with mask_prompt, the default), computed by the same `lit_gpt.training.validate` the
finetune scripts log as "val loss"; perplexity = exp(loss).

Examples:
    python eval/loss.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct --data_dir data/quickstart
    python eval/loss.py --finetuned_dir out/quickstart/lora/final --data_dir data/quickstart --split train --max_batches 20
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

from lit_gpt.args import EvalArgs, TrainArgs
from lit_gpt.cli import run_cli
from lit_gpt.data import TRAIN_FILE, VAL_FILE, check_prepared_data, load_prepared, uses_shared_prefix
from lit_gpt.evaluation import load_eval_model
from lit_gpt.loading import start_inference
from lit_gpt.training import validate


def main(
    data_dir: Path,
    checkpoint_dir: Optional[Path] = None,
    finetuned_dir: Optional[Path] = None,
    method: Optional[str] = None,
    split: str = "val",
    batch_size: int = 8,
    max_batches: Optional[int] = None,
    precision: Optional[str] = None,
    out_file: Optional[Path] = None,
) -> dict:
    """Compute loss and perplexity.

    Args:
        data_dir: prepared data directory (train.safetensors, val.safetensors).
        checkpoint_dir: the base checkpoint; with --finetuned_dir, overrides the base the run recorded.
        finetuned_dir: a finetune output directory (e.g. out/lora/final); its method comes from hyperparameters.yaml.
        method: optional check: fail unless --finetuned_dir holds this method's weights.
        split: "val" or "train".
        batch_size: samples per forward pass.
        max_batches: use only the first N batches (default: all of the split).
        precision: e.g. 32-true or bf16-true; default: the best the device runs.
        out_file: also write the result as JSON here.
    """
    if split not in ("val", "train"):
        raise ValueError(f"--split must be 'val' or 'train', got {split!r}.")
    if batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ValueError(f"--batch_size and --max_batches must be at least 1, got {batch_size} and {max_batches}.")
    path = Path(data_dir) / (VAL_FILE if split == "val" else TRAIN_FILE)
    dataset = load_prepared(path)
    if len(dataset) == 0:
        raise ValueError(f"{path} holds no samples; prepare the data with a nonzero --val_split_fraction.")
    runtime = start_inference(precision)
    model, tokenizer, what = load_eval_model(checkpoint_dir, finetuned_dir, method, runtime.device, runtime.dtype)
    check_prepared_data(dataset, tokenizer.checkpoint_dir, path)
    n_batches = math.ceil(len(dataset) / batch_size)
    max_batches = min(max_batches or n_batches, n_batches)
    print(f"Loss of {what} on {min(len(dataset), max_batches * batch_size)} {split} samples of {data_dir}")
    start = time.perf_counter()
    # Each batch's shared prompt template is computed once where training's default does so (same loss, faster).
    loss = validate(runtime.fabric, model, dataset, EvalArgs(max_iters=max_batches), batch_size,
                    share_prefix=uses_shared_prefix(TrainArgs(), runtime.device_type))
    result = {
        "loss": loss,
        "perplexity": math.exp(loss),
        "model": what,
        "data": str(path),
        "samples": min(len(dataset), max_batches * batch_size),
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(f"{split} loss {loss:.4f}, perplexity {result['perplexity']:.3f}")
    if out_file is not None:
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        Path(out_file).write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {out_file}")
    return result


if __name__ == "__main__":
    run_cli(main)
