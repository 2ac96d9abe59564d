"""tinytlm.analyze on trained tiny runs: APT equals the run's val_mlm_acc, the last block's probe reproduces the
head, stacked members, classifiers, plots and bad input. The hand-made models are in tests/test_analyze_exact.py."""
import json

import numpy as np
import pytest
import torch

from tinytlm import analyze, finetune, pretrain
from tinytlm.analyze_apt import held_out, mean_apt
from tinytlm.analyze_model import block_states, classifier_fields, cls_position, mlm_head, mlm_logits
from tinytlm.checkpoint import build_model, load_checkpoint, payload_digest
from tinytlm.tasks import load_task
from tests.test_engine import assert_one_line_error, run

# the tiny preset (2 blocks, 2 heads) at head_dim 16: cheap; lr 1e-2 so that 10 steps predict some tokens right
TINY = ["--model", "tiny", "--arch", "head_dim=16", "--device", "cpu"]
FAST = ["--probe-steps", "2", "--probe-batch", "4"]


def mlm_args(roots, out, *extra):
    raw, data = roots
    return [*TINY, "--ws", "40", "--epochs", "1", "--batch_size", "4", "--lr", "1e-2", "--log_every", "5",
            "--raw", str(raw), "--data", str(data), "--out", str(out), *extra]


FP32 = ["--precision", "fp32"]  # the runs and the analysis: exactness tests pin fp32


@pytest.fixture(scope="module")
def stack(roots, tmp_path_factory):
    """A tiny pre-training run of two stacked members (OUT/s0, OUT/s1), each scored on the held-out rows."""
    out = tmp_path_factory.mktemp("analyze") / "stack"
    pretrain.main(mlm_args(roots, out, "--seeds", "0,1", *FP32))
    return out


@pytest.fixture(scope="module")
def gap(roots, stack):
    """A train_cls --gap folder fine-tuned from member s0 (AG News, 8 + 6 rows per label, 1 epoch)."""
    raw, data = roots
    out = stack.parent / "gap"
    finetune.main(["--task", "agnews", "--train-per-label", "8", "--test-per-label", "6", "--epochs", "1",
                   "--batch_size", "8", "--lr", "1e-3", "--raw", str(raw), "--data", str(data), "--device", "cpu",
                   "--init", str(stack / "s0"), "--gap", "--out", str(out)])
    return out


def final_val_acc(run) -> float:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "val_mlm_acc" in r][-1]["val_mlm_acc"]


def cmd(*args):
    """analyze in fp32 (the equalities below are fp32's; bf16 autocast rounds the plain logits the analysis
    argmaxes and the chunked head's counts the run scored differently: a token or two of ~140 apart)."""
    return run(["analyze", *map(str, args), *FP32], {"analyze": analyze.main})


def test_apt_of_every_member_equals_its_val_mlm_acc(stack, roots, tmp_path):
    r = cmd(stack, "--out", tmp_path / "a", "--what", "apt", "--task", "agnews", "--train-per-label", "8",
            "--test-per-label", "6", "--raw", roots[0])
    assert r.returncode == 0, r.stderr
    for member in ("s0", "s1"):
        apt = json.loads((tmp_path / "a" / member / "apt.json").read_text())
        correct, occ = np.array(list(apt["tokens"].values())).T
        assert correct.sum() > 0  # the run predicts some tokens: the equality below is not 0 == 0
        assert correct.sum() / occ.sum() == pytest.approx(final_val_acc(stack / member), abs=1e-6)
        assert apt["accuracy"] == pytest.approx(apt["val_mlm_acc"], abs=1e-6)
        assert apt["mean_apt"] == pytest.approx(float(np.mean(correct / occ)), abs=1e-12)
        assert occ.sum() == apt["held_out"]["masked"] == apt["masked"]
        # the W_s counts are the run's first 40 rows, specials left out
        state = load_checkpoint(stack / member)
        rows = np.asarray(apt_rows(state))
        for t, c in apt["ws_counts"].items():
            assert c == int((rows == int(t)).sum())
        bins = apt["by_frequency"]
        assert bins[0]["lo"] == 0 and sum(b["occurrences"] for b in bins) == occ.sum()
        assert sum(b["tokens"] for b in bins) == len(occ)
        tm = apt["task_tokens"]
        assert tm["T_M"] > 0 and tm["T_M_group"]["tokens"] + tm["seen_group"]["tokens"] <= len(occ)
    assert mean_apt(stack / "s1") == pytest.approx(
        json.loads((tmp_path / "a" / "s1" / "apt.json").read_text())["mean_apt"], abs=1e-12)


