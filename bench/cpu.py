"""This CPU's speed ratios in one run (issue 21): what the defaults buy over the code before issue 21 and over
today's fp32 eager, stacked members against one by one, our step against Hugging Face's, and how close it all
comes to the matmul peaks.

    PYTHONPATH=. python bench/cpu.py              # the full run: ~15 minutes on a shared 2-core machine
    PYTHONPATH=. python bench/cpu.py --quick      # shrunk sizes: proves it runs, not speeds (see --quick)

The batches (--rows): real by default, the rows a user trains on: Wikipedia's (MLM, ~65-70% real tokens) and
the demo's AG News sample's (fine-tuning, ~41% real tokens), prepared from --raw into a temporary data root
before any clock starts; --rows synthetic (and --quick): bench/common.py token_batch, every 4th row padded
(~85% real tokens), where unpadding buys less.

Sections (every ratio is measured in this run, on this machine):
  peaks     the bf16 and fp32 matmul rates (GFLOP/s, best of repeats, --matmul_n square; bench/probe.py).
  steps     per model (--models) and kind (MLM pre-training, classification fine-tuning): one optimizer step of
            each variant, every variant in its own worker process (bench/cpu_worker.py, bench/cpu_rounds.py) on
            the same batch (--batch x --seq_len, made here and handed over as a file), timed rounds interleaved
            across the workers (bench/common.py rotations): the default (today's code as train_mlm.py /
            train_cls.py run it by default here, kept freed memory included), bf16 and fp32 (today's code, the
            plain head, eager), and the baseline: the code before issue 21 (--baseline_rev, checked out from git
            into a temporary tree and imported from there: fp32, eager, plain head, unfused AdamW, glibc's
            default malloc). seq/s, achieved GFLOP/s (bench/common.py train_flops) and its share of the peak of
            the variant's precision; speed over the baseline (issue 21's goals: 2.5x tiny MLM, 2x bert1 MLM, 2x
            fine-tuning) and over today's fp32.
  members   K = --members stacked (train_mlm.py --seeds 0..K-1) vs K single runs (--seed k) of the same work:
            the real commands as subprocesses, start-up included as a user pays it, on prepared data (prepared
            before the clock starts, in a temporary data root); `tiny`, --member_ws rows, one epoch.
  hf        our MLM step vs transformers' BertForMaskedLM (bench/train_stacks.py hf_stack: dense head over every
            position), fp32 and bf16 autocast, on the same batch, interleaved.
  compile   torch.compile (inductor's CPU code) at the demo's size (tinytlm/demo.py: `tiny`, batch 32, 375 MLM
            steps, 3 x 375 fine-tuning steps): each (kind, precision) in a fresh process with an empty inductor
            cache (a cold compile, as a first run pays it): compile s (the compiled step's first three calls over
            three steady steps), then eager and compiled steps in interleaved rounds; the steps after which
            compiling pays, and whether it pays in the demo's runs.
            tinytlm/train.py's AUTO_COMPILE (--compile auto) is set from this section.

Results: --json and the markdown report (--out; default bench/results/<date>-cpu-cpu.{md,json}; --quick writes
none unless asked) with the command, CPU model and flags (/proc/cpuinfo), git revision, and the machine's load
(os.getloadavg) before and after: a shared machine's numbers move, its ratios less so.
"""
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.common import REPO, interleaved_times, result_path, run_header, utc_now, versions, write_report
from bench.cpu_report import cpu_facts, markdown
from bench.cpu_rounds import interleaved_rounds, resolve_commit, revision_tree, workers
from bench.cpu_steps import BASELINE, batch, flops, real_batch, step_fn, variant_name
from bench.probe import matmul_rate
from tinytlm.common import ArgParser, UserError, cli, default_raw_root, git_revision, write_json
from tinytlm.model import BertConfig
from tinytlm.train import add_dataclass_args, dataclass_from_args

