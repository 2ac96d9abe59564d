"""--unpad (tinytlm/unpad.py): the trunk on the packed real tokens gives the padded path's losses and
gradients (dropout off, fp32, CPU: within 1e-5 relative), for MLM (dynamic and static sparse heads, the
dense head) and classification, one model and stacked members, with and without a conv stem, torch and
Triton (interpreter) attention, and the torch attention in length blocks (block_cuts' least cost, every real
token in one block); the training loops give the padded runs' curves and weights."""
import json

import pytest
import torch

from tinytlm import finetune, pretrain
from tinytlm.checkpoint import load_checkpoint
from tinytlm.kernel_path import Impl
from tinytlm.members import stack_models
from tinytlm.mlm_rows import mlm_rows
from tinytlm.model import BertConfig, BertForClassification, BertForMLM
from tinytlm.unpad import block_cuts, length_blocks, pack, pack_plan, unpack

TOL = 1e-5


def batch(B, T, seed, vocab=512):
    """(ids, attention mask, MLM targets): [CLS] ... [SEP] then padding, random lengths (row 0 full, row 1
    one token), row 2 with a hole in its mask (a real token that is not attended to: masks need not be
    right padding); ~30% of the real non-special tokens chosen as MLM targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(200, vocab, (B, T), generator=g)
    lens = torch.randint(3, T + 1, (B,), generator=g)
    lens[0], lens[1] = T, 1
    col = torch.arange(T)[None]
    x[:, 0], x[col == lens[:, None] - 1] = 101, 102
    x[col >= lens[:, None]] = 0
    mask = x != 0
    mask[2, 1] = False
    targets = torch.where(mask & (x > 102) & (torch.rand(B, T, generator=g) < 0.3), x, -100)
    return x, mask, targets


@pytest.fixture
def small_bucket(monkeypatch):
    monkeypatch.setattr("tinytlm.unpad.BUCKET", 16)  # small batches: a small bucket, so the packing saves rows


def build(kind, K, n_conv, unpad, kernels="torch", attn_blocks=1):
    """The model of this kind (the same weights for any unpad, kernels and blocks: seeded alike)."""
    cfg = BertConfig.preset("tiny", n_layer=2, n_head=2, head_dim=16, vocab_size=512, dropout=0.0, attn_dropout=0.0,
                            n_conv=n_conv, conv_channels=4)
    impl = Impl(kernels, unpad, attn_blocks=attn_blocks)
    singles = []
    for s in range(K):
        torch.manual_seed(s)
        singles.append(BertForMLM(cfg, impl=impl) if kind.startswith("mlm")
                       else BertForClassification(cfg, 3, impl=impl))
    model = stack_models(singles)
    if n_conv:  # the stem runs on the padded layout either way: torch keeps the interpreter fast
        stem = type(model.bert.stem)(cfg, K)
        stem.load_state_dict(model.bert.stem.state_dict())
        model.bert.stem = stem
    return model


def run(model, kind, x, mask, targets):
    """(loss, {name: grad}) of one forward + backward; checks that an unpadded encoder saw packed rows."""
    seen = []
    unpad = model.bert.unpad
    hook = model.bert.encoder.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    model.zero_grad(set_to_none=True)
    if kind == "cls":
        y = torch.arange(x.size(0)) % 3
        _, loss = model(x, mask, targets=y)
    elif kind == "mlm-dense":
        _, loss = model(x, mask, targets=targets)
    else:
        rows, y = mlm_rows(targets, 4 if kind == "mlm-static" else 0, model.members)
        _, loss = model(x, mask, targets=y, rows=rows)
    loss.sum().backward()
    hook.remove()
    assert len(seen[0]) == (2 if unpad else 3) and (not unpad or seen[0][0] < x.numel()), seen  # (K*N, H), K*N < B*T
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert ((la - lb).abs() <= TOL * lb.abs()).all(), (la, lb)
    assert ga.keys() == gb.keys()
    floor = 1e-2 * max(g.abs().max().item() for g in gb.values())  # gradients 0 in exact arithmetic (a conv
    for name, g in ga.items():  # bias before a train-mode BatchNorm) carry only rounding noise
        err, scale = (g - gb[name]).abs().max().item(), max(gb[name].abs().max().item(), floor)
        assert err <= TOL * scale, (name, err, scale)


# ----------------------------------------------------------------------------- the packing

def test_pack_plan_layout_and_round_trip():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0],  # member 0: 5 real tokens
                         [1, 1, 1, 1, 1], [1, 0, 1, 1, 0]]).bool()  # member 1: 8, one row with a hole
    p = pack_plan(mask, members=2, bucket=4)
    assert p.budget == 8 and p.T == 5  # the larger member's 8 tokens, a multiple of 4
    assert p.index.tolist() == [0, 1, 2, 5, 6, 3, 4, 7,  10, 11, 12, 13, 14, 15, 17, 18]
    assert p.valid.tolist() == [True] * 5 + [False] * 3 + [True] * 8  # member 0's fillers: its own padding
    assert p.seq_start.tolist() == [0, 3, 8, 13] and p.seq_len.tolist() == [3, 2, 5, 3]
    assert (p.index % p.T).tolist()[8:] == [0, 1, 2, 3, 4, 0, 2, 3]  # the padded column: a hole keeps positions
    x = torch.randn(4, 5, 3)
    y = pack(x, p)  # (16, 3)
    assert torch.equal(y[p.valid], x[mask]) and torch.equal(unpack(y, p), x * mask[..., None])
    assert pack_plan(mask, members=2, bucket=128).budget == 10  # never more than a member's B'*T
    assert pack_plan(mask, members=1, bucket=4).budget == 16 and pack_plan(mask & False, bucket=4).budget == 4


def test_budgets_round_to_buckets():
    # any token count gives one of B*T / bucket shapes: a compiled step or CUDA graph per bucket, not per batch
    B, T = 8, 32
    budgets = {pack_plan(torch.arange(B * T).view(B, T) < n, bucket=64).budget for n in range(1, B * T + 1)}
    assert budgets == {64, 128, 192, 256}


def cut_cost(lens, cuts, overhead):
    """The cost model block_cuts minimises, for ascending lens cut at cuts (block ends)."""
    starts = [0, *cuts[:-1]]
    return sum((e - s) * lens[e - 1] * (lens[e - 1] + 64) + overhead for s, e in zip(starts, cuts))


def test_block_cuts_least_cost():
    # against every way of cutting a short sorted list into at most G contiguous blocks
    import itertools

    from tinytlm.unpad import BLOCK_OVERHEAD
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        n, G = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        lens = sorted(torch.randint(1, 129, (n,), generator=g).tolist())
        cuts = block_cuts(lens, G)
        assert cuts[-1] == n and cuts == sorted(set(cuts)) and len(cuts) <= G and cuts[0] > 0, (lens, G, cuts)
        every = [[*c, n] for k in range(G) for c in itertools.combinations(range(1, n), k)]
        best = min(cut_cost(lens, c, BLOCK_OVERHEAD) for c in every)
        assert cut_cost(lens, cuts, BLOCK_OVERHEAD) == pytest.approx(best), (lens, G, cuts)
    assert block_cuts([128] * 32, 4) == [32]  # equal lengths: one block
    assert block_cuts([10] * 31 + [128], 4) == [31, 32]  # one long row: a block of its own


def test_length_blocks_cover_every_real_token_once(monkeypatch):
    # stacked members with fillers, an empty row and a row with a hole: each real packed row is read by exactly
    # one real slot of one block, within its own sequence, and `back` brings it home; fillers get the zero row
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1],  # member 0
                         [1, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]]).bool()  # member 1
    p = pack_plan(mask, members=2, bucket=4)
    monkeypatch.setattr("tinytlm.unpad.BLOCK_OVERHEAD", 0)  # no fixed cost per block: these short rows get 3
    lb = length_blocks(p.seq_start, p.seq_len, p.valid.numel(), 3)
    assert len(lb.blocks) == 3
    seq_of = torch.full((p.valid.numel(),), -1)
    for b, (s, n) in enumerate(zip(p.seq_start.tolist(), p.seq_len.tolist())):
        seq_of[s:s + n] = b
    read = []
    for gather, key_mask in lb.blocks:
        n, L = key_mask.shape
        assert L == int(key_mask.sum(1).max()) and (key_mask.sum(1) > 0).all()  # padded to its longest only
        rows = gather.view(n, L)
        assert (seq_of[rows] == seq_of[rows[:, :1]]).all()  # a block row reads one sequence, padding included
        read += rows[key_mask].tolist()
    assert sorted(read) == torch.nonzero(p.valid).flatten().tolist()  # every real token once, no filler
    qkv = torch.randn(p.valid.numel(), 6)
    slots = torch.cat([*(qkv.index_select(0, gth) for gth, _ in lb.blocks), qkv.new_zeros(1, 6)])
    got = slots.index_select(0, lb.back)
    assert torch.equal(got, torch.where(p.valid[:, None], qkv, 0.0))


@pytest.mark.usefixtures("small_bucket")
@pytest.mark.parametrize("K", [1, 2], ids=["single", "stacked2"])
@pytest.mark.parametrize("kind", ["mlm", "cls"])
def test_length_blocks_equal_one_layout(kind, K, monkeypatch):
    # the torch attention per length block gives the (B, T) layout's losses and gradients; no block overhead in
    # the cost model so that these short rows are cut into several blocks (checked)
    monkeypatch.setattr("tinytlm.unpad.BLOCK_OVERHEAD", 0)
    x, mask, targets = batch(6 * K, 24, seed=7 + K)
    plan = pack_plan(mask, K, blocks=3)
    assert len(plan.blocks.blocks) == 3
    assert_same(*(run(build(kind, K, 0, True, attn_blocks=g), kind, x, mask, targets) for g in (3, 1)))


def test_attn_blocks_rule_and_bad_value():
    from tinytlm.common import UserError
    from tinytlm.config import Switches
    assert Switches().impl(torch.device("cpu")).attn_blocks == 4 and Switches().impl().attn_blocks == 1
    assert Switches().impl(torch.device("cuda", 0)).attn_blocks == 1
    for bad in (0, 2.0, "4"):
        with pytest.raises(UserError, match="length blocks"):
            Impl(attn_blocks=bad)


# ----------------------------------------------------------------------------- the model

@pytest.mark.usefixtures("small_bucket")
@pytest.mark.parametrize("K", [1, 2], ids=["single", "stacked2"])
@pytest.mark.parametrize("n_conv", [0, 1], ids=["nostem", "stem"])
@pytest.mark.parametrize("kind", ["mlm", "mlm-static", "cls"])
def test_unpadded_equals_padded(kind, n_conv, K):
    x, mask, targets = batch(4 * K, 24, seed=K + 2 * n_conv)
    assert_same(*(run(build(kind, K, n_conv, unpad), kind, x, mask, targets) for unpad in (True, False)))


@pytest.mark.usefixtures("small_bucket")
def test_dense_head_and_logits_without_targets():
    x, mask, targets = batch(6, 24, seed=5)
    models = [build("mlm", 2, 0, unpad) for unpad in (True, False)]
    assert_same(*(run(m, "mlm-dense", x, mask, targets) for m in models))
    with torch.no_grad():  # logits equal at real tokens; the unpadded head read 0 at padding
        a, b = models[0](x, mask)[0], models[1](x, mask)[0]
    assert (a - b)[mask].abs().max() <= TOL * b.abs().max()


@pytest.mark.usefixtures("small_bucket")
@pytest.mark.parametrize("kind, K, n_conv", [("mlm", 2, 0), ("cls", 1, 1)], ids=["mlm-stacked2", "cls-stem"])
def test_unpadded_equals_padded_triton(kind, K, n_conv):
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, mask, targets = (t.to(device) for t in batch(3 * K, 40, seed=7))
    assert_same(*(run(build(kind, K, n_conv, unpad, "triton").to(device), kind, x, mask, targets)
                  for unpad in (True, False)))


def test_built_unpadded_and_dropout_draws():
    """A model built unpadded runs every forward unpadded (evaluation included); with dropout on the unpadded
    path trains (finite, masks redrawn per call), from other draws than the padded one."""
    cfg = BertConfig.preset("tiny", n_layer=1, vocab_size=512)
    models = []
    for unpad in (True, False):
        torch.manual_seed(0)
        models.append(BertForMLM(cfg, impl=Impl(unpad=unpad)))
    model, padded = models
    x, mask, targets = batch(4, 24, seed=1)
    rows, y = mlm_rows(targets)
    a, b = (model(x, mask, targets=y, rows=rows)[1] for _ in range(2))
    assert torch.isfinite(a) and a != b
    model.eval(), padded.eval()
    with torch.no_grad():
        assert torch.allclose(model(x, mask, targets=y, rows=rows)[1], padded(x, mask, targets=y, rows=rows)[1],
                              rtol=TOL)


# ----------------------------------------------------------------------------- the training loops

SMALL = ["--model", "tiny", "--arch", "n_layer=1,n_head=2,head_dim=16", "--device", "cpu",
         "--arch", "dropout=0,attn_dropout=0", "--lr", "1e-3", "--precision", "fp32"]


def step_losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def assert_same_weights(a, b):
    for k, v in b["model"].items():
        assert (a["model"][k] - v).abs().max().item() <= TOL * max(1.0, v.abs().max().item()), k


def test_training_loops_unpadded_equal_padded(roots, tmp_path):
    raw, data = roots
    mlm = [*SMALL, "--ws", "16", "--epochs", "1", "--batch_size", "4", "--log_every", "1", "--raw", str(raw),
           "--data", str(data)]
    for name, extra in (("padded", ["--unpad", "off"]), ("unpad", ["--unpad"])):
        pretrain.main([*mlm, "--out", str(tmp_path / name), *extra])
    assert step_losses(tmp_path / "unpad") == pytest.approx(step_losses(tmp_path / "padded"), rel=TOL)
    for name, packed in (("unpad", True), ("padded", False)):  # config.json says what ran
        impl = json.loads((tmp_path / name / "config.json").read_text())["impl"]
        assert impl["unpad"] is packed and impl["attn_blocks"] == 4  # a CPU run's rule, recorded
    assert_same_weights(load_checkpoint(tmp_path / "unpad"), load_checkpoint(tmp_path / "padded"))
    cls = ["--task", "agnews", "--train-per-label", "4", "--test-per-label", "3", "--epochs", "2", "--batch_size", "4",
           "--lr", "1e-3", "--device", "cpu", "--precision", "fp32", "--quiet", "--raw", str(raw), "--data", str(data),
           "--seeds", "0,1",
           "--init", str(tmp_path / "padded")]
    results = {}
    # stacked members, trained and scored unpadded
    for name, extra in (("padded", ["--unpad", "off"]), ("unpad", ["--unpad"])):
        finetune.main([*cls, "--out", str(tmp_path / f"cls-{name}"), *extra])
        results[name] = [json.loads((tmp_path / f"cls-{name}" / f"s{s}" / "result.json").read_text()) for s in (0, 1)]
    for a, b in zip(results["unpad"], results["padded"]):
        assert a["acc_per_epoch"] == b["acc_per_epoch"]
    for s in (0, 1):
        assert_same_weights(*(load_checkpoint(tmp_path / f"cls-{n}" / f"s{s}") for n in ("unpad", "padded")))


@pytest.mark.usefixtures("small_bucket")
@pytest.mark.slow  # ~20 s of dynamo on this CPU
def test_compiled_unpadded_forward_equals_eager(monkeypatch):
    """torch.compile (aot_eager: the graphs inductor would compile) around the one graph break, pack_plan's
    host sync: two batches of different token budgets (a new shape: recompiled) give the eager losses. Built
    with length blocks (the CPU's rule): eager runs the attention per block, compiled the one static layout."""
    monkeypatch.setattr("tinytlm.unpad.BLOCK_OVERHEAD", 0)  # these short rows: several blocks (checked)
    torch.manual_seed(0)
    model = BertForMLM(BertConfig.preset("tiny", n_layer=1, n_head=1, head_dim=16, vocab_size=512, dropout=0.0),
                       impl=Impl(unpad=True, attn_blocks=3))
    compiled = torch.compile(model, backend="aot_eager")
    budgets = []
    for seed in (0, 1):
        x, mask, targets = batch(4, 24, seed=seed)
        budgets.append(pack_plan(mask).budget)
        assert len(pack_plan(mask, blocks=3).blocks.blocks) > 1
        rows, y = mlm_rows(targets)
        with torch.no_grad():
            got, want = compiled(x, mask, targets=y, rows=rows)[1], model(x, mask, targets=y, rows=rows)[1]
        assert (got - want).abs() <= TOL * want.abs()
    assert budgets[0] != budgets[1] and max(budgets) < 4 * 24


def test_unpad_switch_auto_packs_on_cpu_only():
    """--unpad off | on | auto (default): auto packs on a CPU (kernel_path.default_unpad), not on CUDA; --unpad
    alone = on; the old boolean spellings (a saved config's true/false) read as on/off; a bad value names --unpad."""
    from tinytlm.config import Switches, add_dataclass_args, dataclass_from_args
    from tinytlm.common import ArgParser, UserError
    assert Switches().unpad == "auto"
    assert Switches().impl(torch.device("cpu")).unpad is True
    assert Switches().impl(torch.device("cuda", 0)).unpad is False
    assert Switches().impl().unpad is False  # no device: the reference, padded
    assert Switches(unpad="off").impl(torch.device("cpu")).unpad is False
    assert Switches(unpad="on").impl(torch.device("cuda", 0)).unpad is True
    assert [Switches(unpad=v).unpad for v in (True, False, "true", "False")] == ["on", "off", "on", "off"]
    ap = ArgParser()
    add_dataclass_args(ap, Switches)
    assert [dataclass_from_args(Switches, ap.parse_args(a)).unpad for a in (["--unpad"], [], ["--unpad", "off"])] \
        == ["on", "auto", "off"]
    with pytest.raises(UserError, match="--unpad"):
        Switches(unpad="sometimes")
