"""The Triton kernels of the fused attention (kernels/attention.py has the launchers, the custom op,
the reference and the docs): forward with online softmax, the backward's preprocess (delta),
dK/dV and dQ kernels, and the dropout keep-mask. All read the dropout seed from a device pointer.

The loops over key or query blocks are @triton.jit helpers (`_fwd_loop`, `_fwd_finish`, `_dkdv_loop`,
`_dq_loop`) that take base pointers and a length, so the padded (B, H, T, D) kernels here and the
variable-length kernels of kernels/attention_varlen_kernels.py share one implementation of the math.
"""
import triton
import triton.language as tl


@triton.jit
def _grid_ids(T, BLOCK: tl.constexpr):
    # (block index within a row, row = batch * H + head) of this program. The grid is one axis, blocks of a
    # row consecutive (they share K/V in L2): CUDA allows 2^31 - 1 programs on axis 0 but 65,535 on axes 1
    # and 2, which B * H passes in a stacked evaluation (K = 22 members at batch 256: 67,584 rows).
    n_blocks = tl.cdiv(T, BLOCK)
    pid = tl.program_id(0)
    return pid % n_blocks, pid // n_blocks


@triton.jit
def _dropout_keep(seed, bh, offs_q, offs_k, T, dropout_p):
    # One Philox draw per (batch*head, q, k) element; the same ids in every kernel, whatever
    # the tile shape or orientation, so forward, backward and dropout_mask agree bit for bit.
    rand_offs = (bh * T + offs_q) * T + offs_k
    return tl.rand(seed, rand_offs) > dropout_p


# ----------------------------------------------------------------------------- shared loops

