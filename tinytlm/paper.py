"""Reproduce a table of the paper end to end: pre-train, fine-tune, compare, report.

    python -m tinytlm.paper table5 --scale cpu              # AG News gap vs W_s, ~30 min on 2 cores
    python -m tinytlm.paper table9 --scale cpu --seeds 3
    python -m tinytlm.paper all --scale paper               # every table at the paper's sizes (GPU)
    python -m tinytlm.paper overlap                          # gap vs T_M and weighted overlaps, from the cache
    python -m tinytlm.paper budget --scale cpu               # beyond the paper: gap vs pre-training length
    python -m tinytlm.paper table5 --scale mini --results /tmp/r --cache /tmp/c   # seconds (the CI test)

Grids live in tinytlm/paper_tables.py. Caching (under --cache, default runs/paper/):
- mlm/<name>-<hash>/: a pre-trained checkpoint, keyed by a hash of its resolved train_mlm
  config (model, pre-training set, W_s, epochs, lr, seed, ...), so every table and task that
  needs the same checkpoint shares it. An unfinished one is resumed exactly.
- cls/<name>-<hash>/result.json: a fine-tuning run, keyed by its resolved train_cls config
  plus the hash of its checkpoint; committee/<hash>/result.json likewise.
A finished cell is never recomputed, so an interrupted table picks up where it stopped.
Outputs: results/<table>.md, .json and .png (matplotlib optional).
"""
import contextlib
import hashlib
import json
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from data_prep.tasks import TASKS
from tinytlm.common import REPO, ArgParser, UserError, cli, git_revision, read_json, write_json
from tinytlm.paper_tables import SCALES, TITLES, grid, plot, plot_overlap

TABLES = [f"table{i}" for i in range(1, 10)]
FEWREL_RELATIONS = {"val_wiki": 16, "train_wiki": 64}  # labels when a FewRel task takes all
EXTRA = ["budget"]  # beyond the paper, not part of "all"
# fields that do not change what is computed (paths, device, speed switches, logging)
VOLATILE = ("out", "resume", "device", "compile", "compile_mode", "kernels", "log_every", "interrupt_at", "quiet",
            "data", "raw", "max_steps", "init")


def key_of(d) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def config_fields(cfg, explicit) -> dict:
    """The fields that define a run: those the grid sets, plus any other that differs from its default.

    Leaving out unset defaults keeps every cached key valid when a script gains a new field."""
    default = type(cfg)()
    return {k: v for k, v in asdict(cfg).items()
            if k not in VOLATILE and (k in explicit or v != getattr(default, k))}


