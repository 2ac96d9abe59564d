"""Stacked members: K models of one shape trained as one stacked model vs one after another, and the
batch-1 latency of a committee run stacked (bench/README.md, "Stacked members").

    PYTHONPATH=. python bench/members.py                      # on a GPU: tiny, bert1, bert6 x K 1, 2, 5
    PYTHONPATH=. python bench/members.py --models bert1 --members 1,5 --compile --json m.json
    PYTHONPATH=. python bench/members.py --device cpu         # CPU defaults: 8 minutes on a shared 2-core machine
    PYTHONPATH=. python bench/members.py --smoke              # shrunk models: proves it runs, numbers mean nothing

Training: the same K BertForMLM on the same rows, stacked (one BertForMLM(cfg, members=K), K*B rows, member
k's rows k*B .. k*B+B-1) and one by one (K single models, each with its AdamW, K steps of B rows): bf16
autocast and fused AdamW on CUDA (fp32 on CPU), sparse MLM head on --per_row static slots. After --warmup
steps of each path alone, --steps rounds alternate the two (each call timed alone, the order rotating, so a
passing load on a shared machine falls on both); medians.
K = 1 is one model. Peak memory: CUDA max_memory_allocated in each path's warm-up (one by one: K models
resident; stacked: the singles' bytes left out); on CPU weights + grads + AdamW state, no activations.
Largest K in --memory_gb: a least-squares line through the peaks at the measured K.

Latency (runs first): BertForClassification, eval, no_grad, autocast, batch 1: --committee_size --committee
members stacked (one forward), one after another, one --single model; medians of --latency_runs interleaved
calls. No training case starts after --time_limit s. 0 = auto for --batch_size (GPU 32, CPU 4) and --warmup +
--steps (GPU 3 + 10; CPU 1 + 3 tiny, 1 + 2 bert1, 1 + 1 bert6). --json and the report (--out; default
bench/results/<date>-<device>-members.md, none with --smoke) are rewritten after every case."""
import math
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass

import torch

from bench.common import (CLS, MASK, PAD, SEP, device_label, error_note, free_memory, markdown_table, result_path,
                          run_header, smoke_config, sync, token_batch, utc_now, versions, write_report)
from tinytlm.committee import member_logits
from tinytlm.common import ArgParser, UserError, cli, git_revision, write_json
from tinytlm.data import mask_generator, mask_tokens
from tinytlm.members import load_members
from tinytlm.model import BertConfig, BertForClassification, BertForMLM
from tinytlm.train import add_dataclass_args, autocast, dataclass_from_args, make_optimizer, prepare_model, resolve_device

GOALS = (("bert1", 5, 3.0), ("bert6", 5, 1.5))  # (model, K, stacked / one-by-one speed-up goal on a GPU)
LATENCY_GOAL = 0.5  # committee stacked batch-1 latency / the single model's, goal on a GPU


@dataclass
class MembersConfig:
    models: str = "tiny,bert1,bert6"  # BertConfig presets trained, comma-separated, in this order
    members: tuple = (1, 2, 5)  # K: members per stack
    batch_size: int = 0  # sequences per member per step; 0 = auto: 32 on a GPU, 4 on a CPU
    seq_len: int = 128  # T, tokens per sequence
    per_row: int = 32  # sparse MLM head slots per row (static shapes); masks capped at this many
    warmup: int = 0  # untimed steps per path (>= 1); 0 = auto: 3 on a GPU, 1 on a CPU
    steps: int = 0  # timed steps per path; 0 = auto: 10 on a GPU; on a CPU 3 (tiny), 2 (bert1), 1 (others)
    committee: str = "bert1"  # latency: preset of the committee's members
    committee_size: int = 5  # latency: members of the committee
    single: str = "bert6"  # latency: the single model the committee is compared with
    n_labels: int = 4  # latency: classifier outputs (AG News)
    latency_runs: int = 0  # timed batch-1 calls (median reported); 0 = auto: 100 on a GPU, 10 on a CPU
    memory_gb: float = 80.0  # device memory the largest K is computed for, GB (1e9 bytes)
    compile: bool = False  # torch.compile both paths (default mode)
    kernels: str = "torch"  # attention implementation: torch | triton
    time_limit: float = -1.0  # seconds: no training case starts after this (the first always runs); < 0: none
    lr: float = 5.5e-5  # AdamW learning rate (the paper's); weight decay 0.01
    seed: int = 0  # weights, token data and masks
    device: str = "auto"  # auto | cuda | cpu
    smoke: bool = False  # shrunk models (bench/common.py: smoke_config), B 2, T 32: proves the code runs
    out: str = ""  # markdown report; default bench/results/<date>-<device>-members.md (none with --smoke)
    json: str = ""  # machine-readable results; none by default


