"""MLM pre-training throughput and MFU on real Wikipedia rows: Hugging Face BERT vs tinytlm's training paths
(train_mlm.py flags), padded and unpadded.

    PYTHONPATH=. python bench/train_throughput.py                       # the full table on a GPU
    PYTHONPATH=. python bench/train_throughput.py --cases bert6:32 --stacks eager,eager+unpad --json t.json
    PYTHONPATH=. python bench/train_throughput.py --gpu_session --probe o/probe.json \
        --json o/throughput.json --out o/train.md --time_limit 200      # the GPU session's call
    PYTHONPATH=. python bench/train_throughput.py --smoke               # CPU sanity check, not a performance number

One step = forward, backward, AdamW step, zero_grad, on the same batches for every stack (bench/train_stacks.py:
the stacks, their train_mlm.py flags, the batches: the first rows of the prepared Wikipedia shard, masked as
train_mlm.py masks them). On CPU the triton and graphs stacks are "n/a: needs CUDA" (there reduce-overhead is
silently plain compile). A failing stack is recorded ("failed", its error) and never stops the others.

Cases (model, batch, stack) run in order: --cases m:B,... else --models x --batch, each with --stacks, and with
--unpad each stack but hf followed by its S+unpad twin. --gpu_session is the GPU session's preset (GPU_SESSION,
warmup 3, steps 10): first one stack of each family at bert6 batch 32 (HF as the paper runs it, our eager, compiled
with CUDA graphs, Triton, unpadded + Triton), then the same at bert1, then bert6 at batch 256, then variants; a
time limit thus cuts variants, never a family. --kernels_ok / --unpad_ok / --graphs_ok / --conv_ok false (the
session's kernel stage found that path failing) skip the triton stacks / the +unpad stacks / graphs+triton / the
triton stacks of a model with a conv stem. --time_limit S: no case starts once S seconds have passed (the first
always runs); the rest are "skipped: time limit". When a model's first (model, batch) group ends, its inference
rate is measured (BertForClassification, eval, no_grad, autocast, eager, batch --infer_batch).

FLOPs: bench/common.py train_flops, the useful forward + backward FLOPs with the head on the masked tokens only
(the mean chosen count of the case's batches), every position counted, padding included, for every stack (HF's
dense head lowers its MFU; an unpadded stack's MFU is the padded work it replaces per second). MFU = TFLOP/s /
peak: probe.json's matmul_tflops (--probe, bench/probe.py) else --peak_tflops (790: the bf16 8192^3 matmul
measured on this workplace's H100/H200; datasheet 989). Timing: --warmup calls (the first, which compiles, timed
alone; warmup_s = all of them, recompiles included; an unpadded stack warms up on every batch, one token budget
each), then --steps calls between two device synchronisations. Compile time is recorded apart from the steady
rate: compile_s = warmup_s - warmup x the mean timed step.

--json FILE, rewritten atomically after every case ("complete" turns true at the end):
  {"device", "date" (UTC), "git", "versions", "smoke", "complete", "config", "peak_tflops", "peak_source",
   "cases": [{"model", "B", "stack", "path": {"compile", "compile_mode", "kernels", "mask_cap"[, "unpad"]} or null
              (hf), "status": "ok" | "failed" | "skipped" | "n/a", "note", "seq_per_s", "ms_per_step", "mfu",
              "peak_gib", "first_step_s", "warmup_s", "compile_s", "gflop_per_step",
              "tokens": {"real", "budget"} (per B*T slot)}],           (numbers null unless "ok")
   "infer": {"<model>": {"B", "status", "note", "seq_per_s", "ms_per_step"}},
   "best": {"<model>": {"B", "stack", "path", "seq_per_s", "ms_per_step", "mfu", "first_step_s", "warmup_s",
                        "compile_s", "infer_seq_per_s"}}}
best[model]: the fastest ok tinytlm stack (never hf) at the smallest batch that has one; bench/gpu_cells.py sizes
and runs the paper's cells with it. The markdown report (--out; default bench/results/<date>-<device>-train.md,
none with --smoke) is rewritten likewise. See bench/README.md.
"""
import time
import traceback
from dataclasses import asdict, dataclass

import torch

from bench.common import (PAD, autocast, device_label, error_note, free_memory, markdown_table, mean_step_ms,
                          peak_memory_gib, read_peak, result_path, run_header, smoke_config, train_flops, utc_now,
                          versions, write_report)
from bench.throughput_report import best_paths, blank, md_row, summary
from bench.train_stacks import STACKS, flags, hf_stack, make_batches, stack_path, tinytlm_stack, wiki_rows
from tinytlm.common import ArgParser, UserError, cli, git_revision, write_json
from tinytlm.model import BertConfig, BertForClassification
from tinytlm.train import add_dataclass_args, dataclass_from_args, resolve_device
from tinytlm.unpad import pack_plan

