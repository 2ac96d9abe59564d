"""The Triton kernels of variable-length fused attention (kernels/attention_varlen.py has the launchers,
the custom op, the reference and the docs): forward, dK/dV and dQ over packed sequences.

q, k, v are packed (N, H, D): sequence s holds rows SEQ_START[s] .. SEQ_START[s] + SEQ_LEN[s] - 1 and
attends only to itself. One program = one block of one (sequence, head); a program whose block starts
past its sequence's end returns at once, so the grid, sized for the longest sequence (T_RAND =
max_seqlen), costs nothing where sequences are short. The math is kernels/attention_kernels.py's shared
loops (`_fwd_loop`, `_dkdv_loop`, `_dq_loop`) with no key-padding mask: a sequence has no padding.
The dropout draw of element (s, h, q, k) is the padded kernel's for (b = s, h, q, k) at T = max_seqlen.
The backward's delta = rowsum(dO * O) is the padded preprocess kernel run on a (1, H, N, D) view.
"""
import triton
import triton.language as tl

from .attention_kernels import _dkdv_loop, _dq_loop, _fwd_finish, _fwd_loop, _grid_ids


@triton.jit
def _attn_varlen_fwd_kernel(
    Q, K, V, O, LSE, SEQ_START, SEQ_LEN,
    SEED, dropout_p, qk_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    H, N, T_RAND,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m, sh = _grid_ids(T_RAND, BLOCK_M)  # sh = sequence * H + head: the dropout stream's (batch * H + head)
    s = sh // H
    h = (sh % H).to(tl.int64)
    L = tl.load(SEQ_LEN + s)
    if pid_m * BLOCK_M >= L:
        return
    start = tl.load(SEQ_START + s).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < L
    q = tl.load(Q + (start + offs_m[:, None]) * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    if UPCAST:
        q = q.to(tl.float32)
    acc, m_i, l_i = _fwd_loop(q, K + start * stride_kt + h * stride_kh, V + start * stride_vt + h * stride_vh,
                              Q, stride_kt, stride_kd, stride_vt, stride_vd, 0,
                              L, SEED, sh, offs_m, T_RAND, dropout_p, qk_scale,
                              HEAD_D, BLOCK_M, BLOCK_N, False, HAS_DROPOUT, UPCAST, DOT_PREC)
    out, lse = _fwd_finish(acc, m_i, l_i, dropout_p, HAS_DROPOUT)
    o_ptrs = O + (start + offs_m[:, None]) * stride_ot + h * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + h * N + start + offs_m, lse, mask=row_ok)  # LSE (H, N) contiguous, base 2


@triton.jit
def _attn_varlen_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, SEQ_START, SEQ_LEN,
    SEED, dropout_p, qk_scale, sm_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    H, N, T_RAND,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # one program = one (BLOCK_N, D) block of keys/values of one (sequence, head); DK, DV contiguous (N, H, D)
    pid_n, sh = _grid_ids(T_RAND, BLOCK_N)
    s = sh // H
    h = (sh % H).to(tl.int64)
    L = tl.load(SEQ_LEN + s)
    if pid_n * BLOCK_N >= L:
        return
    start = tl.load(SEQ_START + s).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    col_ok = offs_n < L
    k = tl.load(K + (start + offs_n[:, None]) * stride_kt + h * stride_kh + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None], other=0.0)  # (BLOCK_N, D)
    v = tl.load(V + (start + offs_n[:, None]) * stride_vt + h * stride_vh + offs_d[None, :] * stride_vd,
                mask=col_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    row_base = h * N + start  # this sequence's first row in LSE and DELTA (H, N)
    dk, dv = _dkdv_loop(k, v, col_ok, Q + start * stride_qt + h * stride_qh, DO + start * stride_dot + h * stride_doh,
                        LSE + row_base, DELTA + row_base, stride_qt, stride_qd, stride_dot, stride_dod,
                        L, SEED, sh, offs_n, T_RAND, dropout_p, qk_scale,
                        HEAD_D, BLOCK_M, BLOCK_N, HAS_DROPOUT, UPCAST, DOT_PREC)
    out_offs = (start + offs_n[:, None]) * (H * HEAD_D) + h * HEAD_D + offs_d[None, :]
    tl.store(DK + out_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _attn_varlen_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, SEQ_START, SEQ_LEN,
    SEED, dropout_p, qk_scale, sm_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    H, N, T_RAND,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # one program = one (BLOCK_M, D) block of queries of one (sequence, head); DQ contiguous (N, H, D)
    pid_m, sh = _grid_ids(T_RAND, BLOCK_M)
    s = sh // H
    h = (sh % H).to(tl.int64)
    L = tl.load(SEQ_LEN + s)
    if pid_m * BLOCK_M >= L:
        return
    start = tl.load(SEQ_START + s).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < L
    q = tl.load(Q + (start + offs_m[:, None]) * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    do = tl.load(DO + (start + offs_m[:, None]) * stride_dot + h * stride_doh + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_base = h * N + start
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    dq = _dq_loop(q, do, lse, delta, K + start * stride_kt + h * stride_kh, V + start * stride_vt + h * stride_vh,
                  Q, stride_kt, stride_kd, stride_vt, stride_vd, 0,
                  L, SEED, sh, offs_m, T_RAND, dropout_p, qk_scale,
                  HEAD_D, BLOCK_M, BLOCK_N, False, HAS_DROPOUT, UPCAST, DOT_PREC)
    out_offs = (start + offs_m[:, None]) * (H * HEAD_D) + h * HEAD_D + offs_d[None, :]
    tl.store(DQ + out_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
