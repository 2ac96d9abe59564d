"""The cells of the paper runner: one pre-training, one fine-tuning or one committee evaluation each.

A cell (`Cell`) is named by a key, a hash of what defines it. A finished cell is found, in this order, in
- the records: results/cells/<scale>/<name>.json, small committed JSON files (one per finished
  fine-tuning or committee cell, with its configuration, data, device, date, git revision, speed,
  accuracy per epoch and the MLM metrics of its checkpoint). They travel between machines, so the
  cells of several GPU runs add up to one table;
- the local cache (--cache, default runs/paper/): mlm/<name>-<hash>/ (a checkpoint, keyed by its
  resolved train_mlm config and shared by every table and task that needs it; done.json once finished),
  cls/<name>-<hash>/result.json, committee/<hash>/result.json.
(tinytlm/paper_records.py looks them up). What is not found is computed (`Runner`, mode "run"; an
unfinished pre-training or fine-tuning is resumed exactly), listed (mode "plan": nothing runs) or
reported missing (mode "report": nothing runs). A finished cell is never recomputed. Records are
written for every cell computed, so the cache can be deleted without losing a table.

The runner trains through tinytlm/paper_calls.py alone; a row's missing seeds train as one stacked
model, and a single seed is a stack of one (trained exactly as a single run).
"""
import contextlib
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tinytlm.common import Interrupted, UserError, config_hash, read_json, write_json
from tinytlm.config import RENAMED
from tinytlm.paper_calls import (checkpoint_apt, cls_config, load_mlm, load_mlm_group, mlm_config, score_committee,
                                 task_sequences, train_cls, train_mlm)
from tinytlm.paper_records import Records, finetune_record, last_record
from tinytlm.paper_tables import grid, pretrain_seeds
from tinytlm.train import switches

MODES = ("run", "plan", "report")


def key_of(d) -> str:
    """A cell's key: 12 hex digits of tinytlm.common.config_hash."""
    return config_hash(d, 12)


KEY_NAMES = {new: old for old, new in RENAMED.items()}


def key_fields(fields: dict) -> dict:
    """A run's fields as its cell key hashes them: a renamed field (--wd, now --weight_decay) under the name
    every key was made with, so that cached cells and committed records stay found."""
    return {KEY_NAMES.get(k, k): v for k, v in fields.items()}


def precision_key(switch: dict) -> dict:
    """The precision as a cell key holds it: nothing for fp32 (every cell recorded before --precision existed
    was computed in fp32 and keeps its key), else {"precision": "bf16"}: a cell computed in another precision
    is another cell."""
    p = switch.get("precision", "fp32")
    return {} if p == "fp32" else {"precision": p}


def config_fields(cfg, explicit) -> dict:
    """The fields that define a run: those the grid sets, plus any other that differs from its default;
    never the switches (tinytlm.train.switch: paths, device, speed, logging) nor --init (a cell names its
    pre-training by that cell's key instead).

    Leaving out unset defaults keeps every cached key valid when a script gains a new field."""
    default, volatile = type(cfg)(), switches(type(cfg)) | {"init"}
    return {k: v for k, v in asdict(cfg).items()
            if k not in volatile and (k in explicit or v != getattr(default, k))}


# -----------------------------------------------------------------------------
# what a cell is

@dataclass(eq=False)
class Cell:
    """One cell of a table. Its folder in the cache (`out`) is unique to it, so cells are told apart by it."""
    kind: str  # "pretrain" | "finetune" | "committee"
    key: str  # key_of what defines it (its cache folder ends with it; a committee's record is named by it)
    out: Path  # its folder in the local cache
    what: str  # how the log and the plan name it
    row: dict  # its grid row (tinytlm/paper_tables.py)
    seed: int = 0  # the run's seed (a fine-tuning: the table's seed plus the row's seed_offset)
    trial: int = 0  # the table's seed index: it pairs a gap's arms and a committee's members
    cfg: object = None  # the train_mlm or train_cls config that computes it (paths, device and speed included)
    fields: dict = None  # a fine-tuning: the train_cls fields that define it (its record's "finetune")
    match: str = ""  # a fine-tuning: a key shared by the pre-trained and the scratch arm of one gap
    init: "Cell" = None  # a fine-tuning: the pre-training it starts from (None: from scratch)
    members: list = field(default_factory=list)  # a committee: its members' fine-tuning cells

    @property
    def name(self) -> str:
        """Its record's file name (without .json) in RESULTS/cells/<scale>/."""
        return f"committee-{self.key}" if self.kind == "committee" else self.out.name


