"""The fast dropout (kernels/dropout.py) wired into the model by Impl(dropout="fast"): every dropout module is
it, the attention runs SDPA's math explicitly with it on the probabilities (equal to SDPA without dropout, and
to a reference drawn from the same mask with it), the same losses and gradients as the torch path when the
dropout is 0, the device rule (fast on the CPU) and the bad name rejected."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.dropout import dropout, keep_mask, scale_of
from tinytlm.common import UserError
from tinytlm.config import Switches
from tinytlm.kernel_path import FastDropout, Impl, TorchAttention, default_dropout, math_attention
from tinytlm.members import stack_models
from tinytlm.mlm_rows import mlm_rows
from tinytlm.model import BertConfig, BertForClassification, BertForMLM

FAST, TORCH = Impl(dropout="fast"), Impl()


def _qkv(B=3, nh=2, T=10, D=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, nh, T, D, generator=g).to(dtype).requires_grad_() for _ in range(3))
    key = torch.ones(B, T, dtype=torch.bool)
    key[0, 7:] = False  # padding at the end of row 0
    key[1, ::3] = False  # scattered masked keys in row 1
    return q, k, v, key[:, None, None, :]  # mask (B, 1, 1, T)


def _grads(out, ins, g):
    return torch.autograd.grad(out, ins, g)


def test_explicit_attention_equals_sdpa_without_dropout():
    q, k, v, mask = _qkv()
    g = torch.randn(q.shape)
    out = math_attention(q, k, v, mask, 0.0, dropout)  # the test hook: the explicit path, dropout off
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(out, (q, k, v), g), _grads(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with sdpa_kernel(SDPBackend.MATH):  # SDPA's math path: the same operations, so the same bits
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_explicit_attention_equals_sdpa_under_bf16_autocast():
    q, k, v, mask = _qkv(dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = math_attention(q, k, v, mask, 0.0, dropout)
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)  # fp32 inside, as the math path
    torch.testing.assert_close(out, fused, rtol=2e-2, atol=2e-2)


def test_a_row_with_no_key_gets_zero_as_sdpa_math():
    q, k, v, mask = _qkv()
    mask = mask.clone()
    mask[2] = False
    out = math_attention(q, k, v, mask, 0.3, dropout)
    assert torch.isfinite(out).all() and torch.equal(out[2], torch.zeros_like(out[2]))
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(math_attention(q, k, v, mask, 0.0, dropout)[2], ref[2])


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_explicit_attention_dropout_equals_a_reference_with_the_same_mask(p):
    q, k, v, mask = _qkv(seed=1)
    g = torch.randn(q.shape)
    torch.manual_seed(11)
    out = math_attention(q, k, v, mask, p, dropout)
    # the reference: SDPA's attention weights written plainly, the mask redrawn from the same seed
    scores = (q @ k.transpose(-2, -1)) / q.size(-1) ** 0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # (B, nh, T, T)
    torch.manual_seed(11)
    keep = keep_mask(probs.shape, p, probs.device)
    ref = (probs * keep * scale_of(p)) @ v
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(out, (q, k, v), g), _grads(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (out - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max() > 0.05  # it dropped


def test_torch_attention_takes_the_explicit_path_only_with_fast_dropout_and_p():
    B, T, nh, D = 2, 6, 2, 4
    qkv = torch.randn(B, T, 3 * nh * D)
    key = torch.ones(B, T, dtype=torch.bool)
    key[1, 4:] = False
    fast, plain = FAST.attention(), TORCH.attention()
    assert isinstance(fast, TorchAttention) and isinstance(plain, TorchAttention)
    assert torch.equal(fast.padded(qkv, key, nh, 0.0), plain.padded(qkv, key, nh, 0.0))  # p = 0: SDPA both
    torch.manual_seed(3)
    a = fast.padded(qkv, key, nh, 0.4)
    torch.manual_seed(3)
    q, k, v = qkv.view(B, T, 3, nh, D).unbind(2)
    ref = math_attention(*(t.transpose(1, 2) for t in (q, k, v)), key[:, None, None, :], 0.4, dropout)
    assert torch.equal(a, ref.transpose(1, 2).reshape(B, T, -1))


def _cfg(**kw):
    return BertConfig.preset("tiny", **{"n_layer": 2, "vocab_size": 300, "max_pos": 24, **kw})


def _batch(B=4, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, 300, (B, T), generator=g)
    x[1, 17:] = 0  # padding
    t = torch.where(torch.rand(B, T, generator=g) < 0.3, x, -100)
    t[:, 1] = x[:, 1]
    return x, x != 0, t


def _loss_and_grads(model, kind, x, am, t):
    model.zero_grad(set_to_none=True)
    if kind == "mlm":
        rows, y = mlm_rows(t, 0, model.members)
        loss = model(x, am, y, rows=rows)[1]
    else:
        loss = model(x, am, t[:, 1] % 4)[1]
    loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,members", [("mlm", 1), ("cls", 1), ("mlm", 2)])
def test_fast_model_with_dropout_zero_equals_the_torch_model(kind, members):
    cfg = _cfg(dropout=0.0, attn_dropout=0.0)
    models = []
    for impl in (TORCH, FAST):
        torch.manual_seed(0)
        m = BertForMLM(cfg, impl=impl) if kind == "mlm" else BertForClassification(cfg, 4, impl=impl)
        models.append((stack_models([m, m]) if members > 1 else m).train())
    assert models[0].state_dict().keys() == models[1].state_dict().keys()
    x, am, t = _batch()
    x, am, t = (torch.cat([a] * members) for a in (x, am, t))
    (la, ga), (lb, gb) = (_loss_and_grads(m, kind, x, am, t) for m in models)
    assert torch.equal(la, lb) and ga.keys() == gb.keys()
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


def test_every_dropout_of_the_model_is_the_chosen_one():
    fast = BertForClassification(_cfg(), 4, impl=FAST)
    torch_ = BertForClassification(_cfg(), 4, impl=TORCH)
    drops = [m for m in fast.modules() if isinstance(m, (FastDropout, torch.nn.Dropout))]
    assert len(drops) == 1 + 2 + 1 and all(isinstance(m, FastDropout) for m in drops)  # emb, one per block, cls
    assert not any(isinstance(m, FastDropout) for m in torch_.modules())
    assert all(isinstance(b.attn.attention, TorchAttention) and b.attn.attention._dropout is not None
               for b in fast.bert.encoder.blocks)


def test_fast_model_trains_with_dropout_and_evaluates_as_the_torch_model():
    cfg = _cfg(dropout=0.2, attn_dropout=0.2)
    torch.manual_seed(0)
    fast = BertForMLM(cfg, impl=FAST)
    torch.manual_seed(0)
    ref = BertForMLM(cfg, impl=TORCH)
    x, am, _ = _batch()
    fast.train()
    torch.manual_seed(1)
    a = fast(x, am)[0]
    torch.manual_seed(1)
    assert torch.equal(a, fast(x, am)[0])  # the masks come from torch's generator: replayed by its seed
    assert not torch.equal(a, fast(x, am)[0])  # and the next step draws new ones
    fast.eval(), ref.eval()
    torch.testing.assert_close(fast(x, am)[0], ref(x, am)[0], rtol=0, atol=0)  # eval: no dropout, SDPA both
    assert (a - fast(x, am)[0]).abs().max() > 0.1  # training did drop


def test_device_rule_and_the_run_impl():
    assert default_dropout("cpu") == "fast" and default_dropout(torch.device("cuda", 0)) == "torch"
    assert Switches().impl(torch.device("cpu")).dropout == "fast"
    assert Switches().impl().dropout == "torch"  # no device: the reference


def test_a_bad_dropout_name_is_one_line():
    with pytest.raises(UserError, match="dropout implementation 'bernoulli': choose torch or fast") as e:
        Impl(dropout="bernoulli")
    assert "\n" not in str(e.value)


def test_a_training_forward_with_fast_dropout_is_one_graph():
    """--compile on: dynamo traces every fast dropout and the explicit attention with no graph break."""
    model = BertForMLM(_cfg(n_layer=1), impl=Impl(head="chunked", dropout="fast")).train()
    x, am, t = _batch()
    rows, y = mlm_rows(t)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(lambda *a: model(*a, rows=rows)[1])(x, am, y)
    assert ex.graph_count == 1 and ex.graph_break_count == 0, ex.break_reasons
