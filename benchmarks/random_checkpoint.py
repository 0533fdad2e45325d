"""Write a checkpoint directory with random weights for a named config, so a benchmark needs no download.

It runs in either tool's environment and writes that tool's format:
* `--format ours`: `lit_model.safetensors` + `model_config.yaml` (lit_gpt.config.Config.from_name);
* `--format litgpt`: `lit_model.pth` + `model_config.yaml` (litgpt.Config.from_name), as `litgpt finetune_*` reads.

Both build the model with PyTorch's default initialisation (what `nn.Linear` and `nn.Embedding` do) in the
given dtype, on the GPU when there is one, from the same seed. The weights are not the same tensors across
the two formats (each tool orders its modules its own way), only the same shapes and distributions: that is
all a speed and memory benchmark needs. The tokenizer files are copied from `--tokenizer_dir`; pass the
vocabulary size to match it with `--override vocab_size=49152 --override padded_vocab_size=49152`.

    python benchmarks/random_checkpoint.py --format ours --name Llama-2-7b-hf --out_dir /tmp/llama2-7b-random \
        --tokenizer_dir checkpoints/SmolLM2-135M-Instruct --override vocab_size=49152 --override padded_vocab_size=49152
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
import yaml

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def parse_override(text: str) -> tuple[str, object]:
    """`key=value`, the value read as YAML (so numbers are numbers): "n_layer=2" -> ("n_layer", 2)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--override {text!r}: expected key=value, e.g. n_layer=2")
    return key.strip(), yaml.safe_load(value)


def build(fmt: str, name: str, overrides: dict, dtype: torch.dtype, device: torch.device, seed: int):
    """(model, config) of the tool named by `fmt`, with random weights."""
    if fmt == "ours":
        from lit_gpt.config import Config
        from lit_gpt.model import GPT
    else:
        from litgpt import GPT, Config
    config = Config.from_name(name, **overrides)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight in the target dtype: no float32 copy of a 7B model
    try:
        with device:
            model = GPT(config)
    finally:
        torch.set_default_dtype(default)
    return model, config


def save(fmt: str, model, config, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "ours":
        from lit_gpt.checkpoint import WEIGHTS_FILE, model_state_dict, save_safetensors

        save_safetensors(model_state_dict(model), out_dir / WEIGHTS_FILE)
        config.to_file(out_dir / "model_config.yaml")
    else:
        from litgpt.utils import save_config

        torch.save(model.state_dict(), out_dir / "lit_model.pth")
        save_config(config, out_dir)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=("ours", "litgpt"), required=True)
    p.add_argument("--name", required=True, help="a config name both tools know, e.g. Llama-2-7b-hf")
    p.add_argument("--out_dir", type=Path, required=True)
    p.add_argument("--tokenizer_dir", type=Path, required=True, help="a checkpoint directory to copy the tokenizer from")
    p.add_argument("--override", type=parse_override, action="append", default=[], help="key=value config override")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    copied = [f for f in TOKENIZER_FILES if (args.tokenizer_dir / f).is_file()]
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        p.error(f"--tokenizer_dir {args.tokenizer_dir} has no tokenizer.json or tokenizer.model")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    model, config = build(args.format, args.name, dict(args.override), DTYPES[args.dtype], device, args.seed)
    n = sum(p.numel() for p in model.parameters())
    save(args.format, model, config, args.out_dir)
    for f in copied:
        shutil.copy2(args.tokenizer_dir / f, args.out_dir / f)
    print(f"{args.format}: {args.name} with random weights, {n:,} parameters in {args.dtype}, written to "
          f"{args.out_dir} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
