"""One checkpoint format for train_mlm.py, train_cls.py and ensemble.py.

A checkpoint is a torch.save'd dict:
    format      1
    kind        "mlm" | "cls"
    model       state_dict of the unwrapped, uncompiled model (no `_orig_mod.` keys)
    model_config  BertConfig.to_dict()
    n_labels    classifier only
    optimizer   AdamW state (None once training is finished and trimmed)
    step, epoch global optimizer step and the epoch it belongs to; the learning rate is a
                function of step, so this is the scheduler position too
    train_config  the script's resolved config (a dict)
    data        meta of the data it was trained on (shard checksums, W_s, task, labels)
    rng         python, numpy, torch and CUDA RNG states
    extra       script-specific (e.g. the classifier's label names and test-set fingerprint)

It is written to a temp file and renamed, so a crash or Ctrl-C never leaves a broken one.
"""
import contextlib
import random
from pathlib import Path

import numpy as np
import torch

from tinytlm.common import UserError, atomic_path
from tinytlm.members import member_optimizer_state, member_state
from tinytlm.model import BertConfig, BertForClassification, BertForMLM

FORMAT = 1
REQUIRED = ("format", "kind", "model", "model_config", "step", "epoch", "train_config", "data", "rng")


def unwrap(model):
    """The plain module behind torch.compile's wrapper."""
    return getattr(model, "_orig_mod", model)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(*, kind, model, optimizer, step, epoch, train_config: dict, data: dict, extra: dict = None,
                     member: int = None) -> dict:
    """The checkpoint dict of a model, or of member k of a stacked one (exactly a single model's)."""
    m = unwrap(model)
    if member is None:
        weights, opt = m.state_dict(), optimizer.state_dict() if optimizer is not None else None
    else:
        weights = member_state(m, member)
        opt = member_optimizer_state(m, optimizer.state_dict(), member) if optimizer is not None else None
    return {
        "format": FORMAT, "kind": kind,
        "model": weights, "model_config": m.config.to_dict(),
        "n_labels": getattr(m, "n_labels", None),
        "optimizer": opt,
        "step": step, "epoch": epoch, "train_config": train_config, "data": data,
        "rng": rng_state(), "extra": extra or {},
    }


def save_checkpoint(path, **fields):
    """Write checkpoint_state(**fields) atomically to path."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint_state(**fields), tmp)


def save_members(model, members: list):
    """Checkpoints of every member of a model: members = [(path, fields)] in member order, fields as for
    checkpoint_state (each member has its own train_config). A one-member model is saved as it is. All
    files are written before any is renamed into place, so the members stay at one step (a kill can only
    fall between the renames)."""
    if len(members) == 1 and getattr(unwrap(model), "members", 1) == 1:
        return save_checkpoint(members[0][0], model=model, **members[0][1])
    with contextlib.ExitStack() as stack:
        for k, (path, fields) in enumerate(members):
            torch.save(checkpoint_state(model=model, member=k, **fields), stack.enter_context(atomic_path(path)))


def checkpoint_file(path) -> Path:
    """A checkpoint file, or a run directory holding ckpt.pt."""
    p = Path(path)
    if p.is_dir():
        p = p / "ckpt.pt"
    if not p.is_file():
        raise UserError(f"{path}: checkpoint not found (give a .pt file or a run directory with ckpt.pt)")
    return p


def load_checkpoint(path, kind: str = None) -> dict:
    """Load and validate; names what is missing or of the wrong kind."""
    p = checkpoint_file(path)
    try:
        state = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a damaged file
        raise UserError(f"{p}: not a readable checkpoint ({e.__class__.__name__})")
    if not isinstance(state, dict):
        raise UserError(f"{p}: not a tinytlm checkpoint")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise UserError(f"{p}: not a tinytlm checkpoint (missing {', '.join(missing)})")
    if state["format"] != FORMAT:
        raise UserError(f"{p}: checkpoint format {state['format']}, this code reads {FORMAT}")
    if kind and state["kind"] != kind:
        raise UserError(f"{p}: a {state['kind']!r} checkpoint, expected {kind!r}")
    state["path"] = str(p)
    return state


def build_model(state: dict):
    """The model a checkpoint describes, with its weights loaded (strict: names what does not match)."""
    cfg = BertConfig.from_dict(state["model_config"])
    model = BertForMLM(cfg) if state["kind"] == "mlm" else BertForClassification(cfg, state["n_labels"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(f"{state.get('path', 'checkpoint')}: weights do not match its config "
                        f"({str(e).splitlines()[0]})")
    return model
