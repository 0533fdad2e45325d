"""The one GPT model. Read it top to bottom: token ids -> embedding -> blocks -> norm -> logits.

Every supported family (Pythia, Falcon, Llama, Mistral, Phi, Gemma, Qwen, SmolLM2, ...) is this code
with different `Config` values; there are no per-family subclasses. The CPU speed machinery (few-row
linear products, packed weights, a closed-form RMSNorm backward, shared-prefix batches, the fused LM-head
loss) lives in `lit_gpt.kernels`; this file calls it by name and each piece computes what its plain
PyTorch reference does.

Shapes: B = batch, T = sequence length, C = n_embd, H = n_head, G = n_query_groups (key/value heads),
D = head_size, V = padded vocabulary size.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from lit_gpt import kernels
from lit_gpt.config import Config

IGNORE_INDEX = -100  # targets with this value carry no loss (prompt tokens, padding)


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = kernels.Linear(config.n_embd, config.padded_vocab_size, bias=config.lm_head_bias)
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
                `kernels.SharedPrefix`); the loss is the same.

        Returns:
            logits (B, T, V), or the scalar loss when `targets` is given.
        """
        idx, targets, cos, sin, mask = self.positions_and_mask(idx, targets, input_pos, pad_lengths, positions,
                                                               shared_prefix)

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

    def positions_and_mask(self, idx, targets, input_pos, pad_lengths, positions, shared_prefix):
        """Pick the position/mask mode that `forward`'s arguments ask for; return (idx, targets, cos, sin, mask).

        cos and sin are the RoPE tables at each token's position (n = rope_n_elem); mask is what
        `CausalSelfAttention.attend` takes. idx and targets come back unchanged except in the shared-prefix mode.

        * plain causal (training, scoring, generation without a cache): none of the others given. Positions
          0..T-1: cos, sin (T, n); mask None (causal).
        * shared prefix (training): `shared_prefix` > 0, with `targets`. idx and targets become one row, (1, N)
          (`kernels.SharedPrefix`): cos, sin (N, n); the mask is the `SharedPrefix` layout itself.
        * packed rows (training): `positions` (B, T). cos, sin (B, 1, T, n); mask boolean (B, 1, T, T),
          causal within each sample (`packed_causal_mask`).
        * KV-cached generation: `input_pos` (T,). cos, sin (T, n); mask additive (T, S) over the S cache slots
          (`KVCache.causal_mask`).
        * left-padded KV-cached generation: `input_pos` and `pad_lengths` (B,). cos, sin (B, 1, T, n) at
          positions input_pos - pad_lengths[b]; mask additive (B, 1, T, S), which also hides row b's padding.
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
                layout = kernels.SharedPrefix(shared_prefix, rows=idx.size(0), row_length=T, device=idx.device)
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
        return idx, targets, cos, sin, mask

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
        self.query = kernels.Linear(C, H * D, bias=config.qkv_bias)
        self.key = kernels.Linear(C, G * D, bias=config.qkv_bias)
        self.value = kernels.Linear(C, G * D, bias=config.qkv_bias)
        self.proj = kernels.Linear(H * D, C, bias=config.bias)
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
        q, k, v = (y.view(B, T, -1, D).transpose(1, 2) for y in kernels.linears(x, self.query, self.key, self.value))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask) -> torch.Tensor:
        """Scaled dot-product attention. Returns (B, H, T, D).

        `mask`: None means causal over T; a boolean tensor, True where a query may attend to a key; a float
        tensor added to the scores (0 or -inf, as `KVCache.causal_mask` makes); or a `kernels.SharedPrefix` layout,
        which splits the attention by rows.
        """
        if isinstance(mask, kernels.SharedPrefix):
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
        self.fc = kernels.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = kernels.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.act = make_activation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class GatedMLP(nn.Module):
    """proj(act(fc_1 x) * fc_2 x): SwiGLU with silu (Llama, Mistral, Qwen), GeGLU with gelu_tanh (Gemma)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc_1 = kernels.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.fc_2 = kernels.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = kernels.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.act = make_activation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = kernels.linears(x, self.fc_1, self.fc_2)
        return self.proj(self.act(gate) * up)


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
                return kernels.rms_norm(x, self.weight, self.eps)  # training on the CPU: faster backward
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        # Low precision: normalise in float32, round, then scale (the Llama reference's order of rounding).
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), None, self.eps).to(x.dtype)


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

    The LM head runs only at those positions, `chunk_size` rows at a time (`kernels.cross_entropy_sum`), so
    the (B, T, V) logits of the whole batch never exist. Equal to `F.cross_entropy(lm_head(hidden).flatten(0, 1),
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
    return kernels.cross_entropy_sum(lm_head, h, y, chunk_size) / y.numel()
