"""The one GPT model. Read it top to bottom: token ids -> embedding -> blocks -> norm -> logits.

Every supported family (Pythia, Falcon, Llama, Mistral, Phi, Gemma, Qwen, SmolLM2, ...) is this code
with different `Config` values; there are no per-family subclasses.

Shapes: B = batch, T = sequence length, C = n_embd, H = n_head, G = n_query_groups (key/value heads),
D = head_size, V = padded vocabulary size.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from lit_gpt.config import Config

IGNORE_INDEX = -100  # targets with this value carry no loss (prompt tokens, padding)


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = Linear(config.n_embd, config.padded_vocab_size, bias=config.lm_head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.max_seq_length = config.block_size  # rebuilds the RoPE cache
        self.activation_checkpointing = False  # TrainArgs.activation_checkpointing turns it on

    # ------------------------------------------------------------------------------------------------
    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        """Longest sequence this model instance will see (<= block_size). Sizes the RoPE and KV caches."""
        if value > self.config.block_size:
            raise ValueError(
                f"Cannot attend to {value} positions: {self.config.name} has block_size {self.config.block_size}."
            )
        self._max_seq_length = value
        device = self.wte.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        cos, sin = rope_cache(self.config, value, device=device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
        targets: Optional[torch.Tensor] = None,
        pad_lengths: Optional[torch.Tensor] = None,
        last_only: bool = False,
        positions: Optional[torch.Tensor] = None,
        shared_prefix: int = 0,
    ) -> torch.Tensor:
        """Run the model.

        Args:
            idx: token ids, (B, T).
            input_pos: KV-cache slots of these tokens, (T,) — also their positions unless `pad_lengths` is given.
                Give it only for KV-cached generation (after `set_kv_cache`); without it the tokens are
                positions 0..T-1 with causal attention.
            targets: next-token ids, (B, T), `IGNORE_INDEX` where no loss is wanted. When given, returns
                the mean cross-entropy over the positions that carry loss, and the LM head runs only there.
            pad_lengths: for a left-padded batch in KV-cached generation, (B,): row b's first pad_lengths[b]
                slots are padding. Its tokens then sit at positions input_pos - pad_lengths[b], and no token
                attends to padding, so each row computes what it would alone.
            last_only: return only the last position's logits, (B, 1, V): all a generation prefill needs.
            positions: for packed training rows, (B, T): several samples back to back, each starting again at
                position 0. A token then attends only to earlier tokens of its own sample.
            shared_prefix: with `targets`: every row begins with the same `shared_prefix` tokens (an instruction
                template), none of which carries loss. They are computed once instead of B times (see
                `SharedPrefix`); the loss is the same.

        Returns:
            logits (B, T, V), or the scalar loss when `targets` is given.
        """
        T = idx.size(1)
        if input_pos is None:
            if T > self.max_seq_length:
                raise ValueError(
                    f"Cannot forward a sequence of length {T}: max_seq_length is {self.max_seq_length} "
                    f"(block_size {self.config.block_size})."
                )
            if shared_prefix:
                if targets is None or positions is not None:
                    raise ValueError("shared_prefix needs targets (a training loss) and no packed positions.")
                layout = SharedPrefix(shared_prefix, rows=idx.size(0), row_length=T, device=idx.device)
                idx, targets = layout.flatten(idx), layout.flatten(targets)  # (1, N)
                cos, sin, mask = self.cos[layout.positions], self.sin[layout.positions], layout  # (N, n)
            elif positions is None:
                cos, sin, mask = self.cos[:T], self.sin[:T], None  # mask None = causal
            else:
                cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # (B, 1, T, n)
                mask = packed_causal_mask(positions)
        elif pad_lengths is None:
            cos, sin = self.cos[input_pos], self.sin[input_pos]  # (T, n)
            mask = self.blocks[0].attn.kv_cache.causal_mask(input_pos)
        else:
            positions = (input_pos[None, :] - pad_lengths[:, None]).clamp(min=0)  # (B, T)
            cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # (B, 1, T, n)
            mask = self.blocks[0].attn.kv_cache.causal_mask(input_pos, pad_lengths)

        x = self.wte(idx)  # (B, T, C)
        if self.config.scale_embeddings:
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Keep only each block's input; recompute its activations during backward (less memory, ~30% slower).
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, input_pos)
        x = self.ln_f(x)

        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x)  # (B, T, V)
        return supervised_cross_entropy(self.lm_head, x, targets)

    # --- KV cache for generation --------------------------------------------------------------------
    def set_kv_cache(
        self, batch_size: int, max_seq_length: Optional[int] = None, device=None, dtype=None
    ) -> None:
        """Preallocate a KV cache of `max_seq_length` positions in every block (shrinks the RoPE cache too)."""
        if max_seq_length is not None:
            self.max_seq_length = max_seq_length
        device = device or self.wte.weight.device
        dtype = dtype or self.wte.weight.dtype
        for block in self.blocks:
            block.attn.kv_cache = KVCache(
                batch_size, self.config.n_query_groups, self.max_seq_length, self.config.head_size, device, dtype
            )

    def clear_kv_cache(self) -> None:
        """Drop every inference cache (KV caches and any PEFT prefix caches) so training sees none."""
        for module in self.modules():
            if hasattr(module, "clear_cache"):
                module.clear_cache()


class Block(nn.Module):
    """One transformer layer: attention and MLP, sequential or parallel (`config.parallel_residual`)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = None if config.shared_attention_norm else make_norm(config)
        self.mlp = (GatedMLP if config.mlp_class == "GatedMLP" else MLP)(config)

    def forward(self, x, cos, sin, mask, input_pos):
        """x: (B, T, C) -> (B, T, C)."""
        h = self.norm_1(x)
        attn_out = self.attn(h, cos, sin, mask, input_pos)
        if self.config.parallel_residual:
            # Pythia, Falcon, Phi-2: both branches read the block input; Falcon-7B and Phi-2 share one norm.
            mlp_in = h if self.norm_2 is None else self.norm_2(x)
            return x + attn_out + self.mlp(mlp_in)
        x = x + attn_out
        return x + self.mlp(self.norm_2(x))


