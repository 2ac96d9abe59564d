"""Helpers of the training scripts: config from the command line, device, schedule, logging.

The loops themselves stay in train_mlm.py and train_cls.py, flat and visible.
"""
import argparse
import contextlib
import dataclasses
import json
import platform
import signal
import sys
import time
from pathlib import Path

import torch

from tinytlm.common import (ArgParser, UserError, default_data_root, default_raw_root, git_revision, read_json,
                            write_json)
from tinytlm.model import BertConfig


# -----------------------------------------------------------------------------
# config <-> command line

def _parse_tuple(s):
    try:
        return tuple(int(x) for x in str(s).replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")


def _parse_bool(s):
    v = str(s).lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _arg_type(field, default):
    if isinstance(default, bool):
        return _parse_bool
    if isinstance(default, tuple):
        return _parse_tuple
    return type(default) if default is not None else str


def add_dataclass_args(ap, cls, group_title=None, all_optional=False):
    """One `--name value` flag per dataclass field; help = the field's comment-free name and default.
    all_optional: every default becomes None, so only the flags given override (model overrides)."""
    g = ap.add_argument_group(group_title or cls.__name__)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        flag = {"nargs": "?", "const": True} if isinstance(default, bool) else {}  # `--compile` = true
        g.add_argument(*names, dest=f.name, type=_arg_type(f, default), **flag,
                       default=None if all_optional else default, help=f"(default {default})")


def switch(default):
    """A config field that changes where or how fast a run goes, or what it prints, but not what it
    computes: it may change when a run is resumed, and it is not part of a cell's identity in the
    paper runner. Every other field must stay what the run started with."""
    return dataclasses.field(default=default, metadata={"switch": True})


def switches(cls) -> set:
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("switch")}


def resumed_config(cfg, saved, overrides: dict):
    """The saved config of a run being resumed, with the switches this command line gives; a flag
    that would change what is computed is a one-line error."""
    default, allowed = type(cfg)(), switches(type(cfg))
    given = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)]
    bad = [f for f in given if f not in allowed and getattr(cfg, f) != getattr(saved, f)] + list(overrides)
    if bad:
        raise UserError(f"--resume continues the saved configuration; --{bad[0]} cannot change "
                        f"(only {', '.join('--' + f for f in sorted(allowed - {'resume'}))} can)")
    once = {f: getattr(cfg, f) for f in ("interrupt_at",) if hasattr(cfg, f)}  # testing: not delivered again
    return dataclasses.replace(saved, **{**{f: getattr(cfg, f) for f in given if f in allowed}, **once})


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


def dataclass_from_args(cls, args):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def model_overrides(args) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(BertConfig)
            if getattr(args, f.name) is not None}


def parse_run_args(cls, doc: str, title: str, argv=None):
    """(script config, model overrides) from the command line: the script's dataclass flags plus
    one optional flag per BertConfig field. Unknown flags and bad values are one-line errors."""
    ap = ArgParser(description=doc.split("\n\n")[0])
    ap.add_argument("--config", default="", help="JSON file of flag values (command-line flags win)")
    add_dataclass_args(ap, cls, title)
    add_dataclass_args(ap, BertConfig, "model overrides", all_optional=True)
    pre, _ = ap.parse_known_args(argv)
    if pre.config:
        values = read_json(pre.config, "config")
        known = {f.name for f in dataclasses.fields(cls)} | {f.name for f in dataclasses.fields(BertConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{pre.config}: unknown key {unknown[0]!r}")
        ap.set_defaults(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    args = ap.parse_args(argv)
    given = [a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)]
    if "--seeds" in given and "--seed" in given:
        raise UserError("--seed and --seeds exclude each other (one run, or one stacked run per seed list)")
    if "--seeds" in given and not str(args.seeds).strip():
        raise UserError("--seeds: empty; give comma-separated seeds, e.g. --seeds 0,1,2")
    return dataclass_from_args(cls, args), model_overrides(args)


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


def autocast(device):
    """bf16 autocast on CUDA, plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def prepare_model(model, device, compile=False, compile_mode="default"):
    """Move to device, optionally torch.compile. The implementations (kernels, unpad) are the model's own,
    chosen when it was built (tinytlm/kernel_path.py's Impl). compile_mode "reduce-overhead" records CUDA
    graphs: the batch-32 regime is launch-bound, and with static shapes (--mask_cap k: the sparse head's
    slots) one graph is replayed every step."""
    if compile_mode not in COMPILE_MODES:
        raise UserError(f"--compile_mode {compile_mode!r}: choose {', '.join(COMPILE_MODES)}")
    model.impl.check_device(device)
    model.to(device)
    return torch.compile(model, mode=None if compile_mode == "default" else compile_mode) if compile else model


def make_optimizer(model, lr, weight_decay, device):
    """AdamW over all parameters, as the paper's code (fused on CUDA)."""
    extra = {"fused": True} if device.type == "cuda" else {}
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
            raise UserError(f"the loss or gradients of {self.outs[k]} became non-finite at step {first[k]}{member}; its last good "
                            f"checkpoint is {Path(self.outs[k]) / 'ckpt.pt'} ({self.hint})")


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
