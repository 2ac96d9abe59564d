"""The training loop with --kernels triton tracks the torch path (CPU: Triton interpreter)."""
import json

import pytest

pytest.importorskip("triton")
import train_mlm  # noqa: E402

SMALL = ["--model", "tiny", "--n_layer", "1", "--n_head", "1", "--head_dim", "32", "--device", "cpu",
         "--ws", "16", "--epochs", "1", "--batch_size", "4", "--log_every", "1", "--lr", "1e-3"]


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "step"]


@pytest.mark.parametrize("n_conv", [0, 1])
def test_triton_loss_curve_tracks_torch(roots, tmp_path, n_conv):
    raw, data = roots
    common = [*SMALL, "--raw", str(raw), "--data", str(data), "--dropout", "0", "--attn_dropout", "0",
              "--n_conv", str(n_conv), "--conv_channels", "16"]
    train_mlm.main([*common, "--kernels", "torch", "--out", str(tmp_path / "torch")])
    train_mlm.main([*common, "--kernels", "triton", "--out", str(tmp_path / "triton")])
    a, b = losses(tmp_path / "torch"), losses(tmp_path / "triton")
    assert len(a) == len(b) == 4
    # same data, masks and init; without dropout the two paths differ only by rounding
    assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    assert a[-1] < a[0]  # and the loss goes down, so the curve is a real training curve


@pytest.mark.parametrize("n_conv", [0, 1])
def test_training_step_with_triton_kernels_has_no_graph_break(n_conv):
    """The Triton kernels are custom ops: torch.compile captures the whole step as one graph."""
    import torch
    import torch._dynamo
    from tinytlm.model import BertConfig, BertForMLM, set_kernels
    torch.manual_seed(0)
    m = BertForMLM(BertConfig.preset("tiny", n_layer=1, n_head=1, head_dim=32, n_conv=n_conv, conv_channels=8))
    set_kernels(m, "triton")
    x = torch.randint(1000, 30000, (2, 32))
    t = torch.full_like(x, -100)
    t[:, 3] = x[:, 3]
    for mode, grad in (("train", True), ("eval", True), ("eval", False)):  # stem: conv kernels / folded BN
        getattr(m, mode)()
        with torch.set_grad_enabled(grad):
            exp = torch._dynamo.explain(lambda x, t: m(x, targets=t, per_row=2)[1])(x, t)
        assert exp.graph_break_count == 0, [str(b.reason) for b in exp.break_reasons]
        assert exp.graph_count == 1


def test_conv2d_same_custom_op_check():
    import torch
    from kernels.conv_stem import _conv2d_same_op
    x = torch.randn(2, 3, 8, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    torch.library.opcheck(_conv2d_same_op, (x, w, b))
