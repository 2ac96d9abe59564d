"""MLM pre-training throughput and MFU on real Wikipedia rows: Hugging Face BERT vs tinytlm's training paths
(train_mlm.py flags), padded and unpadded.

    PYTHONPATH=. python bench/train_throughput.py                       # the full table on a GPU
    PYTHONPATH=. python bench/train_throughput.py --cases bert6:32 --stacks eager,eager+unpad --json t.json
    PYTHONPATH=. python bench/train_throughput.py --gpu_session --unpad --probe o/probe.json \
        --json o/throughput.json --out o/train.md --time_limit 110      # the GPU session's call
    PYTHONPATH=. python bench/train_throughput.py --smoke               # CPU sanity check, not a performance number

One step = forward, backward, AdamW step, zero_grad, on the same batches for every stack: the first rows of
the prepared Wikipedia shard (pre-training's rows, in its order) masked as train_mlm.py masks them. Stacks:
hf (transformers.BertForMaskedLM as the paper's code trains it) and train_mlm.py's paths (stack_path, flags:
eager = its defaults, compiled, triton, graphs = CUDA graphs with static head slots, graphs+triton), each
also as S+unpad (on the packed real tokens, tinytlm/unpad.py). FLOPs (bench/common.py train_flops) count
every position, padding included, for every stack: an unpadded stack's MFU is the padded work it replaces
per second. --json: every case (path, speed, MFU, memory, real tokens and unpadded token budget per B*T
slot), inference rates, "best" per model (bench/gpu_cells.py runs the cells on it); see bench/README.md.
"""
import contextlib
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.common import (MASK, PAD, CLS, SEP, check_matmul_params, device_label, error_note,
                          free_memory, markdown_table, mean_step_ms, peak_memory_gib, read_peak, result_path,
                          run_header, smoke_config, train_flops, utc_now, versions, write_report)
from tinytlm.common import ArgParser, UserError, cli, git_revision, write_json
from tinytlm.data import mask_generator, mask_tokens
from tinytlm.hf import hf_config
from tinytlm.model import BertConfig, BertForClassification, BertForMLM
from tinytlm.train import add_dataclass_args, autocast, dataclass_from_args, make_optimizer, \
    prepare_model, resolve_device
from tinytlm.unpad import pack_plan
from tinytlm.wikipedia import ensure_wiki

STACKS = ("hf", "eager", "compiled", "triton", "graphs", "graphs+triton")  # each but hf also as S+unpad
# the likely winners of both depths first (a compile costs 20-60 s on a GPU): a time limit leaves a bert1 rate too
GPU_SESSION = (("bert6", 32, "hf,eager,graphs"), ("bert1", 32, "eager,graphs"), ("bert6", 32, "compiled,graphs+triton,triton"),
               ("bert1", 32, "graphs+triton"), ("bert6", 256, "hf,compiled"))


# -----------------------------------------------------------------------------
# config

@dataclass
class BenchConfig:
    models: str = "bert6,bert1,bert1-cl2-d64-3x3-h12"  # BertConfig presets, comma-separated
    batch: tuple = (32, 256)  # batch sizes (sequences per step)
    cases: str = ""  # model:batch pairs in priority order, e.g. bert6:32,bert1:32 (instead of models x batch)
    gpu_session: bool = False  # the GPU session's preset cases and stacks (see the docstring)
    seq_len: int = 128  # T, tokens per sequence
    stacks: str = "hf,eager,graphs,compiled,graphs+triton,triton"  # which stacks (see the docstring), in order
    per_row: int = 32  # graphs stacks: masks capped at this many per row = the sparse head's static slots
    kernels_ok: bool = True  # false: the native kernel tests failed, the triton stacks are skipped
    unpad: bool = False  # each stack followed by its +unpad twin (GPU session: eager, graphs, graphs+triton)
    unpad_ok: bool = True  # false: the unpad tests failed, the +unpad stacks are skipped
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

def stack_path(stack: str, bc: BenchConfig):
    """train_mlm.py's settings for a stack (None for hf): compile, compile_mode, kernels, mask_cap[, unpad]."""
    if stack == "hf":
        return None
    graphs = stack.startswith("graphs")
    return {"compile": not stack.startswith("eager"), "compile_mode": "reduce-overhead" if graphs else "default",
            "kernels": "triton" if "triton" in stack else "torch", "mask_cap": bc.per_row if graphs else 0,
            **({"unpad": True} if stack.endswith("+unpad") else {})}