def parse_config(argv) -> tuple:
    """(config with the auto values (0) resolved for its device, the device)."""
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_dataclass_args(ap, MembersConfig)
    bc = dataclass_from_args(MembersConfig, ap.parse_args(argv))
    device = resolve_device(bc.device)
    gpu = device.type == "cuda"
    if bc.smoke:
        bc.seq_len, bc.per_row = min(bc.seq_len, 32), min(bc.per_row, 8)
    bc.batch_size = bc.batch_size or (2 if bc.smoke else 32 if gpu else 4)
    bc.warmup = bc.warmup or (3 if gpu else 1)
    bc.latency_runs = bc.latency_runs or (2 if bc.smoke else 100 if gpu else 10)
    for name in [*bc.models.split(","), bc.committee, bc.single]:
        BertConfig.preset(name)  # raises on an unknown preset
    if min(bc.members) < 1 or min(bc.committee_size, bc.batch_size, bc.warmup) < 1 or bc.steps < 0 \
            or not 0 < bc.per_row <= bc.seq_len or bc.memory_gb <= 0:
        raise UserError("need members, committee_size, batch_size, warmup >= 1, steps >= 0, "
                        "0 < per_row <= seq_len, memory_gb > 0")
    return bc, device


def steps_for(bc: MembersConfig, model: str, device) -> int:
    if bc.steps or bc.smoke:
        return bc.steps or 1
    return 10 if device.type == "cuda" else {"tiny": 3, "bert1": 2}.get(model, 1)


def config_for(bc: MembersConfig, model: str) -> BertConfig:
    cfg = BertConfig.preset(model)
    return smoke_config(cfg) if bc.smoke else cfg


# -----------------------------------------------------------------------------
# training: stacked vs one by one

def make_batches(cfg, rows: int, bc, device, n: int = 2) -> list:
    """n batches of (inputs, attention_mask, targets), each (rows, T), on the device."""
    gen = torch.Generator().manual_seed(bc.seed)
    out = []
    for i in range(n):
        x = token_batch(rows, bc.seq_len, gen)  # (rows, T)
        inputs, targets = mask_tokens(x, mask_generator(torch.device("cpu"), bc.seed, i), vocab_size=cfg.vocab_size,
                                      mask_id=MASK, special_ids=(PAD, CLS, SEP), cap=bc.per_row)
        out.append(tuple(t.to(device) for t in (inputs, (x != PAD).long(), targets)))
    return out


def state_bytes(model) -> int:
    """Weights + grads + AdamW's two moments: 4 copies of the parameters (fp32)."""
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters())