@triton.jit
def _fwd_loop(q, k_base, v_base, m_base, stride_kt, stride_kd, stride_vt, stride_vd, stride_mt,
              n_keys, SEED, bh, offs_m, T_RAND, dropout_p, qk_scale,
              HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    # The online softmax of one (BLOCK_M, D) query block q over keys 0 .. n_keys-1 at k_base / v_base
    # (m_base: their key-padding bytes when HAS_MASK). Returns (acc, m_i, l_i), base-2 units.
    offs_d = tl.arange(0, HEAD_D)
    if HAS_DROPOUT:
        seed = tl.load(SEED)  # int64, read at run time: a CUDA graph replay sees the new draw
    # m starts finite so that a block whose keys are all masked (-inf scores) gives exp2(-inf - m) = 0, never NaN
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    for start_n in range(0, n_keys, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < n_keys
        # K loaded transposed through the pointers: (D, BLOCK_N)
        kT = tl.load(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kt,
                     mask=col_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None], other=0.0)  # (BLOCK_N, D)
        if UPCAST:
            kT = kT.to(tl.float32)
            v = v.to(tl.float32)
        if HAS_MASK:
            key_real = tl.load(m_base + offs_n * stride_mt, mask=col_ok, other=0)
            col_ok = col_ok & (key_real != 0)
        qk = tl.dot(q, kT, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N) fp32
        qk = tl.where(col_ok[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        # the normaliser sums the un-dropped probabilities; dropout only thins the numerator
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], T_RAND, dropout_p)
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_finish(acc, m_i, l_i, dropout_p, HAS_DROPOUT: tl.constexpr):
    # (out, lse) of a query block: the normalised output (0 for a row with no real key) and the row
    # logsumexp in base 2 (+inf for such a row, so the backward's exp2(s - lse) is 0 there)
    has_key = l_i > 0.0
    inv_l = tl.where(has_key, 1.0 / tl.where(has_key, l_i, 1.0), 0.0)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    return acc * inv_l[:, None], lse


@triton.jit
def _dkdv_loop(k, v, key_ok, q_base, do_base, lse_base, delta_base, stride_qt, stride_qd, stride_dot, stride_dod,
               n_queries, SEED, bh, offs_n, T_RAND, dropout_p, qk_scale,
               HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    # dK (unscaled: the caller multiplies by sm_scale) and dV of one (BLOCK_N, D) key block k, v over
    # queries 0 .. n_queries-1. Works on transposed scores sT = K Q^T (BLOCK_N, BLOCK_M) so dK, dV
    # accumulate directly. lse_base / delta_base: the rows' LSE and delta, contiguous.
    offs_d = tl.arange(0, HEAD_D)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    dk = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    for start_m in range(0, n_queries, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n_queries
        qT = tl.load(q_base + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qt,
                     mask=row_ok[None, :], other=0.0)  # (D, BLOCK_M)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
        if UPCAST:
            qT = qT.to(tl.float32)
            do = do.to(tl.float32)
        # rows past the end get lse = +inf, hence p = 0
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        sT = tl.dot(k, qT, input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        pT = tl.exp2(sT * qk_scale - lse[None, :])
        pT = tl.where(key_ok[:, None], pT, 0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], T_RAND, dropout_p)
            rescale = 1.0 / (1.0 - dropout_p)
            pdT = tl.where(keep, pT * rescale, 0.0)
            dpT = tl.where(keep, dpT * rescale, 0.0)
        else:
            pdT = pT
        dv += tl.dot(pdT.to(do.dtype), do, input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _dq_loop(q, do, lse, delta, k_base, v_base, m_base, stride_kt, stride_kd, stride_vt, stride_vd, stride_mt,
             n_keys, SEED, bh, offs_m, T_RAND, dropout_p, qk_scale,
             HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    # dQ (unscaled) of one (BLOCK_M, D) query block over keys 0 .. n_keys-1
    offs_d = tl.arange(0, HEAD_D)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    for start_n in range(0, n_keys, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < n_keys
        kT = tl.load(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kt,
                     mask=col_ok[None, :], other=0.0)  # (D, BLOCK_N)
        vT = tl.load(v_base + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vt,
                     mask=col_ok[None, :], other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        if HAS_MASK:
            key_real = tl.load(m_base + offs_n * stride_mt, mask=col_ok, other=0)
            col_ok = col_ok & (key_real != 0)
        s = tl.dot(q, kT, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PREC)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], T_RAND, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PREC)
    return dq


# ----------------------------------------------------------------------------- padded (B, H, T, D) kernels

@triton.jit
def _attn_fwd_kernel(
    Q, K, V, MASK, O, LSE,
    SEED, dropout_p, qk_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_mb, stride_mt,
    H, T,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # one program = one (BLOCK_M, HEAD_D) block of queries of one (batch, head)
    pid_m, bh = _grid_ids(T, BLOCK_M)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    if UPCAST:
        q = q.to(tl.float32)
    acc, m_i, l_i = _fwd_loop(q, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                              MASK + b * stride_mb, stride_kt, stride_kd, stride_vt, stride_vd, stride_mt,
                              T, SEED, bh, offs_m, T, dropout_p, qk_scale,
                              HEAD_D, BLOCK_M, BLOCK_N, HAS_MASK, HAS_DROPOUT, UPCAST, DOT_PREC)
    out, lse = _fwd_finish(acc, m_i, l_i, dropout_p, HAS_DROPOUT)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)  # LSE (B*H, T) contiguous, base 2


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta = rowsum(dO * O), (B*H, T) fp32. It also equals rowsum(dP * P) under dropout.
    pid_m, bh = _grid_ids(T, BLOCK_M)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < T
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, MASK, DO, LSE, DELTA, DK, DV,
    SEED, dropout_p, qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_mb, stride_mt,
    H, T,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # one program = one (BLOCK_N, D) block of keys/values; loops over all query blocks.
    # DK, DV are contiguous (B, H, T, D), written by this program only.
    pid_n, bh = _grid_ids(T, BLOCK_N)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    col_ok = offs_n < T
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None], other=0.0)  # (BLOCK_N, D)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=col_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    key_ok = col_ok
    if HAS_MASK:
        key_real = tl.load(MASK + b * stride_mb + offs_n * stride_mt, mask=col_ok, other=0)
        key_ok = key_ok & (key_real != 0)
    row_base = bh.to(tl.int64) * T
    dk, dv = _dkdv_loop(k, v, key_ok, Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                        LSE + row_base, DELTA + row_base, stride_qt, stride_qd, stride_dot, stride_dod,
                        T, SEED, bh, offs_n, T, dropout_p, qk_scale,
                        HEAD_D, BLOCK_M, BLOCK_N, HAS_DROPOUT, UPCAST, DOT_PREC)
    out_offs = row_base * HEAD_D + offs_n[:, None] * HEAD_D + offs_d[None, :]
    tl.store(DK + out_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, MASK, DO, LSE, DELTA, DQ,
    SEED, dropout_p, qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_mb, stride_mt,
    H, T,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # one program = one (BLOCK_M, D) block of queries; loops over all key blocks.
    # DQ is contiguous (B, H, T, D).
    pid_m, bh = _grid_ids(T, BLOCK_M)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < T
    row_base = bh.to(tl.int64) * T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    dq = _dq_loop(q, do, lse, delta, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                  MASK + b * stride_mb, stride_kt, stride_kd, stride_vt, stride_vd, stride_mt,
                  T, SEED, bh, offs_m, T, dropout_p, qk_scale,
                  HEAD_D, BLOCK_M, BLOCK_N, HAS_MASK, HAS_DROPOUT, UPCAST, DOT_PREC)
    out_offs = row_base * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :]
    tl.store(DQ + out_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dropout_mask_kernel(KEEP, SEED, dropout_p, T, BLOCK: tl.constexpr):
    # KEEP: (B*H, T, T) uint8, contiguous; one program per (BLOCK query rows, batch*head)
    seed = tl.load(SEED)
    pid_m, bh = _grid_ids(T, BLOCK)
    offs_q = pid_m * BLOCK + tl.arange(0, BLOCK)
    for start in range(0, T, BLOCK):
        offs_k = start + tl.arange(0, BLOCK)
        keep = _dropout_keep(seed, bh, offs_q[:, None], offs_k[None, :], T, dropout_p)
        ptrs = KEEP + (bh.to(tl.int64) * T + offs_q[:, None]) * T + offs_k[None, :]
        tl.store(ptrs, keep.to(tl.uint8), mask=(offs_q[:, None] < T) & (offs_k[None, :] < T))
