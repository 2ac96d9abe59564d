"""The Triton kernels of the fused attention (kernels/attention.py has the launchers, the custom op,
the reference and the docs): forward with online softmax, the backward's preprocess (delta),
dK/dV and dQ kernels, and the dropout keep-mask. All read the dropout seed from a device pointer.
"""
import triton
import triton.language as tl


@triton.jit
def _dropout_keep(seed, bh, offs_q, offs_k, T, dropout_p):
    # One Philox draw per (batch*head, q, k) element; the same ids in every kernel, whatever
    # the tile shape or orientation, so forward, backward and dropout_mask agree bit for bit.
    rand_offs = (bh * T + offs_q) * T + offs_k
    return tl.rand(seed, rand_offs) > dropout_p


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
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < T

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    if HAS_DROPOUT:
        seed = tl.load(SEED)  # int64, read at run time: a CUDA graph replay sees the new draw

    # online-softmax state, base-2 units (qk_scale folds in log2(e)). m starts finite so that a
    # block whose keys are all masked (-inf scores) gives exp2(-inf - m) = 0, never NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)

    for start_n in range(0, T, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < T
        # K loaded transposed through the pointers: (D, BLOCK_N)
        kT = tl.load(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kt,
                     mask=col_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None], other=0.0)  # (BLOCK_N, D)
        if UPCAST:
            kT = kT.to(tl.float32)
            v = v.to(tl.float32)
        if HAS_MASK:
            key_real = tl.load(MASK + b * stride_mb + offs_n * stride_mt, mask=col_ok, other=0)
            col_ok = col_ok & (key_real != 0)
        qk = tl.dot(q, kT, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N) fp32
        qk = tl.where(col_ok[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        # the normaliser sums the un-dropped probabilities; dropout only thins the numerator
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], T, dropout_p)
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    has_key = l_i > 0.0
    inv_l = tl.where(has_key, 1.0 / tl.where(has_key, l_i, 1.0), 0.0)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    # LSE (B*H, T) contiguous, base 2; +inf marks a row with no real key so the backward's
    # exp2(s - lse) is 0 there.
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta = rowsum(dO * O), (B*H, T) fp32. It also equals rowsum(dP * P) under dropout.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
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
    # Works on transposed scores sT = K Q^T (BLOCK_N, BLOCK_M) so dK, dV accumulate directly.
    # DK, DV are contiguous (B, H, T, D), written by this program only.
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
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
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    row_base = bh.to(tl.int64) * T
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    dk = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    for start_m in range(0, T, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        qT = tl.load(q_base + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qt,
                     mask=row_ok[None, :], other=0.0)  # (D, BLOCK_M)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
        if UPCAST:
            qT = qT.to(tl.float32)
            do = do.to(tl.float32)
        # padded query rows get lse = +inf, hence p = 0
        lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
        sT = tl.dot(k, qT, input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        pT = tl.exp2(sT * qk_scale - lse[None, :])
        pT = tl.where(key_ok[:, None], pT, 0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], T, dropout_p)
            rescale = 1.0 / (1.0 - dropout_p)
            pdT = tl.where(keep, pT * rescale, 0.0)
            dpT = tl.where(keep, dpT * rescale, 0.0)
        else:
            pdT = pT
        dv += tl.dot(pdT.to(do.dtype), do, input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PREC)

    dk = dk * sm_scale
    out_offs = bh.to(tl.int64) * T * HEAD_D + offs_n[:, None] * HEAD_D + offs_d[None, :]
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
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
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
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
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    for start_n in range(0, T, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < T
        kT = tl.load(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kt,
                     mask=col_ok[None, :], other=0.0)  # (D, BLOCK_N)
        vT = tl.load(v_base + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vt,
                     mask=col_ok[None, :], other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        if HAS_MASK:
            key_real = tl.load(MASK + b * stride_mb + offs_n * stride_mt, mask=col_ok, other=0)
            col_ok = col_ok & (key_real != 0)
        s = tl.dot(q, kT, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PREC)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], T, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PREC)

    dq = dq * sm_scale
    out_offs = row_base * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :]
    tl.store(DQ + out_offs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dropout_mask_kernel(KEEP, SEED, dropout_p, T, BLOCK: tl.constexpr):
    # KEEP: (B*H, T, T) uint8, contiguous; one program per (BLOCK query rows, batch*head)
    seed = tl.load(SEED)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_q = pid_m * BLOCK + tl.arange(0, BLOCK)
    for start in range(0, T, BLOCK):
        offs_k = start + tl.arange(0, BLOCK)
        keep = _dropout_keep(seed, bh, offs_q[:, None], offs_k[None, :], T, dropout_p)
        ptrs = KEEP + (bh.to(tl.int64) * T + offs_q[:, None]) * T + offs_k[None, :]
        tl.store(ptrs, keep.to(tl.uint8), mask=(offs_q[:, None] < T) & (offs_k[None, :] < T))