@contextlib.contextmanager
def quiet_to(path: Path):
    """Send a run's own prints and progress bars to path/log.txt; the runner prints one line per cell."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "log.txt", "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


# -----------------------------------------------------------------------------
# cells: one pre-training, one fine-tuning or one committee evaluation each

class Runner:
    """Runs (or, with plan=True, only lists) the cells of a table; finished cells come from the cache."""

    def __init__(self, cache: Path, device: str, data: str, raw: str, plan: bool = False):
        self.cache, self.device, self.data, self.raw = Path(cache), device, data, raw
        self.computed, self.cached = 0, 0
        # plan mode: cell dir -> {"cell", "what", "state", "seqs" (trained), "eval_seqs" (forward only), "model"}
        self.plan_cells = {} if plan else None

    def _planned(self, out: Path, cell: str, what: str, state: str, model: str, seqs=0, eval_seqs=0, **result):
        self.plan_cells.setdefault(str(out), {"cell": cell, "what": what, "state": state, "seqs": seqs,
                                              "eval_seqs": eval_seqs, "model": model})
        return {"acc": float("nan"), **result}

    def _log(self, what: str, cached: bool, t0: float, extra: str = ""):
        if cached:
            self.cached += 1
        else:
            self.computed += 1
        state = "cached" if cached else f"{time.time() - t0:.0f} s"
        print(f"[{self.computed + self.cached}] {what}: {state}{extra}", flush=True)

    def _cached(self, out: Path, what: str, t0: float):
        """A finished cell's result.json (logged as cached), or None."""
        if not (out / "result.json").is_file():
            return None
        r = read_json(out / "result.json")
        self._log(what, True, t0, f" acc {r['acc']:.4f}")
        return r

    def pretrain(self, row: dict, seed: int) -> tuple:
        """(checkpoint dir, key) of the row's pre-training at this seed; trains or resumes when missing."""
        from train_mlm import MLMConfig, train
        from tinytlm.checkpoint import load_checkpoint
        cfg = MLMConfig(model=row["model"], seed=seed, device=self.device, data=self.data, raw=self.raw,
                        **row["pretrain"])
        key = key_of({"mlm": config_fields(cfg, {"model", "seed", *row["pretrain"]}), "overrides": row["overrides"]})
        out = self.cache / "mlm" / f"{cfg.run_name()}-{key}"
        ws = f"{cfg.ws:,}" if cfg.ws else "all rows"  # a constructed set with no cap
        what = f"pretrain {cfg.model} {cfg.pretrain_set} W_s {ws} x{cfg.epochs} seed {seed}"
        t0 = time.time()
        if self.plan_cells is not None:
            todo = cfg.ws * cfg.epochs or None  # None: an uncapped constructed set, size unknown until built
            if cfg.pretrain_set != "random" and cfg.ws:
                what += " (W_s at most)"
            state = "cached" if (out / "done.json").is_file() else "partial" if (out / "ckpt.pt").is_file() else "todo"
            if state == "partial":  # the last step it logged; it resumes from its last checkpoint, near there
                step = last_record(out, "step")
                todo = todo and max(0, todo - (step["step"] if step else 0) * cfg.batch_size)
            self._planned(out, "pretrain", what, state, cfg.model, todo)
            return out, key
        if (out / "done.json").is_file():
            self._log(what, True, t0)
            return out, key
        state = load_checkpoint(out, kind="mlm") if (out / "ckpt.pt").is_file() else None
        finished = state is not None and state["optimizer"] is None  # killed between the last save and done.json
        if not finished:
            try:
                with quiet_to(out):
                    train(replace(cfg, out=str(out)), dict(row["overrides"]), state)
            except SystemExit:  # train() saved a checkpoint on Ctrl-C and exits 130
                print(f"{what}: interrupted; the same command resumes it from {out}", file=sys.stderr)
                raise
        write_json(out / "done.json", {"key": key, "seconds": time.time() - t0})
        self._log(what + (" (resumed)" if state is not None and not finished else ""), False, t0)
        return out, key

    def finetune(self, row: dict, seed: int, pretrain_seed: int) -> dict:
        """The result dict of the row's fine-tuning at this seed (run_arm's, plus our key and match)."""
        from train_cls import ClsConfig, run_arm
        from tinytlm.checkpoint import load_checkpoint
        seed = seed + row["seed_offset"]
        ckpt, pkey = (None, None)
        if row["pretrain"]:
            ckpt, pkey = self.pretrain(row, pretrain_seed)
        f = dict(row["finetune"])
        cfg = ClsConfig(model=row["model"], seed=seed, device=self.device, data=self.data, raw=self.raw,
                        quiet=True, init=str(ckpt or ""), **f)
        base = config_fields(cfg, {"model", "seed", *f})
        match = key_of({"cls": base, "model": row["model"], "overrides": row["overrides"]})  # same for both arms
        key = key_of({"match": match, "init": pkey})
        out = self.cache / "cls" / f"{cfg.task}-{row['model']}-{'pt' if ckpt else 'scratch'}-s{seed}-{key}"
        what, t0 = f"finetune {row['name']} seed {seed}", time.time()
        if self.plan_cells is not None:
            spec = cfg.spec()
            n_labels = len(spec.labels) or (len(TASKS[spec.task][2]) if spec.task != "fewrel" else
                                            FEWREL_RELATIONS[spec.fewrel_source])
            state = "cached" if (out / "result.json").is_file() else "todo"
            return self._planned(out, "finetune", what, state, row["model"],
                                 spec.train_per_label * n_labels * cfg.epochs,  # trained
                                 spec.test_per_label * n_labels * cfg.epochs,  # scored after every epoch
                                 key=key, seed=seed, dir=out.name)
        if r := self._cached(out, what, t0):
            return r
        init_state = load_checkpoint(ckpt, kind="mlm") if ckpt else None
        with quiet_to(out):
            r = run_arm(cfg, {} if ckpt else dict(row["overrides"]), init_state, out)
        r = {**r, "key": key, "match": match, "pretrain_key": pkey, "row": row["name"], "dir": out.name,
             "seconds": round(time.time() - t0, 1)}
        write_json(out / "result.json", r)
        self._log(what, False, t0, f" acc {r['acc']:.4f}")
        return r

    def committee(self, name: str, members: list) -> dict:
        """Soft committee of the members' classifiers (sum of raw logits) on their shared test set."""
        from data_prep.tasks import TaskSpec, ensure_task, load_task
        from tinytlm.checkpoint import build_model, load_checkpoint
        from tinytlm.committee import accuracy, committee_logits, predict_logits
        from tinytlm.common import default_data_root, default_raw_root
        from tinytlm.train import resolve_device
        key = key_of(sorted(m["key"] for m in members))
        out = self.cache / "committee" / key
        what, t0 = f"committee {name} seed {members[0]['seed']}", time.time()
        if self.plan_cells is not None:
            state = "cached" if (out / "result.json").is_file() else "todo"
            return self._planned(out, "committee", what, state, "", key=key, seed=members[0]["seed"])
        if r := self._cached(out, what, t0):
            return r
        device = resolve_device(self.device)
        states = [load_checkpoint(self.cache / "cls" / m["dir"], kind="cls") for m in members]
        fingerprints = {s["extra"]["test_fingerprint"] for s in states}
        if len(fingerprints) != 1:
            raise UserError(f"committee {name}: members were tested on different test sets")
        spec = TaskSpec.from_dict(states[0]["extra"]["spec"])
        _, _, test, yte, _ = load_task(ensure_task(spec, Path(self.raw) if self.raw else default_raw_root(),
                                                   Path(self.data) if self.data else default_data_root()))
        if test.checksum.hex() not in fingerprints:
            raise UserError(f"committee {name}: {test.path} is not the test set the members were scored on")
        logits = [predict_logits(build_model(s).to(device), test.ids, device) for s in states]
        acc = accuracy(committee_logits(logits), yte)
        r = {"acc": acc, "members": [m["key"] for m in members], "member_acc": [accuracy(lg, yte) for lg in logits],
             "seed": members[0]["seed"], "key": key}
        write_json(out / "result.json", r)
        self._log(what, False, t0, f" acc {acc:.4f}")
        return r


