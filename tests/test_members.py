"""Stacked members: K models trained as one stacked model equal the K single runs (tinytlm/members.py).

With dropout off, every member's final weights must equal the single run with its seed within 1e-5
(max abs, fp32, CPU), for pre-training and fine-tuning, with and without a conv stem, torch and Triton
(interpreter) kernels, eager and compiled. One exception, checked separately: the bias of a conv layer
that feeds a train-mode BatchNorm has gradient 0 in exact arithmetic (the batch mean is subtracted), so
what it receives is fp32 rounding noise, and AdamW's normalisation turns noise into steps of about lr
whose signs depend on summation order (two single runs that sum differently drift the same way). Those
biases, and the running means of the BatchNorms they feed, are checked to stay within that drift, and
to leave the function unchanged: the single model with the member's biases gives its train-mode outputs.
"""
import json
from pathlib import Path

import pytest
import torch

from tinytlm import finetune, pretrain
from tinytlm.checkpoint import build_model, load_checkpoint
from tinytlm.common import Interrupted
from tinytlm.members import (clip_grad_norm_members, load_members, member_optimizer_state, member_state,
                             stack_models, stack_optimizer_states)
from tinytlm.mlm_rows import mlm_rows
from tinytlm.model import BertConfig, BertForClassification, BertForMLM
from tests.test_engine import assert_one_line_error, run

REPO = Path(__file__).resolve().parents[1]
NO_DROPOUT = ["--arch", "dropout=0,attn_dropout=0"]
FP32 = ["--precision", "fp32"]  # the 1e-5 of this file is fp32's (bf16 rounds 2^-9: tests/test_precision.py)
SMALL = ["--model", "tiny", "--arch", "n_layer=1,n_head=1,head_dim=32", "--device", "cpu", *NO_DROPOUT, *FP32]
STEM = ["--arch", "n_conv=1,conv_channels=4"]
LR = "1e-3"  # large enough that a wrong data order, mask or init moves weights far beyond 1e-5
TOL = 1e-5


def mlm_args(roots, out, *extra):
    raw, data = roots
    return [*SMALL, "--ws", "40", "--epochs", "2", "--batch_size", "8", "--lr", LR, "--raw", str(raw),
            "--data", str(data), "--out", str(out), *extra]


def cls_args(roots, out, *extra):
    raw, data = roots
    return ["--task", "agnews", "--train-per-label", "6", "--test-per-label", "4", "--epochs", "2",
            "--batch_size", "8", "--lr", LR, "--device", "cpu", *FP32, "--quiet", "--raw", str(raw), "--data",
            str(data), "--out", str(out), *extra]


def pre_bn_bias(name: str) -> bool:
    """Conv biases feeding a train-mode BatchNorm, and those BatchNorms' running means (see the docstring)."""
    return ".stem." in f".{name}" and (name.endswith(".bias") and ("convs." in name or "proj." in name)
                                       or name.endswith("running_mean"))


def assert_same_model(member: dict, single: dict, drift: float = 0.0):
    """Two checkpoints of one shape: weights within TOL (pre-BN conv biases within `drift`), same step."""
    assert member["step"] == single["step"] and member["epoch"] == single["epoch"]
    assert member["model"].keys() == single["model"].keys()
    for k, v in single["model"].items():
        d = (member["model"][k].double() - v.double()).abs().max().item() if v.numel() else 0.0
        assert d <= (drift if pre_bn_bias(k) else TOL), (k, d)
    if drift:  # those biases do not change the function: the single model with the member's biases
        mixed = {**single, "model": {k: member["model"][k] if pre_bn_bias(k) else v
                                     for k, v in single["model"].items()}}
        ms = [build_model(s).train() for s in (mixed, single)]  # train mode: batch statistics
        x = torch.randint(1000, 3000, (4, 128), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = [m.bert(x) for m in ms]
        assert (out[0] - out[1]).abs().max().item() <= TOL


def ckpt(path):
    return load_checkpoint(path)


@pytest.fixture(scope="module")
def singles(roots, tmp_path_factory):
    """Single pre-training runs, seeds 0 and 1, without and with a conv stem."""
    base = tmp_path_factory.mktemp("singles")
    for name, extra in (("plain", []), ("stem", STEM)):
        for s in (0, 1):
            pretrain.main(mlm_args(roots, base / name / f"s{s}", "--seed", str(s), *extra))
    return base


CASES = {  # name: (singles to compare with, extra flags of the stacked run)
    "plain": ("plain", []),
    "stem": ("stem", STEM),
    "triton": ("plain", ["--kernels", "triton"]),
    "compiled": ("plain", ["--compile"]),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "triton" else c for c in CASES])
