"""Reproduce a table of the paper end to end: pre-train, fine-tune, compare, report.

    python -m tinytlm.paper table5 --scale cpu              # AG News gap vs W_s, ~30 min on 2 cores
    python -m tinytlm.paper table9 --scale cpu --seeds 3
    python -m tinytlm.paper all --scale paper               # every table at the paper's sizes (GPU)
    python -m tinytlm.paper table5 --scale paper --report   # rebuild the report from the records; runs nothing
    python -m tinytlm.paper overlap --scale cpu             # gap vs T_M and weighted overlaps, recorded cells
    python -m tinytlm.paper budget --scale cpu              # beyond the paper: gap vs pre-training length
    python -m tinytlm.paper labels --scale cpu              # beyond the paper: gap vs labelled rows per label
    python -m tinytlm.paper analyze --table table5 --scale cpu   # tinytlm.analyze on a table's checkpoints
    python -m tinytlm.paper table5 --scale mini --results /tmp/r --cache /tmp/c   # seconds (the CI test)

Grids live in tinytlm/paper_tables.py; cells (what they are, and run/plan/report) in
tinytlm/paper_cells.py, where a finished one is found (records, cache) in tinytlm/paper_records.py,
the runner's calls into the training library in tinytlm/paper_calls.py; reports in
tinytlm/paper_report.py, the overlap fit in tinytlm/paper_overlap.py, the analyze target in
tinytlm/paper_analyze.py. Outputs:
RESULTS/<scale>/<table>.md, .json and .png (matplotlib optional) and one record per finished cell in
RESULTS/cells/<scale>/ (RESULTS = --results, default results/). A finished cell is never recomputed,
so an interrupted table picks up where it stopped, and records committed from other machines (a GPU
run) count as finished.
The runner calls tinytlm.pretrain.train and tinytlm.finetune.arms in-process: one Python process keeps
torch.compile's caches and the CUDA context warm across cells, which matters in a 10-minute GPU
window; a cell's own prints go to its log.txt. The missing seeds of a row train as one stacked model
(tinytlm/members.py; --no_stack: one after another; one seed is a stack of one, trained as a single
run is), and so do the pre-trainings they start from: with dropout off the members equal the single runs
(within 1e-5, tests/test_members.py); with dropout on (the paper's setup) they are other, equally valid
draws of the dropout masks, so a cell's numbers depend on whether it was trained stacked (its record
says so: path.stacked) as they depend on the device.
"""
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

from tinytlm.common import ArgParser, UserError, add_option, cli, home
from tinytlm.config import Switches, add_dataclass_args, dataclass_from_args, refuse_removed
from tinytlm.paper_analyze import analyze_table
from tinytlm.paper_cells import Runner, run_table
from tinytlm.paper_overlap import overlap
from tinytlm.paper_report import summarize, write_report
from tinytlm.paper_plots import plot
from tinytlm.paper_tables import SCALES, TITLES, default_seeds
from tinytlm.precision import PRECISIONS, resolve_precision

TABLES = [f"table{i}" for i in range(1, 10)]
EXTRA = ["budget", "labels"]  # beyond the paper, not part of "all"


# -----------------------------------------------------------------------------
# command line

