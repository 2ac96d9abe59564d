"""Plots of a run (tinytlm/report.py): figures drawn from real tiny runs (so the metrics format cannot
drift from what the loops write), PNGs written atomically, overlays, --gap arms, stacked runs, and
one-line errors for bad input or a missing matplotlib."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinytlm import finetune, pretrain, report
from tinytlm.common import UserError, cli

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--model", "tiny", "--arch", "n_layer=1,n_head=1,head_dim=32", "--device", "cpu"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# matplotlib is optional (the [plot] extra): without it only the tests of its absence and of bad input run
needs_mpl = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")


@pytest.fixture(scope="module")
def made(roots, tmp_path_factory):
    """Real tiny runs: a stacked pre-training (seeds 0, 1: mlm/stack.json, mlm/s0, mlm/s1) and a --gap
    fine-tuning from member s0 (gap/pretrained, gap/scratch). A stacked --gap fine-tuning (cgap/stack.json,
    cgap/s<seed>/ each a --gap folder) is laid out from copies of the gap run, as train_cls.py --seeds
    writes it (training one costs seconds more)."""
    raw, data = roots
    base = tmp_path_factory.mktemp("report")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # runs this small gain nothing from threads; on a shared, busy machine they cost 5x
    try:
        make_runs(base, raw, data)
    finally:
        torch.set_num_threads(threads)
    return base


def make_runs(base: Path, raw: Path, data: Path):
    pretrain.main([*SMALL, "--ws", "24", "--epochs", "2", "--batch_size", "8", "--log_every", "2", "--save_every", "0",
                   "--raw", str(raw), "--data", str(data), "--seeds", "0,1", "--out", str(base / "mlm")])
    finetune.main(["--task", "agnews", "--train-per-label", "4", "--test-per-label", "3", "--epochs", "2",
                   "--batch_size", "8", "--save_every", "0", "--raw", str(raw), "--data", str(data), "--device", "cpu",
                   "--gap", "--init", str(base / "mlm" / "s0"), "--out", str(base / "gap")])
    members = [copy_run(base / "gap", base / "cgap" / f"s{s}") for s in (0, 1)]
    (base / "cgap" / "stack.json").write_text(json.dumps({"kind": "cls", "config": {"seeds": "0,1", "gap": True},
                                                          "overrides": {}, "members": [str(m) for m in members]}))


def copy_run(src: Path, dst: Path) -> Path:
    """A run's folder without its checkpoints: the tests that write PNGs into run folders write into copies."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.pt"))
    return dst


def records(path: Path) -> list:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def assert_png(path: Path):
    from matplotlib.image import imread
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000, path
    h, w, c = imread(path).shape
    assert h > 100 and w > 100 and c in (3, 4), (path, h, w, c)


def panels(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes}


def lines(ax) -> dict:
    return {ln.get_label(): ln for ln in ax.get_lines()}


@needs_mpl
def test_pretraining_run(made, tmp_path):
    run = copy_run(made / "mlm" / "s0", tmp_path / "s0")
    figs, written = report.plot([run])
    assert list(figs) == ["pretrain"] and written == [run / "pretrain.png"]  # no finetune.png in an MLM run
    assert_png(run / "pretrain.png")
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".png" or p.name.startswith(".")) == ["pretrain.png"]
    recs = records(run)
    steps = [r for r in recs if r["kind"] == "step"]
    has_val = any("val_loss" in r for r in recs)  # held-out validation, where the loop writes it
    want = ["training MLM loss", "training MLM accuracy"] + \
        (["validation MLM loss", "validation MLM accuracy"] if has_val else []) + ["learning rate", "sequences / s"]
    p = panels(figs["pretrain"])
    assert list(p) == want
    for title, key in (("training MLM loss", "loss"), ("training MLM accuracy", "mlm_acc"), ("learning rate", "lr"),
                       ("sequences / s", "seq_per_s")):
        (ln,) = p[title].get_lines()  # one run, one line, labelled by its folder
        assert ln.get_label() == "s0"
        assert list(ln.get_xdata()) == [r["step"] for r in steps] == [2, 3, 4, 6]  # 3 steps an epoch
        assert list(ln.get_ydata()) == pytest.approx([r[key] for r in steps])
    assert list(p["learning rate"].get_lines()[0].get_ydata()) == sorted([r["lr"] for r in steps], reverse=True)


