"""Where a stacked step's time goes: torch.profiler over K stacked members' training steps and over the same
work done one member at a time (bench/members.py's train_step, batches and models), the top operators by
self time side by side. For finding why stacking loses on a device, not for speed-ups (bench/members.py).

    PYTHONPATH=. python bench/members_profile.py --device cpu --model tiny --members 5 --threads 1
    PYTHONPATH=. python bench/members_profile.py --device cpu --model bert1 --head plain --rows 25
    PYTHONPATH=. python bench/members_profile.py --smoke        # shrunk model: proves it runs

--head: the MLM head (tinytlm/kernel_path.py; "auto": default_head of the device). After --warmup untimed
steps of each path, --steps profiled steps of each; times are the profiler's self CPU (and CUDA) ms per step.
"""
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from bench.members import MembersConfig, config_for, make_batches, train_step
from tinytlm.common import ArgParser, UserError, cli
from tinytlm.cpu_memory import keep_freed_memory
from tinytlm.kernel_path import HEADS, Impl, default_head
from tinytlm.members import load_members
from tinytlm.model import BertForMLM
from tinytlm.train import add_dataclass_args, dataclass_from_args, make_optimizer, resolve_device


@dataclass
class ProfileConfig:
    model: str = "tiny"  # BertConfig preset
    members: int = 5  # K
    batch_size: int = 4  # sequences per member per step
    per_row: int = 32  # sparse MLM head slots per row
    head: str = "auto"  # MLM head: auto | plain | chunked
    warmup: int = 1  # untimed steps per path
    steps: int = 2  # profiled steps per path
    rows: int = 20  # operators listed
    keep_memory: bool = True  # CPU: tinytlm/cpu_memory.py keep_freed_memory, as a training run (false: as before)
    threads: int = 0  # CPU threads (torch.set_num_threads); 0: torch's default
    device: str = "auto"  # auto | cuda | cpu
    smoke: bool = False  # shrunk model, B 2, T 32


def build(pc: ProfileConfig, device):
    """(K single models with their optimizers, the same K stacked with its optimizer, batches, bench config)."""
    bc = MembersConfig(models=pc.model, batch_size=pc.batch_size, per_row=pc.per_row, device=str(device),
                       smoke=pc.smoke, seq_len=32 if pc.smoke else 128)
    bc.per_row = min(bc.per_row, bc.seq_len)
    cfg = config_for(bc, pc.model)
    impl = Impl(head=default_head(device) if pc.head == "auto" else pc.head)
    torch.manual_seed(0)
    with torch.device(device):
        singles = [BertForMLM(cfg, impl=impl).train() for _ in range(pc.members)]
        stacked = BertForMLM(cfg, members=pc.members, impl=impl).train()
    load_members(stacked, [m.state_dict() for m in singles])
    opts = [make_optimizer(m, bc.lr, 0.01, device) for m in singles]
    return singles, opts, stacked, make_optimizer(stacked, bc.lr, 0.01, device), \
        make_batches(cfg, pc.members * pc.batch_size, bc, device), bc


def main(argv=None):
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_dataclass_args(ap, ProfileConfig)
    pc = dataclass_from_args(ProfileConfig, ap.parse_args(argv))
    if pc.head not in ("auto", *HEADS) or min(pc.members, pc.batch_size, pc.steps, pc.rows) < 1 \
            or min(pc.warmup, pc.threads) < 0:
        raise UserError("--head auto|plain|chunked; --members, --batch_size, --steps, --rows >= 1; "
                        "--warmup, --threads >= 0")
    device = resolve_device(pc.device)
    if pc.threads > 0:
        torch.set_num_threads(pc.threads)
    if device.type == "cpu" and pc.keep_memory:
        keep_freed_memory()  # as a training run does (tinytlm/session.py open_device)
    singles, opts, stacked, opt, batches, bc = build(pc, device)
    B = pc.batch_size

    def one_by_one():
        x, am, y = batches[0]
        for k, (m, o) in enumerate(zip(singles, opts)):
            train_step(m, o, x[k * B:(k + 1) * B], am[k * B:(k + 1) * B], y[k * B:(k + 1) * B], bc, device)

    paths = {"stacked": lambda: train_step(stacked, opt, *batches[0], bc, device), "one by one": one_by_one}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tables = {}
    for name, step in paths.items():
        for _ in range(pc.warmup):
            step()
        with profile(activities=acts) as prof:
            for _ in range(pc.steps):
                step()
        ev = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ev) / 1e3 / pc.steps
        tables[name] = (total, {e.key: (e.self_cpu_time_total / 1e3 / pc.steps, e.count // pc.steps) for e in ev})
    keys = sorted({k for _, t in tables.values() for k in t},  # the largest in either path first
                  key=lambda k: -max(t.get(k, (0, 0))[0] for _, t in tables.values()))
    print(f"{pc.model}, K = {pc.members}, B = {B}/member, head {stacked.impl.head}, {device}: self CPU ms per step "
          f"(stacked {tables['stacked'][0]:.0f}, one by one {tables['one by one'][0]:.0f})")
    print(f"{'operator':48s} {'stacked ms':>11s} {'calls':>6s} {'one-by-one ms':>14s} {'calls':>6s}")
    for k in keys[:pc.rows]:
        (a, ca), (b, cb) = tables["stacked"][1].get(k, (0, 0)), tables["one by one"][1].get(k, (0, 0))
        print(f"{k[:48]:48s} {a:11.1f} {ca:6d} {b:14.1f} {cb:6d}")


if __name__ == "__main__":
    cli(main)
