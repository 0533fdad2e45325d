"""Generate with a base checkpoint plus LoRA weights from finetune/lora.py, using the Alpaca prompt.

The LoRA settings and the base checkpoint are read from the hyperparameters.yaml the finetune run saved
beside the weights; nothing is declared again here. The response streams to stdout; timing, tokens/s and
peak memory go to stderr.

Example:
    python generate/lora.py --finetuned_dir out/lora/final --prompt "What is 12 + 30?"
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from lightning_fabric import Fabric
import torch

from lit_gpt.cli import run_cli
from lit_gpt.generation import check_sampling_args, generate, stream_text
from lit_gpt.peft import load_finetuned
from lit_gpt.prompts import alpaca_prompt
from lit_gpt.quantize import check_quantize
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import choose_device_type, choose_precision, peak_memory, precision_to_dtype

METHOD = "lora"


def main(
    prompt: str = "What food do llamas eat?",
    input: str = "",
    finetuned_dir: Path = Path(f"out/{METHOD}/final"),
    checkpoint_dir: Optional[Path] = None,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
    seed: int = 1234,
) -> None:
    """Answer an instruction with a finetuned model.

    Args:
        prompt: the instruction.
        input: optional context for the instruction (the Alpaca "Input" field).
        finetuned_dir: the output directory of the finetune run (holds the weights and hyperparameters.yaml).
        checkpoint_dir: the base checkpoint; default: the one the run was trained on.
        max_new_tokens: most tokens to generate; generation also stops at EOS.
        temperature: 0 is greedy; higher is more random.
        top_k: sample among the k most likely tokens (null: all).
        top_p: nucleus sampling threshold (1.0: off).
        precision: Lightning precision such as bf16-true or 32-true; by default the best the device runs.
        quantize: hold the linear weights in 4 or 8 bits with bitsandbytes to save memory: bnb.nf4, bnb.nf4-dq,
            bnb.fp4, bnb.fp4-dq or bnb.int8 (CUDA or CPU, not MPS; with a '-true' precision).
        compile: `torch.compile` the one-token decoding step: the first call compiles (~20-45 s for SmolLM2-135M
            on 2 CPU cores), then decoding runs ~1.3-1.5x faster (37-42 against ~28 tokens/s on our CPU). Pays off
            for long answers and chats, not for one short answer.
        seed: random seed, so that sampling is reproducible.
    """
    check_sampling_args(temperature, top_k, top_p)
    device_type = choose_device_type()
    precision = choose_precision(precision, device_type)
    quantize = check_quantize(quantize, device_type, precision)
    fabric = Fabric(accelerator=device_type, devices=1, precision=precision)
    torch.manual_seed(seed)

    model, hparams = load_finetuned(
        finetuned_dir, METHOD, checkpoint_dir, device=fabric.device, dtype=precision_to_dtype(precision),
        quantize=quantize,
    )
    model = fabric.setup_module(model)
    tokenizer = Tokenizer(checkpoint_dir or hparams["checkpoint_dir"])
    encoded = tokenizer.encode(alpaca_prompt(prompt, input)).to(fabric.device)
    tokens = generate(
        model, encoded, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_ids=tokenizer.stop_ids, compile=compile,
    )
    _, n_tokens, seconds = stream_text(tokenizer, tokens)
    sys.stdout.write("\n")
    print(
        f"{n_tokens} tokens in {seconds:.2f} s, {n_tokens / max(seconds, 1e-9):.2f} tokens/s; "
        f"peak memory {peak_memory(fabric.device)}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    run_cli(main)
