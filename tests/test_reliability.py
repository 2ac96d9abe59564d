"""Reliability: a diverging run stops with its last good checkpoint kept; out-of-range numbers are refused."""
import pytest

from tinytlm import pretrain
from tinytlm.checkpoint import load_checkpoint
from tinytlm.common import UserError
from tests.test_engine import assert_one_line_error, mlm_args, run


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


@pytest.mark.parametrize("argv, words", [
    (["train_mlm.py", "--lr", "nan"], ["--lr nan"]),
    (["train_mlm.py", "--lr", "0"], ["--lr 0"]),
    (["train_mlm.py", "--weight_decay", "-0.1"], ["--weight_decay -0.1"]),
    (["train_mlm.py", "--grad_clip", "inf"], ["--grad_clip inf"]),
    (["train_mlm.py", "--dropout", "1.5"], ["--dropout", "[0, 1)"]),
    (["train_mlm.py", "--attn_dropout", "nan"], ["--attn_dropout"]),
    (["train_mlm.py", "--n_head", "0"], ["--n_head", ">= 1"]),
    (["train_mlm.py", "--head_dim", "-4"], ["--head_dim"]),
    (["train_mlm.py", "--conv_kernel", "0,3"], ["conv_kernel"]),
    (["train_cls.py", "--lr", "-1"], ["--lr -1"]),
    (["train_cls.py", "--wd", "-2"], ["--wd -2"]),
    (["train_cls.py", "--model", "tiny", "--ffn_mult", "0"], ["--ffn_mult"]),
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