CPU = torch.device("cpu")
DEMO = {"model": "tiny", "batch": 32, "mlm_steps": 375, "finetune_steps": 3 * 375}  # tinytlm/demo.py's defaults
QUICK_ARCH = "n_layer=1,n_head=2,head_dim=32"  # --quick: one small block
# the steps section's variants, each in a worker process of its own (bench/cpu_worker.py): fields over what a run
# does by default here (cpu_worker.py today_step: its precision, compile and Impl), or "pre-issue": --baseline_rev
VARIANTS = {"default": {}, "bf16": {"precision": "bf16", "head": "plain", "compile": "off"},
            "fp32": {"precision": "fp32", "head": "plain", "compile": "off"}, "baseline": "pre-issue"}
GOALS = {("tiny", "mlm"): 2.5, ("bert1", "mlm"): 2.0, ("tiny", "cls"): 2.0, ("bert1", "cls"): 2.0}  # issue 21


@dataclass
class CpuConfig:
    models: str = "tiny,bert1"  # BertConfig presets of the steps section, comma-separated
    batch: int = 32  # sequences per step
    seq_len: int = 128  # T, tokens per sequence
    rounds: int = 0  # interleaved timed rounds per comparison (medians); 0 = auto: 7, --quick 2
    matmul_n: int = 2048  # the peaks' square matmul size
    members: int = 5  # K of the members section
    member_ws: int = 640  # members section: Wikipedia rows each run pre-trains on (one epoch of batch --batch)
    sections: str = "peaks,steps,members,hf,compile"  # which to run, comma-separated
    quick: bool = False  # shrunk sizes: proves the code runs, numbers mean nothing (steps: 8 worker processes)
    seed: int = 0  # batches and weights
    baseline_rev: str = "0cb7440"  # steps section: git revision of the baseline, the last commit before issue 21
    rows: str = "real"  # real: Wikipedia rows (MLM) and AG News rows (fine-tuning, the demo's sample), prepared
    # from --raw under --data; synthetic: bench/common.py token_batch (every 4th row padded; --quick always)
    data: str = ""  # real rows: prepared data root (default: a temporary one, prepared before the clock starts)
    raw: str = ""  # members section: raw data root (default $TINYTLM_RAW, else ../shared/data, else data/raw)
    out: str = ""  # markdown report; default bench/results/<date>-cpu-cpu.md (none with --quick)
    json: str = ""  # machine-readable results; default beside the report
    compile_case: str = ""  # internal: KIND,PRECISION,MODEL -- one compile case in this process


def parse(argv=None) -> CpuConfig:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_dataclass_args(ap, CpuConfig)
    c = dataclass_from_args(CpuConfig, ap.parse_args(argv))
    if c.rows not in ("real", "synthetic"):
        raise UserError(f"--rows {c.rows!r}: choose real or synthetic")
    if c.quick:
        c.models, c.batch, c.seq_len, c.matmul_n, c.members, c.member_ws = "tiny", 8, 32, 256, 2, 16
        c.rows = "synthetic"
    if c.rows == "real" and c.seq_len != 128:
        raise UserError(f"--seq_len {c.seq_len}: real rows are 128 tokens long (or --rows synthetic)")
    c.rounds = c.rounds or (2 if c.quick else 7)
    if "steps" in c.sections.split(","):
        resolve_commit(c.baseline_rev)  # a revision git does not know: one line, exit 2, before anything runs
    return c


def arch(c: CpuConfig) -> dict:
    """BertConfig fields over the presets (--quick: one small block)."""
    from tinytlm.config import arch_overrides
    return arch_overrides(QUICK_ARCH) if c.quick else {}


def model_cfg(name: str, c: CpuConfig) -> BertConfig:
    return BertConfig.preset(name, **arch(c))


def case_batch(kind: str, cfg: BertConfig, c: CpuConfig) -> dict:
    """The one batch every variant of a case runs on: real rows (--rows real, from --data) or synthetic ones."""
    if c.rows == "synthetic":
        return batch(kind, cfg, c.batch, c.seq_len, c.seed)
    return real_batch(kind, cfg, c.batch, c.seed, raw_root(c), Path(c.data))


def raw_root(c: CpuConfig) -> Path:
    return (Path(c.raw) if c.raw else default_raw_root()).resolve()


