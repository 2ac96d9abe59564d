"""tinytlm/precision.py: the CPU's native bf16 read from what it reports, and the auto rule; --precision in
the training commands: bf16 follows the fp32 loss curve, auto without native bf16 is the fp32 run, resume."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinytlm import finetune, precision, pretrain
from tinytlm.checkpoint import load_checkpoint
from tinytlm.common import UserError

REPO = Path(__file__).resolve().parents[1]

EPYC = "processor\t: 0\nflags\t\t: fpu vme avx2 avx512f avx512_bf16 avx512_vnni\nbugs\t\t: sysret_ss_attrs\n"
OLD_XEON = "processor\t: 0\nflags\t\t: fpu vme avx2 avx512f avx512bw avx512_vnni\n"
SAPPHIRE = "flags\t\t: avx512f amx_bf16 amx_tile amx_int8\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm sve\n"


def test_flags_from_cpuinfo():
    assert precision.cpu_bf16_flags(EPYC) == ["avx512_bf16"]
    assert precision.cpu_bf16_flags(OLD_XEON) == []
    assert precision.cpu_bf16_flags(SAPPHIRE) == ["amx_bf16"]
    assert precision.cpu_bf16_flags(GRAVITON3) == ["bf16"]
    assert precision.cpu_bf16_flags("") == []


@pytest.mark.parametrize("native,expect", [(True, "bf16"), (False, "fp32")])
def test_auto_follows_the_cpu(monkeypatch, native, expect):
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: native)
    assert precision.resolve_precision("auto", torch.device("cpu")) == expect
    assert precision.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert precision.resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_auto_is_bf16_on_cuda(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: False)
    assert precision.resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_unknown_precision_is_a_user_error():
    with pytest.raises(UserError, match="--precision 'fp16'"):
        precision.resolve_precision("fp16", torch.device("cpu"))


def test_autocast_contexts():
    x = torch.randn(4, 4)
    with precision.autocast(torch.device("cpu"), "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with precision.autocast(torch.device("cpu"), "fp32"):
        assert (x @ x).dtype == torch.float32
    with pytest.raises(ValueError, match="resolve it first"):
        precision.autocast(torch.device("cpu"), "auto")


# -----------------------------------------------------------------------------
# the switch in the training commands: bf16 follows fp32, auto without native bf16 is fp32, the records

SMALL = ["--model", "tiny", "--arch", "n_layer=1,n_head=1,head_dim=32", "--device", "cpu"]


def mlm_args(roots, out, *extra):
    raw, data = roots
    return [*SMALL, "--ws", "40", "--batch_size", "8", "--log_every", "5", "--raw", str(raw), "--data", str(data),
            "--out", str(out), *extra]


def records(run_dir) -> list:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir) -> list:
    return [r["loss"] for r in records(run_dir) if r["kind"] == "step"]


def test_bf16_training_follows_the_fp32_loss_curve(roots, tmp_path):
    """40 steps of a 1-block tiny model (8 epochs of 5 steps at lr 3e-3, a loss every 5 steps), same seed, fp32
    and bf16: every logged window loss of the bf16 run within 2^-9 (0.2%, relative) of the fp32 run's.

    Why 2^-9: it is one bf16 rounding (8 significant bits). A window loss is a mean over ~750 masked tokens
    whose rounding errors are independent, so it moves far less than one rounding, and the master weights and
    AdamW stay fp32, so the errors do not pile up in the weights over 40 steps (measured on this machine's
    EPYC, avx512_bf16: at most 2.7e-5, ~70x inside the bound). The curve itself falls by more than 15% over
    the run (asserted too), so a bf16 path that trains something else, or does not train, fails."""
    lr = ("--epochs", "8", "--lr", "3e-3")
    pretrain.main(mlm_args(roots, tmp_path / "fp32", *lr, "--precision", "fp32"))
    pretrain.main(mlm_args(roots, tmp_path / "bf16", *lr, "--precision", "bf16"))
    a, b = step_losses(tmp_path / "fp32"), step_losses(tmp_path / "bf16")
    assert len(a) == len(b) == 8
    assert a[-1] < 0.85 * a[0]  # the curve moves far more than the tolerance
    rel = [abs(x - y) / x for x, y in zip(a, b)]
    assert max(rel) < 2 ** -9, rel
    assert a != b  # bf16 did compute in bf16
    for name, want in (("fp32", "fp32"), ("bf16", "bf16")):
        head = records(tmp_path / name)[0]
        assert head["config"]["precision"] == want and head["config"]["precision_requested"] == want
        assert load_checkpoint(tmp_path / name)["train_config"]["precision"] == want


def test_auto_without_native_bf16_is_the_fp32_run(roots, tmp_path, monkeypatch):
    """On a CPU without native bf16 (the detection patched), auto trains bitwise as --precision fp32 and every
    record says fp32 (and that auto was asked for)."""
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: False)
    pretrain.main(mlm_args(roots, tmp_path / "fp32", "--epochs", "2", "--precision", "fp32"))
    pretrain.main(mlm_args(roots, tmp_path / "auto", "--epochs", "2"))
    a, b = load_checkpoint(tmp_path / "fp32"), load_checkpoint(tmp_path / "auto")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert step_losses(tmp_path / "fp32") == step_losses(tmp_path / "auto")
    assert b["train_config"]["precision"] == "fp32"
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert config["precision"] == "fp32" and config["precision_requested"] == "auto"
    assert records(tmp_path / "auto")[0]["config"]["precision"] == "fp32"


def test_resume_keeps_the_checkpoints_precision(roots, tmp_path, monkeypatch):
    """--resume without --precision continues in the checkpoint's precision (whatever auto would say here);
    an explicit other precision is a one-line error, exit 2; the classifier's result.json says its precision."""
    pretrain.main(mlm_args(roots, tmp_path / "a", "--epochs", "2", "--precision", "fp32", "--max_steps", "3"))
    err = subprocess.run([sys.executable, "train_mlm.py", "--resume", str(tmp_path / "a"), "--precision", "bf16"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = err.stderr.strip().splitlines()
    assert err.returncode == 2 and len(lines) == 1 and "--precision bf16" in lines[0] and "fp32" in lines[0], err.stderr
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: True)  # auto would be bf16 here
    pretrain.main(["--resume", str(tmp_path / "a"), "--max_steps", "0"])
    done = load_checkpoint(tmp_path / "a")
    assert done["step"] == 10 and done["train_config"]["precision"] == "fp32"
    assert [r["config"]["precision"] for r in records(tmp_path / "a") if r["kind"] == "header"] == ["fp32", "fp32"]
    raw, data = roots
    r = finetune.main(["--task", "agnews", "--train-per-label", "4", "--test-per-label", "4", "--epochs", "1",
                       "--batch_size", "8", "--raw", str(raw), "--data", str(data), "--device", "cpu", "--out",
                       str(tmp_path / "c"), "--init", str(tmp_path / "a")])
    assert r["precision"] == "bf16" == json.loads((tmp_path / "c" / "result.json").read_text())["precision"]
    assert load_checkpoint(tmp_path / "c", kind="cls")["train_config"]["precision"] == "bf16"