def pretrain_cell(row: dict, seed: int, cache: Path, switch: dict) -> Cell:
    """The row's pre-training at this seed; its key hashes the resolved train_mlm config and the overrides."""
    cfg = mlm_config(row, seed, switch)
    key = key_of({"mlm": config_fields(cfg, {"model", "seed", *row["pretrain"]}), "overrides": row["overrides"],
                  **precision_key(switch)})
    ws = f"{cfg.ws:,}" if cfg.ws else "all rows"  # a constructed set with no cap
    what = f"pretrain {cfg.model} {cfg.pretrain_set} W_s {ws} x{cfg.epochs} seed {seed}"
    return Cell("pretrain", key, cache / "mlm" / f"{cfg.run_name()}-{key}", what, row, seed, cfg=cfg)


def finetune_cell(row: dict, trial: int, init, cache: Path, switch: dict) -> Cell:
    """The row's fine-tuning at this table seed, from the pre-training cell init (or None: from scratch)."""
    seed = trial + row["seed_offset"]
    cfg = cls_config(row, seed, switch)
    fields = config_fields(cfg, {"model", "seed", *row["finetune"]})
    match = key_of({"cls": key_fields(fields), "model": row["model"], "overrides": row["overrides"],
                    **precision_key(switch)})  # both arms
    key = key_of({"match": match, "init": init.key if init else None})
    out = cache / "cls" / f"{cfg.task}-{row['model']}-{'pt' if init else 'scratch'}-s{seed}-{key}"
    return Cell("finetune", key, out, f"finetune {row['name']} seed {seed}", row, seed, trial, cfg, fields, match, init)


def committee_cell(row: dict, trial: int, members: list, cache: Path) -> Cell:
    """A soft committee of its members' classifiers; named by their keys."""
    key = key_of(sorted(m.key for m in members))
    return Cell("committee", key, cache / "committee" / key, f"committee {row['name']} seed {members[0].seed}", row,
                members[0].seed, trial, members=members)


def table_cells(g: dict, seeds: int, pretrain_seeds: int, cache: Path, switch: dict, only=None) -> list:
    """The fine-tuning and committee cells of a grid, seed by seed in row order. Fine-tuning seeds beyond
    the scale's pre-training seeds reuse the last pre-training. only: just these (row name, seed) cells
    (a committee's members are its own, listed or not)."""
    pretrainings, cells = {}, []  # one Cell per (row, pre-training seed), shared by the fine-tunings from it
    for trial in range(seeds):
        pseed, made = min(trial, pretrain_seeds - 1), {}
        for row in g["rows"]:
            if row["kind"] != "train":
                continue
            if row["pretrain"] and (row["name"], pseed) not in pretrainings:
                pretrainings[row["name"], pseed] = pretrain_cell(row, pseed, cache, switch)
            made[row["name"]] = finetune_cell(row, trial, pretrainings.get((row["name"], pseed)), cache, switch)
        cells += [made[row["name"]] if row["kind"] == "train" else
                  committee_cell(row, trial, [made[m] for m in row["members"]], cache)
                  for row in g["rows"] if only is None or (row["name"], trial) in only]
    return cells


# -----------------------------------------------------------------------------
# a table's cells: looked up, then computed (mode "run"), listed (mode "plan") or reported missing ("report")

