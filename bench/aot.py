"""Ahead-of-time compile check: every Triton kernel specialisation the project's launchers produce at its real
shapes, compiled for sm_90 (H100/H200) and sm_80 (A100) on a CPU, with no GPU.

    PYTHONPATH=. python bench/aot.py                                   # the sample (CI's default run)
    PYTHONPATH=. python bench/aot.py --matrix full --json aot.json     # every case (tests/test_aot.py -m slow)
    python -m pip install --no-deps --target cache/triton-3.6.0 triton==3.6.0   # the GPU image's triton, once
    PYTHONPATH=cache/triton-3.6.0:. python bench/aot.py --matrix full  # the same check under it

The cases are bench/kernel_cases.py's (the launches bench/gpu_kernels.py checks numerically on a GPU). Each runs
through the public kernel API (custom ops and their autograd) on CPU tensors with bench/aot_driver.py as
Triton's driver: every launch specialises and compiles exactly as on the GPU, down to a cubin from the
wheel's ptxas; nothing is computed. Workers (--jobs processes, TRITON_INTERPRET unset) share one Triton cache
(--cache; default cache/aot/triton-<version>-py<version>/, so a second run only re-checks), and the report
gives per kernel registers, stack, spills, shared memory, compile seconds (cold, kept in the cache's
compile_times.json), and the launches' grids.

It fails (exit 1, one line per failure) on: a compile or ptxas error, shared memory past the device's opt-in
limit (Triton refuses the launch), a grid past CUDA's limits (x < 2^31, y and z <= 65,535), any spill store
in a bf16 kernel, more than STACK_LIMIT bytes of stack in an fp32 kernel, or a kernel without ptxas numbers.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STACK_LIMIT = 1024  # bytes of stack frame an fp32 kernel may have (spills of a large fp32 tile set)
ARCHS = (90, 80)


# ----------------------------------------------------------------------------- worker (one process)

def worker(arch_cases: list, out: str) -> None:
    """Run (arch, case name) pairs under the AOT driver; write what was compiled and launched to `out`."""
    from bench import aot_driver
    from bench.kernel_cases import full_matrix, make, run, sample, smoke_aot
    cases = {c.name: c for c in full_matrix() + [c for _, c in sample()] + smoke_aot()}
    errors, by_arch = [], {}
    for arch, name in arch_cases:
        by_arch.setdefault(arch, []).append(name)
    for arch, names in by_arch.items():
        with aot_driver.install(arch) as record:
            for name in names:
                record.case = f"sm_{arch} {name}"
                try:
                    run(cases[name], make(cases[name], "cpu", fill=False))
                except Exception as e:  # one broken case must not hide the others
                    last = traceback.format_exception_only(type(e), e)[-1].strip()
                    errors.append({"case": record.case, "error": " ".join(last.split())[:400]})
    rec = aot_driver.RECORD
    Path(out).write_text(json.dumps({"kernels": rec.kernels, "launches": rec.launches, "errors": errors}))


# ----------------------------------------------------------------------------- orchestration

def default_cache() -> Path:
    import triton
    v = sys.version_info
    return REPO / "cache" / "aot" / f"triton-{triton.__version__}-py{v.major}.{v.minor}"


def split(arch_cases: list, jobs: int) -> list:
    """Work for `jobs` processes: whole (arch, family, dtype) groups, which share their kernels, so no two
    processes compile the same specialisation; the largest groups first, each to the least-loaded process."""
    groups = {}
    for arch, case in arch_cases:
        groups.setdefault((arch, case.family, case.dtype), []).append((arch, case.name))
    bins = [[] for _ in range(max(1, jobs))]
    for g in sorted(groups.values(), key=len, reverse=True):
        min(bins, key=len).extend(g)
    return [b for b in bins if b]


def run_workers(bins: list, cache: Path, tmp: Path) -> list:
    """One subprocess per bin, all at once; returns their records. TRITON_INTERPRET is unset in them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(REPO)]))
    procs = []
    for i, b in enumerate(bins):
        spec, out = tmp / f"work{i}.json", tmp / f"out{i}.json"
        spec.write_text(json.dumps(b))
        procs.append((subprocess.Popen([sys.executable, "-m", "bench.aot", "--worker", str(spec), "--json", str(out)],
                                       cwd=REPO, env=env), out))
    records = []
    for p, out in procs:
        if p.wait() != 0 or not out.is_file():
            raise RuntimeError(f"AOT worker exited with {p.returncode} (its output is above)")
        records.append(json.loads(out.read_text()))
    return records


