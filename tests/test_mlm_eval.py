"""Held-out MLM evaluation: rows no W_s prefix contains, fixed masks, the right numbers, and no effect on training."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinytlm import pretrain
from tinytlm.checkpoint import build_model, load_checkpoint
from tinytlm.data import Shard
from tinytlm.mlm_eval import HeldOut
from tinytlm.wikipedia import ensure_wiki, prepare, val_count, val_shard
from tests.test_engine import assert_one_line_error, mlm_args, run


def test_the_held_out_rows_are_the_last_of_the_shuffled_order_in_both_preparations(roots, tmp_path):
    raw, _ = roots
    vocab = raw / "bert-base-uncased-vocab.txt"
    full = Shard(prepare(raw, tmp_path / "full", vocab, quiet=True, workers=1))
    prefix = Shard(prepare(raw, tmp_path / "prefix", vocab, rows=30, quiet=True, workers=1))
    n, v = len(full), val_count(len(full))
    assert n == 120 and v == 12 and val_count(10 ** 6) == 2000
    val_full, val_prefix = val_shard(tmp_path / "full"), val_shard(tmp_path / "prefix")
    assert np.array_equal(val_full.ids, full.ids[n - v:]) and np.array_equal(val_prefix.ids, val_full.ids)
    assert np.array_equal(prefix.ids, full.ids[:30])  # the W_s prefixes are unchanged by the held-out rows
    # what the training code gets (custom-made sets read every row of it): the rows before the held-out
    # ones, when it prepares the shard itself and when it reuses it
    fresh = ensure_wiki(-1, raw, tmp_path / "fresh", quiet=True)
    again = ensure_wiki(-1, raw, tmp_path / "fresh", quiet=True)
    assert len(fresh) == len(again) == n - v and np.array_equal(fresh.ids, full.ids[:n - v])
    with pytest.raises(Exception, match="only 108 Wikipedia articles are available"):
        prepare(raw, tmp_path / "x", vocab, rows=109, quiet=True, workers=1)


def test_ws_is_capped_before_the_held_out_rows(roots, tmp_path):
    r = run(["train_mlm.py", *mlm_args(roots, tmp_path / "a"), "--ws", "109"])
    assert_one_line_error(r, "--ws 109", "108", "held out for validation")
    assert not (tmp_path / "a").exists()


def test_evaluation_scores_fixed_masks_with_the_plain_loss(roots, tmp_path):
    pretrain.main(mlm_args(roots, tmp_path / "a", "--epochs", "1", "--precision", "fp32"))  # evaluate() below: fp32
    state = load_checkpoint(tmp_path / "a")
    model = build_model(state).eval()
    shard = val_shard(roots[1])
    sp = state["data"]["special_ids"]
    held, again = HeldOut(shard, sp, 30522, batch_size=5), HeldOut(shard, sp, 30522, batch_size=64)
    assert torch.equal(held.targets, again.targets)  # the masks depend on nothing but the rows
    (v,) = held.evaluate(model, torch.device("cpu"))
    # by hand: full logits, cross-entropy and accuracy over every masked token
    with torch.no_grad():
        logits, _ = model(held.inputs, attention_mask=held.ids != sp["pad"])  # (B, T, V): the dense head
    chosen = held.targets != -100
    ref_loss = F.cross_entropy(logits[chosen].float(), held.targets[chosen]).item()
    ref_acc = (logits[chosen].argmax(-1) == held.targets[chosen]).float().mean().item()
    assert v["val_masked"] == int(chosen.sum()) > 0
    assert v["val_loss"] == pytest.approx(ref_loss, rel=1e-5) and v["val_mlm_acc"] == pytest.approx(ref_acc)
    assert state["extra"]["val"] == pytest.approx(v)  # what the run recorded at its end
    ep = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()][-1]
    assert ep["kind"] == "epoch" and ep["val_mlm_acc"] == pytest.approx(v["val_mlm_acc"])


def test_evaluation_changes_nothing_in_training_and_members_score_as_their_single_runs(roots, tmp_path):
    pretrain.main(mlm_args(roots, tmp_path / "off", "--val_every", "0"))
    pretrain.main(mlm_args(roots, tmp_path / "on"))
    exact = ("--arch", "dropout=0,attn_dropout=0", "--precision", "fp32")  # a member scores as its single run
    pretrain.main(mlm_args(roots, tmp_path / "stack", "--seeds", "0,1", *exact))
    pretrain.main(mlm_args(roots, tmp_path / "one", "--seed", "1", *exact))
    a, b = load_checkpoint(tmp_path / "off"), load_checkpoint(tmp_path / "on")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # bitwise: no random draws
    assert "val" not in a["extra"] and "val" in b["extra"]
    recs = [json.loads(l) for l in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs if "val_mlm_acc" in r] == [0, 1]  # every epoch
    single, member = load_checkpoint(tmp_path / "one")["extra"]["val"], load_checkpoint(tmp_path / "stack" / "s1")
    assert member["extra"]["val"]["val_masked"] == single["val_masked"]
    assert member["extra"]["val"]["val_loss"] == pytest.approx(single["val_loss"], abs=1e-5)
