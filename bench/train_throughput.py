"""MLM pre-training throughput and MFU: Hugging Face BERT vs tinytlm (eager, compiled, compiled + Triton).

    PYTHONPATH=. python bench/train_throughput.py                       # the full table on a GPU
    PYTHONPATH=. python bench/train_throughput.py --models bert6 --batch 32 --stacks hf,compiled
    PYTHONPATH=. python bench/train_throughput.py --compile_modes default,max-autotune-no-cudagraphs,reduce-overhead
    PYTHONPATH=. python bench/train_throughput.py --smoke               # CPU sanity check, not a performance number

One training step = forward, backward, AdamW step, zero_grad, on the same synthetic batches for
every stack (bench/common.py: token_batch, ids in [1000, 30000), every 4th row padded; masks from
tinytlm.data.mask_tokens with exactly --per_row chosen tokens per full row, made before timing).
Stacks:
  hf        transformers.BertForMaskedLM (config from tinytlm.hf.hf_config, attn_implementation
            "sdpa"), fp16 autocast + GradScaler, dense MLM head with labels, torch AdamW (foreach):
            the paper's stack. Models with a conv stem have no HF equivalent (row says n/a).
  eager     tinytlm BertForMLM, bf16 autocast, fused AdamW, sparse head on B x per_row slots.
  compiled  the same under torch.compile(dynamic=False), one row per --compile_modes entry.
  triton    compiled (first mode) + set_kernels(model, "triton"); an error is recorded, not raised.

FLOPs per step (bench/common.py: train_flops), forward + backward = 3 x forward:
  6 * matmul_params * B*T  +  12 * n_layer * T^2 * H * B  +  6 * (H^2 + H*V) * n_masked
  +  3 * B * sum over stem convs of 2 * kh * kw * c_in * c_out * T * H
where matmul_params = n_layer * (4 + 2 * ffn_mult) * H^2. The same useful FLOPs for every stack,
so HF's dense head (all B*T positions) lowers its MFU. MFU = TFLOP/s / --peak_tflops; the default
790 is the bf16 matmul rate measured on this workplace's H100/H200 (8192^3 on random data,
769-798 TFLOP/s), not the 989 datasheet figure. Timing: --warmup calls (the first, which compiles,
is reported on its own), then --steps calls between two torch.cuda.synchronize.
Writes bench/results/<date>-<device>-train.md (rewritten after every row); --smoke writes only with --out.
"""
import contextlib
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file or with PYTHONPATH=.

import torch  # noqa: E402

from bench.common import (MASK, PAD, CLS, SEP, check_matmul_params, free_memory, markdown_table,  # noqa: E402
                          mean_step_ms, peak_memory_gib, result_path, run_header, smoke_config, token_batch,
                          train_flops, write_report)
from tinytlm.common import ArgParser, UserError, cli  # noqa: E402
from tinytlm.data import mask_generator, mask_tokens  # noqa: E402
from tinytlm.hf import hf_config  # noqa: E402
from tinytlm.model import BertConfig, BertForMLM  # noqa: E402
from tinytlm.train import add_dataclass_args, autocast, dataclass_from_args, make_optimizer, prepare_model, \
    resolve_device  # noqa: E402

STACKS = ("hf", "eager", "compiled", "triton")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")


# -----------------------------------------------------------------------------
# config

@dataclass
class BenchConfig:
    models: str = "bert6,bert1,bert1-cl2-d64-3x3-h12"  # BertConfig presets, comma-separated
    batch: tuple = (32, 256)  # batch sizes (sequences per step)
    seq_len: int = 128  # T, tokens per sequence
    stacks: str = "hf,eager,compiled,triton"  # which of hf, eager, compiled, triton
    compile_modes: str = "default"  # torch.compile modes for 'compiled', comma-separated
    per_row: int = 20  # masked tokens per full row; also the static sparse-head slots per row
    warmup: int = 5  # untimed steps (the first one, which compiles, is timed alone)
    steps: int = 20  # timed steps
    peak_tflops: float = 790.0  # MFU denominator, TFLOP/s (measured bf16 matmul, H100/H200 here)
    lr: float = 5.5e-5  # AdamW learning rate (the paper's); weight decay 0.01
    seed: int = 0  # token data and masks
    device: str = "auto"  # auto | cuda | cpu
    smoke: bool = False  # tiny shapes, 2 timed steps: proves the code runs, not a performance number
    out: str = ""  # result file; default bench/results/<date>-<device>-train.md (none with --smoke)