@contextlib.contextmanager
def real_rows(c: CpuConfig):
    """--rows real without --data: a temporary data root, both kinds' rows prepared in it before any timing."""
    if c.rows != "real" or c.data:
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        c.data = str(Path(tmp) / "data")
        for kind in ("mlm", "cls"):
            case_batch(kind, BertConfig.preset("tiny"), c)
        yield


# -----------------------------------------------------------------------------
# sections

def peaks(c: CpuConfig) -> dict:
    """GFLOP/s of the n x n matmul in bf16 and fp32 (best of repeats)."""
    iters = 3 if c.quick else 10
    return {p: matmul_rate(CPU, c.matmul_n, dt, 2, iters, 5)["tflops"] * 1e3
            for p, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32))}


def best_ms(fns: dict, c: CpuConfig) -> tuple:
    """({name: fastest round's ms}, {name: median ms}) over c.rounds interleaved rounds. Ratios are read from the
    fastest rounds: on a shared machine a load that comes and goes slows some rounds of every path, and the
    fastest round of each is the one least slowed; the medians are recorded beside them."""
    times = interleaved_times(fns, c.rounds, CPU)
    return {k: min(v) for k, v in times.items()}, {k: statistics.median(v) for k, v in times.items()}


def timed_workers(kind: str, model: str, b: dict, c: CpuConfig, pk: dict, base: Path, tmp: str) -> dict:
    """{name: {variant, ms, ms_median, seq_per_s, gflops, of_peak, tinytlm, keeps_freed_memory, threads}}: each
    of VARIANTS in its own worker process (today's from this checkout, the baseline from the tree `base`), on
    the batch b (the caller's), handed over as a file, rounds interleaved (ms: the fastest round's, which seq/s and
    GFLOP/s are read from)."""
    cfg = model_cfg(model, c)
    path = Path(tmp) / f"batch-{model}-{kind}.pt"
    torch.save(b, path)
    spec = {"kind": kind, "model": model, "overrides": arch(c), "batch": str(path)}
    specs = {name: ({**spec, "variant": v}, base if v == "pre-issue" else REPO) for name, v in VARIANTS.items()}
    with workers(specs) as ws:
        facts = {name: w.facts for name, w in ws.items()}
        times = interleaved_rounds(ws, c.rounds)
    out = {}
    for name, f in facts.items():
        v, ms = f["variant"], min(times[name])
        gflops = flops(kind, cfg, b) / (ms / 1e3) / 1e9
        out[name] = {"variant": v, "ms": ms, "ms_median": statistics.median(times[name]),
                     "seq_per_s": c.batch / (ms / 1e3), "gflops": gflops, "of_peak": gflops / pk[v["precision"]],
                     **{k: f[k] for k in ("tinytlm", "keeps_freed_memory", "threads")}}
    return out


def full_name(v: dict) -> str:
    """variant_name and the Impl fields a today's worker ran that are not the references' ("unpad=True")."""
    return variant_name(v) + "".join(f" {k}={x}" for k, x in v.get("impl", {}).items())


def steps(c: CpuConfig, pk: dict) -> dict:
    """Per model and kind: every variant in its own process; speed over the baseline (the code of --baseline_rev,
    issue 21's goals) and over today's fp32 eager plain head."""
    out = {"baseline_rev": c.baseline_rev, "cases": []}
    with revision_tree(c.baseline_rev) as (base, commit), tempfile.TemporaryDirectory() as tmp:
        out["baseline_commit"] = commit
        for model in c.models.split(","):
            for kind in ("mlm", "cls"):
                b = case_batch(kind, model_cfg(model, c), c)  # the one batch every variant steps on
                t = timed_workers(kind, model, b, c, pk, base, tmp)
                real = float(b["am"].float().mean())  # real tokens / slots
                goal, x = GOALS.get((model, kind)), {k: t["baseline"]["ms"] / v["ms"] for k, v in t.items()}
                out["cases"].append({"model": model, "kind": kind, "rows": c.rows, "real_tokens": real,
                                     "timings": t, "x_pre_issue": x,
                                     "x_fp32": {k: t["fp32"]["ms"] / v["ms"] for k, v in t.items()},
                                     "goal": goal, "goal_met": None if goal is None else x["default"] >= goal})
                print(f"steps {model} {kind}: " + ", ".join(f"{k} {v['ms']:.0f} ms" for k, v in t.items()) +
                      f"; default {x['default']:.2f}x pre-issue", flush=True)
    out["variants"] = {k: {**t["variant"], "name": full_name(t["variant"])}
                       for k, t in out["cases"][0]["timings"].items()}
    return out


