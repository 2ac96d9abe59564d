"""Fused multi-head attention (forward and backward) for BERT: softmax(Q K^T / sqrt(D) + mask) V.

Based on the Triton fused-attention tutorial (06-fused-attention.py) and FlashAttention-2
(Dao, 2023): the forward streams K/V blocks past a resident Q block with an online softmax,
so no (T, T) matrix is ever written; it saves the row logsumexp for the backward. The backward
is three kernels: a preprocess for delta = rowsum(dO * O), one program per K/V block that
iterates over Q blocks for dK and dV, and one program per Q block that iterates over K/V
blocks for dQ. Splitting dQ out costs a second recomputation of Q K^T but needs no atomics,
so gradients are deterministic. kernels/attention_varlen.py runs the same loops (shared @triton.jit
helpers in kernels/attention_kernels.py) over packed variable-length sequences, for unpadded training.

Features: non-causal (BERT), key-padding mask (B, T) with True = real token, attention dropout
with a counter-based Philox stream: the keep decision for element (b, h, q, k) is
`tl.rand(seed, ((b * H + h) * T + q) * T + k) > p`, replayed identically in the backward and
exposed by `dropout_mask` so the plain-torch `attention_ref` can use the exact same mask.
The seed is device-side state: an int64 (1,) tensor on q's device that every kernel tl.loads.
`attention` draws it with torch.randint from the generator of q's device, only when dropout is
on, so there is no host sync; torch.compile sees the draw; a CUDA graph replays it, so every
replay draws new masks (a property only a GPU can check); and restoring the generator state
(tinytlm.checkpoint.set_rng_state) replays the same masks.
Under autocast q, k, v are first cast to the autocast dtype, autocast's rule for
F.scaled_dot_product_attention, so the precision does not depend on the kernel choice.

Limits:
- head dim D in {16, 32, 64, 128}; any T >= 1 (tails are masked); q, k, v of the same shape
  (B, H, T, D), dtype float32 / float16 / bfloat16, unit stride on the last dim.
- compute is fp32 (accumulators, softmax); output and gradients are in the input dtype.
  On a GPU fp16/bf16 tiles go to tl.dot as they are; fp32 inputs use IEEE fp32 dots (no tf32),
  which keeps them a reference-grade path rather than a fast one.
- rows whose keys are all masked out produce output 0 and zero gradients (SDPA gives NaN on some
  backends and versions, 0 on CPU in torch 2.13).
- with dropout, B * H * T * T must stay below 2**31 (the Philox offsets are int32).
- one grid axis of ceil(T / tile) * B * H programs (CUDA allows 2**31 - 1 there, 65,535 on the other
  axes, which B * H passes in a stacked evaluation); tiles and warps per kernel in TILES, checked
  for registers, spills and shared memory on sm_80 and sm_90 by bench/aot.py.
- under TRITON_INTERPRET=1 all tiles are upcast to fp32 before tl.dot, because the
  interpreter's bf16 dot returns garbage.

`attention` is a torch.library custom op (forward, fake and autograd registered) so that
torch.compile(fullgraph=True) traces through it without a graph break; that replaces the
usual `autograd.Function`, which would be opaque to the compiler.
"""
import math
from typing import Optional

import torch
import triton

from .attention_kernels import (_attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel,
                                _attn_fwd_kernel, _dropout_mask_kernel)
from .common import FLOAT_DTYPES, autocast, check_dropout, check_qkv, dot_precision, interpreted

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = FLOAT_DTYPES


# ----------------------------------------------------------------------------- launchers

# (BLOCK_M, BLOCK_N, num_warps) per kernel: BLOCK_M is the query tile, BLOCK_N the key/value tile. Started from
# the Triton fused-attention tutorial's H100 configurations, then checked with ptxas for sm_80 and sm_90 at the
# project's shapes under triton 3.6 and 3.9 (bench/aot.py: registers, spills, shared memory); not autotuned. At
# 64 x 64 with 4 warps the bf16 backward spilled with dropout (dK/dV 56 B on sm_90, 392 B on sm_80; dQ 60 B on
# sm_80): its fp32 accumulators, the recomputed P and dP and the Philox state are live at once. fp32 dots are
# IEEE (FMA units, no tensor cores): at 64 x 64 ptxas gave the fp32 backward 32 registers and 7-11 KB of stack
# (the forward 1-7 KB), hence small fp32 tiles, and 8 warps in its backward (with 4, triton 3.6's ptxas left
# 4-16 B of spills in four of them). With these, no bf16 kernel spills, and at D = 64 no fp32 one under
# triton 3.6 (the GPU image's); elsewhere ptxas leaves at most 16 B in a few fp32 kernels (bench/README.md).
TILES = {
    "half": {"fwd": (64, 64, 4), "dkdv": (32, 64, 8), "dq": (64, 32, 4)},  # fp16 / bf16
    "fp32": {"fwd": (32, 32, 4), "dkdv": (16, 32, 8), "dq": (32, 32, 8)},
}


