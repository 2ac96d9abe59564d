"""What the two training loops share: the setup before the loop, one optimizer step, the save, the
interruption context, and the stack manifest of a --seeds run.

tinytlm/pretrain.py (masked-language modelling) and tinytlm/finetune_loop.py (classification) each read
their data, build their members and run their loop; everything else is here, once:

    d, device = open_device(cfg)
    precision = run_precision(cfg, device, states)          # "fp32" | "bf16", once
    ... data ...
    check_group(states, mismatch)                           # resuming: same data, one common step
    model, model_cfg = build_members(states, new, K, impl)  # K members, one stacked model
    s = setup(cfg, d, device, model, states, lr, wd, outs, seeds, configs, precision=precision)
    with interruptible(s, bar, save_now, resume_hint) as sigint:
        ... counts, loss = train_step(s, lr, x, targets, global_rows, **model_kw) ...
        ... save(s, kind, epoch, members) ...
"""
import contextlib
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tinytlm.checkpoint import build_model, save_members, set_rng_state
from tinytlm.common import Interrupted, UserError, read_json, write_json
from tinytlm.cpu_memory import keep_freed_memory
from tinytlm.dist import Dist
from tinytlm.members import clip_grad_norm_members, stack_models, stack_optimizer_states
from tinytlm.precision import autocast, resolve_precision
from tinytlm.train import (NonFinite, QuietLog, RunLog, StopAtBoundary, compile_mode, deferred_sigint, grad_norms,
                           interrupt_step, make_optimizer, prepare_model, resolve_device)


@dataclass
class Session:
    """A training run once set up: where it runs, its K stacked members, their optimizer and logs, and the
    optimizer steps taken (`step`, advanced by train_step)."""
    d: Dist  # torchrun: this process's share (tinytlm/dist.py); else one process
    device: torch.device
    model: torch.nn.Module  # what the loop calls: prepared (kernels, compile) and wrapped (DDP)
    raw_model: torch.nn.Module  # the stacked members, unwrapped: what is saved and evaluated
    opt: torch.optim.Optimizer
    params: list  # raw_model's parameters, for the per-member gradient norms
    outs: list  # each member's run directory
    seeds: list  # each member's seed
    logs: list  # each member's RunLog (QuietLog on a torchrun process other than rank 0)
    nonfinite: NonFinite  # the first non-finite step of each member, checked where the loop syncs
    step: int = 0  # optimizer steps taken
    graphs: bool = False  # CUDA graphs (compile mode reduce-overhead): mark each step's start
    interrupt_at: int = 0  # testing: a Ctrl-C in the middle of this 1-based step (TINYTLM_INTERRUPT_AT)
    grad_clip: float = 0.0  # max gradient norm per member (0 = off)
    precision: str = "fp32"  # "fp32" | "bf16": the autocast every forward runs in (run_precision)

    @property
    def members(self) -> int:
        return len(self.outs)


# -----------------------------------------------------------------------------
# setup

def open_device(cfg):
    """(Dist, device): torchrun's process group when there is one, and the device of --device. On a CPU, freed
    tensors' memory stays in the process (tinytlm/cpu_memory.py: no page faults on big tensors every step)."""
    d = Dist()
    device = d.setup(resolve_device(cfg.device))
    if device.type == "cpu":
        keep_freed_memory()
    return d, device


def run_precision(cfg, device, states=None) -> str:
    """"fp32" or "bf16": what the run computes in (tinytlm/precision.py). Resuming (states: the checkpoints),
    the checkpoints' own precision (a checkpoint from before the switch: fp32 on CPU, bf16 on CUDA, the rule
    of its time); an explicit --precision other than theirs is a one-line error (--precision auto: theirs)."""
    if not states:
        return resolve_precision(cfg.precision, device)
    saved = states[0]["train_config"].get("precision") or ("bf16" if device.type == "cuda" else "fp32")
    if cfg.precision not in ("auto", saved):
        raise UserError(f"--precision {cfg.precision}: {states[0]['path']} was trained in {saved}; --resume "
                        f"continues in it (leave --precision out)")
    return saved


def precision_fields(cfg, precision: str) -> dict:
    """What a run's records say of its precision: the resolved one and the one asked for."""
    return {"precision": precision, "precision_requested": cfg.precision}


def check_group(states: list, mismatch):
    """Checkpoints a run resumes from: each made on this run's data (mismatch(state): "" or the one-line
    error), all at one step (a stack's members resume together)."""
    for st in states:
        why = mismatch(st)
        if why:
            raise UserError(why)
    if len({st["step"] for st in states}) > 1:
        raise UserError(f"{states[0]['path']}: the members' checkpoints are at different steps "
                        f"({', '.join(str(st['step']) for st in states)}); resume each alone")


def build_members(states, new, members: int, impl) -> tuple:
    """(model, its BertConfig): K members as one stacked model (tinytlm/members.py; K = 1: the plain model),
    from their checkpoints when resuming, else new(k) for member k (seeded and built as its single run is);
    impl: the implementations its forwards use (tinytlm/kernel_path.py), new(k) builds with it too."""
    singles = [build_model(st, impl) for st in states] if states else [new(k) for k in range(members)]
    return stack_models(singles), singles[0].config


