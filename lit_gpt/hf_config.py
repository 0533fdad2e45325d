"""Hugging Face `config.json` <-> `Config`, one small function per architecture.

`config_from_hf` reads the fields of a Hugging Face config (a dict, as stored in `config.json`) and
returns our `Config`; `hf_config_from_config` does the inverse for `scripts/convert_lit_checkpoint.py`.
Missing keys take the default of the matching `transformers` config class, so older and newer
`config.json` files read the same. RoPE settings are read from `rope_parameters` (transformers >= 5)
or from the older top-level keys (`rope_theta`, `rope_scaling`, `rotary_pct`, `partial_rotary_factor`).

Anything our model cannot reproduce exactly (ALiBi, Phi's qk-layernorm, linear/dynamic/YaRN RoPE
scaling, ...) is rejected with a ValueError rather than converted into a model that silently differs.
"""

from __future__ import annotations

from typing import Any, Callable

# HF activation names -> ours. "gelu_new"/"gelu_pytorch_tanh" are the tanh approximation.
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}


def _activation(hf: dict, key: str, default: str) -> str:
    name = hf.get(key) or default
    if name not in _ACTIVATIONS:
        raise ValueError(f"Activation {key}={name!r} is not supported; supported: {sorted(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]


def _rope(hf: dict, theta_key: str = "rope_theta", pct_keys: tuple[str, ...] = ("partial_rotary_factor",),
          default_pct: float = 1.0) -> dict[str, Any]:
    """rope_base, rotary_percentage and rope_scaling from either the new or the old key layout."""
    params = dict(hf.get("rope_parameters") or {})
    legacy_scaling = hf.get("rope_scaling")
    if legacy_scaling and params.get("rope_type", params.get("type", "default")) == "default":
        params.update(legacy_scaling)
    base = params.get("rope_theta", hf.get(theta_key, hf.get("rope_theta", 10000.0)))
    pct = params.get("partial_rotary_factor")
    if pct is None:
        pct = next((hf[k] for k in pct_keys if hf.get(k) is not None), default_pct)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        scaling = None
    elif rope_type == "llama3":
        scaling = {
            "factor": float(params["factor"]),
            "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]),
            "original_max_seq_len": int(
                params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
            ),
        }
    else:
        raise ValueError(
            f"RoPE type {rope_type!r} is not supported (only 'default' and 'llama3'); rope settings: {params}."
        )
    return dict(rope_base=float(base), rotary_percentage=float(pct), rope_scaling=scaling)


def _block_size(hf: dict, default: int) -> int:
    """max_position_embeddings, capped by a sliding window: our attention is exact up to the window size."""
    block_size = int(hf.get("max_position_embeddings") or default)
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", True)  # Mistral has no switch; Qwen2 does
    if window and uses_window and window < block_size:
        block_size = int(window)
    return block_size


def _common(hf: dict) -> dict[str, Any]:
    return dict(
        vocab_size=hf["vocab_size"],
        padded_vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"],
        n_head=hf["num_attention_heads"],
    )


# --- one function per architecture: HF config dict -> Config keyword arguments -------------------------
# https://huggingface.co/EleutherAI/pythia-160m/blob/main/config.json
def _gpt_neox(hf: dict) -> dict[str, Any]:
    if not hf.get("attention_bias", True):
        raise ValueError("GPT-NeoX with attention_bias=False is not supported (its MLP keeps biases).")
    return dict(
        **_common(hf),
        block_size=int(hf.get("max_position_embeddings", 2048)),
        intermediate_size=hf.get("intermediate_size") or 4 * hf["hidden_size"],
        **_rope(hf, theta_key="rotary_emb_base", pct_keys=("rotary_pct", "partial_rotary_factor"), default_pct=0.25),
        parallel_residual=hf.get("use_parallel_residual", True),
        norm_class="LayerNorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        mlp_class="MLP",
        activation=_activation(hf, "hidden_act", "gelu"),
        bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


# https://huggingface.co/tiiuae/falcon-7b/blob/main/config.json  (multi_query, one shared norm)
# https://huggingface.co/tiiuae/falcon-40b/blob/main/config.json (new_decoder_architecture, grouped kv heads)
def _falcon(hf: dict) -> dict[str, Any]:
    # Early Falcon configs ("RWForCausalLM") use other key names for the same fields.
    renamed = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_head_kv": "num_kv_heads",
               "n_embed": "hidden_size"}  # fmt: skip
    hf = {**{renamed[k]: v for k, v in hf.items() if k in renamed}, **hf}
    if hf.get("alibi", False):
        raise ValueError("Falcon with alibi=True is not supported: this model uses rotary position embeddings.")
    new_arch = hf.get("new_decoder_architecture", False)
    parallel = hf.get("parallel_attn", True)
    if new_arch and not parallel:
        raise ValueError("Falcon with new_decoder_architecture=True and parallel_attn=False is not supported.")
    n_head = hf["num_attention_heads"]
    if new_arch:
        groups = hf.get("num_kv_heads") or n_head
    else:
        groups = 1 if hf.get("multi_query", True) else n_head
    two_norms = new_arch and (hf.get("num_ln_in_parallel_attn") or 2) == 2
    return dict(
        **_common(hf),
        block_size=int(hf.get("max_position_embeddings", 2048)),
        n_query_groups=groups,
        intermediate_size=hf.get("ffn_hidden_size") or 4 * hf["hidden_size"],
        **_rope(hf),
        parallel_residual=parallel,
        shared_attention_norm=parallel and not two_norms,
        norm_class="LayerNorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp_class="MLP",
        activation=_activation(hf, "activation", "gelu"),
        bias=hf.get("bias", False),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _llama_like(hf: dict, default_max_pos: int = 2048) -> dict[str, Any]:
    """Llama, Mistral, Qwen2 and Gemma share this layout: RMSNorm, SwiGLU/GeGLU, separate q/k/v/o."""
    n_head = hf["num_attention_heads"]
    return dict(
        **_common(hf),
        block_size=_block_size(hf, default_max_pos),
        head_size=hf.get("head_dim") or hf["hidden_size"] // n_head,
        n_query_groups=hf.get("num_key_value_heads") or n_head,
        intermediate_size=hf["intermediate_size"],
        **_rope(hf),
        norm_class="RMSNorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp_class="GatedMLP",
        activation=_activation(hf, "hidden_act", "silu"),
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


# https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json
# https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json (llama3 rope scaling)
# https://huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json
def _llama(hf: dict) -> dict[str, Any]:
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if attention_bias != mlp_bias:
        raise ValueError(
            f"Llama with attention_bias={attention_bias} and mlp_bias={mlp_bias} is not supported: "
            "the attention output projection and the MLP share one `bias` setting here."
        )
    return dict(**_llama_like(hf), bias=attention_bias)


# https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json
def _mistral(hf: dict) -> dict[str, Any]:
    return dict(**_llama_like(hf, default_max_pos=4096 * 32), bias=False)


# https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json
def _qwen2(hf: dict) -> dict[str, Any]:
    return dict(**_llama_like(hf, default_max_pos=32768), bias=False, qkv_bias=True)


# https://huggingface.co/google/gemma-2b/blob/main/config.json
def _gemma(hf: dict) -> dict[str, Any]:
    hf = dict(hf)
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    hf["hidden_act"] = "gelu_pytorch_tanh" if act == "gelu" else act  # "gelu" in Gemma configs meant tanh
    if hf.get("attention_bias", False):
        raise ValueError("Gemma with attention_bias=True is not supported (its MLP has no biases).")
    kwargs = _llama_like(hf, default_max_pos=8192)
    kwargs["tie_embeddings"] = hf.get("tie_word_embeddings", True)
    return dict(**kwargs, bias=False, norm_plus_one=True, scale_embeddings=True)


# https://huggingface.co/microsoft/phi-2/blob/main/config.json
def _phi(hf: dict) -> dict[str, Any]:
    if hf.get("qk_layernorm", False):
        raise ValueError("Phi with qk_layernorm=True is not supported.")
    n_head = hf["num_attention_heads"]
    return dict(
        **_common(hf),
        block_size=int(hf.get("max_position_embeddings", 2048)),
        n_query_groups=hf.get("num_key_value_heads") or n_head,
        intermediate_size=hf["intermediate_size"],
        **_rope(hf, default_pct=0.5),
        parallel_residual=True,
        shared_attention_norm=True,
        norm_class="LayerNorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        mlp_class="MLP",
        activation=_activation(hf, "hidden_act", "gelu_new"),
        bias=True,
        lm_head_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


ARCHITECTURES: dict[str, Callable[[dict], dict[str, Any]]] = {
    "GPTNeoXForCausalLM": _gpt_neox,
    "FalconForCausalLM": _falcon,
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _mistral,
    "PhiForCausalLM": _phi,
    "GemmaForCausalLM": _gemma,
    "Qwen2ForCausalLM": _qwen2,
}
# Old Falcon checkpoints (remote code) name their architecture "RWForCausalLM".
_ALIASES = {"RWForCausalLM": "FalconForCausalLM"}
# When `architectures` is absent, `model_type` decides.
_MODEL_TYPES = {
    "gpt_neox": "GPTNeoXForCausalLM",
    "falcon": "FalconForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "phi": "PhiForCausalLM",
    "gemma": "GemmaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def hf_architecture(hf: dict) -> str:
    """The supported architecture named in `hf["architectures"]`, or a ValueError listing the supported ones."""
    names = hf.get("architectures") or []
    if not names and hf.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[hf["model_type"]]
    for name in names:
        name = _ALIASES.get(name, name)
        if name in ARCHITECTURES:
            return name
    raise ValueError(
        f"Unsupported architecture {names or hf.get('model_type')!r} in config.json. "
        f"Supported architectures: {', '.join(ARCHITECTURES)}."
    )


def config_from_hf(cls, hf: dict[str, Any], name: str = ""):
    """Build `cls` (our `Config`) from a Hugging Face config dict.

    `name` defaults to the last part of `hf["_name_or_path"]`; `hf_repo` is set when that looks like "org/name".
    Raises ValueError for an unsupported architecture or a setting this model cannot reproduce.
    """
    arch = hf_architecture(hf)
    try:
        kwargs = ARCHITECTURES[arch](hf)
    except KeyError as e:
        raise ValueError(f"The {arch} config lacks the required key {e.args[0]!r}.") from None
    name_or_path = str(hf.get("_name_or_path") or "")
    if not name and name_or_path:
        name = name_or_path.rstrip("/").split("/")[-1]
    is_repo_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    return cls(name=name, hf_repo=name_or_path if is_repo_id else "", **kwargs)


# --- the inverse: Config -> a config.json that transformers loads -------------------------------------------
def hf_architecture_for(config) -> str:
    """The HF architecture that computes exactly what our model computes for `config`."""
    c = config
    if c.norm_class == "LayerNorm" and c.mlp_class == "MLP":
        if c.lm_head_bias and c.parallel_residual and c.shared_attention_norm and c.bias and c.qkv_bias:
            return "PhiForCausalLM"
        neox_attention = c.n_query_groups == c.n_head and not c.shared_attention_norm
        if not c.lm_head_bias and c.bias and c.qkv_bias and neox_attention:
            return "GPTNeoXForCausalLM"
        if not c.lm_head_bias and c.bias == c.qkv_bias and c.rope_n_elem == c.head_size and (
            c.head_size * c.n_head == c.n_embd
        ):
            return "FalconForCausalLM"
    if c.norm_class == "RMSNorm" and c.mlp_class == "GatedMLP" and not c.lm_head_bias and not c.parallel_residual:
        if c.norm_plus_one and c.scale_embeddings and not c.bias and not c.qkv_bias:
            return "GemmaForCausalLM"
        if not c.norm_plus_one and not c.scale_embeddings:
            if c.bias == c.qkv_bias:
                return "LlamaForCausalLM"
            if c.qkv_bias and not c.bias:
                return "Qwen2ForCausalLM"
    raise ValueError(
        f"Config {c.name!r} has no equivalent Hugging Face architecture among {', '.join(ARCHITECTURES)}."
    )


_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}


def hf_config_from_config(config) -> dict[str, Any]:
    """A `config.json` dict for `config` that `transformers.AutoConfig` reads back to the same model.

    RoPE settings are written both as `rope_parameters` (transformers >= 5) and the older top-level keys.
    """
    c = config
    arch = hf_architecture_for(c)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_base}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        rope = {
            "rope_type": "llama3",
            "rope_theta": c.rope_base,
            "factor": s["factor"],
            "low_freq_factor": s["low_freq_factor"],
            "high_freq_factor": s["high_freq_factor"],
            "original_max_position_embeddings": s["original_max_seq_len"],
        }
    hf: dict[str, Any] = {
        "architectures": [arch],
        "vocab_size": c.padded_vocab_size,
        "hidden_size": c.n_embd,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "max_position_embeddings": c.block_size,
        "tie_word_embeddings": c.tie_embeddings,
        "rope_theta": c.rope_base,
    }
    if c.rotary_percentage != 1.0:
        rope["partial_rotary_factor"] = c.rotary_percentage
    if arch == "GPTNeoXForCausalLM":
        hf.update(
            model_type="gpt_neox",
            intermediate_size=c.intermediate_size,
            hidden_act=_HF_ACTIVATION[c.activation],
            layer_norm_eps=c.norm_eps,
            use_parallel_residual=c.parallel_residual,
            attention_bias=True,
            rotary_pct=c.rotary_percentage,
            rotary_emb_base=c.rope_base,
        )
        rope["partial_rotary_factor"] = c.rotary_percentage
    elif arch == "FalconForCausalLM":
        G, H = c.n_query_groups, c.n_head
        two_norms = c.parallel_residual and not c.shared_attention_norm
        new_arch = two_norms or 1 < G < H
        if new_arch and not c.parallel_residual:
            raise ValueError(f"Config {c.name!r}: Falcon cannot express sequential blocks with grouped kv heads.")
        hf.update(
            model_type="falcon",
            ffn_hidden_size=c.intermediate_size,
            activation=_HF_ACTIVATION[c.activation],
            layer_norm_epsilon=c.norm_eps,
            parallel_attn=c.parallel_residual,
            new_decoder_architecture=new_arch,
            multi_query=G == 1,
            num_kv_heads=G,
            num_ln_in_parallel_attn=(2 if two_norms else 1) if new_arch else None,
            bias=c.bias,
            alibi=False,
        )
    elif arch == "PhiForCausalLM":
        hf.update(
            model_type="phi",
            intermediate_size=c.intermediate_size,
            num_key_value_heads=c.n_query_groups,
            hidden_act=_HF_ACTIVATION[c.activation] if c.activation != "gelu_tanh" else "gelu_new",
            layer_norm_eps=c.norm_eps,
            partial_rotary_factor=c.rotary_percentage,
            qk_layernorm=False,
        )
        rope["partial_rotary_factor"] = c.rotary_percentage
    else:  # Llama, Gemma, Qwen2
        if c.rotary_percentage != 1.0:
            raise ValueError(f"Config {c.name!r}: {arch} rotates the whole head (rotary_percentage must be 1.0).")
        hf.update(
            model_type={"LlamaForCausalLM": "llama", "GemmaForCausalLM": "gemma", "Qwen2ForCausalLM": "qwen2"}[arch],
            intermediate_size=c.intermediate_size,
            num_key_value_heads=c.n_query_groups,
            head_dim=c.head_size,
            hidden_act=_HF_ACTIVATION[c.activation],
            rms_norm_eps=c.norm_eps,
        )
        if arch == "LlamaForCausalLM":
            hf.update(attention_bias=c.bias, mlp_bias=c.bias)
        elif arch == "GemmaForCausalLM":
            hf.update(attention_bias=False)
        else:
            hf.update(use_sliding_window=False, sliding_window=None)
        if c.rope_scaling is not None:
            hf["rope_scaling"] = dict(rope)
    hf["rope_parameters"] = rope
    return hf