def merge(records: list, cache: Path) -> dict:
    """One report from the workers' records; cold compile seconds kept per kernel hash in the cache."""
    times_file = cache / "compile_times.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    kernels, launches, errors = {}, [], []
    for r in records:
        launches += r["launches"]
        errors += r["errors"]
        for h, k in r["kernels"].items():
            if not k["cache_hit"]:
                times[h] = k["compile_s"]
            kernels[h] = {**k, "cold_compile_s": times.get(h)}
    cache.mkdir(parents=True, exist_ok=True)
    times_file.write_text(json.dumps(times, indent=1, sort_keys=True))
    return {"kernels": kernels, "launches": launches, "errors": errors}


def dtype_of(kernel: dict) -> str:
    """The case dtype a kernel was compiled for (its first case's name: family-model-dtype-...)."""
    return "bf16" if "-bf16-" in kernel["case"] else "fp32"


def failures(report: dict) -> list:
    """Every reason to fail, one line each."""
    out = [f"{e['case']}: {e['error']}" for e in report["errors"]]
    out += [f"{l['case']}: {l['kernel']} grid {tuple(l['grid'])}: {l['error']}" for l in report["launches"]
            if l["error"]]
    for k in report["kernels"].values():
        what = f"sm_{k['arch']} {k['kernel']} ({k['case']})"
        if k["registers"] is None or k["spill_stores"] is None:
            out.append(f"{what}: no ptxas numbers (the cache predates bench/aot_driver.py: use --fresh)")
        elif dtype_of(k) == "bf16" and k["spill_stores"] > 0:
            out.append(f"{what}: {k['spill_stores']} bytes of spill stores in a bf16 kernel ({k['stack']} B stack)")
        elif dtype_of(k) == "fp32" and k["stack"] > STACK_LIMIT:
            out.append(f"{what}: {k['stack']} bytes of stack in an fp32 kernel (limit {STACK_LIMIT})")
    return out


def summary(report: dict) -> dict:
    """Counts and per-kernel extremes: what the issue and the GPU session's budget need."""
    from bench.aot_driver import SHARED_LIMIT
    ks = list(report["kernels"].values())
    per = {}
    for k in ks:
        key = f"sm_{k['arch']} {k['kernel']} {dtype_of(k)}"
        p = per.setdefault(key, {"specialisations": 0, "registers": 0, "stack": 0, "spill_stores": 0, "shared": 0,
                                 "cold_compile_s": 0.0})
        p["specialisations"] += 1
        for f in ("registers", "stack", "spill_stores", "shared"):
            p[f] = max(p[f], k[f] or 0)
        p["cold_compile_s"] = round(p["cold_compile_s"] + (k["cold_compile_s"] or 0), 1)
    archs = sorted({k["arch"] for k in ks})
    return {"specialisations": len(ks), "by_arch": {f"sm_{a}": sum(k["arch"] == a for k in ks) for a in archs},
            "cache_hits": sum(bool(k["cache_hit"]) for k in ks),
            "launches": len(report["launches"]),
            "max_shared": {f"sm_{a}": max([k["shared"] for k in ks if k["arch"] == a], default=0) for a in archs},
            "shared_limit": {f"sm_{a}": SHARED_LIMIT[a] for a in archs},
            "cold_compile_s": {f"sm_{a}": round(sum(k["cold_compile_s"] or 0 for k in ks if k["arch"] == a), 1)
                               for a in archs},
            "per_kernel": dict(sorted(per.items()))}