def setup(cfg, d, device, model, states, lr: float, wd: float, outs: list, seeds: list, configs: list,
          grad_clip: float = 0.0, precision: str = "fp32") -> Session:
    """The rest of the setup, alike for both loops: device, compile and DDP; AdamW; when resuming, the
    optimizer, RNG and step of the checkpoints; each member's run log (header first); precision: what
    run_precision resolved (every forward of train_step runs in its autocast)."""
    outs = [Path(o) for o in outs]
    mode = compile_mode(cfg.compile, device)  # "" = eager (DDP and CUDA graphs read the resolved mode)
    prepared = d.wrap(prepare_model(model, device, cfg.compile), device, mode)
    opt = make_optimizer(model, lr, wd, device)
    stack = {"seeds": seeds, "members": [str(o) for o in outs]} if len(outs) > 1 else None
    logs = [RunLog(o, {**c, "world_size": d.world}, device, resume=bool(states), stack=stack) if d.main
            else QuietLog() for o, c in zip(outs, configs)]
    s = Session(d, device, prepared, model, opt, list(model.parameters()), outs, seeds, logs,
                NonFinite(outs, seeds, device, "try a lower --lr, or --grad_clip" if hasattr(cfg, "grad_clip") else
                          "try a lower --lr"),
                graphs=mode == "reduce-overhead", interrupt_at=interrupt_step(),
                grad_clip=grad_clip, precision=precision)
    if states:
        opt.load_state_dict(stack_optimizer_states(model, [st["optimizer"] for st in states]) if len(outs) > 1
                            else states[0]["optimizer"])
        set_rng_state(states[0]["rng"])
        s.step = states[0]["step"]
        print(f"resuming {', '.join(st['path'] for st in states)} at step {s.step}")
    return s


# -----------------------------------------------------------------------------
# one optimizer step, and the save

def train_step(s: Session, lr: float, x, targets, global_rows, **model_kw):
    """Forward (autocast), backward, clip, step, zero_grad; returns (counts, loss): the model's (K, 3) counts
    (loss sum, correct, count per member; tinytlm/model.py) and the members' losses (K,). torchrun: the
    share's loss sums divided by the global count global_rows, so that DDP's mean over processes is the loss a
    single process computes."""
    K = s.members
    if s.graphs:
        torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are consumed
    for g in s.opt.param_groups:
        g["lr"] = lr
    with autocast(s.device, s.precision):
        counts, loss = s.model(x, targets=targets, **model_kw)
    if s.interrupt_at and s.step + 1 == s.interrupt_at:
        signal.raise_signal(signal.SIGINT)  # testing: a Ctrl-C in the middle of a step
    if s.d.on:
        loss = counts[:, 0] / global_rows
        (loss.sum() * s.d.world).backward()
    else:
        loss.sum().backward()  # K members: the sum of their mean losses, no coupling
    norms = clip_grad_norm_members(s.params, s.grad_clip, K) if s.grad_clip > 0 else grad_norms(s.params, K)
    s.nonfinite.update(loss, s.step + 1, norms)  # caught at this step, reported at the next sync
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    s.step += 1
    return counts, loss


def save(s: Session, kind: str, epoch: int, members: list, finished=False):
    """Every member's checkpoint (rank 0 writes; none if a loss went non-finite). members: per member, a
    dict of train_config, data and extra; a finished run drops the optimizer state."""
    s.nonfinite.check()
    if s.d.main:
        save_members(s.raw_model, [(o / "ckpt.pt", dict(kind=kind, optimizer=None if finished else s.opt, step=s.step,
                                                        epoch=epoch, **m)) for o, m in zip(s.outs, members)])


@contextlib.contextmanager
def interruptible(s: Session, bar, save_now, resume_hint):
    """The loop's body runs inside: the first Ctrl-C or SIGTERM sets the flag it yields (the loop raises
    StopAtBoundary at a step boundary: save_now(), then Interrupted saying how to go on); a second one stops at
    once; a full disk or a user error ends the progress bar before its one-line error."""
    try:
        with deferred_sigint() as sigint:
            yield sigint
    except StopAtBoundary:
        bar.close()
        save_now()  # (not if the loss went non-finite: nonfinite.check() raises)
        more = f" and {s.members - 1} more" if s.members > 1 else ""
        raise Interrupted(f"interrupted at step {s.step}: checkpoint {s.outs[0] / 'ckpt.pt'}{more}; continue with "
                          f"--resume {resume_hint}")
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(f"stopped in the middle of step {s.step + 1}; {s.outs[0] / 'ckpt.pt'} holds the last "
                          f"saved state") from None
    except (OSError, UserError):
        bar.close()
        raise
    bar.close()


# -----------------------------------------------------------------------------
# a --seeds run's manifest: what --resume DIR continues

def write_stack(where: Path, kind: str, cfg, overrides: dict, outs: list):
    """DIR/stack.json (rank 0 writes): the stack's config, its model overrides and its members' folders."""
    if Dist().main:
        write_json(Path(where) / "stack.json", {"kind": kind, "config": asdict(cfg), "overrides": overrides,
                                                "members": [str(o) for o in outs]})


def read_stack(where: Path, kind: str = None):
    """The manifest of the stacked run in `where`, or None when `where` is not one; kind ("mlm" | "cls"): a
    stack of the other kind is a one-line error (a command resuming what the other trains)."""
    manifest = Path(where) / "stack.json"
    m = read_json(manifest, "stack manifest") if manifest.is_file() else None
    if m and kind and m.get("kind") != kind:
        what = {"mlm": "pre-training", "cls": "classifier"}
        raise UserError(f"{where}: a stacked {what.get(m.get('kind'), m.get('kind'))} run, not a {what[kind]} run")
    return m
