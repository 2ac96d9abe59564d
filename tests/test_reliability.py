"""Reliability: damaged checkpoints refused, resumes fall back to the previous one; a diverging run stops with its
last good checkpoint kept; out-of-range numbers are refused."""
import contextlib
import errno
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tinytlm import pretrain, session
from tinytlm.checkpoint import load_checkpoint
from tinytlm.common import Interrupted, UserError
from tests.test_engine import REPO, assert_one_line_error, mlm_args, run


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(roots, tmp_path, monkeypatch):
    lr_at = pretrain.lr_at
    # from step 7 on (epoch 2 of 5-step epochs) a learning rate that blows the weights up
    monkeypatch.setattr(pretrain, "lr_at", lambda step, total, lr: 1e30 if step >= 6 else lr_at(step, total, lr))
    with pytest.raises(UserError) as e:
        pretrain.main(mlm_args(roots, tmp_path / "a", "--log_every", "1"))
    msg = str(e.value)
    assert "non-finite at step" in msg and str(tmp_path / "a" / "ckpt.pt") in msg and "\n" not in msg
    step = int(msg.split("at step ")[1].split(";")[0])
    assert 7 <= step <= 8  # the first update at lr 1e30 is step 7; its loss or the next one is not finite
    assert load_checkpoint(tmp_path / "a")["step"] == 5  # the epoch-end checkpoint before it, kept
    monkeypatch.setattr(pretrain, "lr_at", lr_at)
    pretrain.main(["--resume", str(tmp_path / "a")])  # continues from the last good checkpoint
    assert load_checkpoint(tmp_path / "a")["step"] == 10


def _nan_gradient_at(module, step: int, monkeypatch):
    """From the `step`-th backward on (1-based), one weight's gradient is NaN; the loss stays finite that step."""
    make = module.make_optimizer
    calls = []

    def make_optimizer(model, *a, **k):
        p = next(model.parameters())
        p.register_hook(lambda g: calls.append(1) or (g * float("nan") if len(calls) >= step else g))
        return make(model, *a, **k)
    monkeypatch.setattr(module, "make_optimizer", make_optimizer)


@pytest.mark.parametrize("seeds", [[], ["--seeds", "0,1"]])
def test_a_non_finite_gradient_stops_pretraining_at_its_own_step(roots, tmp_path, monkeypatch, seeds):
    _nan_gradient_at(session, 7, monkeypatch)
    with pytest.raises(UserError) as e:
        pretrain.main(mlm_args(roots, tmp_path / "a", "--log_every", "3", *seeds))
    msg = str(e.value)
    assert "non-finite at step 7" in msg and "\n" not in msg  # its own step, not the next loss's
    first = tmp_path / "a" / ("s0" if seeds else "")
    assert load_checkpoint(first)["step"] == 5


def test_a_non_finite_gradient_stops_fine_tuning_at_its_own_step(roots, tmp_path, monkeypatch):
    from tinytlm import finetune
    raw, data = roots
    _nan_gradient_at(session, 3, monkeypatch)
    argv = ["--task", "agnews", "--model", "tiny", "--train-per-label", "4", "--test-per-label", "2", "--epochs", "2",
            "--batch_size", "8", "--device", "cpu", "--quiet", "--raw", str(raw), "--data", str(data)]
    with pytest.raises(UserError, match="non-finite at step 3;"):
        finetune.main([*argv, "--out", str(tmp_path / "c")])
    assert load_checkpoint(tmp_path / "c")["step"] == 2  # the first epoch's (2 steps of 8 of 16 rows)


@pytest.mark.parametrize("argv, words", [
    (["train_mlm.py", "--lr", "nan"], ["--lr nan"]),
    (["train_mlm.py", "--lr", "0"], ["--lr 0"]),
    (["train_mlm.py", "--weight_decay", "-0.1"], ["--weight_decay -0.1"]),
    (["train_mlm.py", "--grad_clip", "inf"], ["--grad_clip inf"]),
    (["train_mlm.py", "--arch", "dropout=1.5"], ["dropout=1.5", "[0, 1)"]),
    (["train_mlm.py", "--arch", "attn_dropout=nan"], ["attn_dropout"]),
    (["train_mlm.py", "--arch", "n_head=0"], ["n_head=0", ">= 1"]),
    (["train_mlm.py", "--arch", "head_dim=-4"], ["head_dim"]),
    (["train_mlm.py", "--arch", "conv_kernel=0x3"], ["conv_kernel"]),
    (["train_cls.py", "--lr", "-1"], ["--lr -1"]),
    (["train_cls.py", "--wd", "-2"], ["--weight_decay -2"]),  # (--wd: the deprecated alias)
    (["train_cls.py", "--model", "tiny", "--arch", "ffn_mult=0"], ["ffn_mult"]),
    (["paper", "table5", "--seeds", "0"], ["--seeds 0"]),
])
def test_out_of_range_numbers_are_one_line_errors(roots, tmp_path, argv, words):
    raw, data = roots
    paths = ["--raw", str(raw), "--data", str(data)] if argv[0] != "paper" else ["--cache", str(tmp_path / "c")]
    extra = ["--out", str(tmp_path / "out"), "--device", "cpu", "--ws", "40"] if argv[0] == "train_mlm.py" else \
        ["--out", str(tmp_path / "out"), "--device", "cpu"] if argv[0] == "train_cls.py" else \
        ["--results", str(tmp_path / "r"), "--scale", "mini"]
    assert_one_line_error(run([*argv, *paths, *extra]), *words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "r").exists()