def print_report(s: dict, fails: list, versions: str, seconds: float) -> None:
    print(f"AOT compile check ({versions}): {s['specialisations']} specialisations "
          f"({', '.join(f'{a}: {n}' for a, n in s['by_arch'].items())}; {s['cache_hits']} from the cache), "
          f"{s['launches']} launches, {len(fails)} failures, {seconds:.0f} s")
    print("largest shared memory: " + ", ".join(f"{a} {n:,} B (limit {s['shared_limit'][a]:,} B)"
                                                for a, n in s["max_shared"].items()))
    print("cold compile seconds on this machine, serial: " + ", ".join(f"{a} {n}" for a, n in
                                                                       s["cold_compile_s"].items()))
    print(f"{'kernel':<48} {'n':>3} {'regs':>5} {'stack':>6} {'spill st':>8} {'shared':>7} {'compile s':>9}")
    for name, p in s["per_kernel"].items():
        print(f"{name:<48} {p['specialisations']:>3} {p['registers']:>5} {p['stack']:>6} {p['spill_stores']:>8} "
              f"{p['shared']:>7} {p['cold_compile_s']:>9}")
    for f in fails:
        print("FAIL " + f)


def strip(cache: Path) -> int:
    """Keep only what a launch loads from a Triton cache (the cubin, its metadata and the group files that list
    them): the IRs (source, ttir, ttgir, llir, ptx) are 4/5 of its bytes. Triton's cache skips a group's missing
    files, so a stripped cache still hits. Returns the bytes left."""
    for f in cache.rglob("*"):
        if f.is_file() and f.suffix in (".source", ".ttir", ".ttgir", ".llir", ".ptx"):
            f.unlink()
    return sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrix", choices=("smoke", "sample", "full"), default="sample",
                    help="which cases: sample (CI's default run), full (every case), smoke (one kernel: SMOKE=1)")
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 90,80")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--cache", type=Path, default=None, help="Triton cache (default cache/aot/triton-V-pyV/)")
    ap.add_argument("--fresh", action="store_true", help="a new empty cache: every kernel compiles cold")
    ap.add_argument("--json", default="", help="write the report (summary, kernels, launches, failures) here")
    ap.add_argument("--only", default="", help="only the cases whose name has one of these comma-separated parts")
    ap.add_argument("--strip", action="store_true", help="then keep only the cubins and metadata in --cache")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()), args.json)
        return 0
    import triton
    import torch
    from bench.kernel_cases import full_matrix, sample, smoke_aot
    archs = [int(a) for a in args.arch.split(",")]
    if args.matrix == "sample":  # its own (arch, case) pairs, of the archs asked for
        pairs = [(a, c) for a, c in sample() if a in archs]
    else:
        pairs = [(a, c) for a in archs for c in (full_matrix() if args.matrix == "full" else smoke_aot())]
    if args.only:
        pairs = [(a, c) for a, c in pairs if any(part in c.name for part in args.only.split(","))]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "triton" if args.fresh else (args.cache or default_cache())
        bins = split(pairs, args.jobs)
        report = merge(run_workers(bins, cache, Path(tmp)), cache)
        if args.strip:
            print(f"stripped {cache} to {strip(cache) / 2 ** 20:.1f} MiB (cubins and metadata)")
    fails = failures(report)
    s = summary(report)
    versions = f"triton {triton.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}"
    print_report(s, fails, versions, time.perf_counter() - t0)
    if args.json:
        Path(args.json).write_text(json.dumps({"versions": versions, "matrix": args.matrix, "cases": len(pairs),
                                               "summary": s, "failures": fails, **report}, indent=1))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
