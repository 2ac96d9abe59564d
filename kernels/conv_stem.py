"""Conv stem of the paper: the (B, T, H) embedding output as a 1-channel image, L layers of
Conv2d(c_in -> d, (kh, kw), padding='same') + BatchNorm2d + GELU, then a 1x1 Conv2d(d -> 1) +
BatchNorm2d(1) + GELU back to (B, T, H).

Kernel: `_conv2d_kernel`, a direct 'same' convolution written as an implicit GEMM, in the
spirit of the Triton matmul tutorial: one program owns BLOCK_P output pixels (flattened over
T x W) times all output channels, and accumulates, for every kernel tap (dy, dx) and every
BLOCK_CI slice of input channels, a (BLOCK_P, BLOCK_CI) x (BLOCK_CI, BLOCK_CO) tl.dot. Shifted
pixels outside the image are masked to 0, which is PyTorch's zero padding: (k - 1) // 2 before
and the rest after, also for even kernels such as 16 x 3. Epilogue: + bias, optional exact
(erf) GELU, and optionally the stem's last 1x1 projection (a per-pixel dot over channels +
bias + GELU), so the last layer writes (B, T, W) instead of (B, d, T, W). Grouped convolution
(`groups` = G, as F.conv2d's): a third grid axis is the group g; its program reads input
channels g*C_in.., weight output channels g*C_out.., and writes output channels g*C_out.. (with
the fused projection: output channel g, a dot over that group's channels). One launch for all G.

Two ops (the stem module itself, with its BatchNorm folding, is tinytlm.stem.ConvStem):
- `conv_stem_infer(x, params, members=1)`: inference with BatchNorm already folded into the conv
  weights (`ConvStem.fold`); every layer is one kernel launch (conv + bias + GELU), the last one
  also does the projection. Activations are kept channels-last (B, T, W, C) for contiguous loads.
  `members` = K stacked members (independent stems of one shape run as one, groups = K): x is
  (K*B, T, H) member-major (rows k*B .. k*B+B-1 are member k's), and so is the output; params
  hold K*d conv output channels per layer (member-major) and a (K, d, 1, 1) projection. Member k
  of the result depends only on member k's rows and parameters. The first layer reads x and the
  projection writes the output through strides (member = channel), without copies.
  Reference: `conv_stem_infer_ref` (plain torch, F.conv2d(groups=K)).
- `conv2d_same(x, weight, bias, groups=1)`: one conv + bias, for training, where BatchNorm needs
  batch statistics between conv and GELU (so BatchNorm and GELU stay torch modules in ConvStem);
  the conv backward is torch's (torch.nn.grad conv2d_input / conv2d_weight on the explicitly
  padded input). x (B, G*C_in, T, W), weight (G*C_out, C_in, kh, kw), bias (G*C_out,).
  Reference: F.conv2d(padding="same", groups=G).

Under autocast both paths first cast the activations to the autocast dtype (weights follow
them), as autocast does for F.conv2d, which it cannot do for a custom op: `kernels='triton'`
then computes in the precision `kernels='torch'` does.

Limits: input channels C_in and output channels C_out <= 128 per group (one program holds all
of its group's output channels: d is 32 or 64 in the paper; the total G*C may exceed 128); any
number of groups / members, any T, W, kernel size; fp32 / fp16 / bf16 inputs with
fp32 accumulation (fp32 inputs use IEEE dots, no tf32). Under TRITON_INTERPRET=1 tiles are
upcast to fp32 before tl.dot (the interpreter's bf16 dot is wrong).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import FLOAT_DTYPES, autocast, check_count, check_device, dot_precision, interpreted

MAX_CHANNELS = 128


# ----------------------------------------------------------------------------- kernel

@triton.jit
def _gelu(x):
    # exact GELU, as nn.GELU() (approximate='none')
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _conv2d_kernel(
    X, Wt, BIAS, PW, PB, Y,
    T, W, C_IN, C_OUT,
    stride_xb, stride_xg, stride_xt, stride_xw, stride_xc,
    stride_yb, stride_yg, stride_yt, stride_yw, stride_yc,
    KH: tl.constexpr, KW: tl.constexpr, PAD_T: tl.constexpr, PAD_W: tl.constexpr,
    GELU: tl.constexpr, FUSE_PROJ: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    # Per group g (G groups): X: (B, G, T, W, C_IN) by strides; Wt: (G, KH, KW, C_IN, C_OUT)
    # contiguous; BIAS: (G, C_OUT); Y: (B, G, T, W, C_OUT) by strides, or (B, G, T, W) (channel
    # stride unused) when FUSE_PROJ; PW: (G, C_OUT) projection weights, PB: (G,) projection
    # biases (BN-folded). C_IN / C_OUT are per group.
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    g = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # flattened output pixel t * W + w
    pix_ok = offs_p < T * W
    t = offs_p // W
    w = offs_p % W
    offs_ci = tl.arange(0, BLOCK_CI)
    offs_co = tl.arange(0, BLOCK_CO)
    co_ok = offs_co < C_OUT
    x_base = X + b * stride_xb + g * stride_xg
    w_base = Wt + g * (KH * KW * C_IN * C_OUT)  # this group's (KH, KW, C_IN, C_OUT) block
    co_g = g * C_OUT + offs_co  # this group's slice of BIAS and PW

    acc = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.float32)
    for tap in range(0, KH * KW):
        dy = tap // KW
        dx = tap % KW
        ti = t + dy - PAD_T
        wi = w + dx - PAD_W
        in_ok = pix_ok & (ti >= 0) & (ti < T) & (wi >= 0) & (wi < W)  # zero padding
        for c0 in range(0, C_IN, BLOCK_CI):
            ci = c0 + offs_ci
            ci_ok = ci < C_IN
            x = tl.load(x_base + ti[:, None] * stride_xt + wi[:, None] * stride_xw + ci[None, :] * stride_xc,
                        mask=in_ok[:, None] & ci_ok[None, :], other=0.0)  # (BLOCK_P, BLOCK_CI)
            wt = tl.load(w_base + (tap * C_IN + ci[:, None]) * C_OUT + offs_co[None, :],
                         mask=ci_ok[:, None] & co_ok[None, :], other=0.0)  # (BLOCK_CI, BLOCK_CO)
            if UPCAST:
                x = x.to(tl.float32)
                wt = wt.to(tl.float32)
            else:
                wt = wt.to(x.dtype)
            acc += tl.dot(x, wt, input_precision=DOT_PREC)

    acc += tl.load(BIAS + co_g, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu(acc)
    y_base = Y + b * stride_yb + g * stride_yg + t * stride_yt + w * stride_yw
    if FUSE_PROJ:
        # 1x1 conv d -> 1 per group: a dot over the group's channels per pixel (padded channels
        # have weight 0), output channel g
        pw = tl.load(PW + co_g, mask=co_ok, other=0.0).to(tl.float32)
        y = tl.sum(acc * pw[None, :], 1) + tl.load(PB + g).to(tl.float32)
        y = _gelu(y)
        tl.store(y_base, y.to(Y.dtype.element_ty), mask=pix_ok)
    else:
        tl.store(y_base[:, None] + offs_co[None, :] * stride_yc, acc.to(Y.dtype.element_ty),
                 mask=pix_ok[:, None] & co_ok[None, :])


# ----------------------------------------------------------------------------- launcher

def _conv_launch(x, x_strides, B, T, W, weight, bias, y, y_strides, gelu, groups=1, proj=None):
    """x: G = groups images (B, T, W, C_in) read through x_strides (b, g, t, w, c); weight
    (G*C_out, C_in, kh, kw) and bias (G*C_out,) in x.dtype; y: output written through y_strides
    (b, g, t, w, c); proj: (pw (G*C_out,), pb (G,)) or None. C_in, C_out are per group."""
    C_out, C_in, kh, kw = weight.shape
    C_out //= groups
    wt = weight.reshape(groups, C_out, C_in, kh, kw).permute(0, 3, 4, 2, 1).contiguous()  # (G, kh, kw, C_in, C_out)
    block_co = max(16, triton.next_power_of_2(C_out))
    block_ci = min(32, max(16, triton.next_power_of_2(C_in)))
    # 64 pixels x <= 128 channels of fp32 accumulator per program, 4 warps: a common
    # implicit-GEMM tile (Triton matmul tutorial sizes); not autotuned.
    block_p = 64
    pw, pb = proj if proj is not None else (bias, bias)  # dummies when not fused
    # grid: pixel tiles x batch x groups, all groups in one launch
    _conv2d_kernel[(triton.cdiv(T * W, block_p), B, groups)](
        x, wt, bias, pw, pb, y,
        T, W, C_in, C_out,
        *x_strides, *y_strides,
        KH=kh, KW=kw, PAD_T=(kh - 1) // 2, PAD_W=(kw - 1) // 2,
        GELU=gelu, FUSE_PROJ=proj is not None, UPCAST=interpreted(), DOT_PREC=dot_precision(x.dtype),
        BLOCK_P=block_p, BLOCK_CI=block_ci, BLOCK_CO=block_co, num_warps=4,
    )
    return y


def _check_conv(x, weight, bias, groups, where):
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{where}: dtype {x.dtype} unsupported (float32/float16/bfloat16)")
    if weight.dim() != 4 or bias is None or bias.shape != (weight.shape[0],):
        raise ValueError(f"{where}: weight must be (C_out, C_in, kh, kw) with a (C_out,) bias, got "
                         f"{tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}")
    if weight.shape[0] % groups:
        raise ValueError(f"{where}: {weight.shape[0]} output channels do not split into groups={groups}")
    if max(weight.shape[0] // groups, weight.shape[1]) > MAX_CHANNELS:
        raise ValueError(f"{where}: at most {MAX_CHANNELS} channels per group, got weight {tuple(weight.shape)} "
                         f"with groups={groups}")
    check_device(where, {"x": x, "weight": weight, "bias": bias})


# The Triton launches are wrapped as torch.library custom ops, so torch.compile sees one opaque node
# per conv (with a fake for shapes and an autograd rule) instead of tracing into the launcher.

@torch.library.custom_op("tinytlm::conv2d_same", mutates_args=())
def _conv2d_same_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int = 1) -> torch.Tensor:
    check_count(groups, "groups", "conv2d_same")
    _check_conv(x, weight, bias, groups, "conv2d_same")
    if x.dim() != 4 or x.shape[1] != groups * weight.shape[1]:
        raise ValueError(f"conv2d_same: x must be (B, groups*C_in={groups * weight.shape[1]}, T, W) with "
                         f"groups={groups}, got {tuple(x.shape)}")
    B, _, T, W = x.shape
    C_in, C_out = weight.shape[1], weight.shape[0] // groups
    y = torch.empty((B, weight.shape[0], T, W), device=x.device, dtype=x.dtype)  # (B, G*C_out, T, W)
    sx, sy = x.stride(), y.stride()
    # the kernel walks (b, g, t, w, c): NCHW strides passed in that order; group g starts at channel g*C
    _conv_launch(x, (sx[0], C_in * sx[1], sx[2], sx[3], sx[1]), B, T, W, weight, bias,
                 y, (sy[0], C_out * sy[1], sy[2], sy[3], sy[1]), gelu=False, groups=groups)
    return y


@_conv2d_same_op.register_fake
def _(x, weight, bias, groups=1):
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


def _conv2d_same_setup(ctx, inputs, output):
    x, weight, _, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.groups = groups


def _conv2d_same_backward(ctx, gy):
    """torch's conv gradients on the explicitly padded input ('same' = pad + valid conv)."""
    x, weight = ctx.saved_tensors
    gy = gy.to(x.dtype)
    kh, kw = weight.shape[2:]
    pads = ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2)  # (left, right, top, bottom)
    xp = F.pad(x, pads)
    gxp = torch.nn.grad.conv2d_input(xp.shape, weight, gy, groups=ctx.groups)
    gx = gxp[:, :, pads[2]:pads[2] + x.shape[2], pads[0]:pads[0] + x.shape[3]]
    gw = torch.nn.grad.conv2d_weight(xp, weight.shape, gy, groups=ctx.groups)
    return gx, gw, gy.sum((0, 2, 3)), None


