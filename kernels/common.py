"""What the launchers of kernels/ share: the interpreter switch, autocast's input rule, the input checks.

attention.py, attention_varlen.py and conv_stem.py each validate their inputs before a launch, so a bad
call fails with one clear ValueError naming the function and the argument instead of a Triton error or
a wrong result. The checks that are the same everywhere live here: one error text, one place to change.

Under TRITON_INTERPRET=1 (tests on a CPU) every kernel upcasts its tiles to fp32 before tl.dot, because
the interpreter's bf16 dot returns garbage; `interpreted()` tells the launchers. `on_device(t)` is where
a launcher decides that a tensor can reach a kernel: a CUDA tensor, or any tensor under the interpreter
(bench/aot_driver.py widens it to CPU tensors while it compiles every launch ahead of time).
"""
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what every kernel takes (fp32 accumulation)


def interpreted() -> bool:
    """True under the Triton interpreter (TRITON_INTERPRET=1, read when a launch is set up)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_device(t: torch.Tensor) -> bool:
    """Whether a tensor can be handed to a Triton kernel: it is on CUDA, or the interpreter is on."""
    return t.device.type == "cuda" or interpreted()


def dot_precision(dtype) -> str:
    """tl.dot's input_precision: fp32 inputs (and every tile under the interpreter, upcast to fp32) use IEEE
    fp32 products, no tf32, so an fp32 run stays a reference-grade path; fp16/bf16 tiles are exact anyway."""
    return "ieee" if (interpreted() or dtype == torch.float32) else "tf32"


def autocast(*ts):
    """The tensors as autocast would hand them to F.scaled_dot_product_attention or F.conv2d: inside an
    enabled autocast region of their device, floating tensors other than float64 in the autocast dtype, so
    the precision does not depend on the kernel choice; outside one, unchanged. Returns a tuple."""
    dev = ts[0].device.type
    if not torch.is_autocast_enabled(dev):
        return ts
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in ts)


def check_device(where: str, named: dict) -> None:
    """The named tensors share one device, and it is one a kernel can run on (see `on_device`)."""
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        raise ValueError(f"{where}: {', '.join(named)} on different devices: "
                         f"{', '.join(str(t.device) for t in named.values())}")
    t = next(iter(named.values()))
    if not on_device(t):
        raise ValueError(f"{where}: tensors are on {t.device}; the Triton kernels need CUDA "
                         "(or TRITON_INTERPRET=1 set before import, for tests on CPU)")


def check_qkv(where: str, q, k, v, layout: str, head_dims: tuple) -> None:
    """q, k, v: tensors of one shape with len(layout) dims, the last one (D) in head_dims and of unit stride,
    one dtype out of FLOAT_DTYPES, on one device a kernel runs on. layout names the dims, e.g. "(B, H, T, D)"."""
    ndim = layout.count(",") + 1
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != ndim:
            raise ValueError(f"{where}: {name} must be a {ndim}-d tensor {layout}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{where}: q, k, v must have the same shape {layout}, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if min(q.shape[:-1]) < 1:
        raise ValueError(f"{where}: empty input of shape {tuple(q.shape)}")
    if q.shape[-1] not in head_dims:
        raise ValueError(f"{where}: head dim {q.shape[-1]} unsupported, must be one of {head_dims}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{where}: q, k, v must share one dtype out of float32/float16/bfloat16, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    check_device(where, {"q": q, "k": k, "v": v})
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{where}: {name} must have unit stride on the head dim (call .contiguous())")


def check_dropout(where: str, dropout_p: float, seed, device, offsets: int, offsets_text: str) -> None:
    """dropout_p in [0, 1); with dropout on, the Philox offsets (their count `offsets`, described by
    offsets_text) fit in int32 and the seed is an int64 tensor of one element on `device`."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{where}: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p == 0:
        return
    if offsets >= 2 ** 31:
        raise ValueError(f"{where}: {offsets_text} = {offsets} too large for int32 dropout offsets")
    if not (isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() == 1
            and seed.device == device):
        got = (seed.dtype, tuple(seed.shape), seed.device) if isinstance(seed, torch.Tensor) else seed
        raise ValueError(f"{where}: the dropout seed must be an int64 tensor of one element on {device}, got {got}")


def check_count(n, name: str, where: str) -> None:
    """n is a positive int (not a bool)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}: {name} must be a positive int, got {n!r}")
