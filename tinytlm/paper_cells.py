"""The cells of the paper runner: one pre-training, one fine-tuning or one committee evaluation each.

A cell is found, in this order, in
- the records: results/cells/<scale>/<name>.json, small committed JSON files (one per finished
  fine-tuning or committee cell, with its configuration, data, device, date, git revision, speed,
  accuracy per epoch and the MLM metrics of its checkpoint). They travel between machines, so the
  cells of several GPU runs add up to one table;
- the local cache (--cache, default runs/paper/): mlm/<name>-<hash>/ (a checkpoint, keyed by its
  resolved train_mlm config and shared by every table and task that needs it; an unfinished one is
  resumed exactly), cls/<name>-<hash>/result.json, committee/<hash>/result.json;
and only then computed (mode "run"), listed (mode "plan": nothing runs) or reported missing (mode
"report": nothing runs). A finished cell is never recomputed. Records are written for every cell
computed, so the cache can be deleted without losing a table.
"""
import contextlib
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from tinytlm.tasks import TASKS
from tinytlm.common import Interrupted, config_hash, git_revision, read_json, write_json
from tinytlm.paper_tables import SCALES, grid
from tinytlm.train import switches

FEWREL_RELATIONS = {"val_wiki": 16, "train_wiki": 64}  # labels when a FewRel task takes all
MODES = ("run", "plan", "report")


def key_of(d) -> str:
    """A cell's key: 12 hex digits of tinytlm.common.config_hash."""
    return config_hash(d, 12)


def config_fields(cfg, explicit) -> dict:
    """The fields that define a run: those the grid sets, plus any other that differs from its default;
    never the switches (tinytlm.train.switch: paths, device, speed, logging) nor --init (a cell names its
    pre-training by that cell's key instead).

    Leaving out unset defaults keeps every cached key valid when a script gains a new field."""
    default, volatile = type(cfg)(), switches(type(cfg)) | {"init"}
    return {k: v for k, v in asdict(cfg).items()
            if k not in volatile and (k in explicit or v != getattr(default, k))}


@contextlib.contextmanager
def quiet_to(path: Path):
    """Send a run's own prints and progress bars to path/log.txt; the runner prints one line per cell."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "log.txt", "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def last_record(run_dir: Path, kind: str):
    """The last record of this kind ("step", "epoch") in a run's metrics.jsonl, or None."""
    m = Path(run_dir) / "metrics.jsonl"
    rs = [r for r in map(json.loads, m.read_text().splitlines() if m.is_file() else []) if r.get("kind") == kind]
    return rs[-1] if rs else None


def mlm_summary(run_dir: Path, seconds=None) -> dict:
    """What a record keeps of a pre-training: its last epoch's loss and accuracy, steps, speed."""
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    head = recs[0] if recs else {}
    ep, st = (next((r for r in reversed(recs) if r.get("kind") == k), None) for k in ("epoch", "step"))
    return {"dir": Path(run_dir).name, "epochs": ep and ep["epoch"] + 1, "steps": ep and ep["step"],
            "loss": ep and ep["loss"], "mlm_acc": ep and ep["mlm_acc"],
            # the latest held-out evaluation (the last epoch's, with --val_every 1)
            **next(({k: r[k] for k in ("val_loss", "val_mlm_acc")} for r in reversed(recs) if "val_mlm_acc" in r), {}),
            "seq_per_s": st and st.get("seq_per_s"),
            "seconds": seconds, "device": head.get("device"), "path": path_of(head.get("config", {}))}


def path_of(cfg: dict) -> dict:
    """The speed switches a run used (they do not change what is computed, but are worth knowing)."""
    return {k: cfg.get(k) for k in ("compile", "compile_mode", "kernels", "unpad")}


