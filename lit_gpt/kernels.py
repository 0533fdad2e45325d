"""CPU speed machinery behind `lit_gpt.model`. Each piece computes what a plain PyTorch expression computes,
faster or in less memory on the shapes we run, and its docstring names that expression and the measurement
that earned it a place. Read `model.py` for what the model computes; come here for how parts of it are made
fast. `tests/test_kernels.py` compares every piece with its plain reference.

* `Linear`, `linear`: F.linear, with few-row products (decoding) split over the CPU threads.
* `linears`, `pack_linears`, `pack_weights`: linear layers that read one input, run as one product (inference).
* `rms_norm`, `RMSNormFunction`: F.rms_norm with a closed-form backward, for float32 training on the CPU.
* `SharedPrefix`: a training batch whose rows begin with the same tokens, laid out to compute them once.
* `cross_entropy_sum`, `LinearCrossEntropy`: LM head + cross-entropy, chunked, gradients made in the forward.

This module does not import `lit_gpt.model` (the model imports it): `pack_weights` knows a GPT's blocks by
their attributes.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


# --- linear layers -----------------------------------------------------------------------------------------
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


def pack_weights(model: nn.Module) -> nn.Module:
    """Pack each block's query/key/value and gated-MLP fc_1/fc_2 weights of a GPT for one-product inference
    (`pack_linears`). Same parameters, same state dict, same outputs; layers that are not plain `Linear` are
    skipped. Returns `model`."""
    for block in model.blocks:
        pack_linears(block.attn.query, block.attn.key, block.attn.value)
        if hasattr(block.mlp, "fc_1"):  # a GatedMLP: fc_1 and fc_2 read the same input
            pack_linears(block.mlp.fc_1, block.mlp.fc_2)
    return model


# --- normalisation -----------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (C,), weight, eps) with the closed-form backward of `RMSNormFunction`. x (..., C), weight (C,)."""
    return RMSNormFunction.apply(x, weight, eps)


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


# --- shared-prefix batches ---------------------------------------------------------------------------------
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


# --- loss --------------------------------------------------------------------------------------------------
def cross_entropy_sum(lm_head: nn.Module, h: torch.Tensor, y: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """sum_i F.cross_entropy(lm_head(h_i).float(), y_i), in float32, `chunk_size` rows of logits at a time,
    so the (N, V) logits never exist at once. Shapes: h (N, C), y (N,) -> scalar.

    The usual head (not LoRA-wrapped, not quantized) and Adapter v2's scaled one run fused in
    `LinearCrossEntropy`; any other head (a LoRA-wrapped one, say) runs through plain autograd, chunk by chunk.
    """
    terms = fused_head_terms(lm_head)
    if terms is not None:
        weight, bias, scale = terms
        return LinearCrossEntropy.apply(h, weight, bias, scale, y, chunk_size, torch.is_grad_enabled())
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk_size):
        logits = lm_head(h[start : start + chunk_size])
        total = total + F.cross_entropy(logits.float(), y[start : start + chunk_size], reduction="sum")
    return total


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
