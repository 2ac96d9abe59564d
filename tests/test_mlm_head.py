"""The MLM head's two implementations through the whole model (Impl.head, tinytlm/kernel_path.py): the chunked
decoder + cross-entropy (kernels/linear_ce.py) gives the plain path's counts, loss and every parameter's
gradient, for one model and K stacked members, in fp32 (to float rounding) and under CPU bf16 autocast (to
bf16's rounding); its step traces as one torch.compile graph; the rule picks it on the CPU."""
import pytest
import torch

from tinytlm.common import UserError
from tinytlm.kernel_path import Impl, default_head
from tinytlm.members import stack_models
from tinytlm.mlm_rows import mlm_rows
from tinytlm.model import BertConfig, BertForMLM

CFG = BertConfig.preset("tiny", n_layer=1, vocab_size=301, dropout=0.0, attn_dropout=0.0)


def _models(k, head, chunk=7):
    singles = []
    for seed in range(k):
        torch.manual_seed(seed)
        singles.append(BertForMLM(CFG, impl=Impl(head=head, head_chunk=chunk)))
    return stack_models(singles)


def _batch(k, slots, B=3, T=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(5, CFG.vocab_size, (k * B, T), generator=g)
    x[1, 10:] = 0  # padding
    t = torch.where(torch.rand(x.shape, generator=g) < 0.25, x, -100)
    t[:, 1] = x[:, 1]
    if k > 1:
        t[B:2 * B] = -100  # member 1: no target at all (a torchrun share can be empty): sum 0, not nan
    rows, y = mlm_rows(t, slots, k)
    return x, rows, y


def _step(model, x, rows, y, amp=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        counts, loss = model(x, attention_mask=x != 0, targets=y, rows=rows)
    counts[:, 0].sum().backward()  # the sums, as torchrun's loss reads them
    return counts.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("k,slots", [(1, 0), (1, 3), (3, 3), (3, 0)])
def test_chunked_head_matches_plain_fp32(k, slots):
    plain, chunked = _models(k, "plain"), _models(k, "chunked")
    x, rows, y = _batch(k, slots)
    (pc, pl, pg), (cc, cl, cg) = _step(plain, x, rows, y), _step(chunked, x, rows, y)
    assert pc.shape == cc.shape == (k, 3)
    torch.testing.assert_close(cc, pc, rtol=1e-5, atol=1e-5)  # loss sums, correct, counts
    torch.testing.assert_close(cl, pl, rtol=1e-5, atol=1e-5, equal_nan=True)  # member 1 of 3: no target, nan
    assert set(cg) == set(pg)
    for n in pg:
        torch.testing.assert_close(cg[n], pg[n], rtol=1e-4, atol=1e-6, msg=n)
    if k > 1:
        assert cc[1].abs().sum() == 0 and cg["head.bias"][1].abs().max() == 0


def test_chunked_head_matches_plain_bf16_autocast():
    """Both paths multiply in bf16; the chunked one rounds the decoder gradient once per chunk: agreement to
    a few bf16 roundings (2^-8 relative) of each tensor's scale, not bit for bit."""
    plain, chunked = _models(2, "plain"), _models(2, "chunked")
    x, rows, y = _batch(2, 3)
    (pc, pl, pg), (cc, cl, cg) = _step(plain, x, rows, y, amp=True), _step(chunked, x, rows, y, amp=True)
    torch.testing.assert_close(cc[:, 0], pc[:, 0], rtol=2e-2, atol=1e-2)
    assert torch.equal(cc[:, 2], pc[:, 2]) and (cc[:, 1] - pc[:, 1]).abs().max() <= 2  # near-tie argmax flips
    for n in pg:
        scale = float(pg[n].float().abs().max()) + 1e-6
        assert (cg[n].float() - pg[n].float()).abs().max() <= 3e-2 * scale, n


def test_without_targets_logits_as_before():
    plain, chunked = _models(1, "plain"), _models(1, "chunked")
    x, rows, _ = _batch(1, 3)
    with torch.no_grad():
        torch.testing.assert_close(chunked(x, rows=rows)[0], plain(x, rows=rows)[0])


def test_chunked_step_is_one_graph():
    import torch._dynamo
    model = _models(2, "chunked")
    x, rows, y = _batch(2, 3)  # static slots: a fixed number of head rows
    for amp in (False, True):
        torch._dynamo.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            exp = torch._dynamo.explain(lambda x, y, rows: model(x, targets=y, rows=rows)[1])(x, y, rows)
        assert exp.graph_break_count == 0, [str(b.reason) for b in exp.break_reasons]


def test_rule_and_bad_choice():
    assert default_head("cpu") == "chunked" and default_head(torch.device("cuda", 0)) == "plain"
    with pytest.raises(UserError, match="MLM head"):
        Impl(head="fused")
    with pytest.raises(UserError, match="MLM head"):
        Impl(head="chunked", head_chunk=0)
