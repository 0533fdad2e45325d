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
    python scripts/download.py --repo_id HuggingFaceTB/SmolLM2-135M-Instruct   # downloads and converts
    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/EleutherAI/pythia-160m --dtype bfloat16
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from lit_gpt.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, load_into_model, save_safetensors
from lit_gpt.config import Config
from lit_gpt.convert import hf_to_lit, hf_weight_files, iter_hf_tensors
from lit_gpt.hf_config import hf_architecture
from lit_gpt.model import GPT

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def convert_hf_checkpoint(checkpoint_dir: Path, dtype: Optional[str] = None) -> Config:
    """Convert the HF checkpoint in `checkpoint_dir`; returns the Config written to model_config.yaml.

    Args:
        checkpoint_dir: directory holding config.json and the HF weights.
        dtype: "float32", "float16" or "bfloat16" to cast the weights; default: keep the checkpoint's dtype.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(
            f"Checkpoint directory {str(checkpoint_dir)!r} does not exist. Download a model first: "
            "`python scripts/download.py --repo_id <org/name>`."
        )
    hf_config_path = checkpoint_dir / "config.json"
    if not hf_config_path.is_file():
        present = sorted(p.name for p in checkpoint_dir.iterdir())
        raise CheckpointError(
            f"{str(checkpoint_dir)!r} has no config.json (it contains: {present or 'nothing'}). "
            "The Hugging Face config.json is needed to know the architecture: download it with the weights."
        )
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(_DTYPES)}.")
    hf = json.loads(hf_config_path.read_text())
    arch = hf_architecture(hf)
    config = Config.from_hf_config(hf, name=_name(hf, checkpoint_dir))
    files = hf_weight_files(checkpoint_dir)

    state_dict = dict(hf_to_lit(arch, config, iter_hf_tensors(files), dtype=_DTYPES.get(dtype)))
    # Check names and shapes against the model the config describes before writing anything.
    with torch.device("meta"):
        model = GPT(dataclasses.replace(config, block_size=1))  # block_size only sizes the RoPE cache
    load_into_model(model, state_dict, source=", ".join(str(f) for f in files))
    del model

    save_safetensors(state_dict, checkpoint_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    config.to_file(checkpoint_dir / CONFIG_FILE)
    print(f"Converted {arch} ({len(state_dict)} tensors) -> {checkpoint_dir / WEIGHTS_FILE}, {CONFIG_FILE}")
    return config


def _name(hf: dict, checkpoint_dir: Path) -> str:
    """A display name: the HF repo name when config.json records it, else the directory name."""
    name_or_path = str(hf.get("_name_or_path") or "").rstrip("/")
    return name_or_path.split("/")[-1] if name_or_path else checkpoint_dir.resolve().name


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(convert_hf_checkpoint, as_positional=False)
