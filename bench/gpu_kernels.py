"""The GPU session's kernel stage: what compiling cannot check, at the project's shapes, with one verdict per path.

    PYTHONPATH=. python bench/gpu_kernels.py --json OUT/kernels.json --time_limit 100   # on a GPU
    PYTHONPATH=. TRITON_INTERPRET=1 python bench/gpu_kernels.py --smoke --json k.json   # the flow on a CPU

bench/aot.py already compiled every launch of bench/kernel_cases.py for the GPU (the session runs it first, into
the Triton cache this script then loads from), so here every case only runs. Paths and their checks:
  attention  every attention case of kernel_cases.full_matrix() (bf16 and fp32, mask or none, dropout 0.1 or none,
             8 / 12 / 24 heads, K = 1, 5, 22 members, batch 32 and 256): forward and the gradient of the qkv
             projection against attention_ref (fp32, the kernels' exact dropout mask), max error within REL_TOL x
             max |reference| (floored at 0.1); and the dropout statistics: the kept fraction of dropout_mask at
             B 32, 12 heads, T 128 (6.3 M draws) within 5 sigma of 0.9, another seed another mask
  varlen     every varlen case against attention_varlen_ref; the packed kernel equal to the padded kernel on the
             same texts, dropout included (its draws are the padded kernel's); and tests/test_unpad.py's Triton
             cases (the model, --unpad vs padded), run by pytest and read from its junit XML
  conv       every conv_train and conv_infer case against F.conv2d / conv_stem_infer_ref
  graphs     CUDA graph capture and replay (attention and varlen, forward + backward, dropout seed drawn inside the
             graph): two replays draw two seeds and two masks, each replay equal bit for bit to the eager kernels
             with the seed it drew (CUDA only: "not run" elsewhere)
Checks run round-robin over the paths (each path's most used case first), each alone: an exception or a
tolerance miss fails that check only. --time_limit S: no check starts after S seconds. A path's verdict: "ok"
(every check passed), "failed" (one failed: the session rules that path out), "partial" (the checks that ran
passed, the time limit stopped the rest), "not run" (none ran): never "ok" for what did not run.
--json: {"device", "versions", "smoke", "complete", "seconds", "paths": {path: {"verdict", "passed", "failed",
"not_run", "checks": [{"name", "status", "seconds", "error", "max_err", "tol"}]}}}, rewritten after every check.
"""
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from bench.common import device_label, versions
from bench.kernel_cases import ATTN_DROPOUT, Case, T, full_matrix, make, reference, run, smoke
from tinytlm.common import ArgParser, UserError, cli, read_json, write_json

REPO = Path(__file__).resolve().parents[1]
REL_TOL = {"fp32": 1e-4, "bf16": 3e-2}  # as tests/test_kernels.py: max |err| / max |reference|
PATHS = ("attention", "varlen", "conv", "graphs")
FAMILY_PATH = {"attention": "attention", "dropout_mask": "attention", "varlen": "varlen", "conv_train": "conv",
               "conv_infer": "conv"}


class Failed(AssertionError):
    """A check's numbers are wrong (as opposed to an exception in the code that ran it)."""


def compare(got: dict, ref: dict, dtype: str) -> tuple:
    """(max error, tolerance) over the outputs both dicts have; raises Failed on a miss or a non-finite value."""
    worst, tol = 0.0, 0.0
    for key, r in ref.items():
        g, r = got[key].float(), r.float()
        if not torch.isfinite(g).all():
            raise Failed(f"{key}: non-finite values")
        err = (g - r).abs().max().item()
        bound = REL_TOL[dtype] * max(r.abs().max().item(), 0.1)
        if err > bound:
            raise Failed(f"{key}: max err {err:.3g} > {bound:.3g}")
        worst, tol = max(worst, err), max(tol, bound)
    return worst, tol


def case_check(case: Case, device):
    """Run one case with random inputs and compare with the references."""
    def check():
        inputs = make(case, device, fill=True)
        got = run(case, inputs)
        if case.family == "dropout_mask":
            return dropout_stats(got["keep"], inputs)
        return compare(got, reference(case, inputs, got), case.dtype)
    return check