def _config(kernel, T, D, dtype):
    """Launch constants of `kernel` ("fwd", "dkdv" or "dq"; padded and varlen alike) for sequences of at most T
    tokens: TILES, with the key/value tile halved at D = 128 (its fp32 accumulators would not fit in registers),
    and tiles shrunk for small T (>= 16, the tl.dot minimum) so short sequences waste less work."""
    block_m, block_n, warps = TILES["fp32" if dtype == torch.float32 else "half"][kernel]
    if D == 128:
        block_n = max(16, block_n // 2)
    cap = max(16, triton.next_power_of_2(T))
    return dict(HEAD_D=D, BLOCK_M=min(block_m, cap), BLOCK_N=min(block_n, cap), UPCAST=interpreted(),
                DOT_PREC=dot_precision(dtype), num_warps=warps)


def _bwd_stages(q):
    """Pipeline stages of the backward kernels: fp32 tiles at D = 128 with the default 3-stage pipeline
    would need ~200 KB of shared memory per program, past the H100's 227 KB once the rest is counted."""
    return 1 if (q.element_size() == 4 and q.shape[-1] == 128) else 2


def _check_inputs(q, k, v, key_padding_mask, dropout_p, seed):
    check_qkv("attention", q, k, v, "(B, H, T, D)", SUPPORTED_HEAD_DIMS)
    B, H, T, D = q.shape
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != (B, T):
            raise ValueError(f"attention: key_padding_mask must be a bool tensor of shape (B, T) = {(B, T)}, "
                             f"got {getattr(m, 'dtype', type(m).__name__)} {tuple(getattr(m, 'shape', ()))}")
        if m.device != q.device:
            raise ValueError(f"attention: key_padding_mask on {m.device}, q on {q.device}")
    check_dropout("attention", dropout_p, seed, q.device, B * H * T * T, "B*H*T*T")


def _pointer_args(key_padding_mask, seed, q):
    """(mask, its strides, HAS_MASK, seed); q stands in for an absent tensor (never read)."""
    seed = q if seed is None else seed
    if key_padding_mask is None:
        return q, 0, 0, False, seed
    m = key_padding_mask.view(torch.uint8)  # bool -> uint8 view (no copy): one byte per key
    return m, m.stride(0), m.stride(1), True, seed


def _launch_fwd(q, k, v, key_padding_mask, dropout_p, seed):
    """Run the forward kernel; returns out (B, H, T, D) in q.dtype and lse (B, H, T) fp32, base 2.
    seed: the int64 (1,) device tensor, or None without dropout."""
    B, H, T, D = q.shape
    cfg = _config("fwd", T, D, q.dtype)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    mask, smb, smt, has_mask, seed = _pointer_args(key_padding_mask, seed, q)
    qk_scale = 1.4426950408889634 / math.sqrt(D)  # log2(e) / sqrt(D): the kernel uses exp2
    _attn_fwd_kernel[(triton.cdiv(T, cfg["BLOCK_M"]) * B * H,)](  # one grid axis: see _grid_ids
        q, k, v, mask, out, lse, seed, dropout_p, qk_scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), smb, smt, H, T,
        HAS_MASK=has_mask, HAS_DROPOUT=dropout_p > 0, **cfg)
    return out, lse


