"""The variable-length fused attention (kernels/attention_varlen.py) against its plain-torch reference and
against the padded kernel, forward and gradients, dropout replayed.

On CPU the kernels run in the Triton interpreter (conftest); on a GPU natively (the GPU session runs this file
with the other kernel tests).
"""
import os

import pytest
import torch

pytest.importorskip("triton")

from kernels.attention import attention  # noqa: E402
from kernels.attention_varlen import attention_varlen, attention_varlen_ref  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # as tests/test_kernels.py


def assert_close(got, ref, dtype, what):
    got, ref = got.float(), ref.float()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 0.1)
    assert err <= REL_TOL[dtype] * scale, f"{what}: max err {err:.3g} vs max |ref| {scale:.3g}"


def packed(lens, H, D, dtype, fillers=0, seed=0):
    """q, k, v as views of one packed (N, 3, H, D) projection (the model's layout), contiguous sequences of
    these lengths, then `fillers` rows of no sequence; seq_start, seq_len (S,) int32."""
    g = torch.Generator().manual_seed(seed)
    N = sum(lens) + fillers
    x = torch.randn(N, 3, H, D, generator=g).to(DEVICE, dtype).requires_grad_(True)
    starts = torch.tensor([0, *lens[:-1]]).cumsum(0)
    as_int = (torch.tensor(t, dtype=torch.int32, device=DEVICE) for t in (starts.tolist(), lens))
    return x, *x.unbind(1), *as_int


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.autograd.grad(out, inputs, torch.randn(out.shape, generator=g).to(DEVICE, out.dtype))


CASES = [  # (sequence lengths, H, D, max_seqlen): a zero-length sequence, tails under a tile, > 1 tile, D = 128
    ([5, 0, 33, 17], 2, 16, 40),
    ([70, 1, 64], 2, 32, 70),
    ([130, 3], 1, 64, 130),
    ([20, 9], 1, 128, 24),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[0])) + f"-d{c[2]}")
def test_varlen_matches_reference(case, dtype):
    lens, H, D, T = case
    if dtype == torch.bfloat16 and D != 32:
        pytest.skip("bf16: one shape is enough (the interpreter upcasts; a GPU runs bf16 tiles)")
    x, q, k, v, start, n = packed(lens, H, D, dtype, fillers=6)
    out = attention_varlen(q, k, v, start, n, T)
    assert out.shape == q.shape and out.dtype == dtype
    xr = x.detach().float().requires_grad_(True)
    ref = attention_varlen_ref(*xr.unbind(1), start, n, T)
    assert_close(out, ref, dtype, "out")
    assert out[-6:].abs().max() == 0  # rows of no sequence: 0
    g, gr = grads(out, x)[0], grads(ref, xr)[0]  # (N, 3, H, D): dq, dk, dv at once
    assert g.dtype == dtype and g[-6:].abs().max() == 0
    for i, name in enumerate("qkv"):
        assert_close(g[:, i], gr[:, i], dtype, f"d{name}")


def test_varlen_equals_the_padded_kernel_dropout_included():
    """The same sequences right-padded to T and run by the padded kernel with a key-padding mask: every real
    row equal, with dropout too (the varlen kernel's draw for sequence s is the padded one's for row s)."""
    lens, H, D, T, p = [40, 7, 64], 2, 32, 64, 0.3
    x, q, k, v, start, n = packed(lens, H, D, torch.float32)
    real = torch.arange(T, device=DEVICE) < n[:, None]  # (S, T)
    for dropout in (0.0, p):
        padded = x.new_zeros(len(lens), T, 3, H, D).masked_scatter(real[..., None, None, None], x)  # (S, T, 3, H, D)
        qp, kp, vp = (t.transpose(1, 2) for t in padded.unbind(2))  # (S, H, T, D)
        out = attention_varlen(q, k, v, start, n, T, dropout_p=dropout, seed=21)
        ref = attention(qp, kp, vp, key_padding_mask=real, dropout_p=dropout, seed=21).transpose(1, 2)[real]
        assert (out - ref).abs().max() < 1e-5  # the same tiles: equal up to rounding (exactly, in practice)
        g, gr = grads(out, x)[0], grads(ref, x)[0]
        assert (g - gr).abs().max() < 1e-5 * max(1.0, gr.abs().max().item())


def test_varlen_dropout_matches_reference_mask():
    lens, H, D, T, p = [33, 5, 20], 2, 16, 40, 0.25
    x, q, k, v, start, n = packed(lens, H, D, torch.float32, fillers=3)
    out = attention_varlen(q, k, v, start, n, T, dropout_p=p, seed=1234)
    ref = attention_varlen_ref(q, k, v, start, n, T, dropout_p=p, seed=1234)
    assert_close(out, ref, torch.float32, "out")
    for i, (g, gr) in enumerate(zip(grads(out, x)[0].unbind(1), grads(ref, x)[0].unbind(1))):
        assert_close(g, gr, torch.float32, f"d{'qkv'[i]}")
    assert (out - attention_varlen(q, k, v, start, n, T)).abs().max() > 0.1  # dropout did something
    assert torch.equal(out, attention_varlen(q, k, v, start, n, T, dropout_p=p, seed=1234))  # and is replayed


def _bad(**over):
    x = torch.randn(10, 3, 2, 16, device=DEVICE)
    args = dict(q=x[:, 0], k=x[:, 1], v=x[:, 2], seq_start=torch.tensor([0, 4], dtype=torch.int32, device=DEVICE),
                seq_len=torch.tensor([4, 6], dtype=torch.int32, device=DEVICE), max_seqlen=8, dropout_p=0.0)
    return {**args, **over}


@pytest.mark.parametrize("args, match", [
    (_bad(q=torch.randn(1, 10, 2, 16)), "3-d"),
    (_bad(k=torch.randn(9, 2, 16)), "same shape"),
    (_bad(q=torch.randn(10, 2, 24), k=torch.randn(10, 2, 24), v=torch.randn(10, 2, 24)), "head dim 24"),
    (_bad(seq_len=torch.tensor([4, 6])), "seq_len"),
    (_bad(seq_start=torch.tensor([0], dtype=torch.int32)), "starts"),
    (_bad(max_seqlen=0), "max_seqlen"),
    (_bad(dropout_p=1.0), "dropout_p"),
], ids=["rank", "shape", "headdim", "len-dtype", "count", "maxlen", "dropout"])
def test_varlen_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        attention_varlen(**{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in args.items()})


def test_varlen_custom_op_opcheck_and_fullgraph_compile():
    x, q, k, v, start, n = packed([9, 14], 2, 16, torch.float32, fillers=2)
    op = torch.ops.tinytlm.attention_varlen_fwd.default
    torch.library.opcheck(op, (q, k, v, start, n, 16, 0.0, None))
    torch.library.opcheck(op, (q, k, v, start, n, 16, 0.2, torch.tensor([3], device=DEVICE)))

    def loss(x):
        q, k, v = x.unbind(1)
        return attention_varlen(q, k, v, start, n, 16, dropout_p=0.1, seed=9).square().sum()
    ref = torch.autograd.grad(loss(x), x)[0]
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(x), x)[0]
    assert_close(got, ref, torch.float32, "compiled grad")
