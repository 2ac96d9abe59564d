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
bias + GELU), so the last layer writes (B, T, W) instead of (B, d, T, W).

Two ops (the stem module itself, with its BatchNorm folding, is tinytlm.model.ConvStem):
- `conv_stem_infer(x, params)`: inference with BatchNorm already folded into the conv weights
  (`ConvStem.fold`); every layer is one kernel launch (conv + bias + GELU), the last one also
  does the projection. Activations are kept channels-last (B, T, W, C) for contiguous loads.
  Reference: `conv_stem_infer_ref` (plain torch).
- `conv2d_same(x, weight, bias)`: one conv + bias, for training, where BatchNorm needs batch
  statistics between conv and GELU (so BatchNorm and GELU stay torch modules in ConvStem);
  the conv backward is torch's (torch.nn.grad conv2d_input / conv2d_weight on the explicitly
  padded input). Reference: F.conv2d(padding="same").

Under autocast both paths first cast the activations to the autocast dtype (weights follow
them), as autocast does for F.conv2d, which it cannot do for a custom op: `kernels='triton'`
then computes in the precision `kernels='torch'` does.

Limits: input channels C_in and output channels C_out <= 128 (one program holds all output
channels: d is 32 or 64 in the paper); any T, W, kernel size; fp32 / fp16 / bf16 inputs with
fp32 accumulation (fp32 inputs use IEEE dots, no tf32). Under TRITON_INTERPRET=1 tiles are
upcast to fp32 before tl.dot (the interpreter's bf16 dot is wrong).
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_CHANNELS = 128


def _interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- kernel

@triton.jit
def _gelu(x):
    # exact GELU, as nn.GELU() (approximate='none')
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _conv2d_kernel(
    X, Wt, BIAS, PW, PB, Y,
    T, W, C_IN, C_OUT,
    stride_xb, stride_xt, stride_xw, stride_xc,
    stride_yb, stride_yt, stride_yw, stride_yc,
    KH: tl.constexpr, KW: tl.constexpr, PAD_T: tl.constexpr, PAD_W: tl.constexpr,
    GELU: tl.constexpr, FUSE_PROJ: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    # X: (B, T, W, C_IN) by strides; Wt: (KH, KW, C_IN, C_OUT) contiguous; BIAS: (C_OUT,)
    # Y: (B, T, W, C_OUT) by strides, or (B, T, W) (channel stride unused) when FUSE_PROJ;
    # PW: (C_OUT,) projection weights, PB: (1,) projection bias (both BN-folded).
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # flattened output pixel t * W + w
    pix_ok = offs_p < T * W
    t = offs_p // W
    w = offs_p % W
    offs_ci = tl.arange(0, BLOCK_CI)
    offs_co = tl.arange(0, BLOCK_CO)
    co_ok = offs_co < C_OUT
    x_base = X + b * stride_xb

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
            wt = tl.load(Wt + (tap * C_IN + ci[:, None]) * C_OUT + offs_co[None, :],
                         mask=ci_ok[:, None] & co_ok[None, :], other=0.0)  # (BLOCK_CI, BLOCK_CO)
            if UPCAST:
                x = x.to(tl.float32)
                wt = wt.to(tl.float32)
            else:
                wt = wt.to(x.dtype)
            acc += tl.dot(x, wt, input_precision=DOT_PREC)

    acc += tl.load(BIAS + offs_co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu(acc)
    y_base = Y + b * stride_yb + t * stride_yt + w * stride_yw
    if FUSE_PROJ:
        # 1x1 conv d -> 1: a dot over channels per pixel (padded channels have weight 0)
        pw = tl.load(PW + offs_co, mask=co_ok, other=0.0).to(tl.float32)
        y = tl.sum(acc * pw[None, :], 1) + tl.load(PB).to(tl.float32)
        y = _gelu(y)
        tl.store(y_base, y.to(Y.dtype.element_ty), mask=pix_ok)
    else:
        tl.store(y_base[:, None] + offs_co[None, :] * stride_yc, acc.to(Y.dtype.element_ty),
                 mask=pix_ok[:, None] & co_ok[None, :])


# ----------------------------------------------------------------------------- launcher

def _conv_launch(x, x_strides, T, W, weight, bias, y, y_strides, gelu, proj=None):
    """x: a (B, T, W, C_in) image read through x_strides (b, t, w, c); weight (C_out, C_in, kh, kw)
    and bias (C_out,) in x.dtype; y: output written through y_strides (b, t, w, c);
    proj: (pw (C_out,), pb (1,)) or None."""
    B = x.shape[0]
    C_out, C_in, kh, kw = weight.shape
    wt = weight.permute(2, 3, 1, 0).contiguous()  # (kh, kw, C_in, C_out)
    block_co = max(16, triton.next_power_of_2(C_out))
    block_ci = min(32, max(16, triton.next_power_of_2(C_in)))
    # 64 pixels x <= 128 channels of fp32 accumulator per program, 4 warps: a common
    # implicit-GEMM tile (Triton matmul tutorial sizes); not autotuned.
    block_p = 64
    upcast = _interpreted()
    pw, pb = proj if proj is not None else (bias, bias)  # dummies when not fused
    _conv2d_kernel[(triton.cdiv(T * W, block_p), B)](
        x, wt, bias, pw, pb, y,
        T, W, C_in, C_out,
        *x_strides, *y_strides,
        KH=kh, KW=kw, PAD_T=(kh - 1) // 2, PAD_W=(kw - 1) // 2,
        GELU=gelu, FUSE_PROJ=proj is not None, UPCAST=upcast,
        DOT_PREC="ieee" if (upcast or x.dtype == torch.float32) else "tf32",
        BLOCK_P=block_p, BLOCK_CI=block_ci, BLOCK_CO=block_co, num_warps=4,
    )
    return y


def _check_conv(x, weight, bias, where):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{where}: dtype {x.dtype} unsupported (float32/float16/bfloat16)")
    if weight.dim() != 4 or bias is None or bias.shape != (weight.shape[0],):
        raise ValueError(f"{where}: weight must be (C_out, C_in, kh, kw) with a (C_out,) bias, got "
                         f"{tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}")
    if max(weight.shape[0], weight.shape[1]) > MAX_CHANNELS:
        raise ValueError(f"{where}: at most {MAX_CHANNELS} channels, got weight {tuple(weight.shape)}")
    if not (x.device == weight.device == bias.device):
        raise ValueError(f"{where}: tensors on different devices: {x.device}, {weight.device}, {bias.device}")
    if x.device.type != "cuda" and not _interpreted():
        raise ValueError(f"{where}: tensors are on {x.device}; the Triton kernel needs CUDA "
                         "(or TRITON_INTERPRET=1 set before import, for tests on CPU)")


# The Triton launches are wrapped as torch.library custom ops, so torch.compile sees one opaque node
# per conv (with a fake for shapes and an autograd rule) instead of tracing into the launcher.

@torch.library.custom_op("tinytlm::conv2d_same", mutates_args=())
def _conv2d_same_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    _check_conv(x, weight, bias, "conv2d_same")
    if x.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv2d_same: x must be (B, C_in={weight.shape[1]}, T, W), got {tuple(x.shape)}")
    B, C_in, T, W = x.shape
    y = torch.empty((B, weight.shape[0], T, W), device=x.device, dtype=x.dtype)  # (B, C_out, T, W)
    sx, sy = x.stride(), y.stride()
    # the kernel walks (b, t, w, c): NCHW strides passed in that order
    _conv_launch(x, (sx[0], sx[2], sx[3], sx[1]), T, W, weight, bias, y, (sy[0], sy[2], sy[3], sy[1]), gelu=False)
    return y


@_conv2d_same_op.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


def _conv2d_same_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight)


def _conv2d_same_backward(ctx, gy):
    """torch's conv gradients on the explicitly padded input ('same' = pad + valid conv)."""
    x, weight = ctx.saved_tensors
    gy = gy.to(x.dtype)
    kh, kw = weight.shape[2:]
    pads = ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2)  # (left, right, top, bottom)
    xp = F.pad(x, pads)
    gxp = torch.nn.grad.conv2d_input(xp.shape, weight, gy)
    gx = gxp[:, :, pads[2]:pads[2] + x.shape[2], pads[0]:pads[0] + x.shape[3]]
    gw = torch.nn.grad.conv2d_weight(xp, weight.shape, gy)
    return gx, gw, gy.sum((0, 2, 3))


_conv2d_same_op.register_autograd(_conv2d_same_backward, setup_context=_conv2d_same_setup)


def _autocast(x):
    """x in the autocast dtype inside an enabled autocast region of its device, as autocast casts
    F.conv2d's inputs (any floating dtype but float64); otherwise x unchanged."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
        return x.to(torch.get_autocast_dtype(dev))
    return x


def conv2d_same(x, weight, bias=None):
    """NCHW conv2d with 'same' padding: Triton forward, torch backward. x goes to the autocast
    dtype inside an autocast region; weights are cast to the activation dtype (as autocast would;
    autograd casts their gradients back); bias None -> zeros."""
    x = _autocast(x)
    weight = weight.to(x.dtype)
    bias = bias.to(x.dtype) if bias is not None else x.new_zeros(weight.shape[0])
    return _conv2d_same_op(x, weight, bias)


# ----------------------------------------------------------------------------- public API

def conv_stem_infer(x, params):
    """Inference stem: x (B, T, H) -> (B, T, H), with params from ConvStem.fold (tinytlm.model). One fused
    conv + bias + GELU launch per layer; the last layer also applies the 1x1 projection.
    Computes in x.dtype (the autocast dtype inside an autocast region); params are cast to it."""
    if x.dim() != 3:
        raise ValueError(f"conv_stem_infer: x must be (B, T, H), got {tuple(x.shape)}")
    if len(params) < 2 or params[-1]["weight"].shape[0] != 1 or params[-1]["weight"].shape[2:] != (1, 1):
        raise ValueError("conv_stem_infer: params must be ConvStem.fold output: conv layers, then a 1x1 d -> 1 "
                         "projection")
    return _conv_stem_infer_op(_autocast(x), [p["weight"] for p in params], [p["bias"] for p in params])


@torch.library.custom_op("tinytlm::conv_stem_infer", mutates_args=())
def _conv_stem_infer_op(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    params = [{"weight": w, "bias": b} for w, b in zip(weights, biases)]
    B, T, W = x.shape
    h = x.contiguous()  # channels-last (B, T, W, 1)
    c_in = 1
    for i, layer in enumerate(params[:-1]):
        weight, bias = layer["weight"].to(x.dtype), layer["bias"].to(x.dtype)
        _check_conv(x, weight, bias, "conv_stem_infer")
        if weight.shape[1] != c_in:
            raise ValueError(f"conv_stem_infer: layer {i} expects {weight.shape[1]} input channels, gets {c_in}")
        c_out = weight.shape[0]
        last = i == len(params) - 2
        if last:
            proj = params[-1]
            if proj["weight"].shape[1] != c_out:
                raise ValueError(f"conv_stem_infer: projection expects {proj['weight'].shape[1]} channels, gets {c_out}")
            y = torch.empty((B, T, W), device=x.device, dtype=x.dtype)  # (B, T, W)
            y_strides = (*y.stride(), 0)
            pw, pb = proj["weight"].reshape(-1).to(x.dtype), proj["bias"].reshape(1).to(x.dtype)
            _conv_launch(h, (T * W * c_in, W * c_in, c_in, 1), T, W, weight, bias, y, y_strides,
                         gelu=True, proj=(pw, pb))
        else:
            y = torch.empty((B, T, W, c_out), device=x.device, dtype=x.dtype)  # (B, T, W, C) channels-last
            _conv_launch(h, (T * W * c_in, W * c_in, c_in, 1), T, W, weight, bias, y, y.stride(), gelu=True)
        h, c_in = y, c_out
    return h


@_conv_stem_infer_op.register_fake
def _(x, weights, biases):
    return torch.empty_like(x)


def conv_stem_infer_ref(x, params):
    """Plain-torch conv_stem_infer: per layer conv ('same') + bias + exact GELU, then the 1x1 projection
    + bias + GELU; x (B, T, H) -> (B, T, H), computed in x.dtype."""
    h = x.unsqueeze(1)  # (B, 1, T, H)
    for p in params[:-1]:
        h = F.gelu(F.conv2d(h, p["weight"].to(x.dtype), p["bias"].to(x.dtype), padding="same"))  # (B, d, T, H)
    p = params[-1]
    return F.gelu(F.conv2d(h, p["weight"].to(x.dtype), p["bias"].to(x.dtype))).squeeze(1)
