"""Inference latency of BERT-6, BERT-1 and the five-member BERT-1 soft committee (Table 8), batch 1 and 32.

    PYTHONPATH=. python bench/latency.py                  # the full table on a GPU
    PYTHONPATH=. python bench/latency.py --batch 1 --runs 500 --compile
    PYTHONPATH=. python bench/latency.py --smoke          # CPU sanity check, not a performance number

Classifiers (BertForClassification, random weights: latency does not depend on them) in eval mode
under torch.no_grad and bf16 autocast on CUDA (cache_enabled=False, which CUDA-graph capture needs),
on synthetic ids (bench/common.py: token_batch, T=128, every 4th row padded). One call = the whole
system: its logits summed over members (the soft committee), ending in a device synchronize.
Modes:
  seq            members one after another on one stream, eager (what ensemble.py does now)
  streams        each member on its own torch.cuda.Stream, joined before the sum (committee_forward)
  graph          `seq` captured once into a torch.cuda.CUDAGraph and replayed (no launch overhead)
  graph+streams  `streams` captured into one CUDA graph: branches are graph nodes that may overlap
  compiled       (--compile) each member torch.compile(mode="reduce-overhead"), run one after another
Each mode's logits are compared with `seq` (column "max abs diff"), so a stream race shows up.
Reported: median and p90 ms over --runs calls after --warmup calls, and committee / bert6 at batch 1
(best mode of each; goal <= 0.5; the paper's layer count predicts 7 / 25 = 0.28).
Writes bench/results/<date>-<device>-latency.md; --smoke writes only with --out.
"""
import contextlib
import traceback
from dataclasses import asdict, dataclass


import torch

from bench.common import (free_memory, latency_ms, markdown_table, result_path, run_header, smoke_config,
                          token_batch, write_report)
from tinytlm.common import ArgParser, UserError, cli
from tinytlm.kernel_path import Impl
from tinytlm.model import BertConfig, BertForClassification
from tinytlm.train import add_dataclass_args, dataclass_from_args, resolve_device

TABLE8 = "bert1-cl2-d64-3x3-h8,bert1-cl2-d64-3x3-h12,bert1-h24,bert1-cl2-d64-16x3-h12,bert1-cl3-d32-3x3-h12"
MODES = ("seq", "streams", "graph", "graph+streams")


# -----------------------------------------------------------------------------
# config

@dataclass
class LatencyConfig:
    single: str = "bert6,bert1"  # presets timed alone, comma-separated
    committee: str = TABLE8  # presets of the committee members (Table 8's five)
    batch: tuple = (1, 32)  # batch sizes
    seq_len: int = 128  # T, tokens per sequence
    n_labels: int = 10  # classifier outputs (FewRel 10 relations)
    modes: str = "seq,streams,graph,graph+streams"  # see the docstring; streams modes only for a committee
    compile: bool = False  # add the 'compiled' mode (torch.compile reduce-overhead; minutes of compiling)
    kernels: str = "torch"  # attention / conv-stem implementation: torch | triton
    warmup: int = 20  # untimed calls
    runs: int = 200  # timed calls; the median is reported
    seed: int = 0  # weights and ids
    device: str = "auto"  # auto | cuda | cpu
    smoke: bool = False  # tiny models, 3 runs: proves the code runs, not a performance number
    out: str = ""  # result file; default bench/results/<date>-<device>-latency.md (none with --smoke)


def parse_config(argv=None) -> LatencyConfig:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_dataclass_args(ap, LatencyConfig)
    lc = dataclass_from_args(LatencyConfig, ap.parse_args(argv))
    if lc.smoke:
        lc.batch, lc.seq_len, lc.warmup, lc.runs = (1, 4), 32, 1, 3
    for m in lc.modes.split(","):
        if m not in MODES:
            raise UserError(f"--modes: unknown mode {m!r}; valid: {', '.join(MODES)}")
    if lc.runs < 1:
        raise UserError("--runs must be >= 1")
    return lc


# -----------------------------------------------------------------------------
# forward passes: each returns the summed logits (B, n_labels)

def sequential_forward(models, x):
    return torch.stack([m(x)[0] for m in models]).sum(0)  # (M, B, C) -> (B, C)


def committee_forward(models, x, streams=None):
    """Soft committee (summed raw logits) with each member on its own CUDA stream; plain loop on CPU.

    The members only read x, so their kernels may overlap on the GPU; at batch 1 each member alone
    fills a fraction of the SMs, so overlap is where the committee's latency win comes from.
    """
    if x.device.type != "cuda":
        return sequential_forward(models, x)
    main = torch.cuda.current_stream(x.device)
    streams = streams or [torch.cuda.Stream(x.device) for _ in models]
    outs = []
    for m, s in zip(models, streams):
        s.wait_stream(main)  # x (and anything before) is ready on main
        with torch.cuda.stream(s):
            x.record_stream(s)  # x is read on s: the allocator must not reuse it before s is done
            outs.append(m(x)[0])  # (B, C), allocated on s
    for s, out in zip(streams, outs):
        main.wait_stream(s)
        out.record_stream(main)  # read on main below
    return torch.stack(outs).sum(0)  # (M, B, C) -> (B, C)