def dropout_stats(keep: torch.Tensor, inputs: dict) -> tuple:
    """The kept fraction within 5 sigma of 1 - p; another seed gives another mask."""
    from kernels.attention import dropout_mask
    n, p = keep.numel(), ATTN_DROPOUT
    frac, sigma = keep.float().mean().item(), (p * (1 - p) / n) ** 0.5
    if abs(frac - (1 - p)) > 5 * sigma:
        raise Failed(f"kept fraction {frac:.5f} over {n:,} draws, expected {1 - p} +- {5 * sigma:.5f}")
    other = dropout_mask(keep.shape[0], keep.shape[1], keep.shape[2], 4321, p, keep.device)
    if torch.equal(other, keep):
        raise Failed("two seeds gave one mask")
    return abs(frac - (1 - p)), 5 * sigma


def varlen_vs_padded(device, model: str, batch: int, tokens: int):
    """The packed kernel on the texts of a padded batch equals the padded kernel at the real tokens (forward and
    gradients, bf16, dropout on: sequence s draws what padded row s draws; the same tiles, hence ~bit-equal)."""
    def check():
        from kernels.attention import attention
        from kernels.attention_varlen import attention_varlen
        case = Case("attention", model, "bf16", "train", 1, batch, True, tokens=tokens)
        inputs = make(case, device, fill=True)
        mask, qkv = inputs["mask"], inputs["qkv"].detach().requires_grad_(True)  # (B, T), (B, T, 3, H, D)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        padded = attention(q, k, v, mask, ATTN_DROPOUT, seed=77).transpose(1, 2)[mask]  # (N, H, D) real tokens
        lens = mask.sum(1).to(torch.int32)
        starts = (torch.cumsum(lens, 0) - lens).to(torch.int32)
        packed_qkv = qkv.detach()[mask].requires_grad_(True)  # (N, 3, H, D)
        pq, pk, pv = packed_qkv.unbind(1)
        packed = attention_varlen(pq, pk, pv, starts, lens, tokens, ATTN_DROPOUT, seed=77)
        dout = torch.randn_like(packed)
        g_pad = torch.autograd.grad(padded, qkv, dout)[0][mask]
        g_packed = torch.autograd.grad(packed, packed_qkv, dout)[0]
        return compare({"out": packed, "dqkv": g_packed}, {"out": padded, "dqkv": g_pad}, "fp32")
    return check


def graphs_check(device, family: str, model: str, batch: int, tokens: int):
    """Capture forward + backward with the dropout seed drawn inside the graph; replay twice."""
    def check():
        if device.type != "cuda":
            return "not run: CUDA graphs need CUDA"
        case = Case(family, model, "bf16", "train", 1, batch, True, tokens=tokens)
        inputs = make(case, device, fill=True)

        def step(seed=None):
            seed = torch.randint(0, 2 ** 31 - 1, (1,), device=device, dtype=torch.int64) if seed is None else seed
            got = run(case, {**inputs, "seed": seed})
            return seed, got["out"], got["dqkv"]

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # kernels loaded, autograd warmed up, outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = step()
        replays = []
        for _ in range(2):
            graph.replay()
            torch.cuda.synchronize()
            replays.append([t.clone() for t in static])
        if torch.equal(replays[0][0], replays[1][0]) or torch.equal(replays[0][1], replays[1][1]):
            raise Failed("two replays drew the same seed or the same dropout")
        for seed, out, dqkv in replays:
            _, out_e, dqkv_e = step(seed)
            if not (torch.equal(out, out_e) and torch.equal(dqkv, dqkv_e)):
                raise Failed("a replay differs from the eager kernels with the seed it drew")
        return 0.0, 0.0
    return check


def unpad_tests(out_dir: Path, smoke_run: bool):
    """tests/test_unpad.py's Triton cases (the model unpadded vs padded), by pytest; counts from its junit XML."""
    def check():
        xml = out_dir / "unpad_tests.xml"
        which = "triton and mlm" if smoke_run else "triton"  # under the interpreter: one of the two (~30 s)
        cmd = [sys.executable, "-m", "pytest", "tests/test_unpad.py", "-k", which, "-q", "-p", "no:cacheprovider",
               "-o", "addopts=", f"--junitxml={xml}"]
        env = {k: v for k, v in os.environ.items() if k != "CI"}  # CI=true makes pytest demand ../shared/data,
        subprocess.run(cmd, cwd=REPO, env=env, timeout=300 if smoke_run else 120)  # which these tests never read
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        if counts["failures"] or counts["errors"] or counts["tests"] == counts["skipped"]:
            raise Failed(f"tests/test_unpad.py -k triton: {counts}")
        return 0.0, 0.0
    return check


