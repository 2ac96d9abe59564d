"""Engine: exact resume, fine-tuning with the gap, the soft committee, bad input to the three scripts."""
import contextlib
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from tinytlm import ensemble, finetune, paper, pretrain
from tinytlm.checkpoint import load_checkpoint
from tinytlm.committee import accuracy, committee_logits
from tinytlm.common import Interrupted, UserError, cli

REPO = Path(__file__).resolve().parents[1]
# a very small model: 1 block, 1 head of 32 (the vocabulary stays 30,522 because the ids are real)
SMALL = ["--model", "tiny", "--arch", "n_layer=1,n_head=1,head_dim=32", "--device", "cpu"]


def mlm_args(roots, out, *extra):
    raw, data = roots
    return [*SMALL, "--ws", "40", "--epochs", "2", "--batch_size", "8", "--log_every", "2", "--raw", str(raw),
            "--data", str(data), "--out", str(out), *extra]


def test_interrupted_then_resumed_is_bitwise_identical(roots, tmp_path, interrupt):
    pretrain.main(mlm_args(roots, tmp_path / "a"))  # 2 epochs x 5 steps, uninterrupted
    with pytest.raises(Interrupted) as e, interrupt(3):  # a Ctrl-C in the middle of step 3: the run stops after it
        pretrain.main(mlm_args(roots, tmp_path / "b"))
    assert "--resume" in str(e.value)  # the command line turns it into exit code 130 (test_sigterm_...)
    mid = load_checkpoint(tmp_path / "b", kind="mlm")
    assert mid["step"] == 3 and mid["optimizer"] is not None
    pretrain.main(["--resume", str(tmp_path / "b")])
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a["step"] == b["step"] == 10
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the metrics a plot reads: a header, then step and epoch records with loss and masked-token accuracy
    recs = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["kind"] == "header" and "git" in recs[0] and "device" in recs[0]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1] and all(0 <= r["mlm_acc"] <= 1 for r in epochs)
    # a step record is its window's loss (not a running mean): the windows of an epoch add up to it
    steps = [r for r in recs if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [2, 4, 5, 6, 8, 10]
    for ep in epochs:
        ws = [r for r in steps if r["epoch"] == ep["epoch"]]
        assert sum(r["loss"] * r["masked"] for r in ws) / sum(r["masked"] for r in ws) == pytest.approx(ep["loss"])
        assert len({round(r["loss"], 6) for r in ws}) == len(ws)
    assert all(r["ms_per_step"] > 0 and r["tok_per_s"] > 0 and r["seq_per_s"] > 0 for r in steps)


def test_resume_rules(roots, tmp_path):
    pretrain.main(mlm_args(roots, tmp_path / "a", "--epochs", "1"))
    assert_one_line_error(run(["train_mlm.py", "--resume", str(tmp_path / "a")]), "finished")
    assert_one_line_error(run(["train_mlm.py", *mlm_args(roots, tmp_path / "a")]), "already holds a checkpoint")
    # a run stopped by --max_steps continues; flags that would change the run are refused
    pretrain.main(mlm_args(roots, tmp_path / "b", "--max_steps", "2"))
    assert load_checkpoint(tmp_path / "b")["step"] == 2
    assert_one_line_error(run(["train_mlm.py", "--resume", str(tmp_path / "b"), "--lr", "1"]), "--lr")
    assert_one_line_error(run(["train_mlm.py", "--resume", str(tmp_path / "b"), "--arch", "n_layer=3"]), "--arch")
    pretrain.main(["--resume", str(tmp_path / "b"), "--max_steps", "4"])
    assert load_checkpoint(tmp_path / "b")["step"] == 4
    # --max_steps 0 given on --resume lifts the earlier limit: the run goes on to its last epoch
    pretrain.main(["--resume", str(tmp_path / "b"), "--max_steps", "0"])
    done = load_checkpoint(tmp_path / "b")
    assert done["step"] == 10 and done["optimizer"] is None and done["train_config"]["max_steps"] == 0


def test_gap_arms_differ_only_in_initialisation(roots, tmp_path):
    """With a 'pre-trained' trunk equal to the scratch arm's initial trunk, the two arms must be identical."""
    from tinytlm.checkpoint import save_checkpoint
    from tinytlm.model import BertConfig, BertForClassification, BertForMLM
    raw, data = roots
    cfg = BertConfig.preset("tiny", n_layer=1, n_head=1, head_dim=32)
    torch.manual_seed(5)  # run_arm seeds with --seed before building the classifier
    trunk = BertForClassification(cfg, 4).bert.state_dict()
    mlm = BertForMLM(cfg)
    mlm.bert.load_state_dict(trunk)
    save_checkpoint(tmp_path / "init.pt", kind="mlm", model=mlm, optimizer=None, step=0, epoch=0,
                    train_config={"model": "tiny"}, data={"shard": "none", "ws": 0})
    gap = finetune.main(["--task", "agnews", "--train-per-label", "6", "--test-per-label", "5", "--epochs", "2",
                          "--batch_size", "8", "--raw", str(raw), "--data", str(data), "--device", "cpu",
                          "--seed", "5", "--init", str(tmp_path / "init.pt"), "--gap", "--out", str(tmp_path / "g")])
    assert gap["gap"] == 0.0
    a, b = (load_checkpoint(tmp_path / "g" / arm, kind="cls") for arm in ("pretrained", "scratch"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_finetune_gap_and_committee(roots, tmp_path):
    raw, data = roots
    pretrain.main(mlm_args(roots, tmp_path / "mlm", "--epochs", "1"))
    task = ["--task", "agnews", "--train-per-label", "8", "--test-per-label", "6", "--epochs", "2",
            "--batch_size", "8", "--raw", str(raw), "--data", str(data), "--device", "cpu"]
    gap = finetune.main([*task, "--init", str(tmp_path / "mlm"), "--gap", "--out", str(tmp_path / "gap")])
    assert gap["gap"] == pytest.approx(gap["acc_pretrained"] - gap["acc_scratch"])
    assert gap["token_stats"]["T_W"] > 0 and gap["token_stats"]["T_M"] < gap["token_stats"]["T_C"]
    scratch = json.loads((tmp_path / "gap" / "scratch" / "result.json").read_text())
    assert scratch["token_stats"]["T_W"] == 0 and scratch["token_stats"]["T_M"] == scratch["token_stats"]["T_C"]
    pretrained = json.loads((tmp_path / "gap" / "pretrained" / "result.json").read_text())
    assert scratch["model_config"] == pretrained["model_config"]
    assert len(scratch["acc_per_epoch"]) == 2 and scratch["n_test"] == 24

    res = ensemble.main([str(tmp_path / "gap" / "pretrained"), str(tmp_path / "gap" / "scratch"), "--device", "cpu",
                         "--latency-samples", "2", "--raw", str(raw), "--data", str(data),
                         "--json", str(tmp_path / "ens.json")])
    assert [m["acc"] for m in res["members"]] == pytest.approx([gap["acc_pretrained"], gap["acc_scratch"]])
    assert res["committee"]["latency_layers"] == max(m["latency_layers"] for m in res["members"])
    assert json.loads((tmp_path / "ens.json").read_text())["committee"]["acc"] == res["committee"]["acc"]

    # a member of another task is refused
    other = finetune.main(["--task", "dbpedia", "--train-per-label", "2", "--test-per-label", "2", "--epochs", "1",
                            "--raw", str(raw), "--data", str(data), *SMALL, "--out", str(tmp_path / "dbp")])
    assert other["arm"] == "scratch"
    r = run(["ensemble.py", str(tmp_path / "gap" / "scratch"), str(tmp_path / "dbp"), "--data", str(data)])
    assert_one_line_error(r, "different task")


def test_committee_is_argmax_of_summed_logits():
    # member A is confident and wrong on row 0; B and C are mildly right: a majority vote says label 1,
    # the sum of raw logits says label 0 -- the committee must follow the sum.
    a = torch.tensor([[5.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    c = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    s = committee_logits([a, b, c])
    assert torch.equal(s, a + b + c)
    assert s.argmax(-1).tolist() == [0, 1]
    assert accuracy(s, [0, 1]) == 1.0 and accuracy(s, [1, 1]) == 0.5


# -----------------------------------------------------------------------------
# bad input: one-line error, exit code 2

SCRIPTS = {"train_mlm.py": pretrain.main, "train_cls.py": finetune.main, "ensemble.py": ensemble.main,
           "paper": paper.main}


def run(args, scripts=SCRIPTS):
    """A command run the way its script runs it (tinytlm.common.cli: exit code 2 and one line on stderr for
    bad input), but in this process: a subprocess per case costs seconds of imports. The scripts themselves
    run as subprocesses in the SIGTERM, SIGKILL and --kernels triton tests. scripts: name -> main."""
    err, argv = io.StringIO(), sys.argv
    sys.argv = list(args)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                cli(scripts[args[0]])
                code = 0
            except SystemExit as e:
                code = e.code
    finally:
        sys.argv = argv
    return types.SimpleNamespace(returncode=code, stderr=err.getvalue())


def assert_one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_input_to_the_scripts(roots, tmp_path):
    raw, data = roots
    assert_one_line_error(run(["train_cls.py", "--init", str(tmp_path / "missing.pt")]), "missing.pt", "not found")
    assert_one_line_error(run(["train_cls.py", "--task", "imdb", "--data", str(data), "--raw", str(raw)]), "imdb")
    assert_one_line_error(run(["train_mlm.py", "--no-such-flag", "1"]), "--no-such-flag")
    assert_one_line_error(run(["train_mlm.py", "--epochs", "many"]), "--epochs")
    assert_one_line_error(run(["train_mlm.py", "--ws", "100000", "--raw", str(raw), "--data", str(data)]),
                          "--ws 100000", "120")
    assert_one_line_error(run(["train_mlm.py", "--model", "bert99", "--ws", "10", "--raw", str(raw),
                               "--data", str(data)]), "bert99")
    assert_one_line_error(run(["ensemble.py", str(tmp_path)]), "checkpoint not found")
    small = ["--raw", str(raw), "--data", str(data), "--ws", "10", *SMALL]
    assert_one_line_error(run(["train_mlm.py", *small, "--batch_size", "0"]), "--batch_size")
    assert_one_line_error(run(["train_mlm.py", *small, "--log_every", "0"]), "--log_every")
    assert_one_line_error(run(["train_mlm.py", *small, "--mask_cap", "-1"]), "--mask_cap")
    assert_one_line_error(run(["train_cls.py", "--epochs", "0", "--raw", str(raw), "--data", str(data)]), "--epochs")
    # --kernels triton without the interpreter: a one-line error without CUDA, a normal run with it
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cuda = torch.cuda.is_available()
    r = subprocess.run([sys.executable, "train_mlm.py", *small, "--device", "cuda" if cuda else "cpu",
                        "--epochs", "1", "--kernels", "triton", "--out", str(tmp_path / "t")],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    if cuda:
        assert r.returncode == 0, r.stderr[-2000:]
        assert load_checkpoint(tmp_path / "t", kind="mlm")["step"] >= 1
    else:
        assert_one_line_error(r, "--kernels triton", "CUDA")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert_one_line_error(run(["ensemble.py", str(bad)]), "bad.pt")


def test_committee_forward_sums_member_logits():
    from tinytlm.committee import committee_forward
    from tinytlm.model import BertConfig, BertForClassification
    torch.manual_seed(0)
    members = [BertForClassification(BertConfig.preset("tiny", n_layer=1, n_head=1, head_dim=32), 3).eval()
               for _ in range(3)]
    x = torch.randint(1000, 30000, (2, 16))
    with torch.no_grad():
        expect = sum(m(x)[0] for m in members)
        torch.testing.assert_close(committee_forward(members, x), expect)


@pytest.mark.parametrize("script, config", [("train_mlm.py", "MLMConfig"), ("train_cls.py", "ClsConfig")])
def test_every_flag_has_help_and_there_are_at_most_33(script, config):
    # 33 since --precision (issue 21): train_mlm had 32 with -h, --config and --arch
    from tinytlm.config import describe
    cls = getattr(pretrain if config == "MLMConfig" else finetune, config)
    assert all(f["help"] for f in describe(cls)), [f["flag"] for f in describe(cls) if not f["help"]]
    r = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    options = [ln for ln in r.stdout.splitlines() if ln.startswith("  -")]  # one per option, aliases on its line
    assert r.returncode == 0 and 20 <= len(options) <= 33, options
    assert "--arch" in r.stdout and "--n_layer" not in r.stdout and "--mask_per_row" not in r.stdout
    assert "--compile_mode" not in r.stdout  # folded into --compile


def test_arch_flag_and_deprecated_wd():
    cfg, over = pretrain.parse(["--model", "tiny", "--arch", "n_conv=2,conv_kernel=16x3", "--arch", "dropout=0"])
    assert over == {"n_conv": 2, "conv_kernel": (16, 3), "dropout": 0.0}
    with pytest.raises(UserError, match="--arch 'n_layers=2': unknown key 'n_layers'"):
        pretrain.parse(["--arch", "n_layers=2"])
    cfg, _ = finetune.parse(["--wd", "0.5"])
    assert cfg.weight_decay == 0.5


def test_compile_is_one_option_and_old_spellings_still_read(tmp_path):
    from tinytlm.config import from_saved
    from tinytlm.train import AUTO_COMPILE, compile_mode
    assert [pretrain.parse(a)[0].compile for a in ([], ["--compile"], ["--compile", "true"], ["--compile", "false"],
                                                   ["--compile", "max-autotune"])] == \
        ["auto", "on", "on", "off", "max-autotune"]
    saved = {"compile": True, "compile_mode": "reduce-overhead", "ws": 10}  # a config.json of an older version
    assert from_saved(pretrain.MLMConfig, saved).compile == "reduce-overhead"
    assert from_saved(pretrain.MLMConfig, {"compile": False, "compile_mode": "default"}).compile == "off"
    (tmp_path / "c.json").write_text(json.dumps({"compile": True, "compile_mode": "default"}))
    assert pretrain.parse(["--config", str(tmp_path / "c.json")])[0].compile == "on"
    cpu = torch.device("cpu")
    assert [compile_mode(o, cpu) for o in ("off", "on", "reduce-overhead", "auto")] == \
        ["", "default", "reduce-overhead", AUTO_COMPILE["cpu"]]
    from tinytlm.paper_report import path_text  # paper records of either age say how a cell ran
    assert path_text({"compile": True, "compile_mode": "reduce-overhead", "kernels": "torch"}) == \
        "compiled (reduce-overhead), kernels torch"
    assert [path_text({"compile": c, "kernels": "torch"}) for c in (False, "off", "auto", "on")] == \
        ["eager, kernels torch", "eager, kernels torch", "compile auto, kernels torch", "compiled, kernels torch"]
    assert_one_line_error(run(["train_mlm.py", "--compile_mode", "default"]), "--compile_mode", "--compile MODE")
    assert_one_line_error(run(["train_cls.py", "--compile-mode=reduce-overhead"]), "--compile-mode", "--compile MODE")


def test_config_file_and_flag_precedence(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"ws": 123, "epochs": 3, "n_conv": 2, "conv_kernel": [16, 3]}))
    cfg, over = pretrain.parse(["--config", str(cfg_file), "--epochs", "7"])
    assert (cfg.ws, cfg.epochs) == (123, 7)  # the command line wins over the file
    assert over == {"n_conv": 2, "conv_kernel": (16, 3)}
    cfg_file.write_text(json.dumps({"wss": 1}))
    assert_one_line_error(run(["train_mlm.py", "--config", str(cfg_file)]), "c.json", "'wss'")


def test_sigterm_stops_at_a_step_boundary(roots, tmp_path):
    """A SIGTERM (e.g. from a job scheduler) is handled like Ctrl-C: an exact checkpoint, exit 130."""
    import signal
    import time
    p = subprocess.Popen([sys.executable, "train_mlm.py", *mlm_args(roots, tmp_path / "t", "--epochs", "50")],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(600):  # wait until the first step record is written
        m = tmp_path / "t" / "metrics.jsonl"
        if m.is_file() and '"kind": "step"' in m.read_text():
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    state = load_checkpoint(tmp_path / "t")
    assert state["step"] >= 2 and state["optimizer"] is not None and "--resume" in err


def test_demo_runs_twice(roots, tmp_path, monkeypatch, capsys):
    """A second run of the demo reuses the first one's finished work and exits normally; other settings
    start afresh."""
    from tinytlm import demo
    raw, data = roots
    monkeypatch.setenv("TINYTLM_RAW", str(raw))
    monkeypatch.setenv("TINYTLM_DATA", str(data))
    argv = ["--ws", "40", "--pretrain-epochs", "1", "--train-per-label", "4", "--test-per-label", "4",
            "--finetune-epochs", "1", "--out", str(tmp_path / "demo")]
    demo.main(argv)
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("ckpt.pt")}
    assert len(first) == 4  # mlm, the two arms of the gap, the second member
    capsys.readouterr()
    demo.main(argv)
    out = capsys.readouterr().out
    assert out.count("reusing") == 2 and "committee of 2 pre-trained members" in out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("ckpt.pt")} == first
    demo.main(argv[:-3] + ["2", "--out", str(tmp_path / "demo")])  # 2 fine-tuning epochs: a new demo
    assert "starting afresh" in capsys.readouterr().out


def cls_args(roots, out, *extra, model=SMALL):
    raw, data = roots
    return ["--task", "agnews", "--train-per-label", "8", "--test-per-label", "6", "--epochs", "3", "--batch_size", "8",
            "--raw", str(raw), "--data", str(data), *model, "--out", str(out), *extra]


def assert_same_run(a_dir, b_dir):
    a, b = load_checkpoint(a_dir, kind="cls"), load_checkpoint(b_dir, kind="cls")
    assert a["step"] == b["step"] and a["optimizer"] is None and b["optimizer"] is None
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a_dir, b_dir))
    assert ra["acc_per_epoch"] == rb["acc_per_epoch"] and ra["per_label_acc"] == rb["per_label_acc"]


@pytest.mark.parametrize("at", [6, 4], ids=["mid-epoch", "epoch-end"])
def test_finetuning_interrupted_then_resumed_is_bitwise_identical(roots, tmp_path, at, interrupt):
    """Ctrl-C in the middle of a step (in the middle of epoch 2, or on the last step of epoch 1): the run
    stops at the step boundary with an exact checkpoint, and --resume ends where the uninterrupted run ends."""
    finetune.main(cls_args(roots, tmp_path / "a"))  # 3 epochs x 4 steps
    with pytest.raises(Interrupted) as e, interrupt(at):
        finetune.main(cls_args(roots, tmp_path / "b"))
    assert "--resume" in str(e.value)
    mid = load_checkpoint(tmp_path / "b", kind="cls")
    assert mid["step"] == at and mid["optimizer"] is not None and not (tmp_path / "b" / "result.json").exists()
    assert len(mid["extra"]["accs"]) == (at - 1) // 4 + (at % 4 == 0)  # an epoch's last step: scored first
    assert_one_line_error(run(["train_cls.py", "--resume", str(tmp_path / "b"), "--lr", "1"]), "--lr")
    finetune.main(["--resume", str(tmp_path / "b")])
    assert_same_run(tmp_path / "a", tmp_path / "b")
    assert_one_line_error(run(["train_cls.py", "--resume", str(tmp_path / "b")]), "finished")


@pytest.mark.slow  # (tests/test_kills.py kills train_cls stacks in CI)
def test_gap_killed_at_random_then_resumed(roots, tmp_path):
    """SIGKILL (no chance to save) while the pre-trained arm trains: --resume on the gap folder continues
    that arm from its last epoch checkpoint, runs the scratch arm, and gives the uninterrupted gap."""
    import signal
    import time
    pretrain.main(mlm_args(roots, tmp_path / "mlm", "--epochs", "1"))
    def gap(out):  # the architecture comes from the checkpoint
        return cls_args(roots, out, "--epochs", "6", "--init", str(tmp_path / "mlm"), "--gap",
                        model=["--device", "cpu"])
    whole = finetune.main(gap(tmp_path / "a"))
    p = subprocess.Popen([sys.executable, "train_cls.py", *gap(tmp_path / "b")], cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    metrics = tmp_path / "b" / "pretrained" / "metrics.jsonl"
    for _ in range(3000):  # kill once the first epoch is scored and checkpointed
        if metrics.is_file() and '"kind": "epoch"' in metrics.read_text():
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL and not (tmp_path / "b" / "gap.json").exists()
    r = run(["train_cls.py", "--resume", str(tmp_path / "b")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "b" / "gap.json").read_text())["gap"] == whole["gap"]
    for arm in ("pretrained", "scratch"):
        assert_same_run(tmp_path / "a" / arm, tmp_path / "b" / arm)


def test_arm_killed_after_its_final_checkpoint_writes_its_result_from_it(roots, tmp_path):
    """A kill between the final checkpoint (no optimizer state) and result.json: the checkpoint holds the
    result, which the arm writes without training again (the paper runner and --gap use this)."""
    finetune.main(cls_args(roots, tmp_path / "a", "--epochs", "2"))
    first = json.loads((tmp_path / "a" / "result.json").read_text())
    (tmp_path / "a" / "result.json").unlink()
    assert load_checkpoint(tmp_path / "a", kind="cls")["optimizer"] is None
    cfg, overrides = finetune.parse(cls_args(roots, tmp_path / "a", "--epochs", "2"))
    metrics = (tmp_path / "a" / "metrics.jsonl").read_text()
    again = finetune.arm(cfg, overrides, None, tmp_path / "a")
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == metrics and again == first
    assert again["acc_per_epoch"] == first["acc_per_epoch"] and again["per_label_acc"] == first["per_label_acc"]
