"""The ahead-of-time compile check (bench/aot.py, bench/aot_driver.py): every Triton kernel the launchers produce at
the project's shapes compiles for sm_90 and sm_80 on this CPU, with no spill in a bf16 kernel, at most 1 KB of
stack in an fp32 one, shared memory under the opt-in limit and grids inside CUDA's limits.

The check runs in subprocesses with TRITON_INTERPRET unset (this process has the interpreter on: conftest.py).
Its Triton cache is cache/aot/triton-<version>-py<version>/ (ignored by git), so a second run only re-checks;
cold, the default run's sample compiles in about a minute on two cores, the full matrix (-m slow) in ~10.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from bench import aot  # noqa: E402
from bench.aot_driver import GRID_LIMIT, SHARED_LIMIT, parse_ptxas  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_aot(tmp_path, *args, timeout=600):
    out = tmp_path / "aot.json"
    r = subprocess.run([sys.executable, "bench/aot.py", *args, "--json", str(out)], cwd=REPO,
                       env={**ENV, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=timeout)
    assert out.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    return r, json.loads(out.read_text())


def check_report(r, report, archs):
    """What every passing run must show: exit 0, no failure, ptxas numbers for every kernel, shared memory and
    grids inside the limits (the runner's own verdict, checked again from the raw records)."""
    assert r.returncode == 0 and report["failures"] == [], r.stdout[-4000:]
    assert set(report["summary"]["by_arch"]) == {f"sm_{a}" for a in archs}
    for k in report["kernels"].values():
        assert k["registers"] and k["registers"] <= 255 and k["stack"] is not None, k
        assert k["shared"] <= SHARED_LIMIT[k["arch"]], k
        assert k["spill_stores"] == 0 or "-fp32-" in k["case"], k  # bf16: no spill at all
        assert k["stack"] <= aot.STACK_LIMIT, k
    for launch in report["launches"]:
        assert all(g <= lim for g, lim in zip(launch["grid"], GRID_LIMIT)) and launch["error"] is None, launch


def test_sample_compiles_clean_for_sm90_and_sm80(tmp_path):
    r, report = run_aot(tmp_path, "--matrix", "sample")
    check_report(r, report, (90, 80))
    names = {(k["arch"], k["kernel"]) for k in report["kernels"].values()}
    for kernel in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_preprocess_kernel",
                   "_attn_varlen_fwd_kernel", "_attn_varlen_bwd_dkdv_kernel", "_attn_varlen_bwd_dq_kernel",
                   "_conv2d_kernel"):
        assert (90, kernel) in names, kernel
    assert (80, "_attn_bwd_dkdv_kernel") in names
    # a stacked evaluation of 22 members at batch 256 launches: 2 query blocks x 256 * 22 * 12 (batch * heads)
    k22 = [x for x in report["launches"] if "K22-B256" in x["case"] and x["kernel"] == "_attn_fwd_kernel"]
    assert k22 and k22[0]["grid"][0] == 2 * 256 * 22 * 12 > 65535


@pytest.mark.slow  # ~10 minutes of cold compiles on two cores (a second run: the cache, ~2 minutes)
def test_full_matrix_compiles_clean_for_sm90_and_sm80(tmp_path):
    r, report = run_aot(tmp_path, "--matrix", "full", timeout=3600)
    check_report(r, report, (90, 80))
    assert report["summary"]["specialisations"] >= 100 and len(report["launches"]) >= 1000
    print(r.stdout.splitlines()[0])  # the counts, for the record (-s)


def test_the_check_fails_on_what_a_gpu_would_refuse():
    """The verdict from synthetic records: a spill store in bf16, > 1 KB of stack in fp32, a grid past CUDA's
    limits, a compile error, and a kernel without ptxas numbers each fail; the same numbers within the
    limits pass."""
    def kernel(case, **over):
        return {"kernel": "_k", "arch": 90, "case": case, "registers": 128, "stack": 0, "spill_stores": 0,
                "shared": 1024, **over}
    good = {"errors": [], "launches": [{"case": "c", "kernel": "_k", "grid": (1, 65535, 1), "error": None}],
            "kernels": {"a": kernel("sm_90 attention-bert6-bf16-train"), "b": kernel("sm_90 x-fp32-y", stack=1024,
                                                                                      spill_stores=8)}}
    assert aot.failures(good) == []
    bad = {"errors": [{"case": "sm_90 c", "error": "PTXASError: ptxas failed"}],
           "launches": [{"case": "c", "kernel": "_k", "grid": (1, 65536, 1), "error": "grid[1] = 65536 > 65535"}],
           "kernels": {"a": kernel("sm_90 attention-bert6-bf16-train", stack=16, spill_stores=4),
                       "b": kernel("sm_90 x-fp32-y", stack=1032), "c": kernel("sm_90 x-bf16-y", registers=None)}}
    fails = aot.failures(bad)
    assert len(fails) == 5, fails
    assert any("spill stores in a bf16" in f for f in fails) and any("1032 bytes of stack" in f for f in fails)
    assert any("65536 > 65535" in f for f in fails) and any("PTXASError" in f for f in fails)
    assert any("no ptxas numbers" in f for f in fails)


def test_the_driver_flags_a_grid_past_the_limit_and_reads_ptxas(tmp_path):
    """A real launch under the AOT driver (a one-line kernel, subprocess: no interpreter) with grid axis 1 past
    65,535 is recorded as an error, and its ptxas numbers are there; ptxas -v's log parses."""
    script = tmp_path / "planted.py"
    script.write_text(
        "import json, sys, torch, triton, triton.language as tl\n"
        "from bench import aot_driver\n"
        "@triton.jit\n"
        "def _planted(X):\n"
        "    tl.store(X + tl.program_id(1), 1.0)\n"
        "with aot_driver.install(90) as rec:\n"
        "    rec.case = 'planted'\n"
        "    _planted[(1, 70000)](torch.empty(70000))\n"
        "print(json.dumps({'launches': rec.launches, 'kernels': list(rec.kernels.values())}))\n")
    r = subprocess.run([sys.executable, str(script)], cwd=REPO, env={**ENV, "PYTHONPATH": str(REPO),
                       "TRITON_CACHE_DIR": str(tmp_path / "cache")}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["launches"][0]["grid"] == [1, 70000, 1] and "70000 > 65535" in out["launches"][0]["error"]
    assert out["kernels"][0]["registers"] > 0 and out["kernels"][0]["spill_stores"] == 0
    log = ("ptxas info    : Function properties for _k\n    56 bytes stack frame, 56 bytes spill stores, "
           "60 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers, 380 bytes cmem[0]\n")
    assert parse_ptxas(log) == {"stack": 56, "spill_stores": 56, "spill_loads": 60, "registers": 255}


def test_strip_keeps_what_a_launch_loads(tmp_path):
    """--strip leaves the cubins, the metadata and the group files (a stripped cache still hits: measured in
    bench/README.md) and removes the IRs."""
    kept = ["K/_k.cubin", "K/_k.json", "K/__grp___k.json", "compile_times.json"]
    for name in kept + ["K/_k.source", "K/_k.ttir", "K/_k.ttgir", "K/_k.llir", "K/_k.ptx"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x" * 10)
    assert aot.strip(tmp_path) == 10 * len(kept)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)
