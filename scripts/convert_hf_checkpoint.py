"""Convert a Hugging Face checkpoint directory into this project's format, in place.

Reads `config.json` and the weights (`model.safetensors`, `pytorch_model.bin`, or the shards named by
`model.safetensors.index.json` / `pytorch_model.bin.index.json`) and writes, next to them:

    model_config.yaml        our Config, derived from config.json (lit_gpt/hf_config.py)
    lit_model.safetensors    the weights under our names, fused qkv split (lit_gpt/convert.py)

Tokenizer files stay where they are. Tensors are streamed one at a time, so peak memory is about one copy
of the model. The checkpoint's dtype is kept unless `--dtype` is given.

Supported architectures: GPTNeoX (Pythia, RedPajama), Falcon, Llama (Llama 2/3, SmolLM2), Mistral, Phi,
Gemma, Qwen2.

Example:
    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/EleutherAI/pythia-160m --dtype bfloat16
"""

from pathlib import Path
from typing import Optional

import torch

from lit_gpt.cli import run_cli
from lit_gpt.convert import convert_hf_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(checkpoint_dir: Path, dtype: Optional[str] = None) -> None:
    """Convert the HF checkpoint in `checkpoint_dir` (writes model_config.yaml and lit_model.safetensors there).

    Args:
        checkpoint_dir: directory holding config.json and the HF weights.
        dtype: float32, bfloat16 or float16 to cast the weights; default: keep the checkpoint's dtype.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}.")
    config = convert_hf_checkpoint(checkpoint_dir, DTYPES.get(dtype))
    print(f"Converted {config.name} -> {checkpoint_dir}: lit_model.safetensors, model_config.yaml")


if __name__ == "__main__":
    run_cli(main)
