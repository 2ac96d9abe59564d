"""Paper-scale cells in order of value until a time budget ends: the last stage of a GPU session.

    PYTHONPATH=. python bench/gpu_cells.py --throughput OUT/throughput.json --budget 300 --results results
    PYTHONPATH=. python bench/gpu_cells.py --throughput t.json --budget 60 --scale mini --device cpu   # a CPU check

Order of value (ORDER): Table 5 (no pre-training, then W_s 2,000, 5,000, 40,000, 90,000), Table 9,
Table 6, Table 3, Table 8; within a table, rows without pre-training first, then by pre-training
length, committees after their members; each row for seeds 0 .. --seeds-1 before the next row.
A unit is one (row, seed) cell: its pre-training (when not in the local cache), fine-tuning and
scoring, plus for a committee the members whose checkpoints are missing. Before a unit starts, its
sequences are counted with the paper runner's plan mode and turned into seconds with the rates
measured by bench/train_throughput.py in the same session (best path per model: seq/s for
training, forward seq/s for scoring, the first step's compile time once per model and path);
models that were not measured get the rate of the measured one with the same depth, scaled by
the FLOP ratio (bench/common.train_flops). A unit starts only if SAFETY x its estimate fits in
what is left, else it is skipped and the next one is tried. Cells recorded in
RESULTS/cells/<scale>/ are never redone, so every GPU session continues where the last stopped.
Every unit is logged to --log (JSONL: estimate, actual seconds, status); at the end the touched
tables' reports are rebuilt from the records (RESULTS/<scale>/<table>.md).
"""
import json
import signal
import sys
import time
import traceback
from pathlib import Path

from bench.common import train_flops
from tinytlm.common import ArgParser, Interrupted, UserError, cli, read_json
from tinytlm.config import fold_compile
from tinytlm.model import BertConfig
from tinytlm.paper import report_table
from tinytlm.paper_cells import Runner, run_table
from tinytlm.paper_tables import SCALES, grid

ORDER = ("table5", "table9", "table6", "table3", "table8")
SAFETY = 1.25  # estimates are multiplied by this before they are compared with the time left
OVERHEAD_S = 5.0  # per run of train_mlm or train_cls: data loading, model build, checkpoint writes


def ordered_rows(table: str, scale: str) -> list:
    """Rows in order of value: no pre-training first, then by pre-training sequences, committees last."""
    rows = grid(table, scale)["rows"]

    def cost(r):
        if r["kind"] == "committee":
            return (2, 0)
        p = r["pretrain"]
        return (1, p["ws"] * p["epochs"]) if p else (0, 0)
    return sorted(rows, key=cost)  # stable: grid order within ties


class Rates:
    """Seconds for a cell's sequences, from the session's throughput.json."""

    def __init__(self, throughput: dict):
        self.best = throughput.get("best") or {}
        if not self.best:
            raise UserError("throughput file: no measured path ('best' is empty): nothing to size the cells with")
        self.compiled = set()  # (model, path) whose compile time was already paid in this process

    def _ref(self, cfg: BertConfig):
        """(measured entry, FLOP ratio measured/this) for a model config."""
        per_seq = train_flops(cfg, 1, cfg.max_pos, 19)
        measured = {m: BertConfig.preset(m) for m in self.best if m in BertConfig.presets()}
        if not measured:
            raise UserError(f"throughput file: no known model among {sorted(self.best)}")
        name = min(measured, key=lambda m: (measured[m].n_layer != cfg.n_layer,
                                            abs(train_flops(measured[m], 1, cfg.max_pos, 19) - per_seq)))
        return self.best[name], train_flops(measured[name], 1, cfg.max_pos, 19) / per_seq

    def path(self, cfg: BertConfig) -> dict:
        """The speed switches of the fastest measured path (unpad included: --unpad when it won). Its static
        masking (mask_cap) is not one of them: it would change the cells' masks, so the grid sets it (32 at
        scale paper), not the device."""
        p = fold_compile(self._ref(cfg)[0].get("path") or {})  # throughput.json: compile true/false + compile_mode
        return {k: p[k] for k in ("compile", "kernels", "unpad") if k in p}

    def seconds(self, cfg: BertConfig, kind: str, trained: int, scored: int) -> float:
        """One pre-training (kind "pretrain") or fine-tuning with its scoring (kind "finetune")."""
        b, ratio = self._ref(cfg)
        train = b["seq_per_s"] * ratio
        infer = (b.get("infer_seq_per_s") or 2 * b["seq_per_s"]) * ratio
        # a compiled path pays its compile (first step, then the recompiles of the warm-up) once per model,
        # path and kind in this process; fine-tuning compiles a training and a scoring graph
        compile_s = 0.0 if self._key(cfg, b, kind) in self.compiled else \
            (b.get("first_step_s") or 0.0) + (b.get("warmup_s") or 0.0)
        return trained / train + scored / infer + OVERHEAD_S + compile_s * (2 if kind == "finetune" else 1)

    def paid(self, cfg: BertConfig, kind: str):
        self.compiled.add(self._key(cfg, self._ref(cfg)[0], kind))

    @staticmethod
    def _key(cfg, b, kind):
        return json.dumps(cfg.to_dict(), sort_keys=True), json.dumps(b.get("path"), sort_keys=True), kind


