"""Reports of the paper runner: a table's cells summarised per row, written as markdown and JSON.

A report depends on its cells alone (no time of writing, no host paths), so rebuilding it from the
same records gives the same files, whichever machine or day it is rebuilt on. Each number says which
device and date produced it (section "Where the numbers come from").
"""
from pathlib import Path

import numpy as np

from tinytlm.common import write_json
from tinytlm.config import fold_compile
from tinytlm.paper_records import last_record


def _stats(xs) -> tuple:
    xs = np.asarray(xs, float)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def mlm_of(cell: dict):
    """The pre-trained checkpoint's summary a cell was fine-tuned from: kept in the record (since records
    travel without checkpoints), else read from the local cache's metrics (cells of older versions)."""
    if cell.get("mlm"):
        return cell["mlm"]
    if cell.get("init") and (ep := last_record(Path(cell["init"]).parent, "epoch")):
        return {"dir": Path(cell["init"]).parent.name, "epochs": ep["epoch"] + 1, "steps": ep["step"],
                "loss": ep["loss"], "mlm_acc": ep["mlm_acc"]}
    return None


def pretrain_fields(row: dict, rs: list) -> dict:
    """A pre-trained row's pre-training epochs and, from its first cell's checkpoint, the MLM metrics:
    training accuracy, held-out accuracy and <APT> (records of older versions have neither of the last two)."""
    fields = {"pt_epochs": row["pretrain"].get("epochs")}
    m = mlm_of(rs[0]) if rs else None
    if m and m.get("mlm_acc") is not None:
        fields["mlm_acc"] = m["mlm_acc"]
        fields.update({k: m[k] for k in ("val_mlm_acc", "mean_apt") if m.get(k) is not None})
    return fields


def summarize(out: dict) -> list:
    """One record per row: acc and gap as mean, std, n over seeds, token stats, the paper's numbers.
    Gaps and committee margins pair cells by trial (the table's seed index): a trial missing on either
    side is left out of the difference."""
    cells, recs = out["cells"], []
    trials = {name: {r["trial"]: r["acc"] for r in rs} for name, rs in cells.items()}
    for row in out["grid"]["rows"]:
        rs = cells[row["name"]]
        rec = {"name": row["name"], "kind": row["kind"], "n": len(rs), "acc": [r["acc"] for r in rs],
               "paper": row["paper"], "ws": (row.get("pretrain") or {}).get("ws", 0),
               "pretrain_set": (row.get("pretrain") or {}).get("pretrain_set"),
               "per_label": (row.get("finetune") or {}).get("train_per_label"),
               "devices": sorted({r.get("device") or "unknown" for r in rs}),
               "precisions": sorted({r.get("precision") or "fp32" for r in rs})}
        if rs:
            rec["acc_mean"], rec["acc_std"] = _stats(rec["acc"])
        if row.get("pretrain"):
            rec.update(pretrain_fields(row, rs))
        st = rs[0].get("token_stats") if rs else None
        if st:
            rec.update({k: st[k] for k in ("T_W", "T_C", "T_M", "occ_overlap", "log_freq_overlap", "occ_overlap_10")})
            if row.get("pretrain"):
                rec["ws"] = rs[0]["pretrain"]["ws"]  # actual rows (a custom set may be smaller than asked)
        mine = trials[row["name"]]
        diffs = {}
        if row.get("gap_of"):
            other = trials[row["gap_of"]]
            diffs["gap"] = [mine[t] - other[t] for t in sorted(mine) if t in other]
        if row["kind"] == "committee":  # per trial: committee minus its best member, and minus the reference
            both = [t for t in sorted(mine) if all(t in trials[m] for m in row["members"])]
            diffs["vs_best_member"] = [mine[t] - max(trials[m][t] for m in row["members"]) for t in both]
            if row.get("reference") in trials:
                ref = trials[row["reference"]]
                diffs["vs_reference"] = [mine[t] - ref[t] for t in sorted(mine) if t in ref]
        for k, d in diffs.items():
            if d:
                rec[k] = d
                rec[k + "_mean"], rec[k + "_std"] = _stats(d)
                rec[k + "_n"] = len(d)
        recs.append(rec)
    return recs