@needs_mpl
def test_two_runs_overlay_in_one_figure(made, tmp_path):
    mlm = made / "mlm"
    figs = report.figures(report.load_runs([mlm / "s0", mlm / "s1"]))
    assert list(figs) == ["pretrain"]
    for ax in figs["pretrain"].axes:
        assert list(lines(ax)) == ["s0", "s1"], ax.get_title()
    loss = lines(panels(figs["pretrain"])["training MLM loss"])
    s1_steps = [r for r in records(mlm / "s1") if r["kind"] == "step"]
    assert list(loss["s1"].get_ydata()) == pytest.approx([r["loss"] for r in s1_steps])
    assert loss["s0"].get_color() != loss["s1"].get_color()
    # the stacked run's folder is its members; labels name the stack
    figs = report.figures(report.load_runs([mlm]))
    assert all(list(lines(ax)) == ["mlm/s0", "mlm/s1"] for ax in figs["pretrain"].axes)
    # --out: one figure there, nothing written into the run folders
    figs, written = report.plot([mlm / "s0", mlm / "s1"], out=tmp_path / "cmp")
    assert written == [tmp_path / "cmp" / "pretrain.png"] and not list(mlm.rglob("*.png"))
    assert_png(written[0])
    # two runs of the same folder name: labelled by their paths
    other = copy_run(mlm / "s0", tmp_path / "other" / "s0")
    labels = [r.label for r in report.load_runs([mlm / "s0", other])]
    assert labels == [str(mlm / "s0"), str(other)]
    # stack.json names its members as given when the stack started (relative to that working directory)
    stack = copy_run(mlm, tmp_path / "moved")
    (stack / "stack.json").write_text(json.dumps({"kind": "mlm", "members": ["runs/b1/s0", "runs/b1/s1"]}))
    assert [(r.label, r.path) for r in report.load_runs([stack])] == [("moved/s0", stack / "s0"),
                                                                       ("moved/s1", stack / "s1")]
    shutil.rmtree(stack / "s1")
    with pytest.raises(UserError, match="member runs/b1/s1 not found"):
        report.load_runs([stack])


@needs_mpl
def test_gap_run_has_both_arms(made, tmp_path):
    gap = copy_run(made / "gap", tmp_path / "gap")
    figs, written = report.plot([gap])
    assert list(figs) == ["finetune"] and written == [gap / "finetune.png"]
    assert_png(gap / "finetune.png")
    p = panels(figs["finetune"])
    assert list(p) == ["test accuracy", "training loss"]
    acc = lines(p["test accuracy"])
    assert list(acc) == ["gap/pretrained", "gap/scratch"]
    for arm in ("pretrained", "scratch"):
        result = json.loads((gap / arm / "result.json").read_text())
        ln = acc[f"gap/{arm}"]
        assert list(ln.get_xdata()) == [1, 2]  # epochs, 1-based as the run prints them
        assert list(ln.get_ydata()) == pytest.approx(result["acc_per_epoch"])
        loss = [r["train_loss"] for r in records(gap / arm) if r["kind"] == "epoch"]
        assert list(lines(p["training loss"])[f"gap/{arm}"].get_ydata()) == pytest.approx(loss)
    # the arms of one gap run: one colour, scratch dashed
    assert acc["gap/pretrained"].get_color() == acc["gap/scratch"].get_color()
    assert (acc["gap/pretrained"].get_linestyle(), acc["gap/scratch"].get_linestyle()) == ("-", "--")


@needs_mpl
def test_stacked_gap_run_and_mixed_kinds(made, tmp_path):
    figs = report.figures(report.load_runs([made / "cgap"]))
    want = [f"cgap/s{s}/{arm}" for s in (0, 1) for arm in ("pretrained", "scratch")]
    assert all(list(lines(ax)) == want for ax in figs["finetune"].axes)
    # a pre-training and a fine-tuning run given together: both figures; each folder gets its own kind
    mlm, gap = copy_run(made / "mlm", tmp_path / "mlm"), copy_run(made / "gap", tmp_path / "gap")
    figs, written = report.plot([mlm, gap])
    assert sorted(figs) == ["finetune", "pretrain"]
    assert written == [mlm / "pretrain.png", gap / "finetune.png"]


