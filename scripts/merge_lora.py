"""Merge the LoRA weights of a finetune run into its base model and write a standalone checkpoint directory.

The LoRA settings (rank, alpha, which layers) and the base checkpoint are read from the hyperparameters.yaml
that finetune/lora.py saved beside the weights; nothing is declared again here. The update (alpha / r)·B·A
is folded into the base weights as stored in the base checkpoint (full precision, even when training ran
in bf16 or on a base quantized with --quantize, whose 4-bit codes would round the update away), and the
result is written in the base checkpoint's dtype. The output directory is a normal checkpoint
(lit_model.safetensors, model_config.yaml, tokenizer files), so generate/base.py, generate/chat.py and
scripts/convert_lit_checkpoint.py take it as it is, with no LoRA code at inference.

Example:
    python scripts/merge_lora.py --finetuned_dir out/lora/final --out_dir out/lora/merged
    python generate/base.py --checkpoint_dir out/lora/merged --prompt "What is 2 + 3?"
    python scripts/convert_lit_checkpoint.py --checkpoint_dir out/lora/merged --output_dir out/lora/merged-hf
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch
import yaml

from lit_gpt import lora
from lit_gpt.checkpoint import (
    CONFIG_FILE,
    SAFETENSORS_DTYPES,
    TOKENIZER_EXTRA_FILES,
    TOKENIZER_FILES,
    WEIGHTS_FILE,
    check_valid_checkpoint_dir,
    model_state_dict,
    safetensors_header,
    save_safetensors,
)
from lit_gpt.cli import run_cli
from lit_gpt.loading import COMPLETE_CHECKPOINT_METHODS, load_finetuned
from lit_gpt.outputs import HPARAMS_FILE, read_hyperparameters
from lit_gpt.peft import METHODS

def main(finetuned_dir: Path, out_dir: Path, checkpoint_dir: Optional[Path] = None) -> None:
    """Write base + merged LoRA weights to `out_dir` as a complete checkpoint directory.

    Args:
        finetuned_dir: the output directory of a finetune/lora.py run (e.g. out/lora/final), holding
            lora.safetensors and hyperparameters.yaml.
        out_dir: where the merged checkpoint goes (created if needed; must not be the base or finetuned dir).
        checkpoint_dir: the base checkpoint; default: the one the run was trained on (from hyperparameters.yaml).
    """
    finetuned_dir, out_dir = Path(finetuned_dir), Path(out_dir)
    hparams = read_hyperparameters(finetuned_dir)
    method = hparams.get("method")
    if method != lora.NAME:
        if method in COMPLETE_CHECKPOINT_METHODS:
            hint = f"it is already a complete checkpoint: use {finetuned_dir} directly (generate/base.py)."
        elif method in METHODS:
            why = getattr(METHODS[method], "NOT_MERGEABLE", f"{method} weights do not fold into the base weights")
            hint = (f"{why}; generate with "
                    f"`python generate/finetuned.py --finetuned_dir {finetuned_dir}`.")
        else:
            hint = "pass the output directory of a finetune/lora.py run (e.g. out/lora/final)."
        raise ValueError(f"--finetuned_dir {str(finetuned_dir)!r} holds {method!r} weights, not LoRA weights: {hint}")
    base_dir = check_valid_checkpoint_dir(checkpoint_dir or hparams["checkpoint_dir"])
    resolved = out_dir.resolve()
    if resolved in (base_dir.resolve(), finetuned_dir.resolve()):
        raise ValueError(
            f"--out_dir {str(out_dir)!r} is the base checkpoint or the finetuned directory; choose a new directory "
            "so that neither is overwritten."
        )

    # Full precision: the base weights as stored (upcast to float32 if stored in 16 bits) plus the LoRA update.
    model, _ = load_finetuned(finetuned_dir, base_dir, device="cpu", dtype=torch.float32, method=lora.NAME)
    stored_dtypes = _stored_dtypes(base_dir / WEIGHTS_FILE)
    lora.merge(model)  # raises a clear ValueError for LoRA on a tied LM head (nothing has been written yet)
    state = {
        name: tensor.to(stored_dtypes.get(name, tensor.dtype)) if tensor.is_floating_point() else tensor
        for name, tensor in model_state_dict(model).items()
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, out_dir / WEIGHTS_FILE, metadata={"format": "pt", "merged_from": str(finetuned_dir)})
    for name in (CONFIG_FILE, "config.json", *TOKENIZER_FILES, *TOKENIZER_EXTRA_FILES):
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)
    provenance = {**hparams, "method": "lora_merged", "merged_from": str(finetuned_dir)}
    (out_dir / HPARAMS_FILE).write_text(yaml.safe_dump(provenance, sort_keys=False))
    print(f"Merged {finetuned_dir} into {base_dir}: wrote {out_dir} ({', '.join(sorted(p.name for p in out_dir.iterdir()))})")


def _stored_dtypes(path: Path) -> dict[str, torch.dtype]:
    """The dtype of every floating-point tensor in a safetensors file, read from its header only."""
    dtypes = {name: SAFETENSORS_DTYPES[info["dtype"]] for name, info in safetensors_header(path).items()}
    return {name: dtype for name, dtype in dtypes.items() if dtype.is_floating_point}


if __name__ == "__main__":
    run_cli(main)