def apt_rows(state):
    from tinytlm.data import Shard
    return Shard(state["data"]["shard"]).ids[:state["data"]["ws"]]


def test_the_last_blocks_probe_as_the_trained_head_reproduces_the_head(stack, tmp_path):
    r = cmd(stack / "s1", "--out", tmp_path / "b", "--what", "apt,blocks,confusion", "--probe-init", "head",
            "--probe-steps", "0")
    assert r.returncode == 0, r.stderr
    apt = json.loads((tmp_path / "b" / "apt.json").read_text())
    blocks = json.loads((tmp_path / "b" / "blocks.json").read_text())
    npz = np.load(tmp_path / "b" / "blocks.npz")
    assert [s["state"] for s in blocks["states"]] == ["emb", "block1", "block2"] == list(npz["names"])
    # stated tolerance: the same predictions at every held-out position (per-token counts equal), so the
    # accuracy equal to 1e-6, and the logits within 1e-5 (fp32, CPU; the head runs on (N, H) either way)
    own = {int(t): c for t, (c, _) in apt["tokens"].items()}
    assert {int(t): int(npz["correct"][-1][int(t)]) for t in own} == own
    assert blocks["states"][-1]["accuracy"] == pytest.approx(apt["accuracy"], abs=1e-6)
    model = build_model(load_checkpoint(stack / "s1")).eval()
    held, _ = held_out(load_checkpoint(stack / "s1"))
    x, inp, tgt = held.ids, held.inputs, held.targets
    with torch.no_grad():
        ref, _ = mlm_logits(model, inp, x != held.pad, tgt)
        mine = mlm_head(model, block_states(model, inp, x != held.pad)[-1][tgt != -100])
    assert (mine - ref).abs().max().item() < 1e-5
    conf = json.loads((tmp_path / "b" / "confusion.json").read_text())
    assert list(conf["states"]) == ["head", "emb", "block1", "block2"]
    assert conf["states"]["head"] == conf["states"]["block2"]  # the same predictions, the same clusters