def test_stacked_pretraining_equals_single_runs(roots, singles, tmp_path, case):
    ref, extra = CASES[case]
    stem = ref == "stem"
    pretrain.main(mlm_args(roots, tmp_path / "stack", "--seeds", "0,1", *(STEM if stem else []), *extra))
    assert json.loads((tmp_path / "stack" / "stack.json").read_text())["members"] == \
        [str(tmp_path / "stack" / "s0"), str(tmp_path / "stack" / "s1")]
    for s in (0, 1):
        m, one = tmp_path / "stack" / f"s{s}", singles / ref / f"s{s}"
        assert sorted(p.name for p in m.iterdir()) == sorted(p.name for p in one.iterdir())
        a, b = ckpt(m), ckpt(one)
        assert_same_model(a, b, drift=2 * float(LR) * a["step"] if stem else 0.0)  # about lr per step at most
        # the same files a single run writes: config (but --out), data, and the member's own metrics
        assert {**a["train_config"], "out": ""} == {**b["train_config"], "out": "", **{k: a["train_config"][k]
                                                                                     for k in ("compile", "kernels")}}
        assert a["data"] == b["data"] and a["optimizer"] is None
        ea, eb = ([r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
                  for d in (m, one))
        assert [r["loss"] for r in ea] == pytest.approx([r["loss"] for r in eb], abs=1e-4)
    # not a vacuous comparison: the two members differ from each other far beyond the tolerance
    a, b = ckpt(tmp_path / "stack" / "s0"), ckpt(singles / ref / "s1")
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) > 100 * TOL


@pytest.mark.slow  # (minutes in the interpreter; natively in the GPU session's kernel tests)
def test_stacked_stem_with_triton_convs_equals_single_runs(roots, tmp_path):
    """The grouped Triton conv (interpreted: slow, so 2 steps of batch 2) against torch single runs."""
    short = [*STEM, "--batch_size", "2", "--max_steps", "2"]
    for s in (0, 1):
        pretrain.main(mlm_args(roots, tmp_path / f"one{s}", "--seed", str(s), *short))
    pretrain.main(mlm_args(roots, tmp_path / "stack", "--seeds", "0,1", *short, "--kernels", "triton"))
    for s in (0, 1):
        assert_same_model(ckpt(tmp_path / "stack" / f"s{s}"), ckpt(tmp_path / f"one{s}"), drift=2 * float(LR) * 2)


def test_stacked_run_interrupted_resumes_exactly_and_members_stand_alone(roots, singles, tmp_path, monkeypatch,
                                                                        interrupt):
    with pytest.raises(Interrupted) as e, interrupt(3):
        pretrain.main(mlm_args(roots, tmp_path / "b", "--seeds", "0,1"))
    assert f"--resume {tmp_path / 'b'}" in str(e.value)
    assert [ckpt(tmp_path / "b" / f"s{s}")["step"] for s in (0, 1)] == [3, 3]
    pretrain.main(["--resume", str(tmp_path / "b")])
    for s in (0, 1):  # resumed stack == single runs (bitwise to the uninterrupted stack is the same check)
        assert_same_model(ckpt(tmp_path / "b" / f"s{s}"), ckpt(singles / "plain" / f"s{s}"))
    # a member of a stopped stack is an ordinary run: it resumes alone, to the same weights
    pretrain.main(mlm_args(roots, tmp_path / "c", "--seeds", "0,1", "--max_steps", "4"))
    pretrain.main(["--resume", str(tmp_path / "c" / "s1"), "--max_steps", "10"])
    assert_same_model(ckpt(tmp_path / "c" / "s1"), ckpt(singles / "plain" / "s1"))
    # without --out: each member under its single run's name, stack.json under the stack's
    monkeypatch.setenv("TINYTLM_HOME", str(tmp_path))
    pretrain.main(mlm_args(roots, "", "--seeds", "4,5", "--max_steps", "1"))
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    stem = names[0][:-len("-s4")]
    assert names == [f"{stem}-s4", f"{stem}-s4+5", f"{stem}-s5"]
    assert json.loads((tmp_path / "runs" / f"{stem}-s4+5" / "stack.json").read_text())["members"] == \
        [str(tmp_path / "runs" / f"{stem}-s{s}") for s in (4, 5)]