def plan(tables: list, scale: str, seeds: int, runner: Runner) -> dict:
    """Print every cell that is not finished yet and the work it stands for; a cell shared by
    several tables is listed under the first. Returns {table: [cell records]}."""
    out, seen = {}, set()
    for t in tables:
        run_table(t, scale, seeds, runner)
        new = [(d, c) for d, c in runner.plan_cells.items() if d not in seen]
        seen.update(d for d, _ in new)
        out[t] = [c for _, c in new]
        todo = [c for c in out[t] if c["state"] != "cached"]
        print(f"== {TITLES[t]} (scale {scale}, {seeds} seeds): {len(out[t])} new cells, "
              f"{len(out[t]) - len(todo)} cached, {len(todo)} to run", flush=True)
        for c in todo:
            n = "" if c["cell"] == "committee" else ": size known once the set is built" if c["seqs"] is None else \
                f": {c['seqs']:,} sequences" + (f" + {c['eval_seqs']:,} scored" if c["eval_seqs"] else "")
            print(f"  {c['state']:<7} {c['what']}{n}")
    cells = [c for cs in out.values() for c in cs]
    work = {}
    for c in cells:
        if c["state"] != "cached" and c["seqs"]:
            for k, n in ((f"{c['cell']} {c['model']}", c["seqs"]), (f"scoring {c['model']}", c["eval_seqs"])):
                work[k] = work.get(k, 0) + n
    unknown = any(c["seqs"] is None and c["state"] != "cached" for c in cells)
    print(f"== plan: {len(cells)} cells, {sum(c['state'] == 'cached' for c in cells)} cached; to run: "
          + ("; ".join(f"{k} {n:,} sequences" for k, n in sorted(work.items()) if n) or "nothing")
          + (" (plus the uncapped constructed sets)" if unknown else "")
          + ". Time = trained sequences / training seq/s (`python bench/train_throughput.py`) + scored "
          "sequences / inference seq/s")
    return out


def report_table(t: str, scale: str, seeds: int, runner: Runner, results: Path) -> dict:
    """Run (or, in report mode, only read back) a table's cells and write its report; returns the rows."""
    out = run_table(t, scale, seeds, runner)
    recs = summarize(out)
    meta = {"table": t, "scale": scale, "seeds": seeds,
            "command": f"python -m tinytlm.paper {t} --scale {scale}"
                       + (f" --seeds {seeds}" if seeds != default_seeds(t, scale) else "")}
    folder = results / scale
    folder.mkdir(parents=True, exist_ok=True)
    if out["grid"]["plot"] and any(r["n"] for r in recs):
        meta["plot"] = plot(out["grid"]["plot"], [r for r in recs if r["n"]], TITLES[t] + f" (scale {scale})",
                            folder / f"{t}.png")
        if not meta["plot"]:
            meta["plot_note"] = "No plot: matplotlib is not installed."
    write_report(out, recs, folder, meta)
    return recs


def parser() -> ArgParser:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_option(ap, "table", help="table1 ... table9, all, overlap, budget (gap vs pre-training length), labels "
               "(gap vs labelled rows per label) or analyze (with --table)", choices=(*TABLES, *EXTRA, "all", *READERS))
    add_option(ap, "--table", dest="analyze_table", default="", choices=("", *TABLES, *EXTRA),
               help="analyze: the table whose checkpoints to analyse")
    add_option(ap, "--scale", default="cpu", choices=tuple(SCALES), help="grid size: paper | cpu | mini")
    add_option(ap, "--seeds", type=int, default=None, help="seeds per cell (default: the scale's)", low=1)
    add_option(ap, "--results", type=Path, default=home() / "results",
               help="reports go to RESULTS/<scale>/, cell records to RESULTS/cells/<scale>/", kind="out")
    add_option(ap, "--cache", type=Path, default=home() / "runs" / "paper", help="cache root of all runs", kind="out")
    add_dataclass_args(ap, Switches, "device, speed and data (train_mlm's and train_cls's switches)")
    add_option(ap, "--no_stack", action="store_true", help="train a row's seeds one after another instead of as "
               "one stacked model (the same results; stacking is faster where one model leaves the device idle)")
    mode = ap.add_mutually_exclusive_group()
    add_option(mode, "--plan", action="store_true", help="list the unfinished cells and the sequences they "
               "would process, count the finished ones; runs nothing")
    add_option(mode, "--report", action="store_true", help="rebuild the report from the records and the "
               "cache; runs nothing (missing cells are shown as such)")
    return ap


def parse(argv=None):
    refuse_removed(argv)  # --compile_mode: one line with the new spelling
    return parser().parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.table in READERS:
        return READERS[args.table](args)
    seeds = default_seeds(args.table, args.scale) if args.seeds is None else args.seeds
    tables = TABLES if args.table == "all" else [args.table]
    runner = runner_of(args)
    if args.plan:
        return plan(tables, args.scale, seeds, runner)
    return run_tables(tables, args.scale, seeds, runner, args.results)


