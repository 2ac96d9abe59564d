"""Plots of a run: the curves of pre-training and fine-tuning runs as PNG figures.

    python -m tinytlm.report runs/mlm-tiny-random-ws4000-s0              # -> that folder's pretrain.png
    python -m tinytlm.report runs/gap                                     # a --gap run: both arms, finetune.png
    python -m tinytlm.report runs/mlm-a runs/mlm-b --out plots/a-vs-b      # two runs overlaid in one figure

RUN is a run folder (its metrics.jsonl), a `train_cls.py --gap` folder (its arms pretrained/ and
scratch/ side by side) or a stacked run (`--seeds`: its stack.json; each member is a run). Every run
becomes one line per panel, labelled with its folder name; several RUNs are drawn together.

pretrain.png (train_mlm runs), against the optimizer step: training MLM loss and accuracy (the
window means of the step records), validation MLM loss and accuracy (any record with val_loss /
val_mlm_acc; the panels are left out when no run has them), learning rate, and sequences/s (a
stacked member's share of the stack's speed). finetune.png (train_cls runs), against the epoch: test
accuracy and training loss; the two arms of a --gap run share a colour, scratch dashed.

The figures go into each RUN folder, or once into --out DIR; every file is written atomically. Drawn
with matplotlib's Agg canvas (no window, no pyplot state); matplotlib is optional (`pip install
matplotlib`, or the `[plot]` extra). A resumed run's records after its last checkpoint are written
twice: the later record of a step (or epoch) wins.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from tinytlm.common import ArgParser, UserError, add_option, atomic_path, cli, read_json

# (file stem, x key, x label, panels): panel = (title, record kinds it reads, y key); record kind "*" =
# any record that has the y key (validation may come in epoch records or in a final "val" record)
FIGURES = {
    "mlm": ("pretrain", "step", "optimizer step", [
        ("training MLM loss", "step", "loss"),
        ("training MLM accuracy", "step", "mlm_acc"),
        ("validation MLM loss", "*", "val_loss"),
        ("validation MLM accuracy", "*", "val_mlm_acc"),
        ("learning rate", "step", "lr"),
        ("sequences / s", "step", "seq_per_s"),
    ]),
    "cls": ("finetune", "epoch", "epoch", [
        ("test accuracy", "epoch", "test_acc"),
        ("training loss", "epoch", "train_loss"),
    ]),
}


@dataclass
class Run:
    label: str  # legend entry: the folder name, with its gap arm or stack member
    path: Path  # the folder holding metrics.jsonl
    kind: str  # "mlm" (train_mlm) or "cls" (train_cls)
    records: list = field(repr=False)  # metrics.jsonl's records after the header(s)
    group: str = ""  # runs of one group (the two arms of a --gap run) share a colour
    source: Path = None  # the RUN given that holds it


# -----------------------------------------------------------------------------
# reading runs

def read_metrics(path: Path) -> list:
    """The records of a metrics.jsonl. A last line cut short (a run killed while writing it) is left
    out; any other line that is not a JSON object is an error."""
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            if i == len(lines):
                break
            raise UserError(f"{path}:{i}: not a JSON record")
        records.append(rec)
    return records


def run_kind(path: Path, records: list) -> str:
    """mlm or cls, from the header's config (the fields only one loop writes) or else the records."""
    for r in records:
        cfg = (r.get("config") or {}) if r.get("kind") == "header" else {}
        if "task_dir" in cfg or "test_acc" in r:
            return "cls"
        if "pretrain_set" in cfg or r.get("kind") == "step" or "mlm_acc" in r:
            return "mlm"
    raise UserError(f"{path}: not the metrics of a train_mlm or train_cls run (no header, no records)")


def load_run(folder: Path, label: str, group: str) -> Run:
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{folder}: no metrics.jsonl (not a run folder, a --gap folder or a stacked run)")
    records = read_metrics(metrics)
    return Run(label, folder, run_kind(metrics, records), [r for r in records if r.get("kind") != "header"], group)


def member_folder(stack: Path, member: str) -> Path:
    """A stack member's folder. stack.json keeps the path as given when the stack started (relative to
    that working directory): OUT/s<seed> with --out, else runs/<name> beside the stack's folder."""
    m = Path(member)
    for cand in ([m] if m.is_absolute() else []) + [stack / m.name, stack.parent / m.name, m]:
        if cand.is_dir():
            return cand
    raise UserError(f"{stack / 'stack.json'}: member {member} not found")


def expand(path: Path, label: str) -> list:
    """The runs in `path`: itself, the arms of a --gap folder, or the members of a stacked run (each
    member may be a --gap folder)."""
    if path.is_file() and path.name == "metrics.jsonl":
        path = path.parent
    if not path.is_dir():
        raise UserError(f"{path}: no such run folder")
    if (path / "stack.json").is_file() and not (path / "metrics.jsonl").is_file():
        manifest = read_json(path / "stack.json", "stack manifest")
        members = manifest.get("members") if isinstance(manifest, dict) else None
        if not isinstance(members, list) or not members:
            raise UserError(f"{path / 'stack.json'}: lists no members")
        runs = []
        for m in members:
            folder = member_folder(path, str(m))
            inside = folder.resolve().parent == path.resolve()  # OUT/s<seed>, or a run of its own elsewhere
            runs += expand(folder, f"{label}/{folder.name}" if inside else folder.name)
        return runs
    arms = [path / a for a in ("pretrained", "scratch") if (path / a / "metrics.jsonl").is_file()]
    if arms and not (path / "metrics.jsonl").is_file():  # a --gap folder (the scratch arm may not have started)
        return [load_run(a, f"{label}/{a.name}", group=str(path)) for a in arms]
    return [load_run(path, label, group=str(path))]


