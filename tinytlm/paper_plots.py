"""The paper runner's figures, in the style of tinytlm/report.py: one small PNG per table (matplotlib is
optional: without it the reports say so)."""
from pathlib import Path

import numpy as np


def plot(kind: str, recs: list, title: str, path: Path):
    """gap vs W_s or vs pre-training length, accuracy vs T_M, or members vs committee vs reference;
    None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    if kind == "gap_vs_ws":
        rs = sorted([r for r in recs if "gap_mean" in r and not r["name"].startswith("64")], key=lambda r: r["ws"])
        ax.errorbar([r["ws"] for r in rs], [r["gap_mean"] for r in rs], [r["gap_std"] for r in rs], marker="o",
                    label="ours (mean ± std over seeds)")
        pp = sorted({(r["paper"].get("at W_s", r["ws"]), r["paper"]["gap"]) for r in rs
                     if isinstance(r["paper"].get("gap"), float)})
        if pp:
            ax.plot(*zip(*pp), "s--", color="grey", label="paper (BERT-6)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xscale="log", xlabel="W_s", ylabel="gap (accuracy)")
    elif kind == "gap_vs_labels":
        _gap_vs_labels(ax, recs)
    elif kind == "acc_vs_tm":
        rs = [r for r in recs if "T_M" in r]
        ax.errorbar([r["T_M"] for r in rs], [r["acc_mean"] for r in rs], [r["acc_std"] for r in rs], fmt="o",
                    label="ours")
        for r in rs:
            ax.annotate(r["name"], (r["T_M"], r["acc_mean"]), fontsize=6)
        ax.set(xlabel="T_M", ylabel="accuracy")
    elif kind == "gap_vs_budget":
        rs = sorted([r for r in recs if "gap_mean" in r], key=lambda r: r["pt_epochs"])
        xs = [r["ws"] * r["pt_epochs"] for r in rs]
        ax.errorbar(xs, [r["gap_mean"] for r in rs], [r["gap_std"] for r in rs], marker="o",
                    label="ours (mean ± std over seeds)")
        for x, r in zip(xs, rs):
            if "mlm_acc" in r:
                ax.annotate(f"MLM acc {r['mlm_acc']:.2f}", (x, r["gap_mean"]), fontsize=7)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xscale="log", xlabel="pre-training sequences (W_s x epochs)", ylabel="gap (accuracy)")
    else:
        ax.bar(range(len(recs)), [r["acc_mean"] for r in recs], yerr=[r["acc_std"] for r in recs], label="ours")
        ax.set_xticks(range(len(recs)), [r["name"] for r in recs], rotation=60, ha="right", fontsize=6)
        ax.set(ylabel="accuracy")
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def _gap_vs_labels(ax, recs: list):
    """The labels sweep: gap against train rows per label (log), the checkpoint's <APT> in the legend, and
    the two arms' accuracies on a second axis."""
    rs = sorted([r for r in recs if "gap_mean" in r], key=lambda r: r["per_label"])
    apt = next((r["mean_apt"] for r in rs if r.get("mean_apt") is not None), None)
    ax.errorbar([r["per_label"] for r in rs], [r["gap_mean"] for r in rs], [r["gap_std"] for r in rs], marker="o",
                label="gap, mean ± std over seeds" + (f" (checkpoint <APT> {apt:.4f})" if apt is not None else ""))
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xscale="log", xlabel="train rows per label", ylabel="gap (accuracy)")
    ax.set_xticks([r["per_label"] for r in rs], [f"{r['per_label']:,}" for r in rs])
    ax.minorticks_off()
    acc = ax.twinx()
    for tag, style in (("W_s", "^:"), ("no pre-training", "v:")):
        arm = sorted([r for r in recs if r["n"] and tag in r["name"]], key=lambda r: r["per_label"])
        acc.plot([r["per_label"] for r in arm], [r["acc_mean"] for r in arm], style, color="grey", ms=4,
                 label="accuracy: " + ("pre-trained" if tag == "W_s" else tag))
    acc.set_ylabel("accuracy", color="grey")
    acc.legend(fontsize=6, loc="lower right")


def plot_overlap(cells, fits, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.5))
    for ax, x in zip(axes, ("T_M", "occ_overlap", "log_freq_overlap", "occ_overlap_10")):
        ax.scatter([c[x] for c in cells], [c["gap"] for c in cells], s=12)
        if x in fits:
            xs = np.linspace(min(c[x] for c in cells), max(c[x] for c in cells), 2)
            ax.plot(xs, fits[x]["slope"] * xs + fits[x]["intercept"], "--", label=f"R^2 {fits[x]['r2']:.2f}")
            ax.legend(fontsize=7)
        ax.set(xlabel=x, ylabel="gap")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
