"""Figures of an analysis (python -m tinytlm.analyze RUN --plot), drawn from the files it writes.

apt_frequency.png   APT of every token against its count in the W_s rows (log scale; tokens W_s never
                    contains drawn apart, left of 1), with <APT> and the accuracy per log2 bin
blocks.png          pre-training: <APT> and accuracy per state (a probe per block) and of the model's own
                    head; classifier: the linear probes' test accuracy per state and the trained head's
clusters.png        strong-match cluster sizes per state, and how many tokens fall in clusters
shp_<state>.png     heat maps of the normalised single-head field matrices of that state, one per group
snr.png             SNR of every group and their mean, per analysed state

Drawn as tinytlm/report.py draws: matplotlib's Agg canvas, constrained layout, light grids, small legends.
"""
import math

import numpy as np

from tinytlm.report import _matplotlib

MAX_MAPS = 36  # heat maps per SHP figure (single-node analysis of BERT-6 has 768 groups: the first 36)


def _figure(nrows: int, ncols: int, w: float = 5.5, h: float = 3.4):
    Figure, FigureCanvasAgg, _ = _matplotlib()
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas draws to PNG; no window is ever made
    return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()


def apt_frequency(apt: dict, label: str):
    tokens, counts = apt["tokens"], apt["ws_counts"]
    ids = list(tokens)
    x = np.array([counts[t] for t in ids], dtype=float)
    y = np.array([tokens[t][0] / tokens[t][1] for t in ids])
    fig, (ax, bx) = _figure(1, 2)
    unseen = x == 0
    ax.scatter(x[~unseen], y[~unseen], s=4, alpha=0.3, color="C0", label="tokens")
    ax.scatter(np.full(unseen.sum(), 0.5), y[unseen], s=4, alpha=0.3, color="C3", label="not in W_s (at 0.5)")
    bins = [b for b in apt["by_frequency"] if b["tokens"]]
    mids = [0.5 if b["lo"] == 0 else math.sqrt(b["lo"] * b["hi"]) for b in bins]
    ax.plot(mids, [b["mean_apt"] for b in bins], "o-", color="k", markersize=3, label="<APT> per bin")
    ax.plot(mids, [b["accuracy"] for b in bins], "s--", color="C2", markersize=3, label="accuracy per bin")
    tm = (apt.get("task_tokens") or {}).get("T_M_group") or {}
    if tm.get("tokens"):
        ax.scatter([0.5], [tm["mean_apt"]], marker="*", s=80, color="C1", zorder=3,
                   label=f"<APT> of T_M ({tm['tokens']} tokens)")
    ax.set(xscale="log", xlabel="count in the W_s rows", ylabel="APT",
           title=f"APT vs frequency: <APT> {apt['mean_apt']:.4f}, accuracy {apt['accuracy']:.4f}")
    bx.bar(range(len(bins)), [b["occurrences"] for b in bins], color="C0")
    bx.set_xticks(range(len(bins)), ["0" if b["lo"] == 0 else f"{b['lo']}" for b in bins], rotation=60, fontsize=7)
    bx.set(yscale="log", xlabel="W_s count bin (lower bound)", ylabel="held-out masked positions",
           title="held-out positions per bin")
    for a in (ax, bx):
        a.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(label)
    return fig


def blocks(b: dict, label: str):
    names = [s["state"] for s in b["states"]]
    fig, (ax,) = _figure(1, 1)
    if b["kind"] == "blocks-mlm":
        ax.plot(names, [s["mean_apt"] for s in b["states"]], "o-", label="<APT>, probe")
        ax.plot(names, [s["accuracy"] for s in b["states"]], "s--", label="accuracy, probe")
        ax.axhline(b["head"]["mean_apt"], color="C0", alpha=0.5, linestyle=":", label="<APT>, the model's head")
        ax.axhline(b["head"]["accuracy"], color="C1", alpha=0.5, linestyle=":", label="accuracy, the model's head")
        ax.set(title=f"along the blocks: MLM probes ({b['probe']['steps']} steps)", ylabel="held-out")
    else:
        ax.plot(names, [s["accuracy"] for s in b["states"]], "o-", label="linear probe on [CLS]")
        ax.axhline(b["head_accuracy"], color="C1", alpha=0.5, linestyle=":", label="the trained head")
        ax.set(title=f"along the blocks: linear probes ({b['probe']['steps']} steps)", ylabel="test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(label)
    return fig


def clusters(c: dict, label: str):
    fig, (ax, bx) = _figure(1, 2)
    names = list(c["states"])
    for k, name in enumerate(names):
        dist = {int(s): n for s, n in c["states"][name]["size_distribution"].items() if int(s) > 1}
        if dist:
            ax.plot(list(dist), list(dist.values()), "o-", color=f"C{k % 10}", markersize=3, label=name)
    if not ax.get_lines():
        ax.text(0.5, 0.5, "no cluster of 2 or more tokens", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="cluster size (tokens)", ylabel="clusters", yscale="log",
           title=f"strong-match clusters (threshold {c['states'][names[0]]['threshold']})")
    bx.plot(names, [c["states"][n]["tokens_in_clusters"] for n in names], "o-", label="tokens in clusters")
    bx.plot(names, [c["states"][n]["kept"] for n in names], "s--", label="kept tokens (diagonal row maximum)")
    bx.set(title="tokens per state")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.suptitle(label)
    return fig


def shp_maps(block: dict, label: str):
    groups = block["groups"][:MAX_MAPS]
    ncols = min(6, len(groups))
    fig, axes = _figure(math.ceil(len(groups) / ncols), ncols, w=2.2, h=2.2)
    for ax, g in zip(axes, groups):
        ax.imshow(np.array(g["normalised"]), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(f"nodes {g['nodes'][0]}-{g['nodes'][1] - 1}: SNR {_fmt(g['snr'])}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(groups):]:
        ax.remove()
    more = f" (first {MAX_MAPS} of {len(block['groups'])})" if len(block["groups"]) > MAX_MAPS else ""
    fig.suptitle(f"{label}: SHP of {block['state']} ({block['head']}), rows true label, columns output{more}",
                 fontsize=9)
    return fig


def snr(shp: dict, label: str):
    fig, (ax,) = _figure(1, 1)
    names = [b["state"] for b in shp["blocks"]]
    for k, b in enumerate(shp["blocks"]):
        vals = [g["snr"] for g in b["groups"] if g["snr"] is not None and math.isfinite(g["snr"])]
        ax.scatter([k] * len(vals), vals, s=8, alpha=0.5, color="C0")
    ax.plot(range(len(names)), [b["mean_snr"] if b["mean_snr"] is not None else np.nan for b in shp["blocks"]],
            "o-", color="k", label="mean over groups")
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="SNR", title="single-head SNR per state")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(label)
    return fig


def _fmt(x):
    return "inf" if x is None or math.isinf(x) else f"{x:.2f}"


def figures(files: dict, label: str) -> dict:
    """{file stem: Figure} for the analysis files at hand (tinytlm.analyze's {name: content})."""
    out = {}
    if "apt.json" in files:
        out["apt_frequency"] = apt_frequency(files["apt.json"], label)
    if "blocks.json" in files:
        out["blocks"] = blocks(files["blocks.json"], label)
    if "confusion.json" in files:
        out["clusters"] = clusters(files["confusion.json"], label)
    if "shp.json" in files:
        for b in files["shp.json"]["blocks"]:
            out[f"shp_{b['state']}"] = shp_maps(b, label)
        out["snr"] = snr(files["shp.json"], label)
    return out