def flags(path) -> str:
    """The train_mlm.py flags of a path (the report's 'flags' column)."""
    if path is None:
        return "(Hugging Face)"
    mode, cap = path["compile_mode"], path["mask_cap"]
    f = ["--compile"] * path["compile"] + [f"--compile_mode {mode}"] * (mode != "default")
    f += ["--kernels triton"] * (path["kernels"] == "triton") + [f"--mask_cap {cap}"] * bool(cap)
    return " ".join(f + ["--unpad"] * path.get("unpad", False)) or "(defaults)"


def plan(bc: BenchConfig) -> list:
    """Every case to record, in order: {"model", "B", "stack", "path", "skip": None or the skip note}."""
    if bc.gpu_session:
        groups = GPU_SESSION
    elif bc.cases:
        groups = [(m, b, bc.stacks) for m, b in parse_cases(bc.cases)]
    else:
        groups = [(m, b, bc.stacks) for m in bc.models.split(",") for b in bc.batch]
    twins, out = ("eager", "graphs", "graphs+triton") if bc.gpu_session else STACKS[1:], []
    for model, B, stacks in groups:
        for s in [t for s in stacks.split(",") for t in [s] + [s + "+unpad"] * (bc.unpad and s in twins)]:
            skip = "skipped: kernel tests failed" if "triton" in s and not bc.kernels_ok else \
                "skipped: unpad tests failed" if "unpad" in s and not bc.unpad_ok else None
            out.append({"model": model, "B": B, "stack": s, "path": stack_path(s, bc), "skip": skip})
    return out


# -----------------------------------------------------------------------------
# data

