"""Convert one of our checkpoint directories back to the Hugging Face format.

Writes to `--output_dir`:

    config.json        the HF config (lit_gpt/hf_config.py); when the checkpoint directory still holds the
                       config.json it was converted from and that describes the same model, that one is kept
                       (architecture name, token ids and other HF-only fields preserved)
    model.safetensors  the weights under HF names, q/k/v fused again where the architecture fuses them
    tokenizer files    copied unchanged

The result loads with `transformers.AutoModelForCausalLM.from_pretrained(output_dir)`. Use it for a full
finetune or a merged LoRA checkpoint (both are normal checkpoint directories).

Example:
    python scripts/convert_lit_checkpoint.py --checkpoint_dir out/full/alpaca --output_dir out/full/alpaca-hf
"""

from pathlib import Path
from typing import Optional

import torch

from lit_gpt.cli import run_cli
from lit_gpt.convert import convert_lit_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(checkpoint_dir: Path, output_dir: Path, dtype: Optional[str] = None) -> None:
    """Write a Hugging Face copy of `checkpoint_dir` to `output_dir`.

    Args:
        checkpoint_dir: our checkpoint directory (lit_model.safetensors + model_config.yaml).
        output_dir: where config.json, model.safetensors and the tokenizer files go (created if needed).
        dtype: float32, bfloat16 or float16 to cast the weights; default: keep their dtype.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}.")
    out = convert_lit_checkpoint(checkpoint_dir, output_dir, DTYPES.get(dtype))
    print(f"Wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    run_cli(main)
