"""The labels sweep (beyond the paper: the gap against AG News rows per label at one pre-trained checkpoint),
<APT> in the records and reports, and the paper runner's analyze target."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tinytlm.paper import main
from tinytlm.paper_cells import Runner, table_cells
from tinytlm.paper_report import row_table, summarize
from tinytlm.paper_tables import LABEL_SIZES, SCALES, default_seeds, grid, pretrain_seeds

REPO = Path(__file__).resolve().parents[1]


# -----------------------------------------------------------------------------
# the grid: fixed in code before any result

@pytest.mark.parametrize("scale", ["cpu", "paper"])
def test_labels_grid_is_the_committed_one(scale):
    """16, 32, 64, 128, 256 and 1,000 rows per label, a pre-trained and a scratch arm each, 3 seeds, one
    checkpoint: the scale's Table 5 row at W_s ws["labels"] (8,000 at cpu, 40,000 at paper)."""
    assert LABEL_SIZES == (16, 32, 64, 128, 256, 1000)
    rows = grid("labels", scale)["rows"]
    ws = {"cpu": 8000, "paper": 40000}[scale]
    assert [r["finetune"]["train_per_label"] for r in rows] == [n for n in LABEL_SIZES for _ in (0, 1)]
    pre, scratch = rows[0::2], rows[1::2]
    assert all(r["pretrain"] == pre[0]["pretrain"] and r["pretrain"]["ws"] == ws for r in pre)
    assert all(r["pretrain"] is None and r["gap_of"] is None for r in scratch)
    assert [r["gap_of"] for r in pre] == [r["name"] for r in scratch]
    t5 = {r["name"]: r for r in grid("table5", scale)["rows"]}
    # only the train rows per label differ from Table 5's recipe; at 1,000 both arms are Table 5's rows
    for r in rows:
        assert {**r["finetune"], "train_per_label": 1000} == t5["no pre-training"]["finetune"]
    assert pre[-1]["pretrain"] == t5[f"W_s {ws:,}"]["pretrain"]
    assert default_seeds("labels", scale) == 3 and pretrain_seeds("labels", scale) == 1
    assert default_seeds("table5", scale) == SCALES[scale]["seeds"]


def test_labels_cells_share_table5_cells_and_one_checkpoint(tmp_path):
    """At cpu scale the 1,000-row cells are Table 5's very cells (same cache folders), and every pre-trained
    cell of the sweep, all seeds, starts from the one checkpoint."""
    runner = Runner(tmp_path, "cpu", "", "", mode="plan")
    cells = table_cells(grid("labels", "cpu"), 3, 1, runner.cache, runner.switches)
    t5 = table_cells(grid("table5", "cpu"), 3, 1, runner.cache, runner.switches)
    assert len(cells) == 3 * 12 and len({c.out for c in cells}) == 36
    assert len({c.init.out for c in cells if c.init}) == 1
    shared = {c.out for c in cells} & {c.out for c in t5}
    assert len(shared) == 6  # 1,000 per label: W_s 8,000 and no pre-training, 3 seeds each
    assert {c.row["finetune"]["train_per_label"] for c in cells if c.out in shared} == {1000}


def test_committed_records_keep_their_cells(tmp_path):
    """Every record committed in results/cells/cpu/ is found again: its key is one of the current grid's
    cell keys (renaming a flag, --wd to --weight_decay, must not orphan finished cells)."""
    records = sorted((Path(__file__).resolve().parents[1] / "results" / "cells" / "cpu").glob("*.json"))
    assert records
    runner = Runner(tmp_path, "cpu", "", "", mode="plan")
    keys = {c.key for c in table_cells(grid("labels", "cpu"), 3, 1, runner.cache, runner.switches)}
    for r in records:
        assert json.loads(r.read_text())["key"] in keys, r.name


