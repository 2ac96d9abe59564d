"""torchrun data parallelism on CPU (gloo, 2 processes): the same weights as one process, and a resume under
another world size continues the same way. Dropout is off: each process draws its own dropout masks."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tinytlm import finetune, pretrain
from tinytlm.checkpoint import load_checkpoint
from tests.test_engine import REPO, mlm_args

# fp32: 2 processes equal 1 to fp32 rounding (1e-5); bf16 autocast rounds the shares' partial sums differently
NO_DROPOUT = ["--arch", "dropout=0,attn_dropout=0", "--precision", "fp32"]


def torchrun(script, argv):
    """2 processes of `script` under torchrun; a hang is killed with its whole process group."""
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          script, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        _, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    assert p.returncode == 0, err[-3000:]


def assert_close(a, b, tol=1e-5):
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["step"] == sb["step"] and sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.allclose(sa["model"][k], sb["model"][k], atol=tol, rtol=0), k


def records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_pretraining_on_two_processes_equals_one_and_resumes_on_one(roots, tmp_path):
    args = lambda out, *extra: mlm_args(roots, out, *NO_DROPOUT, *extra)  # 2 epochs x 5 steps of 8 rows
    pretrain.main(args(tmp_path / "one"))
    torchrun("train_mlm.py", args(tmp_path / "two"))
    assert_close(tmp_path / "two", tmp_path / "one")
    head = records(tmp_path / "two", "header")
    assert len(head) == 1 and head[0]["config"]["world_size"] == 2  # rank 0 alone writes
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    one, two = records(tmp_path / "one", "epoch"), records(tmp_path / "two", "epoch")
    assert len(two) == 2 and [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-6)
    # stopped after 3 steps on 2 processes, continued on 1
    torchrun("train_mlm.py", args(tmp_path / "mixed", "--max_steps", "3", "--save_every", "0"))
    assert load_checkpoint(tmp_path / "mixed")["step"] == 3
    pretrain.main(["--resume", str(tmp_path / "mixed"), "--max_steps", "10"])
    assert_close(tmp_path / "mixed", tmp_path / "one")
    assert [r["config"]["world_size"] for r in records(tmp_path / "mixed", "header")] == [2, 1]


def test_stacked_fine_tuning_on_two_processes_with_an_empty_share_equals_one(roots, tmp_path):
    raw, data = roots
    # 20 rows in batches of 19: the last batch has 1 row, and one process has none of it
    args = lambda out, *extra: ["--task", "agnews", "--model", "tiny", "--arch", "n_layer=1,n_head=1,head_dim=32",
                                "--train-per-label", "5", "--test-per-label", "3", "--epochs", "2",
                                "--batch_size", "19",
                                "--device", "cpu", "--quiet", "--seeds", "0,1", "--raw", str(raw), "--data", str(data),
                                "--out", str(out), *NO_DROPOUT, *extra]
    finetune.main(args(tmp_path / "one"))
    torchrun("train_cls.py", args(tmp_path / "two"))
    for s in ("s0", "s1"):
        assert_close(tmp_path / "two" / s, tmp_path / "one" / s)
        r1, r2 = (json.loads((tmp_path / d / s / "result.json").read_text()) for d in ("one", "two"))
        assert r2["acc_per_epoch"] == r1["acc_per_epoch"]
        assert [r["train_loss"] for r in records(tmp_path / "two" / s, "epoch")] == \
            pytest.approx([r["train_loss"] for r in records(tmp_path / "one" / s, "epoch")], rel=1e-6)