def train_step(model, opt, x, am, y, bc, device):
    with autocast(device):
        _, loss = model(x, am, y, per_row=bc.per_row)  # loss: a scalar, or the K members' losses (K,)
    loss.sum().backward()  # members are uncoupled: each gets its own loss's gradient
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed_ms(fn, device) -> float:
    """Wall time of one call, synchronised before and after (CUDA kernels are asynchronous)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def interleaved_ms(fns: dict, n: int, device) -> dict:
    """Median ms per call of each fn over n rounds; a round calls every fn once, the order rotating, so a
    load that comes and goes (a shared CPU) falls on every path alike."""
    names, times = list(fns), {k: [] for k in fns}
    for i in range(n):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(timed_ms(fns[name], device))
    return {k: statistics.median(v) for k, v in times.items()}


def peak_since_reset(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def train_case(model_name: str, K: int, bc, device) -> dict:
    cfg, B = config_for(bc, model_name), bc.batch_size
    warmup, steps = bc.warmup, steps_for(bc, model_name, device)
    batches = make_batches(cfg, K * B, bc, device)  # member k's rows: k*B .. k*B+B-1
    torch._dynamo.reset()
    torch.manual_seed(bc.seed)
    with torch.device(device):  # initialised where they run (a bert6 init on the CPU takes seconds)
        raws = [BertForMLM(cfg) for _ in range(K)]
    singles = [prepare_model(m, device, bc.kernels, bc.compile).train() for m in raws]
    opts = [make_optimizer(m, bc.lr, 0.01, device) for m in raws]
    count = {"seq": 0, "stk": 0}

    def one_by_one():  # K single steps, one per member on its B rows
        x, am, y = batches[count["seq"] % len(batches)]
        count["seq"] += 1
        for k, (m, opt) in enumerate(zip(singles, opts)):
            rows = slice(k * B, (k + 1) * B)
            train_step(m, opt, x[rows], am[rows], y[rows], bc, device)

    # warm-up of each path alone: its CUDA peak (the first step allocates AdamW's state, compiles)
    free_memory(device)  # resets the CUDA peak to what is resident: the singles and the batches
    for _ in range(warmup):
        one_by_one()
    seq_peak = peak_since_reset(device)
    fns = {"seq": one_by_one}
    stk_peak = seq_peak
    if K > 1:  # K = 1: BertForMLM(cfg, members=1) is this very model, one measurement
        singles_bytes = torch.cuda.memory_allocated(device) - sum(t.nbytes for b in batches for t in b) \
            if device.type == "cuda" else 0
        with torch.device(device):
            raw = BertForMLM(cfg, members=K)
        load_members(raw, [m.state_dict() for m in raws])  # the same K models, stacked
        stacked = prepare_model(raw, device, bc.kernels, bc.compile).train()
        opt = make_optimizer(raw, bc.lr, 0.01, device)

        def stacked_step():
            train_step(stacked, opt, *batches[count["stk"] % len(batches)], bc, device)
            count["stk"] += 1

        free_memory(device)
        for _ in range(warmup):
            stacked_step()
        stk_peak = peak_since_reset(device) - singles_bytes if device.type == "cuda" else None  # singles left out
        fns["stk"] = stacked_step
    ms = interleaved_ms(fns, steps, device)  # median ms of a stacked step and of a one-by-one round
    seq_ms, stk_ms = ms["seq"], ms.get("stk", ms["seq"])
    cuda, one_bytes = device.type == "cuda", state_bytes(raws[0])
    amp = "bf16 autocast, fused AdamW" if cuda else "fp32, AdamW"
    return {"model": model_name, "K": K, "B": B, "status": "ok", "warmup": warmup, "steps": steps,
            "note": f"{amp}, sparse head {bc.per_row} slots/row" + (", compiled" * bc.compile)
            + (", K=1: one model, one measurement" if K == 1 else ""),
            "stacked_ms_per_step": stk_ms, "one_by_one_ms_per_round": seq_ms,
            "stacked_seq_per_s": B / stk_ms * 1e3, "one_by_one_seq_per_s": B / seq_ms * 1e3,
            "speedup": seq_ms / stk_ms, "memory": "measured" if cuda else "analytic",
            "stacked_bytes": stk_peak if cuda else K * one_bytes,
            "one_by_one_bytes": seq_peak if cuda else K * one_bytes}  # one by one: K models resident


def blank(model: str, K: int, B: int, status: str, note: str) -> dict:
    return {"model": model, "K": K, "B": B, "status": status, "note": note,
            **dict.fromkeys(("warmup", "steps", "stacked_ms_per_step", "one_by_one_ms_per_round", "stacked_seq_per_s",
                             "one_by_one_seq_per_s", "speedup", "memory", "stacked_bytes", "one_by_one_bytes"))}


def largest_k(rows: list, model: str, budget_gb: float):
    """The largest K whose stacked peak fits in budget_gb, from a least-squares line bytes = a + b*K through
    the measured K values; None with fewer than two."""
    ok = [r for r in rows if r["model"] == model and r["status"] == "ok"]
    pts = [(r["K"], r["stacked_bytes"]) for r in ok]
    if len({k for k, _ in pts}) < 2:
        return None
    mk, mb = sum(k for k, _ in pts) / len(pts), sum(b for _, b in pts) / len(pts)
    b = sum((k - mk) * (y - mb) for k, y in pts) / sum((k - mk) ** 2 for k, _ in pts)
    a = mb - b * mk
    measured = ok[0]["memory"] == "measured"
    how = ("linear fit of the measured CUDA peaks, an extrapolation" if measured else
           "linear fit of the analytic bytes (weights + grads + AdamW, no activations): an upper bound")
    return {"K": math.floor((budget_gb * 1e9 - a) / b) if b > 0 else None, "fixed_bytes": a,
            "bytes_per_member": b, "at_K": sorted({k for k, _ in pts}), "budget_gb": budget_gb, "from": how}


# -----------------------------------------------------------------------------
# committee latency at batch 1

def committee_latency(bc, device) -> dict:
    ccfg, scfg, n = config_for(bc, bc.committee), config_for(bc, bc.single), bc.committee_size
    torch._dynamo.reset()
    free_memory(device)
    torch.manual_seed(bc.seed)
    with torch.device(device):
        singles = [BertForClassification(ccfg, bc.n_labels) for _ in range(n)]
        stack = BertForClassification(ccfg, bc.n_labels, members=n)
        single = BertForClassification(scfg, bc.n_labels)
    load_members(stack, [m.state_dict() for m in singles])
    singles, stack, single = ([prepare_model(m.eval(), device, bc.kernels, bc.compile) for m in singles],
                              prepare_model(stack.eval(), device, bc.kernels, bc.compile),
                              prepare_model(single.eval(), device, bc.kernels, bc.compile))
    x = token_batch(1, bc.seq_len, torch.Generator().manual_seed(bc.seed)).to(device)  # (1, T), a full row
    calls = {"committee stacked": lambda: member_logits(stack, x).float().sum(0),  # (K, 1, C) -> (1, C)
             "committee one by one": lambda: sum(member_logits(m, x).float().sum(0) for m in singles),
             "single": lambda: member_logits(single, x)}
    with torch.no_grad(), autocast(device):
        diff = (calls["committee stacked"]() - calls["committee one by one"]()).abs().max().item()
        for _ in range(bc.warmup + 2):
            for fn in calls.values():
                fn()
        med = interleaved_ms(calls, bc.latency_runs, device)
    models = [f"{n} x {bc.committee}", f"{n} x {bc.committee}", bc.single]
    rows = [{"what": name, "models": m, "forwards": f, "median_ms": med[name], "vs_single": med[name] / med["single"]}
            for name, m, f in zip(calls, models, (1, n, 1))]
    return {"rows": rows, "members": n, "committee": bc.committee, "single": bc.single,
            "stacked_vs_one_by_one_max_abs_diff": diff}


# -----------------------------------------------------------------------------
# report

def md_train(r: dict) -> dict:
    def num(v, fmt=".2f", scale=1):
        return "" if v is None else format(v / scale, fmt)
    mem = "" if r["memory"] is None else f" ({r['memory']})"
    return {"model": r["model"], "K": r["K"], "B/member": r["B"], "status": r["status"],
            "stacked seq/s/member": num(r["stacked_seq_per_s"]),
            "one-by-one seq/s/member": num(r["one_by_one_seq_per_s"]),
            "speed-up": num(r["speedup"]), "stacked peak GiB": num(r["stacked_bytes"], scale=2 ** 30) + mem,
            "one-by-one peak GiB": num(r["one_by_one_bytes"], scale=2 ** 30) + mem,
            "steps": "" if r["steps"] is None else f"{r['warmup']}+{r['steps']}", "note": r["note"]}


def goal_lines(train: list, latency, device, smoke: bool) -> list:
    lines, missed = [], False

    def verdict(what: str, value, met) -> str:
        nonlocal missed
        missed |= value is not None and not met
        result = "not measured in this run" if value is None else \
            f"{value:.2f}x, {'met' if met else 'NOT met'} on this device ({device_label(device)})"
        return f"- {what} (GPU goal): {result}"

    for model, K, goal in GOALS:
        r = next((r for r in train if (r["model"], r["K"], r["status"]) == (model, K, "ok")), {})
        lines.append(verdict(f"K={K} {model} stacked >= {goal:g}x one by one", r.get("speedup"),
                             r and r["speedup"] >= goal))
    if latency:
        r = latency["rows"][0]
        lines.append(verdict(f"{latency['members']}-member {latency['committee']} committee stacked, batch-1 latency "
                             f"<= {LATENCY_GOAL:g}x one {latency['single']}", r["vs_single"],
                             r["vs_single"] <= LATENCY_GOAL))
    if missed and device.type != "cuda" and not smoke:
        lines.append("- These are GPU goals (a GPU runs one small model's kernels with most of its units idle, "
                     "which the stacked members fill); a CPU has no such idle capacity, since one model's step "
                     "already keeps every core busy, so stacking has nothing to gain there (a speed-up below 1 "
                     "means the stacked step costs more than the K single ones; this bench does not say why).")
    if smoke:
        lines.append("- (smoke run: these ratios say nothing about performance)")
    return lines


def sections(result: dict) -> list:
    train, lat, out = result["train"], result["latency"], []
    if train:
        out.append("## Training: K members stacked vs one by one\n\n"
                   "Per member: the sequences each member trains on per second (B per step); speed-up = stacked / "
                   "one by one. " + ("Peak memory: torch.cuda.max_memory_allocated of each path." if
                                     train[0]["memory"] == "measured" else
                                     "Peak memory on CPU: weights + grads + AdamW state (analytic); activation "
                                     "memory is not measured there.") + "\n\n"
                   + markdown_table(list(md_train(train[0])), [md_train(r) for r in train]))
    fits = [f"- {m}: largest K in {f['budget_gb']:g} GB: {f['K']} ({f['from']}; K = {', '.join(map(str, f['at_K']))}: "
            f"{f['fixed_bytes'] / 1e9:.2f} GB + {f['bytes_per_member'] / 1e9:.2f} GB per member)"
            for m, f in result["max_members"].items() if f]
    if fits:
        out.append("## Largest K in device memory\n\n" + "\n".join(fits))
    if lat:
        rows = [{"what": r["what"], "models": r["models"], "forwards": r["forwards"],
                 "median ms": f"{r['median_ms']:.2f}", "/ single": f"{r['vs_single']:.2f}"} for r in lat["rows"]]
        out.append("## Committee batch-1 latency\n\nBertForClassification, eval, no_grad, autocast, batch 1; "
                   f"stacked vs one by one logits max abs diff {lat['stacked_vs_one_by_one_max_abs_diff']:.1e}.\n\n"
                   + markdown_table(list(rows[0]), rows))
    if result["goals"]:
        out.append("## Goals\n\n" + "\n".join(result["goals"]))
    return out


# -----------------------------------------------------------------------------
# run

def main(argv=None):
    t_start = time.perf_counter()
    bc, device = parse_config(argv)
    header = run_header(device, asdict(bc))
    if bc.smoke:
        header.insert(0, "- **SMOKE RUN: shrunk models on whatever device; not a performance number**")
    if device.type == "cpu":  # a shared CPU: other processes slow both paths alike, but say so
        header.append("- load average (1, 5, 15 min) at the start: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    print("\n".join(header))
    path = result_path("members", device, bc.out, bc.smoke)
    title = "Stacked members" + (" (smoke run, not a performance number)" if bc.smoke else "")
    result = {"device": device_label(device), "date": utc_now(), "git": git_revision(), "versions": versions(),
              "smoke": bc.smoke, "complete": False, "config": asdict(bc), "train": [], "max_members": {},
              "latency": None, "goals": []}

    def save():
        result["max_members"] = {m: largest_k(result["train"], m, bc.memory_gb) for m in bc.models.split(",")}
        write_report(path, title, header, sections(result))
        if bc.json:
            write_json(bc.json, result)

    save()
    try:
        result["latency"] = committee_latency(bc, device)
        for r in result["latency"]["rows"]:
            print(f"latency {r['what']} ({r['models']}): {r['median_ms']:.2f} ms, {r['vs_single']:.2f}x single")
    except Exception as err:  # the training cases still run
        traceback.print_exc()
        print(f"latency: {error_note(err)}")
    save()
    ran = False
    for model in bc.models.split(","):
        for K in bc.members:
            elapsed = time.perf_counter() - t_start
            if ran and 0 <= bc.time_limit <= elapsed:
                rec = blank(model, K, bc.batch_size, "skipped",
                            f"skipped: time limit ({elapsed:.0f} s >= {bc.time_limit:g} s)")
            else:
                try:
                    rec = train_case(model, K, bc, device)
                except Exception as err:  # one failing case must not lose the others
                    traceback.print_exc()
                    rec = blank(model, K, bc.batch_size, "failed", error_note(err))
                ran = True
            result["train"].append(rec)
            print(" | ".join(f"{k}={v}" for k, v in md_train(rec).items() if v != ""), flush=True)
            save()
    result["goals"] = goal_lines(result["train"], result["latency"], device, bc.smoke)
    if device.type == "cpu":
        header.append("- load average (1, 5, 15 min) at the end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    result["complete"] = True
    save()
    print("\n".join(result["goals"]))
    print(f"done in {time.perf_counter() - t_start:.0f} s" + (f"; wrote {path}" if path else ""))
    return result


if __name__ == "__main__":
    cli(main)
