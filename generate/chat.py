"""Chat with an instruct checkpoint in the terminal, using the checkpoint's own chat template.

Each turn renders the whole conversation with the template of tokenizer_config.json and streams the reply.
Type /reset to forget the conversation, /exit (or Ctrl-D) to quit. When the conversation outgrows the
model's context, the oldest turns are dropped. With --prompt, one turn is answered and the script exits:
the reply goes to stdout, timing and memory to stderr.

Example:
    python generate/chat.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct
    python generate/chat.py --prompt "Name three primary colours." --temperature 0
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from lit_gpt.checkpoint import check_valid_checkpoint_dir
from lit_gpt.cli import run_cli
from lit_gpt.generation import check_sampling_args, generate, stream_text
from lit_gpt.loading import load_base_model, start_inference
from lit_gpt.tokenizer import Tokenizer, check_text
from lit_gpt.utils import peak_memory


def main(
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    prompt: Optional[str] = None,
    system: Optional[str] = None,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
    seed: int = 1234,
) -> None:
    """Chat interactively, or answer one `--prompt` and exit.

    Args:
        checkpoint_dir: an instruct checkpoint (its tokenizer_config.json must hold a `chat_template`).
        prompt: answer this one message and exit instead of chatting interactively.
        system: an optional system message placed before the conversation.
        max_new_tokens: most tokens per reply; a reply also ends at the end-of-turn token.
        temperature: 0 is greedy (always the most likely token); higher is more random.
        top_k: sample only among the k most likely tokens (null: all of them).
        top_p: sample only among the most likely tokens whose probabilities add up to top_p (1.0: off).
        precision: Lightning precision such as bf16-true, 16-true or 32-true; by default the best the device runs.
        quantize: hold the linear weights in 4 or 8 bits with bitsandbytes to save memory: bnb.nf4, bnb.nf4-dq,
            bnb.fp4, bnb.fp4-dq or bnb.int8 (CUDA or CPU, not MPS; with a '-true' precision).
        compile: `torch.compile` the one-token decoding step: the first call compiles (~20-45 s for SmolLM2-135M
            on 2 CPU cores), then decoding runs ~1.3-1.5x faster (37-42 against ~28 tokens/s on our CPU). Pays off
            for long answers and chats, not for one short answer.
        seed: random seed, so that sampling is reproducible.
    """
    checkpoint_dir = check_valid_checkpoint_dir(checkpoint_dir)
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    for flag, text in (("--prompt", prompt), ("--system", system)):
        if text is not None:
            check_text(text, flag)
    tokenizer = Tokenizer(checkpoint_dir)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"{str(checkpoint_dir)!r} has no chat template (no `chat_template` in tokenizer_config.json, no "
            "chat_template.jinja), so it is probably a base model, not an instruct one. Use an instruct checkpoint "
            f"(e.g. SmolLM2-135M-Instruct), or complete raw text with `python generate/base.py --checkpoint_dir "
            f"{checkpoint_dir} --prompt \"...\"`."
        )
    runtime = start_inference(precision, quantize, seed)
    model, config = load_base_model(checkpoint_dir, runtime.device, runtime.dtype, runtime.quantize)
    model = runtime.fabric.setup_module(model)

    history: list[dict[str, str]] = [] if system is None else [{"role": "system", "content": system}]
    interactive = prompt is None
    if interactive:
        print(f"Chatting with {config.name} ({runtime.device_type}, {runtime.precision}). /reset clears the history, "
              "/exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        if interactive:
            try:
                message = input(">> You: ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return
            if message.strip() in ("/exit", "/quit"):
                return
            if message.strip() == "/reset":
                del history[int(system is not None):]
                continue
            if not message.strip():
                continue
            try:
                check_text(message, "Your message")
            except ValueError as error:  # e.g. a terminal that is not set to UTF-8: say so and keep the conversation
                print(error, file=sys.stderr)
                continue
        else:
            message = prompt
        history.append({"role": "user", "content": message})
        encoded = encode_conversation(tokenizer, history, config.block_size, first=int(system is not None))
        if encoded is None:
            history.pop()
            error = (f"This message alone is longer than {config.name}'s context of {config.block_size} tokens; "
                     "send a shorter one.")
            if not interactive:
                raise ValueError(error)
            print(error, file=sys.stderr)
            continue

        tokens = generate(
            model, encoded.to(runtime.device), max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=tokenizer.stop_ids, compile=compile,
        )
        if interactive:
            sys.stdout.write(">> Assistant: ")
        reply, n_tokens, seconds = stream_text(tokenizer, tokens, skip_special=True)
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": reply.strip()})
        print(f"({n_tokens} tokens in {seconds:.2f} s, {n_tokens / max(seconds, 1e-9):.2f} tokens/s; "
              f"peak memory {peak_memory(runtime.device)})", file=sys.stderr)
        if not interactive:
            return


def encode_conversation(tokenizer: Tokenizer, history: list[dict[str, str]], block_size: int, first: int):
    """Token ids (T,) of the templated conversation, dropping the oldest turns after `first` until it fits.

    Returns None when even the newest message alone does not fit (leaving room for one reply token).
    """
    while True:
        text = tokenizer.apply_chat_template(history, add_generation_prompt=True)
        encoded = tokenizer.encode(text, bos=False)  # the template writes any BOS itself
        if encoded.numel() < block_size:
            return encoded
        if len(history) - first <= 1:
            return None
        dropped = 2 if len(history) - first > 2 else 1  # a user message and its reply
        del history[first : first + dropped]
        print(f"(the conversation is longer than the {block_size}-token context: dropped the oldest turn)",
              file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
