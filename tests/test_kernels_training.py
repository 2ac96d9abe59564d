"""The training loop with --kernels triton tracks the torch path (CPU: Triton interpreter); autocast
parity of the model's Triton stem and attention; the attention dropout seed as device-side state."""
import json
import os

import pytest

pytest.importorskip("triton")
import torch  # noqa: E402

from tinytlm import pretrain  # noqa: E402
from tinytlm.checkpoint import rng_state, set_rng_state  # noqa: E402
from tinytlm.kernel_path import Impl  # noqa: E402
from tinytlm.mlm_rows import mlm_rows  # noqa: E402
from tinytlm.model import BertConfig, ConvStem, SelfAttention  # noqa: E402
from tinytlm.unpad import Padded  # noqa: E402

# CPU: the Triton interpreter (conftest); on a GPU the same tests run natively on CUDA
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "cuda"
SMALL = ["--model", "tiny", "--arch", "n_layer=1,n_head=1,head_dim=32", "--device", DEVICE,
         "--ws", "8", "--epochs", "1", "--batch_size", "2", "--log_every", "1", "--lr", "1e-3"]  # 4 steps


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "step"]


# with a stem: minutes in the CPU interpreter (-m slow there); natively on a GPU it stays in the default run
@pytest.mark.parametrize("n_conv", [0, pytest.param(1, marks=() if torch.cuda.is_available() else pytest.mark.slow)])
def test_triton_loss_curve_tracks_torch(roots, tmp_path, n_conv):
    raw, data = roots
    common = [*SMALL, "--raw", str(raw), "--data", str(data), "--arch", "dropout=0,attn_dropout=0",
              "--arch", f"n_conv={n_conv},conv_channels=16"]
    pretrain.main([*common, "--kernels", "torch", "--out", str(tmp_path / "torch")])
    pretrain.main([*common, "--kernels", "triton", "--out", str(tmp_path / "triton")])
    a, b = losses(tmp_path / "torch"), losses(tmp_path / "triton")
    assert len(a) == len(b) == 4
    # same data, masks and init; without dropout the two paths differ only by rounding
    assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    assert a[-1] < a[0]  # and the loss goes down, so the curve is a real training curve


@pytest.mark.parametrize("n_conv", [0, 1])
def test_training_step_with_triton_kernels_has_no_graph_break(n_conv):
    """The Triton kernels are custom ops: torch.compile captures the whole step as one graph."""
    import torch._dynamo
    from tinytlm.model import BertForMLM
    torch.manual_seed(0)
    m = BertForMLM(BertConfig.preset("tiny", n_layer=1, n_head=1, head_dim=32, n_conv=n_conv, conv_channels=8),
                   impl=Impl("triton")).to(DEVICE)
    x = torch.randint(1000, 30000, (2, 32), device=DEVICE)
    t = torch.full_like(x, -100)
    t[:, 3] = x[:, 3]
    rows, y = mlm_rows(t, 2)  # the sparse head's static slots, chosen outside the model as the loop does
    # stem: conv kernels / folded BN; under autocast the kernel wrappers' casts must trace too
    for mode, grad, amp in (("train", True, False), ("eval", True, False), ("eval", False, False),
                            ("train", True, True), ("eval", False, True)):
        getattr(m, mode)()
        with torch.set_grad_enabled(grad), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=amp):
            exp = torch._dynamo.explain(lambda x, y, rows: m(x, targets=y, rows=rows)[1])(x, y, rows)
        assert exp.graph_break_count == 0, [str(b.reason) for b in exp.break_reasons]
        assert exp.graph_count == 1