@contextlib.contextmanager
def quiet_to(path: Path):
    """Send a run's own prints and progress bars to path/log.txt; the runner prints one line per cell."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "log.txt", "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def local(cell: Cell) -> bool:
    """A fine-tuning finished in the local cache, checkpoint included (what a committee scores)."""
    return (cell.out / "ckpt.pt").is_file() and (cell.out / "result.json").is_file()


class Runner:
    """The cells of tables: finished ones looked up (Records), missing ones computed (mode "run"), listed with
    the sequences they stand for (mode "plan") or left out (mode "report").

    speed: train_mlm/train_cls flags that change speed, not results (compile, kernels, unpad,
    save_every). stack: train a row's missing seeds as one stacked model (tinytlm/members.py; less time),
    else each alone; one seed is a stack of one. precisions: the resolved precisions ("fp32", "bf16") of the
    cells it looks at, the one it computes in first (a report may read the cells of several: run_table)."""

    def __init__(self, cache: Path, device: str, data: str, raw: str, mode: str = "run", records: Path = None,
                 scale: str = "", speed: dict = None, stack: bool = True, precisions: tuple = ("fp32",)):
        assert mode in MODES, mode
        self.cache, self.mode, self.stack, self.precisions = Path(cache), mode, stack, tuple(precisions)
        self.records = Records(records, scale)
        # the switches every cell's train_mlm / train_cls config gets: paths, device, speed (in no key), and the
        # precision (in the key unless fp32: precision_key)
        self.switches = {"device": device, "data": data, "raw": raw, **(speed or {}), "precision": self.precisions[0]}
        self.computed, self.cached = 0, 0
        # plan mode: cell dir -> {"cell", "what", "state", "seqs" (trained), "eval_seqs" (forward only), "model"}
        self.plan_cells = {}

    def results(self, cells: list) -> dict:
        """{cell folder: result} of these cells and of the committees' members (None: missing; mode "plan": a
        placeholder). Missing fine-tunings are computed first (a row's seeds as one stack); a committee is
        looked up, then computed, once its members have results."""
        if self.mode == "plan":
            return {c.out: self.plan(c) for c in cells}
        tunings = {m.out: m for c in cells for m in (c.members if c.kind == "committee" else [c])}
        got = {out: self.lookup(c) for out, c in tunings.items()}
        if self.mode == "run":
            for stack in self.stacks([c for out, c in tunings.items() if got[out] is None]):
                got.update(self.finetune(stack))
        for c in cells:
            if c.kind == "committee" and all(got[m.out] for m in c.members):
                got[c.out] = self.lookup(c)
                if got[c.out] is None and self.mode == "run":
                    got[c.out] = self.committee(c, got)
        return got

    def lookup(self, cell: Cell):
        """A finished cell's result, or None; mode "run" records a cell found in the cache alone."""
        r = self.records.find(cell)
        if r is not None:
            self._log(cell.what, True, 0, f" acc {r['acc']:.4f}")
            if self.mode == "run":
                self.records.keep(cell, r)
        return r

    def stacks(self, cells: list) -> list:
        """Fine-tunings to compute, grouped into stacks: a row's seeds together (or each alone: --no_stack)."""
        if not self.stack:
            return [[c] for c in cells]
        rows = {}
        for c in cells:
            rows.setdefault(c.row["name"], []).append(c)
        return list(rows.values())

    def finetune(self, stack: list) -> dict:
        """Compute one row's fine-tunings as one stack, after their missing pre-trainings (one stack too);
        each member is written where, and as, it would be alone. Returns {cell folder: result}."""
        inits = list({c.init.out: c.init for c in stack if c.init}.values())
        self.pretrain(inits)
        states = {i.out: load_mlm(i.out) for i in inits}
        row, t0, got = stack[0].row, time.time(), {}
        with quiet_to(stack[0].out):  # an interrupted cell is resumed exactly
            rs = train_cls([c.cfg for c in stack], {} if row["pretrain"] else dict(row["overrides"]),
                           [c.init and c.init.out for c in stack], [c.init and states[c.init.out] for c in stack],
                           [c.out for c in stack])
        for c, r in zip(stack, rs):
            got[c.out] = self.records.write(c, finetune_record(c, r, time.time() - t0))
            self._log(c.what + (f" (stack of {len(stack)})" if len(stack) > 1 else ""), False, t0,
                      f" acc {got[c.out]['acc']:.4f}")
        return got

    def pretrain(self, cells: list):
        """Compute the unfinished ones of one row's pre-trainings as one stack, resumed from their common step."""
        todo = [c for c in cells if not (c.out / "done.json").is_file()]
        for c in cells:
            if c not in todo:
                self._log(c.what, True, 0)
                self.apt(c)  # (a checkpoint finished before <APT> was recorded)
        if not todo:
            return
        t0, states = time.time(), self.common_start(todo)
        finished = states is not None and all(st["optimizer"] is None for st in states)  # a kill before done.json
        if not finished:
            try:
                with quiet_to(todo[0].out):
                    train_mlm([c.cfg for c in todo], dict(todo[0].row["overrides"]), states, [c.out for c in todo])
            except Interrupted:  # train() saved a checkpoint at the step boundary
                print(f"{todo[0].what}: interrupted; the same command resumes it from {todo[0].out}", file=sys.stderr)
                raise
        stacked = {"stacked": len(todo)} if len(todo) > 1 else {}
        for c in todo:
            write_json(c.out / "done.json", {"key": c.key, "seconds": time.time() - t0, **stacked})
            self._log(c.what + (" (resumed)" if states and not finished else "")
                      + (f" (stack of {len(todo)})" if stacked else ""), False, t0)
            self.apt(c)

    def apt(self, cell: Cell):
        """<APT> of a finished pre-training, computed once and kept in its done.json (the records of its
        fine-tunings copy it; a report never computes it). A checkpoint without held-out rows gets None."""
        done = read_json(cell.out / "done.json")
        if "mean_apt" in done:
            return done["mean_apt"]
        t0 = time.time()
        try:
            done["mean_apt"] = checkpoint_apt(cell.out, self.switches["device"], self.switches["data"],
                                              cell.cfg.precision)
        except UserError as e:  # e.g. trained with --val_every 0: no held-out rows to score
            print(f"{cell.what}: no <APT> ({e})", file=sys.stderr)
            done["mean_apt"] = None
        write_json(cell.out / "done.json", done)
        apt = "none" if done["mean_apt"] is None else f"{done['mean_apt']:.4f}"
        self._note(f"{cell.what}: <APT> {apt}", t0)
        return done["mean_apt"]

    @staticmethod
    def common_start(cells: list):
        """The saved checkpoints of a stack's members at one common step (load_group), or None: start afresh.
        A member without a checkpoint (a kill between the renames of the stack's first save), or members
        that cannot be brought to one step, start the whole stack again, as one: the dropout masks a member
        draws depend on the stack it trains in."""
        saved = [c for c in cells if (c.out / "ckpt.pt").is_file()]
        if not saved:
            return None
        states = load_mlm_group([c.out for c in saved])
        if len(saved) == len(cells) and len({st["step"] for st in states}) == 1:
            return states
        at = {c.out: st["step"] for c, st in zip(saved, states)}
        steps = ", ".join(f"{c.out.name} " + (f"at step {at[c.out]}" if c.out in at else "without one") for c in cells)
        print(f"the checkpoints of a stacked pre-training are not at one step ({steps}); it starts again as one "
              f"stack", file=sys.stderr)
        return None

    def committee(self, cell: Cell, got: dict) -> dict:
        """Score a committee (its members' checkpoints must be in the local cache: a record alone does not do)."""
        for stack in self.stacks([m for m in cell.members if not local(m)]):
            got.update(self.finetune(stack))
        t0, members = time.time(), [got[m.out] for m in cell.members]
        s = score_committee([m.out for m in cell.members], cell.members[0].cfg)
        r = self.records.write(cell, {"acc": s["acc"], "members": [m["key"] for m in members],
                                    "member_acc": s["member_acc"], "device": s["device"], "seed": members[0]["seed"],
                                    "key": cell.key, "precision": s["precision"]})
        self._log(cell.what, False, t0, f" acc {r['acc']:.4f}")
        return r

    def plan(self, cell: Cell, need_checkpoint: bool = False) -> dict:
        """Mode "plan": list the cell and what it needs first (a fine-tuning its pre-training, a committee its
        members' checkpoints); returns a placeholder result with the cell's key."""
        found = self.records.find(cell) is not None and (local(cell) or not need_checkpoint)
        if cell.kind == "committee":
            for m in ([] if found else cell.members):
                self.plan(m, need_checkpoint=True)
            return self._planned(cell, "cached" if found else "todo", "")
        if not found and cell.init:
            self._plan_pretrain(cell.init)
        return self._planned(cell, "cached" if found else "todo", cell.row["model"], *task_sequences(cell.cfg))

    def _plan_pretrain(self, cell: Cell) -> dict:
        """List a pre-training: finished, partly done (the sequences left) or to do."""
        cfg, out = cell.cfg, cell.out
        todo = cfg.ws * cfg.epochs or None  # None: an uncapped constructed set, size unknown until built
        what = cell.what + (" (W_s at most)" if cfg.pretrain_set != "random" and cfg.ws else "")
        state = "cached" if (out / "done.json").is_file() else "partial" if (out / "ckpt.pt").is_file() else "todo"
        if state == "partial":  # the last step it logged; it resumes from its last checkpoint, near there
            step = last_record(out, "step")
            todo = todo and max(0, todo - (step["step"] if step else 0) * cfg.batch_size)
        return self._planned(cell, state, cfg.model, todo, what=what)

    def _planned(self, cell: Cell, state: str, model: str, seqs=0, eval_seqs=0, what=None) -> dict:
        """Enter a cell in plan_cells (seqs: trained sequences, eval_seqs: scored ones)."""
        prev = self.plan_cells.get(str(cell.out))
        if prev is None or (prev["state"] == "cached" and state != "cached"):  # a committee needs its checkpoint
            self.plan_cells[str(cell.out)] = {"cell": cell.kind, "what": what or cell.what, "state": state,
                                              "seqs": seqs, "eval_seqs": eval_seqs, "model": model}
        return {"acc": float("nan"), "key": cell.key, "seed": cell.seed,
                **({"dir": cell.out.name} if cell.kind == "finetune" else {})}

    @staticmethod
    def _note(what: str, t0: float):
        print(f"    {what} ({time.time() - t0:.0f} s)", flush=True)

    def _log(self, what: str, cached: bool, t0: float, extra: str = ""):
        if cached:
            self.cached += 1
        else:
            self.computed += 1
        state = "cached" if cached else f"{time.time() - t0:.0f} s"
        print(f"[{self.computed + self.cached}] {what}: {state}{extra}", flush=True)


def run_table(table: str, scale: str, seeds: int, runner: Runner, only=None) -> dict:
    """Every cell of a table; returns {'grid', 'cells': {row: [result per seed]}}. Each result carries
    "trial" (the table's seed index, which pairs a gap's arms and a committee's members); in report
    mode a missing cell is left out. only: run just these (row name, seed) cells (the GPU scheduler).
    Each result also says its "precision" (its cell's). A runner of several precisions (a report of every
    precision) takes each (row, seed) from the first precision that has it."""
    g = grid(table, scale)
    out = {r["name"]: [] for r in g["rows"]}
    for p in runner.precisions:
        cells = table_cells(g, seeds, pretrain_seeds(table, scale), runner.cache, {**runner.switches, "precision": p},
                            only)
        got = runner.results(cells)
        for c in cells:
            if got.get(c.out) is not None and c.trial not in {r["trial"] for r in out[c.row["name"]]}:
                out[c.row["name"]].append({**got[c.out], "trial": c.trial, "precision": p})
    for rs in out.values():
        rs.sort(key=lambda r: r["trial"])
    return {"grid": g, "cells": out}
