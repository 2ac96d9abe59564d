"""The fast dropout path on a CPU (issue 21): Impl(dropout="torch") vs Impl(dropout="fast") (tinytlm/kernel_path.py,
kernels/dropout.py), A/B in interleaved rounds.

    PYTHONPATH=. python bench/dropout.py            # ~10 minutes on a shared 2-core machine
    PYTHONPATH=. python bench/dropout.py --quick    # shrunk sizes, seconds: proves it runs, not speeds

Sections:
  ops    the dropout alone on --op_elems elements, fp32 and bf16: F.dropout vs kernels/dropout.py, forward and
         forward + backward (ms per call, medians of --rounds interleaved rounds).
  steps  per model (--models) and kind (mlm, cls): one optimizer step of the default variant (bench/cpu_steps.py
         default_variant: what train_mlm.py / train_cls.py do by default here) with dropout torch vs fast, on the
         same batch (--batch x --seq_len), interleaved rounds (bench/common.py interleaved_times); the fastest
         round's ms (the one a shared machine's load slowed least) and the median, torch / fast of both, and the
         median of the rounds' own ratios (the two calls of a round are adjacent: a slowly changing load cancels).

--threads N sets torch's threads: on a shared machine whose cores are busy, an op split over every core waits for
the slowest (a 1M-element compare ran 20x slower at 2 threads than at 1 on the loaded 2-core machine), so the
one-thread numbers are the steadier ones there; --clock cpu with --threads 1 times each call by the process's CPU
time, the work done rather than the wait for a core (what an oversubscribed machine adds to the wall clock).

Results: the markdown report (--out; default bench/results/<date>-cpu-dropout.md, none with --quick unless asked)
with the command, git revision, CPU and the machine's load (os.getloadavg) before and after.
"""
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from bench.common import interleaved_times, markdown_table, result_path, run_header, write_report
from bench.cpu_steps import batch, default_variant, step_fn, variant_name
from kernels.dropout import dropout
from tinytlm.common import ArgParser, UserError, cli
from tinytlm.cpu_memory import keep_freed_memory
from tinytlm.model import BertConfig
from tinytlm.train import add_dataclass_args, dataclass_from_args

CPU = torch.device("cpu")
P = 0.1  # BertConfig's dropout and attn_dropout


@dataclass
class DropoutBenchConfig:
    models: str = "tiny,bert1"  # BertConfig presets, comma-separated
    kinds: str = "mlm,cls"  # training steps: MLM pre-training, classification fine-tuning
    batch: int = 32  # sequences per step
    seq_len: int = 128  # T, tokens per sequence
    rounds: int = 0  # interleaved timed rounds per comparison; 0 = auto: 15, --quick 2
    op_elems: int = 1 << 20  # elements of the ops section
    sections: str = "ops,steps"  # which to run, comma-separated
    quick: bool = False  # shrunk sizes: proves the code runs, numbers mean nothing
    seed: int = 0  # batches and weights
    threads: int = 0  # torch.set_num_threads; 0 = torch's default (the cores)
    clock: str = "wall"  # wall: perf_counter; cpu: this process's CPU time (with --threads 1: the work, not the wait)
    out: str = ""  # markdown report; default bench/results/<date>-cpu-dropout.md (none with --quick)


def parse(argv=None) -> DropoutBenchConfig:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_dataclass_args(ap, DropoutBenchConfig)
    c = dataclass_from_args(DropoutBenchConfig, ap.parse_args(argv))
    if c.quick:
        c.models, c.batch, c.seq_len, c.op_elems = "tiny", 4, 32, 1 << 12
    c.rounds = c.rounds or (2 if c.quick else 15)
    if c.clock not in ("wall", "cpu"):
        raise UserError(f"--clock {c.clock!r}: choose wall or cpu")
    return c


