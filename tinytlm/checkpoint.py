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
    checksum    blake2b of everything above (tensors by their bytes): load_checkpoint refuses a
                checkpoint whose contents do not match it (an altered or damaged file)

It is written to a temp file and renamed, so a crash or Ctrl-C never leaves a broken one. The
checkpoint it replaces stays beside it as ckpt.prev.pt (a hard link, so ckpt.pt is never missing):
resuming falls back to it, with a message, when ckpt.pt is damaged.
"""
import contextlib
import hashlib
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from tinytlm.common import UserError, atomic_path
from tinytlm.kernel_path import Impl
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
    state = {
        "format": FORMAT, "kind": kind,
        "model": weights, "model_config": m.config.to_dict(),
        "n_labels": getattr(m, "n_labels", None),
        "optimizer": opt,
        "step": step, "epoch": epoch, "train_config": train_config, "data": data,
        "rng": rng_state(), "extra": extra or {},
    }
    state["checksum"] = payload_digest(state)
    return state


def _feed(h, obj):
    """Feed nested dicts, lists, tuples, tensors, arrays and scalars into hash h, deterministically."""
    if isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    elif torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes, without a copy
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).reshape(-1).view(np.uint8))
    else:
        h.update(repr(obj).encode())


def payload_digest(state: dict) -> str:
    """blake2b-128 of a checkpoint dict's contents, its own "checksum" and "path" entries left out."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, {k: v for k, v in state.items() if k not in ("checksum", "path")})
    return h.hexdigest()


@contextlib.contextmanager
def replacing_checkpoint(path):
    """atomic_path for checkpoints: the file being replaced is first kept as ckpt.prev.pt (a hard link, or a
    copy where links fail), so a damaged new checkpoint can fall back to the previous good one."""
    path = Path(path)
    with atomic_path(path) as tmp:
        yield tmp
        if path.is_file():  # the block succeeded: keep the old one, then atomic_path renames tmp over path
            prev = prev_path(path)
            with atomic_path(prev) as link:
                try:
                    os.link(path, link)
                except OSError:
                    import shutil
                    shutil.copyfile(path, link)


def prev_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_checkpoint(path, **fields):
    """Write checkpoint_state(**fields) atomically to path."""
    with replacing_checkpoint(path) as tmp:
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
            torch.save(checkpoint_state(model=model, member=k, **fields),
                       stack.enter_context(replacing_checkpoint(path)))


def checkpoint_file(path) -> Path:
    """A checkpoint file, or a run directory holding ckpt.pt."""
    p = Path(path)
    if p.is_dir():
        p = p / "ckpt.pt"
    if not p.is_file():
        raise UserError(f"{path}: checkpoint not found (give a .pt file or a run directory with ckpt.pt)")
    return p


def load_checkpoint(path, kind: str = None, fallback: bool = False) -> dict:
    """Load and validate; names what is missing, damaged or of the wrong kind. fallback (resuming): when
    the checkpoint is damaged, the previous one (ckpt.prev.pt) if it is good, with a message."""
    try:
        return _load(path, kind)
    except UserError as e:
        prev = prev_path(checkpoint_file(path))
        if not fallback or not prev.is_file():
            raise
        state = _load(prev, kind)
        print(f"{e}; resuming from the previous checkpoint {prev} (step {state['step']})", file=sys.stderr)
        return state


def _load(path, kind: str = None) -> dict:
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
    if "checksum" in state and payload_digest(state) != state["checksum"]:  # (older checkpoints have none)
        raise UserError(f"{p}: checksum mismatch: the checkpoint is damaged or was altered")
    if kind and state["kind"] != kind:
        raise UserError(f"{p}: a {state['kind']!r} checkpoint, expected {kind!r}")
    state["path"] = str(p)
    return state


def load_group(paths: list, kind: str) -> list:
    """The checkpoints of a stack's members at one common step: each member's ckpt.pt, or its ckpt.prev.pt
    where another member stopped one save earlier (a kill between the members' renames, a damaged file)."""
    states = [load_checkpoint(p, kind, fallback=True) for p in paths]
    low = min(s["step"] for s in states)
    for i, p in enumerate(paths):
        prev = prev_path(checkpoint_file(p))
        if states[i]["step"] != low and prev.is_file() and _load(prev, kind)["step"] == low:
            print(f"{states[i]['path']}: one save ahead of the other members; resuming from {prev}", file=sys.stderr)
            states[i] = _load(prev, kind)
    return states


def build_model(state: dict, impl: Impl = Impl()):
    """The model a checkpoint describes, with its weights loaded (strict: names what does not match), running
    on the implementations `impl` chooses (tinytlm/kernel_path.py)."""
    cfg = BertConfig.from_dict(state["model_config"])
    model = BertForMLM(cfg, impl=impl) if state["kind"] == "mlm" else BertForClassification(cfg, state["n_labels"],
                                                                                        impl=impl)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(f"{state.get('path', 'checkpoint')}: weights do not match its config "
                        f"({str(e).splitlines()[0]})")
    return model
