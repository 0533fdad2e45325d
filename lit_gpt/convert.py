"""Weight names: Hugging Face <-> ours, one table per layout, streamed tensor by tensor.

Each `names_<layout>(config)` below is the whole mapping for one layout: Hugging Face module path on the
left, ours on the right, "{i}" standing for the layer index. The `.weight` / `.bias` suffix passes through
unchanged. A tuple on the right marks a fused query/key/value projection (GPT-NeoX, Falcon) that is split
into our three projections on the way in and fused again on the way out.

Fused layout (`split_qkv`/`fuse_qkv`): the rows are G groups, each holding its H/G query heads, then one key
head, then one value head, every head D rows::

    [q0 .. q(H/G-1) k v] [q .. k v] ...      G groups of (H/G + 2) * D rows

GPT-NeoX (and Falcon with multi_query=False) is the case G = H: per head [q, k, v]. Falcon-7B
(multi_query) is G = 1: [all q heads, k, v]. Falcon-40B (new_decoder_architecture) is the general case.

Memory: tensors are read one at a time (`iter_hf_tensors`); the only tensors held back are the q, k and v
of one layer while fusing. Peak memory is about one copy of the model, the converted state dict.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from lit_gpt.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_EXTRA_FILES,
    TOKENIZER_FILES,
    WEIGHTS_FILE,
    CheckpointError,
    check_valid_checkpoint_dir,
    load_into_model,
    load_weights_file,
    save_safetensors,
)
from lit_gpt.config import Config
from lit_gpt.files import file_problem, read_json
from lit_gpt.hf_config import hf_architecture, hf_config_from_config
from lit_gpt.model import GPT

Names = dict[str, Union[str, tuple[str, str, str]]]


# --- one table per layout: HF module path -> ours ----------------------------------------------------------
def _qkv(i: str = "{i}") -> tuple[str, str, str]:
    return (f"blocks.{i}.attn.query", f"blocks.{i}.attn.key", f"blocks.{i}.attn.value")


def names_gpt_neox(config) -> Names:
    """Pythia, StableLM-alpha, RedPajama-INCITE (GPTNeoXForCausalLM)."""
    return {
        "gpt_neox.embed_in": "wte",
        "gpt_neox.layers.{i}.input_layernorm": "blocks.{i}.norm_1",
        "gpt_neox.layers.{i}.attention.query_key_value": _qkv(),
        "gpt_neox.layers.{i}.attention.dense": "blocks.{i}.attn.proj",
        "gpt_neox.layers.{i}.post_attention_layernorm": "blocks.{i}.norm_2",
        "gpt_neox.layers.{i}.mlp.dense_h_to_4h": "blocks.{i}.mlp.fc",
        "gpt_neox.layers.{i}.mlp.dense_4h_to_h": "blocks.{i}.mlp.proj",
        "gpt_neox.final_layer_norm": "ln_f",
        "embed_out": "lm_head",  # the name in checkpoint files, and the one written back
        "lm_head": "lm_head",  # transformers >= 5 calls the module lm_head (state_dict() of a live model)
    }


def names_falcon(config) -> Names:
    """Falcon (FalconForCausalLM). The norms depend on the block layout."""
    if config.shared_attention_norm:  # Falcon-7B: one norm feeds attention and MLP
        norms = {"transformer.h.{i}.input_layernorm": "blocks.{i}.norm_1"}
    elif config.parallel_residual:  # Falcon-40B/180B (new_decoder_architecture): one norm per branch
        norms = {"transformer.h.{i}.ln_attn": "blocks.{i}.norm_1", "transformer.h.{i}.ln_mlp": "blocks.{i}.norm_2"}
    else:  # parallel_attn=False: sequential block
        norms = {
            "transformer.h.{i}.input_layernorm": "blocks.{i}.norm_1",
            "transformer.h.{i}.post_attention_layernorm": "blocks.{i}.norm_2",
        }
    return {
        "transformer.word_embeddings": "wte",
        **norms,
        "transformer.h.{i}.self_attention.query_key_value": _qkv(),
        "transformer.h.{i}.self_attention.dense": "blocks.{i}.attn.proj",
        "transformer.h.{i}.mlp.dense_h_to_4h": "blocks.{i}.mlp.fc",
        "transformer.h.{i}.mlp.dense_4h_to_h": "blocks.{i}.mlp.proj",
        "transformer.ln_f": "ln_f",
        "lm_head": "lm_head",
    }


def names_llama(config) -> Names:
    """Llama 2/3, SmolLM2, Mistral, Qwen2/2.5 and Gemma share these names."""
    return {
        "model.embed_tokens": "wte",
        "model.layers.{i}.input_layernorm": "blocks.{i}.norm_1",
        "model.layers.{i}.self_attn.q_proj": "blocks.{i}.attn.query",
        "model.layers.{i}.self_attn.k_proj": "blocks.{i}.attn.key",
        "model.layers.{i}.self_attn.v_proj": "blocks.{i}.attn.value",
        "model.layers.{i}.self_attn.o_proj": "blocks.{i}.attn.proj",
        "model.layers.{i}.post_attention_layernorm": "blocks.{i}.norm_2",
        "model.layers.{i}.mlp.gate_proj": "blocks.{i}.mlp.fc_1",
        "model.layers.{i}.mlp.up_proj": "blocks.{i}.mlp.fc_2",
        "model.layers.{i}.mlp.down_proj": "blocks.{i}.mlp.proj",
        "model.norm": "ln_f",
        "lm_head": "lm_head",
    }


def names_phi(config) -> Names:
    """Phi-1.5 / Phi-2 (PhiForCausalLM): one shared norm per block, lm_head with a bias."""
    return {
        "model.embed_tokens": "wte",
        "model.layers.{i}.input_layernorm": "blocks.{i}.norm_1",
        "model.layers.{i}.self_attn.q_proj": "blocks.{i}.attn.query",
        "model.layers.{i}.self_attn.k_proj": "blocks.{i}.attn.key",
        "model.layers.{i}.self_attn.v_proj": "blocks.{i}.attn.value",
        "model.layers.{i}.self_attn.dense": "blocks.{i}.attn.proj",
        "model.layers.{i}.mlp.fc1": "blocks.{i}.mlp.fc",
        "model.layers.{i}.mlp.fc2": "blocks.{i}.mlp.proj",
        "model.final_layernorm": "ln_f",
        "lm_head": "lm_head",
    }


LAYOUTS = {
    "GPTNeoXForCausalLM": names_gpt_neox,
    "FalconForCausalLM": names_falcon,
    "LlamaForCausalLM": names_llama,
    "MistralForCausalLM": names_llama,
    "Qwen2ForCausalLM": names_llama,
    "GemmaForCausalLM": names_llama,
    "PhiForCausalLM": names_phi,
}

# Buffers some HF checkpoints carry that are recomputed, never converted.
_IGNORED_HF = re.compile(r".*(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")


# --- fused qkv -------------------------------------------------------------------------------------------
def split_qkv(fused: torch.Tensor, n_head: int, n_groups: int, head_size: int):
    """Fused rows (G * (H/G + 2) * D, ...) -> q (H*D, ...), k (G*D, ...), v (G*D, ...). Works for weights and biases."""
    per_group, rest = n_head // n_groups, fused.shape[1:]
    expected = n_groups * (per_group + 2) * head_size
    if fused.size(0) != expected:
        raise CheckpointError(
            f"Fused qkv tensor has {fused.size(0)} rows; the config (n_head={n_head}, n_query_groups={n_groups}, "
            f"head_size={head_size}) needs {expected}."
        )
    x = fused.reshape(n_groups, per_group + 2, head_size, *rest)
    q = x[:, :per_group].reshape(n_head * head_size, *rest)
    k = x[:, per_group].reshape(n_groups * head_size, *rest)
    v = x[:, per_group + 1].reshape(n_groups * head_size, *rest)
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_head: int, n_groups: int, head_size: int):
    """The inverse of `split_qkv`."""
    per_group, rest = n_head // n_groups, q.shape[1:]
    parts = (
        q.reshape(n_groups, per_group, head_size, *rest),
        k.reshape(n_groups, 1, head_size, *rest),
        v.reshape(n_groups, 1, head_size, *rest),
    )
    return torch.cat(parts, dim=1).reshape(-1, *rest)


# --- name matching ---------------------------------------------------------------------------------------
def _compile(names: Names) -> list[tuple[re.Pattern, Union[str, tuple]]]:
    return [(re.compile(re.escape(k).replace(r"\{i\}", r"(?P<i>\d+)") + r"\.(?P<suffix>weight|bias)"), v)
            for k, v in names.items()]  # fmt: skip


def _fill(template: str, i: Optional[str]) -> str:
    return template.replace("{i}", i) if i is not None else template


def hf_to_lit(
    arch: str, config, tensors: Iterable[tuple[str, torch.Tensor]], dtype: Optional[torch.dtype] = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename (and split) a stream of HF (name, tensor) pairs into ours. Unknown names raise CheckpointError."""
    table = _compile(LAYOUTS[arch](config))
    for name, tensor in tensors:
        if _IGNORED_HF.match(name):
            continue
        for pattern, target in table:
            m = pattern.fullmatch(name)
            if m:
                break
        else:
            raise CheckpointError(f"Tensor {name!r} is not a known {arch} weight name (see lit_gpt/convert.py).")
        i, suffix = m.groupdict().get("i"), m["suffix"]
        if dtype is not None:
            tensor = tensor.to(dtype)
        if isinstance(target, tuple):
            parts = split_qkv(tensor, config.n_head, config.n_query_groups, config.head_size)
            for t, part in zip(target, parts):
                yield f"{_fill(t, i)}.{suffix}", part
        elif target == "lm_head" and config.tie_embeddings:
            continue  # the same tensor as the embedding (tied); some checkpoints store it anyway
        else:
            yield f"{_fill(target, i)}.{suffix}", tensor


