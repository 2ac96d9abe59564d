"""The Triton conv-stem kernels against their plain-torch references (tests/test_kernels.py has the
attention kernels and the shared tolerance helper), forward and gradients, one model and stacked members."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

# (tests.test_kernels sets up the interpreter, or skips without CUDA)
from tests.test_kernels import DEVICE, _grads, assert_close  # noqa: E402
from kernels.conv_stem import conv2d_same, conv_stem_infer, conv_stem_infer_ref  # noqa: E402
from tinytlm.kernel_path import Impl  # noqa: E402
from tinytlm.model import BertConfig, ConvStem, fold_bn  # noqa: E402

# PyTorch warns that 'same' with an even kernel (16 x 3) pads a copy: expected, in the references
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


# ----------------------------------------------------------------------------- conv stem

def _stem(n_conv, d, kernel, seed=0, kernels="torch"):
    """The model's ConvStem (kernels 'torch': the reference) with non-trivial BatchNorm parameters
    and running statistics (the same for either kernels: seeded alike)."""
    torch.manual_seed(seed)
    stem = ConvStem(BertConfig(n_conv=n_conv, conv_channels=d, conv_kernel=kernel), impl=Impl(kernels))
    with torch.no_grad():
        for bn in list(stem.bns) + [stem.proj_bn]:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return stem.to(DEVICE)


STEM_CASES = [  # (n_conv, d, kernel, T, H): T * H never a multiple of the 64-pixel tile
    (1, 32, (3, 3), 9, 13),
    (2, 64, (3, 3), 10, 7),
    (1, 64, (16, 3), 20, 11),
    (2, 32, (16, 3), 18, 5),
    pytest.param((3, 64, (16, 3), 19, 6), marks=pytest.mark.slow),
    pytest.param((3, 32, (3, 3), 130, 24), marks=pytest.mark.slow),
]


def test_fold_bn_matches_conv_then_bn():
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 8, (4, 3), padding="same").to(DEVICE), _stem(1, 8, (3, 3)).bns[0].eval()
    w, b = fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    x = torch.randn(2, 3, 9, 7, device=DEVICE)
    with torch.no_grad():
        assert_close(F.conv2d(x, w, b, padding="same"), bn(conv(x)), torch.float32, "fold_bn")


@pytest.mark.parametrize("kernel", [(1, 1), (3, 3), (16, 3), (4, 5), (2, 2)], ids=lambda k: f"{k[0]}x{k[1]}")
def test_conv2d_same_matches_torch(kernel):
    # forward and all three gradients, odd and even kernels (asymmetric 'same' padding)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 19, 7, generator=g).to(DEVICE).requires_grad_(True)
    w = (0.3 * torch.randn(5, 3, *kernel, generator=g)).to(DEVICE).requires_grad_(True)
    b = torch.randn(5, generator=g).to(DEVICE).requires_grad_(True)
    y = conv2d_same(x, w, b)
    ref = F.conv2d(x, w, b, padding="same")
    assert_close(y, ref, torch.float32, "conv")
    for name, gg, gr in zip(("x", "w", "b"), _grads(y, (x, w, b)), _grads(ref, (x, w, b))):
        assert_close(gg, gr, torch.float32, f"d{name}")


@pytest.mark.parametrize("case", STEM_CASES, ids=lambda c: f"L{c[0]}-d{c[1]}-{c[2][0]}x{c[2][1]}-{c[3]}x{c[4]}")
def test_conv_stem_infer_matches_eval_reference(case):
    n_conv, d, kernel, T, H = case
    stem = _stem(n_conv, d, kernel).eval()
    x = torch.randn(2, T, H, device=DEVICE)
    with torch.no_grad():
        ref = stem(x)
        folded = conv_stem_infer_ref(x, stem.fold())  # the op's own plain-torch reference
        via_model = _stem(n_conv, d, kernel, kernels="triton").eval()(x)  # eval without autograd: the fused op
    y = conv_stem_infer(x, stem.fold())
    assert y.shape == (2, T, H)
    assert_close(folded, ref, torch.float32, "fold")
    assert_close(y, ref, torch.float32, "conv_stem_infer")
    assert torch.equal(via_model, y)


def test_conv_stem_infer_bf16():
    stem = _stem(2, 32, (16, 3)).eval()
    x = torch.randn(2, 17, 9, device=DEVICE)
    with torch.no_grad():
        ref = stem(x.bfloat16().float())
    y = conv_stem_infer(x.bfloat16(), stem.fold())
    assert y.dtype == torch.bfloat16
    assert_close(y, ref, torch.bfloat16, "conv_stem_infer bf16")


@pytest.mark.parametrize("case", STEM_CASES[:4] + [pytest.param((3, 64, (16, 3), 12, 7), marks=pytest.mark.slow)],
                         ids=lambda c: f"L{c[0]}-d{c[1]}-{c[2][0]}x{c[2][1]}-{c[3]}x{c[4]}")
def test_conv_stem_train_matches_reference(case):
    # train-mode BatchNorm (batch statistics): outputs, gradients of the input and of every
    # parameter, and the running statistics updated by the step
    n_conv, d, kernel, T, H = case
    # the Triton convs inside the model's stem; stem_ref stays on torch
    stem, stem_ref = _stem(n_conv, d, kernel, kernels="triton").train(), _stem(n_conv, d, kernel).train()
    x = torch.randn(3, T, H, device=DEVICE, requires_grad=True)
    y, ref = stem(x), stem_ref(x)
    assert_close(y, ref, torch.float32, "forward")
    got = _grads(y, [x, *stem.parameters()])
    want = _grads(ref, [x, *stem_ref.parameters()])
    names = ["x"] + [n for n, _ in stem.named_parameters()]
    for name, g, gr in zip(names, got, want):
        # floor 1: a conv bias right before train-mode BN has gradient 0 up to fp32 noise
        assert_close(g, gr, torch.float32, f"d{name}", floor=1.0)
    for (name, b), (_, br) in zip(stem.named_buffers(), stem_ref.named_buffers()):
        assert_close(b.float(), br.float(), torch.float32, name)


def test_conv_stem_bad_input():
    params = _stem(1, 32, (3, 3)).eval().fold()
    with pytest.raises(ValueError, match=r"\(B, T, H\)"):
        conv_stem_infer(torch.randn(2, 1, 8, 8, device=DEVICE), params)
    with pytest.raises(ValueError, match="projection"):
        conv_stem_infer(torch.randn(2, 8, 8, device=DEVICE), params[:-1])
    with pytest.raises(ValueError, match="dtype"):
        conv_stem_infer(torch.randn(2, 8, 8, device=DEVICE, dtype=torch.float64), params)


def test_reference_stem_is_the_paper_stem():
    # the reference itself: 'same' padding keeps (B, T, H), and the layer structure
    stem = _stem(2, 32, (16, 3))
    assert [c.kernel_size for c in stem.convs] == [(16, 3), (16, 3)]
    assert [c.in_channels for c in stem.convs] == [1, 32] and stem.proj.kernel_size == (1, 1)
    assert stem(torch.randn(2, 20, 11, device=DEVICE)).shape == (2, 20, 11)


# ----------------------------------------------------------------------------- stacked members (groups)

def _stacked(stems):
    """ConvStem.fold() of K stacked members from K single-member stems: every layer's weights and
    biases concatenated member-major along the output channels (K*d convs, a (K, d, 1, 1) projection)."""
    folds = [s.fold() for s in stems]
    return [{n: torch.cat([f[i][n] for f in folds]) for n in ("weight", "bias")} for i in range(len(folds[0]))]


@pytest.mark.parametrize("groups", [2, 3])
@pytest.mark.parametrize("kernel", [(3, 3), (16, 3)], ids=lambda k: f"{k[0]}x{k[1]}")
def test_conv2d_same_groups_matches_torch(kernel, groups):
    # x (B, G*C_in, T, W), weight (G*C_out, C_in, kh, kw); T * W = 51: a partial tile
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, groups * 2, 17, 3, generator=g).to(DEVICE).requires_grad_(True)
    w = (0.3 * torch.randn(groups * 3, 2, *kernel, generator=g)).to(DEVICE).requires_grad_(True)
    b = torch.randn(groups * 3, generator=g).to(DEVICE).requires_grad_(True)
    y = conv2d_same(x, w, b, groups=groups)
    ref = F.conv2d(x, w, b, padding="same", groups=groups)
    assert_close(y, ref, torch.float32, "conv")
    for name, gg, gr in zip(("x", "w", "b"), _grads(y, (x, w, b)), _grads(ref, (x, w, b))):
        assert_close(gg, gr, torch.float32, f"d{name}")


def test_conv2d_same_groups_model_layout():
    # the stem's first layer as the model calls it: x (K*B, T, H) seen as (B, K, T, H), a strided view,
    # K*d = 192 output channels in all (over MAX_CHANNELS; 64 per group); T * H = 91: two tiles
    K, B, T, H, d = 3, 2, 13, 7, 64
    x = torch.randn(K * B, T, H, device=DEVICE, requires_grad=True)
    h = x.view(K, B, T, H).transpose(0, 1)  # (B, K, T, H), not contiguous
    w = torch.randn(K * d, 1, 3, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(K * d, device=DEVICE, requires_grad=True)
    y, ref = conv2d_same(h, w, b, groups=K), F.conv2d(h, w, b, padding="same", groups=K)
    assert y.shape == (B, K * d, T, H)
    assert_close(y, ref, torch.float32, "conv")
    for name, gg, gr in zip(("x", "w", "b"), _grads(y, (x, w, b)), _grads(ref, (x, w, b))):
        assert_close(gg, gr, torch.float32, f"d{name}")


MEMBER_CASES = [  # (K, n_conv, d, kernel, T, H), 2 rows per member; T * H not a multiple of 64
    (2, 1, 32, (16, 3), 17, 3),
    (3, 2, 32, (3, 3), 9, 7),  # a middle layer: channels-last (B, T, W, K*d) activations
]


@pytest.mark.parametrize("case", MEMBER_CASES, ids=lambda c: f"K{c[0]}-L{c[1]}-d{c[2]}-{c[3][0]}x{c[3][1]}")
def test_conv_stem_infer_members(case):
    K, n_conv, d, kernel, T, H = case
    B = 2
    stems = [_stem(n_conv, d, kernel, seed=k).eval() for k in range(K)]
    params = _stacked(stems)
    x = torch.randn(K * B, T, H, device=DEVICE)  # member-major rows
    xs = x.view(K, B, T, H)
    with torch.no_grad():
        unstacked = torch.cat([s(xk) for s, xk in zip(stems, xs)])  # every member's own torch stem
        ref = conv_stem_infer_ref(x, params, members=K)  # grouped torch convs
    y = conv_stem_infer(x, params, members=K)
    assert y.shape == x.shape and ref.shape == x.shape
    assert_close(ref, unstacked, torch.float32, "conv_stem_infer_ref")
    assert_close(y, unstacked, torch.float32, "conv_stem_infer")
    # stacking does not couple members: member k's rows are exactly those of member k run alone
    # on its slice of the parameters (the same program, on the same data)
    for k in range(K):
        own = [{n: p[n].chunk(K)[k] for n in p} for p in params]
        assert torch.equal(y[k * B:(k + 1) * B], conv_stem_infer(xs[k], own)), f"member {k}"


def test_conv_stem_infer_members_bf16():
    K, B, T, H = 2, 2, 9, 7
    stems = [_stem(1, 32, (3, 3), seed=k).eval() for k in range(K)]
    x = torch.randn(K * B, T, H, device=DEVICE)
    with torch.no_grad():
        ref = torch.cat([s(xk) for s, xk in zip(stems, x.bfloat16().float().view(K, B, T, H))])
    y = conv_stem_infer(x.bfloat16(), _stacked(stems), members=K)
    assert y.dtype == torch.bfloat16
    assert_close(y, ref, torch.bfloat16, "conv_stem_infer bf16, 2 members")


def test_conv_groups_bad_input():
    x, w, b = (torch.randn(*s, device=DEVICE) for s in ((2, 4, 8, 8), (6, 2, 3, 3), (6,)))
    two = _stacked([_stem(1, 32, (3, 3), seed=k).eval() for k in range(2)])
    xs = torch.randn(4, 8, 8, device=DEVICE)
    split = [{n: p[n][:63] for n in p} for p in two[:1]] + two[1:]  # 63 channels for 2 members
    narrow = two[:1] + [{"weight": two[1]["weight"][:, :16], "bias": two[1]["bias"]}]  # projection of d = 16
    cases = [
        (lambda: conv2d_same(x, w, b, groups=3), r"groups\*C_in=6"),  # x has 4 channels, 3 groups want 6
        (lambda: conv2d_same(x, w[:5], b[:5], groups=2), "do not split"),
        (lambda: conv2d_same(x, w, b, groups=0), "positive int"),
        (lambda: conv2d_same(x[:, :2], torch.randn(258, 1, 1, 1), torch.randn(258), groups=2), "per group"),
        (lambda: conv_stem_infer(xs[:3], two, members=2), "multiple of members=2"),
        (lambda: conv_stem_infer(xs, two, members=0), "positive int"),
        (lambda: conv_stem_infer(torch.randn(6, 8, 8, device=DEVICE), two, members=3), "projection"),
        (lambda: conv_stem_infer(xs, _stem(1, 32, (3, 3)).eval().fold(), members=2), "projection"),
        (lambda: conv_stem_infer(xs, split, members=2), "do not split"),
        (lambda: conv_stem_infer(xs, narrow, members=2), r"projection must be \(2, 32, 1, 1\)"),
    ]
    for i, (call, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            call()
            pytest.fail(f"case {i}: no error")


def test_conv_custom_ops_opcheck_groups():
    # schema (the int groups / members argument), fake, autograd registration and AOT dispatch
    x = torch.randn(1, 4, 5, 3, device=DEVICE, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(6, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.tinytlm.conv2d_same.default, (x, w, b, 2))
    params = _stacked([_stem(1, 16, (3, 3), seed=k).eval() for k in range(2)])
    args = (torch.randn(2, 5, 3, device=DEVICE), [p["weight"] for p in params], [p["bias"] for p in params], 2)
    torch.library.opcheck(torch.ops.tinytlm.conv_stem_infer.default, args)
