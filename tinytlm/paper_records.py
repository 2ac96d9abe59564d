"""Where a finished cell of the paper runner is found, and what its record holds.

A finished fine-tuning or committee cell has a record, RESULTS/cells/<scale>/<name>.json (committed: records
travel between machines), and a result.json in its cache folder; a finished pre-training has a done.json
beside its checkpoint. Records are looked up first, so cells recorded on another machine count as finished.
"""
import json
import time
from dataclasses import asdict
from pathlib import Path

from tinytlm.common import git_revision, read_json, write_json
from tinytlm.config import fold_compile


class Records:
    """Finished cells: looked up in the records (RESULTS/cells/<scale>/), then in the cache; written to both."""

    def __init__(self, records: Path, scale: str):
        self.records, self.scale = (Path(records) if records else None), scale

    def path(self, cell):
        return self.records / f"{cell.name}.json" if self.records else None

    def find(self, cell):
        """A finished cell's result (a pre-training: its done.json), or None."""
        if cell.kind == "pretrain":
            done = cell.out / "done.json"
            return read_json(done) if done.is_file() else None
        rec = self.path(cell)
        for p in ([rec] if rec else []) + [cell.out / "result.json"]:
            if p.is_file():
                r = read_json(p)
                if "kind" in r:  # (a bare run_arm result.json: a kill came before write() stamped it)
                    return r
        return None

    def write(self, cell, r: dict) -> dict:
        """Stamp a computed result (scale, git, date, torch) and write it to the cache and, unless a record
        of this cell exists already (e.g. from another machine: kept as it is), to the records."""
        import torch
        r = {"kind": cell.kind, "scale": self.scale, **r, "git": git_revision(),
             "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()) + " UTC", "torch": torch.__version__}
        write_json(cell.out / "result.json", r)
        return self.keep(cell, r)

    def keep(self, cell, r: dict) -> dict:
        """Write a finished cell's result as its record unless one exists (e.g. from another machine: kept as
        it is). Also for a cell found in the cache alone: a kill came between its result.json and its record."""
        if self.records and not self.path(cell).is_file():
            write_json(self.path(cell), r)
        return r


def finetune_record(cell, r: dict, seconds: float) -> dict:
    """What a fine-tuning cell's record holds: run_arm's result plus its keys, its pre-training's summary
    and the speed switches it ran with (with the stack's size when it was trained stacked)."""
    ckpt = cell.init.out if cell.init else None
    done = read_json(ckpt / "done.json") if ckpt else {}
    mlm = mlm_summary(ckpt, done.get("seconds"), done.get("mean_apt")) if ckpt else None
    r = {**r, "key": cell.key, "match": cell.match, "pretrain_key": cell.init.key if cell.init else None,
         "row": cell.row["name"], "dir": cell.out.name, "seconds": round(seconds, 1), "finetune": cell.fields,
         "mlm": mlm, "path": path_of(asdict(cell.cfg))}
    if r.get("stacked", 1) > 1:  # its seconds are the whole stack's
        r["path"]["stacked"] = r["stacked"]
    return r


# -----------------------------------------------------------------------------
# what a record keeps of a run

def last_record(run_dir: Path, kind: str):
    """The last record of this kind ("step", "epoch") in a run's metrics.jsonl, or None."""
    m = Path(run_dir) / "metrics.jsonl"
    rs = [r for r in map(json.loads, m.read_text().splitlines() if m.is_file() else []) if r.get("kind") == kind]
    return rs[-1] if rs else None


def mlm_summary(run_dir: Path, seconds=None, mean_apt=None) -> dict:
    """What a record keeps of a pre-training: its last epoch's loss and accuracy, steps, speed, and its
    <APT> (computed once, when the runner finished or first met the checkpoint: kept in its done.json)."""
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    head = recs[0] if recs else {}
    ep, st = (next((r for r in reversed(recs) if r.get("kind") == k), None) for k in ("epoch", "step"))
    return {"dir": Path(run_dir).name, "epochs": ep and ep["epoch"] + 1, "steps": ep and ep["step"],
            "loss": ep and ep["loss"], "mlm_acc": ep and ep["mlm_acc"],
            # the latest held-out evaluation (the last epoch's, with --val_every 1)
            **next(({k: r[k] for k in ("val_loss", "val_mlm_acc")} for r in reversed(recs) if "val_mlm_acc" in r), {}),
            "mean_apt": mean_apt, "seq_per_s": st and st.get("seq_per_s"),
            "seconds": seconds, "device": head.get("device"), "path": path_of(head.get("config", {}))}


def path_of(cfg: dict) -> dict:
    """The speed switches a run used (they do not change what is computed, but are worth knowing), and its
    precision (which does: it is in the cell's key too, tinytlm/paper_cells.py precision_key), and the
    implementations those switches resolved to on its device (`impl`: tinytlm/kernel_path.py Impl; a run from
    before it was recorded has none)."""
    cfg = fold_compile(cfg)  # a config from before --compile took a mode
    return {k: cfg.get(k) for k in ("compile", "kernels", "unpad", "precision", "impl")}
