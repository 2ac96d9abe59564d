"""kernels/dropout.py, the 15-bit-lane dropout, against F.dropout's semantics: the drop rate within binomial
bounds of the quantized p, an unbiased output, the backward = grad * mask * scale with the very mask of the
forward (redrawn from the same seed), the generator advanced by a fixed amount, p = 0 / eval = x itself,
fp32 and bf16 (autocast), non-contiguous inputs, bad p rejected, torch.compile without a graph break."""
import math

import pytest
import torch

from kernels.dropout import LANES, dropout, keep_mask, reference, scale_of, threshold

N = 1 << 20  # elements of the statistical tests: a drop rate's standard deviation is <= 0.0005


def _sigma(p):
    return math.sqrt(p * (1 - p) / N)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.25, 0.5, 0.9])
def test_drop_rate_within_binomial_bounds(p):
    torch.manual_seed(1)
    x = torch.ones(N)
    out = dropout(x, p)
    p_eff = threshold(p) / LANES
    rate = float((out == 0).float().mean())
    assert abs(rate - p_eff) < 6 * _sigma(p_eff), (rate, p_eff)
    # every kept element is exactly x * scale, the scale exact for p_eff
    assert torch.equal(out[out != 0], torch.full_like(out[out != 0], 1 / (1 - p_eff)))
    # the reference drops at the same rate (so the lanes are not biased the other way)
    ref_rate = float((reference(x, p) == 0).float().mean())
    assert abs(rate - ref_rate) < 9 * _sigma(p)


def test_quantization_bound():
    for p in torch.linspace(0, 0.999, 997).tolist() + [2 ** -17, 0.1, 1 - 2 ** -15]:
        assert abs(threshold(p) / LANES - p) <= 2 ** -16, p
        assert scale_of(p) == LANES / (LANES - threshold(p))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_output_is_unbiased(p):
    torch.manual_seed(2)
    x = torch.randn(N).abs() + 0.5  # positive, so the mean's deviation is a binomial one
    out = dropout(x, p)
    # E[out] = x: the mean of out/x is 1 within the binomial error of the kept fraction times the scale
    ratio = float((out / x).mean())
    assert abs(ratio - 1) < 6 * _sigma(p) * scale_of(p), ratio


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 13), (2, 3, 5, 11), (1000,)])
def test_forward_and_backward_equal_the_formula_with_the_same_mask(dtype, shape):
    p = 0.3
    x = torch.randn(shape).to(dtype).requires_grad_()
    g = torch.randn(shape).to(dtype)
    torch.manual_seed(3)
    out = dropout(x, p)
    out.backward(g)
    torch.manual_seed(3)
    keep = keep_mask(shape, p, x.device)  # the forward's mask, redrawn
    assert keep.dtype == torch.bool and keep.shape == x.shape
    assert 0 < int(keep.sum()) < keep.numel()
    scale = scale_of(p)
    # x * keep is exact; the scale is applied in fp32 and rounded once to the dtype
    want = torch.where(keep, (x.detach().float() * scale).to(dtype), torch.zeros((), dtype=dtype))
    assert out.dtype == dtype and torch.equal(out.detach(), want)
    assert torch.equal(x.grad, torch.where(keep, (g.float() * scale).to(dtype), torch.zeros((), dtype=dtype)))


def test_same_seed_same_mask_and_the_generator_advances_by_a_fixed_amount():
    x, y = torch.randn(33, 17), torch.randn(33, 17)
    torch.manual_seed(4)
    a = dropout(x, 0.2) != 0
    after = torch.get_rng_state()
    torch.manual_seed(4)
    b = dropout(y, 0.2) != 0  # other values, same shape: the same mask, the same generator state after
    assert torch.equal(a, b) and torch.equal(after, torch.get_rng_state())
    torch.manual_seed(4)
    torch.randint(0, 2, (-(-33 * 17 // 4),), dtype=torch.int64)  # ceil(numel / 4) 64-bit words, nothing else
    torch.randint(-2, 2, (1,))  # (a small-range draw consumes differently: the states must differ from here)
    assert not torch.equal(after, torch.get_rng_state())
    torch.manual_seed(4)
    torch.randint(-(1 << 62), 1 << 62, (-(-33 * 17 // 4),), dtype=torch.int64)
    assert torch.equal(after, torch.get_rng_state())
    torch.manual_seed(5)
    assert not torch.equal(a, dropout(x, 0.2) != 0)  # another seed, another mask
    assert not torch.equal(a, dropout(x, 0.2) != 0)  # and the next call another


def test_p_zero_and_eval_give_x_itself():
    x = torch.randn(10, 10)
    state = torch.get_rng_state()
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.5, training=False) is x
    assert torch.equal(state, torch.get_rng_state())  # and nothing is drawn


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), 1 - 2 ** -16, 1 - 2 ** -17])
def test_bad_p_rejected(p):
    with pytest.raises(ValueError, match="dropout: p="):
        dropout(torch.ones(3), p)


def test_non_contiguous_input_gets_the_contiguous_mask():
    base = torch.randn(20, 30)
    x = base.t()  # (30, 20), non-contiguous
    torch.manual_seed(6)
    a = dropout(x, 0.4)
    torch.manual_seed(6)
    b = dropout(x.contiguous(), 0.4)
    assert torch.equal(a, b)
    sl = base[:, ::3]  # strided columns
    torch.manual_seed(7)
    c = dropout(sl, 0.4)
    torch.manual_seed(7)
    assert torch.equal(c, dropout(sl.contiguous(), 0.4))


def test_under_bf16_autocast():
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        out = dropout(h, 0.25)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    kept = out != 0
    assert torch.equal(out[kept], (h[kept].float() * scale_of(0.25)).bfloat16())


def test_torch_compile_traces_it_without_a_graph_break():
    def f(x):
        return dropout(x, 0.5) * 2

    x = torch.randn(4000, requires_grad=True)
    assert torch._dynamo.explain(f)(x).graph_break_count == 0
    torch._dynamo.reset()
    out = torch.compile(f)(x)
    out.sum().backward()
    kept = out != 0
    assert 0.4 < float(kept.float().mean()) < 0.6
    assert torch.equal(x.grad, kept.float() * 2 * scale_of(0.5))  # the backward used the forward's mask