def runner_of(args) -> Runner:
    """The runner of a command line: its mode, paths, device and speed switches (validated as the training
    commands validate them: tinytlm.config.Switches)."""
    sw = dataclass_from_args(Switches, args)
    speed = {"compile": sw.compile, "kernels": sw.kernels, "unpad": sw.unpad}
    mode = "plan" if args.plan else "report" if args.report else "run"
    return Runner(args.cache, sw.device, sw.data, sw.raw, mode=mode, records=args.results / "cells" / args.scale,
                  scale=args.scale, speed=speed, stack=not args.no_stack,
                  precisions=cell_precisions(sw, mode == "report" or args.table == "analyze"))


def cell_precisions(sw: Switches, reading: bool) -> tuple:
    """The precisions of the cells a command looks at, the one it computes in first: --precision fp32 or bf16
    alone; auto: what it resolves to on --device (tinytlm/precision.py). A command that only reads cells
    (--report, analyze) with auto reads those of every precision, this machine's first: the records made
    elsewhere, or before --precision existed (fp32), are found without a flag."""
    on_gpu = sw.device.startswith("cuda") or (sw.device == "auto" and torch.cuda.is_available())
    first = resolve_precision(sw.precision, torch.device("cuda" if on_gpu else "cpu"))  # (--plan for a GPU, too)
    others = [p for p in PRECISIONS if p not in ("auto", first)] if reading and sw.precision == "auto" else []
    return (first, *others)


def run_tables(tables: list, scale: str, seeds: int, runner: Runner, results: Path) -> dict:
    """Run (or, in report mode, only read back) each table's cells and write its report; returns
    {table: {"computed", "seconds", "rows"}}."""
    summary = {}
    with cache_lock(runner.cache) if runner.mode == "run" else contextlib.nullcontext():  # one computing run a cache
        for t in tables:
            t0, c0 = time.time(), runner.computed
            print(f"== {TITLES[t]} (scale {scale}, {seeds} seeds)", flush=True)
            recs = report_table(t, scale, seeds, runner, results)
            summary[t] = {"computed": runner.computed - c0, "seconds": round(time.time() - t0), "rows": recs}
            print(f"== {t}: {summary[t]['computed']} cells computed in {summary[t]['seconds']} s -> "
                  f"{results / scale / (t + '.md')}", flush=True)
    return summary


def overlap_target(args) -> dict:
    """`overlap`: the gap against the token statistics, over every recorded or cached cell of the scale."""
    if args.plan:
        raise UserError("--plan: overlap computes nothing new (it reads the records); leave --plan out")
    return overlap(args.cache, args.results / "cells" / args.scale, args.results / args.scale, args.scale)


def analyze_target(args) -> dict:
    """`analyze --table T`: tinytlm.analyze on the checkpoints of table T found in the local cache."""
    t = args.analyze_table
    if t not in TABLES + EXTRA:
        raise UserError(f"--table {t!r}: analyze needs one of {', '.join(TABLES + EXTRA)}" if t else
                        "analyze: give --table (e.g. --table table5)")
    if args.plan or args.report:
        raise UserError(f"--{'plan' if args.plan else 'report'}: analyze trains nothing (it analyses the "
                        "checkpoints in the cache); leave it out")
    seeds = default_seeds(t, args.scale) if args.seeds is None else args.seeds
    return analyze_table(t, args.scale, seeds, runner_of(args), args.results)


# targets that read the finished cells of every table rather than run one: name -> function of the command line
READERS = {"overlap": overlap_target, "analyze": analyze_target}


@contextlib.contextmanager
def cache_lock(cache: Path):
    """Hold the cache for this run: a second run on the same cache waits (with a message) until the first ends,
    then finds the cells it finished in the cache, so no cell is computed twice or written by two runs. The
    lock is the kernel's (flock): it is released when the process ends, however it ends."""
    import fcntl
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            print(f"{cache}: another run is using this cache ({f.read().strip() or 'pid unknown'}); waiting for it "
                  f"to finish", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        yield


if __name__ == "__main__":
    cli(main)
