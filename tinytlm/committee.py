"""Evaluation, the soft committee and latency measurement.

Soft committee (PAPER.md): sum the members' raw logits, no softmax or normalisation,
and take the argmax.
"""
import time

import numpy as np
import torch

from tinytlm.train import autocast


@torch.no_grad()
def predict_logits(model, ids: np.ndarray, device, batch_size: int = 256) -> torch.Tensor:
    """Logits (N, n_labels) in fp32 on the CPU, eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(ids), batch_size):
        x = torch.from_numpy(np.asarray(ids[i:i + batch_size]).astype(np.int64)).to(device)
        with autocast(device):
            logits, _ = model(x)
        out.append(logits.float().cpu())
    model.train(was_training)
    return torch.cat(out)


def committee_logits(member_logits) -> torch.Tensor:
    """Sum of the members' raw logits: (M, N, C) or a list of (N, C) -> (N, C)."""
    return torch.stack(list(member_logits)).sum(0)


def accuracy(logits: torch.Tensor, labels) -> float:
    labels = torch.as_tensor(np.asarray(labels))
    return (logits.argmax(-1) == labels).float().mean().item()


def per_label_accuracy(logits, labels, n_labels) -> list:
    pred = logits.argmax(-1).numpy()
    labels = np.asarray(labels)
    return [float((pred[labels == k] == k).mean()) if (labels == k).any() else float("nan")
            for k in range(n_labels)]


@torch.no_grad()
def batch1_latency_ms(models, ids: np.ndarray, device, n: int = 50, warmup: int = 5) -> float:
    """Median wall time (ms) to classify one sequence with every model in `models`, one after another."""
    for m in models:
        m.eval()
    times = []
    for i in range(min(len(ids), n) + warmup):
        x = torch.from_numpy(np.asarray(ids[i % len(ids)][None]).astype(np.int64)).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast(device):
            for m in models:
                m(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))
