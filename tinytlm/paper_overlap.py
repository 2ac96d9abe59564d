"""Which token statistic predicts the gap: a linear fit of the gap against T_M and the three
frequency-weighted overlaps, over every (task, pre-training set, W_s, checkpoint settings) cell of
one scale found in the records and the local cache."""
from pathlib import Path

import numpy as np

from tinytlm.common import read_json, write_json
from tinytlm.paper_cells import key_of
from tinytlm.paper_report import fmt, mlm_of
from tinytlm.paper_plots import plot_overlap

PREDICTORS = ("T_M", "occ_overlap", "log_freq_overlap", "occ_overlap_10")


def fine_tunings(cache: Path, records: Path, scale: str) -> list:
    """Every fine-tuning result of this scale, once each: records first, then cache cells not recorded
    (results of older versions carry no scale: they count as the cpu scale they were run at)."""
    rs = {}
    for p in sorted(Path(records).glob("*.json")) if records and Path(records).is_dir() else []:
        r = read_json(p)
        if r.get("kind") == "finetune":
            rs[r["key"]] = r
    for p in sorted((Path(cache) / "cls").glob("*/result.json")):
        r = read_json(p)
        if r.get("scale", "cpu") == scale and "key" in r:
            rs.setdefault(r["key"], r)
    return list(rs.values())


def cells_of(rs: list) -> list:
    scratch = {(r["match"], r["seed"]): r["acc"] for r in rs if r.get("arm") == "scratch" and "match" in r}
    groups = {}
    for r in rs:
        if r.get("arm") == "pretrained" and (r.get("match"), r["seed"]) in scratch and r["token_stats"]:
            # one cell = task x pre-training set x W_s x checkpoint settings (epochs, lr, ...) x architecture x
            # fine-tuning recipe; seeds averaged
            k = (r["task"], r["pretrain"]["pretrain_set"], r["pretrain"]["ws"],
                 key_of([r.get("pretrain_key"), r["model_config"], r["lr"], r["wd"], r["epochs"], r["n_train"]]))
            if k not in groups:  # the checkpoint's last epoch, read once per cell (not per seed)
                m = mlm_of(r) or {}
                groups[k] = {"gaps": [], "stats": r["token_stats"], "pt_epochs": m.get("epochs"),
                             "mlm_acc": m.get("mlm_acc")}
            groups[k]["gaps"].append(r["acc"] - scratch[(r["match"], r["seed"])])
    return [{"task": k[0], "pretrain_set": k[1], "ws": k[2], "pt_epochs": v["pt_epochs"], "mlm_acc": v["mlm_acc"],
             "gap": float(np.mean(v["gaps"])), "n": len(v["gaps"]), **v["stats"]} for k, v in groups.items()]


def fit(cells: list) -> dict:
    fits = {}
    for x in PREDICTORS:
        if len(cells) >= 3:
            xs, ys = np.array([c[x] for c in cells], float), np.array([c["gap"] for c in cells])
            if xs.std() > 0:
                slope, icpt = np.polyfit(xs, ys, 1)
                res = ys - (slope * xs + icpt)
                fits[x] = {"slope": float(slope), "intercept": float(icpt),
                           "r2": float(1 - res.var() / ys.var()) if ys.var() > 0 else float("nan")}
    return fits


def overlap(cache: Path, records: Path, results: Path, scale: str) -> dict:
    """results/<scale>/overlap.md, .json and .png."""
    results.mkdir(parents=True, exist_ok=True)
    cells = cells_of(fine_tunings(cache, records, scale))
    fits = fit(cells)
    lines = [f"# Gap vs token statistics (scale {scale}: every recorded or cached cell)", "",
             f"{len(cells)} (task, W_s, pre-training set, pre-training length) cells, gaps paired by seed and "
             "averaged.", ""]
    if len(cells) < 3:
        lines.append(f"Too few cells ({len(cells)}) to fit anything; run more tables first.")
    else:
        lines += ["| predictor | slope | R^2 |", "| --- | --- | --- |"]
        lines += [f"| {k} | {v['slope']:.3g} | {v['r2']:.3f} |" for k, v in fits.items()]
        ok = {k: v for k, v in fits.items() if np.isfinite(v["r2"])}
        best = max(ok, key=lambda k: ok[k]["r2"]) if ok else None
        lines += ["", f"Best single predictor: **{best}** (highest R^2)." if best else
                  "The gap (or every predictor) does not vary across cells: nothing to fit."]
        if len(cells) < 8:
            lines.append(f"Only {len(cells)} cells: treat the R^2 values as anecdotal.")
    lines += ["", "| task | set | W_s | pt epochs | MLM acc | T_M | occ_overlap | log_freq_overlap | occ_overlap_10 "
              "| gap | n |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {c['task']} | {c['pretrain_set']} | {c['ws']:,} | {fmt(c['pt_epochs'])} | {fmt(c['mlm_acc'])} "
              f"| {c['T_M']:,} | {c['occ_overlap']:.4f} | {c['log_freq_overlap']:.3f} | {c['occ_overlap_10']:.4f} "
              f"| {c['gap']:+.3f} | {c['n']} |" for c in cells]
    if cells and plot_overlap(cells, fits, results / "overlap.png"):
        lines += ["", "![gap vs token statistics](overlap.png)"]
    (results / "overlap.md").write_text("\n".join(lines) + "\n")
    write_json(results / "overlap.json", {"cells": cells, "fits": fits})
    print(f"overlap: {len(cells)} cells; " + ", ".join(f"R^2({k}) {v['r2']:.3f}" for k, v in fits.items()))
    return {"cells": cells, "fits": fits}