def cuda_graph(fn, x):
    """Capture fn(static_x) once; the returned call copies x in, replays, returns the static output."""
    static_x = x.clone()
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):  # warm up on a side stream, as the CUDA-graph docs ask
        for _ in range(3):
            fn(static_x)
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_x)

    def run(x):
        static_x.copy_(x)
        graph.replay()
        return static_out
    return run


# -----------------------------------------------------------------------------
# run

def build_models(names, lc, device):
    models = []
    for name in names:
        cfg = BertConfig.preset(name)
        cfg = smoke_config(cfg) if lc.smoke else cfg
        models.append(BertForClassification(cfg, lc.n_labels, impl=Impl(lc.kernels)).to(device).eval())
    return models


def mode_fn(mode, models, x, device):
    """The call timed for one mode (x is the input), and a one-line note."""
    if mode == "seq":
        return lambda: sequential_forward(models, x), "one stream, eager"
    if mode == "compiled":
        torch._dynamo.reset()  # every member shares one forward(): stay below the recompile limit
        compiled = [torch.compile(m, mode="reduce-overhead", dynamic=False) for m in models]

        def call():
            torch.compiler.cudagraph_mark_step_begin()
            return sequential_forward(compiled, x)
        return call, "torch.compile reduce-overhead per member, one after another"
    if device.type != "cuda":
        raise NotImplementedError("skipped: needs CUDA")
    streams = [torch.cuda.Stream(device) for _ in models]
    if mode == "streams":
        return lambda: committee_forward(models, x, streams), f"{len(models)} CUDA streams, eager"
    fn = sequential_forward if mode == "graph" else (lambda ms, xx: committee_forward(ms, xx, streams))
    run = cuda_graph(lambda xx: fn(models, xx), x)
    return (lambda: run(x)), ("CUDA graph of seq" if mode == "graph" else
                              f"one CUDA graph of the {len(models)}-stream forward")


def time_system(system, names, lc, device, modes):
    """Rows for one system (a single model or the committee) over batch sizes and modes."""
    torch.manual_seed(lc.seed)
    models = build_models(names, lc, device)
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if cuda else contextlib.nullcontext()
    rows = []
    for B in lc.batch:
        x = token_batch(B, lc.seq_len, torch.Generator().manual_seed(lc.seed)).to(device)
        with torch.no_grad(), amp:
            ref = sequential_forward(models, x).float()
            for mode in modes:
                row = {"system": system, "members": len(models), "B": B, "mode": mode}
                free_memory(device)
                try:
                    call, note = mode_fn(mode, models, x, device)
                    diff = (call().float() - ref).abs().max().item()
                    med, p90 = latency_ms(call, lc.warmup, lc.runs, device)
                    row.update({"median ms": f"{med:.3f}", "p90 ms": f"{p90:.3f}", "max abs diff": f"{diff:.2g}",
                                "note": note, "_ms": med})
                except NotImplementedError as e:
                    row["note"] = str(e)
                except Exception as e:  # one failing mode must not lose the others
                    traceback.print_exc()
                    row["note"] = f"FAILED: {type(e).__name__}: {' '.join(str(e).split())[:160]}".replace("|", "/")
                rows.append(row)
                print(" | ".join(f"{k}={v}" for k, v in row.items() if not k.startswith("_")), flush=True)
    return rows


def ratios(rows, b=1) -> list:
    def best(system):
        timed = [r for r in rows if r["system"] == system and r["B"] == b and "_ms" in r]
        return min(timed, key=lambda r: r["_ms"]) if timed else None

    c, s = best("committee"), best("bert6")
    if not (c and s):
        return []
    lines = [f"- committee / bert6 at B={b}, best mode of each ({c['mode']} / {s['mode']}): "
             f"{c['_ms'] / s['_ms']:.2f} (goal <= 0.5; layer count 7/25 = 0.28)"]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pair = [next((r for r in rows if r["system"] == n and r["B"] == b and r["mode"] == mode and "_ms" in r), None)
                for n in ("committee", "bert6")]
        if all(pair):
            lines.append(f"- same mode {mode}: {pair[0]['_ms'] / pair[1]['_ms']:.2f}")
    return lines


def main(argv=None):
    lc = parse_config(argv)
    device = resolve_device(lc.device)
    modes = lc.modes.split(",") + (["compiled"] if lc.compile else [])
    header = run_header(device, asdict(lc))
    if lc.smoke:
        header.insert(0, "- **SMOKE RUN: tiny models on whatever device; not a performance number**")
    print("\n".join(header))
    path = result_path("latency", device, lc.out, lc.smoke)
    title = "Inference latency" + (" (smoke run, not a performance number)" if lc.smoke else "")
    columns = ["system", "members", "B", "mode", "median ms", "p90 ms", "max abs diff", "note"]
    systems = [(n, [n]) for n in lc.single.split(",") if n] + [("committee", lc.committee.split(","))]
    rows = []
    for system, names in systems:
        single_modes = [m for m in modes if "streams" not in m] if len(names) == 1 else modes
        rows += time_system(system, names, lc, device, single_modes)
        write_report(path, title, header, [markdown_table(columns, rows)])
    lines = ratios(rows) + (["- (smoke run: these ratios say nothing about performance)"] if lc.smoke else [])
    print("\n".join(lines))
    members = "Committee members: " + ", ".join(f"`{n}`" for n in lc.committee.split(","))
    write_report(path, title, header, [markdown_table(columns, rows), members, "## Ratio\n\n" + "\n".join(lines)])
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    cli(main)
