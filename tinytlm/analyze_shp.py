"""Single-head performance (SHP) and single-node performance (SNP) of a classifier's head.

For a block's [CLS] states h (N, H) and the head trained on them (the classifier's own head for the
last block; the block's linear probe for the others, see tinytlm/analyze_probes.py), a node group g
(a head: H is n_head slices of head_dim nodes, the layout of the attention heads; size 1: single nodes)
keeps its weights into the head and every other node's weights are silenced (their inputs zeroed, biases
kept). On the test rows:
- field matrix M (C x C): M[i, j] = mean output field (logit) of output unit j over the rows of true
  label i;
- normalisation (our reading; option `norm`): "column" (default) subtracts each column's mean over the
  labels (an output unit's offset, e.g. its bias, says nothing about the label) and divides by the
  largest |entry|; "max" only divides by the largest |entry|; "none" keeps M;
- Boolean matrix B = normalised M >= threshold (default 0.5);
- clusters: the labels the group recognises (B[i, i]) joined when B[i, j] or B[j, i]: connected groups;
  the entries (i, j) with i, j in one cluster are inside, the rest outside;
- noise = the true entries of B outside the clusters (a count); signal = the mean normalised entry
  inside the clusters; noise level = the mean |normalised entry| outside; SNR = signal / noise level
  (inf when nothing outside is non-zero; 0 without clusters).
The papers state the outline (clusters of the thresholded matrix, noise outside them, SNR along the
blocks); the thresholds and normalisation above are ours.
"""
import math

import numpy as np
import torch

NORMS = ("column", "max", "none")


def field_matrix(fields, labels, n_labels: int) -> np.ndarray:
    """M (C, C) float64: row i = the mean fields (N, C) over the rows with label i (zeros without rows)."""
    f = np.asarray(fields, dtype=np.float64)
    y = np.asarray(labels)
    return np.stack([f[y == i].mean(0) if (y == i).any() else np.zeros(f.shape[1]) for i in range(n_labels)])


def normalise(m: np.ndarray, norm: str = "column") -> np.ndarray:
    if norm not in NORMS:
        raise ValueError(f"norm {norm!r}: choose {', '.join(NORMS)}")
    if norm == "none":
        return m.copy()
    x = m - m.mean(0, keepdims=True) if norm == "column" else m.copy()
    top = np.abs(x).max(initial=0.0)
    return x / top if top > 0 else x


def label_clusters(b: np.ndarray) -> list:
    """Connected groups (sorted label lists, by first label) of the recognised labels (b[i, i])
    joined where b[i, j] or b[j, i]."""
    n = len(b)
    recognised = [i for i in range(n) if b[i, i]]
    parent = {i: i for i in recognised}

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in recognised:
        for j in recognised:
            if i < j and (b[i, j] or b[j, i]):
                a, c = find(i), find(j)
                parent[max(a, c)] = min(a, c)
    groups = {}
    for i in recognised:
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values())


def shp_stats(m: np.ndarray, threshold: float = 0.5, norm: str = "column") -> dict:
    """The clusters, noise and SNR of one field matrix M (C, C), as the module docstring defines them."""
    x = normalise(m, norm)
    b = x >= threshold
    clusters = label_clusters(b)
    inside = np.zeros_like(b)
    for c in clusters:
        inside[np.ix_(c, c)] = True
    signal = float(x[inside].mean()) if inside.any() else 0.0
    level = float(np.abs(x[~inside]).mean()) if (~inside).any() else 0.0
    snr = signal / level if level > 0 else (math.inf if signal > 0 else 0.0)
    return {"matrix": m.tolist(), "normalised": x.tolist(), "boolean": b.astype(int).tolist(), "clusters": clusters,
            "noise": int((b & ~inside).sum()), "signal": signal, "noise_level": level, "snr": snr}


def node_groups(hidden: int, size: int) -> list:
    """Contiguous node groups [start, stop) of `size` nodes (the last one may be smaller)."""
    if size < 1:
        raise ValueError(f"node group size {size}: must be >= 1")
    return [(a, min(a + size, hidden)) for a in range(0, hidden, size)]


@torch.no_grad()
def shp_block(fields_fn, feats, labels, n_labels: int, size: int, threshold: float = 0.5,
              norm: str = "column") -> dict:
    """SHP of one block: fields_fn(feats (N, H), keep (H,) or None) -> fields (N, C) is the trained head
    with the nodes of keep 0 silenced. Per group of `size` nodes: its stats and its accuracy (argmax of
    its fields); the same with every node ("all_nodes"); the mean finite SNR over the groups."""
    H = feats.shape[1]
    y = np.asarray(labels)
    groups = []
    for a, b in node_groups(H, size):
        keep = torch.zeros(H, dtype=feats.dtype)
        keep[a:b] = 1
        f = fields_fn(feats, keep)
        groups.append({"nodes": [a, b], "accuracy": float((f.argmax(-1).numpy() == y).mean()),
                       **shp_stats(field_matrix(f, y, n_labels), threshold, norm)})
    f = fields_fn(feats, None)
    full = {"accuracy": float((f.argmax(-1).numpy() == y).mean()),
            **shp_stats(field_matrix(f, y, n_labels), threshold, norm)}
    finite = [g["snr"] for g in groups if math.isfinite(g["snr"])]
    return {"group_size": size, "threshold": threshold, "norm": norm, "groups": groups, "all_nodes": full,
            "mean_snr": float(np.mean(finite)) if finite else None,
            "infinite_snr": sum(1 for g in groups if math.isinf(g["snr"])),
            "mean_noise": float(np.mean([g["noise"] for g in groups]))}