def checks(device, smoke_run: bool, out_dir: Path) -> list:
    """(path, name, check) in the order they run: round-robin over the paths, each path's most used case first."""
    cases = smoke() if smoke_run else full_matrix()
    per = {p: [] for p in PATHS}
    for c in sorted(cases, key=lambda c: (c.dtype != "bf16", c.phase != "train", not c.dropout, c.members != 1,
                                          c.batch != 32, not c.mask)):
        per[FAMILY_PATH[c.family]].append((c.name, case_check(c, device)))
    shape = ("tiny", 2, 32) if smoke_run else ("bert6", 32, T)
    per["varlen"][1:1] = [("varlen-vs-padded-bf16", varlen_vs_padded(device, *shape)),
                          ("tests/test_unpad.py -k triton", unpad_tests(out_dir, smoke_run))]
    per["graphs"] = [("graphs-attention-bf16", graphs_check(device, "attention", *shape)),
                     ("graphs-varlen-bf16", graphs_check(device, "varlen", *shape))]
    order = []
    for i in range(max(len(v) for v in per.values())):
        order += [(p, *per[p][i]) for p in PATHS if i < len(per[p])]
    return order


def interpreter_problem():
    """Why the Triton interpreter cannot run a kernel loop here, or None. triton 3.6's interpreter (the GPU image's
    triton) turns a loop bound into a Python int with int() of a one-element array, which numpy >= 2.4 refuses
    (triton 3.9 squeezes it first): every kernel of this project would fail under it. Only a CPU run meets this;
    on the GPU the kernels compile natively."""
    import numpy as np
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(X, n):
        for i in range(0, n, 4):  # a loop over a run-time bound, as every kernel here has
            tl.store(X + i, 1.0)
    try:
        _probe[(1,)](torch.zeros(8), 8)
    except Exception as e:
        return (f"triton {triton.__version__}'s interpreter cannot run a kernel loop under numpy {np.__version__} "
                f"({type(e).__name__}: {' '.join(str(e).split())[:80]}); use numpy < 2.4 for a CPU run")
    return None


def verdict(results: list, total: int) -> str:
    """ok / failed / partial / not run, from the results of the checks that ran out of `total`."""
    if any(r["status"] == "failed" for r in results):
        return "failed"
    passed = sum(r["status"] == "passed" for r in results)
    if passed == 0:
        return "not run"
    return "ok" if passed == total else "partial"


FLAG_ORDER = ("attention", "varlen", "graphs", "conv")  # bench/gpu_session.sh: kernels_ok unpad_ok graphs_ok conv_ok


def flags(path: str) -> str:
    """The session's switches from a report, in FLAG_ORDER: each true when that path's verdict is ok or partial
    (every check that ran passed), false when it failed, did not run, or the report is unreadable."""
    try:
        paths = read_json(path, "kernel report")["paths"]
    except (UserError, KeyError, TypeError):
        paths = {}
    return " ".join(str(paths.get(p, {}).get("verdict") in ("ok", "partial")).lower() for p in FLAG_ORDER)


def aot(matrix: str, jobs: int, timeout: float, out: Path) -> dict:
    """bench/aot.py for sm_90 into $TRITON_CACHE_DIR (the cache the checks then load from): the compile check under
    this machine's versions, in parallel; its summary (or why there is none)."""
    cmd = [sys.executable, "bench/aot.py", "--arch", "90", "--matrix", matrix, "--jobs", str(jobs), "--json", str(out)]
    if os.environ.get("TRITON_CACHE_DIR"):
        cmd += ["--cache", os.environ["TRITON_CACHE_DIR"]]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    res = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
    if out.is_file():
        rep = read_json(out, "aot report")
        res.update(summary={k: v for k, v in rep["summary"].items() if k != "per_kernel"}, failures=rep["failures"])
    print(f"aot: exit {rc} after {res['seconds']} s", flush=True)
    return res


