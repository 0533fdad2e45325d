"""The token-sampling loop: used by generate/*, the chat script, evaluation and the sample printed in training.

    tokenizer = Tokenizer("checkpoints/SmolLM2-135M-Instruct")
    model, config = load_base_model("checkpoints/SmolLM2-135M-Instruct", device="cpu")   # lit_gpt.loading
    prompt = tokenizer.encode("The capital of France is")           # (T,) int64
    tokens = generate(model, prompt, max_new_tokens=20, temperature=0.8, top_k=50, stop_ids=tokenizer.stop_ids)
    text, n_tokens, seconds = stream_text(tokenizer, tokens)        # prints each piece as soon as it exists

At the end, `answer_instruction` is the command behind generate/finetuned.py, lora.py, adapter.py and
adapter_v2.py: load a finetune output directory and answer an instruction with it.

`generate` fills the KV cache with the whole prompt in one forward pass (prefill), then feeds back one
token at a time at its position (`input_pos`), so each step costs one token's worth of compute. It yields
plain ints, so callers can stream, collect (`list(...)`) or stop early (`break`).
"""

from __future__ import annotations

import sys
import time
import weakref
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn

from lit_gpt.loading import load_finetuned, start_inference
from lit_gpt.prompts import alpaca_prompt
from lit_gpt.tokenizer import Tokenizer, check_text
from lit_gpt.utils import peak_memory


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick the next token from `logits`, shape (..., V); returns int64 ids of shape (...).

    temperature 0 is greedy decoding (argmax; `top_k`, `top_p` and `generator` are then irrelevant).
    Otherwise the logits are divided by `temperature`, only the `top_k` most likely tokens are kept (ties
    with the k-th are kept too), then only the smallest set of those whose probabilities add up to at least
    `top_p` (nucleus sampling; the most likely token is always kept), and one token is drawn from the
    renormalised distribution with `generator` (None: torch's global RNG).
    """
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0.0 or top_k == 1:
        return logits.argmax(dim=-1)

    logits = logits.float() / temperature
    vocab_size = logits.size(-1)
    if top_k is not None and top_k < vocab_size:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1).reshape(-1, vocab_size)
    return torch.multinomial(probs, num_samples=1, generator=generator).reshape(logits.shape[:-1])


def check_sampling_args(
    temperature: float, top_k: Optional[int], top_p: float, max_new_tokens: Optional[int] = None
) -> None:
    """Raise a ValueError naming the bad value when the sampling settings (and, when given, the number of tokens
    to generate) are out of range."""
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be at least 1, got {max_new_tokens}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}. Leave it unset (None) to keep every token.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}. Use 1.0 to disable nucleus filtering.")


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the nucleus: the fewest most-likely tokens with total probability >= top_p.

    logits: (..., V) -> (..., V). A token is dropped when the tokens ranked above it already reach `top_p`.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_above = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # probability of the tokens ranked higher
    drop_sorted = mass_above >= top_p
    drop_sorted[..., 0] = False  # the most likely token always survives
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    generator: Optional[torch.Generator] = None,
    compile: bool = False,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after `prompt`, one Python int at a time.

    Args:
        model: a GPT (or a Fabric-wrapped one) on the device `prompt` is on.
        prompt: token ids, (T,) int64, with 1 <= T <= model.config.block_size.
        max_new_tokens: most tokens to yield; fewer when the context (block_size) fills up first.
        temperature, top_k, top_p, generator: see :func:`sample` (temperature 0 = greedy).
        stop_ids: generation ends at the first of these ids (EOS, end-of-turn); the stop id itself is
            NOT yielded.
        compile: run the one-token decoding step through `torch.compile` (the prefill stays eager). The first
            call compiles (~20-45 s for SmolLM2-135M on 2 CPU cores); later calls reuse it until prompt length
            + max_new_tokens outgrows the cache, which is rounded up to a multiple of COMPILED_CACHE_MULTIPLE
            (256) positions. It removes the per-operation overhead of eager PyTorch (about a third of a
            batch-1 token on our 2-core CPU): 37-42 against ~28 tokens/s there.

    The KV cache is sized prompt length + max_new_tokens (rounded up when compiled; at most block_size) and
    filled by one prefill pass; then each step feeds back only the newest token at `input_pos`. Model compute
    runs under `torch.inference_mode()`, but not the caller's code between yields. When the generator finishes or is
    closed (e.g. the caller breaks out of the loop), the KV cache is dropped and `model.max_seq_length`
    restored, so a model in the middle of training can generate a sample and go back to training.
    """
    if prompt.dim() != 1:
        raise ValueError(f"prompt must be 1-D token ids (T,), got shape {tuple(prompt.shape)}.")
    config = model.config
    T = prompt.size(0)
    if T == 0:
        raise ValueError("prompt is empty: give at least one token (e.g. the BOS token).")
    if T > config.block_size:
        raise ValueError(
            f"The prompt has {T} tokens but {config.name}'s context (block_size) is {config.block_size} tokens. "
            f"Shorten the prompt by at least {T - config.block_size} tokens."
        )
    check_sampling_args(temperature, top_k, top_p)
    # Checks above run at call time; the loop below runs lazily as the caller iterates.
    decode_step = compiled_decode_step(model) if compile else model
    stop_ids = {int(i) for i in stop_ids}
    return _decode(model, decode_step, prompt, max_new_tokens, temperature, top_k, top_p, stop_ids, generator)


_COMPILED_STEPS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()
# A compiled step is specialised to its KV-cache length; rounding that up to a multiple of this lets prompts of
# other lengths (every turn of a chat) reuse it instead of compiling again, for a few masked cache slots.
COMPILED_CACHE_MULTIPLE = 256


def compiled_decode_step(model: nn.Module) -> nn.Module:
    """`torch.compile(model)` for one-token steps (static shapes), made once per model and reused."""
    if model not in _COMPILED_STEPS:
        _COMPILED_STEPS[model] = torch.compile(model, dynamic=False)
    return _COMPILED_STEPS[model]


def _decode(model, decode_step, prompt, max_new_tokens, temperature, top_k, top_p, stop_ids, generator) -> Iterator[int]:
    """The loop behind `generate`: prefill with `model`, then one token at a time with `decode_step`."""
    if max_new_tokens <= 0:
        return
    T = prompt.size(0)
    config = model.config
    old_max_seq_length = model.max_seq_length
    cache_len = T + max_new_tokens
    if decode_step is not model:  # compiled for one cache size: round it up, so that later prompts reuse it
        cache_len = -(-cache_len // COMPILED_CACHE_MULTIPLE) * COMPILED_CACHE_MULTIPLE
    cache_len = min(cache_len, config.block_size)
    try:
        with torch.inference_mode():
            model.set_kv_cache(batch_size=1, max_seq_length=cache_len, device=prompt.device)
            input_pos = torch.arange(T, device=prompt.device)
            logits = model(prompt[None], input_pos=input_pos, last_only=True)[0, -1]  # (V,) prefill: whole prompt
        for step in range(max_new_tokens):
            with torch.inference_mode():
                token = sample(logits, temperature, top_k, top_p, generator)  # () int64
            token_id = int(token)
            if token_id in stop_ids:
                return
            yield token_id
            position = T + step  # where the token just yielded goes
            if step + 1 == max_new_tokens or position >= cache_len:
                return
            with torch.inference_mode():
                input_pos = torch.tensor([position], device=prompt.device)
                logits = decode_step(token.view(1, 1), input_pos=input_pos)[0, -1]  # (V,)
    finally:
        # Outside inference mode, so that the rebuilt RoPE buffers are normal tensors usable in training.
        with torch.inference_mode(False):
            model.clear_kv_cache()
            model.max_seq_length = old_max_seq_length


@torch.inference_mode()
def generate_batch(
    model: nn.Module,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    *,
    stop_ids: Iterable[int] = (),
    pad_id: int = 0,
) -> list[list[int]]:
    """Greedy completions of several prompts at once, one row each; returns the new token ids of every prompt.

    Args:
        prompts: B token-id tensors, each (T_b,), possibly of different lengths.
        max_new_tokens: most tokens per completion; a row also ends at its first stop id (not included).
        pad_id: the token written into padding slots (never attended to, so any id works).

    The prompts are left-padded to a common length L so that every row's next token sits in the same cache
    slot; `pad_lengths` tells the model where each row really starts, so the positions and attention of
    each row are the ones it would have alone (same greedy output as `generate`, up to float rounding).
    """
    if not prompts:
        return []
    config = model.config
    device = prompts[0].device
    lengths = [int(p.size(0)) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("Every prompt needs at least one token.")
    L = max(lengths)
    if L > config.block_size:
        raise ValueError(
            f"The longest prompt has {L} tokens but {config.name}'s context (block_size) is {config.block_size}."
        )
    stop_ids = {int(i) for i in stop_ids}
    B = len(prompts)
    batch = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        batch[row, L - lengths[row] :] = prompt
    pad_lengths = torch.tensor([L - n for n in lengths], device=device)
    cache_len = min(L + max_new_tokens, config.block_size)
    old_max_seq_length = model.max_seq_length
    outputs: list[list[int]] = [[] for _ in range(B)]
    done = [max_new_tokens <= 0] * B
    try:
        model.set_kv_cache(batch_size=B, max_seq_length=cache_len, device=device)
        logits = model(batch, input_pos=torch.arange(L, device=device), pad_lengths=pad_lengths, last_only=True)
        for slot in range(L, L + max_new_tokens):
            tokens = logits[:, -1].argmax(dim=-1)  # (B,)
            for row, token in enumerate(tokens.tolist()):
                if done[row]:
                    continue
                if token in stop_ids:
                    done[row] = True
                else:
                    outputs[row].append(token)
                    done[row] = len(outputs[row]) >= max_new_tokens
            if all(done) or slot >= cache_len:
                break
            input_pos = torch.tensor([slot], device=device)
            logits = model(tokens[:, None], input_pos=input_pos, pad_lengths=pad_lengths)
    finally:
        with torch.inference_mode(False):
            model.clear_kv_cache()
            model.max_seq_length = old_max_seq_length
    return outputs


def stream_text(tokenizer, tokens: Iterable[int], file=None, skip_special: bool = False) -> tuple[str, int, float]:
    """Print the text of `tokens` (e.g. a `generate(...)` iterator) to `file` as each token arrives, flushed.

    Multi-byte characters split over tokens are held back until complete (`tokenizer.decoder()`).
    Returns (the whole text, number of tokens, seconds spent, including the model's compute).
    """
    file = sys.stdout if file is None else file
    decoder = tokenizer.decoder(skip_special=skip_special)
    pieces, count = [], 0
    start = time.perf_counter()
    for token_id in tokens:
        count += 1
        piece = decoder.step(token_id)
        if piece:
            pieces.append(piece)
            file.write(piece)
            file.flush()
    pieces.append(decoder.flush())
    file.write(pieces[-1])
    file.flush()
    return "".join(pieces), count, time.perf_counter() - start


# --- the command behind generate/finetuned.py, lora.py, adapter.py and adapter_v2.py -------------------------
def answer_instruction(
    prompt: str = "What food do llamas eat?",
    input: str = "",
    finetuned_dir: Path = Path("out/lora/final"),
    checkpoint_dir: Optional[Path] = None,
    method: Optional[str] = None,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
    seed: int = 1234,
) -> None:
    """Answer an instruction with a finetuned model, through the Alpaca prompt it was trained on.

    The method, its settings and the base checkpoint are read from the hyperparameters.yaml the finetune run
    saved beside the weights; nothing is declared again. The response streams to stdout; tokens/s and peak
    memory go to stderr.

    Args:
        prompt: the instruction.
        input: optional context for the instruction (the Alpaca "Input" field).
        finetuned_dir: the output directory of the finetune run (holds the weights and hyperparameters.yaml).
        checkpoint_dir: the base checkpoint; default: the one the run was trained on.
        method: fail unless the directory holds this method's weights (generate/lora.py sets "lora", ...);
            default: whatever method hyperparameters.yaml names.
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
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    check_text(prompt, "--prompt")
    check_text(input, "--input")
    runtime = start_inference(precision, quantize, seed)
    model, hparams = load_finetuned(finetuned_dir, checkpoint_dir, runtime.device, runtime.dtype, runtime.quantize,
                                    method=method)
    model = runtime.fabric.setup_module(model)
    tokenizer = Tokenizer(checkpoint_dir or hparams.get("checkpoint_dir") or finetuned_dir)
    encoded = tokenizer.encode(alpaca_prompt(prompt, input)).to(runtime.device)
    tokens = generate(
        model, encoded, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_ids=tokenizer.stop_ids, compile=compile,
    )
    _, n_tokens, seconds = stream_text(tokenizer, tokens)
    sys.stdout.write("\n")
    print(
        f"{n_tokens} tokens in {seconds:.2f} s, {n_tokens / max(seconds, 1e-9):.2f} tokens/s; "
        f"peak memory {peak_memory(runtime.device)}",
        file=sys.stderr,
    )