def test_conv2d_same_custom_op_check():
    from kernels.conv_stem import _conv2d_same_op
    x = torch.randn(2, 3, 8, 6, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(4, device=DEVICE, requires_grad=True)
    torch.library.opcheck(_conv2d_same_op, (x, w, b))


# ----------------------------------------------------------------------------- autocast parity


def _close(got, ref, what, rel=3e-2):
    # bf16 tolerance, relative to max |ref| (floored at 0.1): the two paths round differently
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= rel * max(ref.float().abs().max().item(), 0.1), f"{what}: max err {err:.3g}"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_conv_stem_under_autocast_matches_torch(mode):
    """bf16 autocast runs the torch stem's convs in bf16; the Triton stem must too (train: conv
    kernels with gradients; eval without autograd: the fused, BN-folded inference op)."""
    torch.manual_seed(0)
    cfg = BertConfig.preset("tiny", n_conv=2, conv_channels=8)
    stems = [getattr(ConvStem(cfg, impl=Impl(k)), mode)().to(DEVICE) for k in ("torch", "triton")]
    stems[1].load_state_dict(stems[0].state_dict())
    x = torch.randn(2, 12, 20, device=DEVICE, requires_grad=True)  # (B, T, H): the stem works on any H
    dout = torch.randn(2, 12, 20, device=DEVICE)
    outs, grads = [], []
    for stem in stems:
        with torch.autocast(DEVICE, dtype=torch.bfloat16), torch.set_grad_enabled(mode == "train"):
            outs.append(stem(x))
        if mode == "train":
            weights = [stem.convs[0].weight, stem.convs[1].weight, stem.proj.weight]
            grads.append(torch.autograd.grad(outs[-1], [x, *weights], dout))
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    _close(outs[1], outs[0], "forward")
    if mode == "train":
        for name, g, gr in zip(["x", "convs.0.weight", "convs.1.weight", "proj.weight"], grads[1], grads[0]):
            assert g.dtype == gr.dtype == torch.float32
            _close(g, gr, f"d{name}")


def test_self_attention_under_autocast_matches_torch():
    # here q, k, v already come out of the autocast Linear in bf16; the kernel-level check with
    # fp32 inputs is test_kernels.py::test_attention_autocast_matches_sdpa
    torch.manual_seed(0)
    cfg = BertConfig.preset("tiny", n_head=2, head_dim=16, attn_dropout=0.0)
    attns = [SelfAttention(cfg, impl=Impl(name)).to(DEVICE) for name in ("torch", "triton")]
    attns[1].load_state_dict(attns[0].state_dict())
    x = torch.randn(2, 24, 32, device=DEVICE, requires_grad=True)
    mask = torch.arange(24, device=DEVICE) < torch.tensor([[24], [15]], device=DEVICE)  # (B, T): row 1 padded
    dout = torch.randn(2, 24, 32, device=DEVICE)
    outs, grads = [], []
    for attn in attns:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            outs.append(attn(x, Padded(mask)))
        grads.append(torch.autograd.grad(outs[-1], [x, attn.qkv.weight], dout))
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    _close(outs[1], outs[0], "forward")
    for name, g, gr in zip(["x", "qkv.weight"], grads[1], grads[0]):
        _close(g, gr, f"d{name}")


# ----------------------------------------------------------------------------- dropout seed

def _dropout_attention():
    """A SelfAttention on Triton kernels with attention dropout 0.5, an input x (B, T, H) and its
    layout (a key-padding mask (B, T))."""
    torch.manual_seed(0)
    attn = SelfAttention(BertConfig.preset("tiny", n_head=1, head_dim=16, attn_dropout=0.5), impl=Impl("triton"))
    x = torch.randn(2, 16, 16, device=DEVICE, requires_grad=True)
    return attn.to(DEVICE), x, Padded(torch.ones(2, 16, dtype=torch.bool, device=DEVICE))


# inductor on CPU imports torch.utils.mkldnn, which warns about its own use of torch.jit
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_attention_dropout_new_masks_each_step_and_replayed_after_restore(compiled):
    """Each training step draws a new dropout seed from the torch generator of the device, so
    (a) two steps on the same input differ and (b) restoring the RNG state that a checkpoint saves
    replays the first step bitwise, output and gradients. That CUDA graph replays draw new masks
    can only be checked on a GPU: test_cuda_graph_replays_draw_new_dropout_masks."""
    attn, x, mask = _dropout_attention()
    dout = torch.randn(x.shape, device=DEVICE)
    fn = torch.compile(attn, fullgraph=True) if compiled else attn
    if compiled:
        # the draw is an op of the graph, on the inputs' device, not hidden inside the kernel op:
        # so inductor and CUDA graphs own it
        graph = torch._dynamo.explain(attn)(x, mask).graphs[0].graph
        draws = [n for n in graph.nodes if n.target is torch.randint]
        assert len(draws) == 1 and draws[0].kwargs["device"] == x.device, graph

    def step():
        y = fn(x, mask)
        return [y, *torch.autograd.grad(y, [x, *attn.parameters()], dout)]

    state = rng_state()
    first, second = step(), step()
    assert not torch.equal(first[0], second[0])  # (a) a new mask each step
    set_rng_state(state)
    for a, b in zip(first, step()):  # (b) a resumed run replays the same masks
        assert torch.equal(a, b)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU and natively compiled kernels")
def test_cuda_graph_replays_draw_new_dropout_masks():
    """compile mode reduce-overhead records the step as a CUDA graph: its replays must draw new
    dropout seeds (a seed read on the host at capture would be frozen into the graph)."""
    from torch._dynamo.utils import counters
    attn, x, mask = _dropout_attention()
    fn = torch.compile(attn, mode="reduce-overhead", fullgraph=True)
    counters.clear()
    outs = []
    with torch.no_grad():
        for _ in range(5):  # warm-up, recording, then replays
            torch.compiler.cudagraph_mark_step_begin()
            outs.append(fn(x, mask).clone())
    assert not counters["inductor"]["cudagraph_skips"]
    assert all(not torch.equal(a, b) for a, b in zip(outs, outs[1:]))