def hf(c: CpuConfig, pk: dict) -> dict:
    """Our MLM step vs BertForMaskedLM, fp32 and bf16 autocast, one batch, interleaved."""
    from types import SimpleNamespace

    from bench.train_stacks import hf_stack
    out = []
    for model in c.models.split(","):
        cfg = model_cfg(model, c)
        b = case_batch("mlm", cfg, c)
        fns = {}
        for p in ("fp32", "bf16"):
            fns[f"ours {p}"] = step_fn("mlm", cfg, {**BASELINE, "precision": p}, b)
            fns[f"hf {p}"] = hf_stack(cfg, [(b["x"], b["am"].long(), b["y"])], SimpleNamespace(lr=5.5e-5), CPU,
                                      None, precision=p)[0]
        fns = {k: (lambda f=f: f(0)) if k.startswith("hf") else f for k, f in fns.items()}
        for f in fns.values():
            f(), f()
        ms, median = best_ms(fns, c)
        out.append({"model": model, "ms": ms, "ms_median": median,
                    "seq_per_s": {k: c.batch / (v / 1e3) for k, v in ms.items()},
                    "ours_over_hf": {p: ms[f"hf {p}"] / ms[f"ours {p}"] for p in ("fp32", "bf16")}})
        print(f"hf {model}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in ms.items()), flush=True)
    return {"cases": out}


def members(c: CpuConfig) -> dict:
    """K stacked vs K single train_mlm.py runs, wall time of the commands (start-up included)."""
    from tinytlm.wikipedia import ensure_wiki
    with tempfile.TemporaryDirectory() as tmp:
        data, raw = Path(tmp) / "data", raw_root(c)
        ensure_wiki(c.member_ws, raw, data, quiet=True)  # prepared before the clock starts
        base = [sys.executable, str(REPO / "train_mlm.py"), "--model", "tiny", "--ws", str(c.member_ws),
                "--epochs", "1", "--batch_size", str(c.batch), "--lr", "5e-4", "--data", str(data), "--raw", str(raw),
                "--device", "cpu"] + (["--arch", QUICK_ARCH] if c.quick else [])
        seeds = list(range(c.members))
        runs = {"stacked": [base + ["--seeds", ",".join(map(str, seeds)), "--out", f"{tmp}/stack"]],
                "single": [base + ["--seed", str(s), "--out", f"{tmp}/s{s}"] for s in seeds]}
        wall = {}
        for name in ("single", "stacked"):
            t0 = time.perf_counter()
            for cmd in runs[name]:
                subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp)
            wall[name] = time.perf_counter() - t0
    steps_each = math.ceil(c.member_ws / c.batch)
    print(f"members K={c.members}: single {wall['single']:.1f} s, stacked {wall['stacked']:.1f} s", flush=True)
    return {"K": c.members, "model": "tiny", "ws": c.member_ws, "steps_per_member": steps_each,
            "commands": {k: " ".join(v[0][1:]).replace(str(REPO) + "/", "").replace(tmp, "$TMP")
                         for k, v in runs.items()},
            "wall_s": wall, "stacked_over_single": wall["single"] / wall["stacked"]}


# -----------------------------------------------------------------------------
# compile: one case per fresh process, a cold inductor cache

