"""The paper runner's calls into the training library: one small function per entry point it uses.

The runner (tinytlm/paper_cells.py) builds its cells' configurations, trains and scores only through
these, so a change of the API of tinytlm.pretrain, tinytlm.finetune or tinytlm.committee is met here
and nowhere else in the runner. A stack of one member is called exactly as a single run is.
"""
from dataclasses import replace
from pathlib import Path

from tinytlm.analyze_apt import mean_apt
from tinytlm.checkpoint import load_checkpoint, load_group
from tinytlm.committee import (accuracy, committee_logits, common_test_set, predict_member_logits, shape_groups,
                               stack_checkpoints)
from tinytlm.finetune import ClsConfig, arms
from tinytlm.pretrain import MLMConfig, train
from tinytlm.tasks import TASKS
from tinytlm.train import device_name, resolve_device, roots

FEWREL_RELATIONS = {"val_wiki": 16, "train_wiki": 64}  # labels when a FewRel task takes all


def mlm_config(row: dict, seed: int, switches: dict):
    """train_mlm's config of a row's pre-training at this seed; switches: paths, device and speed flags."""
    return MLMConfig(model=row["model"], seed=seed, **row["pretrain"], **switches)


def cls_config(row: dict, seed: int, switches: dict):
    """train_cls's config of a row's fine-tuning at this (run) seed, without its --init."""
    return ClsConfig(model=row["model"], seed=seed, quiet=True, **row["finetune"], **switches)


def task_sequences(cfg) -> tuple:
    """(trained, scored) sequences of a fine-tuning config: its train rows every epoch, and its test rows
    scored after every epoch."""
    spec = cfg.spec()
    n_labels = len(spec.labels) or (len(TASKS[spec.task][2]) if spec.task != "fewrel" else
                                    FEWREL_RELATIONS[spec.fewrel_source])
    return spec.train_per_label * n_labels * cfg.epochs, spec.test_per_label * n_labels * cfg.epochs


def train_mlm(cfgs: list, overrides: dict, states: list, outs: list):
    """Pre-train the members (one config per seed, alike but for the seed) as one stacked model into outs;
    states: their checkpoints at one common step, or None (a fresh start). One member: a single run."""
    if len(cfgs) == 1:
        cfg = replace(cfgs[0], out=str(outs[0]))
    else:  # --seeds: each member's config is the stack's with its own seed
        cfg = replace(cfgs[0], seed=0, seeds=",".join(str(c.seed) for c in cfgs))
    train(cfg, overrides, states, outs=outs)


def train_cls(cfgs: list, overrides: dict, init_dirs: list, init_states: list, outs: list) -> list:
    """Fine-tune (or read back, or resume) the members as one stacked model, member k from the pre-training
    in init_dirs[k] (its checkpoint init_states[k]; None: from scratch). Their results (run_arm's)."""
    cfgs = [replace(c, init=str(d) if d else "") for c, d in zip(cfgs, init_dirs)]
    return arms(cfgs, overrides, init_states, outs)


def load_mlm(out: Path) -> dict:
    """A finished pre-training's checkpoint (the --init of its fine-tunings)."""
    return load_checkpoint(out, kind="mlm")


def checkpoint_apt(out: Path, device: str, data: str, precision: str = "fp32") -> float:
    """<APT> of a finished pre-training (tinytlm.analyze_apt.mean_apt: every token the held-out masks select
    at least once, on the held-out rows it was scored on; data: another prepared-data root, "" = recorded),
    its forwards in precision (the cell's: "fp32" | "bf16")."""
    return mean_apt(out, device=resolve_device(device), data_root=data or None, precision=precision)


def load_mlm_group(outs: list) -> list:
    """The saved members of a stacked pre-training at their common step (tinytlm.checkpoint.load_group)."""
    return load_group(outs, kind="mlm")


def score_committee(outs: list, cfg) -> dict:
    """Soft committee (sum of raw logits) of the classifiers saved in outs, on their shared test set;
    cfg: a member's config (its device, data roots and resolved precision)."""
    device = resolve_device(cfg.device)
    states = [load_checkpoint(o, kind="cls") for o in outs]
    _, test, yte = common_test_set(states, *roots(cfg))
    logits = [None] * len(states)
    for group in shape_groups(states):  # members of one shape: one stacked forward
        stacked = stack_checkpoints([states[i] for i in group]).to(device)
        for i, lg in zip(group, predict_member_logits(stacked, test.ids, device, precision=cfg.precision)):
            logits[i] = lg
    return {"acc": accuracy(committee_logits(logits), yte), "member_acc": [accuracy(lg, yte) for lg in logits],
            "device": device_name(device), "precision": cfg.precision}