@needs_mpl
def test_validation_panels_follow_the_val_keys(made, tmp_path):
    """val_loss / val_mlm_acc from any record that has them (epoch records, a final "val" record without a
    step), keyed by step; no val keys in any run: no validation panels."""
    recs = records(made / "mlm" / "s0")
    plain = [{k: v for k, v in r.items() if not k.startswith("val_")} for r in recs if r.get("kind") != "val"]
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    titles = list(panels(report.figures(report.load_runs([tmp_path / "plain"]))["pretrain"]))
    assert not [t for t in titles if t.startswith("validation")]

    with_val = [{**r, "val_loss": 9.0 - r["epoch"], "val_mlm_acc": 0.1 * (r["epoch"] + 1)} if r["kind"] == "epoch"
                else r for r in plain]
    with_val.append({"kind": "val", "val_loss": 7.5, "val_mlm_acc": 0.25})  # at the last step seen (6)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in with_val))
    figs = report.figures(report.load_runs([tmp_path / "plain", tmp_path / "val"]))
    p = panels(figs["pretrain"])
    assert list(p)[2:4] == ["validation MLM loss", "validation MLM accuracy"]
    (ln,) = p["validation MLM loss"].get_lines()  # only the run that has validation
    assert ln.get_label() == "val"
    assert list(ln.get_xdata()) == [3, 6] and list(ln.get_ydata()) == [9.0, 7.5]  # the final record wins at 6
    assert list(p["validation MLM accuracy"].get_lines()[0].get_ydata()) == pytest.approx([0.1, 0.25])
    assert len(p["training MLM loss"].get_lines()) == 2


@needs_mpl
def test_resumed_and_damaged_metrics(made, tmp_path):
    recs = records(made / "mlm" / "s0")
    steps = [r for r in recs if r["kind"] == "step"]
    # a resumed run: a second header, then the records after its checkpoint again; the later ones count
    again = [recs[0]] + [{**r, "loss": 1.0} for r in steps[-2:]]
    text = "".join(json.dumps(r) + "\n" for r in recs + again)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text(text + '{"kind": "step", "st')  # killed mid-line: left out
    (ln,) = panels(report.figures(report.load_runs([tmp_path / "r"]))["pretrain"])["training MLM loss"].get_lines()
    assert list(ln.get_xdata()) == [r["step"] for r in steps]
    assert list(ln.get_ydata()) == pytest.approx([r["loss"] for r in steps[:-2]] + [1.0, 1.0])
    # a damaged line in the middle, or no run at all in the file: one-line errors naming the file
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text(text.replace('{"kind": "step"', "{oops", 1))
    with pytest.raises(UserError, match=r"metrics.jsonl:\d+: not a JSON record"):
        report.load_runs([tmp_path / "bad"])
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"kind": "note"}\n')
    with pytest.raises(UserError, match="not the metrics of a train_mlm or train_cls run"):
        report.load_runs([tmp_path / "bad"])


@needs_mpl
def test_a_failed_write_leaves_nothing(made, tmp_path, monkeypatch):
    """The PNG is written to a temp name and renamed: a write that fails half-way leaves no file."""
    from matplotlib.figure import Figure
    run = copy_run(made / "mlm" / "s0", tmp_path / "s0")

    def broken(self, fname, **kw):
        Path(fname).write_bytes(PNG_MAGIC)  # a partial file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError):
        report.plot([run])
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics.jsonl"]


def test_matplotlib_missing_is_one_line(made, tmp_path, monkeypatch, capsys):
    run = copy_run(made / "mlm" / "s0", tmp_path / "s0")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(SystemExit) as e:
        cli(lambda: report.main([str(run)]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "pip install matplotlib" in err[0], err
    assert not list(run.glob("*.png"))


@pytest.mark.parametrize("case", ["missing", "no_metrics"])
def test_bad_run_folders_from_the_command_line(tmp_path, case):
    folder = tmp_path / "run"
    if case == "no_metrics":
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "tinytlm.report", str(folder)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(folder) in err[0], r.stderr[-2000:]
    assert ("no such run folder" if case == "missing" else "no metrics.jsonl") in err[0]
    assert not list(tmp_path.rglob("*.png"))