def test_stacked_finetuning_equals_single_runs(roots, singles, tmp_path):
    stack_init = tmp_path / "mlm"
    pretrain.main(mlm_args(roots, stack_init, "--seeds", "0,1", "--max_steps", "2"))
    init0 = str(stack_init / "s0")
    for s in (0, 1):  # singles: every member from one checkpoint
        finetune.main(cls_args(roots, tmp_path / f"one{s}", "--seed", str(s), "--init", init0, *NO_DROPOUT_CLS))
    finetune.main(cls_args(roots, tmp_path / "st", "--seeds", "0,1", "--init", init0, *NO_DROPOUT_CLS))
    for s in (0, 1):
        a, b = ckpt(tmp_path / "st" / f"s{s}"), ckpt(tmp_path / f"one{s}")
        assert_same_model(a, b)
        ra, rb = (json.loads((d / "result.json").read_text())
                  for d in (tmp_path / "st" / f"s{s}", tmp_path / f"one{s}"))
        assert ra["acc_per_epoch"] == rb["acc_per_epoch"] and ra["seed"] == s and ra["stacked"] == 2
    # --init of a stacked pre-training: member s starts from its own checkpoint DIR/s<s>
    finetune.main(cls_args(roots, tmp_path / "own", "--seeds", "0,1", "--init", str(stack_init), *NO_DROPOUT_CLS,
                           "--epochs", "1"))
    finetune.main(cls_args(roots, tmp_path / "own1", "--seed", "1", "--init", str(stack_init / "s1"),
                           *NO_DROPOUT_CLS, "--epochs", "1"))
    assert ckpt(tmp_path / "own" / "s1")["train_config"]["init"] == str(stack_init / "s1")
    assert_same_model(ckpt(tmp_path / "own" / "s1"), ckpt(tmp_path / "own1"))


NO_DROPOUT_CLS = []  # the classifier's dropout comes from the checkpoint (SMALL sets it to 0)


def test_stacked_gap_with_a_stem_resumes(roots, singles, tmp_path, interrupt):
    init = str(singles / "stem" / "s0")
    with pytest.raises(Interrupted) as e, interrupt(3):
        finetune.main(cls_args(roots, tmp_path / "g", "--seeds", "0,1", "--init", init, "--gap"))
    assert f"--resume {tmp_path / 'g'}" in str(e.value)
    finetune.main(["--resume", str(tmp_path / "g")])
    finetune.main(cls_args(roots, tmp_path / "one", "--seed", "1", "--init", init, "--gap"))
    for arm in ("pretrained", "scratch"):
        assert_same_model(ckpt(tmp_path / "g" / "s1" / arm), ckpt(tmp_path / "one" / arm), drift=2 * float(LR) * 4)
    gap = json.loads((tmp_path / "g" / "s1" / "gap.json").read_text())
    assert gap["seed"] == 1 and gap == json.loads((tmp_path / "one" / "gap.json").read_text())


# ----------------------------------------------------------------------------- the stacking helpers

def _members(cfg, seeds, cls=BertForMLM, **kw):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(cls(cfg, **kw))
    return out


