"""Variable-length fused attention over packed sequences (forward and backward), for unpadded training.

Packed layout, as FlashAttention's varlen API: the real tokens of a batch concatenated into q, k, v of
shape (N, H, D); sequence s is rows seq_start[s] .. seq_start[s] + seq_len[s] - 1 and attends to itself
only, so no padding is ever multiplied. FlashAttention describes the rows by cumulative offsets
(cu_seqlens); here a start and a length per sequence, because tinytlm/unpad.py packs K stacked members
into K equal slabs and the rows between one member's last sequence and the next slab (the fillers of
its token budget) belong to no sequence: they get output 0 and zero gradients. For contiguous
sequences, seq_start = cu_seqlens[:-1] and seq_len = cu_seqlens.diff().

The kernels (kernels/attention_varlen_kernels.py) run the same online-softmax loops as the padded
kernels of kernels/attention.py (shared @triton.jit helpers), with one program per (query or key block,
sequence, head); blocks past a sequence's end return at once. Attention dropout is Philox as there:
element (s, h, q, k) keeps iff `tl.rand(seed, ((s * H + h) * T + q) * T + k) > p` with T = max_seqlen,
exactly the padded kernel's draw for batch row s at T, replayed in the backward; `attention_varlen_ref`
(plain torch, a loop over the sequences) applies the same mask through kernels.attention.dropout_mask.

Limits:
- head dim D in {16, 32, 64, 128}; q, k, v of one shape (N, H, D), dtype float32 / float16 / bfloat16,
  unit stride on D (other strides are free: the model passes views of one (N, 3, H, D) projection);
  seq_start and seq_len int32 of one length S >= 1 on q's device.
- every seq_len <= max_seqlen and sequences within 0 .. N-1 without overlap: not checked, since that would
  need a host sync per call (query blocks past max_seqlen would be left 0); tinytlm/unpad.py builds them so.
- with dropout, S * H * max_seqlen**2 must stay below 2**31 (int32 Philox offsets).
- compute is fp32 (accumulators, softmax), outputs and gradients in the input dtype; the dropout seed is
  an int64 (1,) device tensor, drawn per call when None, as in kernels/attention.py (no host sync).
A torch.library custom op (forward, fake, autograd), so torch.compile(fullgraph=True) traces it.
"""
import math
from typing import Optional

import torch
import triton

from .attention import SUPPORTED_HEAD_DIMS, _bwd_stages, _config, _seed_tensor, dropout_mask
from .attention_kernels import _attn_bwd_preprocess_kernel
from .attention_varlen_kernels import _attn_varlen_bwd_dkdv_kernel, _attn_varlen_bwd_dq_kernel, _attn_varlen_fwd_kernel
from .common import autocast, check_dropout, check_qkv

LOG2E = 1.4426950408889634


def _check_inputs(q, k, v, seq_start, seq_len, max_seqlen, dropout_p, seed):
    check_qkv("attention_varlen", q, k, v, "(N, H, D)", SUPPORTED_HEAD_DIMS)
    for name, t in (("seq_start", seq_start), ("seq_len", seq_len)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1 or t.numel() < 1:
            raise ValueError(f"attention_varlen: {name} must be a 1-d int32 tensor with one entry per sequence, "
                             f"got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != q.device:
            raise ValueError(f"attention_varlen: {name} on {t.device}, q on {q.device}")
    if seq_start.numel() != seq_len.numel():
        raise ValueError(f"attention_varlen: {seq_start.numel()} starts for {seq_len.numel()} lengths")
    if not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"attention_varlen: max_seqlen must be a positive int, got {max_seqlen!r}")
    S, H = seq_len.numel(), q.shape[1]
    check_dropout("attention_varlen", dropout_p, seed, q.device, S * H * max_seqlen ** 2, "S*H*max_seqlen^2")


# ----------------------------------------------------------------------------- launchers

def _launch_fwd(q, k, v, seq_start, seq_len, max_seqlen, dropout_p, seed):
    """out (N, H, D) in q.dtype (rows of no sequence: 0) and lse (H, N) fp32, base 2."""
    N, H, D = q.shape
    cfg = _config("fwd", max_seqlen, D, q.dtype)
    out = torch.zeros((N, H, D), device=q.device, dtype=q.dtype)
    lse = torch.zeros((H, N), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(max_seqlen, cfg["BLOCK_M"]) * seq_len.numel() * H,)  # one axis: see _grid_ids
    _attn_varlen_fwd_kernel[grid](
        q, k, v, out, lse, seq_start, seq_len, q if seed is None else seed, dropout_p, LOG2E / math.sqrt(D),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), H, N, max_seqlen,
        HAS_DROPOUT=dropout_p > 0, **cfg)
    return out, lse