def compile_case(spec: str, c: CpuConfig) -> dict:
    """In this process: KIND,PRECISION,MODEL -> the compiled step's first three calls (s; the cold compile
    where the inductor cache is empty) and the eager and compiled steps' ms, interleaved rounds (best_ms).
    --quick: the "compiled" step is eager too (a cold compile alone takes a minute here)."""
    kind, precision, model = spec.split(",")
    cfg = model_cfg(model, c)
    b = case_batch(kind, cfg, c)
    fns = {name: step_fn(kind, cfg, {**BASELINE, "precision": precision, "compile": how}, b)
           for name, how in (("eager", "off"), ("compiled", "off" if c.quick else "on"))}
    t0 = time.perf_counter()
    fns["compiled"]()
    first = time.perf_counter() - t0
    fns["compiled"](), fns["compiled"]()  # a recompile, if any, falls in here
    warm = time.perf_counter() - t0
    fns["eager"](), fns["eager"]()
    ms, median = best_ms(fns, c)
    return {"first_s": first, "warmup_s": warm, "compile_s": max(0.0, warm - 3 * ms["compiled"] / 1e3),
            "ms": ms, "ms_median": median}


def cold_case(spec: str, c: CpuConfig) -> dict:
    """compile_case in a fresh process with an empty inductor cache, as a first run pays it (--quick: here)."""
    if c.quick:
        return compile_case(spec, c)
    with tempfile.TemporaryDirectory() as cache:
        argv = [sys.executable, __file__, "--compile_case", spec, "--batch", str(c.batch), "--seq_len",
                str(c.seq_len), "--rounds", str(c.rounds), "--rows", c.rows, "--data", c.data, "--raw", c.raw]
        p = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(REPO)})
    return json.loads(p.stdout.strip().splitlines()[-1])


def compile_section(c: CpuConfig) -> dict:
    model, out = ("tiny" if not c.quick else c.models.split(",")[0]), []
    for kind, steps_ in (("mlm", DEMO["mlm_steps"]), ("cls", DEMO["finetune_steps"])):
        for precision in ("fp32", "bf16"):
            r = cold_case(f"{kind},{precision},{model}", c)
            ms = r["ms"]
            gain_s = (ms["eager"] - ms["compiled"]) / 1e3  # per step
            pays_after = r["compile_s"] / gain_s if gain_s > 0 else None  # None: never (compiled steps are slower)
            out.append({"kind": kind, "precision": precision, "model": model, **r,
                        "steady_speedup": ms["eager"] / ms["compiled"], "pays_after_steps": pays_after,
                        "demo_steps": steps_, "pays_in_demo": pays_after is not None and pays_after < steps_})
            print(f"compile {kind} {precision}: eager {ms['eager']:.0f} ms, compiled {ms['compiled']:.0f} ms, "
                  f"compile {r['compile_s']:.0f} s", flush=True)
    return {"demo": DEMO, "quick": c.quick, "cases": out}


# -----------------------------------------------------------------------------
# main

def main(argv=None):
    c = parse(argv)
    if c.compile_case:
        print(json.dumps(compile_case(c.compile_case, c)))
        return None
    md = result_path("cpu", CPU, c.out, c.quick)
    js = Path(c.json) if c.json else md.with_suffix(".json") if md else None
    res = {"date": utc_now(), "command": "PYTHONPATH=. python " + " ".join(["bench/cpu.py", *sys.argv[1:]]),
           "git": git_revision(), "versions": versions(), "cpu": cpu_facts(), "threads": torch.get_num_threads(),
           "config": asdict(c), "load_before": os.getloadavg(), "complete": False}
    wanted = c.sections.split(",")
    pk = peaks(c)  # every other section's GFLOP/s is read against these
    res["peaks_gflops"] = pk
    print(f"peaks: bf16 {pk['bf16']:.0f} GFLOP/s, fp32 {pk['fp32']:.0f} GFLOP/s", flush=True)
    with real_rows(c):
        for name, fn in (("steps", lambda: steps(c, pk)), ("members", lambda: members(c)),
                         ("hf", lambda: hf(c, pk)), ("compile", lambda: compile_section(c))):
            if name in wanted:
                res[name] = fn()
                if js:
                    write_json(js, res)
    res.update(load_after=os.getloadavg(), complete=True)
    if js:
        write_json(js, res)
    write_report(md, "CPU speed ratios (bench/cpu.py)", run_header(CPU, asdict(c)), markdown(res))
    return res


if __name__ == "__main__":
    cli(main)
