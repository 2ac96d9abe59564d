"""Helpers of the training loops (tinytlm/pretrain.py, tinytlm/finetune_loop.py): device, kernels and
compile, optimizer and schedule, the non-finite guard, Ctrl-C at step boundaries, run logs.

The configs and their command lines are tinytlm/config.py's.
"""
import contextlib
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

import torch

from tinytlm.common import UserError, default_data_root, default_raw_root, git_revision, write_json
# (re-exported: bench/ and the paper runner import these from here)
from tinytlm.config import (COMPILE, COMPILE_MODES, add_dataclass_args, dataclass_from_args, switch,  # noqa: F401
                            switches)


# -----------------------------------------------------------------------------
# run helpers

def roots(cfg) -> tuple:
    """(raw data root, prepared data root) of a run config: --raw and --data, else the defaults."""
    return (Path(cfg.raw) if cfg.raw else default_raw_root()), (Path(cfg.data) if cfg.data else default_data_root())


def check_rows(max_id: int, row_len: int, model_cfg, where):
    """Token rows the model can read: every id in its vocabulary, rows no longer than its positions."""
    if max_id >= model_cfg.vocab_size:
        raise UserError(f"{where}: token ids reach {max_id}, the model's vocabulary has {model_cfg.vocab_size}")
    if row_len > model_cfg.max_pos:
        raise UserError(f"{where}: rows of {row_len} tokens exceed the model's {model_cfg.max_pos} positions")


def refuse_existing(out: Path, dirs: list):
    """A fresh run never overwrites a checkpoint: a one-line error naming the first of dirs that holds one.
    (Under torchrun every process checks: none writes a checkpoint before all have passed the data barrier.)"""
    for d in dirs:
        if (Path(d) / "ckpt.pt").is_file():
            raise UserError(f"{d} already holds a checkpoint; continue it with --resume {out}, or choose another --out")