def _launch_bwd(do, q, k, v, out, lse, seq_start, seq_len, max_seqlen, dropout_p, seed):
    """dq, dk, dv contiguous (N, H, D) in q.dtype (rows of no sequence: 0)."""
    N, H, D = q.shape
    if do.stride(-1) != 1:
        do = do.contiguous()
    # delta = rowsum(dO * O), (H, N): the padded preprocess kernel on (1, H, N, D) views of every row
    delta = torch.empty((H, N), device=q.device, dtype=torch.float32)
    o4, do4 = out.permute(1, 0, 2).unsqueeze(0), do.permute(1, 0, 2).unsqueeze(0)
    block = _config("fwd", max_seqlen, D, q.dtype)["BLOCK_M"]
    _attn_bwd_preprocess_kernel[(triton.cdiv(N, block) * H,)](
        o4, do4, delta, *o4.stride(), *do4.stride(), H, N, HEAD_D=D, BLOCK_M=block)
    dq, dk, dv = (torch.zeros((N, H, D), device=q.device, dtype=q.dtype) for _ in range(3))
    flags = dict(HAS_DROPOUT=dropout_p > 0, num_stages=_bwd_stages(q))
    sm_scale = 1.0 / math.sqrt(D)
    args = (seq_start, seq_len, q if seed is None else seed, dropout_p, sm_scale * LOG2E, sm_scale,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), H, N, max_seqlen)
    S = seq_len.numel()
    cfg = {**_config("dkdv", max_seqlen, D, q.dtype), **flags}
    _attn_varlen_bwd_dkdv_kernel[(triton.cdiv(max_seqlen, cfg["BLOCK_N"]) * S * H,)](
        q, k, v, do, lse, delta, dk, dv, *args, **cfg)
    cfg = {**_config("dq", max_seqlen, D, q.dtype), **flags}
    _attn_varlen_bwd_dq_kernel[(triton.cdiv(max_seqlen, cfg["BLOCK_M"]) * S * H,)](
        q, k, v, do, lse, delta, dq, *args, **cfg)
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("tinytlm::attention_varlen_fwd", mutates_args=())
def _attention_varlen_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_start: torch.Tensor,
                             seq_len: torch.Tensor, max_seqlen: int, dropout_p: float,
                             seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(q, k, v, seq_start, seq_len, max_seqlen, dropout_p, seed)
    return _launch_fwd(q, k, v, seq_start, seq_len, max_seqlen, dropout_p, seed)


@_attention_varlen_fwd_op.register_fake
def _(q, k, v, seq_start, seq_len, max_seqlen, dropout_p, seed):
    N, H, D = q.shape
    return q.new_empty((N, H, D)), q.new_empty((H, N), dtype=torch.float32)


@torch.library.custom_op("tinytlm::attention_varlen_bwd", mutates_args=())
def _attention_varlen_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, seq_start: torch.Tensor, seq_len: torch.Tensor,
                             max_seqlen: int, dropout_p: float,
                             seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_bwd(do, q, k, v, out, lse, seq_start, seq_len, max_seqlen, dropout_p, seed)


@_attention_varlen_bwd_op.register_fake
def _(do, q, k, v, out, lse, seq_start, seq_len, max_seqlen, dropout_p, seed):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, seq_start, seq_len, max_seqlen, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seq_start, seq_len, seed)  # the seed: the backward replays the masks
    ctx.max_seqlen, ctx.dropout_p = max_seqlen, dropout_p


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, seq_start, seq_len, seed = ctx.saved_tensors
    dq, dk, dv = _attention_varlen_bwd_op(dout, q, k, v, out, lse, seq_start, seq_len, ctx.max_seqlen,
                                          ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None, None, None


_attention_varlen_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def attention_varlen(q, k, v, seq_start, seq_len, max_seqlen, dropout_p=0.0, seed=None):
    """Fused softmax(q k^T / sqrt(D)) v within each packed sequence. q, k, v: (N, H, D); seq_start, seq_len:
    (S,) int32, sequence s = rows seq_start[s] .. + seq_len[s] - 1; max_seqlen: an int >= every seq_len.
    Dropout on the attention probabilities with probability dropout_p from `seed` (None: a fresh one drawn
    on q's device, only when dropout_p > 0; an int or an int64 (1,) tensor fixes it). Returns (N, H, D) in
    q.dtype (the autocast dtype inside an autocast region); rows of no sequence are 0."""
    q, k, v = autocast(q, k, v)
    seed = _seed_tensor(seed, q.device) if dropout_p > 0 else None
    out, _ = torch.ops.tinytlm.attention_varlen_fwd(q, k, v, seq_start, seq_len, int(max_seqlen),
                                                    float(dropout_p), seed)
    return out


# ----------------------------------------------------------------------------- reference

def attention_varlen_ref(q, k, v, seq_start, seq_len, max_seqlen, dropout_p=0.0, seed=None):
    """Plain torch, one sequence at a time (fp32 compute): softmax(q k^T / sqrt(D)) v within each sequence,
    0 on rows of no sequence; dropout with the kernels' exact keep-mask (dropout_mask(S, H, max_seqlen, seed,
    p), sequence s reading batch row s) scaled by 1 / (1 - p)."""
    N, H, D = q.shape
    keep = None
    if dropout_p > 0:
        if seed is None:
            raise ValueError("attention_varlen_ref: dropout needs an explicit seed to reproduce the kernel's mask")
        keep = dropout_mask(seq_len.numel(), H, max_seqlen, seed, dropout_p, q.device)  # (S, H, T, T)
    out = torch.zeros((N, H, D), device=q.device, dtype=torch.float32)
    for s, (a, n) in enumerate(zip(seq_start.tolist(), seq_len.tolist())):
        if n == 0:
            continue
        qs, ks, vs = (t[a:a + n].float().transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        p = torch.softmax(qs @ ks.transpose(-1, -2) / math.sqrt(D), dim=-1)  # (H, n, n)
        if keep is not None:
            p = p * keep[s, :, :n, :n] / (1.0 - dropout_p)
        out[a:a + n] = (p @ vs).transpose(0, 1)  # (n, H, D)
    return out.to(q.dtype)
