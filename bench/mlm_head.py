"""The MLM head's implementations (tinytlm/kernel_path.py Impl.head) in a whole training step: plain (the full
N x 30,522 logits) vs chunked (kernels/linear_ce.py), the same model, weights and batch, one model or K stacked.

    PYTHONPATH=. python bench/mlm_head.py --device cpu                               # tiny B 16, 128; bert1 B 16
    PYTHONPATH=. python bench/mlm_head.py --device cpu --cases tiny:16,tiny:128 --members 5 --chunks 128,512
    PYTHONPATH=. python bench/mlm_head.py --device cpu --threads 1 --cases tiny:128 --bf16  # under bf16 autocast
    PYTHONPATH=. python bench/mlm_head.py --smoke                                    # shrunk: proves it runs

Per case (preset:batch per member): a forward (the sparse head on --per_row static slots, as `--mask_cap`),
backward and AdamW step, --warmup untimed steps of each path, then --steps rounds calling every path once
in rotating order (bench/common.py interleaved_ms: a passing load on a shared machine falls on all);
medians, sequences per second per member. Prints one line per case; writes nothing.
"""
from dataclasses import dataclass

import torch

from bench.common import interleaved_ms
from bench.members import MembersConfig, config_for, make_batches, train_step
from tinytlm.common import ArgParser, UserError, cli
from tinytlm.cpu_memory import keep_freed_memory
from tinytlm.kernel_path import Impl
from tinytlm.members import load_members
from tinytlm.model import BertForMLM
from tinytlm.train import add_dataclass_args, dataclass_from_args, make_optimizer, resolve_device


@dataclass
class HeadConfig:
    cases: str = "tiny:16,tiny:128,bert1:16"  # preset:sequences per member per step, comma-separated
    members: int = 1  # K stacked members per model
    chunks: str = "1024"  # the chunked head's rows per chunk, comma-separated (one path each)
    per_row: int = 20  # sparse head slots per row (masks capped at this many)
    warmup: int = 1  # untimed steps per path
    steps: int = 3  # timed rounds
    bf16: bool = False  # every step under torch.autocast(device, bfloat16)
    threads: int = 0  # CPU threads (torch.set_num_threads); 0: torch's default
    device: str = "auto"  # auto | cuda | cpu
    smoke: bool = False  # shrunk models, T 32


def case(name: str, B: int, hc: HeadConfig, device) -> dict:
    """{path: median ms per step} for one preset and batch."""
    bc = MembersConfig(models=name, batch_size=B, per_row=hc.per_row, smoke=hc.smoke, seq_len=32 if hc.smoke else 128)
    bc.per_row = min(bc.per_row, bc.seq_len)
    cfg, K = config_for(bc, name), hc.members
    impls = {"plain": Impl()} | {f"chunked {c}": Impl(head="chunked", head_chunk=int(c)) for c in hc.chunks.split(",")}
    torch.manual_seed(0)
    with torch.device(device):
        singles = [BertForMLM(cfg) for _ in range(K)]
        models = {p: BertForMLM(cfg, members=K, impl=i).train() for p, i in impls.items()}
    for m in models.values():
        load_members(m, [s.state_dict() for s in singles]) if K > 1 else m.load_state_dict(singles[0].state_dict())
    opts = {p: make_optimizer(m, bc.lr, 0.01, device) for p, m in models.items()}
    (x, am, y), = make_batches(cfg, K * B, bc, device, n=1)
    def step(p):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=hc.bf16):
            train_step(models[p], opts[p], x, am, y, bc, device)

    fns = {p: (lambda p=p: step(p)) for p in models}
    for _ in range(hc.warmup):
        for f in fns.values():
            f()
    return interleaved_ms(fns, hc.steps, device)


def main(argv=None):
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_dataclass_args(ap, HeadConfig)
    hc = dataclass_from_args(HeadConfig, ap.parse_args(argv))
    try:
        cases = [(n, int(b)) for n, b in (c.split(":") for c in hc.cases.split(","))]
        [Impl(head="chunked", head_chunk=int(c)) for c in hc.chunks.split(",")]
    except ValueError:
        raise UserError(f"--cases {hc.cases!r} / --chunks {hc.chunks!r}: expected preset:batch,... and ints") from None
    if min(hc.members, hc.steps, hc.per_row) < 1 or min(hc.warmup, hc.threads) < 0 or min(b for _, b in cases) < 1:
        raise UserError("--members, --steps, --per_row and every batch >= 1, --warmup >= 0")
    device = resolve_device(hc.device)
    if hc.threads > 0:
        torch.set_num_threads(hc.threads)
    if device.type == "cpu":
        keep_freed_memory()  # as a training run does (tinytlm/session.py open_device)
    for name, B in cases:
        ms = case(name, B, hc, device)
        rates = ", ".join(f"{p} {ms[p]:.0f} ms ({B / ms[p] * 1e3:.1f} seq/s/member, {ms['plain'] / ms[p]:.2f}x)"
                          for p in ms)
        print(f"{name} B={B} K={hc.members}{' bf16' * hc.bf16}: {rates}", flush=True)


if __name__ == "__main__":
    cli(main)