def lit_to_hf(
    arch: str, config, tensors: Iterable[tuple[str, torch.Tensor]], dtype: Optional[torch.dtype] = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename our (name, tensor) pairs to HF names; q/k/v of one layer are held until they can be fused.

    Where two HF names map to one of ours, the first in the table is written.
    """
    inverse: list[tuple[re.Pattern, str, Optional[int]]] = []  # our pattern, HF template, position in fused qkv
    for hf_name, ours in LAYOUTS[arch](config).items():
        for pos, t in enumerate(ours) if isinstance(ours, tuple) else [(None, ours)]:
            pattern = re.compile(re.escape(t).replace(r"\{i\}", r"(?P<i>\d+)") + r"\.(?P<suffix>weight|bias)")
            inverse.append((pattern, hf_name, pos))
    pending: dict[str, list] = {}  # HF fused name -> [q, k, v]
    for name, tensor in tensors:
        for pattern, hf_template, pos in inverse:
            m = pattern.fullmatch(name)
            if m:
                break
        else:
            raise CheckpointError(f"Tensor {name!r} has no {arch} equivalent (see lit_gpt/convert.py).")
        if dtype is not None:
            tensor = tensor.to(dtype)
        hf_name = f"{_fill(hf_template, m.groupdict().get('i'))}.{m['suffix']}"
        if pos is None:
            yield hf_name, tensor
            continue
        parts = pending.setdefault(hf_name, [None, None, None])
        parts[pos] = tensor
        if all(p is not None for p in parts):
            del pending[hf_name]
            yield hf_name, fuse_qkv(*parts, config.n_head, config.n_query_groups, config.head_size)
    if pending:
        raise CheckpointError(f"Incomplete query/key/value for {sorted(pending)}: the checkpoint is missing tensors.")


# --- reading HF checkpoint files ---------------------------------------------------------------------------
# A Hugging Face file that cannot be read came from an interrupted or corrupted download.
HF_REMEDY = "Download the model's files again (scripts/download.py, or the hub's own tools)."
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_weight_files(checkpoint_dir: Path) -> list[Path]:
    """The weight files of a HF checkpoint directory: the shards named by an index file, or the single file.

    Safetensors are preferred when both formats are present. Raises CheckpointError when none are found or
    a shard named by the index is missing.
    """
    checkpoint_dir = Path(checkpoint_dir)
    for index_name in _INDEX_FILES:
        index = checkpoint_dir / index_name
        if index.is_file():
            weight_map = read_json(index, HF_REMEDY).get("weight_map")
            if not isinstance(weight_map, dict):
                raise file_problem(index, "has no weight_map (which shard holds which tensor)", HF_REMEDY)
            files = [checkpoint_dir / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(
                    f"{str(index)!r} names shards that are not in {str(checkpoint_dir)!r}: {missing}. "
                    "Download them again."
                )
            return files
    for single in _SINGLE_FILES:
        if (checkpoint_dir / single).is_file():
            return [checkpoint_dir / single]
    present = sorted(p.name for p in checkpoint_dir.iterdir())
    raise CheckpointError(
        f"No Hugging Face weights in {str(checkpoint_dir)!r}: expected one of {list(_INDEX_FILES + _SINGLE_FILES)}. "
        f"It contains: {present or 'nothing'}. Download them with "
        "`python scripts/download.py --repo_id <org/name>`."
    )


def iter_hf_tensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from each file in turn: safetensors one tensor at a time, `.bin` memory-mapped.

    `.bin` files are read with `torch.load(weights_only=True)`: pickles holding anything but tensors are
    rejected with a CheckpointError, as are truncated or corrupt files (the message names the file).
    """
    for path in files:
        if path.suffix == ".safetensors":
            try:
                handle = safe_open(str(path), framework="pt")
                keys = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(
                    f"Cannot read weights file {str(path)!r} ({e}). "
                    "The file is truncated or corrupt: download it again."
                ) from None
            for key in keys:
                yield key, handle.get_tensor(key)
            del handle
        else:
            state_dict = load_weights_file(path)
            if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
                raise CheckpointError(f"{str(path)!r} is not a dict of tensors; refusing to convert it.")
            for key in list(state_dict):
                yield key, state_dict.pop(key)


# --- whole directories (used by scripts/convert_hf_checkpoint.py and scripts/convert_lit_checkpoint.py) -------
def convert_hf_checkpoint(checkpoint_dir: Path, dtype: Optional[torch.dtype] = None) -> Config:
    """Convert the HF checkpoint in `checkpoint_dir` in place; returns the Config written beside the weights.

    Reads config.json and the HF weights, writes `model_config.yaml` and `lit_model.safetensors`. Names and
    shapes are checked against the model the config describes before anything is written. `dtype` casts
    the weights; by default they keep the checkpoint's dtype.
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
    hf = read_json(hf_config_path, HF_REMEDY)
    name_or_path = str(hf.get("_name_or_path") or "").rstrip("/")  # a display name only
    try:
        arch = hf_architecture(hf)
        config = Config.from_hf_config(hf, name=name_or_path.split("/")[-1] or checkpoint_dir.resolve().name)
    except ValueError as e:
        raise file_problem(hf_config_path, f"does not describe a model this project can build: {e}",
                           HF_REMEDY) from None
    files = hf_weight_files(checkpoint_dir)

    state_dict = dict(hf_to_lit(arch, config, iter_hf_tensors(files), dtype=dtype))
    with torch.device("meta"):
        model = GPT(dataclasses.replace(config, block_size=1))  # block_size only sizes the RoPE cache
    load_into_model(model, state_dict, source=", ".join(str(f) for f in files))
    del model

    save_safetensors(state_dict, checkpoint_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    config.to_file(checkpoint_dir / CONFIG_FILE)
    return config


def convert_lit_checkpoint(checkpoint_dir: Path, output_dir: Path, dtype: Optional[torch.dtype] = None) -> Path:
    """Write a Hugging Face copy of our checkpoint directory: config.json, model.safetensors, tokenizer files.

    When `checkpoint_dir` still holds the config.json it was converted from and that describes the same
    model, it is reused (architecture name, token ids and other HF-only fields kept); otherwise the config
    is derived from model_config.yaml (`hf_config_from_config`). Returns `output_dir`.
    """
    checkpoint_dir = check_valid_checkpoint_dir(checkpoint_dir, need_tokenizer=False)
    output_dir = Path(output_dir)
    config = Config.from_file(checkpoint_dir / CONFIG_FILE)
    hf = _original_hf_config(checkpoint_dir, config) or hf_config_from_config(config)
    arch = hf_architecture(hf)

    weights = checkpoint_dir / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt") as f:
            ours = ((k, f.get_tensor(k)) for k in f.keys())
            state_dict = dict(lit_to_hf(arch, config, ours, dtype=dtype))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"Cannot read weights file {str(weights)!r} ({e}): convert it again.") from None
    hf["torch_dtype"] = hf["dtype"] = str(next(iter(state_dict.values())).dtype).removeprefix("torch.")

    output_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(state_dict, output_dir / "model.safetensors", metadata={"format": "pt"})
    (output_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for name in TOKENIZER_FILES + TOKENIZER_EXTRA_FILES:
        src = checkpoint_dir / name
        if src.is_file() and src.resolve() != (output_dir / name).resolve():
            shutil.copy2(src, output_dir / name)
    return output_dir


def _original_hf_config(checkpoint_dir: Path, config: Config) -> Optional[dict]:
    """The config.json in `checkpoint_dir`, if there is one and it describes `config` (names aside)."""
    path = checkpoint_dir / "config.json"
    if not path.is_file():
        return None
    try:
        hf = json.loads(path.read_text())
        original = Config.from_hf_config(hf)
    except (ValueError, KeyError):
        return None
    original.name, original.hf_repo = config.name, config.hf_repo
    return hf if original == config else None