def main(argv=None):
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="", help="the report (rewritten after every check)")
    ap.add_argument("--time_limit", type=float, default=-1.0, help="seconds: no check starts after this")
    ap.add_argument("--smoke", action="store_true", help="kernel_cases.smoke(): the flow on a CPU (interpreter)")
    ap.add_argument("--aot", default="", choices=("", "smoke", "sample", "full"),
                    help="first run bench/aot.py --matrix this for sm_90 (aot.json beside --json)")
    ap.add_argument("--aot_jobs", type=int, default=12, help="bench/aot.py's worker processes")
    ap.add_argument("--aot_timeout", type=float, default=90, help="seconds for bench/aot.py")
    ap.add_argument("--flags", default="", help="print the session's switches from this report and stop")
    args = ap.parse_args(argv)
    if args.flags:
        print(flags(args.flags))
        return None
    if not args.json:
        raise UserError("--json FILE is needed (or --flags FILE)")
    t0 = time.perf_counter()
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    device = torch.device("cuda" if torch.cuda.is_available() and not interpreted else "cpu")
    if device.type != "cuda" and not (args.smoke and interpreted):
        raise UserError("bench/gpu_kernels.py needs a GPU (or --smoke with TRITON_INTERPRET=1: the flow on a CPU)")
    problem = interpreter_problem() if interpreted else None
    if problem:
        raise UserError(problem)
    report = {"device": device_label(device), "versions": versions(), "smoke": args.smoke, "complete": False,
              "paths": {p: {"verdict": "not run", "passed": 0, "failed": 0, "not_run": 0, "checks": []}
                        for p in PATHS}}
    if args.aot:
        report["aot"] = aot(args.aot, args.aot_jobs, args.aot_timeout, Path(args.json).with_name("aot.json"))
        write_json(args.json, report)
    with tempfile.TemporaryDirectory() as tmp:
        order = checks(device, args.smoke, Path(tmp))
        totals = {p: sum(1 for q, *_ in order if q == p) for p in PATHS}
        for path, name, check in order:
            rec = report["paths"][path]
            elapsed = time.perf_counter() - t0
            res = {"name": name, "status": "not run", "seconds": 0.0, "error": None, "max_err": None, "tol": None}
            if 0 <= args.time_limit <= elapsed:
                res["error"] = f"time limit ({elapsed:.0f} s >= {args.time_limit:g} s)"
            else:
                res.update(run_check(check))
            rec["checks"].append(res)
            key = {"passed": "passed", "failed": "failed"}.get(res["status"], "not_run")
            rec[key] += 1
            rec["verdict"] = verdict(rec["checks"], totals[path])
            print(f"[{res['status']}] {path}: {name} ({res['seconds']:.1f} s)" +
                  (f": {res['error']}" if res["error"] else ""), flush=True)
            report["seconds"] = round(time.perf_counter() - t0, 1)
            write_json(args.json, report)
    report["complete"] = True
    write_json(args.json, report)
    print("verdicts: " + ", ".join(f"{p} {r['verdict']} ({r['passed']} passed, {r['failed']} failed, "
                                   f"{r['not_run']} not run)" for p, r in report["paths"].items()))
    return report


def run_check(check) -> dict:
    """One check's result: passed (with its max error and tolerance), failed (why) or not run (why)."""
    t0 = time.perf_counter()
    try:
        out = check()
    except Failed as e:
        return {"status": "failed", "error": str(e), "seconds": round(time.perf_counter() - t0, 2)}
    except Exception as e:  # the code broke: the check failed, the others still run
        traceback.print_exc()
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        return {"status": "failed", "error": " ".join(last.split())[:300],
                "seconds": round(time.perf_counter() - t0, 2)}
    if isinstance(out, str):  # a reason it could not run here
        return {"status": "not run", "error": out, "seconds": 0.0}
    err, tol = out
    return {"status": "passed", "max_err": err, "tol": tol, "seconds": round(time.perf_counter() - t0, 2)}


if __name__ == "__main__":
    cli(main)
