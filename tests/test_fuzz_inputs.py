"""The bad-input fuzzer (tests/fuzz_inputs.py, tests/fuzz_runner.py) over every command and environment
variable: a seeded sample in the default run, every trial under -m slow, and a test that it catches an option
added without validation."""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import fuzz_inputs as fz
from tests import fuzz_runner as fr
from tests.fuzz_inputs import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PER_COMMAND = 4  # trials per command in the sampled sweep (the full one: -m slow)


@pytest.fixture(scope="module")
def world(roots, tmp_path_factory):
    """What the trials point at: the small raw root, a prepared data root, finished runs of every kind (MLM,
    classifier, stacked seeds, a --gap folder) and the wrong files of fuzz_inputs.make_files."""
    from tinytlm import finetune, pretrain
    raw, _ = roots
    w = tmp_path_factory.mktemp("world")
    (w / "raw").symlink_to(raw)
    run = ["--raw", str(w / "raw"), "--data", str(w / "data"), "--batch_size", "8", "--epochs", "1", "--device", "cpu"]
    cls = [*fz.TASK, "--quiet", *run]
    run += fz.SMALL
    pretrain.main([*run, "--ws", "16", "--out", str(w / "runs" / "mlm")])
    finetune.main([*cls, *fz.SMALL, "--out", str(w / "runs" / "cls")])
    finetune.main([*cls, *fz.SMALL, "--seeds", "0,1", "--out", str(w / "runs" / "stack")])
    finetune.main([*cls, "--gap", "--init", str(w / "runs" / "mlm"), "--out", str(w / "runs" / "gap")])
    fr.make_files(w)
    return w


def sweep(world, trials, limit):
    results = fr.run_in_subprocess(world, trials, limit)
    counts, failures = fr.report(trials, results)
    return counts, failures


def test_a_seeded_sample_of_every_command_keeps_the_contract(world):
    trials = fz.sample(fz.make_trials(), PER_COMMAND, seed=0)
    assert trials == fz.sample(fz.make_trials(), PER_COMMAND, seed=0)  # deterministic
    counts, failures = sweep(world, trials, limit=20)
    assert set(counts) == set(COMMANDS)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_every_trial_of_every_command_keeps_the_contract(world):
    counts, failures = sweep(world, fz.make_trials(), limit=20)
    assert not failures, "\n".join(failures)


def test_every_option_of_every_command_has_trials_and_one_table():
    for command, (_, parser, _) in COMMANDS.items():
        ap = fz.resolve(parser)()
        tried = {t["option"] for t in fz.command_trials(command, ap)}
        for a in ap._actions:
            if a.dest == "help":
                continue
            name = a.option_strings[0] if a.option_strings else a.dest
            assert name in tried, (command, name)
            # the constraints the command validates with are on the action (add_option or config's metadata)
            assert hasattr(a, "constraint"), f"{command} {name}: declared without tinytlm.common.add_option"


def test_every_environment_variable_the_package_reads_is_fuzzed():
    read = set()
    for p in (ROOT / "tinytlm").glob("*.py"):
        read |= set(re.findall(r"[\"'](TINYTLM_[A-Z_]+)[\"']", p.read_text()))
    assert read and read <= set(fz.ENV), read - set(fz.ENV)
    assert {t["option"] for t in fz.env_trials()} == set(fz.ENV)


def test_in_process_trials_match_the_scripts_run_as_subprocesses(world):
    """The runner calls main() in one process; the contract it checks is the scripts' own: a few trials run as
    real subprocesses give the same exit code and the same one stderr line."""
    picks = [("train_mlm", "--epochs", "0"), ("data_prep/tasks", "--max-len", "nan"),
             ("download", "--mirror", "gopher://127.0.0.1/x")]
    trials = []
    for command, flag, text in picks:
        ap = fz.resolve(COMMANDS[command][1])()
        action = next(a for a in ap._actions if flag in a.option_strings)
        trials.append(fz.trial(command, fz.with_option(fz.BASE[command], ap, action, text), "bad", flag))
    results = fr.run_in_subprocess(world, trials)
    env = {**os.environ, "TINYTLM_RAW": str(world / "raw"), "TINYTLM_DATA": str(world / "data"),
           "TINYTLM_NO_DOWNLOAD": "1", "PYTHONPATH": str(ROOT)}
    for t, r in zip(trials, results):
        script = [f"{t['command']}.py"] if t["command"] in ("train_mlm", "data_prep/tasks") else [
            "-m", f"tinytlm.{t['command']}"]
        p = subprocess.run([sys.executable, *script, *r["argv"]], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        assert (p.returncode, p.stderr.strip()) == (r["code"], r["stderr"].strip()), t
        assert fr.verdict(t, r) == ""


# -----------------------------------------------------------------------------
# a test of the test: an option added without validation is caught

def toy_parser():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4, help="rows per chunk")  # no constraint declared
    return ap


def toy_main(argv=None):
    args = toy_parser().parse_args(argv)
    return [r // args.rows for r in range(8)]  # --rows 0: ZeroDivisionError, a traceback


def test_the_fuzzer_catches_an_option_added_without_validation(world, monkeypatch):
    spec = ("tests.test_fuzz_inputs:toy_main", "tests.test_fuzz_inputs:toy_parser", None)
    monkeypatch.setitem(fz.BASE, "toy", ["--rows", "4"])
    trials = fz.command_trials("toy", toy_parser())
    for t in trials:
        t["spec"] = spec
    counts, failures = sweep(world, trials, limit=20)
    assert counts == {"toy": len(trials)}
    assert any("toy --rows" in f and "ZeroDivisionError" in f for f in failures), failures