def wiki_rows(n: int, bc: BenchConfig) -> torch.Tensor:
    """(n, seq_len) int64: the first n rows of the prepared Wikipedia shard (pre-training's rows, in its order),
    repeated if it holds fewer and no raw data is there to prepare more (a smoke session's shard)."""
    try:
        shard = ensure_wiki(n, None, Path(bc.data) if bc.data else None, quiet=True)
    except UserError:
        shard = ensure_wiki(0, None, Path(bc.data) if bc.data else None, quiet=True)  # whatever is prepared
    rows = torch.from_numpy(shard.ids[:n, :bc.seq_len].astype("int64"))
    return rows.repeat(-(-n // len(rows)), 1)[:n]


def make_batches(cfg: BertConfig, B: int, bc: BenchConfig, device, cap: int, n: int = 4) -> list:
    """n batches of (inputs, attention_mask, targets) on the device: rows 0 .. n*B-1 of Wikipedia, the same
    for every stack, as are the masks' random draws; cap > 0 keeps at most `cap` of the choices per row."""
    rows, out = wiki_rows(n * B, bc), []
    for i in range(n):
        x = rows[i * B:(i + 1) * B].to(device)
        inputs, targets = mask_tokens(x, mask_generator(device, bc.seed, i), vocab_size=cfg.vocab_size, mask_id=MASK,
                                      special_ids=(PAD, CLS, SEP), cap=cap)
        out.append((inputs, (x != PAD).long(), targets))  # (B, T) each
    return out


# -----------------------------------------------------------------------------
# stacks: each returns (step(i), note)

def hf_stack(cfg, batches, bc, device, path):
    import transformers
    if cfg.n_conv:
        raise NotImplementedError("n/a: a conv stem has no Hugging Face equivalent")
    hcfg = transformers.BertConfig(**hf_config(cfg), attn_implementation="sdpa")
    model = transformers.BertForMaskedLM(hcfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=bc.lr, weight_decay=0.01)  # foreach on CUDA by default
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    amp = torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext()

    def step(i):
        x, am, y = batches[i % len(batches)]
        with amp:
            loss = model(input_ids=x, attention_mask=am, labels=y).loss  # dense head over (B, T, V)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    amp_note = "fp16 autocast + GradScaler" if cuda else "fp32 (CPU)"
    return step, f"attn {model.config._attn_implementation}, {amp_note}, dense head, AdamW foreach"


def tinytlm_stack(cfg, batches, bc, device, path):
    """train_mlm.py's step for this path: prepare_model (kernels, torch.compile), AdamW, sparse head."""
    model = BertForMLM(cfg)
    check_matmul_params(model)  # the FLOP formula describes this model
    raw = model
    model = prepare_model(model, device, path["kernels"], path["compile"], path["compile_mode"],
                          path.get("unpad", False)).train()
    opt = make_optimizer(raw, bc.lr, 0.01, device)  # fused AdamW on CUDA
    graphs, slots = path["compile_mode"] == "reduce-overhead", path["mask_cap"]

    def step(i):
        x, am, y = batches[i % len(batches)]
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be reused
        with autocast(device):
            _, loss = model(x, am, y, per_row=slots)  # sparse head on (B * slots, V), or (n chosen, V) if 0
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    amp_note = "bf16 autocast, fused AdamW" if device.type == "cuda" else "fp32 (CPU), AdamW"
    head = f"sparse head {slots} static slots/row" if slots else "sparse head on the chosen (dynamic)"
    return step, f"{amp_note}, {head}, kernels {path['kernels']}" + (", unpadded" if path.get("unpad") else "")


# -----------------------------------------------------------------------------
# run

def blank(e: dict, status: str, note: str) -> dict:
    """A case record with no numbers (skipped, n/a, failed)."""
    return {"model": e["model"], "B": e["B"], "stack": e["stack"], "path": e["path"], "status": status, "note": note,
            **dict.fromkeys(("seq_per_s", "ms_per_step", "mfu", "peak_gib", "first_step_s", "warmup_s",
                             "gflop_per_step", "tokens"))}


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
            "peak_gib": mem, "first_step_s": first_s, "warmup_s": warmup_s, "gflop_per_step": flops / 1e9,
            "tokens": tokens}


def infer_rate(cfg, bc, device) -> dict:
    """Classifier inference rate: BertForClassification, eval, no_grad, autocast, eager, torch kernels."""
    rec = {"B": bc.infer_batch, "status": "ok", "note": "BertForClassification (10 labels), eager, torch kernels",
           "seq_per_s": None, "ms_per_step": None}
    torch._dynamo.reset()
    free_memory(device)
    try:
        model = BertForClassification(cfg, 10).to(device).eval()
        x = wiki_rows(bc.infer_batch, bc).to(device)  # (B, T)

        def step(i):
            with torch.no_grad(), autocast(device):
                model(x, x != PAD)

        _, _, ms = mean_step_ms(step, bc.warmup, bc.steps, device)
    except Exception as err:
        traceback.print_exc()
        return {**rec, "status": "failed", "note": error_note(err)}
    return {**rec, "seq_per_s": bc.infer_batch / ms * 1e3, "ms_per_step": ms}


def best_paths(cases: list, infer: dict) -> dict:
    """Per model: the fastest ok tinytlm stack at the smallest batch with one (the paper trains at 32)."""
    best = {}
    for model in dict.fromkeys(c["model"] for c in cases):
        ok = [c for c in cases if c["model"] == model and c["status"] == "ok" and c["path"] is not None]
        if ok:
            top = max((c for c in ok if c["B"] == min(c["B"] for c in ok)), key=lambda c: c["seq_per_s"])
            keys = ("B", "stack", "path", "seq_per_s", "ms_per_step", "mfu", "first_step_s", "warmup_s")
            best[model] = {**{k: top[k] for k in keys}, "infer_seq_per_s": infer.get(model, {}).get("seq_per_s")}
    return best


def summary(cases: list) -> list:
    """The goals: tinytlm-best / HF on bert6 at its smallest batch (>= 5x) and its seq/s (>= 8,500), MFU at the
    largest batch (>= 45%); and every unpadded stack against its padded twin."""
    def top(model, B, hf):
        ok = [c for c in cases if c["model"] == model and c["B"] == B and c["status"] == "ok"
              and (c["path"] is None) == hf]
        return max(ok, key=lambda c: c["seq_per_s"]) if ok else None

    lines = []
    for model in dict.fromkeys(c["model"] for c in cases):
        batches = sorted({c["B"] for c in cases if c["model"] == model and c["status"] == "ok"})
        if not batches:
            continue
        ours, hf = top(model, batches[0], False), top(model, batches[0], True)
        if model == "bert6" and ours and hf:
            lines.append(f"- bert6, B={batches[0]}: tinytlm best ({ours['stack']}) / HF = "
                         f"{ours['seq_per_s'] / hf['seq_per_s']:.2f}x in seq/s (goal >= 5x); "
                         f"{ours['seq_per_s']:,.0f} seq/s (goal >= 8,500)")
        r = top(model, batches[-1], False)
        if r:
            lines.append(f"- {model}, B={batches[-1]}: best tinytlm MFU {100 * r['mfu']:.1f}% ({r['stack']}; "
                         "goal >= 45%)")
    ok = {(c["model"], c["B"], c["stack"]): c for c in cases if c["status"] == "ok"}
    for (model, B, stack), c in ok.items():  # unpadded / padded, and what the padding and the budget were
        if stack.endswith("+unpad") and (model, B, stack[:-6]) in ok:
            t, ratio = c["tokens"], c["seq_per_s"] / ok[(model, B, stack[:-6])]["seq_per_s"]
            lines.append(f"- {model}, B={B}: {stack} / {stack[:-6]} = {ratio:.2f}x (real tokens {100 * t['real']:.1f}% "
                         f"of the B*T slots, token budget {100 * t['budget']:.1f}%)")
    return lines


def md_row(c: dict) -> dict:
    def num(v, fmt):
        return "" if v is None else format(v, fmt)
    tflops = None if c["ms_per_step"] is None else c["gflop_per_step"] / c["ms_per_step"]
    return {"model": c["model"], "B": c["B"], "stack": c["stack"], "status": c["status"],
            "ms/step": num(c["ms_per_step"], ".2f"), "seq/s": num(c["seq_per_s"], ".0f"), "TFLOP/s": num(tflops, ".1f"),
            "MFU": "" if c["mfu"] is None else f"{100 * c['mfu']:.1f}%", "peak GiB": num(c["peak_gib"], ".2f"),
            "1st step s": num(c["first_step_s"], ".1f"), "warmup s": num(c["warmup_s"], ".1f"),
            "GFLOP/step": num(c["gflop_per_step"], ".1f"), "flags": flags(c["path"]), "note": c["note"],
            "real / budget": f"{c['tokens']['real']:.3f} / {c['tokens']['budget']:.3f}" if c["tokens"] else ""}


def main(argv=None):
    t_start = time.perf_counter()
    bc = parse_config(argv)
    device = resolve_device(bc.device)
    peak, peak_source = read_peak(bc.probe, bc.peak_tflops)
    torch.manual_seed(bc.seed)
    header = ["- **SMOKE RUN: tiny shapes on whatever device; not a performance number**"] * bc.smoke + \
        run_header(device, asdict(bc)) + [f"- peak for MFU: {peak:g} TFLOP/s ({peak_source})"]
    print("\n".join(header))
    path = result_path("train", device, bc.out, bc.smoke)
    title = "MLM training throughput" + " (smoke run, not a performance number)" * bc.smoke
    result = {"device": device_label(device), "date": utc_now(), "git": git_revision(), "versions": versions(),
              "smoke": bc.smoke, "complete": False, "config": asdict(bc), "peak_tflops": peak,
              "peak_source": peak_source, "cases": [], "infer": {}, "best": {}}
    cases, infer, configs, batches = result["cases"], result["infer"], {}, {}

    def save(goals=()):
        result["best"] = best_paths(cases, infer)
        sections = [markdown_table(list(md_row(cases[0])), [md_row(c) for c in cases])] if cases else []
        if infer:
            rows = [{"model": m, **r, "seq_per_s": f"{r['seq_per_s'] or 0:.0f}"} for m, r in infer.items()]
            sections.append("## Inference\n\n" + markdown_table(["model", "B", "status", "seq_per_s", "note"], rows))
        if goals:
            sections.append("## Goals\n\n" + "\n".join(goals))
        write_report(path, title, header, sections)
        if bc.json:
            write_json(bc.json, result)

    entries, ran = plan(bc), False
    save()  # a file from the start: a run killed in its first case still says what and where
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
        save()
    goals = summary(cases) + (["- (smoke run: these ratios say nothing about performance)"] if bc.smoke else [])
    print("\n".join(goals))
    result["complete"] = True
    save(goals)
    for model, b in result["best"].items():
        print(f"best {model}: {b['stack']} ({flags(b['path'])}) at B={b['B']}: {b['seq_per_s']:.0f} seq/s")
    print(f"done in {time.perf_counter() - t_start:.0f} s" + (f"; wrote {path}" if path else ""))
    return result


if __name__ == "__main__":
    cli(main)