def model_cfg(row) -> BertConfig:
    return BertConfig.preset(row["model"], **row["overrides"])


def estimate(table, row, seed, args, rates) -> tuple:
    """(seconds, todo cells, the (model config, kind) of each training run among them) of one unit: the
    plan runner counts what is not finished yet."""
    plan = Runner(args.cache, args.device, args.data, args.raw, mode="plan", records=args.records, scale=args.scale)
    run_table(table, args.scale, seed + 1, plan, only={(row["name"], seed)})
    todo = [c for c in plan.plan_cells.values() if c["state"] != "cached"]
    rows = {r["model"]: r for r in grid(table, args.scale)["rows"] if r["kind"] == "train"}
    trains = [c for c in todo if c["cell"] != "committee"]
    runs = [(model_cfg(rows[c["model"]]), c["cell"]) for c in trains]
    if any(c["seqs"] is None for c in trains):
        return float("inf"), todo, runs  # an uncapped constructed set: size unknown until built
    secs = OVERHEAD_S * (len(todo) - len(trains))  # the committees' scoring
    secs += sum(rates.seconds(cfg, kind, c["seqs"], c["eval_seqs"]) for (cfg, kind), c in zip(runs, trains))
    return secs, todo, runs


def prep(args):
    """Prepare every shard the tables' cells read (run on the CPU machine: the GPU one has no raw data):
    the longest Wikipedia prefix any row pre-trains on, and each distinct fine-tuning task."""
    from tinytlm.paper_calls import cls_config
    from tinytlm.tasks import ensure_task
    from tinytlm.train import roots
    from tinytlm.wikipedia import ensure_wiki
    raw, data = roots(args)
    rows = [r for t in args.tables.split(",") for r in grid(t, args.scale)["rows"] if r["kind"] == "train"]
    ws = max(r["pretrain"]["ws"] for r in rows if r["pretrain"])
    print(f"Wikipedia: first {ws:,} rows -> {ensure_wiki(ws, raw, data).path}")
    specs = {cls_config(r, 0, {}).spec() for r in rows}  # (the runner's own train_cls configs)
    for spec in sorted(specs, key=lambda s: s.dirname()):
        print(f"task: {ensure_task(spec, raw, data)}")
    return 0


