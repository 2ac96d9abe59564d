"""Look inside a tiny model: accuracy per token, accuracy along the blocks, token clusters, single-head performance.

    python -m tinytlm.analyze runs/mlm-tiny-random-ws4000-s0 --plot          # -> that run's analysis/
    python -m tinytlm.analyze runs/b1x5 --out analysis/b1x5                   # a stacked run: DIR/s<seed> each
    python -m tinytlm.analyze runs/mlm-bert6-random-ws40000-s0 --task agnews  # T_M of AG News apart
    python -m tinytlm.analyze runs/cls-gap/pretrained --plot                  # a classifier: probes and SHP

RUN is a run folder with ckpt.pt (a single run, a stacked run's member OUT/s<seed>, a torchrun run: one
checkpoint format), a ckpt.pt file, a stacked run (its stack.json: every member) or a train_cls --gap
folder (both arms). What is computed (--what, default: all that apply to the checkpoint's kind):
- pre-training runs: apt (apt.json: per token [correct, occurrences] on the held-out rows with the fixed
  masks of tinytlm/mlm_eval.py, <APT>, the accuracy (= the run's val_mlm_acc), the W_s counts used,
  APT in log2 frequency bins), blocks (blocks.json, blocks.npz: a fresh MLM head per state trained on the
  frozen trunk, its APT), confusion (confusion.json, confusion.npz: the normalised token confusion and
  its strong-match clusters, per block and for the model's own head);
- classifier runs: blocks (test accuracy of a linear probe on [CLS] per block) and shp (shp.json: single-
  head performance of the last block, or of every block with --shp-blocks all).
The definitions and which parts are our reading: tinytlm/analyze_apt.py, analyze_probes.py,
analyze_confusion.py, analyze_shp.py. Outputs go to DIR (default RUN/analysis), every file written
atomically after all of the analysis succeeded; --plot adds PNGs (tinytlm/analyze_plots.py).
"""
import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinytlm.analyze_run import analyse_cls, analyse_mlm, prepare_cls, prepare_mlm, probe_config
from tinytlm.analyze_shp import NORMS
from tinytlm.checkpoint import load_checkpoint
from tinytlm.common import ArgParser, UserError, add_option, atomic_path, cli, read_json
from tinytlm.precision import HELP as PRECISION_HELP, PRECISIONS, resolve_precision
from tinytlm.report import member_folder
from tinytlm.train import resolve_device

KINDS = {"mlm": ("apt", "blocks", "confusion"), "cls": ("blocks", "shp")}


@dataclass
class Job:
    label: str  # what the summary line calls it: the run, with its member or arm
    state: dict = field(repr=False)  # the loaded checkpoint
    out: Path  # where its files go
    asked: tuple = ()  # the analyses to run (--what, or all that apply to its kind)
    files: dict = field(default_factory=dict, repr=False)  # name -> JSON object, npz arrays, JSONL records
    written: list = field(default_factory=list)  # the paths written


# -----------------------------------------------------------------------------
# which checkpoints

def run_folders(run: Path, prefix: str = "") -> list:
    """(label, folder or file) of every checkpoint RUN holds: itself, a stack's members, a --gap folder's arms
    (a stack of --gap folders: every member's arms)."""
    label = prefix or (run.resolve().parent.name if run.is_file() else run.resolve().name)
    if run.is_file():
        return [(label, run)]
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder or checkpoint")
    if (run / "ckpt.pt").is_file():
        return [(label, run)]
    if (run / "stack.json").is_file():
        members = read_json(run / "stack.json", "stack manifest").get("members")
        if not isinstance(members, list) or not members:
            raise UserError(f"{run / 'stack.json'}: lists no members")
        found = []
        for m in members:
            folder = member_folder(run, str(m))
            found += run_folders(folder, folder.name)
        return found
    arms = [run / a for a in ("pretrained", "scratch") if (run / a / "ckpt.pt").is_file()]
    if arms:
        return [(f"{prefix}/{a.name}" if prefix else a.name, a) for a in arms]
    raise UserError(f"{run}: no ckpt.pt (not a run folder, a stacked run or a --gap folder)")


def jobs(args) -> list:
    """A Job per checkpoint, loaded and checked (kind, what was asked) before anything is computed."""
    run = Path(args.run)
    found = run_folders(run)
    out = Path(args.out) if args.out else None
    result = []
    for label, where in found:
        state = load_checkpoint(where)
        asked = args.what.split(",") if args.what else list(KINDS[state["kind"]])
        bad = [w for w in asked if w not in KINDS["mlm"] + KINDS["cls"]]
        if bad:
            raise UserError(f"--what {bad[0]!r}: choose from apt, blocks, confusion, shp")
        wrong = [w for w in asked if w not in KINDS[state["kind"]]]
        if wrong:
            raise UserError(f"{state['path']}: a {'classifier' if state['kind'] == 'cls' else 'pre-training'} "
                            f"checkpoint has no {wrong[0]} analysis ({', '.join(KINDS[state['kind']])} apply)")
        folder = where.parent if where.is_file() else where
        dest = (out / label if len(found) > 1 else out) if out else folder / "analysis"
        result.append(Job(label, state, dest, tuple(asked)))
    return result




# -----------------------------------------------------------------------------
# writing

