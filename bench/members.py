"""Stacked members: K models of one shape trained as one stacked model vs one after another, and the
batch-1 latency of a committee run stacked (bench/README.md, "Stacked members").

    PYTHONPATH=. python bench/members.py                      # on a GPU: tiny, bert1, bert6 x K 1, 2, 5
    PYTHONPATH=. python bench/members.py --models bert1 --members 1,5 --compile --json m.json
    PYTHONPATH=. python bench/members.py --device cpu         # CPU defaults: 8 minutes on a shared 2-core machine
    PYTHONPATH=. python bench/members.py --smoke              # shrunk models: proves it runs, numbers mean nothing

Training: the same K BertForMLM on the same rows, stacked (one BertForMLM(cfg, members=K), K*B rows, member
k's rows k*B .. k*B+B-1) and one by one (K single models, each with its AdamW, K steps of B rows): bf16
autocast on CUDA (fp32 on CPU), fused AdamW, --head (default: the device's rule), sparse MLM head on --per_row
static slots; on a CPU freed memory kept (tinytlm/cpu_memory.py), as a training run does. After --warmup
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
import os
import time
import traceback
from dataclasses import asdict, dataclass

import torch

from bench.committee_latency import committee_latency
from bench.common import (CLS, MASK, PAD, SEP, autocast, device_label, error_note, free_memory, interleaved_ms,
                          result_path, run_header, smoke_config, token_batch, utc_now, versions, write_report)
from bench.members_report import goal_lines, largest_k, md_train, sections
from tinytlm.common import ArgParser, UserError, cli, git_revision, write_json
from tinytlm.config import compile_option
from tinytlm.data import mask_generator, mask_tokens
from tinytlm.cpu_memory import keep_freed_memory
from tinytlm.kernel_path import Impl, default_head
from tinytlm.members import load_members
from tinytlm.mlm_rows import mlm_rows
from tinytlm.model import BertConfig, BertForMLM
from tinytlm.train import (add_dataclass_args, dataclass_from_args, make_optimizer, prepare_model,
                           resolve_device)


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
    threads: int = 0  # CPU threads (torch.set_num_threads); 0: torch's default
    keep_memory: bool = True  # CPU: keep freed memory in the process (tinytlm/cpu_memory.py), as a training run
    head: str = "auto"  # MLM head (tinytlm/kernel_path.py): plain | chunked | auto (default_head of the device)
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
    bc.head = default_head(device) if bc.head == "auto" else bc.head
    if bc.threads > 0:
        torch.set_num_threads(bc.threads)
    if device.type == "cpu" and bc.keep_memory:
        keep_freed_memory()  # as a training run does (tinytlm/session.py open_device)
    Impl(head=bc.head)  # raises on an unknown head
    if bc.smoke:
        bc.seq_len, bc.per_row = min(bc.seq_len, 32), min(bc.per_row, 8)
    bc.batch_size = bc.batch_size or (2 if bc.smoke else 32 if gpu else 4)
    bc.warmup = bc.warmup or (3 if gpu else 1)
    bc.latency_runs = bc.latency_runs or (2 if bc.smoke else 100 if gpu else 10)
    for name in [*bc.models.split(","), bc.committee, bc.single]:
        BertConfig.preset(name)  # raises on an unknown preset
    if min(bc.members) < 1 or min(bc.committee_size, bc.batch_size, bc.warmup) < 1 or min(bc.steps, bc.threads) < 0 \
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
    rows, y = mlm_rows(y, bc.per_row, getattr(model, "members", 1))  # the sparse head's static slots
    with autocast(device):
        _, loss = model(x, am, y, rows=rows)  # loss: a scalar, or the K members' losses (K,)
    loss.sum().backward()  # members are uncoupled: each gets its own loss's gradient
    opt.step()
    opt.zero_grad(set_to_none=True)


def peak_since_reset(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def train_case(model_name: str, K: int, bc, device) -> dict:
    cfg, B = config_for(bc, model_name), bc.batch_size
    warmup, steps = bc.warmup, steps_for(bc, model_name, device)
    batches = make_batches(cfg, K * B, bc, device)  # member k's rows: k*B .. k*B+B-1
    torch._dynamo.reset()
    torch.manual_seed(bc.seed)
    with torch.device(device):  # initialised where they run (a bert6 init on the CPU takes seconds)
        raws = [BertForMLM(cfg, impl=Impl(bc.kernels, head=bc.head)) for _ in range(K)]
    singles = [prepare_model(m, device, compile_option(bc.compile)).train() for m in raws]
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
            raw = BertForMLM(cfg, members=K, impl=Impl(bc.kernels, head=bc.head))
        load_members(raw, [m.state_dict() for m in raws])  # the same K models, stacked
        stacked = prepare_model(raw, device, compile_option(bc.compile)).train()
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
    amp = "bf16 autocast, fused AdamW" if cuda else "fp32, fused AdamW" + ", freed memory kept" * bc.keep_memory
    return {"model": model_name, "K": K, "B": B, "status": "ok", "warmup": warmup, "steps": steps,
            "note": f"{amp}, sparse head {bc.per_row} slots/row, {bc.head} head" + (", compiled" * bc.compile)
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
        result["latency"] = committee_latency(config_for(bc, bc.committee), config_for(bc, bc.single), bc, device)
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
