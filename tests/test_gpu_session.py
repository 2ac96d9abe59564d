"""The GPU session flow on the CPU: the scheduler's sizing, the one-command SMOKE run, the import."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest


from bench import gpu_cells, gpu_import, gpu_kernels

REPO = Path(__file__).resolve().parents[1]


def throughput(path: Path, seq_per_s: float) -> Path:
    """A throughput.json as bench/train_throughput.py writes it, with one measured model."""
    path.write_text(json.dumps({"best": {"tiny": {"B": 32, "stack": "eager", "seq_per_s": seq_per_s,
                                                  "infer_seq_per_s": 3 * seq_per_s, "first_step_s": 1.0,
                                                  "warmup_s": 2.0,
                                                  "path": {"compile": False, "compile_mode": "default",
                                                           "kernels": "torch"}}}}))
    return path


def test_order_of_value():
    names = [r["name"] for r in gpu_cells.ordered_rows("table5", "paper")]
    assert names == ["no pre-training", "W_s 2,000", "W_s 5,000", "W_s 40,000", "W_s 90,000"]
    t9 = gpu_cells.ordered_rows("table9", "paper")
    assert t9[-1]["kind"] == "committee" or t9[-2]["kind"] == "committee"
    assert [r["kind"] for r in gpu_cells.ordered_rows("table8", "paper")][-2:] == ["committee", "committee"]


def test_estimates_scale_with_sequences_and_flops(tmp_path):
    from tinytlm.model import BertConfig
    rates = gpu_cells.Rates(json.loads(throughput(tmp_path / "t.json", 100.0).read_text()))
    tiny = BertConfig.preset("tiny")
    # 1,000 trained at 100/s + 300 scored at 300/s + one run's overhead + the compiles (train and scoring
    # graphs: 2 x (first step 1 s + warm-up 2 s)), paid once per model, path and kind
    assert rates.seconds(tiny, "finetune", 1000, 300) == pytest.approx(10 + 1 + gpu_cells.OVERHEAD_S + 6)
    assert rates.seconds(tiny, "pretrain", 1000, 0) == pytest.approx(10 + gpu_cells.OVERHEAD_S + 3)
    rates.paid(tiny, "finetune")
    assert rates.seconds(tiny, "finetune", 1000, 300) == pytest.approx(10 + 1 + gpu_cells.OVERHEAD_S)
    assert rates.seconds(tiny, "pretrain", 1000, 0) == pytest.approx(10 + gpu_cells.OVERHEAD_S + 3)
    # a 4x wider model is slower in proportion to its FLOPs (no measurement of its own)
    wide = BertConfig.preset("tiny", n_head=8)
    assert rates.seconds(wide, "pretrain", 1000, 0) - gpu_cells.OVERHEAD_S - 3 > \
        4 * (rates.seconds(tiny, "pretrain", 1000, 0) - gpu_cells.OVERHEAD_S - 3)


def test_scheduler_skips_what_would_not_finish_and_what_is_recorded(shared, tmp_path):
    base = ["--scale", "mini", "--tables", "table5", "--seeds", "1", "--device", "cpu",
            "--results", str(tmp_path / "r"), "--cache", str(tmp_path / "c")]
    # far too slow a device for the budget: nothing starts
    assert gpu_cells.main(base + ["--throughput", str(throughput(tmp_path / "slow.json", 0.01)),
                                  "--budget", "30"]) == 0
    log = [json.loads(line) for line in (tmp_path / "r" / "schedule.jsonl").read_text().splitlines()]
    assert [u["status"] for u in log] == ["skipped: would not finish"] * 2 and not (tmp_path / "c").exists()
    # a fast one: both cells run, are recorded, and the report is rebuilt; a second pass finds them recorded
    (tmp_path / "r" / "schedule.jsonl").unlink()
    fast = ["--throughput", str(throughput(tmp_path / "fast.json", 1e4)), "--budget", "300"]
    assert gpu_cells.main(base + fast) == 0
    assert len(list((tmp_path / "r" / "cells" / "mini").glob("*.json"))) == 2
    assert "2 of 4 cells" in (tmp_path / "r" / "mini" / "table5.md").read_text()
    assert gpu_cells.main(base + fast) == 0
    log = [json.loads(line) for line in (tmp_path / "r" / "schedule.jsonl").read_text().splitlines()]
    assert [u["status"] for u in log] == ["done", "done", "recorded", "recorded"]


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def python3_only_path(tmp_path) -> str:
    """A PATH with `python3` (this interpreter) and the system tools, and no `python`: the GPU image's venv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").symlink_to(sys.executable)
    path = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    assert shutil.which("python", path=path) is None and shutil.which("python3", path=path)
    return path


