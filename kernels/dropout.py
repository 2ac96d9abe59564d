"""Dropout with a cheaper mask: four 15-bit uniform lanes from every 64-bit draw of torch's generator.

F.dropout draws its keep-mask with `aten::bernoulli_`, one generator call per element: ~8 ns an element on
the 2-core EPYC of docs/kernels-and-speed.md, whatever the dtype; a profile put it at 10-28% of a default CPU
training step.
Here one `torch.randint` of numel/4 int64 words (one 64-bit draw of the generator each, reduced modulo
2^63 -- a power of two, so exactly uniform -- onto [-2^62, 2^62)) is viewed as int16 lanes; each lane's low
15 bits are a uniform integer u in [0, 32768) (the top lane's too: subtracting 2^62 shifts it modulo 2^15)
and an element is kept when u >= thr. Then the output is x * keep * scale, and the backward grad * keep * scale,
each one addcmul pass, with the bool mask saved (1 byte an element; F.dropout saves its mask in x's dtype).

Quantization: thr = round(p * 32768), so the drop probability is p_eff = thr / 32768, with
|p_eff - p| <= 2^-16 (p = 0.1: p_eff = 3277 / 32768 = 0.100006). scale = 32768 / (32768 - thr) = 1 / (1 - p_eff),
so the output is exactly unbiased for the drop probability it applies: E[out] = x. A p that rounds to
thr = 32768 (p >= 1 - 2^-16) would drop everything and is rejected.

RNG: the words come from the default generator of x's device (torch.randint(..., device=x.device)),
the generator whose state checkpoints save and restore, so a resumed run draws the same masks. The draw
advances that generator by a fixed amount per call (numel / 4 words, rounded up), whatever the values.

Shapes and dtypes: any shape (the mask is drawn for x's logical elements in row-major order, so a
non-contiguous x gets the same mask as x.contiguous()), any floating dtype; under autocast x arrives in
whatever dtype the op before produced (bf16 from a Linear, fp32 from a LayerNorm), and out has that dtype.
torch.compile: dynamo traces the draw and the autograd.Function without a graph break; inductor then draws
the words with its own generator (seeded from torch's, as it does for F.dropout), so a compiled run's masks
are not the eager run's.

Plain torch: a CPU fast path with a reference (`reference` = F.dropout), not a Triton kernel; chosen
when the model is built (tinytlm/kernel_path.py, Impl.dropout).
"""
import torch
import torch.nn.functional as F

LANES = 1 << 15  # a lane's uniform integers: [0, 32768)
LANE_BITS = LANES - 1  # 0x7FFF: a lane's low 15 bits
HALF_RANGE = 1 << 62  # the words are uniform on [-2^62, 2^62): 2^63 values, each lane's low 15 bits uniform


def reference(x, p: float, training: bool = True):
    """The reference semantics: F.dropout (a Bernoulli(1 - p) mask, scale 1 / (1 - p))."""
    return F.dropout(x, p, training)


def threshold(p: float) -> int:
    """The lane threshold for drop probability p: keep when u >= thr; p_eff = thr / 32768."""
    if not 0.0 <= p < 1.0:  # also false for nan
        raise ValueError(f"dropout: p={p!r}, must be in [0, 1)")
    thr = round(p * LANES)
    if thr == LANES:
        raise ValueError(f"dropout: p={p!r} rounds to 1 at 15-bit resolution (p must be < 1 - 2^-16)")
    return thr


def scale_of(p: float) -> float:
    """1 / (1 - p_eff): the scale of the kept elements, exact for the quantized drop probability."""
    return LANES / (LANES - threshold(p))


def keep_mask(shape, p: float, device) -> torch.Tensor:
    """A bool keep-mask of `shape`, P(keep) = 1 - thr / 32768, from the default generator of `device`."""
    thr = threshold(p)
    n = 1
    for s in shape:
        n *= s
    # randint, not empty().random_(): the same draws, but dynamo traces it without a graph break
    words = torch.randint(-HALF_RANGE, HALF_RANGE, (-(-n // 4),), dtype=torch.int64, device=device)
    lanes = words.view(torch.int16).bitwise_and_(LANE_BITS)  # (4 * words,) uniform on [0, 32768)
    return (lanes[:n] >= thr).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training) with the 15-bit mask (module docstring); p == 0 or not training: x itself."""
    thr = threshold(p)
    if not training or p == 0.0:
        return x
    keep = keep_mask(x.shape, p, x.device)
    return _Dropout.apply(x, keep, LANES / (LANES - thr))


class _Dropout(torch.autograd.Function):
    """out = x * keep * scale; d x = grad * keep * scale (the bool mask saved, nothing else)."""

    @staticmethod
    def forward(ctx, x, keep, scale: float):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _scaled(x, keep, scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return _scaled(grad, keep, ctx.scale), None, None


def _scaled(x, keep, scale: float):
    """x * keep * scale in one pass (addcmul onto a broadcast 0: no second pass over x), computed in fp32 and
    rounded once to x's dtype; exact where keep is False (0)."""
    return torch.addcmul(x.new_zeros(()), x, keep, value=scale)