def _launch_bwd(do, q, k, v, out, lse, key_padding_mask, dropout_p, seed):
    """Run the three backward kernels; returns dq, dk, dv contiguous, in q.dtype."""
    B, H, T, D = q.shape
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    block = _config("fwd", T, D, q.dtype)["BLOCK_M"]
    _attn_bwd_preprocess_kernel[(triton.cdiv(T, block) * B * H,)](
        out, do, delta, *out.stride(), *do.stride(), H, T, HEAD_D=D, BLOCK_M=block)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    mask, smb, smt, has_mask, seed = _pointer_args(key_padding_mask, seed, q)
    sm_scale = 1.0 / math.sqrt(D)
    flags = dict(HAS_MASK=has_mask, HAS_DROPOUT=dropout_p > 0, num_stages=_bwd_stages(q))
    args = (seed, dropout_p, sm_scale * 1.4426950408889634, sm_scale,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), smb, smt, H, T)
    cfg = {**_config("dkdv", T, D, q.dtype), **flags}
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, cfg["BLOCK_N"]) * B * H,)](
        q, k, v, mask, do, lse, delta, dk, dv, *args, **cfg)
    cfg = {**_config("dq", T, D, q.dtype), **flags}
    _attn_bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]) * B * H,)](
        q, k, v, mask, do, lse, delta, dq, *args, **cfg)
    return dq, dk, dv


def _seed_tensor(seed, device):
    """The dropout seed as the kernels read it: an int64 (1,) tensor on `device`. None draws a
    fresh one on the device from its torch generator (no host sync; a CUDA graph replays the
    draw, inductor replaces it by its own device seeds from the same generator); an int is
    wrapped; a tensor is used as it is."""
    if seed is None:
        return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        return seed
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("tinytlm::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                      dropout_p: float, seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse). seed: int64 (1,) tensor on q's device when dropout_p > 0 (else None); it is an
    input rather than drawn in here, so the draw is a visible op for torch.compile and CUDA graphs."""
    _check_inputs(q, k, v, key_padding_mask, dropout_p, seed)
    return _launch_fwd(q, k, v, key_padding_mask, dropout_p, seed)


@_attention_fwd_op.register_fake
def _(q, k, v, key_padding_mask, dropout_p, seed):
    B, H, T, D = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("tinytlm::attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], dropout_p: float,
                      seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_bwd(do, q, k, v, out, lse, key_padding_mask, dropout_p, seed)


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, key_padding_mask, dropout_p, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed)  # the seed tensor, so the backward replays the masks
    ctx.key_padding_mask = key_padding_mask
    ctx.dropout_p = dropout_p


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(dout, q, k, v, out, lse, ctx.key_padding_mask, ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q, k, v, key_padding_mask=None, dropout_p=0.0, seed=None):
    """Fused softmax(q k^T / sqrt(D)) v. q, k, v: (B, H, T, D); key_padding_mask: (B, T) bool,
    True = real token; dropout on the attention probabilities with probability dropout_p, from
    `seed`: None draws a fresh one on q's device (only when dropout_p > 0), an int or an int64
    (1,) tensor on q's device fixes it. Returns (B, H, T, D) in q.dtype (the autocast dtype
    inside an autocast region)."""
    q, k, v = autocast(q, k, v)
    seed = _seed_tensor(seed, q.device) if dropout_p > 0 else None
    out, _ = torch.ops.tinytlm.attention_fwd(q, k, v, key_padding_mask, float(dropout_p), seed)
    return out


# ----------------------------------------------------------------------------- reference

def dropout_mask(B, H, T, seed, dropout_p, device="cpu"):
    """The exact keep-mask (B, H, T, T) bool the kernels use for this seed (an int, or an int64
    one-element tensor on `device`) and probability."""
    keep = torch.empty((B, H, T, T), dtype=torch.uint8, device=device)
    block = min(64, max(16, triton.next_power_of_2(T)))
    _dropout_mask_kernel[(triton.cdiv(T, block) * B * H,)](keep, _seed_tensor(seed, device), float(dropout_p), T,
                                                         BLOCK=block)
    return keep.bool()


def attention_ref(q, k, v, key_padding_mask=None, dropout_p=0.0, seed=None):
    """Plain-torch attention with the kernel's conventions: fp32 compute, rows without a real
    key give 0, dropout from `dropout_mask(B, H, T, seed, p)` scaled by 1 / (1 - p)."""
    B, H, T, D = q.shape
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(D)  # (B, H, T, T)
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all-masked rows: NaN -> 0
    if dropout_p > 0:
        if seed is None:
            raise ValueError("attention_ref: dropout needs an explicit seed to reproduce the kernel's mask")
        p = p * dropout_mask(B, H, T, seed, dropout_p, q.device) / (1.0 - dropout_p)
    return (p @ v.float()).to(q.dtype)
