"""Evaluation, the soft committee and latency measurement.

Soft committee (PAPER.md): sum the members' raw logits, no softmax or normalisation,
and take the argmax.

Members of one shape (model config and number of labels) run as one stacked model
(tinytlm/members.py): K classifiers in one forward, the input repeated once per member. Every
function here takes single and stacked models alike: `member_logits` is (K, B, C), K = 1 for a
single model.
"""
import time

import numpy as np
import torch

from tinytlm.checkpoint import build_model
from tinytlm.common import UserError
from tinytlm.kernel_path import Impl
from tinytlm.members import load_members
from tinytlm.model import BertConfig, BertForClassification
from tinytlm.tasks import TaskSpec, ensure_task, load_task
from tinytlm.precision import autocast


def common_test_set(states: list, raw=None, data=None) -> tuple:
    """(task folder, test shard, test labels) that classifier checkpoints share. They must agree on task,
    label map and test set (the fingerprint each stored when it was scored), and the prepared test set
    must still be that one."""
    ref = states[0]
    for s in states[1:]:
        for key, what in (("task", "task"), ("label_names", "label map"), ("test_fingerprint", "test set")):
            if s["extra"].get(key) != ref["extra"].get(key):
                raise UserError(f"{s['path']}: trained on a different {what} than {ref['path']} "
                                f"({s['extra'].get(key)!r} vs {ref['extra'].get(key)!r})")
    task_dir = ensure_task(TaskSpec.from_dict(ref["extra"]["spec"]), raw, data)
    _, _, test, yte, _ = load_task(task_dir)
    if test.checksum.hex() != ref["extra"]["test_fingerprint"]:
        raise UserError(f"{test.path}: this test set differs from the one the members were evaluated on")
    return task_dir, test, yte


# -----------------------------------------------------------------------------
# stacking checkpoints of one shape

def shape_groups(states: list) -> list:
    """Indices of classifier checkpoints grouped by shape (model config + n_labels), groups in order of
    first appearance, members in the order given: each group can run as one stacked model."""
    groups = {}
    for i, s in enumerate(states):
        cfg = BertConfig.from_dict(s["model_config"]).to_dict()  # defaults filled in: equal configs, equal keys
        groups.setdefault((repr(sorted(cfg.items())), s["n_labels"]), []).append(i)
    return list(groups.values())


def stack_checkpoints(states: list, impl: Impl = Impl()):
    """One BertForClassification holding these classifier checkpoints (all of one shape) as its members,
    in order, on the implementations `impl` chooses; one checkpoint gives the plain model."""
    if len(states) == 1:
        return build_model(states[0], impl)
    ref = states[0]
    model = BertForClassification(BertConfig.from_dict(ref["model_config"]), ref["n_labels"], members=len(states),
                                  impl=impl)
    try:
        return load_members(model, [s["model"] for s in states])
    except ValueError as e:  # a checkpoint whose weights do not match its own config
        raise UserError(f"{', '.join(s['path'] for s in states)}: cannot stack ({e})")


def member_logits(model, x) -> torch.Tensor:
    """Every member's logits (K, B, C) for the same input x (B, T): one forward of the rows repeated
    once per member, member-major (K = 1: the plain model's logits, viewed (1, B, C))."""
    K = getattr(model, "members", 1)
    logits, _ = model(x.repeat(K, 1) if K > 1 else x)  # (K*B, C)
    return logits.view(K, x.size(0), -1)  # (K, B, C)


@torch.no_grad()
def predict_member_logits(model, ids: np.ndarray, device, batch_size: int = 256, precision: str = "fp32"):
    """Each member's logits (K, N, n_labels) in fp32 on the CPU, eval mode; batch_size rows per member;
    the forwards in precision ("fp32" | "bf16", tinytlm/precision.py)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(ids), batch_size):
        x = torch.from_numpy(np.asarray(ids[i:i + batch_size]).astype(np.int64)).to(device)  # (B, T)
        with autocast(device, precision):
            out.append(member_logits(model, x).float().cpu())  # (K, B, C)
    model.train(was_training)
    return torch.cat(out, dim=1)  # (K, N, C)


def predict_logits(model, ids: np.ndarray, device, batch_size: int = 256, precision: str = "fp32") -> torch.Tensor:
    """Logits (N, n_labels) of a single model in fp32 on the CPU, eval mode."""
    if getattr(model, "members", 1) != 1:
        raise ValueError("predict_logits takes a single model; use predict_member_logits for a stack")
    return predict_member_logits(model, ids, device, batch_size, precision)[0]


def committee_logits(member_logits) -> torch.Tensor:
    """Sum of the members' raw logits: (M, N, C) or a list of (N, C) -> (N, C)."""
    return torch.stack(list(member_logits)).sum(0)


def committee_forward(models, x, streams=None) -> torch.Tensor:
    """Soft-committee logits (B, C): the members' raw logits summed, each model (single or stacked) on its
    own CUDA stream.

    The members only read x, so on a GPU their kernels may overlap (at batch 1 one BERT-1 fills a
    fraction of the SMs). Pass the same `streams` (one torch.cuda.Stream per member) on every call.
    On CPU it is a plain loop. Call under torch.no_grad() and the run's autocast (tinytlm/precision.py).
    """
    if x.device.type != "cuda":
        return torch.cat([member_logits(m, x).float() for m in models]).sum(0)  # (M, B, C) -> (B, C)
    main = torch.cuda.current_stream(x.device)
    streams = streams or [torch.cuda.Stream(x.device) for _ in models]
    outs = []
    for m, s in zip(models, streams):
        s.wait_stream(main)  # x (and all work before it) is ready on main
        with torch.cuda.stream(s):
            x.record_stream(s)  # the allocator must not reuse x's memory before s is done
            outs.append(member_logits(m, x).float().sum(0))  # (B, C), allocated on s
    for s, out in zip(streams, outs):
        main.wait_stream(s)
        out.record_stream(main)  # read on main below
    return torch.stack(outs).sum(0)  # (M, B, C) -> (B, C)


def accuracy(logits: torch.Tensor, labels) -> float:
    labels = torch.as_tensor(np.asarray(labels))
    return (logits.argmax(-1) == labels).float().mean().item()


def per_label_accuracy(logits, labels, n_labels) -> list:
    pred = logits.argmax(-1).numpy()
    labels = np.asarray(labels)
    return [float((pred[labels == k] == k).mean()) if (labels == k).any() else float("nan")
            for k in range(n_labels)]


@torch.no_grad()
def batch1_latency_ms(models, ids: np.ndarray, device, n: int = 50, warmup: int = 5, parallel=False,
                      precision: str = "fp32") -> float:
    """Median wall time (ms) to classify one sequence with every model in `models`: one after
    another, or with parallel=True through committee_forward (one CUDA stream per model). A stacked
    model is one forward of all its members (the sequence repeated once per member)."""
    for m in models:
        m.eval()
    streams = [torch.cuda.Stream(device) for _ in models] if parallel and device.type == "cuda" else None
    times = []
    for i in range(min(len(ids), n) + warmup):
        x = torch.from_numpy(np.asarray(ids[i % len(ids)][None]).astype(np.int64)).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast(device, precision):
            if parallel:
                committee_forward(models, x, streams)
            else:
                for m in models:
                    member_logits(m, x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))