# One of each family first at the paper's batch, bert6 then bert1, then batch 256, then variants: a time limit
# (compiles cost 20-60 s each on a GPU) cuts variants before it cuts a family.
FAMILIES = "hf,eager,graphs,graphs+triton,graphs+triton+unpad"
GPU_SESSION = (("bert6", 32, FAMILIES), ("bert1", 32, FAMILIES),
               ("bert6", 256, "hf,graphs,graphs+triton,graphs+triton+unpad"),
               ("bert6", 32, "compiled,triton,eager+unpad,graphs+unpad"), ("bert1", 32, "compiled,triton,graphs+unpad"),
               ("bert1-cl2-d64-3x3-h12", 32, "eager,graphs,graphs+triton"))


# -----------------------------------------------------------------------------
# config

@dataclass
class BenchConfig:
    models: str = "bert6,bert1,bert1-cl2-d64-3x3-h12"  # BertConfig presets, comma-separated
    batch: tuple = (32, 256)  # batch sizes (sequences per step)
    cases: str = ""  # model:batch pairs in priority order, e.g. bert6:32,bert1:32 (instead of models x batch)
    gpu_session: bool = False  # the GPU session's preset cases and stacks (GPU_SESSION; see the docstring)
    seq_len: int = 128  # T, tokens per sequence
    stacks: str = "hf,eager,graphs,compiled,graphs+triton,triton"  # which stacks (bench/train_stacks.py), in order
    per_row: int = 32  # graphs stacks: masks capped at this many per row = the sparse head's static slots
    kernels_ok: bool = True  # false: the attention kernels failed their GPU checks, the triton stacks are skipped
    unpad_ok: bool = True  # false: the varlen kernels or the unpad tests failed, the +unpad stacks are skipped
    graphs_ok: bool = True  # false: the kernels failed under CUDA graphs, graphs+triton stacks are skipped
    conv_ok: bool = True  # false: the conv stem kernels failed, a stem model's triton stacks are skipped
    unpad: bool = False  # each stack but hf followed by its +unpad twin (not with --gpu_session: its preset has them)
    time_limit: float = -1.0  # seconds: no case starts after this (the first always runs); < 0: no limit
    warmup: int = 5  # untimed steps (the first one, which compiles, is timed alone)
    steps: int = 20  # timed steps
    infer_batch: int = 256  # batch of the inference-rate measurement
    probe: str = ""  # probe.json from bench/probe.py: its matmul_tflops is the MFU peak
    peak_tflops: float = 790.0  # MFU denominator without --probe, TFLOP/s (measured bf16 matmul, H100/H200 here)
    lr: float = 5.5e-5  # AdamW learning rate (the paper's); weight decay 0.01
    seed: int = 0  # masks
    data: str = ""  # prepared data root with wikipedia/ (default $TINYTLM_DATA or ./data; prepared when missing)
    device: str = "auto"  # auto | cuda | cpu
    smoke: bool = False  # tiny shapes, 2 timed steps: proves the code runs, not a performance number
    out: str = ""  # markdown report; default bench/results/<date>-<device>-train.md (none with --smoke)
    json: str = ""  # machine-readable results (see the docstring); none by default


def parse_cases(text: str) -> list:
    """'bert6:32,bert1:32' -> [('bert6', 32), ('bert1', 32)]; unknown presets and bad batches are errors."""
    out = [item.partition(":")[::2] for item in text.split(",")]
    for (model, b), item in zip(out, text.split(",")):
        if not b.isdigit() or int(b) < 1:
            raise UserError(f"--cases: {item!r} is not model:batch (e.g. bert6:32)")
        BertConfig.preset(model)  # raises on an unknown preset
    return [(m, int(b)) for m, b in out]


def parse_config(argv=None) -> BenchConfig:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_dataclass_args(ap, BenchConfig)
    bc = dataclass_from_args(BenchConfig, ap.parse_args(argv))
    if bc.gpu_session:
        if bc.cases or bc.stacks != BenchConfig.stacks:
            raise UserError("--gpu_session sets its own cases and stacks; drop --cases and --stacks")
        bc.warmup, bc.steps = 3, 10
    if bc.smoke:  # shapes a 2-core CPU runs in seconds; configs shrunk by smoke_config
        bc.batch, bc.seq_len, bc.warmup, bc.steps = (2,), 32, 1, 2
        bc.per_row, bc.infer_batch = min(bc.per_row, 8), 4
    for s in bc.stacks.split(","):
        if s.removesuffix("+unpad") not in STACKS or s == "hf+unpad":
            raise UserError(f"--stacks: unknown stack {s!r}; valid: {', '.join(STACKS)}")
    if bc.cases:
        parse_cases(bc.cases)
    if not 0 < bc.per_row <= bc.seq_len or bc.warmup < 1 or bc.steps < 1 or bc.infer_batch < 1:
        raise UserError("need 0 < per_row <= seq_len, warmup >= 1, steps >= 1, infer_batch >= 1")
    return bc