def test_damaged_checkpoints_are_refused_and_resume_falls_back_to_the_previous(roots, tmp_path, interrupt):
    pretrain.main(mlm_args(roots, tmp_path / "a"))  # uninterrupted: 10 steps
    with pytest.raises(Interrupted), interrupt(8):  # checkpoints at step 5 (epoch end) and 8 (the Ctrl-C)
        pretrain.main(mlm_args(roots, tmp_path / "b"))
    ckpt, prev = tmp_path / "b" / "ckpt.pt", tmp_path / "b" / "ckpt.prev.pt"
    assert load_checkpoint(ckpt)["step"] == 8 and load_checkpoint(prev)["step"] == 5
    # altered contents: loads as a torch file, refused by the checksum
    state = torch.load(ckpt, weights_only=False)
    state["model"]["bert.embeddings.word.weight"][7, 3] += 1e-3
    torch.save(state, tmp_path / "altered.pt")
    assert_one_line_error(run(["train_cls.py", "--init", str(tmp_path / "altered.pt")]), "altered.pt", "checksum")
    # truncated: refused when named directly, and --resume falls back to ckpt.prev.pt, with a message
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:len(data) // 2])
    assert_one_line_error(run(["train_cls.py", "--init", str(ckpt)]), "ckpt.pt", "not a readable checkpoint")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        pretrain.main(["--resume", str(tmp_path / "b")])
    assert "resuming from the previous checkpoint" in err.getvalue() and "(step 5)" in err.getvalue()
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert b["step"] == 10 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_stack_resumes_at_its_members_common_step(roots, tmp_path, interrupt):
    """A kill between the members' renames leaves one member a save ahead: it resumes from its previous one."""
    pretrain.main(mlm_args(roots, tmp_path / "a", "--seeds", "0,1"))
    with pytest.raises(Interrupted), interrupt(8):
        pretrain.main(mlm_args(roots, tmp_path / "b", "--seeds", "0,1"))
    s1 = tmp_path / "b" / "s1"
    os.replace(s1 / "ckpt.prev.pt", s1 / "ckpt.pt")  # member 1 as if the kill came before its rename: step 5
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        pretrain.main(["--resume", str(tmp_path / "b")])
    assert "one save ahead" in err.getvalue()
    for s in ("s0", "s1"):
        a, b = load_checkpoint(tmp_path / "a" / s), load_checkpoint(tmp_path / "b" / s)
        assert b["step"] == 10 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_non_finite_loss_stops_fine_tuning(roots, tmp_path, monkeypatch):
    from tinytlm import finetune, finetune_loop
    raw, data = roots
    lr_at = finetune_loop.lr_at
    monkeypatch.setattr(finetune_loop, "lr_at", lambda step, total, lr: 1e30 if step >= 1 else lr_at(step, total, lr))
    argv = ["--task", "agnews", "--model", "tiny", "--train-per-label", "4", "--test-per-label", "2", "--epochs", "2",
            "--batch_size", "8", "--device", "cpu", "--quiet", "--raw", str(raw), "--data", str(data)]
    with pytest.raises(UserError, match="non-finite at step") as e:
        finetune.main([*argv, "--out", str(tmp_path / "c")])
    step = int(str(e.value).split("at step ")[1].split(";")[0])
    assert load_checkpoint(tmp_path / "c")["step"] < step  # nothing saved from the non-finite step on
    assert not (tmp_path / "c" / "result.json").exists()


def _disk_full(real):
    """A writer that writes half of what it was given, then fails as a full disk does."""
    def write(obj, path, *a, **k):
        real(obj, path, *a, **k)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return write


def test_a_full_disk_is_one_line_and_leaves_the_previous_files_intact(roots, tmp_path, monkeypatch):
    from tinytlm import checkpoint
    pretrain.main(mlm_args(roots, tmp_path / "b", "--max_steps", "2"))
    before = (tmp_path / "b" / "ckpt.pt").read_bytes()
    monkeypatch.setattr(checkpoint.torch, "save", _disk_full(torch.save))
    r = run(["train_mlm.py", "--resume", str(tmp_path / "b"), "--max_steps", "4"])
    last = r.stderr.strip().splitlines()[-1]  # (above it: the progress bar of the steps that ran)
    assert r.returncode == 2 and "Traceback" not in r.stderr and last.startswith("error: ")
    assert str(tmp_path / "b" / "ckpt.pt") in last and "No space left on device" in last
    assert (tmp_path / "b" / "ckpt.pt").read_bytes() == before  # the previous checkpoint, untouched
    assert load_checkpoint(tmp_path / "b")["step"] == 2
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["ckpt.pt", "config.json", "metrics.jsonl"]