def parse(argv=None):
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prep", action="store_true", help="prepare the data the cells need, then stop (CPU side)")
    ap.add_argument("--throughput", help="throughput.json of bench/train_throughput.py")
    ap.add_argument("--budget", type=float, default=0, help="seconds this stage may use")
    ap.add_argument("--scale", default="paper", choices=list(SCALES))
    ap.add_argument("--seeds", type=int, default=3, help="seeds per row (the paper has 5; 3 is the aim per run)")
    ap.add_argument("--tables", default=",".join(ORDER), help="tables in order of value")
    ap.add_argument("--results", type=Path, default=Path("results"), help="records and reports root")
    ap.add_argument("--cache", type=Path, default=Path("runs/paper"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data", default="")
    ap.add_argument("--raw", default="")
    ap.add_argument("--log", type=Path, default=None, help="JSONL of every unit (default RESULTS/schedule.jsonl)")
    ap.add_argument("--conv_ok", default="true", choices=("true", "false"),
                    help="false: the conv stem kernels failed their GPU checks; stem models train with --kernels torch")
    args = ap.parse_args(argv)
    args.records = args.results / "cells" / args.scale
    args.log = args.log or args.results / "schedule.jsonl"
    return args


def main(argv=None):
    args = parse(argv)
    if args.prep:
        return prep(args)
    if not args.throughput or args.budget <= 0:
        raise UserError("--throughput FILE and --budget SECONDS > 0 are needed (or --prep)")
    t_end = time.time() + args.budget
    rates = Rates(read_json(args.throughput, "throughput"))
    args.log.parent.mkdir(parents=True, exist_ok=True)
    touched, failed = [], 0

    def stop(signum, frame):  # the stage's time cap: end the unit in flight (at a step boundary where it
        raise Interrupted("SIGTERM")  # trains), then write the reports of what is recorded

    signal.signal(signal.SIGTERM, stop)
    units = [(t, row, seed) for t in args.tables.split(",") for row in ordered_rows(t, args.scale)
             for seed in range(args.seeds)]
    for table, row, seed in units:
        left = t_end - time.time()
        est, todo, runs = estimate(table, row, seed, args, rates)
        rec = {"table": table, "row": row["name"], "seed": seed, "estimate_s": round(est, 1),
               "left_s": round(left, 1), "todo": [c["what"] for c in todo]}
        if not todo:
            rec["status"] = "recorded"
        elif est * SAFETY > left:
            rec["status"] = "skipped: would not finish"
        else:
            cfg = model_cfg(row) if row["kind"] == "train" else None
            # no checkpoint per epoch: the cache dies with the GPU machine, and a BERT-6 checkpoint
            # with its AdamW state is ~0.8 GB to write
            speed = {**rates.path(cfg or model_cfg(grid(table, args.scale)["rows"][0])), "save_every": 0}
            if args.conv_ok == "false" and cfg is not None and cfg.n_conv and speed.get("kernels") == "triton":
                speed["kernels"] = "torch"  # the path was measured without a stem; the stem kernels failed
            runner = Runner(args.cache, args.device, args.data, args.raw, records=args.records,
                            scale=args.scale, speed=speed)
            t0 = time.time()
            try:
                run_table(table, args.scale, seed + 1, runner, only={(row["name"], seed)})
                rec["status"] = "done"
            except Interrupted:
                rec["status"] = "stopped at the time cap (not recorded)"
            except Exception as e:  # one failing cell must not lose the next ones
                traceback.print_exc()
                rec["status"] = f"failed: {type(e).__name__}: {e}"[:300]
                failed += 1
            rec.update(actual_s=round(time.time() - t0, 1), path=speed)
            for cfg, kind in runs:  # their compile is paid now
                rates.paid(cfg, kind)
            if table not in touched:
                touched.append(table)
        print(f"[{rec['status']}] {table} {row['name']} seed {seed}: estimate {rec['estimate_s']} s, "
              f"left {rec['left_s']} s" + (f", took {rec['actual_s']} s" if "actual_s" in rec else ""),
              flush=True)
        with open(args.log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if rec["status"].startswith("stopped"):
            break
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the reports are written whatever comes now
    report = Runner(args.cache, args.device, args.data, args.raw, mode="report", records=args.records,
                    scale=args.scale)
    for table in touched:  # the reports of what this run added to, rebuilt from every record
        report_table(table, args.scale, SCALES[args.scale]["seeds"], report, args.results)
        print(f"report: {args.results / args.scale / (table + '.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli(main))