def parse_config(argv=None) -> BenchConfig:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_dataclass_args(ap, BenchConfig)
    bc = dataclass_from_args(BenchConfig, ap.parse_args(argv))
    if bc.smoke:  # shapes a 2-core CPU runs in seconds; configs shrunk by smoke_config
        bc.batch, bc.seq_len, bc.warmup, bc.steps = (2,), 32, 1, 2
    for s in bc.stacks.split(","):
        if s not in STACKS:
            raise UserError(f"--stacks: unknown stack {s!r}; valid: {', '.join(STACKS)}")
    for m in bc.compile_modes.split(","):
        if m not in COMPILE_MODES:
            raise UserError(f"--compile_modes: unknown mode {m!r}; valid: {', '.join(COMPILE_MODES)}")
    if not 0 < bc.per_row <= bc.seq_len or bc.warmup < 1 or bc.steps < 1:
        raise UserError("need 0 < per_row <= seq_len, warmup >= 1, steps >= 1")
    return bc


# -----------------------------------------------------------------------------
# data

def make_batches(cfg: BertConfig, B: int, bc: BenchConfig, device, n: int = 4) -> list:
    """n batches of (inputs, attention_mask, targets) on the device, the same for every stack."""
    gen = torch.Generator().manual_seed(bc.seed * 1000 + B)
    out = []
    for i in range(n):
        x = token_batch(B, bc.seq_len, gen).to(device)
        inputs, targets = mask_tokens(x, mask_generator(device, bc.seed, i), vocab_size=cfg.vocab_size, mask_id=MASK,
                                      special_ids=(PAD, CLS, SEP), per_row=bc.per_row)
        out.append((inputs, (x != PAD).long(), targets))  # (B, T) each
    return out


# -----------------------------------------------------------------------------
# stacks: each returns (step(i), note)

def hf_stack(cfg, batches, bc, device):
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


def tinytlm_stack(cfg, batches, bc, device, kernels="torch", mode=None):
    model = BertForMLM(cfg)
    check_matmul_params(model)  # the FLOP formula describes this model
    model = prepare_model(model, device, kernels, compile=False).train()
    opt = make_optimizer(model, bc.lr, 0.01, device)  # fused AdamW on CUDA
    if mode is not None:  # dynamic=False: one graph per case, no recompile to a dynamic batch size
        torch._dynamo.reset()  # else a dozen cases of one forward() pass the recompile limit and run eager
        model = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)
    graphs = mode == "reduce-overhead"

    def step(i):
        x, am, y = batches[i % len(batches)]
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be reused
        with autocast(device):
            _, loss = model(x, am, y, per_row=bc.per_row)  # sparse head on (B * per_row, V)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    amp_note = "bf16 autocast, fused AdamW" if device.type == "cuda" else "fp32 (CPU), AdamW"
    return step, f"{amp_note}, sparse head {bc.per_row}/row, kernels {kernels}"


def stack_cases(bc: BenchConfig):
    """(label, builder(cfg, batches, bc, device)) for every requested stack and compile mode."""
    modes = bc.compile_modes.split(",")
    for s in bc.stacks.split(","):
        if s == "hf":
            yield "HF BertForMaskedLM", hf_stack
        elif s == "eager":
            yield "tinytlm eager", tinytlm_stack
        elif s == "compiled":
            for m in modes:
                yield f"tinytlm compiled ({m})", lambda *a, m=m: tinytlm_stack(*a, mode=m)
        else:
            yield f"tinytlm compiled ({modes[0]}) + triton", lambda *a: tinytlm_stack(*a, kernels="triton", mode=modes[0])


# -----------------------------------------------------------------------------
# run