def load_runs(paths) -> list:
    """Every run the given folders hold, labelled by folder name (the full path where two names clash)."""
    given = [Path(p) for p in paths]
    names = [p.resolve().name if p.name in ("", ".", "..") else p.name for p in given]
    runs = []
    for p, name in zip(given, names):
        for r in expand(p, str(p) if names.count(name) > 1 else name):
            r.source = p
            runs.append(r)
    return runs


# -----------------------------------------------------------------------------
# curves and figures

def curve(run: Run, kinds: str, x_key: str, y_key: str) -> tuple:
    """(xs, ys) of one panel, sorted by x; a record repeated by a resumed run: the last one counts.
    Fine-tuning epochs are drawn 1-based, as the run prints them."""
    points, last_x = {}, 0
    for r in run.records:
        x = r.get(x_key, last_x)  # a record without a step (a final "val" record): at the last step seen
        if not isinstance(x, (int, float)):
            continue
        last_x = x
        if (kinds == "*" or r.get("kind") == kinds) and isinstance(r.get(y_key), (int, float)) \
                and math.isfinite(r[y_key]):
            points[x] = r[y_key]
    xs = sorted(points)
    return [x + 1 for x in xs] if x_key == "epoch" else xs, [points[x] for x in xs]


def _matplotlib():
    """matplotlib's Figure, Agg canvas and integer tick locator, or a one-line error. `import matplotlib`
    first, so that a missing (or masked) package fails even when its submodules are already loaded."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise UserError("plots need matplotlib: pip install matplotlib (or pip install -e '.[plot]')") from None
    return Figure, FigureCanvasAgg, MaxNLocator


def figures(runs: list) -> dict:
    """{file stem: matplotlib Figure}: pretrain for the train_mlm runs, finetune for the train_cls runs;
    one panel per quantity that some run has, one line per run that has it."""
    Figure, FigureCanvasAgg, MaxNLocator = _matplotlib()
    out = {}
    for kind, (stem, x_key, x_label, panels) in FIGURES.items():
        mine = [r for r in runs if r.kind == kind]
        groups = list(dict.fromkeys(r.group for r in mine))  # a colour per group, in the order given
        drawn = [(title, y, [(r, curve(r, kinds, x_key, y)) for r in mine]) for title, kinds, y in panels]
        drawn = [(t, y, [(r, c) for r, c in lines if c[0]]) for t, y, lines in drawn]
        drawn = [d for d in drawn if d[2]]
        if not drawn:
            continue
        ncols = 2 if len(drawn) > 1 else 1
        nrows = math.ceil(len(drawn) / ncols)
        fig = Figure(figsize=(5.5 * ncols, 3.4 * nrows), layout="constrained")
        FigureCanvasAgg(fig)  # the Agg canvas draws to PNG; no window is ever made
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, (title, y_key, lines) in zip(axes, drawn):
            for r, (xs, ys) in lines:
                ax.plot(xs, ys, color=f"C{groups.index(r.group) % 10}", label=r.label,
                        linestyle="--" if r.label.endswith("/scratch") else "-",
                        marker="o" if len(xs) <= 30 else None, markersize=3)
            ax.set(title=title, xlabel=x_label)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are whole numbers
            if y_key == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in axes[len(drawn):]:
            ax.remove()
        fig.suptitle(f"{'pre-training' if kind == 'mlm' else 'fine-tuning'}: {len(mine)} run{'s' * (len(mine) > 1)}")
        out[stem] = fig
    if not out:
        raise UserError(f"{', '.join(str(r.path) for r in runs)}: no step or epoch records to plot yet")
    return out


def write(figs: dict, folders: dict, dpi: int = 110) -> list:
    """{folder: figure stems}: each of those figures as FOLDER/<stem>.png, atomically; the paths written."""
    written = []
    for folder, stems in folders.items():
        for stem in stems:
            fig, path = figs[stem], Path(folder) / f"{stem}.png"
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=dpi)  # the temp name has no .png: say the format
            written.append(path)
    return written


def plot(paths, out=None) -> tuple:
    """(figures, paths written): the runs in `paths` drawn together, into `out`, else into each RUN folder
    the figures it has runs in (a pre-training folder gets no finetune.png)."""
    runs = load_runs(paths)
    figs = figures(runs)
    if out:
        return figs, write(figs, {Path(out): list(figs)})
    folders = {}
    for r in runs:
        stem = FIGURES[r.kind][0]
        if stem in figs:
            folders.setdefault(r.source.parent if r.source.is_file() else r.source, {})[stem] = None
    return figs, write(figs, folders)


def parser() -> ArgParser:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_option(ap, "runs", nargs="+", help="run folders, --gap folders or stacked runs", kind="run")
    add_option(ap, "--out", default="", help="write the figures here (default: into each run folder)", kind="out")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    _, written = plot(args.runs, args.out or None)
    for p in written:
        print(f"wrote {p}")
    return written


if __name__ == "__main__":
    cli(main)
