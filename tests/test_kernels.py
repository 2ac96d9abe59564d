"""Triton kernels against their plain-torch references, forward and gradients.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1 unless it
is already set); with TRITON_INTERPRET=0 on a CUDA machine the same tests run natively.
"""
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernels.attention import attention, attention_ref, dropout_mask  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"

# max |err| allowed, relative to max |reference| (floored at 0.1: some gradients are ~0 in
# exact arithmetic, e.g. dq at T = 1, or a conv bias before train-mode BatchNorm). Inputs are
# O(1) randn, so a wrong kernel is off by O(1); bf16 is limited by its 8-bit mantissa (outputs
# and gradients are rounded to bf16, and on a GPU P is rounded to bf16 before P @ V).
REL_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def assert_close(got, ref, dtype, what="", floor=0.1):
    got, ref = got.float(), ref.float()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - ref).abs().max().item()
    scale = max(ref.abs().max().item(), floor)
    assert err <= REL_TOL[dtype] * scale, f"{what}: max err {err:.3g} vs max |ref| {scale:.3g}"


# ----------------------------------------------------------------------------- attention

def _qkv(B, H, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype).requires_grad_(True) for _ in range(3)]


def _padding_mask(B, T, seed=0):
    """(B, T) bool, True = real token, every row keeps at least its first key; one row of
    each batch is a right-padded sequence, the others random holes."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, max(1, T // 2):] = False
    mask[:, 0] = True
    return mask.to(DEVICE)


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g).to(DEVICE, out.dtype)
    return torch.autograd.grad(out, inputs, dout)


ATTN_SHAPES = [  # (B, H, T, D): T = 1, a tail under one tile, exact tiles, a tile + 2, D = 128 once
    (2, 2, 1, 32),
    (2, 2, 7, 32),
    (2, 2, 64, 64),
    (1, 2, 128, 32),
    (1, 2, 130, 64),
    (1, 1, 130, 128),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padded", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_matches_sdpa(shape, padded, dtype):
    q, k, v = _qkv(*shape, dtype)
    mask = _padding_mask(shape[0], shape[2]) if padded else None
    out = attention(q, k, v, key_padding_mask=mask)
    assert out.shape == q.shape and out.dtype == dtype
    # reference: SDPA in fp32 on the same (rounded) inputs
    qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=None if mask is None else mask[:, None, None, :])
    assert_close(out, ref, dtype, "out")
    for name, g, gr in zip("qkv", _grads(out, (q, k, v)), _grads(ref, (qr, kr, vr))):
        assert g.dtype == dtype
        assert_close(g, gr, dtype, f"d{name}")


def _check_padded_against_ref(shape, dtype):
    """Forward and gradients of a padded batch against attention_ref in fp32 on the same inputs."""
    q, k, v = _qkv(*shape, dtype)
    mask = _padding_mask(shape[0], shape[2])
    out = attention(q, k, v, key_padding_mask=mask)
    assert out.dtype == dtype
    qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = attention_ref(qr, kr, vr, key_padding_mask=mask)
    assert_close(out, ref, dtype, "out")
    for name, g, gr in zip("qkv", _grads(out, (q, k, v)), _grads(ref, (qr, kr, vr))):
        assert_close(g, gr, dtype, f"d{name}")


def test_attention_fp16():
    _check_padded_against_ref((1, 2, 130, 64), torch.float16)


def test_attention_t512():
    # the longest supported sequence: 8 x 8 tiles, forward and backward, with padding
    _check_padded_against_ref((1, 1, 512, 64), torch.float32)


def test_attention_ref_matches_sdpa():
    # the reference used for dropout is itself checked against SDPA
    q, k, v = _qkv(2, 2, 33, 32, torch.float32)
    mask = _padding_mask(2, 33)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    assert_close(attention_ref(q, k, v, key_padding_mask=mask), ref, torch.float32, "attention_ref")


def test_attention_strided_inputs():
    # q, k, v as the model makes them: a (B, T, H, D) projection transposed to (B, H, T, D)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 3, 3, 32, generator=g).to(DEVICE)  # (B, T, qkv, H, D)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D), non-contiguous
    assert not q.is_contiguous()
    mask = _padding_mask(2, 40)
    assert_close(attention(q, k, v, key_padding_mask=mask),
                 attention_ref(q, k, v, key_padding_mask=mask), torch.float32, "strided")


def test_attention_fully_masked_rows_give_zero():
    # a sequence with no real key at all: defined as output 0 and zero gradients (SDPA: NaN)
    q, k, v = _qkv(2, 2, 20, 32, torch.float32)
    mask = _padding_mask(2, 20)
    mask[1] = False
    out = attention(q, k, v, key_padding_mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(out, attention_ref(q, k, v, key_padding_mask=mask), torch.float32, "out")
    dq, dk, dv = _grads(out, (q, k, v))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all() and g[1].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 2, 70, 32), (1, 2, 130, 64)], ids=lambda s: "x".join(map(str, s)))
def test_attention_dropout_matches_reference_mask(shape, dtype):
    # the reference draws the very same keep-mask through dropout_mask(), so they agree exactly
    p, seed = 0.25, 1234
    q, k, v = _qkv(*shape, dtype)
    mask = _padding_mask(shape[0], shape[2])
    out = attention(q, k, v, key_padding_mask=mask, dropout_p=p, seed=seed)
    qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = attention_ref(qr, kr, vr, key_padding_mask=mask, dropout_p=p, seed=seed)
    assert_close(out, ref, dtype, "out")
    for name, g, gr in zip("qkv", _grads(out, (q, k, v)), _grads(ref, (qr, kr, vr))):
        assert_close(g, gr, dtype, f"d{name}")
    # and dropout did something: without it the output differs
    assert (out.float() - attention(q, k, v, key_padding_mask=mask).float()).abs().max() > 0.1


def test_dropout_keep_rate():
    for p in (0.1, 0.5):
        keep = dropout_mask(2, 4, 128, seed=7, dropout_p=p, device=DEVICE)  # 131k draws
        assert keep.shape == (2, 4, 128, 128) and keep.dtype == torch.bool
        assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    # independent across heads/rows: the masks of two heads are not copies
    assert not torch.equal(keep[0, 0], keep[0, 1])


def test_dropout_seeds():
    q, k, v = _qkv(1, 2, 50, 32, torch.float32)
    a = attention(q, k, v, dropout_p=0.1, seed=11)
    assert torch.equal(a, attention(q, k, v, dropout_p=0.1, seed=11))
    assert not torch.equal(a, attention(q, k, v, dropout_p=0.1, seed=12))
    # seeds 0 and 1 are valid too (Triton specialises the integer 1 as a constant)
    assert not torch.equal(attention(q, k, v, dropout_p=0.1, seed=0), attention(q, k, v, dropout_p=0.1, seed=1))
    # seed=None draws from torch's generator: reproducible under torch.manual_seed
    torch.manual_seed(5)
    b = attention(q, k, v, dropout_p=0.1)
    torch.manual_seed(5)
    assert torch.equal(b, attention(q, k, v, dropout_p=0.1))


def _bad(**over):
    q, k, v = (torch.randn(2, 2, 8, 32, device=DEVICE) for _ in range(3))
    args = dict(q=q, k=k, v=v, key_padding_mask=None, dropout_p=0.0)
    args.update(over)
    return args


@pytest.mark.parametrize("args, match", [
    (_bad(q=torch.randn(2, 8, 32)), "4-d"),
    (_bad(k=torch.randn(2, 2, 9, 32)), "same shape"),
    (_bad(q=torch.randn(2, 2, 8, 48), k=torch.randn(2, 2, 8, 48), v=torch.randn(2, 2, 8, 48)), "head dim 48"),
    (_bad(key_padding_mask=torch.ones(2, 9, dtype=torch.bool)), "key_padding_mask"),
    (_bad(key_padding_mask=torch.ones(2, 8)), "key_padding_mask"),
    (_bad(q=torch.randn(2, 2, 8, 32, dtype=torch.float64)), "dtype"),
    (_bad(q=torch.randn(2, 2, 32, 8).transpose(-1, -2)), "unit stride"),
    (_bad(dropout_p=1.0), "dropout_p"),
], ids=["rank", "shape", "headdim", "mask-shape", "mask-dtype", "dtype", "stride", "dropout"])
def test_attention_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        attention(**{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in args.items()})


def test_attention_custom_op_opcheck():
    # schema, fake (meta) implementation, autograd registration and AOT dispatch
    q, k, v = _qkv(1, 2, 20, 32, torch.float32)
    mask = _padding_mask(1, 20)
    op = torch.ops.tinytlm.attention_fwd.default
    torch.library.opcheck(op, (q, k, v, mask, 0.0, None))
    torch.library.opcheck(op, (q, k, v, None, 0.2, torch.tensor([3], device=DEVICE)))


def test_attention_dropout_seed_stays_on_the_device(monkeypatch):
    # the seed is an int64 device tensor that the kernels read: an int seed and the same seed as a
    # tensor give one mask, and neither the forward nor the backward calls .item() (a host sync,
    # and a value that a CUDA graph would freeze)
    q, k, v = _qkv(1, 2, 20, 32, torch.float32)
    seed = torch.tensor([77], device=DEVICE)
    assert torch.equal(attention(q, k, v, dropout_p=0.3, seed=seed), attention(q, k, v, dropout_p=0.3, seed=77))
    assert torch.equal(dropout_mask(1, 2, 20, seed, 0.3, DEVICE), dropout_mask(1, 2, 20, 77, 0.3, DEVICE))
    rng = torch.cuda.get_rng_state if DEVICE == "cuda" else torch.get_rng_state  # q's device's generator
    before = rng()

    def no_item(t):
        raise AssertionError("Tensor.item() called: a host sync")
    monkeypatch.setattr(torch.Tensor, "item", no_item)
    for s in (None, 77, seed):
        _grads(attention(q, k, v, dropout_p=0.3, seed=s), (q, k, v))
    monkeypatch.undo()
    drawn = rng()
    assert not torch.equal(before, drawn)  # seed None drew from the generator of q's device
    attention(q, k, v)
    assert torch.equal(rng(), drawn)  # without dropout nothing is drawn: dropout-free runs are unchanged


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_attention_autocast_matches_sdpa(with_mask):
    # autocast runs SDPA in its dtype (bf16 here) on fp32 inputs: the kernel must compute in it too
    dtype = torch.bfloat16
    q, k, v = _qkv(2, 2, 24, 32, torch.float32)
    mask = _padding_mask(2, 24) if with_mask else None
    with torch.autocast(DEVICE, dtype=dtype):
        out = attention(q, k, v, key_padding_mask=mask)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    assert out.dtype == ref.dtype == dtype
    assert_close(out, ref, dtype, "out")
    for name, g, gr in zip("qkv", _grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        assert g.dtype == gr.dtype == torch.float32  # autograd casts the gradients back to the fp32 leaves
        assert_close(g, gr, dtype, f"d{name}")


def _loss(q, k, v, mask):
    return attention(q, k, v, key_padding_mask=mask, dropout_p=0.1, seed=9).square().sum()


def test_attention_compiles_fullgraph():
    # fullgraph=True fails on any graph break; aot_eager traces forward and backward graphs
    q, k, v = _qkv(1, 2, 20, 32, torch.float32)
    mask = _padding_mask(1, 20)
    ref = torch.autograd.grad(_loss(q, k, v, mask), (q, k, v))
    compiled = torch.compile(_loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, mask), (q, k, v))
    for g, gr in zip(got, ref):
        assert_close(g, gr, torch.float32, "compiled grad")


@pytest.mark.slow
def test_attention_compiles_inductor():
    # the real training setting: inductor (on CPU it builds C++, ~40 s)
    torch._dynamo.reset()
    q, k, v = _qkv(1, 2, 20, 32, torch.float32)
    mask = _padding_mask(1, 20)
    ref = torch.autograd.grad(_loss(q, k, v, mask), (q, k, v))
    got = torch.autograd.grad(torch.compile(_loss, fullgraph=True)(q, k, v, mask), (q, k, v))
    for g, gr in zip(got, ref):
        assert_close(g, gr, torch.float32, "inductor grad")