def test_committed_fp32_records_under_auto_precision(tmp_path, monkeypatch):
    """On a CPU with native bf16 (patched: auto = bf16), a bf16 cell is another cell (other keys, no fp32 key
    changes), yet `--report` without --precision finds every committed record (all fp32) and says fp32; an
    explicit --precision bf16 report finds none of them, and --plan with auto has all 36 fine-tunings to run."""
    import shutil
    from tinytlm import precision
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: True)
    results = tmp_path / "r"
    shutil.copytree(REPO / "results" / "cells" / "cpu", results / "cells" / "cpu")
    fp32 = table_cells(grid("labels", "cpu"), 3, 1, tmp_path / "c", Runner(tmp_path / "c", "cpu", "", "").switches)
    bf16 = table_cells(grid("labels", "cpu"), 3, 1, tmp_path / "c", Runner(tmp_path / "c", "cpu", "", "",
                                                                          precisions=("bf16",)).switches)
    assert not {c.key for c in fp32} & {c.key for c in bf16} and {c.init.key for c in bf16 if c.init}.isdisjoint(
        {c.init.key for c in fp32 if c.init})
    argv = ["labels", "--scale", "cpu", "--cache", str(tmp_path / "c"), "--results", str(results)]
    rows = main([*argv, "--report"])["labels"]["rows"]
    assert [r["n"] for r in rows] == [3] * 12 and all(r["precisions"] == ["fp32"] for r in rows)
    assert "cells (3 seeds x 12 rows) done, on" in (md := (results / "cpu" / "labels.md").read_text())
    assert " in fp32, " in md.splitlines()[2] and "bf16" not in md
    assert all(r["n"] == 0 for r in main([*argv, "--report", "--precision", "bf16"])["labels"]["rows"])
    planned = main([*argv, "--plan"])["labels"]
    assert sum(c["state"] == "todo" for c in planned if c["cell"] == "finetune") == 36
    planned = main([*argv, "--plan", "--precision", "fp32"])["labels"]
    assert sum(c["state"] == "cached" for c in planned if c["cell"] == "finetune") == 36
    assert not (tmp_path / "c").exists()


def test_labels_plan_lists_the_sweep(tmp_path):
    """--plan: 36 fine-tunings and the one pre-training, nothing run; the sequences per cell follow the sizes."""
    planned = main(["labels", "--scale", "cpu", "--plan", "--cache", str(tmp_path / "c"),
                    "--results", str(tmp_path / "r")])["labels"]
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()
    tunings = [c for c in planned if c["cell"] == "finetune"]
    assert len(tunings) == 36 and sum(c["cell"] == "pretrain" for c in planned) == 1
    # 4 labels x n rows x 4 epochs, each size twice (two arms) and 3 seeds
    assert sorted(c["seqs"] for c in tunings) == sorted(16 * n for n in LABEL_SIZES for _ in range(6))


def test_labels_bad_input_is_one_line_exit_2(tmp_path):
    """analyze without --table, with an unknown one, with --plan, or with nothing in the cache: one line, exit 2,
    nothing written."""
    for argv in (["analyze"], ["analyze", "--table", "table42"], ["analyze", "--table", "table5", "--plan"],
                 ["analyze", "--table", "labels", "--scale", "mini"], ["labels", "--seeds", "0"]):
        p = subprocess.run([sys.executable, "-m", "tinytlm.paper", *argv, "--cache", str(tmp_path / "c"),
                            "--results", str(tmp_path / "r")], cwd=REPO, capture_output=True, text=True)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, argv
    assert not (tmp_path / "r").exists()


# -----------------------------------------------------------------------------
# <APT> in the records and the reports