class CausalSelfAttention(nn.Module):
    """Multi-head attention with separate query/key/value projections.

    Grouped-query attention: G key/value heads, each shared by H // G query heads
    (G = H: multi-head, G = 1: multi-query)::

        query heads  q0 q1 q2 q3 q4 q5 q6 q7      H = 8
                     |__|  |__|  |__|  |__|
        kv heads      k0    k1    k2    k3        G = 4
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        C, H, G, D = config.n_embd, config.n_head, config.n_query_groups, config.head_size
        self.query = Linear(C, H * D, bias=config.qkv_bias)
        self.key = Linear(C, G * D, bias=config.qkv_bias)
        self.value = Linear(C, G * D, bias=config.qkv_bias)
        self.proj = Linear(H * D, C, bias=config.bias)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, mask, input_pos):
        """x: (B, T, C) -> (B, T, C)."""
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x, cos, sin)  # (B, H, T, D), (B, G, T, D), (B, G, T, D)
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos was given but there is no KV cache: call model.set_kv_cache() first.")
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, G, max_seq_length, D)
        y = self.attend(q, k, v, mask)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))

    def project_qkv(self, x, cos, sin):
        """Project x (B, T, C) to per-head queries (B, H, T, D), keys and values (B, G, T, D), with RoPE applied."""
        B, T, _ = x.shape
        D = self.config.head_size
        q, k, v = (y.view(B, T, -1, D).transpose(1, 2) for y in linears(x, self.query, self.key, self.value))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask) -> torch.Tensor:
        """Scaled dot-product attention. Returns (B, H, T, D).

        `mask`: None means causal over T; a boolean tensor, True where a query may attend to a key; a float
        tensor added to the scores (0 or -inf, as `KVCache.causal_mask` makes); or a `SharedPrefix` layout,
        which splits the attention by rows.
        """
        if isinstance(mask, SharedPrefix):
            return mask.attend(q, k, v, self.scaled_dot_product)
        return self.scaled_dot_product(q, k, v, mask)

    def scaled_dot_product(self, q, k, v, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """softmax(q k^T / sqrt(D)) v over (B, H, T, D) queries and (B, G, S, D) keys/values; None = causal."""
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            scale=1.0 / math.sqrt(self.config.head_size),
            enable_gqa=k.size(1) != q.size(1),
        )

    def clear_cache(self) -> None:
        self.kv_cache = None


class MLP(nn.Module):
    """fc -> activation -> proj (GPT-NeoX, Falcon, Phi-2)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc = Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.act = make_activation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class GatedMLP(nn.Module):
    """proj(act(fc_1 x) * fc_2 x): SwiGLU with silu (Llama, Mistral, Qwen), GeGLU with gelu_tanh (Gemma)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc_1 = Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.fc_2 = Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.act = make_activation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linears(x, self.fc_1, self.fc_2)
        return self.proj(self.act(gate) * up)


class Linear(nn.Linear):
    """nn.Linear, computed by `linear` (faster few-row products on CPU). Same parameters, same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias), x (..., in) -> (..., out), with few-row products on CPU split over the threads.

    A decoding step multiplies a handful of rows by every weight. For such shapes the CPU BLAS runs on one
    core, which streams the weight at a single core's memory bandwidth (15 of 34 GB/s on our 2-core machine).
    Cutting the weight's rows into one block per thread and calling bmm streams it on all cores, with the
    same result: SmolLM2-135M decoded 24-27 instead of ~20 tokens/s at batch 1. Inside `torch.compile` the
    split is traced too (the compiler's own products stream on one core: ~24 instead of ~38 tokens/s).
    """
    threads, C = cpu_threads(), x.size(-1)
    rows, out_features = x.numel() // C, weight.size(0)
    if (not x.is_cpu or threads == 1 or rows > 64 or out_features < 512 or out_features % threads
            or not weight.is_contiguous()):
        return F.linear(x, weight, bias)
    blocks = thread_blocks(weight, threads)  # (threads, in, out / threads)
    if rows == 1 and x.dim() == 3:  # batch-1 decoding, x (1, 1, C): the blocks already lie in output order
        y = torch.bmm(x.expand(threads, 1, C), blocks).view(1, 1, out_features)
    else:
        y = torch.bmm(x.reshape(1, rows, C).expand(threads, rows, C), blocks)  # (threads, rows, out / threads)
        y = y.transpose(0, 1).reshape(*x.shape[:-1], out_features)
    return y if bias is None else y + bias


# id(weight) -> (weak reference to the weight, its (threads, in, out / threads) blocks) for `linear`.
# A plain dict keyed by id is looked up ~120 times per decoded token: cheaper than a WeakTensorKeyDictionary.
_THREAD_BLOCKS: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def thread_blocks(weight: torch.Tensor, threads: int) -> torch.Tensor:
    """`weight` (out, in) cut into `threads` blocks of rows, each transposed: (threads, in, out / threads).

    A view, no copy. For a weight that takes no gradient here it is made once and reused while the weight
    keeps its storage: decoding one token runs ~120 linear layers, and the views and reshapes around each
    small product add up (reusing them: +2% tokens/s at batch 1 on SmolLM2-135M, 24 A/B pairs; looking
    them up by id rather than in a WeakTensorKeyDictionary: another 0.6 ms of a ~38 ms token).
    """
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and weight.requires_grad):
        return weight.view(threads, -1, weight.size(1)).transpose(1, 2)  # traced, or differentiated: no cache
    key = id(weight)
    entry = _THREAD_BLOCKS.get(key)
    if entry is not None:
        weight_ref, blocks = entry
        if weight_ref() is weight and blocks.size(0) == threads and blocks.data_ptr() == weight.data_ptr():
            return blocks
    # From a detached alias: the cached view must not hold the weight itself, or it would never be freed.
    # The entry goes when the weight does (the weak reference's callback).
    blocks = weight.detach().view(threads, -1, weight.size(1)).transpose(1, 2)
    _THREAD_BLOCKS[key] = (weakref.ref(weight, lambda _, key=key: _THREAD_BLOCKS.pop(key, None)), blocks)
    return blocks


@torch.compiler.assume_constant_result
def cpu_threads() -> int:
    """torch.get_num_threads(), read once per compiled graph (where calling it directly would break the graph)."""
    return torch.get_num_threads()


def linears(x: torch.Tensor, *layers: nn.Module) -> tuple[torch.Tensor, ...]:
    """(layer(x) for layer in layers): several linear layers that read the same x, e.g. query, key and value.

    When `pack_linears` has stored their weights back to back in one buffer (the generation loaders do),
    the layers are computed as one product over that buffer and split: at decoding's few rows one large
    product streams the weights faster than three small ones (SmolLM2-135M: +3-7% tokens/s at batch 1).
    In every other case -- PEFT-wrapped or quantized layers, weights that need gradients, a compiled graph,
    or weights that were replaced, moved or cast after packing -- each layer runs on its own.
    """
    packed = None if torch.compiler.is_compiling() else packed_weight(layers)
    if packed is None:
        return tuple(layer(x) for layer in layers)
    weight, bias = packed
    return linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)


# first layer of a packed group -> ((weight, bias) data pointers per layer, the buffers they view: weight, bias or None)
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def pack_linears(*layers: nn.Module) -> None:
    """Copy the weights (and biases) of plain `Linear` layers with one input size into one buffer each, in
    order, and make every layer's parameters views of it, so that `linears` computes them in one product.

    Meant for a model that is only run, not trained (see `pack_weights`): the parameters stay separate
    tensors with their own names. A group with any other layer (LoRA, adapter, quantized) is left as it is.
    """
    if len(layers) < 2 or not all(type(layer) is Linear for layer in layers):
        return
    weights = [layer.weight for layer in layers]
    if len({(w.size(1), w.dtype, w.device) for w in weights}) != 1 or weights[0].is_meta:
        return
    has_bias = [layer.bias is not None for layer in layers]
    if any(has_bias) and not all(has_bias):
        return
    buffers = {}
    for name in ("weight", "bias") if all(has_bias) else ("weight",):
        params = [getattr(layer, name) for layer in layers]
        buffers[name] = torch.cat([p.detach() for p in params])  # (sum of out_features, in_features) or (sum,)
        start = 0
        for layer, p in zip(layers, params):
            view = buffers[name][start : start + p.size(0)]
            setattr(layer, name, nn.Parameter(view, requires_grad=p.requires_grad))
            start += p.size(0)
    pointers = tuple((layer.weight.data_ptr(), layer.bias is not None and layer.bias.data_ptr()) for layer in layers)
    _PACKED[layers[0]] = (pointers, buffers["weight"], buffers.get("bias"))


def packed_weight(layers) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The (weight, bias) buffers `pack_linears` made for `layers`, if they still hold the layers' parameters."""
    entry = _PACKED.get(layers[0])
    if entry is None:
        return None
    pointers, weight, bias = entry
    grad_enabled = torch.is_grad_enabled()
    for layer, (weight_pointer, bias_pointer) in zip(layers, pointers):
        if type(layer) is not Linear:
            return None  # wrapped by a PEFT method since packing: it must run its own forward
        # Read from _parameters, not as layer.weight: this runs twice per layer and decoded token, and
        # Module.__getattr__ is slow (0.3 ms of a ~38 ms SmolLM2-135M token, A/B).
        w, b = layer._parameters["weight"], layer._parameters["bias"]
        if w.data_ptr() != weight_pointer or (b is not None and b.data_ptr()) != bias_pointer:
            return None  # replaced, moved or cast since packing
        if grad_enabled and w.requires_grad:
            return None  # the product over the shared buffer would not route gradients to this parameter
    return weight, bias


def pack_weights(model: GPT) -> GPT:
    """Pack each block's query/key/value and gated-MLP fc_1/fc_2 weights for one-product inference
    (`pack_linears`). Same parameters, same state dict, same outputs; layers that are not plain `Linear` are
    skipped. Returns `model`."""
    for block in model.blocks:
        pack_linears(block.attn.query, block.attn.key, block.attn.value)
        if isinstance(block.mlp, GatedMLP):
            pack_linears(block.mlp.fc_1, block.mlp.fc_2)
    return model


def make_activation(config: Config) -> nn.Module:
    return {
        "gelu": lambda: nn.GELU(),
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "silu": lambda: nn.SiLU(),
    }[config.activation]()


# --- normalisation --------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32. Gemma scales by (1 + weight) instead (`plus_one`)."""

    def __init__(self, size: int, eps: float, plus_one: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size) if plus_one else torch.ones(size))
        self.eps = eps
        self.plus_one = plus_one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plus_one:
            weight = 1.0 + self.weight.float()
            return F.rms_norm(x.float(), (x.size(-1),), weight, self.eps).to(x.dtype)
        if x.dtype == torch.float32:
            if x.is_cpu and torch.is_grad_enabled() and not torch.compiler.is_compiling():
                return RMSNormFunction.apply(x, self.weight, self.eps)  # training on the CPU: faster backward
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        # Low precision: normalise in float32, round, then scale (the Llama reference's order of rounding).
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), None, self.eps).to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """F.rms_norm(x, (C,), weight, eps) with a hand-written backward, for float32 training on the CPU.

    On the CPU, PyTorch differentiates rms_norm through its decomposition (pow, mean, add, rsqrt, two
    products) and runs the backward of each: about 15 passes over x. The gradient in closed form takes four.
    On SmolLM2-135M's (4, 160, 576) activations the norm's forward and backward took 0.6-0.8 instead of
    2.0-2.4 ms; a model has 2 norms per layer plus the final one. (On CUDA, PyTorch has a fused backward.)
    Shapes: x (..., C), weight (C,) -> (..., C).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return F.rms_norm(x, (x.size(-1),), weight, eps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        C = x.size(-1)
        # r = 1 / sqrt(mean(x^2) + eps), (..., 1): recomputed rather than kept (one pass over x).
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(C).add_(ctx.eps).rsqrt_()
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * x).mul_(r).sum(dim=tuple(range(x.dim() - 1)))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_n = grad * weight  # gradient with respect to the normalised x·r
            # d(x·r)/dx applied to grad_n: r·grad_n - x·r^3·mean(grad_n·x)
            coeff = torch.linalg.vecdot(grad_n, x).unsqueeze(-1).mul_(r.pow(3)).div_(-C)
            grad_x = grad_n.mul_(r).addcmul_(x, coeff)
        return grad_x, grad_weight, None


def make_norm(config: Config) -> nn.Module:
    if config.norm_class == "RMSNorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps, plus_one=config.norm_plus_one)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


# --- rotary position embedding ----------------------------------------------------------------------------
def rope_cache(config: Config, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (seq_len, n) with n = config.rope_n_elem, in float32.

    Uses the "rotate half" layout: channel i pairs with channel i + n/2. The sin table carries the rotation's
    sign (negated in its first half), so that `apply_rope` is x * cos + roll(x, n/2) * sin: three
    elementwise operations and a roll, which runs 2.5x faster forward and backward than splitting, negating
    and concatenating halves (and cuts a decoding step's operator count).
    """
    n = config.rope_n_elem
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, n, 2, dtype=torch.int64, device=device).float() / n))
    if config.rope_scaling is not None:
        inv_freq = llama3_scaled_inv_freq(inv_freq, config.rope_scaling)
    positions = torch.arange(seq_len, device=device, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq)  # (seq_len, n/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (seq_len, n)
    sign = torch.cat((-torch.ones(n // 2, device=device), torch.ones(n // 2, device=device)))
    return angles.cos(), angles.sin() * sign


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 long-context RoPE: slow down low frequencies by `factor`, interpolate the middle band."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_seq_len"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first n channels of every head. x: (B, heads, T, D); cos, sin: (T, n) or (B, 1, T, n), n <= D.

    Channel i < n/2 becomes x_i cos - x_{i+n/2} sin, channel i + n/2 becomes x_{i+n/2} cos + x_i sin; the
    minus sign lives in the `sin` table (see `rope_cache`), and roll swaps the two halves.
    """
    n = cos.size(-1)
    if n == x.size(-1):
        roped = x * cos + torch.roll(x, n // 2, dims=-1) * sin
        return roped if roped.dtype == x.dtype else roped.to(x.dtype)  # float32 tables: back to a 16-bit x's dtype
    rot, passthrough = x[..., :n], x[..., n:]
    roped = (rot * cos + torch.roll(rot, n // 2, dims=-1) * sin).to(x.dtype)
    return torch.cat((roped, passthrough), dim=-1)


def packed_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T) for packed rows: causal, and only within a sample (a sample starts at position 0)."""
    sample = (positions == 0).cumsum(dim=-1)  # (B, T): which sample of the row each token belongs to
    T = positions.size(-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
    return ((sample[:, :, None] == sample[:, None, :]) & causal)[:, None]


class SharedPrefix:
    """A training batch whose B rows all begin with the same P tokens, laid out so those are computed once.

    Instruction data starts every sample with the same template ("Below is an instruction that ..."),
    24 tokens of a 160-token math sample with SmolLM2's tokenizer. The batch (B, T) becomes one row
    [prefix, rest of row 0, ..., rest of row B-1] of N = P + B (T - P) tokens. Embeddings, norms, linear
    layers and the MLP work token by token, so they run on that row unchanged; only attention needs the
    layout: the prefix attends causally to itself, and each row's rest to the prefix and causally to
    itself -- exactly what each row would compute alone. (Dropout, when on, draws one mask for the prefix.)
    """

    def __init__(self, length: int, rows: int, row_length: int, device=None) -> None:
        if not 0 < length < row_length:
            raise ValueError(f"A shared prefix of {length} tokens needs rows longer than it (got {row_length}).")
        self.length, self.rows, self.rest = length, rows, row_length - length  # P, B, S = T - P
        positions = torch.arange(row_length, device=device)
        self.positions = torch.cat((positions[:length], positions[length:].repeat(rows)))  # (N,)

    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (1, N, ...): the prefix of row 0, then the rest of every row."""
        P = self.length
        return torch.cat((x[:1, :P], x[:, P:].reshape(1, -1, *x.shape[2:])), dim=1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sdpa) -> torch.Tensor:
        """q (1, H, N, D), k and v (1, G, N, D) -> (1, H, N, D), with `sdpa(q, k, v, mask)` doing the attention."""
        P, B, S = self.length, self.rows, self.rest

        def rests(t):  # (1, h, N, D) -> each row's rest, (B, h, S, D)
            return t[0, :, P:].unflatten(1, (B, S)).transpose(0, 1)

        def behind_prefix(t):  # (B, h, P + S, D): the prefix's keys (or values) in front of each row's own
            return torch.cat((t[:, :, :P].expand(B, -1, -1, -1), rests(t)), dim=2)

        y_prefix = sdpa(q[:, :, :P], k[:, :, :P], v[:, :, :P], None)  # causal, (1, H, P, D)
        sees = torch.ones(S, P + S, dtype=torch.bool, device=q.device).tril(diagonal=P)  # prefix + causal
        y_rests = sdpa(rests(q), behind_prefix(k), behind_prefix(v), sees)  # (B, H, S, D)
        return torch.cat((y_prefix, y_rests.transpose(0, 1).flatten(1, 2)[None]), dim=2)


# --- KV cache --------------------------------------------------------------------------------------------
class KVCache(nn.Module):
    """Preallocated keys and values, (B, G, max_seq_length, D) each, filled at the given positions."""

    def __init__(self, batch_size, n_groups, max_seq_length, head_size, device=None, dtype=None) -> None:
        super().__init__()
        shape = (batch_size, n_groups, max_seq_length, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, G, T, D) at positions input_pos (T,); return the cache of those B rows."""
        cache_k, cache_v = self.k, self.v
        if k.size(0) != cache_k.size(0):  # fewer rows than the cache was made for
            cache_k, cache_v = cache_k[: k.size(0)], cache_v[: v.size(0)]
        cache_k.index_copy_(2, input_pos, k if k.dtype == cache_k.dtype else k.to(cache_k.dtype))
        cache_v.index_copy_(2, input_pos, v if v.dtype == cache_v.dtype else v.to(cache_v.dtype))
        return cache_k, cache_v

    def causal_mask(self, input_pos: torch.Tensor, pad_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Additive mask (T, S) with S = max_seq_length, in the cache's dtype: 0 where the query in slot
        input_pos[t] may attend (slots <= input_pos[t]), -inf elsewhere. Made once per step for every layer
        (a boolean mask would be converted to this inside each layer's attention).

        With `pad_lengths` (B,) the mask is (B, 1, T, S) and also hides row b's padding slots < pad_lengths[b]
        (a padding query still sees itself, so its softmax stays finite; its output is never used).
        """
        slots = torch.arange(self.k.size(2), device=input_pos.device)
        sees = slots[None, :] <= input_pos[:, None]  # (T, S)
        if pad_lengths is not None:
            real = slots[None, :] >= pad_lengths[:, None]  # (B, S)
            own = slots[None, :] == input_pos[:, None]  # (T, S)
            sees = (sees[None] & (real[:, None, :] | own[None]))[:, None]  # (B, 1, T, S)
        return torch.zeros(sees.shape, dtype=self.k.dtype, device=sees.device).masked_fill_(~sees, float("-inf"))


# --- loss ------------------------------------------------------------------------------------------------
def supervised_cross_entropy(
    lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 256
) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose target is not IGNORE_INDEX.

    The LM head runs only at those positions, `chunk_size` rows at a time, so the (B, T, V) logits of
    the whole batch never exist. Equal to `F.cross_entropy(lm_head(hidden).flatten(0, 1),
    targets.flatten(), ignore_index=IGNORE_INDEX)`.

    Args:
        hidden: final hidden states, (B, T, C).
        targets: (B, T) token ids or IGNORE_INDEX.
    """
    keep = targets != IGNORE_INDEX
    h = hidden[keep]  # (N, C)
    y = targets[keep]  # (N,)
    if y.numel() == 0:
        # Nothing to learn from; keep the graph connected so DDP/backward still work.
        return hidden.sum() * 0.0
    terms = fused_head_terms(lm_head)
    if terms is not None:  # the usual head (not LoRA-wrapped, not quantized), or Adapter v2's scaled one: fused
        weight, bias, scale = terms
        total = LinearCrossEntropy.apply(h, weight, bias, scale, y, chunk_size, torch.is_grad_enabled())
        return total / y.numel()
    # Any other head (a LoRA-wrapped one, say): plain autograd, chunk by chunk.
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk_size):
        logits = lm_head(h[start : start + chunk_size])
        total = total + F.cross_entropy(logits.float(), y[start : start + chunk_size], reduction="sum")
    return total / y.numel()


def fused_head_terms(lm_head: nn.Module) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]:
    """(weight, bias, scale) when `lm_head` computes scale ⊙ (h Wᵀ + bias) from plain tensors (scale None: 1),
    so that `LinearCrossEntropy` can run it; None for any other head, which then runs through autograd.

    A plain linear head qualifies; a PEFT layer qualifies by providing `affine_terms()` (Adapter v2's
    `AdapterV2Linear` does; a LoRA-wrapped or quantized head does not)."""
    if type(lm_head) in (nn.Linear, Linear):
        return lm_head.weight, lm_head.bias, None
    affine_terms = getattr(lm_head, "affine_terms", None)
    return None if affine_terms is None else affine_terms()


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(s ⊙ (h_i W^T + b), y_i), with the gradients worked out during the forward pass.

    The gradient of softmax cross-entropy with respect to the logits is softmax - onehot. Computing it while
    a chunk's logits are at hand means no logits are kept for the backward pass (autograd would keep every
    chunk's log-softmax: N x V floats) and the softmax is done in place. On a SmolLM2-135M LoRA step
    (600 supervised tokens) that lowered peak memory by 0.29 GB at the same speed.
    The per-vocabulary scale s is Adapter v2's (None for a plain head).
    Shapes: h (N, C), weight (V, C), bias (V,) or None, scale (V,) or None, y (N,) -> scalar (float32).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, scale, y, chunk_size: int, with_grad: bool):
        want_h, want_w, want_b, want_s = (with_grad and need for need in ctx.needs_input_grad[:4])
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        grad_b = torch.zeros_like(bias) if want_b else None
        grad_s = torch.zeros_like(scale, dtype=torch.float32) if want_s else None
        scale_col = None if scale is None else scale.float()[:, None]  # (V, 1)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, y.numel(), chunk_size):
            h_chunk, y_chunk = h[start : start + chunk_size], y[start : start + chunk_size]
            rows = torch.arange(y_chunk.numel(), device=h.device)
            # Logits transposed, (V, n): W h^T ran ~1.4x faster than h W^T on CPU for these shapes.
            logits = torch.mm(weight, h_chunk.t()).float()
            if bias is not None:
                logits += bias.float()[:, None]
            if scale is not None:  # keep the unscaled logits only for d loss / d s = sum over rows of grad * them
                unscaled, logits = (logits, logits * scale_col) if want_s else (None, logits.mul_(scale_col))
            target_logit = logits[y_chunk, rows]  # (n,)
            col_max = logits.amax(dim=0)  # (n,)
            probs = logits.sub_(col_max).exp_()  # unnormalised, in place
            col_sum = probs.sum(dim=0)
            total += (col_max + col_sum.log() - target_logit).sum()  # logsumexp - target logit
            if want_h or want_w or want_b or want_s:
                probs.div_(col_sum).index_put_((y_chunk, rows), probs.new_tensor(-1.0), accumulate=True)
                if want_s:
                    grad_s += unscaled.mul_(probs).sum(dim=1)
                if scale is not None:
                    probs *= scale_col  # now the gradient with respect to h W^T + b
                grad_logits = probs.to(weight.dtype)  # (softmax - onehot) ⊙ s, (V, n)
                if want_h:
                    torch.mm(grad_logits.t(), weight, out=grad_h[start : start + chunk_size])
                if want_w:
                    grad_w.addmm_(grad_logits, h_chunk)
                if want_b:
                    grad_b += grad_logits.sum(dim=1)
        if grad_s is not None:
            grad_s = grad_s.to(scale.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b, grad_s)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = [None if g is None else g * grad_total.to(g.dtype) for g in ctx.saved_tensors]
        return *grads, None, None, None