def run_table(table: str, scale: str, seeds: int, runner: Runner) -> dict:
    """Every cell of a table (cached ones are read back); returns {'grid', 'cells': {row: [result per seed]}}."""
    g = grid(table, scale)
    s = SCALES[scale]
    cells = {}
    for seed in range(seeds):
        # fewer pre-training seeds than fine-tuning seeds: later seeds reuse the last checkpoint
        pseed = min(seed, s["pretrain_seeds"] - 1)
        by_name = {}
        for row in g["rows"]:
            if row["kind"] == "train":
                by_name[row["name"]] = runner.finetune(row, seed, pseed)
            else:
                by_name[row["name"]] = runner.committee(row["name"], [by_name[m] for m in row["members"]])
            cells.setdefault(row["name"], []).append(by_name[row["name"]])
    return {"grid": g, "cells": cells}


# -----------------------------------------------------------------------------
# summary and reports (tinytlm/paper_report.py would be the next split)

def summarize(out: dict) -> list:
    """One record per row: acc and gap as mean, std, n over seeds, token stats, the paper's numbers."""
    cells, recs = out["cells"], []
    for row in out["grid"]["rows"]:
        rs = cells[row["name"]]
        acc = np.array([r["acc"] for r in rs])
        rec = {"name": row["name"], "kind": row["kind"], "n": len(rs), "acc_mean": float(acc.mean()),
               "acc_std": float(acc.std(ddof=1)) if len(rs) > 1 else 0.0, "acc": acc.tolist(),
               "paper": row["paper"], "ws": (row.get("pretrain") or {}).get("ws", 0),
               "pretrain_set": (row.get("pretrain") or {}).get("pretrain_set")}
        if row.get("pretrain"):
            rec["pt_epochs"] = row["pretrain"].get("epochs")
            if rs[0].get("init") and (ep := last_record(Path(rs[0]["init"]).parent, "epoch")):
                rec["mlm_acc"] = ep["mlm_acc"]
        st = rs[0].get("token_stats")
        if st:
            rec.update({k: st[k] for k in ("T_W", "T_C", "T_M", "occ_overlap", "log_freq_overlap", "occ_overlap_10")})
            if row.get("pretrain"):
                rec["ws"] = rs[0]["pretrain"]["ws"]  # actual rows (a custom set may be smaller than asked)
        if row.get("gap_of"):
            gap = acc - np.array([r["acc"] for r in cells[row["gap_of"]]])
            rec.update(gap=gap.tolist(), gap_mean=float(gap.mean()),
                       gap_std=float(gap.std(ddof=1)) if len(gap) > 1 else 0.0)
        if row["kind"] == "committee":  # per seed: committee minus its best member, and minus the reference
            best = np.max([[r["acc"] for r in cells[m]] for m in row["members"]], axis=0)
            diffs = {"vs_best_member": acc - best}
            if row.get("reference") in cells:
                diffs["vs_reference"] = acc - np.array([r["acc"] for r in cells[row["reference"]]])
            for k, d in diffs.items():
                rec.update({k: d.tolist(), k + "_mean": float(d.mean()),
                            k + "_std": float(d.std(ddof=1)) if len(d) > 1 else 0.0})
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
    if k + "_mean" not in r or r["n"] < 2:
        return ""
    se = r[k + "_std"] / np.sqrt(r["n"])
    if se == 0 or abs(r[k + "_mean"]) < 2 * se:
        return f"no significant {what}" if k == "gap" else f"{what}: not significant"
    return f"{what} {'>' if r[k + '_mean'] > 0 else '<'} 0"