def run_case(label, build, name, cfg, B, batches, bc, device) -> dict:
    n_masked = sum(int((y != -100).sum()) for _, _, y in batches) / len(batches)
    flops = train_flops(cfg, B, bc.seq_len, round(n_masked))
    row = {"model": name, "B": B, "stack": label, "GFLOP/step": f"{flops / 1e9:.1f}"}
    if "triton" in label and device.type != "cuda":
        return {**row, "note": "skipped: Triton kernels need CUDA (tests cover them with TRITON_INTERPRET=1)"}
    free_memory(device)
    try:
        step, note = build(cfg, batches, bc, device)
        first_s, ms = mean_step_ms(step, bc.warmup, bc.steps, device)
        mem = peak_memory_gib(device)  # model + AdamW state + activations of this case alone
    except NotImplementedError as e:
        return {**row, "note": str(e)}
    except Exception as e:  # one failing stack must not lose the others
        traceback.print_exc()
        msg = " ".join(str(e).split())[:160].replace("|", "/")
        return {**row, "note": f"FAILED: {type(e).__name__}: {msg}"}
    tflops = flops / (ms / 1e3) / 1e12
    return {**row, "ms/step": f"{ms:.2f}", "seq/s": f"{B / ms * 1e3:.0f}", "TFLOP/s": f"{tflops:.1f}",
            "MFU": f"{100 * tflops / bc.peak_tflops:.1f}%", "peak GiB": f"{mem:.2f}" if mem is not None else "n/a",
            "1st step s": f"{first_s:.1f}", "note": note, "_seq_s": B / ms * 1e3, "_mfu": tflops / bc.peak_tflops}


def summary(rows, bc) -> list:
    """The two goals: tinytlm-best / HF on bert6 at the smallest batch (>= 5x); MFU at the largest (>= 45%)."""
    def best(model, B, prefix):
        timed = [r for r in rows if r["model"] == model and r["B"] == B and r["stack"].startswith(prefix) and "_seq_s" in r]
        return max(timed, key=lambda r: r["_seq_s"]) if timed else None

    lines, b_lo, b_hi = [], min(bc.batch), max(bc.batch)
    ours, hf = best("bert6", b_lo, "tinytlm"), best("bert6", b_lo, "HF")
    if ours and hf:
        lines.append(f"- bert6, B={b_lo}: tinytlm best ({ours['stack']}) / HF = "
                     f"{ours['_seq_s'] / hf['_seq_s']:.2f}x in seq/s (goal >= 5x)")
    for model in dict.fromkeys(r["model"] for r in rows):
        r = best(model, b_hi, "tinytlm")
        if r:
            lines.append(f"- {model}, B={b_hi}: best tinytlm MFU {100 * r['_mfu']:.1f}% ({r['stack']}; goal >= 45%)")
    return lines


def main(argv=None):
    bc = parse_config(argv)
    device = resolve_device(bc.device)
    torch.manual_seed(bc.seed)
    header = run_header(device, asdict(bc))
    header.append(f"- peak for MFU: {bc.peak_tflops:g} TFLOP/s (--peak_tflops; default = measured bf16 matmul on "
                  "this workplace's H100/H200, 769-798 TFLOP/s; the datasheet's dense bf16 is 989)")
    if bc.smoke:
        header.insert(0, "- **SMOKE RUN: tiny shapes on whatever device; not a performance number**")
    print("\n".join(header))
    path = result_path("train", device, bc.out, bc.smoke)
    title = "MLM training throughput" + (" (smoke run, not a performance number)" if bc.smoke else "")
    columns = ["model", "B", "stack", "ms/step", "seq/s", "TFLOP/s", "MFU", "peak GiB", "1st step s", "GFLOP/step", "note"]
    rows = []
    for name in bc.models.split(","):
        cfg = BertConfig.preset(name)
        if bc.smoke:
            cfg = smoke_config(cfg)
        for B in bc.batch:
            batches = make_batches(cfg, B, bc, device)
            for label, build in stack_cases(bc):
                row = run_case(label, build, name, cfg, B, batches, bc, device)
                rows.append(row)
                print(" | ".join(f"{c}={row[c]}" for c in columns if c in row), flush=True)
                write_report(path, title, header, [markdown_table(columns, rows)])
    lines = summary(rows, bc)
    if bc.smoke:
        lines.append("- (smoke run: these ratios say nothing about performance)")
    print("\n".join(lines))
    write_report(path, title, header, [markdown_table(columns, rows), "## Goals\n\n" + "\n".join(lines)])
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    cli(main)
