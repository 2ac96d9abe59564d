"""The paper runner's `analyze` target: tinytlm.analyze on every checkpoint of a table found in the local cache.

    python -m tinytlm.paper analyze --table table5 --scale cpu     # -> results/cpu/analysis/table5.md, .json, PNGs

For each pre-trained checkpoint of the table: <APT>, APT against the W_s count (the table's task's T_M
tokens apart), a fresh MLM probe per block and its <APT>, the token confusion clusters per block; for
each fine-tuned classifier: a linear probe per block and single-head performance (SHP) of the last block
(definitions and our readings: docs/analysis.md). The full analysis of a checkpoint (apt.json with every
token, the .npz matrices, the probes' logs) stays in the cache, CACHE/analysis/<cell folder>/, computed
once (its summary.json marks it done); the results folder gets only the small files: one summary per
table (RESULTS/<scale>/analysis/<table>.md and .json) and the PNGs (RESULTS/<scale>/analysis/<table>/<cell
folder>/). Checkpoints that are not in the local cache (cells known only from records) are listed as such.
"""
import shutil
from pathlib import Path

from tinytlm.common import UserError, atomic_path, read_json, write_json
from tinytlm.paper_cells import Runner, local, table_cells
from tinytlm.paper_tables import TITLES, grid, pretrain_seeds

TASK_FLAGS = {"task": "--task", "labels": "--labels", "train_per_label": "--train-per-label",
              "test_per_label": "--test-per-label", "fewrel_source": "--fewrel-source"}


def checkpoints(table: str, scale: str, seeds: int, runner: Runner) -> tuple:
    """([(cell, kind)], missing): the table's distinct pre-trainings ("mlm") and fine-tunings ("cls") in row
    order, those whose checkpoint is in the local cache, and how many are not. A runner of several precisions
    takes each checkpoint from the first precision that has it in the cache."""
    g, n = grid(table, scale), pretrain_seeds(table, scale)
    variants = zip(*[table_cells(g, seeds, n, runner.cache, {**runner.switches, "precision": p})
                     for p in runner.precisions])  # the same cell in each precision
    slots = {}  # the first precision's cell folder -> (the cell found in the cache, kind), or None; in row order
    for cs in variants:
        for kind in ("mlm", "cls"):
            alike = [c.init for c in cs if c.init] if kind == "mlm" else [c for c in cs if c.kind == "finetune"]
            if not alike or alike[0].out in slots:
                continue
            ready = [c for c in alike if ((c.out / "done.json").is_file() if kind == "mlm" else local(c))]
            slots[alike[0].out] = (ready[0], kind) if ready else None
    found = [s for s in slots.values() if s is not None]
    return found, sum(cell is None for cell in slots.values())


def analyse_checkpoint(cell, kind: str, runner: Runner, folder: Path, extra: tuple = ()) -> dict:
    """tinytlm.analyze on one checkpoint into folder (with --plot and its default options, or extra), once: a
    summary.json there means done."""
    if (folder / "summary.json").is_file():
        return read_json(folder / "summary.json")
    from tinytlm.analyze import main as analyze
    argv = [str(cell.out), "--out", str(folder), "--plot", "--device", runner.switches["device"], "--precision",
            cell.cfg.precision, *extra]
    for flag in ("data", "raw"):
        if runner.switches.get(flag):
            argv += [f"--{flag}", runner.switches[flag]]
    if kind == "mlm":  # the table's task: its T_M tokens shown apart
        ft = cell.row["finetune"]
        argv += [x for k, f in TASK_FLAGS.items() if ft.get(k) not in (None, "") for x in (f, str(ft[k]))]
    job = analyze(argv)[0][0]
    summary = {"row": cell.row["name"], "seed": cell.seed, "dir": cell.out.name, "kind": kind,
               **(mlm_summary(job.files) if kind == "mlm" else cls_summary(job.files))}
    write_json(folder / "summary.json", summary)
    return summary


def mlm_summary(files: dict) -> dict:
    """The numbers a table's analysis shows of a pre-trained checkpoint (from tinytlm.analyze's files)."""
    a, b, c = files["apt.json"], files["blocks.json"], files["confusion.json"]
    task = a.get("task_tokens") or {}
    return {"mean_apt": a["mean_apt"], "accuracy": a["accuracy"], "val_mlm_acc": a.get("val_mlm_acc"),
            "T_W": a["T_W"], "T_M": task.get("T_M"), "T_M_apt": (task.get("T_M_group") or {}).get("mean_apt"),
            "seen_apt": (task.get("seen_group") or {}).get("mean_apt"),
            "blocks": [{"state": s["state"], "mean_apt": s["mean_apt"], "accuracy": s["accuracy"]}
                       for s in b["states"]],
            "clusters": {k: {f: v[f] for f in ("kept", "clusters", "tokens_in_clusters")}
                         for k, v in c["states"].items()}}