def test_smoke_session_end_to_end_and_import(shared, tmp_path):
    """SMOKE=1 bash bench/gpu_session.sh: prep, then the one-command flow on the CPU (AOT compile check, interpreter
    kernels, tiny models, mini cells) with only `python3` on the PATH, packs one tarball that gpu_import files;
    importing it twice changes nothing."""
    env = {**os.environ, "SMOKE": "1", "TINYTLM_DATA": str(tmp_path / "data"), "WORK": str(tmp_path / "work"),
           "OUT": str(tmp_path / "out"), "GPU_SECONDS": "300", "SEEDS": "1", "PATH": python3_only_path(tmp_path)}
    env.pop("TRITON_INTERPRET", None)  # the session sets it where it wants it (the kernel checks), not the AOT check
    (tmp_path / "out").mkdir()
    prep = subprocess.run(["bash", "bench/gpu_session.sh", "prep"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert prep.returncode == 0, prep.stdout[-2000:] + prep.stderr[-2000:]
    run = subprocess.run(["bash", "bench/gpu_session.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=420)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert run.stdout.startswith("preflight ok: python"), run.stdout[:500]
    tgz = tmp_path / "out" / "gpu_session.tgz"
    assert tgz.is_file() and tgz.stat().st_size < 16 * 2 ** 20
    with tarfile.open(tgz) as tf:
        names = set(tf.getnames())
    for f in ("session.json", "stages.jsonl", "bench/probe.json", "kernels.log", "kernels.json", "aot.json",
              "bench/throughput.json", "bench/members.json", "bench/members.md", "results/schedule.jsonl"):
        assert "./" + f in names, (f, sorted(names))
    assert not any(n.endswith(".pt") for n in names) and not any("/cache/" in n for n in names)
    stages = [json.loads(line) for line in (tmp_path / "work" / "stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == ["probe", "kernels", "bench", "members", "cells"], run.stdout[-3000:]
    assert all(s["status"] == "ok" for s in stages), stages
    kernels = json.loads((tmp_path / "work" / "kernels.json").read_text())
    verdicts = {p: r["verdict"] for p, r in kernels["paths"].items()}
    assert verdicts == {"attention": "ok", "varlen": "ok", "conv": "ok", "graphs": "not run"}, kernels
    assert kernels["aot"]["rc"] == 0 and kernels["aot"]["summary"]["specialisations"] >= 1
    assert "attention true, varlen/unpad true, CUDA graphs false, conv stem true" in run.stdout
    records = [n for n in names if n.startswith("./results/cells/mini/")]
    assert records, run.stdout[-3000:]

    repo = tmp_path / "repo"
    first = gpu_import.main([str(tgz), "--repo", str(repo)])
    assert sum(map(len, first["new"].values())) == len(records) and first["tables"]
    assert (repo / "results" / "mini" / f"{first['tables'][0]}.md").is_file()
    session = list((repo / "bench" / "results").glob("*-gpu-session.md"))
    assert len(session) == 1 and "| cells | ok |" in session[0].read_text()
    assert "| attention | ok |" in session[0].read_text() and "AOT compile check" in session[0].read_text()
    assert "| members | ok |" in session[0].read_text() and "## Stacked members" in session[0].read_text()
    members = list((repo / "bench" / "results").glob("*-members.md"))
    assert len(members) == 1 and "| tiny | 2 |" in members[0].read_text()
    before = tree_digest(repo)
    again = gpu_import.main([str(tgz), "--repo", str(repo)])
    assert again["new"] == {} and tree_digest(repo) == before


@pytest.mark.parametrize("broken", ["no torch", "no python3"])
def test_the_session_ends_in_seconds_with_one_line_when_python_cannot_run_it(tmp_path, broken):
    """A missing torch (a package that fails to import, first on PYTHONPATH) or a missing interpreter ends the
    command before any stage: exit 2, one line on stderr naming it, nothing else, in seconds."""
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no torch in this image')\n")
    (tmp_path / "data").mkdir()
    env = {**os.environ, "PATH": python3_only_path(tmp_path), "TINYTLM_DATA": str(tmp_path / "data"),
           "WORK": str(tmp_path / "work"), "PYTHONPATH": str(tmp_path / "site")}
    if broken == "no python3":
        env["PY"] = "python3.missing"
    t0 = time.monotonic()
    r = subprocess.run(["bash", "bench/gpu_session.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=60)
    assert time.monotonic() - t0 < 30 and r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, (r.stdout, r.stderr)
    assert ("torch" if broken == "no torch" else "python3.missing not found") in r.stderr
    assert not (tmp_path / "work").exists()


def test_kernel_verdicts_and_the_switches_they_give(tmp_path):
    """A path is ok only when every check passed, failed when one failed, partial when the time limit stopped
    the rest, not run when none ran; only ok and partial switch a path on, and an unreadable report none."""
    def res(*statuses):
        return [{"status": s} for s in statuses]
    assert gpu_kernels.verdict(res("passed", "passed"), 2) == "ok"
    assert gpu_kernels.verdict(res("passed", "failed"), 3) == "failed"
    assert gpu_kernels.verdict(res("passed", "not run"), 2) == "partial"
    assert gpu_kernels.verdict(res("not run", "not run"), 2) == "not run"
    assert gpu_kernels.verdict(res(), 4) == "not run"
    report = tmp_path / "kernels.json"
    verdicts = {"attention": "ok", "varlen": "partial", "conv": "failed", "graphs": "not run"}
    report.write_text(json.dumps({"paths": {p: {"verdict": v} for p, v in verdicts.items()}}))
    assert gpu_kernels.flags(str(report)) == "true true false false"  # attention varlen graphs conv
    verdicts.update(graphs="ok", conv="ok", attention="failed")
    report.write_text(json.dumps({"paths": {p: {"verdict": v} for p, v in verdicts.items()}}))
    assert gpu_kernels.flags(str(report)) == "false true true true"
    assert gpu_kernels.flags(str(tmp_path / "missing.json")) == "false false false false"
