"""Token confusion and "strong match" token clusters, from predictions at the held-out masked positions.

Confusion counts: C[i, j] = how often a modified (MLM-selected) occurrence of token i was predicted as j.
Our reading of the normalisation (the papers' abstracts give its outline, not its details):
- a token i is kept when its row maximum is on the diagonal (C[i, i] > 0 and C[i, i] >= C[i, j] for all
  j); the others are left out, as rows and as columns;
- among kept tokens, N[i, j] = C[i, j] / C[i, i] (so N[i, i] = 1 and 0 <= N[i, j] <= 1);
- i and j "strongly match" when N[i, j] >= threshold or N[j, i] >= threshold (default 0.5: i is
  predicted as j at least half as often as it is predicted right); clusters are the connected groups of
  strongly matching tokens, of 2 or more tokens; a kept token that matches none is a singleton.
The matrix is sparse: only the (i, j) pairs that occur are stored.
"""
import numpy as np


def confusion_counts(targets: np.ndarray, preds: np.ndarray) -> tuple:
    """(rows, cols, counts): every (true token, predicted token) pair that occurs and how often,
    sorted by (row, col); int64 arrays."""
    pairs, n = np.unique(np.stack([targets, preds], 1).astype(np.int64), axis=0, return_counts=True)
    if len(pairs) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return pairs[:, 0], pairs[:, 1], n.astype(np.int64)


def kept_tokens(rows, cols, counts) -> np.ndarray:
    """The sorted token ids whose row maximum is their diagonal entry (ties count as the diagonal)."""
    if len(rows) == 0:
        return np.zeros(0, np.int64)
    ids, inverse = np.unique(rows, return_inverse=True)
    row_max = np.zeros(len(ids), np.int64)
    np.maximum.at(row_max, inverse, counts)
    diag = np.zeros(len(ids), np.int64)
    on = rows == cols
    diag[inverse[on]] = counts[on]
    return ids[(diag > 0) & (diag >= row_max)]


def normalised(rows, cols, counts) -> tuple:
    """(kept, rows, cols, counts, values): the kept tokens, the entries between them and each entry divided
    by its row's diagonal count (float64)."""
    kept = kept_tokens(rows, cols, counts)
    sel = np.isin(rows, kept) & np.isin(cols, kept)
    r, c, n = rows[sel], cols[sel], counts[sel]
    diag = dict(zip(r[r == c].tolist(), n[r == c].tolist()))
    return kept, r, c, n, n / np.array([diag[i] for i in r.tolist()], dtype=np.float64)


def strong_clusters(kept, rows, cols, values, threshold: float = 0.5) -> list:
    """Connected groups (sorted token lists, largest first, then by first id) of 2+ kept tokens joined by
    an off-diagonal normalised entry >= threshold."""
    parent = {int(t): int(t) for t in kept}

    def find(t):
        while parent[t] != t:
            parent[t] = parent[parent[t]]  # path halving
            t = parent[t]
        return t

    for i, j, v in zip(rows.tolist(), cols.tolist(), values.tolist()):
        if i != j and v >= threshold:
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups = {}
    for t in parent:
        groups.setdefault(find(t), []).append(t)
    clusters = [sorted(g) for g in groups.values() if len(g) > 1]
    return sorted(clusters, key=lambda g: (-len(g), g[0]))


def size_distribution(clusters: list, n_kept: int) -> dict:
    """{cluster size: how many clusters}, size 1 = the kept tokens in no cluster (JSON keys as strings)."""
    sizes = {1: n_kept - sum(len(c) for c in clusters)} if n_kept else {}
    for c in clusters:
        sizes[len(c)] = sizes.get(len(c), 0) + 1
    return {str(k): v for k, v in sorted(sizes.items()) if v}


def confusion_report(targets, preds, threshold: float = 0.5, words=None) -> tuple:
    """(summary dict, arrays): the clusters and their size distribution, and the sparse normalised matrix
    (kept, rows, cols, counts, values) for an .npz. words: id -> token string, to show the clusters."""
    rows, cols, counts = confusion_counts(targets, preds)
    kept, r, c, n, values = normalised(rows, cols, counts)
    clusters = strong_clusters(kept, r, c, values, threshold)
    summary = {
        "threshold": threshold,
        "tokens": int(len(np.unique(rows))),  # tokens with a row (selected at least once)
        "kept": int(len(kept)),
        "clusters": len(clusters),
        "tokens_in_clusters": int(sum(len(g) for g in clusters)),
        "size_distribution": size_distribution(clusters, len(kept)),
        "largest": [[words[t] for t in g] if words else g for g in clusters[:20]],
        "cluster_ids": clusters,
    }
    arrays = {"kept": kept, "rows": r, "cols": c, "counts": n, "values": values}
    return summary, arrays
