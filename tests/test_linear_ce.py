"""kernels/linear_ce.py against its plain reference (full logits + F.cross_entropy): losses, argmax counts and
the gradients of the hidden states, decoder weight and bias, for one model, K stacked members with their own
decoders, and K members sharing one; fp32 to float rounding, bf16 autocast within bf16's rounding."""
import pytest
import torch

from kernels.linear_ce import _chunk_rows, linear_cross_entropy, reference


def _case(k, shared, n=50, h=16, v=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, n, h, generator=g).requires_grad_()
    w = torch.randn(*((v, h) if shared else (k, v, h)), generator=g).requires_grad_()
    b = torch.randn(*((v,) if shared else (k, v)), generator=g).requires_grad_()
    t = torch.randint(0, v, (k, n), generator=g)
    t[:, ::3] = -100
    return x, w, b, t


def _run(f, x, w, b, t, scale):
    for p in (x, w, b):
        p.grad = None
    loss, correct, count = f(x, w, b, t)
    (loss * scale).sum().backward()
    return loss.detach(), correct, count, x.grad.clone(), w.grad.clone(), b.grad.clone()


@pytest.mark.parametrize("k,shared,chunk", [(1, True, 7), (3, False, 7), (3, True, 16), (2, False, 64)])
def test_matches_reference_fp32(k, shared, chunk):
    x, w, b, t = _case(k, shared)
    scale = torch.tensor([1.0, -0.5, 2.0][:k])
    ref = _run(reference, x, w, b, t, scale)
    got = _run(lambda *a: linear_cross_entropy(*a, chunk=chunk), x, w, b, t, scale)
    for name, r, o in zip(("loss", "correct", "count", "dx", "dw", "db"), ref, got):
        assert r.shape == o.shape, name
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=name)
    assert int(got[2].sum()) == int((t != -100).sum())


def test_two_dim_inputs_and_no_grad():
    x, w, b, t = _case(1, True)
    loss, correct, count = linear_cross_entropy(x[0].detach(), w.detach(), b.detach(), t[0], chunk=5)
    r = reference(x[0].detach(), w.detach(), b.detach(), t[0])
    assert loss.shape == (1,) and not loss.requires_grad
    torch.testing.assert_close(loss, r[0])
    assert torch.equal(correct, r[1]) and torch.equal(count, r[2])


def test_member_without_targets_adds_zero():
    x, w, b, t = _case(2, False)
    t[1] = -100
    loss, _, count = linear_cross_entropy(x, w, b, t, chunk=8)
    assert count[1] == 0 and loss[1] == 0 and torch.isfinite(loss).all()
    loss.sum().backward()
    assert x.grad[1].abs().max() == 0 and w.grad[1].abs().max() == 0


def test_no_rows_gives_zero_gradients():
    # no rows at all: the weight-gradient buffer is written by the first chunk only, so an empty batch must zero it
    x, w, b, t = _case(2, False, n=0)
    loss, correct, count = linear_cross_entropy(x, w, b, t, chunk=8)
    assert loss.tolist() == [0.0, 0.0] and count.tolist() == [0, 0]
    loss.sum().backward()
    assert w.grad.abs().max() == 0 and b.grad.abs().max() == 0


def test_bf16_autocast_within_rounding():
    """Under CPU bf16 autocast both paths multiply in bf16; ours rounds the weight gradient once per chunk
    instead of once, so they agree to bf16's 8-bit mantissa (relative 2^-8 ~ 4e-3), not bit for bit."""
    x, w, b, t = _case(2, False, n=64, h=32, v=211)
    ref, got = [], []
    for f, out in ((reference, ref), (lambda *a: linear_cross_entropy(*a, chunk=16), got)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.extend(_run(f, x, w, b, t, torch.ones(2)))
    for name, r, o in zip(("loss", "correct", "count", "dx", "dw", "db"), ref, got):
        if name == "correct":  # an argmax may flip between near-ties of rounded logits
            assert (o - r).abs().max() <= 2
            continue
        tol = 2e-2 * float(r.float().abs().max()) + 1e-6
        assert (o.float() - r.float()).abs().max() <= tol, name


def test_bad_shapes_and_chunk():
    x, w, b, t = _case(1, True)
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(x, w[:, :5], b, t)
    with pytest.raises(ValueError, match="chunk=0"):
        linear_cross_entropy(x, w, b, t, chunk=0)


@pytest.mark.parametrize("n,chunk,want", [(600, 512, 300), (460, 1024, 460), (1025, 1024, 513), (7, 3, 3),
                                          (6, 3, 3), (0, 8, 1), (1, 1, 1)])
def test_chunks_are_as_even_as_can_be(n, chunk, want):
    """The fewest chunks of at most `chunk` rows, even: no short tail chunk (its products run slowly)."""
    size = _chunk_rows(n, chunk)
    assert size == want and size <= max(chunk, 1) and -(-max(n, 1) // size) == -(-max(n, 1) // chunk)