def member_seeds(cfg) -> list:
    """The seeds a run trains: [--seed] for one model, or the --seeds list (one stacked member per seed)."""
    if not cfg.seeds:
        return [cfg.seed]
    try:
        seeds = [int(x) for x in cfg.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds {cfg.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
    bad = [x for x in seeds if x < 0] + [x for i, x in enumerate(seeds) if x in seeds[:i]]
    if bad:
        raise UserError(f"--seeds {cfg.seeds}: seed {bad[0]} is {'negative' if bad[0] < 0 else 'repeated'}")
    if cfg.seed != 0:
        raise UserError("--seed and --seeds exclude each other (one run, or one stacked run per seed list)")
    return seeds


def interrupt_step() -> int:
    """Testing: the 1-based step in the middle of which a run delivers itself a Ctrl-C, from the environment
    variable TINYTLM_INTERRUPT_AT (0 or unset = never). The tests of exact resumption use it."""
    v = os.environ.get("TINYTLM_INTERRUPT_AT", "") or "0"
    if not v.isdigit():
        raise UserError(f"TINYTLM_INTERRUPT_AT={v!r}: expected a step number (0 = never)")
    return int(v)


# -----------------------------------------------------------------------------
# device and speed switches

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device {name!r}: choose auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


# --compile auto, per device type: "" = eager, else a torch.compile mode. CPU: measured with bench/cpu.py's
# compile section (bench/README.md, "CPU"); CUDA: today's eager default, not measured for auto.
AUTO_COMPILE = {"cpu": "", "cuda": ""}


def compile_mode(option: str, device) -> str:
    """The torch.compile mode --compile asks for on device: "" (eager) or one of COMPILE_MODES."""
    if option not in COMPILE:
        raise UserError(f"--compile {option!r}: choose {', '.join(COMPILE)}")
    if option == "auto":
        return AUTO_COMPILE.get(device.type, "")
    return {"off": "", "on": "default"}.get(option, option)


def prepare_model(model, device, compile="off"):
    """Move to device and torch.compile it as --compile asks (off | auto | on | a mode). The implementations
    (kernels, unpad) are the model's own, chosen when it was built (tinytlm/kernel_path.py's Impl). Mode
    "reduce-overhead" records CUDA graphs: the batch-32 regime is launch-bound, and with static shapes
    (--mask_cap k: the sparse head's slots) one graph is replayed every step."""
    mode = compile_mode(compile, device)
    model.impl.check_device(device)
    model.to(device)
    return torch.compile(model, mode=None if mode == "default" else mode) if mode else model


def make_optimizer(model, lr, weight_decay, device):
    """AdamW over all parameters, as the paper's code; fused (one pass over each parameter's four tensors, not one
    per operation) on CUDA and on the CPU, where it measured faster (bench/results/2026-12-07-cpu-members.md)."""
    extra = {"fused": True} if device.type in ("cuda", "cpu") else {}
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **extra)


def lr_at(step: int, total: int, lr: float) -> float:
    """Linear decay from lr to 0 over `total` optimizer steps, no warm-up."""
    return lr * max(0.0, 1.0 - step / max(1, total))


# -----------------------------------------------------------------------------
# a loss or a gradient that is not finite

def grad_norms(params, members: int):
    """Per member, the norm of its gradient over all parameters, (K,), on the device (no sync): fused
    foreach norms over each member's slices (a stacked parameter's leading dim is the member)."""
    grads = [p.grad for p in params if p.grad is not None]
    if members > 1:
        grads = [v for g in grads for v in g.reshape(members, -1).unbind(0)]  # parameter-major, member-minor
    return torch.stack(torch._foreach_norm(grads)).float().view(-1, members).norm(dim=0)


class NonFinite:
    """Per member, the first step whose loss or gradient norm was not finite, kept on the device (no sync per
    step) and read by check() where a loop syncs anyway (a log record, a checkpoint): a diverged run stops there
    with one line naming that step, and never overwrites its last good checkpoint."""

    def __init__(self, outs: list, seeds: list, device, hint: str):
        self.outs, self.seeds, self.hint = outs, seeds, hint
        self.first = torch.zeros(len(outs), dtype=torch.long, device=device)  # 0: none yet

    def update(self, loss, step: int, norms=None):
        """loss: the members' losses of 1-based step `step`, (K,) or a scalar; norms: their gradient norms
        (grad_norms, or what gradient clipping measured), checked too when given."""
        with torch.no_grad():
            bad = ~torch.isfinite(loss.detach().float().view(len(self.outs)))
            if norms is not None:
                bad |= ~torch.isfinite(norms.detach().float().view(len(self.outs)))
            self.first = torch.where((self.first == 0) & bad, step, self.first)

    def check(self):
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # torchrun: every process stops
            torch.distributed.all_reduce(self.first, op=torch.distributed.ReduceOp.MAX)
        first = self.first.tolist()
        if any(first):
            k = next(i for i, b in enumerate(first) if b)
            member = f" (member seed {self.seeds[k]})" if len(self.outs) > 1 else ""
            raise UserError(f"the loss or gradients of {self.outs[k]} became non-finite at step {first[k]}{member}; "
                            f"its last good checkpoint is {Path(self.outs[k]) / 'ckpt.pt'} ({self.hint})")


# -----------------------------------------------------------------------------
# Ctrl-C and SIGTERM at step boundaries

class StopAtBoundary(Exception):
    """Ctrl-C was pressed: stop after the step in flight, so the checkpoint is exact."""


@contextlib.contextmanager
def deferred_sigint():
    """The first Ctrl-C (or SIGTERM) only sets a flag the loop checks between steps (a checkpoint written in the
    middle of a step could hold half-updated weights or used-up RNG state); a second one stops at once."""
    flag = {"set": False}

    def handler(signum, frame):
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True
        print("\nCtrl-C: stopping after this step (press again to stop at once, without saving)", file=sys.stderr)

    try:  # SIGTERM (a job scheduler's kill) is handled like Ctrl-C
        prev = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: the signals keep their default behaviour
        yield flag
        return
    try:
        yield flag
    finally:
        for sig, h in prev.items():
            signal.signal(sig, h)


# -----------------------------------------------------------------------------
# run directory: config.json, metrics.jsonl (header first)

class RunLog:
    def __init__(self, out: Path, config: dict, device, resume=False, stack: dict = None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = self.out / "metrics.jsonl"
        write_json(self.out / "config.json", config)
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        header = {"kind": "header", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "config": config,
                  "git": git_revision(), "torch": torch.__version__, "triton": triton_version,
                  "python": platform.python_version(), "device": device_name(device), "resumed": resume}
        if stack:  # a member of a stacked run: which stack (its speed figures are the member's share)
            header["stack"] = stack
        self.write(header)

    def write(self, record: dict):
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")


class QuietLog:
    """A RunLog that writes nothing (a torchrun process other than rank 0)."""

    def write(self, record: dict):
        pass


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_config(title, config: dict):
    print(f"{title}: " + " ".join(f"{k}={v}" for k, v in config.items()))