def _stats(times: dict) -> dict:
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def _times(fns: dict, c: DropoutBenchConfig) -> dict:
    """Every call's ms per fn over c.rounds interleaved rounds: bench/common.py interleaved_times (wall clock), or
    the same rotation timed by the process's CPU time (--clock cpu)."""
    if c.clock == "wall":
        return interleaved_times(fns, c.rounds, CPU)
    names, times = list(fns), {k: [] for k in fns}
    for i in range(c.rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.process_time()
            fns[name]()
            times[name].append((time.process_time() - t0) * 1e3)
    return times


def _paired(times: dict, a: str, b: str) -> float:
    """The median over rounds of a's ms / b's ms in the same round: the two calls of a round are adjacent, so a
    load that changes slowly cancels in each ratio."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def ops(c: DropoutBenchConfig) -> list:
    """Rows: dtype, pass, F.dropout and fast ms (fastest round / median), F.dropout / fast."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(c.op_elems).to(dtype).requires_grad_()
        g = torch.ones_like(x)
        for what in ("forward", "forward + backward"):
            def call(f, back=what != "forward"):
                y = f(x, P, True)
                if back:
                    y.backward(g)
            fns = {"F.dropout": lambda: call(F.dropout), "fast": lambda: call(dropout)}
            for f in fns.values():
                f()
            times = _times(fns, c)
            st = _stats(times)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "pass": what,
                         **{f"{k} ms": f"{st[k][0]:.2f} / {st[k][1]:.2f}" for k in fns},
                         "F.dropout / fast": f"{st['F.dropout'][0] / st['fast'][0]:.2f}x",
                         "paired": f"{_paired(times, 'F.dropout', 'fast'):.2f}x"})
            print(rows[-1], flush=True)
    return rows


def steps(c: DropoutBenchConfig) -> tuple:
    """(the default variant, rows: model, kind, torch and fast ms (fastest / median), torch / fast)."""
    default = default_variant(CPU)
    rows = []
    for model in c.models.split(","):
        cfg = BertConfig.preset(model, **({"n_layer": 1} if c.quick else {}))
        for kind in c.kinds.split(","):
            b = batch(kind, cfg, c.batch, c.seq_len, c.seed)
            fns = {d: step_fn(kind, cfg, {**default, "dropout": d}, b) for d in ("torch", "fast")}
            for f in fns.values():  # warm-up: first-call allocations, the optimizer's state
                f(), f()
            times = _times(fns, c)
            st = _stats(times)
            rows.append({"model": model, "kind": kind, **{f"{d} ms": f"{st[d][0]:.1f} / {st[d][1]:.1f}" for d in fns},
                         "torch / fast": f"{st['torch'][0] / st['fast'][0]:.2f}x",
                         "(medians)": f"{st['torch'][1] / st['fast'][1]:.2f}x",
                         "paired": f"{_paired(times, 'torch', 'fast'):.2f}x"})
            print(rows[-1], flush=True)
    return default, rows


def main(argv=None):
    c = parse(argv)
    keep_freed_memory()  # as a training run on a CPU does (tinytlm/cpu_memory.py)
    if c.threads:
        torch.set_num_threads(c.threads)
    md = result_path("dropout", CPU, c.out, c.quick)
    load_before = os.getloadavg()
    sections = []
    if "ops" in c.sections.split(","):
        sections.append(f"## The dropout alone, p = {P}, {c.op_elems} elements\n\nms per call, fastest round / "
                        f"median of {c.rounds} interleaved rounds; ratios of the fastest rounds and the median of each "
                        "round's ratio (paired).\n\n"
                        + markdown_table(["dtype", "pass", "F.dropout ms", "fast ms", "F.dropout / fast", "paired"],
                                         ops(c)))
    if "steps" in c.sections.split(","):
        default, rows = steps(c)
        sections.append(f"## One training step, batch {c.batch} x {c.seq_len}: dropout torch vs fast\n\n"
                        f"The default variant ({variant_name(default)}, {default}) with Impl dropout torch or fast; "
                        f"ms per step, fastest round / median of {c.rounds} interleaved rounds; the ratio of the "
                        "fastest rounds, of the medians, and the median of each round's ratio (paired).\n\n"
                        + markdown_table(["model", "kind", "torch ms", "fast ms", "torch / fast", "(medians)",
                                          "paired"], rows))
    load = f"- load average (1, 5, 15 min) before: {load_before}, after: {os.getloadavg()}"
    write_report(md, "Fast dropout on the CPU (bench/dropout.py)", run_header(CPU, asdict(c)) + [load], sections)
    return sections


if __name__ == "__main__":
    cli(main)