def test_apt_column_from_hand_made_records():
    """The report's <APT> column shows the checkpoint's <APT> as the records carry it (4 decimals), blank for the
    scratch arm and for records of older versions without it."""
    g = grid("labels", "mini")
    mlm = {"dir": "mlm-x", "epochs": 1, "steps": 2, "loss": 9.0, "mlm_acc": 0.05, "mean_apt": 0.03125}
    def cell(acc, trial, pre=True):
        return {"acc": acc, "trial": trial, "seed": trial, "device": "cpu", **({"mlm": mlm} if pre else {})}
    cells = {"2 per label: W_s 64": [cell(0.5, 0), cell(0.75, 1)],
             "2 per label: no pre-training": [cell(0.25, 0, False), cell(0.5, 1, False)],
             "8 per label: W_s 64": [{**cell(0.5, 0), "mlm": {k: v for k, v in mlm.items() if k != "mean_apt"}}],
             "8 per label: no pre-training": []}
    recs = summarize({"grid": g, "cells": cells})
    assert recs[0]["mean_apt"] == 0.03125 and recs[0]["gap"] == [0.25, 0.25] and recs[0]["per_label"] == 2
    assert "mean_apt" not in recs[1] and "mean_apt" not in recs[2]
    lines = row_table(recs, [])
    assert lines[0].split(" | ")[3:6] == ["T_M", "`<APT>`", "acc (ours)"]
    row = [c.strip() for c in lines[2].split("|")]
    assert row[5] == "0.0312" and row[6] == "0.625 ± 0.177" and row[7] == "+0.250 ± 0.000"
    assert [c.strip() for c in lines[3].split("|")][5] == "" and [c.strip() for c in lines[4].split("|")][5] == ""
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_apt_recorded_once_and_the_analyze_target(shared, tmp_path, monkeypatch):
    """A mini Table 5: the checkpoint's <APT> is computed once (done.json), equals tinytlm.analyze_apt's, travels
    in the records and shows in the report; a report or a cached run never computes it again. Then the analyze
    target: every local checkpoint of the table analysed once, the summary and the PNGs beside the reports."""
    import tinytlm.paper_cells as cells_mod
    from tinytlm.analyze_apt import mean_apt
    from tinytlm.paper_analyze import analyze_table
    from tinytlm.paper import runner_of, parse
    results, cache = tmp_path / "results", tmp_path / "cache"
    argv = ["table5", "--scale", "mini", "--results", str(results), "--cache", str(cache), "--device", "cpu"]
    rows = {r["name"]: r for r in main(argv)["table5"]["rows"]}
    ckpt = next((cache / "mlm").iterdir())
    done = json.loads((ckpt / "done.json").read_text())
    assert done["mean_apt"] == mean_apt(ckpt) and rows["W_s 64"]["mean_apt"] == done["mean_apt"]
    recs = [json.loads(p.read_text()) for p in (results / "cells" / "mini").glob("*.json")]
    assert sorted(repr(r["mlm"] and r["mlm"]["mean_apt"]) for r in recs) == sorted([repr(done["mean_apt"])] * 2
                                                                                  + ["None"] * 2)
    line = next(l for l in (results / "mini" / "table5.md").read_text().splitlines() if l.startswith("| W_s 64 |"))
    assert f"| {done['mean_apt']:.4f} |" in line

    def never(*a, **k):
        raise AssertionError("<APT> computed again")
    monkeypatch.setattr(cells_mod, "checkpoint_apt", never)
    assert main(argv)["table5"]["computed"] == 0 and main(argv + ["--report"])["table5"]["rows"][0]["mean_apt"] == \
        done["mean_apt"]

    runner = runner_of(parse(argv))
    small = ("--probe-steps", "3", "--probe-batch", "4")
    report = analyze_table("table5", "mini", 2, runner, results, small)
    kinds = sorted(c["kind"] for c in report["checkpoints"])
    assert kinds == ["cls"] * 4 + ["mlm"] and report["missing"] == 0
    mlm = next(c for c in report["checkpoints"] if c["kind"] == "mlm")
    assert mlm["mean_apt"] == done["mean_apt"] and [b["state"] for b in mlm["blocks"]] == ["emb", "block1"]
    assert mlm["T_M"] is not None  # the table's task (AG News) given to the analysis
    cls = [c for c in report["checkpoints"] if c["kind"] == "cls"]
    by_dir = {r["dir"]: r["acc"] for r in recs}
    assert all(c["head_accuracy"] == pytest.approx(by_dir[c["dir"]], abs=1e-6) for c in cls)
    out = results / "mini" / "analysis"
    assert (out / "table5.md").is_file() and (out / "table5.json").is_file()
    assert len(list((out / "table5").glob("*/*.png"))) >= 5 and not list(out.rglob("*.npz"))
    stamp = (cache / "analysis" / ckpt.name / "summary.json").stat().st_mtime_ns
    assert analyze_table("table5", "mini", 2, runner, results, small) == report  # once: read back, not recomputed
    assert (cache / "analysis" / ckpt.name / "summary.json").stat().st_mtime_ns == stamp
