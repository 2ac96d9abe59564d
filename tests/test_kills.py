"""Kill at any moment: each long-running command is SIGKILLed at random moments (drawn from a fixed seed),
continued the way a user would (`--resume`, or the same command again), and its final outputs must equal
an uninterrupted run's: bitwise weights and identical metrics for train_mlm.py (one model, and a stack)
and train_cls.py (a stack), identical shards for data_prep, identical records for the paper runner
in its default stacked mode (timing fields left out). Windows too short to hit at random are killed at their
exact point.

CI runs one kill for train_mlm.py and train_cls.py --seeds; `python -m pytest -m slow tests/test_kills.py`
runs 20 per command, and 1 for the others.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinytlm.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--model", "tiny", "--arch", "n_layer=1,n_head=1,head_dim=32", "--device", "cpu"]
TIMING = ("seconds", "seq_per_s", "eval_seq_per_s", "tok_per_s", "ms_per_step", "date", "time", "git", "train_s",
          "eval_s")


def start(argv):
    return subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def timed(argv) -> float:
    """Seconds an uninterrupted run takes (it is the reference the killed run is compared with)."""
    import time
    t0 = time.time()
    subprocess.run([sys.executable, *argv], cwd=REPO, check=True, capture_output=True)
    return time.time() - t0


def killed_then_finished(first, again, moments, done, check, reset) -> int:
    """Kill a run at each of `moments` (seconds after each start): start `first`, SIGKILL it at the moment, start
    `again()` (the command that continues it), and so on; a run that finishes before its moment is checked
    (`check()`) and started afresh (`reset()`), so every moment is a kill. At the end the last run is taken to
    its end and checked. Returns the number of kills made (each one survived, or check() fails)."""
    kills, argv = 0, first
    for t in moments:
        p = start(argv)
        try:
            p.wait(timeout=t)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            kills += 1
        if done():  # finished before the moment: check it, start again to kill it elsewhere
            check()
            reset()
            argv = first
        else:
            argv = again()
    p = subprocess.run([sys.executable, *again()], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    check()
    return kills


def epochs(run_dir: Path) -> list:
    """The last record of every epoch (a resumed run repeats the epochs after its checkpoint), timing left out."""
    last = {}
    for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if r["kind"] == "epoch":
            last[r["epoch"]] = {k: v for k, v in r.items() if k not in TIMING}
    return [last[e] for e in sorted(last)]


def same_weights(a: Path, b: Path):
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["step"] == sb["step"] and sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), (a, k)


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in TIMING and k != "path"}
    return [strip(v) for v in obj] if isinstance(obj, list) else obj


def moments(n: int, longest: float, seed: int) -> list:
    """n kill moments in (1 s, longest): within the run (imports take the first second or two)."""
    rng = random.Random(seed)
    return [rng.uniform(1.0, max(1.5, longest)) for _ in range(n)]


N_KILLS = [pytest.param(1, id="1-kill"), pytest.param(20, id="20-kills", marks=pytest.mark.slow)]
# commands whose kill harness runs only with -m slow (CI time): their 1-kill case too
SLOW_KILLS = [pytest.param(n, id=i, marks=pytest.mark.slow) for n, i in ((1, "1-kill"), (20, "20-kills"))]


@pytest.mark.parametrize("n", N_KILLS)
def test_pretraining_survives_kills(roots, tmp_path, n):
    raw, data = roots
    args = ["train_mlm.py", *SMALL, "--ws", "40", "--epochs", "4", "--batch_size", "8", "--log_every", "2",
            "--raw", str(raw), "--data", str(data)]
    t = timed([*args, "--out", str(tmp_path / "ref")])
    out = tmp_path / "k"
    first = [*args, "--out", str(out)]
    def check():
        same_weights(out, tmp_path / "ref")
        assert epochs(out) == epochs(tmp_path / "ref")
    kills = killed_then_finished(first, lambda: ["train_mlm.py", "--resume", str(out)] if (out / "ckpt.pt").is_file()
                                 else first, moments(n, t, 1),
                                 lambda: (out / "ckpt.pt").is_file() and load_checkpoint(out)["optimizer"] is None,
                                 check, lambda: shutil.rmtree(out))
    print(f"\ntrain_mlm: {kills} kills made, {kills} survived")


@pytest.mark.parametrize("n", SLOW_KILLS)
def test_stacked_pretraining_survives_kills(roots, tmp_path, n):
    raw, data = roots
    args = ["train_mlm.py", *SMALL, "--ws", "40", "--epochs", "3", "--batch_size", "8", "--seeds", "0,1",
            "--raw", str(raw), "--data", str(data)]
    t = timed([*args, "--out", str(tmp_path / "ref")])
    out = tmp_path / "k"
    first = [*args, "--out", str(out)]

    def check():
        for s in ("s0", "s1"):
            same_weights(out / s, tmp_path / "ref" / s)
            assert epochs(out / s) == epochs(tmp_path / "ref" / s)

    def done():
        return all((out / s / "ckpt.pt").is_file() and load_checkpoint(out / s)["optimizer"] is None
                   for s in ("s0", "s1"))
    kills = killed_then_finished(first, lambda: ["train_mlm.py", "--resume", str(out)]
                                 if (out / "stack.json").is_file() else first, moments(n, t, 5), done, check,
                                 lambda: shutil.rmtree(out))
    print(f"\ntrain_mlm --seeds: {kills} kills made, {kills} survived")


@pytest.mark.parametrize("n", N_KILLS)
def test_stacked_finetuning_survives_kills(roots, tmp_path, n):
    raw, data = roots
    args = ["train_cls.py", "--task", "agnews", *SMALL, "--train-per-label", "8", "--test-per-label", "4",
            "--epochs", "3", "--batch_size", "8", "--quiet", "--seeds", "0,1", "--raw", str(raw), "--data", str(data)]
    t = timed([*args, "--out", str(tmp_path / "ref")])
    out = tmp_path / "k"
    first = [*args, "--out", str(out)]
    def check():
        for s in ("s0", "s1"):
            same_weights(out / s, tmp_path / "ref" / s)
            assert epochs(out / s) == epochs(tmp_path / "ref" / s)
            assert strip(json.loads((out / s / "result.json").read_text())) == \
                strip(json.loads((tmp_path / "ref" / s / "result.json").read_text()))
    kills = killed_then_finished(first, lambda: ["train_cls.py", "--resume", str(out)] if (out / "stack.json").is_file()
                                 else first, moments(n, t, 2),
                                 lambda: all((out / s / "result.json").is_file() for s in ("s0", "s1")),
                                 check, lambda: shutil.rmtree(out))
    print(f"\ntrain_cls --seeds: {kills} kills made, {kills} survived")


@pytest.mark.parametrize("n", SLOW_KILLS)
def test_data_prep_survives_kills(shared, tmp_path, n):
    args = ["data_prep/wikipedia.py", "--raw", str(shared), "--rows", "3000", "--workers", "2"]
    t = timed([*args, "--out", str(tmp_path / "ref")])
    first = [*args, "--out", str(tmp_path / "k")]
    ref, got = (d / "wikipedia" / "wiki.bin" for d in (tmp_path / "ref", tmp_path / "k"))

    def check():
        assert got.read_bytes() == ref.read_bytes()
    kills = killed_then_finished(first, lambda: first, moments(n, t, 3), got.is_file, check,
                                 lambda: shutil.rmtree(tmp_path / "k"))
    print(f"\ndata_prep: {kills} kills made, {kills} survived")


def paper_records(root: Path, strip_prefix: Path) -> dict:
    """A paper run's cell records (RESULTS/cells/mini/), timing and the run's own folder left out."""
    return {p.name: strip(json.loads(p.read_text().replace(str(strip_prefix), "")))
            for p in (root / "cells" / "mini").glob("*")}


@pytest.mark.parametrize("n", SLOW_KILLS)
def test_paper_runner_survives_kills(shared, tmp_path, n):
    """The runner in its default mode: a row's seeds train as one stack (a stack killed between its members'
    results or records is finished from its cache, never retrained as a smaller stack)."""
    def cmd(name):
        return ["-m", "tinytlm.paper", "table5", "--scale", "mini", "--device", "cpu", "--raw", str(shared),
                "--data", str(tmp_path / "data"), "--cache", str(tmp_path / name / "cache"),
                "--results", str(tmp_path / name / "results")]
    t = timed(cmd("ref"))

    def check():
        got, ref = (paper_records(tmp_path / d / "results", tmp_path / d) for d in ("k", "ref"))
        assert got == ref and len(ref) == 4
    kills = killed_then_finished(cmd("k"), lambda: cmd("k"), moments(n, t, 4),
                                 lambda: (tmp_path / "k" / "results" / "mini" / "table5.md").is_file(), check,
                                 lambda: shutil.rmtree(tmp_path / "k"))
    print(f"\npaper: {kills} kills made, {kills} survived")


class _Killed(BaseException):
    """A kill at one exact point (a SIGKILL there is too short a window to hit at random)."""


def paper_cells(tmp_path: Path, name: str, only: set) -> int:
    """Run these (row, seed) cells of Table 5 (mini) in-process into tmp_path/name (cache/, results/); returns
    how many cells were computed."""
    from tinytlm.paper_cells import Runner, run_table
    runner = Runner(tmp_path / name / "cache", "cpu", "", "", records=tmp_path / name / "results" / "cells" / "mini",
                    scale="mini")
    run_table("table5", "mini", 2, runner, only=only)
    return runner.computed


def test_paper_runner_killed_between_the_renames_of_a_stacked_pretrainings_first_save(shared, tmp_path, monkeypatch):
    """Two pre-training seeds train as one stack; a kill between the renames of its first save leaves one member
    with a checkpoint and the other with none. The stack starts again as one (its members apart would draw other
    dropout masks): checkpoints and records equal the uninterrupted run's."""
    from tinytlm import pretrain
    from tinytlm.paper_tables import SCALES
    monkeypatch.setitem(SCALES["mini"], "pretrain_seeds", 2)  # W_s 64 pre-trained at seeds 0 and 1: a stack of 2
    # no held-out evaluation (CI time: ~15 s per member on a CPU); the kill window is the same without it
    monkeypatch.setattr(pretrain, "held_out", lambda cfg, data_meta: None)
    row = {("W_s 64", 0), ("W_s 64", 1)}
    assert paper_cells(tmp_path, "ref", row) == 4  # 2 pre-trainings, 2 fine-tunings
    rename = os.replace

    def killed_at_the_second(src, dst):  # the first save's second member checkpoint, before its rename
        if Path(dst).name == "ckpt.pt" and Path(dst).parent.parent.name == "mlm":
            if any((d / "ckpt.pt").is_file() for d in Path(dst).parent.parent.iterdir()):
                raise _Killed
        return rename(src, dst)
    with monkeypatch.context() as mp:
        mp.setattr(os, "replace", killed_at_the_second)
        with pytest.raises(_Killed):
            paper_cells(tmp_path, "k", row)
    mlm = sorted((tmp_path / "k" / "cache" / "mlm").iterdir())
    assert sorted((d / "ckpt.pt").is_file() for d in mlm) == [False, True]
    assert paper_cells(tmp_path, "k", row) == 4
    for d in mlm:
        same_weights(d, tmp_path / "ref" / "cache" / "mlm" / d.name)
        assert json.loads((d / "done.json").read_text())["stacked"] == 2
    assert paper_records(tmp_path / "k" / "results", tmp_path / "k") == \
        paper_records(tmp_path / "ref" / "results", tmp_path / "ref")


def test_paper_runner_killed_between_a_cells_result_and_its_record(shared, tmp_path, monkeypatch):
    """A stacked fine-tuning killed after its first member's result.json, before that member's record: the same
    command writes the record from the cache (the cache alone would lose it) and finishes the second member."""
    from tinytlm import paper_records as records_module
    row = {("no pre-training", 0), ("no pre-training", 1)}
    assert paper_cells(tmp_path, "ref", row) == 2
    write = records_module.write_json

    def killed_at_the_first_record(path, obj):
        if Path(path).parent == tmp_path / "k" / "results" / "cells" / "mini":
            raise _Killed
        write(path, obj)
    with monkeypatch.context() as mp:
        mp.setattr(records_module, "write_json", killed_at_the_first_record)
        with pytest.raises(_Killed):
            paper_cells(tmp_path, "k", row)
    assert sum(json.loads(p.read_text()).get("kind") == "finetune"
               for p in (tmp_path / "k" / "cache" / "cls").glob("*/result.json")) == 1
    assert paper_cells(tmp_path, "k", row) == 1  # the second member, read back from its stack's checkpoint
    assert paper_records(tmp_path / "k" / "results", tmp_path / "k") == \
        paper_records(tmp_path / "ref" / "results", tmp_path / "ref")