def test_two_paper_runs_on_one_cache_compute_each_cell_once(shared, tmp_path):
    cmd = [sys.executable, "-m", "tinytlm.paper", "table5", "--scale", "mini", "--device", "cpu", "--cache",
           str(tmp_path / "cache"), "--results", str(tmp_path / "results"), "--raw", str(shared), "--data",
           str(tmp_path / "data")]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    lock = tmp_path / "cache" / ".lock"
    for _ in range(600):  # the second starts once the first holds the cache (it then computes for ~10 s)
        if lock.is_file() and "pid" in lock.read_text():
            break
        time.sleep(0.1)
    procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    computed = [int(o.split("== table5: ")[1].split(" cells computed")[0]) for o, _ in outs]
    assert computed == [5, 0] and "another run is using this cache" in outs[1][1]  # it waited, then found all done
    assert len(list((tmp_path / "results" / "cells" / "mini").glob("*.json"))) == 4


class _Killed(BaseException):
    """A kill at one exact point (a SIGKILL there is too short a window to hit at random)."""


def _stacked_cls(roots, out, *extra):
    raw, data = roots
    return ["--task", "agnews", "--model", "tiny", "--train-per-label", "4", "--test-per-label", "2", "--epochs", "2",
            "--batch_size", "8", "--device", "cpu", "--quiet", "--seeds", "0,1", "--raw", str(raw), "--data", str(data),
            "--out", str(out), *extra]


def _same_stack(a: Path, b: Path):
    from tests.test_kills import strip
    for s in ("s0", "s1"):
        sa, sb = load_checkpoint(a / s), load_checkpoint(b / s)
        assert sa["step"] == sb["step"] and all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
        ra, rb = (json.loads((d / s / "result.json").read_text()) for d in (a, b))
        assert strip(ra) == strip(rb)


def test_a_stack_killed_between_its_results_writes_the_rest_from_its_checkpoints(roots, tmp_path, monkeypatch):
    from tinytlm import finetune, finetune_loop
    finetune.main(_stacked_cls(roots, tmp_path / "ref"))
    write = finetune_loop.write_json

    def killed_at_the_second(path, obj):
        if Path(path) == tmp_path / "k" / "s1" / "result.json":
            raise _Killed
        write(path, obj)
    monkeypatch.setattr(finetune_loop, "write_json", killed_at_the_second)
    with pytest.raises(_Killed):
        finetune.main(_stacked_cls(roots, tmp_path / "k"))
    monkeypatch.undo()
    steps = (tmp_path / "k" / "s1" / "metrics.jsonl").read_text()
    finetune.main(["--resume", str(tmp_path / "k")])
    assert (tmp_path / "k" / "s1" / "metrics.jsonl").read_text() == steps  # not trained again
    _same_stack(tmp_path / "k", tmp_path / "ref")


def test_a_stack_whose_member_is_a_save_behind_finishes_together(roots, tmp_path):
    """A kill between the members' final renames: one finished, the other a save behind; both go on from the
    common step as one stack (alone, the second member would draw other dropout masks)."""
    from tinytlm import finetune
    finetune.main(_stacked_cls(roots, tmp_path / "ref"))
    finetune.main(_stacked_cls(roots, tmp_path / "k"))
    s1 = tmp_path / "k" / "s1"
    os.replace(s1 / "ckpt.prev.pt", s1 / "ckpt.pt")  # as if the kill came before member 1's final rename
    for s in ("s0", "s1"):
        (tmp_path / "k" / s / "result.json").unlink()
    assert load_checkpoint(s1)["optimizer"] is not None
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        finetune.main(["--resume", str(tmp_path / "k")])
    assert "one save ahead" in err.getvalue()
    _same_stack(tmp_path / "k", tmp_path / "ref")


def test_a_stack_killed_during_its_first_save_starts_again_as_one_stack(roots, tmp_path):
    """Member 0's start-of-run checkpoint was renamed into place, member 1's not: both start afresh, together."""
    import shutil
    from tinytlm import finetune
    finetune.main(_stacked_cls(roots, tmp_path / "k", "--epochs", "1"))  # 1 epoch: ckpt.prev.pt is the step-0 one
    finetune.main(_stacked_cls(roots, tmp_path / "r1", "--epochs", "1"))
    s0 = tmp_path / "k" / "s0"
    os.replace(s0 / "ckpt.prev.pt", s0 / "ckpt.pt")
    assert load_checkpoint(s0)["step"] == 0
    for f in ("result.json", "metrics.jsonl", "config.json"):
        (s0 / f).unlink()
    shutil.rmtree(tmp_path / "k" / "s1")
    finetune.main(["--resume", str(tmp_path / "k")])
    _same_stack(tmp_path / "k", tmp_path / "r1")