def test_fresh_probes_train_and_plots_are_drawn(stack, tmp_path):
    pytest.importorskip("matplotlib")
    r = cmd(stack / "s0", "--out", tmp_path / "p", "--plot", *FAST)
    assert r.returncode == 0, r.stderr
    for name in ("apt_frequency.png", "blocks.png", "clusters.png"):
        assert (tmp_path / "p" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    recs = [json.loads(line) for line in (tmp_path / "p" / "probes.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 2 and len(recs[-1]["loss"]) == 3  # one loss per state
    assert all(np.isfinite(recs[-1]["loss"]))


def test_a_classifier_gap_folder_probes_and_single_head_performance(gap, roots, tmp_path):
    r = cmd(gap, "--out", tmp_path / "c", "--shp-blocks", "all", *FAST, *(["--plot"] if _has_mpl() else []))
    assert r.returncode == 0, r.stderr
    for arm in ("pretrained", "scratch"):
        state = load_checkpoint(gap / arm)
        shp = json.loads((tmp_path / "c" / arm / "shp.json").read_text())
        # the adapter's head on the last block's [CLS] reproduces the run's own test accuracy
        assert shp["head_accuracy"] == pytest.approx(state["extra"]["acc"], abs=1e-6)
        assert [b["state"] for b in shp["blocks"]] == ["emb", "block1", "block2"]
        last = shp["blocks"][-1]
        assert last["head"] == "trained head" and len(last["groups"]) == 2  # 2 heads of 16 nodes
        assert np.array(last["all_nodes"]["matrix"]).shape == (4, 4)
        blocks = json.loads((tmp_path / "c" / arm / "blocks.json").read_text())
        assert [s["state"] for s in blocks["states"]] == ["emb", "block1", "block2"]
        assert all(0.0 <= s["accuracy"] <= 1.0 for s in blocks["states"])
        if _has_mpl():
            assert (tmp_path / "c" / arm / "shp_block2.png").is_file() and (tmp_path / "c" / arm / "snr.png").is_file()
    # the adapter's classifier head equals the model's forward
    state = load_checkpoint(gap / "pretrained")
    model = build_model(state).eval()
    _, _, test, _, _ = load_task(roots[1] / "agnews-8x6")
    x = torch.from_numpy(np.asarray(test.ids[:5]).astype(np.int64))
    with torch.no_grad():
        ref, _ = model(x)
        mine = classifier_fields(model, cls_position(block_states(model, x, x != 0)[-1]))
    assert torch.allclose(mine, ref, atol=1e-6)


def _has_mpl():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


# -----------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written

def altered(src, dest, change):
    """A copy of a checkpoint with change(state) applied and its checksum renewed (a consistent checkpoint
    of another kind of run, not a damaged one)."""
    state = torch.load(src / "ckpt.pt", weights_only=False)
    change(state)
    state["checksum"] = payload_digest(state)
    dest.mkdir(parents=True)
    torch.save(state, dest / "ckpt.pt")
    return dest


def test_bad_input(stack, gap, tmp_path):
    out = tmp_path / "out"
    no_val = altered(stack / "s0", tmp_path / "noval", lambda s: s["data"].pop("val"))
    empty = altered(stack / "s0", tmp_path / "empty", lambda s: s["data"].update(ws=0))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    blob = bytearray((stack / "s0" / "ckpt.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (damaged / "ckpt.pt").write_bytes(bytes(blob))
    cases = [
        ((no_val,), ("no held-out rows", "--val_every 0")),
        ((empty,), ("empty W_s",)),
        ((gap / "pretrained", "--what", "apt"), ("classifier", "no apt analysis")),
        ((stack / "s0", "--what", "shp"), ("pre-training", "no shp analysis")),
        ((tmp_path / "missing",), ("missing", "no such run folder")),
        ((damaged,), ("damaged" if _unpickles(damaged) else "not a readable checkpoint",)),
        ((stack / "s0", "--what", "apt,nope"), ("--what", "nope")),
        ((stack / "s0", "--shp-norm", "z"), ("--shp-norm",)),
        ((stack / "s0", "--probe-init", "x"), ("--probe-init",)),
        ((stack / "s0", "--min-occ", "0"), ("--min-occ",)),
        ((stack / "s0", "--data", tmp_path), ("wiki.val.bin", "not found")),
    ]
    for args, words in cases:
        assert_one_line_error(cmd(*args, "--out", out), *words)
        assert not out.exists(), args
    # a stack whose second member is damaged: the first member's analysis is not written either
    bad_stack = tmp_path / "bad_stack"
    bad_stack.mkdir()
    for m in ("s0", "s1"):
        (bad_stack / m).mkdir()
        (bad_stack / m / "ckpt.pt").write_bytes((stack / m / "ckpt.pt").read_bytes() if m == "s0" else bytes(blob))
    (bad_stack / "stack.json").write_text(json.dumps({"members": [str(bad_stack / "s0"), str(bad_stack / "s1")]}))
    assert_one_line_error(cmd(bad_stack, "--out", out, "--what", "apt"), "s1")
    assert not out.exists()


def _unpickles(folder) -> bool:
    try:
        torch.load(folder / "ckpt.pt", weights_only=False)
        return True
    except Exception:
        return False


@pytest.mark.slow
def test_apt_of_a_torchrun_run_equals_its_val_mlm_acc(roots, tmp_path):
    from tests.test_dist import torchrun
    torchrun("train_mlm.py", mlm_args(roots, tmp_path / "ddp", "--arch", "dropout=0,attn_dropout=0", *FP32))
    r = cmd(tmp_path / "ddp", "--what", "apt")
    assert r.returncode == 0, r.stderr
    apt = json.loads((tmp_path / "ddp" / "analysis" / "apt.json").read_text())
    assert apt["accuracy"] == pytest.approx(final_val_acc(tmp_path / "ddp"), abs=1e-6)
