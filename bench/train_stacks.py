"""The training steps bench/train_throughput.py times: one per stack, on the same batches of real Wikipedia rows.

A stack is Hugging Face's BertForMaskedLM as the paper trains it ("hf"), or one of train_mlm.py's paths, named by
what it switches on (its flags in `flags`):

    eager          BertForMLM, bf16 autocast, fused AdamW, sparse head on the chosen positions    (defaults)
    compiled       + torch.compile (default mode)                                            --compile on
    triton         compiled + the Triton kernels                               --compile on --kernels triton
    graphs         torch.compile "reduce-overhead" (CUDA graphs), sparse head on --per_row static slots per row
                                                                  --compile reduce-overhead --mask_cap K
    graphs+triton  graphs + the Triton kernels                                            ... --kernels triton
    S+unpad        stack S on the packed real tokens (tinytlm/unpad.py)                               --unpad

Batches: the first rows of the prepared Wikipedia shard (pre-training's rows, in its order), masked as train_mlm.py
masks them (Bernoulli 15%, capped at K per row for the graphs stacks), made once per (model, batch, cap) and
shared by every stack, so each one times the same work.
"""
import contextlib
from pathlib import Path

import torch

from bench.common import CLS, MASK, PAD, SEP, autocast, check_matmul_params, import_transformers
from tinytlm.common import UserError
from tinytlm.config import compile_option
from tinytlm.data import mask_generator, mask_tokens
from tinytlm.hf import hf_config
from tinytlm.kernel_path import Impl
from tinytlm.mlm_rows import mlm_rows
from tinytlm.model import BertConfig, BertForMLM
from tinytlm.train import make_optimizer, prepare_model
from tinytlm.wikipedia import ensure_wiki

STACKS = ("hf", "eager", "compiled", "triton", "graphs", "graphs+triton")  # each but hf also as S+unpad


def stack_path(stack: str, per_row: int):
    """train_mlm.py's settings for a stack (None for hf): compile, compile_mode, kernels, mask_cap[, unpad]."""
    if stack == "hf":
        return None
    graphs = stack.startswith("graphs")
    return {"compile": not stack.startswith("eager"), "compile_mode": "reduce-overhead" if graphs else "default",
            "kernels": "triton" if "triton" in stack else "torch", "mask_cap": per_row if graphs else 0,
            **({"unpad": True} if stack.endswith("+unpad") else {})}


def flags(path) -> str:
    """The train_mlm.py flags of a path (the report's 'flags' column)."""
    if path is None:
        return "(Hugging Face)"
    cap = path["mask_cap"]
    f = [f"--compile {compile_option(path['compile'], path['compile_mode'])}"] * path["compile"]
    f += ["--kernels triton"] * (path["kernels"] == "triton") + [f"--mask_cap {cap}"] * bool(cap)
    return " ".join(f + ["--unpad"] * path.get("unpad", False)) or "(defaults)"


# -----------------------------------------------------------------------------
# data

def wiki_rows(n: int, seq_len: int, data: str) -> torch.Tensor:
    """(n, seq_len) int64: the first n rows of the prepared Wikipedia shard (pre-training's rows, in its order),
    repeated if it holds fewer and no raw data is there to prepare more (a smoke session's shard)."""
    root = Path(data) if data else None
    try:
        shard = ensure_wiki(n, None, root, quiet=True)
    except UserError:
        shard = ensure_wiki(0, None, root, quiet=True)  # whatever is prepared
    rows = torch.from_numpy(shard.ids[:n, :seq_len].astype("int64"))
    return rows.repeat(-(-n // len(rows)), 1)[:n]


def make_batches(cfg: BertConfig, B: int, bc, device, cap: int, n: int = 4) -> list:
    """n batches of (inputs, attention_mask, targets) on the device: rows 0 .. n*B-1 of Wikipedia, the same
    for every stack, as are the masks' random draws; cap > 0 keeps at most `cap` of the choices per row.
    bc: the benchmark's config (seq_len, data, seed)."""
    rows, out = wiki_rows(n * B, bc.seq_len, bc.data), []
    for i in range(n):
        x = rows[i * B:(i + 1) * B].to(device)
        inputs, targets = mask_tokens(x, mask_generator(device, bc.seed, i), vocab_size=cfg.vocab_size, mask_id=MASK,
                                      special_ids=(PAD, CLS, SEP), cap=cap)
        out.append((inputs, (x != PAD).long(), targets))  # (B, T) each
    return out


# -----------------------------------------------------------------------------
# stacks: each returns (step(i), note)

def hf_stack(cfg, batches, bc, device, path, precision="fp32"):
    """transformers.BertForMaskedLM as the paper's code trains it: SDPA attention, fp16 autocast + GradScaler on
    CUDA, the dense head over all B*T positions with labels, AdamW (foreach). On CPU: fp32, or bf16 autocast with
    precision "bf16" (bench/cpu.py)."""
    transformers = import_transformers()
    if cfg.n_conv:
        raise NotImplementedError("n/a: a conv stem has no Hugging Face equivalent")
    hcfg = transformers.BertConfig(**hf_config(cfg), attn_implementation="sdpa")
    model = transformers.BertForMaskedLM(hcfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=bc.lr, weight_decay=0.01)  # foreach on CUDA by default
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    cpu_bf16 = not cuda and precision == "bf16"
    amp = torch.autocast("cuda", dtype=torch.float16) if cuda else \
        torch.autocast("cpu", dtype=torch.bfloat16) if cpu_bf16 else contextlib.nullcontext()

    def step(i):
        x, am, y = batches[i % len(batches)]
        with amp:
            loss = model(input_ids=x, attention_mask=am, labels=y).loss  # dense head over (B, T, V)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    amp_note = "fp16 autocast + GradScaler" if cuda else "bf16 autocast (CPU)" if cpu_bf16 else "fp32 (CPU)"
    return step, f"attn {model.config._attn_implementation}, {amp_note}, dense head, AdamW foreach"


def tinytlm_stack(cfg, batches, bc, device, path):
    """train_mlm.py's step for this path: prepare_model (kernels, torch.compile), AdamW, sparse head."""
    model = BertForMLM(cfg, impl=Impl(path["kernels"], path.get("unpad", False)))
    check_matmul_params(model)  # the FLOP formula describes this model
    raw = model
    model = prepare_model(model, device, compile_option(path["compile"], path["compile_mode"])).train()
    opt = make_optimizer(raw, bc.lr, 0.01, device)  # fused AdamW on CUDA
    graphs, slots = path["compile_mode"] == "reduce-overhead", path["mask_cap"]

    def step(i):
        x, am, y = batches[i % len(batches)]
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be reused
        rows, y = mlm_rows(y, slots)  # the sparse head's rows: B * slots (static), or the n chosen if 0
        with autocast(device):
            _, loss = model(x, am, y, rows=rows)  # sparse head on (B * slots, V), or (n chosen, V)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    amp_note = "bf16 autocast, fused AdamW" if device.type == "cuda" else "fp32 (CPU), AdamW"
    head = f"sparse head {slots} static slots/row" if slots else "sparse head on the chosen (dynamic)"
    return step, f"{amp_note}, {head}, kernels {path['kernels']}" + (", unpadded" if path.get("unpad") else "")