_conv2d_same_op.register_autograd(_conv2d_same_backward, setup_context=_conv2d_same_setup)


def conv2d_same(x, weight, bias=None, groups=1):
    """NCHW conv2d with 'same' padding, as F.conv2d(x, weight, bias, padding="same", groups=groups):
    x (B, groups*C_in, T, W), weight (groups*C_out, C_in, kh, kw). Triton forward, torch backward.
    x goes to the autocast dtype inside an autocast region; weights are cast to the activation
    dtype (as autocast would; autograd casts their gradients back); bias None -> zeros."""
    check_count(groups, "groups", "conv2d_same")
    x, = autocast(x)
    weight = weight.to(x.dtype)
    bias = bias.to(x.dtype) if bias is not None else x.new_zeros(weight.shape[0])
    return _conv2d_same_op(x, weight, bias, groups)


# ----------------------------------------------------------------------------- public API

def conv_stem_infer(x, params, members=1):
    """Inference stem: x (K*B, T, H) -> (K*B, T, H) for K = members stacked stems (member-major rows),
    with params from ConvStem.fold (tinytlm.stem). One fused conv + bias + GELU launch per layer for
    all members; the last layer also applies the 1x1 projection. Computes in x.dtype (the autocast
    dtype inside an autocast region); params are cast to it."""
    check_count(members, "members", "conv_stem_infer")
    if x.dim() != 3 or x.shape[0] % members:
        raise ValueError(f"conv_stem_infer: x must be (B, T, H) with B a multiple of members={members}, "
                         f"got {tuple(x.shape)}")
    proj = params[-1]["weight"] if params else None
    if len(params) < 2 or proj.dim() != 4 or proj.shape[0] != members or proj.shape[2:] != (1, 1):
        raise ValueError(f"conv_stem_infer: params must be ConvStem.fold output: conv layers, then a 1x1 d -> 1 "
                         f"projection per member, weight (members={members}, d, 1, 1)")
    return _conv_stem_infer_op(autocast(x)[0], [p["weight"] for p in params], [p["bias"] for p in params], members)