def fmt(x, nd=3):
    if x is None or x == "":
        return ""
    if isinstance(x, (int, np.integer)):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def verdict(r: dict) -> str:
    """A gap is called only when it is at least two standard errors from zero."""
    k, what = ("gap", "gap") if "gap_mean" in r else ("vs_best_member", "committee - best member")
    if k + "_mean" not in r or r[k + "_n"] < 2:
        return ""
    se = r[k + "_std"] / np.sqrt(r[k + "_n"])
    if se == 0 or abs(r[k + "_mean"]) < 2 * se:
        return f"no significant {what}" if k == "gap" else f"{what}: not significant"
    return f"{what} {'>' if r[k + '_mean'] > 0 else '<'} 0"


def _short_device(name: str) -> str:
    return (name or "unknown").replace("NVIDIA ", "")


def path_text(p) -> str:
    """'eager', 'compile auto' or 'compiled (mode)', and the kernels: how a cell was run (speed only; a record
    from before --compile took a mode has compile true/false and compile_mode)."""
    if not p:
        return ""
    c = fold_compile(p).get("compile") or "off"
    how = {"off": "eager", "auto": "compile auto", "on": "compiled"}.get(c, f"compiled ({c})")
    return how + f", kernels {p.get('kernels')}"


def provenance(out: dict) -> list:
    """Markdown lines: for every cell, the device, date, git revision, time and speed that produced it."""
    lines = ["| row | seed | device | date | git | seconds | fine-tuning seq/s | pre-training seq/s | path |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, rs in out["cells"].items():
        for r in rs:
            m = mlm_of(r) or {}
            path = path_text(r.get("path")) + f", {r.get('precision') or 'fp32'}"
            lines.append(f"| {name} | {r['seed']} | {_short_device(r.get('device'))} | {r.get('date', '')} "
                         f"| {r.get('git', '')} | {fmt(r.get('seconds'), 0)} | {fmt(r.get('seq_per_s'), 0)} "
                         f"| {fmt(m.get('seq_per_s'), 0)} | {path} |")
    return lines


def write_report(out: dict, recs: list, results: Path, meta: dict):
    """results/<scale>/<table>.md and .json (and the plot named in meta) from the cells alone."""
    g = out["grid"]
    cells = [c for rs in out["cells"].values() for c in rs]
    lines = head_lines(g, cells, meta) + row_table(recs, g["not_reproduced"]) + data_lines(cells)
    lines += ["", "## Test accuracy per fine-tuning epoch (mean over seeds)", ""]
    lines += [f"- {name}: " + ", ".join(f"{a:.3f}" for a in np.mean([c["acc_per_epoch"] for c in rs], axis=0))
              for name, rs in out["cells"].items() if rs and "acc_per_epoch" in rs[0]]
    lines += ["", "## Deviations from the paper", ""] + [f"- {d}" for d in g["deviations"]]
    lines += ["", "## Where the numbers come from", ""] + provenance(out)
    if meta.get("plot"):
        lines += ["", f"![plot]({meta['plot']})"]
    elif meta.get("plot_note"):
        lines += ["", meta["plot_note"]]
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{g['table']}.md").write_text("\n".join(lines) + "\n")
    write_json(results / f"{g['table']}.json", {"meta": meta, "grid": g, "rows": recs, "cells": out["cells"]})


def head_lines(g: dict, cells: list, meta: dict) -> list:
    """Title, how many cells are done and where, the command, how to read the table."""
    devices = sorted({_short_device(c.get("device")) for c in cells})
    precisions = sorted({c.get("precision") or "fp32" for c in cells})  # (a record from before --precision: fp32)
    dates = sorted(c["date"][:10] for c in cells if c.get("date"))
    expected = len(g["rows"]) * meta["seeds"]
    return [f"# {g['title']}", "",
            f"Scale **{g['scale']}**; {len(cells)} of {expected} cells ({meta['seeds']} seeds x {len(g['rows'])} "
            f"rows) "
            f"done, on {', '.join(devices) or 'nothing yet'}" + (f" in {' and '.join(precisions)}" if cells else "")
            + (f", {dates[0]} to {dates[-1]}" if dates else "") + ".", "",
            f"Command: `{meta['command']}` (cells come from the records in results/cells/{g['scale']}/ and the "
            "local cache; this command rebuilds the report and runs what is missing)", "",
            "Ours: final-epoch test accuracy, mean ± std over n seeds; gap = pre-trained minus not pre-trained, "
            "paired by seed. 'no significant gap' = within two standard errors of zero. `<APT>`: the pre-trained "
            "checkpoint's accuracy per token averaged over the tokens its held-out masks select (docs/analysis.md; "
            "computed once per checkpoint, kept in the records).", ""]


def row_table(recs: list, not_reproduced: list) -> list:
    """The table itself: one line per row (summarize's records), then the paper's rows we cannot run."""
    lines = ["| row | W_s | T_W | T_M | `<APT>` | acc (ours) | gap or committee margin (ours) | n | verdict | device "
             "| paper |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in recs:
        gap = [f"{r['gap_mean']:+.3f} ± {r['gap_std']:.3f}"] if "gap_mean" in r else []
        gap += [f"{label} {r[k + '_mean']:+.3f} ± {r[k + '_std']:.3f}"
                for k, label in (("vs_best_member", "vs best member"), ("vs_reference", "vs reference"))
                if k + "_mean" in r]
        ws = "" if r["kind"] == "committee" else fmt(r["ws"]) if r["ws"] else "0"
        paper = ", ".join(f"{k} {fmt(v)}" for k, v in r["paper"].items())
        acc = f"{r['acc_mean']:.3f} ± {r['acc_std']:.3f}" if r["n"] else "not run yet"
        lines.append(f"| {r['name']} | {ws} | {fmt(r.get('T_W'))} | {fmt(r.get('T_M'))} | {fmt(r.get('mean_apt'), 4)} "
                     f"| {acc} | {'; '.join(gap)} "
                     f"| {r['n']} | {verdict(r)} | {', '.join(map(_short_device, r['devices']))}{precision_note(r)} "
                     f"| {paper} |")
    for r in not_reproduced:
        lines.append(f"| {r['name']} | | | | | not reproduced | not reproduced | 0 | | | "
                     + ", ".join(f"{k} {fmt(v)}" for k, v in r["paper"].items()) + " |")
    return lines


def precision_note(r: dict) -> str:
    """' (bf16)' after a row's devices when its cells were not all computed in fp32."""
    ps = r.get("precisions") or ["fp32"]
    return "" if ps == ["fp32"] else f" ({', '.join(ps)})"


def data_lines(cells: list) -> list:
    """The tasks and pre-training sets the cells used, and the checkpoints they were fine-tuned from."""
    data = sorted({c["task"] for c in cells if "task" in c})
    pre = sorted({(c["pretrain"]["pretrain_set"], "/".join(Path(c["pretrain"]["shard"]).parts[-2:]))
                  for c in cells if c.get("pretrain")})
    lines = ["", "## Data used", ""] + [f"- task `{d}` (data/{d}/meta.json lists the source rows)" for d in data]
    lines += [f"- pre-training: {k} set, first W_s rows of `{p}`" for k, p in pre]
    sizes = sorted({(c["task"], c["n_train"], c["n_test"]) for c in cells if "n_train" in c})
    lines += [f"- `{t}`: {a:,} train rows, {b:,} test rows" for t, a, b in sizes]
    if pre:
        lines += ["", "## Pre-trained checkpoints", "",
                  "| checkpoint | epochs | steps | final-epoch MLM loss | MLM acc | held-out MLM loss "
                  "| held-out MLM acc |",
                  "| --- | --- | --- | --- | --- | --- | --- |"] + mlm_lines(cells)
    return lines


def mlm_lines(cells: list) -> list:
    """One line per pre-trained checkpoint the cells used."""
    seen = {}
    for c in cells:
        if (m := mlm_of(c)) and m.get("epochs"):
            seen.setdefault(m["dir"], m)
    def val(k):  # (checkpoints of versions before the held-out rows have none)
        return lambda m: f"{m[k]:.3f}" if m.get(k) is not None else "-"
    return [f"| `{d}` | {m['epochs']} | {m['steps']:,} | {m['loss']:.3f} | {m['mlm_acc']:.3f} | "
            f"{val('val_loss')(m)} | {val('val_mlm_acc')(m)} |" for d, m in sorted(seen.items())]