def cls_summary(files: dict) -> dict:
    """The numbers a table's analysis shows of a fine-tuned classifier."""
    b, s = files["blocks.json"], files["shp.json"]
    last = s["blocks"][-1]
    return {"head_accuracy": b["head_accuracy"], "recorded_accuracy": b.get("recorded_accuracy"),
            "blocks": [{"state": x["state"], "accuracy": x["accuracy"]} for x in b["states"]],
            "shp": {"state": last["state"], "mean_snr": last["mean_snr"], "mean_noise": last["mean_noise"],
                    "head_accuracy": [g["accuracy"] for g in last["groups"]]}}


def analyze_table(table: str, scale: str, seeds: int, runner: Runner, results: Path, extra: tuple = ()) -> dict:
    """Analyse every local checkpoint of the table; write RESULTS/<scale>/analysis/<table>.md, .json and the
    PNGs. Raises a UserError (nothing written) when none of its checkpoints is in the local cache. extra:
    more tinytlm.analyze flags (a test's small probe budget)."""
    found, missing = checkpoints(table, scale, seeds, runner)
    if not found:
        raise UserError(f"{table} at scale {scale}: none of its {missing} checkpoints is in the local cache "
                        f"{runner.cache}; run `python -m tinytlm.paper {table} --scale {scale}` first")
    summaries = []
    for cell, kind in found:
        folder = runner.cache / "analysis" / cell.out.name
        summaries.append(analyse_checkpoint(cell, kind, runner, folder, extra))
        print(f"analysed {cell.what}", flush=True)
    out = results / scale / "analysis"
    for s in summaries:  # the PNGs beside the table's summary
        (out / table / s["dir"]).mkdir(parents=True, exist_ok=True)
        for png in sorted((runner.cache / "analysis" / s["dir"]).glob("*.png")):
            with atomic_path(out / table / s["dir"] / png.name) as tmp:
                shutil.copyfile(png, tmp)
    report = {"table": table, "scale": scale, "seeds": seeds, "missing": missing, "checkpoints": summaries}
    write_json(out / f"{table}.json", report)
    with atomic_path(out / f"{table}.md") as tmp:
        tmp.write_text("\n".join(report_lines(report)) + "\n")
    print(f"analyze {table}: {len(summaries)} checkpoints ({missing} not in the local cache) -> {out / table}.md")
    return report


def _f(x, nd=4) -> str:
    return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else f"{x:,}"


def report_lines(report: dict) -> list:
    """The markdown of a table's analysis: one table for its pre-trained checkpoints, one for its classifiers."""
    t, cps = report["table"], report["checkpoints"]
    lines = [f"# Analysis of the checkpoints of {TITLES[t]} (scale {report['scale']})", "",
             f"Command: `python -m tinytlm.paper analyze --table {t} --scale {report['scale']}`; "
             f"{len(cps)} checkpoints analysed, {report['missing']} not in the local cache. Definitions and our "
             "readings: docs/analysis.md; the full analysis of each checkpoint stays in the cache "
             "(CACHE/analysis/<checkpoint>/), its PNGs are in the folder beside this file.", ""]
    mlm = [c for c in cps if c["kind"] == "mlm"]
    if mlm:
        states = [b["state"] for b in mlm[0]["blocks"]]
        lines += ["## Pre-trained checkpoints", "",
                  "`<APT>` (held-out masks, the model's own head), the position-weighted accuracy, `<APT>` of the "
                  "task's T_M tokens and of its tokens seen in W_s, then `<APT>` of a fresh MLM probe per state, "
                  "and the strong-match clusters of the model's own head (clusters / tokens in them / tokens "
                  "kept).", "",
                  "| row | checkpoint | `<APT>` | accuracy | T_W | T_M | `<APT>` T_M | `<APT>` seen | "
                  + " | ".join(f"probe {s}" for s in states) + " | clusters (head) |",
                  "| --- " * (9 + len(states)) + "|"]
        for c in mlm:
            h = c["clusters"].get("head", {})
            lines.append(f"| {c['row']} | `{c['dir']}` | {_f(c['mean_apt'])} | {_f(c['accuracy'])} | {_f(c['T_W'])} "
                         f"| {_f(c['T_M'])} | {_f(c['T_M_apt'])} | {_f(c['seen_apt'])} | "
                         + " | ".join(_f(b["mean_apt"]) for b in c["blocks"])
                         + f" | {h.get('clusters', '-')} / {h.get('tokens_in_clusters', '-')} / {h.get('kept', '-')} |")
    cls = [c for c in cps if c["kind"] == "cls"]
    if cls:
        states = [b["state"] for b in cls[0]["blocks"]]
        lines += ["", "## Fine-tuned classifiers", "",
                  "Test accuracy of the trained head and of a linear probe per state; single-head performance of "
                  "the last block: each head's accuracy alone and the mean SNR over the heads.", "",
                  "| row | seed | head acc | " + " | ".join(f"probe {s}" for s in states)
                  + " | SHP accuracy per head | mean SNR |", "| --- " * (5 + len(states)) + "|"]
        for c in cls:
            lines.append(f"| {c['row']} | {c['seed']} | {_f(c['head_accuracy'])} | "
                         + " | ".join(_f(b["accuracy"]) for b in c["blocks"])
                         + f" | {', '.join(_f(a, 3) for a in c['shp']['head_accuracy'])} "
                           f"| {_f(c['shp']['mean_snr'], 2)} |")
    return lines