@torch.library.custom_op("tinytlm::conv_stem_infer", mutates_args=())
def _conv_stem_infer_op(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                        members: int = 1) -> torch.Tensor:
    K = members
    B, T, W = x.shape[0] // K, x.shape[1], x.shape[2]
    h = x.contiguous()  # (K*B, T, W): member k is input channel k of the first layer (C_in = 1 per group)
    h_strides = (T * W, B * T * W, W, 1, 1)  # (b, g, t, w, c)
    c_in = 1
    for i, (weight, bias) in enumerate(zip(weights[:-1], biases[:-1])):
        weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        _check_conv(x, weight, bias, K, "conv_stem_infer")
        if weight.shape[1] != c_in:
            raise ValueError(f"conv_stem_infer: layer {i} expects {weight.shape[1]} input channels per member, "
                             f"gets {c_in}")
        c_out = weight.shape[0] // K
        proj = None
        if i == len(weights) - 2:  # last conv, fused with the projection
            pw, pb = weights[-1], biases[-1]
            if pw.shape != (K, c_out, 1, 1) or pb.numel() != K:
                raise ValueError(f"conv_stem_infer: projection must be ({K}, {c_out}, 1, 1) with {K} biases, got "
                                 f"{tuple(pw.shape)} and {tuple(pb.shape)}")
            proj = (pw.reshape(-1).to(x.dtype), pb.reshape(-1).to(x.dtype))  # (K*d,), (K,)
            y = torch.empty((K * B, T, W), device=x.device, dtype=x.dtype)  # like x: member k's channel is rows k*B..
            y_strides = (T * W, B * T * W, W, 1, 0)  # channel stride unused (one channel per member)
        else:
            y = torch.empty((B, T, W, K * c_out), device=x.device, dtype=x.dtype)  # channels-last, member-major
            y_strides = (T * W * K * c_out, c_out, W * K * c_out, K * c_out, 1)  # (b, g, t, w, c)
        _conv_launch(h, h_strides, B, T, W, weight, bias, y, y_strides, gelu=True, groups=K, proj=proj)
        h, h_strides, c_in = y, y_strides, c_out
    return h


@_conv_stem_infer_op.register_fake
def _(x, weights, biases, members=1):
    return torch.empty_like(x)


def conv_stem_infer_ref(x, params, members=1):
    """Plain-torch conv_stem_infer: per layer grouped conv ('same', groups = members) + bias + exact GELU,
    then the grouped 1x1 projection + bias + GELU; x (K*B, T, H) -> (K*B, T, H), computed in x.dtype."""
    K = members
    h = x.reshape(K, -1, *x.shape[1:]).transpose(0, 1)  # (B, K, T, H); K = 1: x.unsqueeze(1)
    for p in params[:-1]:
        w, b = p["weight"].to(x.dtype), p["bias"].to(x.dtype)
        h = F.gelu(F.conv2d(h, w, b, padding="same", groups=K))  # (B, K*d, T, H)
    p = params[-1]
    h = F.gelu(F.conv2d(h, p["weight"].to(x.dtype), p["bias"].to(x.dtype), groups=K))  # (B, K, T, H)
    return h.transpose(0, 1).reshape(x.shape)  # (K*B, T, H)