@pytest.mark.parametrize("stem", [False, True])
def test_stack_and_unstack_round_trip_bitwise(stem):
    cfg = BertConfig.preset("tiny", **({"n_conv": 2, "conv_channels": 4} if stem else {}))
    ms = _members(cfg, (0, 1, 2), BertForClassification, n_labels=3)
    st = stack_models(ms)
    assert st.members == 3 and st.num_params() == ms[0].num_params()
    for k, m in enumerate(ms):
        mine = member_state(st, k)
        assert all(torch.equal(mine[n], v) for n, v in m.state_dict().items())
    # optimizer states: K single AdamW states -> stacked -> back, bitwise
    opts = []
    for m in ms:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        m(torch.randint(1000, 2000, (2, 16)), targets=torch.tensor([0, 2]))[1].backward()
        opt.step()
        opts.append(opt.state_dict())
    stacked = stack_optimizer_states(st, opts)
    for k, o in enumerate(opts):
        back = member_optimizer_state(st, stacked, k)
        for i, s in o["state"].items():
            assert all(torch.equal(back["state"][i][n], t) for n, t in s.items())


def test_load_members_names_a_wrong_shape():
    ms = _members(BertConfig.preset("tiny"), (0, 1))
    other = BertForMLM(BertConfig.preset("tiny", n_layer=1))
    with pytest.raises(ValueError, match="member 1"):
        load_members(BertForMLM(BertConfig.preset("tiny"), members=2), [ms[0].state_dict(), other.state_dict()])


def test_clip_grad_norm_is_per_member():
    cfg = BertConfig.preset("tiny", dropout=0.0, attn_dropout=0.0)
    ms = _members(cfg, (0, 1))
    st = stack_models([BertForMLM(cfg) for _ in range(2)])
    load_members(st, [m.state_dict() for m in ms])
    x = torch.randint(1000, 2000, (2, 2, 16))
    t = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.3, x, -100)
    t[..., 0] = x[..., 0]
    x[1] = x[1] * 0 + 1500  # member 1 sees other data: its gradient norm differs from member 0's
    rows, y = mlm_rows(t.view(4, 16), 0, 2)  # the sparse head: each member's chosen positions
    st(x.view(4, 16), targets=y, rows=rows)[1].sum().backward()
    norms = clip_grad_norm_members(list(st.parameters()), 0.5, 2)
    for k, m in enumerate(ms):
        rows, y = mlm_rows(t[k])
        m(x[k], targets=y, rows=rows)[1].backward()
        ref = torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
        assert norms[k].item() == pytest.approx(ref.item(), rel=1e-5)
        sg = {n: p.grad for n, p in st.named_parameters()}
        for n, p in m.named_parameters():
            assert (sg[n].reshape(2, -1)[k] - p.grad.reshape(-1)).abs().max().item() <= 1e-6, n


def test_dropout_differs_between_members_at_the_configured_rate():
    cfg = BertConfig.preset("tiny", dropout=0.25)
    m = BertForMLM(cfg)
    st = stack_models([m, m])  # two identical members
    st.train()
    x = torch.randint(1000, 2000, (1, 64)).repeat(2, 1)
    seen = {}
    st.bert.embeddings.drop.register_forward_hook(lambda mod, i, o: seen.update(o=o))
    st.bert(x)
    o = seen["o"]
    zero = (o == 0).float().view(2, -1).mean(1)
    assert not torch.equal(o[0] == 0, o[1] == 0)  # different masks
    assert all(abs(z - 0.25) < 0.02 for z in zero.tolist())  # each at the rate (8k elements per member)


def test_seed_flags_are_checked():
    for argv, msg in ((["--seed", "1", "--seeds", "0,1"], "exclude"), (["--seeds", ""], "empty"),
                      (["--seeds", "0,0"], "repeated"), (["--seeds", "a"], "integers"),
                      (["--seeds", "-1"], "negative")):
        for script in ("train_mlm.py", "train_cls.py"):
            assert_one_line_error(run([script, *argv, "--device", "cpu"]), "--seed", msg)
