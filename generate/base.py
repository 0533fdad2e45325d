"""Complete a prompt with a base, fully finetuned or merged checkpoint, streaming the text as it is generated.

The prompt is used as is (no chat or instruction template: see generate/chat.py for instruct models). The
completion goes to stdout; timing, tokens/s and peak memory go to stderr.

Example:
    python generate/base.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct --prompt "The capital of France is"
    python generate/base.py --prompt "Once upon a time" --temperature 0 --max_new_tokens 50   # greedy
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

from lit_gpt.checkpoint import check_valid_checkpoint_dir
from lit_gpt.cli import run_cli
from lit_gpt.generation import check_sampling_args, generate, stream_text
from lit_gpt.loading import load_base_model, start_inference
from lit_gpt.tokenizer import Tokenizer, check_text
from lit_gpt.utils import peak_memory


def main(
    prompt: str = "What food do llamas eat?",
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    num_samples: int = 1,
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
    seed: int = 1234,
) -> None:
    """Generate `num_samples` completions of `prompt`.

    Args:
        prompt: the text to continue, used verbatim (BOS is added when the checkpoint's tokenizer adds it).
        checkpoint_dir: a directory with lit_model.safetensors, model_config.yaml and the tokenizer files.
        max_new_tokens: most tokens to generate per sample; generation also stops at EOS.
        temperature: 0 is greedy (always the most likely token); higher is more random.
        top_k: sample only among the k most likely tokens (null: all of them).
        top_p: sample only among the most likely tokens whose probabilities add up to top_p (1.0: off).
        num_samples: how many completions to generate, one after the other.
        precision: Lightning precision such as bf16-true, 16-true or 32-true; by default the best the device runs.
        quantize: hold the linear weights in 4 or 8 bits with bitsandbytes to save memory: bnb.nf4, bnb.nf4-dq,
            bnb.fp4, bnb.fp4-dq or bnb.int8 (CUDA or CPU, not MPS; with a '-true' precision).
        compile: `torch.compile` the one-token decoding step: the first call compiles (~20-45 s for SmolLM2-135M
            on 2 CPU cores), then decoding runs ~1.3-1.5x faster (37-42 against ~28 tokens/s on our CPU). Pays off
            for long answers and chats, not for one short answer.
        seed: random seed, so that sampling is reproducible.
    """
    checkpoint_dir = check_valid_checkpoint_dir(checkpoint_dir)
    if num_samples < 1:
        raise ValueError(f"--num_samples must be at least 1, got {num_samples}.")
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    check_text(prompt, "--prompt")
    runtime = start_inference(precision, quantize, seed)

    tokenizer = Tokenizer(checkpoint_dir)
    start = time.perf_counter()
    model, config = load_base_model(checkpoint_dir, runtime.device, runtime.dtype, runtime.quantize)
    model = runtime.fabric.setup_module(model)
    print(f"Loaded {config.name} from {checkpoint_dir} in {time.perf_counter() - start:.2f} s "
          f"({runtime.device_type}, {runtime.precision}).", file=sys.stderr)

    encoded = tokenizer.encode(prompt).to(runtime.device)  # (T,)
    for i in range(num_samples):
        tokens = generate(
            model, encoded, max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=tokenizer.stop_ids, compile=compile,
        )
        sys.stdout.write(prompt)
        _, n_tokens, seconds = stream_text(tokenizer, tokens)
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(
            f"Sample {i + 1}/{num_samples}: {n_tokens} tokens in {seconds:.2f} s, "
            f"{n_tokens / max(seconds, 1e-9):.2f} tokens/s; peak memory {peak_memory(runtime.device)}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    run_cli(main)