class Runner:
    """Runs (mode "run"), lists (mode "plan") or only reads back (mode "report") the cells of a table.

    speed: train_mlm/train_cls flags that change speed, not results (compile, compile_mode, kernels, unpad,
    save_every). stack: train the seeds of a row together as stacked members (same results, less time)."""

    def __init__(self, cache: Path, device: str, data: str, raw: str, mode: str = "run", records: Path = None,
                 scale: str = "", speed: dict = None, stack: bool = True):
        assert mode in MODES, mode
        self.stack = stack  # mode "run": train a row's missing seeds as one stacked run (see stacked())
        self.cache, self.device, self.data, self.raw, self.mode = Path(cache), device, data, raw, mode
        self.records, self.scale, self.speed = (Path(records) if records else None), scale, dict(speed or {})
        self.computed, self.cached = 0, 0
        # plan mode: cell dir -> {"cell", "what", "state", "seqs" (trained), "eval_seqs" (forward only), "model"}
        self.plan_cells = {}

    def _planned(self, out: Path, cell: str, what: str, state: str, model: str, seqs=0, eval_seqs=0, **result):
        prev = self.plan_cells.get(str(out))
        if prev is None or (prev["state"] == "cached" and state != "cached"):  # a committee needs its checkpoint
            self.plan_cells[str(out)] = {"cell": cell, "what": what, "state": state, "seqs": seqs,
                                         "eval_seqs": eval_seqs, "model": model}
        return {"acc": float("nan"), **result}

    def _log(self, what: str, cached: bool, t0: float, extra: str = ""):
        if cached:
            self.cached += 1
        else:
            self.computed += 1
        state = "cached" if cached else f"{time.time() - t0:.0f} s"
        print(f"[{self.computed + self.cached}] {what}: {state}{extra}", flush=True)

    def record_path(self, name: str):
        return self.records / f"{name}.json" if self.records else None

    def _found(self, out: Path, name: str):
        """A finished cell's result: its record, else the cache's result.json; or None."""
        rec = self.record_path(name)
        for p in ([rec] if rec else []) + [out / "result.json"]:
            if p.is_file():
                r = read_json(p)
                if "kind" in r:  # (a bare run_arm result.json: a kill came before _write stamped it)
                    return r
        return None

    def _write(self, out: Path, name: str, r: dict, kind: str) -> dict:
        """Stamp a computed result (scale, git, date, torch) and write it to the cache and, unless a record
        of this cell exists already (e.g. from another machine: kept as it is), to the records."""
        import torch
        r = {"kind": kind, "scale": self.scale, **r, "git": git_revision(),
             "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()) + " UTC", "torch": torch.__version__}
        write_json(out / "result.json", r)
        if self.records and not self.record_path(name).is_file():
            write_json(self.record_path(name), r)
        return r

    def pretrain(self, row: dict, seed: int) -> tuple:
        """(checkpoint dir, key) of the row's pre-training at this seed; trains or resumes it when missing
        (mode "run"), lists it (mode "plan")."""
        from tinytlm.pretrain import train
        from tinytlm.checkpoint import load_checkpoint
        cfg, key, out = self._mlm_cell(row, seed)
        ws = f"{cfg.ws:,}" if cfg.ws else "all rows"  # a constructed set with no cap
        what = f"pretrain {cfg.model} {cfg.pretrain_set} W_s {ws} x{cfg.epochs} seed {seed}"
        t0 = time.time()
        if self.mode != "run":
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
        state = load_checkpoint(out, kind="mlm", fallback=True) if (out / "ckpt.pt").is_file() else None
        finished = state is not None and state["optimizer"] is None  # killed between the last save and done.json
        if not finished:
            try:
                with quiet_to(out):
                    train(replace(cfg, out=str(out)), dict(row["overrides"]), state)
            except Interrupted:  # train() saved a checkpoint at the step boundary
                print(f"{what}: interrupted; the same command resumes it from {out}", file=sys.stderr)
                raise
        write_json(out / "done.json", {"key": key, "seconds": time.time() - t0})
        self._log(what + (" (resumed)" if state is not None and not finished else ""), False, t0)
        return out, key

    def _mlm_cell(self, row: dict, seed: int) -> tuple:
        """(train_mlm config, key, cache dir) of the row's pre-training at this seed."""
        from tinytlm.pretrain import MLMConfig
        cfg = MLMConfig(model=row["model"], seed=seed, device=self.device, data=self.data, raw=self.raw,
                        **row["pretrain"], **self.speed)
        key = self._pretrain_key(row, seed)
        return cfg, key, self.cache / "mlm" / f"{cfg.run_name()}-{key}"

    def _cls_cell(self, row: dict, seed: int, pretrain_seed: int) -> tuple:
        """(train_cls config, its defining fields, match key, pre-training key, key, cache dir) of a cell;
        seed is the table's (the row's seed offset is added here)."""
        from tinytlm.finetune import ClsConfig
        seed = seed + row["seed_offset"]
        f = dict(row["finetune"])
        cfg = ClsConfig(model=row["model"], seed=seed, device=self.device, data=self.data, raw=self.raw,
                        quiet=True, **f, **self.speed)
        base = config_fields(cfg, {"model", "seed", *f})
        match = key_of({"cls": base, "model": row["model"], "overrides": row["overrides"]})  # same for both arms
        pkey = self._pretrain_key(row, pretrain_seed) if row["pretrain"] else None
        key = key_of({"match": match, "init": pkey})
        out = self.cache / "cls" / f"{cfg.task}-{row['model']}-{'pt' if pkey else 'scratch'}-s{seed}-{key}"
        return cfg, base, match, pkey, key, out

    def finetune(self, row: dict, seed: int, pretrain_seed: int, need_ckpt: bool = False) -> dict:
        """The result of the row's fine-tuning at this seed (run_arm's, plus our key and match); None in
        report mode when it is missing. need_ckpt: the classifier checkpoint must be in the local cache
        (a committee reads it), so a record alone does not do."""
        from tinytlm.finetune import arm
        from tinytlm.checkpoint import load_checkpoint
        cfg, base, match, pkey, key, out = self._cls_cell(row, seed, pretrain_seed)
        seed = cfg.seed
        what, t0 = f"finetune {row['name']} seed {seed}", time.time()
        found = self._found(out, out.name)
        if need_ckpt and not (out / "ckpt.pt").is_file():
            found = None
        if self.mode == "plan":
            if not found and row["pretrain"]:
                self.pretrain(row, pretrain_seed)
            spec = cfg.spec()
            n_labels = len(spec.labels) or (len(TASKS[spec.task][2]) if spec.task != "fewrel" else
                                            FEWREL_RELATIONS[spec.fewrel_source])
            return self._planned(out, "finetune", what, "cached" if found else "todo", row["model"],
                                 spec.train_per_label * n_labels * cfg.epochs,  # trained
                                 spec.test_per_label * n_labels * cfg.epochs,  # scored after every epoch
                                 key=key, seed=seed, dir=out.name)
        if found or self.mode == "report":
            if found:
                self._log(what, True, t0, f" acc {found['acc']:.4f}")
            return found
        ckpt = self.pretrain(row, pretrain_seed)[0] if row["pretrain"] else None
        init_state = load_checkpoint(ckpt, kind="mlm") if ckpt else None
        cfg = replace(cfg, init=str(ckpt or ""))
        with quiet_to(out):  # an interrupted cell is resumed exactly
            r = arm(cfg, {} if ckpt else dict(row["overrides"]), init_state, out)
        return self._finished(row, (cfg, base, match, pkey, key, out), r, ckpt, what, t0, r.get("stacked", 1))

    def _finished(self, row, cell, r: dict, ckpt, what: str, t0: float, stacked: int = 1) -> dict:
        """Record a computed fine-tuning cell (run_arm's result plus keys, its pre-training's summary, speed)."""
        cfg, base, match, pkey, key, out = cell
        mlm = mlm_summary(ckpt, read_json(ckpt / "done.json").get("seconds")) if ckpt else None
        r = {**r, "key": key, "match": match, "pretrain_key": pkey, "row": row["name"], "dir": out.name,
             "seconds": round(time.time() - t0, 1), "finetune": base, "mlm": mlm, "path": path_of(asdict(cfg))}
        if stacked > 1:  # its seconds are the whole stack's
            r["path"]["stacked"] = stacked
        r = self._write(out, out.name, r, "finetune")
        self._log(what, False, t0, f" acc {r['acc']:.4f}")
        return r

    def stacked(self, row: dict, seeds: list, pseeds: list):
        """Mode "run": the row's missing cells at these table seeds, trained stacked (tinytlm/members.py): first
        its missing pre-trainings (one stacked run), then its fine-tunings (one stacked run). Every member is
        written exactly where, and as, its cell alone would be; the usual loop then finds them cached."""
        from tinytlm.checkpoint import load_checkpoint
        from tinytlm.finetune import arms
        cells = {s: self._cls_cell(row, s, p) for s, p in zip(seeds, pseeds)}
        todo = [(s, p) for s, p in zip(seeds, pseeds) if not self._found(cells[s][5], cells[s][5].name)]
        if self.mode != "run" or len(todo) < 2:
            return
        if row["pretrain"]:
            self.stacked_pretrain(row, sorted({p for _, p in todo}))
        ckpts = {p: self._mlm_cell(row, p)[2] for _, p in todo} if row["pretrain"] else {}
        inits = {p: load_checkpoint(c, kind="mlm") for p, c in ckpts.items()}
        cfgs = [replace(cells[s][0], init=str(ckpts.get(p, ""))) for s, p in todo]
        t0 = time.time()
        with quiet_to(cells[todo[0][0]][5]):
            rs = arms(cfgs, {} if row["pretrain"] else dict(row["overrides"]), [inits.get(p) for _, p in todo],
                      [cells[s][5] for s, _ in todo])
        for (s, p), r in zip(todo, rs):
            self._finished(row, cells[s], r, ckpts.get(p), f"finetune {row['name']} seed {cells[s][0].seed} "
                           f"(stack of {len(todo)})", t0, len(todo))

    def stacked_pretrain(self, row: dict, seeds: list):
        """The row's missing pre-trainings at these seeds as stacked runs (one per starting step)."""
        from tinytlm.checkpoint import load_group
        from tinytlm.pretrain import train
        cells = [(s, *self._mlm_cell(row, s)[1:]) for s in seeds]
        cells = [c for c in cells if not (c[2] / "done.json").is_file()]
        saved = [c for c in cells if (c[2] / "ckpt.pt").is_file()]  # at one common step (load_group)
        states = dict(zip([c[0] for c in saved], load_group([c[2] for c in saved], kind="mlm"))) if saved else {}
        groups = {}
        for s, key, out in cells:
            st = states.get(s)
            groups.setdefault(st and st["step"], []).append((s, key, out, st))
        for step, group in groups.items():
            t0 = time.time()
            cfg = self._mlm_cell(row, group[0][0])[0]
            what = f"pretrain {cfg.model} W_s {cfg.ws:,} x{cfg.epochs} seeds {','.join(str(g[0]) for g in group)}"
            unfinished = [g for g in group if not (g[3] and g[3]["optimizer"] is None)]
            if unfinished:
                with quiet_to(unfinished[0][2]):
                    train(replace(cfg, seed=0, seeds=",".join(str(g[0]) for g in unfinished)), dict(row["overrides"]),
                          [g[3] for g in unfinished] if step is not None else None, outs=[g[2] for g in unfinished])
            for s, key, out, _ in group:
                write_json(out / "done.json", {"key": key, "seconds": time.time() - t0, "stacked": len(unfinished)})
            self._log(what + f" (stack of {len(unfinished)})", False, t0)

    def _pretrain_key(self, row, seed) -> str:
        """A hash of the resolved train_mlm config (volatile fields left out) and the model overrides."""
        from tinytlm.pretrain import MLMConfig
        cfg = MLMConfig(model=row["model"], seed=seed, **row["pretrain"])
        return key_of({"mlm": config_fields(cfg, {"model", "seed", *row["pretrain"]}), "overrides": row["overrides"]})

    def committee(self, name: str, members: list, rows: list, seed: int, pseed: int) -> dict:
        """Soft committee of the members' classifiers (sum of raw logits) on their shared test set.
        members: the member rows' results at this seed (their keys name the committee); rows: those rows,
        to train members whose checkpoints are not in the local cache."""
        key = key_of(sorted(m["key"] for m in members))
        out, rec = self.cache / "committee" / key, f"committee-{key}"
        what, t0 = f"committee {name} seed {members[0]['seed']}", time.time()
        found = self._found(out, rec)
        if self.mode == "plan":
            if not found:  # the members' checkpoints must be here: a record alone does not do
                for row in rows:
                    self.finetune(row, seed, pseed, need_ckpt=True)
            return self._planned(out, "committee", what, "cached" if found else "todo", "", key=key,
                                 seed=members[0]["seed"])
        if found or self.mode == "report":
            if found:
                self._log(what, True, t0, f" acc {found['acc']:.4f}")
            return found
        members = [self.finetune(row, seed, pseed, need_ckpt=True) for row in rows]
        r = {**self._evaluate(members), "seed": members[0]["seed"], "key": key}
        r = self._write(out, rec, r, "committee")
        self._log(what, False, t0, f" acc {r['acc']:.4f}")
        return r

    def _evaluate(self, members: list) -> dict:
        from tinytlm.checkpoint import load_checkpoint
        from tinytlm.committee import (accuracy, committee_logits, common_test_set, predict_member_logits,
                                       shape_groups, stack_checkpoints)
        from tinytlm.train import device_name, resolve_device, roots
        device = resolve_device(self.device)
        states = [load_checkpoint(self.cache / "cls" / m["dir"], kind="cls") for m in members]
        _, test, yte = common_test_set(states, *roots(self))
        logits = [None] * len(states)
        for group in shape_groups(states):  # members of one shape: one stacked forward
            stacked = stack_checkpoints([states[i] for i in group]).to(device)
            for i, lg in zip(group, predict_member_logits(stacked, test.ids, device)):
                logits[i] = lg
        return {"acc": accuracy(committee_logits(logits), yte), "members": [m["key"] for m in members],
                "member_acc": [accuracy(lg, yte) for lg in logits], "device": device_name(device)}


def run_table(table: str, scale: str, seeds: int, runner: Runner, only=None) -> dict:
    """Every cell of a table; returns {'grid', 'cells': {row: [result per seed]}}. Each result carries
    "trial" (the table's seed index, which pairs a gap's arms and a committee's members); in report
    mode a missing cell is left out. only: run just these (row name, seed) cells (the GPU scheduler)."""
    g = grid(table, scale)
    s = SCALES[scale]
    rows = {r["name"]: r for r in g["rows"]}
    cells = {r["name"]: [] for r in g["rows"]}
    pseeds = [min(seed, s["pretrain_seeds"] - 1) for seed in range(seeds)]
    if runner.stack and runner.mode == "run":  # the seeds of a row as one stacked run, then the loop reads them
        for row in g["rows"]:
            if row["kind"] == "train":
                todo = [seed for seed in range(seeds) if only is None or (row["name"], seed) in only]
                runner.stacked(row, todo, [pseeds[seed] for seed in todo])
    for seed in range(seeds):
        # fewer pre-training seeds than fine-tuning seeds: later seeds reuse the last checkpoint
        pseed = min(seed, s["pretrain_seeds"] - 1)
        by_name = {}
        for row in g["rows"]:
            if only is not None and (row["name"], seed) not in only:
                continue
            if row["kind"] == "train":
                r = runner.finetune(row, seed, pseed)
            else:
                members = [by_name.get(m) or runner.finetune(rows[m], seed, pseed) for m in row["members"]]
                r = None if any(m is None for m in members) else \
                    runner.committee(row["name"], members, [rows[m] for m in row["members"]], seed, pseed)
            by_name[row["name"]] = r
            if r is not None:
                cells[row["name"]].append({**r, "trial": seed})
    return {"grid": g, "cells": cells}