def write_report(out: dict, recs: list, results: Path, meta: dict):
    g = out["grid"]
    t = g["table"]
    lines = [f"# {g['title']}", "",
             f"Scale **{g['scale']}**; device {meta['device']}; git {meta['git']}; {meta['date']}.", "",
             f"Command: `{meta['command']}` (this invocation computed {meta['computed']} cells in "
             f"{meta['seconds']} s; the others were read from the cache)", "",
             "Ours: final-epoch test accuracy, mean ± std over n seeds; gap = pre-trained minus not pre-trained, "
             "paired by seed. 'no significant gap' = within two standard errors of zero.", "",
             "| row | W_s | T_W | T_M | acc (ours) | gap or committee margin (ours) | n | verdict | paper |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in recs:
        gap = [f"{r['gap_mean']:+.3f} ± {r['gap_std']:.3f}"] if "gap_mean" in r else []
        gap += [f"{label} {r[k + '_mean']:+.3f} ± {r[k + '_std']:.3f}"
                for k, label in (("vs_best_member", "vs best member"), ("vs_reference", "vs reference"))
                if k + "_mean" in r]
        gap = "; ".join(gap)
        ws = "" if r["kind"] == "committee" else fmt(r["ws"]) if r["ws"] else "0"
        paper = ", ".join(f"{k} {fmt(v)}" for k, v in r["paper"].items())
        lines.append(f"| {r['name']} | {ws} | {fmt(r.get('T_W'))} | {fmt(r.get('T_M'))} "
                     f"| {r['acc_mean']:.3f} ± {r['acc_std']:.3f} | {gap} | {r['n']} | {verdict(r)} | {paper} |")
    for r in g["not_reproduced"]:
        lines.append(f"| {r['name']} | | | | not reproduced | not reproduced | 0 | | "
                     + ", ".join(f"{k} {fmt(v)}" for k, v in r["paper"].items()) + " |")
    data = sorted({c["task"] for rs in out["cells"].values() for c in rs if "task" in c})
    pre = sorted({(c["pretrain"]["pretrain_set"], c["pretrain"]["shard"]) for rs in out["cells"].values()
                  for c in rs if c.get("pretrain")})
    lines += ["", "## Data used", ""] + [f"- task `{d}` (data/{d}/meta.json lists the source rows)" for d in data]
    rel = [(k, Path(p).relative_to(REPO) if Path(p).is_relative_to(REPO) else p) for k, p in pre]
    lines += [f"- pre-training: {k} set, first W_s rows of `{p}`" for k, p in rel]
    sizes = sorted({(c["task"], c["n_train"], c["n_test"]) for rs in out["cells"].values() for c in rs
                    if "n_train" in c})
    lines += [f"- `{t}`: {a:,} train rows, {b:,} test rows" for t, a, b in sizes]
    lines += ["", "## Pre-trained checkpoints", "", "| checkpoint | epochs | steps | final-epoch MLM loss | MLM acc |",
              "| --- | --- | --- | --- | --- |"] + mlm_lines(out) if pre else []
    lines += ["", "## Test accuracy per fine-tuning epoch (mean over seeds)", ""]
    lines += [f"- {name}: " + ", ".join(f"{a:.3f}" for a in np.mean([c["acc_per_epoch"] for c in rs], axis=0))
              for name, rs in out["cells"].items() if rs and "acc_per_epoch" in rs[0]]
    lines += ["", "## Deviations from the paper", ""] + [f"- {d}" for d in g["deviations"]]
    if meta.get("plot"):
        lines += ["", f"![plot]({meta['plot']})"]
    elif meta.get("plot_note"):
        lines += ["", meta["plot_note"]]
    (results / f"{t}.md").write_text("\n".join(lines) + "\n")
    write_json(results / f"{t}.json", {"meta": meta, "grid": g, "rows": recs, "cells": out["cells"]})


def last_record(run_dir: Path, kind: str):
    """The last record of this kind ("step", "epoch") in a run's metrics.jsonl, or None."""
    m = Path(run_dir) / "metrics.jsonl"
    rs = [r for r in map(json.loads, m.read_text().splitlines() if m.is_file() else []) if r.get("kind") == kind]
    return rs[-1] if rs else None


def mlm_lines(out: dict) -> list:
    """One line per pre-trained checkpoint a table used: its last epoch record from metrics.jsonl."""
    lines = []
    for init in sorted({c["init"] for rs in out["cells"].values() for c in rs if c.get("init")}):
        if ep := last_record(Path(init).parent, "epoch"):
            lines.append(f"| `{Path(init).parent.name}` | {ep['epoch'] + 1} | {ep['step']:,} | {ep['loss']:.3f} | "
                         f"{ep['mlm_acc']:.3f} |")
    return lines


# -----------------------------------------------------------------------------
# overlap: which token statistic predicts the gap

def overlap(cache: Path, results: Path) -> dict:
    results.mkdir(parents=True, exist_ok=True)
    rs = [read_json(p) for p in sorted((Path(cache) / "cls").glob("*/result.json"))]
    scratch = {(r["match"], r["seed"]): r["acc"] for r in rs if r.get("arm") == "scratch" and "match" in r}
    groups = {}
    for r in rs:
        if r.get("arm") == "pretrained" and (r.get("match"), r["seed"]) in scratch and r["token_stats"]:
            # one cell = task x pre-training set x W_s x checkpoint settings (epochs, lr, ...) x architecture x
            # fine-tuning recipe; seeds averaged
            k = (r["task"], r["pretrain"]["pretrain_set"], r["pretrain"]["ws"],
                 key_of([r.get("pretrain_key"), r["model_config"], r["lr"], r["wd"], r["epochs"], r["n_train"]]))
            if k not in groups:  # the checkpoint's last epoch, read once per cell (not per seed)
                ep = last_record(Path(r["init"]).parent, "epoch") if r.get("init") else None
                groups[k] = {"gaps": [], "stats": r["token_stats"], "pt_epochs": ep and ep["epoch"] + 1,
                             "mlm_acc": ep and ep["mlm_acc"]}
            g = groups[k]
            g["gaps"].append(r["acc"] - scratch[(r["match"], r["seed"])])
    cells = [{"task": k[0], "pretrain_set": k[1], "ws": k[2], "pt_epochs": v["pt_epochs"], "mlm_acc": v["mlm_acc"],
              "gap": float(np.mean(v["gaps"])), "n": len(v["gaps"]), **v["stats"]} for k, v in groups.items()]
    fits = {}
    for x in ("T_M", "occ_overlap", "log_freq_overlap", "occ_overlap_10"):
        if len(cells) >= 3:
            xs, ys = np.array([c[x] for c in cells], float), np.array([c["gap"] for c in cells])
            if xs.std() > 0:
                slope, icpt = np.polyfit(xs, ys, 1)
                res = ys - (slope * xs + icpt)
                fits[x] = {"slope": float(slope), "intercept": float(icpt),
                           "r2": float(1 - res.var() / ys.var()) if ys.var() > 0 else float("nan")}
    lines = ["# Gap vs token statistics (all cached cells)", "",
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


# -----------------------------------------------------------------------------
# command line

def plan(tables: list, scale: str, seeds: int, runner: Runner) -> dict:
    """Print every cell that is not finished yet and the work it stands for; a cell shared by
    several tables is listed under the first. Returns {table: [cell records]}."""
    out, seen = {}, set()
    for t in tables:
        run_table(t, scale, seeds, runner)
        new = [(d, c) for d, c in runner.plan_cells.items() if d not in seen]
        seen.update(d for d, _ in new)
        out[t] = [c for _, c in new]
        todo = [c for c in out[t] if c["state"] != "cached"]
        print(f"== {TITLES[t]} (scale {scale}, {seeds} seeds): {len(out[t])} new cells, "
              f"{len(out[t]) - len(todo)} cached, {len(todo)} to run", flush=True)
        for c in todo:
            n = "" if c["cell"] == "committee" else ": size known once the set is built" if c["seqs"] is None else \
                f": {c['seqs']:,} sequences" + (f" + {c['eval_seqs']:,} scored" if c["eval_seqs"] else "")
            print(f"  {c['state']:<7} {c['what']}{n}")
    cells = [c for cs in out.values() for c in cs]
    work = {}
    for c in cells:
        if c["state"] != "cached" and c["seqs"]:
            for k, n in ((f"{c['cell']} {c['model']}", c["seqs"]), (f"scoring {c['model']}", c["eval_seqs"])):
                work[k] = work.get(k, 0) + n
    unknown = any(c["seqs"] is None and c["state"] != "cached" for c in cells)
    print(f"== plan: {len(cells)} cells, {sum(c['state'] == 'cached' for c in cells)} cached; to run: "
          + ("; ".join(f"{k} {n:,} sequences" for k, n in sorted(work.items()) if n) or "nothing")
          + (" (plus the uncapped constructed sets)" if unknown else "")
          + ". Time = trained sequences / training seq/s (`python bench/train_throughput.py`) + scored "
          "sequences / inference seq/s")
    return out


def main(argv=None):
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table", help="table1 ... table9, all, overlap, or budget (gap vs pre-training length)")
    ap.add_argument("--scale", default="cpu", choices=list(SCALES), help="grid size: paper | cpu | mini")
    ap.add_argument("--seeds", type=int, default=0, help="seeds per cell (0 = the scale's default)")
    ap.add_argument("--results", type=Path, default=REPO / "results", help="where the md/json/png go")
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "paper", help="cache root of all runs")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--data", default="", help="prepared data root (default $TINYTLM_DATA or ./data)")
    ap.add_argument("--raw", default="", help="raw data root (default $TINYTLM_RAW or ../shared/data)")
    ap.add_argument("--plan", action="store_true", help="list the unfinished cells and the sequences they "
                    "would process, count the cached ones; runs nothing")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.table == "overlap":
        if args.plan:
            raise UserError("--plan: overlap computes nothing new (it reads the cache); leave --plan out")
        return overlap(args.cache, args.results)
    if args.table not in TABLES + EXTRA + ["all"]:
        raise UserError(f"unknown table {args.table!r}; choose {', '.join(TABLES)}, all, overlap or budget")
    seeds = args.seeds or SCALES[args.scale]["seeds"]
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: must be >= 1")
    tables = TABLES if args.table == "all" else [args.table]
    if args.plan:
        return plan(tables, args.scale, seeds, Runner(args.cache, args.device, args.data, args.raw, plan=True))
    from tinytlm.train import device_name, resolve_device
    args.results.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.cache, args.device, args.data, args.raw)
    summary = {}
    for t in tables:
        t0, c0 = time.time(), runner.computed
        print(f"== {TITLES[t]} (scale {args.scale}, {seeds} seeds)", flush=True)
        out = run_table(t, args.scale, seeds, runner)
        recs = summarize(out)
        meta = {"table": t, "scale": args.scale, "seeds": seeds, "device": device_name(resolve_device(args.device)),
                "git": git_revision(), "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(time.time() - t0),
                "command": "python -m tinytlm.paper " + " ".join(shlex.quote(a) for a in argv)}
        if out["grid"]["plot"]:
            meta["plot"] = plot(out["grid"]["plot"], recs, TITLES[t] + f" (scale {args.scale})",
                                args.results / f"{t}.png")
            if not meta["plot"]:
                meta["plot_note"] = "No plot: matplotlib is not installed."
        meta["computed"] = runner.computed - c0
        write_report(out, recs, args.results, meta)
        summary[t] = {"computed": runner.computed - c0, "seconds": meta["seconds"], "rows": recs}
        print(f"== {t}: {summary[t]['computed']} cells computed in {meta['seconds']} s -> "
              f"{args.results / (t + '.md')}", flush=True)
    return summary


if __name__ == "__main__":
    cli(main)
