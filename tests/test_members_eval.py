"""Stacked members at evaluation (ensemble.py, tinytlm/committee.py) and the members benchmark (bench/members.py).

ensemble.py runs the checkpoints of one shape as one stacked model: its accuracies must be the ones
each member gives alone, whatever the order and mix of shapes the checkpoints come in.
"""
import json
from dataclasses import asdict

import pytest
import torch

from tinytlm import ensemble
from tinytlm.checkpoint import build_model, load_checkpoint, save_checkpoint
from tinytlm.committee import (accuracy, committee_logits, common_test_set, member_logits, predict_logits,
                               predict_member_logits, shape_groups, stack_checkpoints)
from tinytlm.model import BertConfig, BertForClassification
from tinytlm.tasks import TaskSpec, ensure_task, load_task

# two shapes of a very small classifier (the vocabulary stays 30,522: the ids are real); a wide init, so
# the members disagree and their logits are far from zero
SHAPE_A = dict(n_layer=1, n_head=1, head_dim=32, init_std=0.5)
SHAPE_B = dict(n_layer=2, n_head=2, head_dim=16, init_std=0.5)


@pytest.fixture(scope="module")
def members(roots, tmp_path_factory):
    """Five classifier checkpoints of one AG News task and test set, shapes mixed: A, B, A, B, A (seeds 0..4),
    written as train_cls.py writes them (random weights: what is compared is the same weights run two ways)."""
    raw, data = roots
    spec = TaskSpec(task="agnews", train_per_label=4, test_per_label=6)
    task_dir = ensure_task(spec, raw, data)
    _, _, test, _, meta = load_task(task_dir)
    extra = {"task": "agnews", "spec": asdict(spec), "label_names": meta["label_names"],
             "test_fingerprint": test.checksum.hex()}
    base = tmp_path_factory.mktemp("members")
    paths = []
    for seed, shape in enumerate([SHAPE_A, SHAPE_B, SHAPE_A, SHAPE_B, SHAPE_A]):
        torch.manual_seed(seed)
        model = BertForClassification(BertConfig.preset("tiny", **shape), len(meta["label_names"]))
        (base / f"m{seed}").mkdir()
        save_checkpoint(base / f"m{seed}" / "ckpt.pt", kind="cls", model=model, optimizer=None, step=0, epoch=0,
                        train_config={"model": "tiny", "seed": seed}, data={}, extra=extra)
        paths.append(base / f"m{seed}")
    return paths


def test_stacked_logits_equal_each_member_alone(members, roots):
    raw, data = roots
    states = [load_checkpoint(p, kind="cls") for p in members]
    assert shape_groups(states) == [[0, 2, 4], [1, 3]]
    _, test, _ = common_test_set(states, raw, data)
    for g in shape_groups(states):
        stack = stack_checkpoints([states[i] for i in g])
        assert stack.members == len(g)
        stacked = predict_member_logits(stack, test.ids, torch.device("cpu"), batch_size=7)  # (K, N, C)
        alone = torch.stack([predict_logits(build_model(states[i]), test.ids, torch.device("cpu")) for i in g])
        assert stacked.shape == alone.shape == (len(g), len(test), 4)
        assert alone.abs().max() > 0.5  # logits far from zero: a 1e-5 tolerance means something
        assert (stacked - alone).abs().max() <= 1e-5
        x = torch.from_numpy(test.ids[:3].astype("int64"))
        with torch.no_grad():  # one forward at batch 3: (K, 3, C), member k's own logits
            one = member_logits(stack.eval(), x)
        assert (one - alone[:, :3]).abs().max() <= 1e-5
    with pytest.raises(ValueError):  # a stack is not a single model
        predict_logits(stack, test.ids, torch.device("cpu"))


def test_ensemble_mixed_shapes_matches_the_unstacked_evaluation(members, roots, tmp_path, capsys):
    raw, data = roots
    res = ensemble.main([*map(str, members), "--device", "cpu", "--precision", "fp32", "--latency-samples", "3",
                         "--raw", str(raw), "--data", str(data), "--json", str(tmp_path / "ens.json")])
    states = [load_checkpoint(p, kind="cls") for p in members]
    _, test, yte = common_test_set(states, raw, data)
    alone = [predict_logits(build_model(s), test.ids, torch.device("cpu")) for s in states]
    assert [m["acc"] for m in res["members"]] == [accuracy(lg, yte) for lg in alone]
    assert len({m["acc"] for m in res["members"]}) > 1  # the members disagree: a mix-up would show
    assert res["committee"]["acc"] == accuracy(committee_logits(alone), yte)
    # two stacks, members in the order given; every latency measured and positive
    assert [g["members"] for g in res["groups"]] == [3, 2] and [m["group"] for m in res["members"]] == [0, 1, 0, 1, 0]
    assert res["groups"][0]["checkpoints"] == [str(members[i] / "ckpt.pt") for i in (0, 2, 4)]
    comm = res["committee"]
    for key in ("latency_ms_b1", "latency_ms_b1_parallel", "latency_ms_b1_stacked"):
        assert comm[key] > 0, key
    assert all(m["latency_ms_b1"] > 0 for m in res["members"])
    assert json.loads((tmp_path / "ens.json").read_text())["committee"]["latency_ms_b1_stacked"] == \
        comm["latency_ms_b1_stacked"]
    assert "members of one shape stacked (2 forwards: 3 x L1 H1, 2 x L2 H2)" in capsys.readouterr().out
    assert res["precision"] == "fp32" == json.loads((tmp_path / "ens.json").read_text())["precision"]


# -----------------------------------------------------------------------------
# bench/members.py

def test_members_bench_rows_and_numbers(tmp_path):
    from bench import members as bench_members
    out, md = tmp_path / "m.json", tmp_path / "m.md"
    res = bench_members.main(["--models", "tiny", "--members", "1,2", "--batch_size", "2", "--seq_len", "32",
                              "--steps", "1", "--warmup", "1", "--latency_runs", "2", "--committee", "tiny",
                              "--committee_size", "2", "--single", "tiny", "--device", "cpu", "--json", str(out),
                              "--out", str(md)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res)) and saved["complete"]
    rows = saved["train"]
    assert [(r["model"], r["K"], r["status"]) for r in rows] == [("tiny", 1, "ok"), ("tiny", 2, "ok")]
    for r in rows:
        for key in ("stacked_seq_per_s", "one_by_one_seq_per_s", "speedup", "stacked_bytes", "one_by_one_bytes"):
            assert r[key] > 0, (r["K"], key)
        assert r["speedup"] == pytest.approx(r["stacked_seq_per_s"] / r["one_by_one_seq_per_s"])
        assert r["memory"] == "analytic"  # CPU: weights + grads + AdamW state, activations not measured
    assert rows[1]["stacked_bytes"] == 2 * rows[0]["stacked_bytes"]
    fit = saved["max_members"]["tiny"]  # the line through the analytic bytes: K * bytes of one member
    assert fit["bytes_per_member"] == pytest.approx(rows[0]["stacked_bytes"]) and "upper bound" in fit["from"]
    assert fit["K"] == int(80e9 // rows[0]["stacked_bytes"])
    lat = saved["latency"]
    assert [r["what"] for r in lat["rows"]] == ["committee stacked", "committee one by one", "single"]
    assert all(r["median_ms"] > 0 for r in lat["rows"]) and lat["members"] == 2
    text = md.read_text()
    assert "| tiny | 2 |" in text and "## Goals" in text and "activation memory is not measured" in text