# -----------------------------------------------------------------------------
# plan: (model, batch, stack, train_mlm.py path) in priority order

def skip_note(model: str, stack: str, bc: BenchConfig):
    """Why a stack is not run (a path that the GPU session's kernel stage failed or did not check), or None."""
    triton = "triton" in stack
    if triton and not bc.kernels_ok:
        return "skipped: the attention kernels did not pass their checks"
    if stack.endswith("+unpad") and not bc.unpad_ok:
        return "skipped: the varlen kernels or the unpad tests did not pass"
    if triton and stack.startswith("graphs") and not bc.graphs_ok:
        return "skipped: the kernels did not pass their CUDA-graph checks"
    if triton and not bc.conv_ok and BertConfig.preset(model).n_conv:
        return "skipped: the conv stem kernels did not pass their checks"
    return None


def plan(bc: BenchConfig) -> list:
    """Every case to record, in order: {"model", "B", "stack", "path", "skip": None or the skip note}."""
    if bc.gpu_session:
        groups = GPU_SESSION
    elif bc.cases:
        groups = [(m, b, bc.stacks) for m, b in parse_cases(bc.cases)]
    else:
        groups = [(m, b, bc.stacks) for m in bc.models.split(",") for b in bc.batch]
    twins = bc.unpad and not bc.gpu_session
    out = []
    for model, B, stacks in groups:
        for s in [t for s in stacks.split(",") for t in [s] + [s + "+unpad"] * (twins and s in STACKS[1:])]:
            out.append({"model": model, "B": B, "stack": s, "path": stack_path(s, bc.per_row),
                        "skip": skip_note(model, s, bc)})
    return out


# -----------------------------------------------------------------------------
# run

def run_case(e: dict, cfg, batches, bc, device, peak: float) -> dict:
    B, path = e["B"], e["path"]
    if device.type != "cuda" and path and (path["kernels"] == "triton" or path["compile_mode"] == "reduce-overhead"):
        return blank(e, "n/a", "n/a: needs CUDA (Triton kernels, tested with TRITON_INTERPRET=1; CUDA graphs)")
    n_masked = round(sum(int((y != -100).sum()) for _, _, y in batches) / len(batches))
    flops = train_flops(cfg, B, bc.seq_len, n_masked)
    torch._dynamo.reset()  # one graph cache per case: else a dozen cases pass the recompile limit and run eager
    free_memory(device)
    try:
        step, note = (hf_stack if path is None else tinytlm_stack)(cfg, batches, bc, device, path)
        warmup = max(bc.warmup, len(batches)) if path and path.get("unpad") else bc.warmup  # every token budget
        first_s, warmup_s, ms = mean_step_ms(step, warmup, bc.steps, device)
        mem = peak_memory_gib(device)  # model + AdamW state + activations of this case alone
    except NotImplementedError as err:
        return blank(e, "n/a", str(err))
    except Exception as err:  # one failing stack must not lose the others
        traceback.print_exc()
        return blank(e, "failed", error_note(err))
    slots = sum(am.numel() for _, am, _ in batches)  # real tokens and the unpadded token budget, per B*T slot
    tokens = {"real": round(sum(int(am.sum()) for _, am, _ in batches) / slots, 4),
              "budget": round(sum(pack_plan(am).budget for _, am, _ in batches) / slots, 4)}
    return {**blank(e, "ok", note), "seq_per_s": B / ms * 1e3, "ms_per_step": ms, "mfu": flops / ms / 1e9 / peak,
            "peak_gib": mem, "first_step_s": first_s, "warmup_s": warmup_s,
            "compile_s": max(0.0, warmup_s - warmup * ms / 1e3), "gflop_per_step": flops / 1e9, "tokens": tokens}


def infer_rate(cfg, bc, device) -> dict:
    """Classifier inference rate: BertForClassification, eval, no_grad, autocast, eager, torch kernels."""
    rec = {"B": bc.infer_batch, "status": "ok", "note": "BertForClassification (10 labels), eager, torch kernels",
           "seq_per_s": None, "ms_per_step": None}
    torch._dynamo.reset()
    free_memory(device)
    try:
        model = BertForClassification(cfg, 10).to(device).eval()
        x = wiki_rows(bc.infer_batch, bc.seq_len, bc.data).to(device)  # (B, T)

        def step(i):
            with torch.no_grad(), autocast(device):
                model(x, x != PAD)

        _, _, ms = mean_step_ms(step, bc.warmup, bc.steps, device)
    except Exception as err:
        traceback.print_exc()
        return {**rec, "status": "failed", "note": error_note(err)}
    return {**rec, "seq_per_s": bc.infer_batch / ms * 1e3, "ms_per_step": ms}


