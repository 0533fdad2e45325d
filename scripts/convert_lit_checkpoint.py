"""Convert one of our checkpoint directories back to the Hugging Face format.

Writes to `--output_dir`:

    config.json        the HF config (lit_gpt/hf_config.py); when the checkpoint directory still holds the
                       config.json it was converted from and that describes the same model, that one is kept
                       (architecture name, token ids and other HF-only fields preserved)
    model.safetensors  the weights under HF names, q/k/v fused again where the architecture fuses them
    tokenizer files    copied unchanged

The result loads with `transformers.AutoModelForCausalLM.from_pretrained(output_dir)`. Use it for a full
finetune or a merged LoRA checkpoint (`scripts/merge_lora.py` writes a normal checkpoint directory).

Example:
    python scripts/convert_lit_checkpoint.py --checkpoint_dir out/full/alpaca --output_dir out/full/alpaca-hf
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from lit_gpt.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_EXTRA_FILES,
    TOKENIZER_FILES,
    WEIGHTS_FILE,
    check_valid_checkpoint_dir,
    save_safetensors,
)
from lit_gpt.config import Config
from lit_gpt.convert import lit_to_hf
from lit_gpt.hf_config import hf_architecture, hf_config_from_config

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAME_MODEL_IGNORES = ("name", "hf_repo")


def convert_lit_checkpoint(checkpoint_dir: Path, output_dir: Path, dtype: Optional[str] = None) -> Path:
    """Write a HF-format copy of `checkpoint_dir` to `output_dir`; returns `output_dir`.

    Args:
        checkpoint_dir: one of our checkpoint directories (lit_model.safetensors + model_config.yaml).
        output_dir: where config.json, model.safetensors and the tokenizer files go (created if needed).
        dtype: "float32", "float16" or "bfloat16" to cast the weights; default: keep their dtype.
    """
    checkpoint_dir = check_valid_checkpoint_dir(checkpoint_dir, need_tokenizer=False)
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(_DTYPES)}.")
    output_dir = Path(output_dir)
    config = Config.from_file(checkpoint_dir / CONFIG_FILE)
    hf = _original_hf_config(checkpoint_dir, config) or hf_config_from_config(config)
    arch = hf_architecture(hf)

    weights = checkpoint_dir / WEIGHTS_FILE
    with safe_open(str(weights), framework="pt") as f:
        ours = ((k, f.get_tensor(k)) for k in f.keys())
        state_dict = dict(lit_to_hf(arch, config, ours, dtype=_DTYPES.get(dtype)))
    weights_dtype = next(iter(state_dict.values())).dtype
    hf["torch_dtype"] = hf["dtype"] = str(weights_dtype).removeprefix("torch.")

    output_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(state_dict, output_dir / "model.safetensors", metadata={"format": "pt"})
    (output_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for name in TOKENIZER_FILES + TOKENIZER_EXTRA_FILES:
        src = checkpoint_dir / name
        if src.is_file() and src.resolve() != (output_dir / name).resolve():
            shutil.copy2(src, output_dir / name)
    print(f"Wrote {arch} checkpoint ({len(state_dict)} tensors) to {output_dir}")
    return output_dir


def _original_hf_config(checkpoint_dir: Path, config: Config) -> Optional[dict]:
    """The config.json this checkpoint was converted from, if present and it still describes `config`."""
    path = checkpoint_dir / "config.json"
    if not path.is_file():
        return None
    try:
        hf = json.loads(path.read_text())
        original = Config.from_hf_config(hf)
    except (ValueError, KeyError):
        return None
    for ignored in _SAME_MODEL_IGNORES:
        setattr(original, ignored, getattr(config, ignored))
    return hf if original == config else None


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(convert_lit_checkpoint, as_positional=False)