def _finite(obj):
    """obj for strict JSON: nan and inf become None (an SNR with no noise, a bin without tokens)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def write_files(folder: Path, files: dict) -> list:
    """Every {name: content} of an analysis into folder, each written atomically; the paths written.
    .json: a dict; .jsonl: a list of records; .npz: {name: array}; .png: a matplotlib Figure."""
    written = []
    for name, content in files.items():
        path = folder / name
        with atomic_path(path) as tmp:
            if name.endswith(".json"):
                tmp.write_text(json.dumps(_finite(content), indent=1) + "\n")
            elif name.endswith(".jsonl"):
                tmp.write_text("".join(json.dumps(_finite(r)) + "\n" for r in content))
            elif name.endswith(".npz"):
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, **content)
            else:
                content.savefig(tmp, format="png", dpi=110)  # the temp name has no .png: say the format
        written.append(path)
    return written


# -----------------------------------------------------------------------------
# command line

def analyse(args) -> list:
    """Analyse every checkpoint RUN holds; returns [(Job, summary line)]. All of them are loaded and their
    data checked first, then computed, and only then written: a failure leaves no file behind."""
    device = resolve_device(args.device)
    args = argparse.Namespace(**{**vars(args), "precision": resolve_precision(args.precision, device),
                                 "precision_requested": args.precision})  # the resolved one, in every header
    if args.plot:
        from tinytlm.report import _matplotlib
        _matplotlib()  # a missing matplotlib is a one-line error before any work
    todo = jobs(args)
    prepared = [(prepare_mlm if j.state["kind"] == "mlm" else prepare_cls)(j.state, args) for j in todo]
    done = []
    for job, ctx in zip(todo, prepared):
        analyse_one = analyse_mlm if job.state["kind"] == "mlm" else analyse_cls
        job.files, line = analyse_one(job.state, ctx, job.asked, args, device)
        if args.plot:
            from tinytlm.analyze_plots import figures
            job.files.update({f"{stem}.png": fig for stem, fig in figures(job.files, job.label).items()})
        done.append((job, line))
    for job, _ in done:
        job.written = write_files(job.out, job.files)
    return done


def parser() -> ArgParser:
    from tinytlm.tasks import add_task_args
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_option(ap, "run", help="run folder, ckpt.pt, stacked run or --gap folder", kind="run")
    add_option(ap, "--out", default="", help="output folder (default RUN/analysis; several checkpoints: DIR/<name>)",
               kind="out")
    add_option(ap, "--plot", action="store_true", help="also draw PNGs beside the JSON (needs matplotlib)")
    add_option(ap, "--what", default="", help="comma-separated: apt, blocks, confusion (pre-training), "
                                              "blocks, shp (classifier); default all that apply", kind="list")
    add_option(ap, "--device", default="cpu", help="cpu | cuda | auto", pattern=r"auto|cpu|cuda(:\d+)?")
    add_option(ap, "--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    add_option(ap, "--data", default="", help="prepared data root (default: the paths the run recorded)", kind="dir")
    add_option(ap, "--raw", default="", help="raw data root (a task that is not prepared yet)", kind="dir")
    add_task_args(ap, task_default="")  # --task: show its T_M tokens apart in apt.json
    add_option(ap, "--min-occ", type=int, default=1, help="<APT> averages tokens selected at least this often", low=1)
    add_option(ap, "--cluster-threshold", type=float, default=0.5,
               help="strong match: normalised confusion entry >= this (our reading)")
    add_option(ap, "--probe-steps", type=int, default=300, help="optimizer steps of every per-block probe", low=0)
    add_option(ap, "--probe-batch", type=int, default=32, help="rows per probe step", low=1)
    add_option(ap, "--probe-lr", type=float, default=1e-3, help="probes' AdamW lr (linear decay to 0)", above=0)
    add_option(ap, "--probe-wd", type=float, default=0.0, help="probes' AdamW weight decay", low=0)
    add_option(ap, "--probe-seed", type=int, default=0, help="probes' row order, masks and init", low=0)
    add_option(ap, "--probe-init", default="fresh", help="MLM probes: fresh | head (a copy of the trained head)",
               choices=("fresh", "head"))
    add_option(ap, "--shp-blocks", default="last", help="SHP of the last block | all (earlier blocks: their probe)",
               choices=("last", "all"))
    add_option(ap, "--shp-group", type=int, default=0, help="nodes per group (0 = head_dim: SHP; 1: SNP)", low=0)
    add_option(ap, "--shp-threshold", type=float, default=0.5, help="Boolean SHP matrix: normalised field >= this",
               low=float("-inf"))
    add_option(ap, "--shp-norm", default="column", help=f"SHP normalisation: {' | '.join(NORMS)} (our reading)",
               choices=NORMS)
    return ap


def check_args(args):
    """What the flags' own constraints (parser()) cannot say: the probes' budget as a whole, and the task's
    sample flags, which mean something only with --task (checked here, before any work)."""
    import dataclasses
    from tinytlm.tasks import TaskFields, spec_from_args
    probe_config(args)  # its own one-line errors
    if args.task:
        spec_from_args(args)
        return
    given = [f.name for f in dataclasses.fields(TaskFields) if getattr(args, f.name) != f.default and f.name != "task"]
    if given or args.entity_markers:
        flag = given[0].replace("_", "-") if given else "entity-markers"
        raise UserError(f"--{flag}: describes the sample of a task; give --task too")


def main(argv=None):
    args = parser().parse_args(argv)
    check_args(args)
    done = analyse(args)
    for job, line in done:
        print(f"{job.label}: {line}")
        for p in job.written:
            print(f"  wrote {p}")
    return done


if __name__ == "__main__":
    cli(main)