class Report:
    """The run's result dict, its markdown report and JSON file, rewritten after every case."""

    def __init__(self, bc: BenchConfig, device, peak: float, peak_source: str):
        self.bc = bc
        self.header = ["- **SMOKE RUN: tiny shapes on whatever device; not a performance number**"] * bc.smoke + \
            run_header(device, asdict(bc)) + [f"- peak for MFU: {peak:g} TFLOP/s ({peak_source})"]
        self.path = result_path("train", device, bc.out, bc.smoke)
        self.title = "MLM training throughput" + " (smoke run, not a performance number)" * bc.smoke
        self.result = {"device": device_label(device), "date": utc_now(), "git": git_revision(),
                       "versions": versions(), "smoke": bc.smoke, "complete": False, "config": asdict(bc),
                       "peak_tflops": peak, "peak_source": peak_source, "cases": [], "infer": {}, "best": {}}

    def save(self, goals=()):
        cases, infer = self.result["cases"], self.result["infer"]
        self.result["best"] = best_paths(cases, infer)
        sections = [markdown_table(list(md_row(cases[0])), [md_row(c) for c in cases])] if cases else []
        if infer:
            rows = [{"model": m, **r, "seq_per_s": f"{r['seq_per_s'] or 0:.0f}"} for m, r in infer.items()]
            sections.append("## Inference\n\n" + markdown_table(["model", "B", "status", "seq_per_s", "note"], rows))
        if goals:
            sections.append("## Goals\n\n" + "\n".join(goals))
        write_report(self.path, self.title, self.header, sections)
        if self.bc.json:
            write_json(self.bc.json, self.result)


def main(argv=None):
    t_start = time.perf_counter()
    bc = parse_config(argv)
    device = resolve_device(bc.device)
    peak, peak_source = read_peak(bc.probe, bc.peak_tflops)
    torch.manual_seed(bc.seed)
    report = Report(bc, device, peak, peak_source)
    print("\n".join(report.header))
    cases, infer, configs, batches = report.result["cases"], report.result["infer"], {}, {}
    entries, ran = plan(bc), False
    report.save()  # a file from the start: a run killed in its first case still says what and where
    for i, e in enumerate(entries):
        model, B = e["model"], e["B"]
        elapsed = time.perf_counter() - t_start
        if e["skip"]:
            rec = blank(e, "skipped", e["skip"])
        elif ran and 0 <= bc.time_limit <= elapsed:
            rec = blank(e, "skipped", f"skipped: time limit ({elapsed:.0f} s >= {bc.time_limit:g} s)")
        else:
            if model not in configs:
                configs[model] = smoke_config(BertConfig.preset(model)) if bc.smoke else BertConfig.preset(model)
            cap = e["path"]["mask_cap"] if e["path"] else 0
            if (model, B, cap) not in batches:
                batches[(model, B, cap)] = make_batches(configs[model], B, bc, device, cap)
            rec = run_case(e, configs[model], batches[(model, B, cap)], bc, device, peak)
            ran = ran or rec["status"] in ("ok", "failed")  # n/a took no time
        cases.append(rec)
        print(" | ".join(f"{k}={v}" for k, v in md_row(rec).items() if v != ""), flush=True)
        group_ends = i + 1 == len(entries) or (entries[i + 1]["model"], entries[i + 1]["B"]) != (model, B)
        if group_ends and model not in infer and any(c["model"] == model and c["status"] == "ok" and c["path"]
                                                     for c in cases):
            infer[model] = infer_rate(configs[model], bc, device)
            print(f"inference {model} B={bc.infer_batch}: {infer[model]['seq_per_s'] or 0:.0f} seq/s", flush=True)
        report.save()
    goals = summary(cases) + (["- (smoke run: these ratios say nothing about performance)"] if bc.smoke else [])
    print("\n".join(goals))
    report.result["complete"] = True
    report.save(goals)
    for model, b in report.result["best"].items():
        print(f"best {model}: {b['stack']} ({flags(b['path'])}) at B={b['B']}: {b['seq_per_s']:.0f} seq/s")
    print(f"done in {time.perf_counter() - t_start:.0f} s" + (f"; wrote {report.path}" if report.path else ""))
    return report.result


if __name__ == "__main__":
    cli(main)
