"""The paper runner end to end at --scale mini: reports written, cache reused, bad input refused."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinytlm.model import BertConfig
from tinytlm.paper import EXTRA, TABLES, main
from tinytlm.paper_report import summarize
from tinytlm.paper_tables import SCALES, grid

REPO = Path(__file__).resolve().parents[1]


def test_table5_mini_end_to_end_and_cached(shared, tmp_path):
    results, cache = tmp_path / "results", tmp_path / "cache"
    argv = ["table5", "--scale", "mini", "--results", str(results), "--cache", str(cache), "--device", "cpu"]
    # --plan lists what would run (1 pre-training of 64 rows x 1 epoch, 4 fine-tunings of 4 labels x 8 rows
    # x 1 epoch) and runs nothing
    planned = main(argv + ["--plan"])["table5"]
    assert sorted((c["cell"], c["state"], c["seqs"]) for c in planned) == \
        [("finetune", "todo", 32)] * 4 + [("pretrain", "todo", 64)]
    assert not cache.exists() and not results.exists()
    first = main(argv)["table5"]
    # 1 pre-training (shared by both seeds at mini) + 2 rows x 2 seeds of fine-tuning
    assert first["computed"] == 5
    md = (results / "mini" / "table5.md").read_text()
    assert "Scale **mini**" in md and "python -m tinytlm.paper table5" in md
    assert "acc 0.840" in md and "T_M 17,072" in md  # the paper's no-pre-training row beside ours
    assert "not reproduced" in md  # the DistilBERT row
    data = json.loads((results / "mini" / "table5.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["no pre-training"]["n"] == 2 and rows["no pre-training"]["T_W"] == 0
    gap = rows["W_s 64"]
    # the gap is paired by seed: pre-trained minus scratch for the same seed
    scratch = rows["no pre-training"]["acc"]
    assert gap["gap"] == [a - b for a, b in zip(gap["acc"], scratch)]
    assert 0 < gap["T_W"] and gap["T_M"] < rows["no pre-training"]["T_M"]
    # the checkpoint's held-out MLM evaluation travels in the records and shows in the report
    assert 0 <= gap["val_mlm_acc"] <= 1
    line = next(l for l in md.splitlines() if l.startswith("| `mlm-tiny"))
    assert line.count("|") == 8 and f"{gap['val_mlm_acc']:.3f} |" in line
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("result.json")}
    assert len(stamps) == 4

    assert {c["state"] for c in main(argv + ["--plan"])["table5"]} == {"cached"}
    second = main(argv)["table5"]
    assert second["computed"] == 0  # every cell came from the cache
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("result.json")} == stamps
    assert [r["acc"] for r in second["rows"]] == [r["acc"] for r in first["rows"]]

    # every computed cell left a record: the cache alone lost -> nothing recomputed, the report is the same
    records = sorted((results / "cells" / "mini").glob("*.json"))
    assert [p.stem for p in records] == sorted(p.parent.name for p in stamps)
    # each says the precision its cell was computed in: --precision auto on this CPU (bf16 where it is native)
    import torch
    from tinytlm.precision import resolve_precision
    want = resolve_precision("auto", torch.device("cpu"))
    recs = [json.loads(p.read_text()) for p in records]
    assert {r["precision"] for r in recs} == {r["path"]["precision"] for r in recs} == {want}
    assert f" in {want}, " in md.splitlines()[2]
    lost = sorted(stamps)[0]
    lost.unlink()
    assert main(argv)["table5"]["computed"] == 0 and not lost.is_file()
    # an interrupted table: a cell lost from the cache and the records -> exactly that cell is recomputed
    (results / "cells" / "mini" / f"{lost.parent.name}.json").unlink()
    assert main(argv)["table5"]["computed"] == 1 and lost.is_file()

    # the budget sweep reuses Table 5's 1-epoch checkpoint, its fine-tunings and the scratch arm through the
    # real cache keys: only the 2-epoch pre-training and its 2 fine-tunings are new
    budget = main(["budget"] + argv[1:])["budget"]
    assert budget["computed"] == 3
    rows = {r["name"]: r for r in budget["rows"]}
    assert [rows[f"W_s 64 x{e} epochs"]["pt_epochs"] for e in (1, 2)] == [1, 2]
    assert all(0 <= rows[f"W_s 64 x{e} epochs"]["mlm_acc"] <= 1 for e in (1, 2))
    assert rows["W_s 64 x1 epochs"]["acc"] == gap["acc"]
    assert "not in the paper" in (results / "mini" / "budget.md").read_text()

    # overlap: the two pre-training lengths at the same W_s are two cells, not one averaged over both
    cells = main(["overlap", "--scale", "mini", "--cache", str(cache), "--results", str(results)])["cells"]
    assert sorted((c["ws"], c["pt_epochs"], c["n"]) for c in cells) == [(64, 1, 2), (64, 2, 2)]
    assert {round(c["gap"], 9) for c in cells} == {round(float(np.mean(rows[f"W_s 64 x{e} epochs"]["gap"])), 9)
                                                   for e in (1, 2)}


def test_a_rows_seeds_train_stacked_into_the_same_cells(shared, tmp_path):
    """The runner trains a row's missing seeds as one stacked run: the same cells (keys, cache folders,
    records), each record saying it was stacked; --no_stack trains them one by one."""
    def run(name, *extra):
        main(["table5", "--scale", "mini", "--results", str(tmp_path / name / "results"), "--cache",
              str(tmp_path / name / "cache"), "--device", "cpu", *extra])
        return {p.name: json.loads(p.read_text()) for p in (tmp_path / name / "results" / "cells" / "mini").glob("*")}
    stacked, alone = run("stacked"), run("alone", "--no_stack")
    assert stacked.keys() == alone.keys() and len(stacked) == 4
    # killed between the stack's two member records: the same command finishes the second from its cache,
    # with the record the uninterrupted stack wrote (not trained again alone: other dropout masks)
    from tests.test_kills import strip
    from tinytlm.paper_records import Records

    class Killed(BaseException):
        pass
    write, calls = Records.write, []

    def killed_at_the_second(self, *a, **k):  # a cell's record (and result.json) written
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return write(self, *a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Records, "write", killed_at_the_second)
        with pytest.raises(Killed):
            run("killed")
    killed = run("killed")

    def bare(recs, name):  # timing and this run's folder left out
        return {k: strip(json.loads(json.dumps(v).replace(str(tmp_path / name), ""))) for k, v in recs.items()}
    assert bare(killed, "killed") == bare(stacked, "stacked")
    assert all(r["path"].get("stacked") == 2 for r in killed.values())
    assert all(r["path"].get("stacked") == 2 and r["seed"] in (0, 1) for r in stacked.values())
    assert not any("stacked" in r["path"] for r in alone.values())
    assert sorted(p.name for p in (tmp_path / "stacked" / "cache" / "cls").iterdir()) == \
        sorted(p.name for p in (tmp_path / "alone" / "cache" / "cls").iterdir())


def test_records_from_two_runs_merge_into_one_report(shared, tmp_path):
    """Two machines each run one seed of Table 5 (mini); their records, put together, make one report with
    both seeds, paired gaps and each number's device, built without any cache and the same on every rebuild."""
    base = ["table5", "--scale", "mini", "--device", "cpu"]
    main(base + ["--seeds", "1", "--results", str(tmp_path / "a"), "--cache", str(tmp_path / "ca")])
    merged = tmp_path / "merged" / "cells" / "mini"
    merged.mkdir(parents=True)
    for p in (tmp_path / "a" / "cells" / "mini").glob("*.json"):  # machine A: rename its device
        r = json.loads(p.read_text())
        (merged / p.name).write_text(json.dumps({**r, "device": "GPU A", "date": "2026-12-01 10:00 UTC"}))
    # machine B has A's records (they travel with the work tree): it computes only seed 1
    b = tmp_path / "b"
    (b / "cells").mkdir(parents=True)
    import shutil
    shutil.copytree(merged, b / "cells" / "mini")
    second = main(base + ["--seeds", "2", "--results", str(b), "--cache", str(tmp_path / "cb")])["table5"]
    assert second["computed"] == 3  # seed 1: its pre-training, and the two rows' fine-tunings
    for p in (b / "cells" / "mini").glob("*.json"):
        if not (merged / p.name).exists():
            shutil.copy(p, merged / p.name)
    assert len(list(merged.iterdir())) == 4

    argv = base + ["--seeds", "2", "--results", str(tmp_path / "merged"), "--cache", str(tmp_path / "empty"),
                   "--report"]
    rows = {r["name"]: r for r in main(argv)["table5"]["rows"]}
    assert not (tmp_path / "empty").exists()  # report mode computes nothing
    assert rows["W_s 64"]["n"] == 2 and rows["W_s 64"]["gap_n"] == 2 and rows["no pre-training"]["n"] == 2
    assert rows["W_s 64"]["devices"] == sorted(["GPU A", rows["W_s 64"]["devices"][1]])
    assert rows["W_s 64"]["acc"][0] == second["rows"][0]["acc"][0]  # seed 0 is machine A's number
    md = (tmp_path / "merged" / "mini" / "table5.md").read_text()
    assert "GPU A" in md and "2026-12-01 10:00 UTC" in md and "4 of 4 cells" in md
    before = {p.name: p.read_bytes() for p in (tmp_path / "merged" / "mini").iterdir()}
    main(argv)
    assert {p.name: p.read_bytes() for p in (tmp_path / "merged" / "mini").iterdir()} == before

    # a report of a table with nothing recorded says so and computes nothing
    rows = main(["budget", *argv[1:]])["budget"]["rows"]
    assert [r["n"] for r in rows if r["name"] != "W_s 64 x1 epochs"] == [0, 2]
    assert "not run yet" in (tmp_path / "merged" / "mini" / "budget.md").read_text()


def test_committee_mini(shared, tmp_path):
    out = main(["table9", "--scale", "mini", "--seeds", "1", "--results", str(tmp_path / "r"),
                "--cache", str(tmp_path / "c"), "--device", "cpu"])["table9"]
    rows = {r["name"]: r for r in out["rows"]}
    assert rows["committee"]["n"] == 1 and 0 <= rows["committee"]["acc_mean"] <= 1
    committee = json.loads(next((tmp_path / "c" / "committee").glob("*/result.json")).read_text())
    assert len(committee["members"]) == 3 and len(set(committee["members"])) == 3  # seed offset separates #1, #2


def test_summarize_std_and_missing_gap():
    grid = {"rows": [{"name": "pt", "kind": "train", "pretrain": {"ws": 10}, "gap_of": "s", "paper": {}},
                     {"name": "s", "kind": "train", "pretrain": None, "gap_of": None, "paper": {}}]}
    cells = {"pt": [{"acc": 0.6, "trial": 0}, {"acc": 0.8, "trial": 1}],
             "s": [{"acc": 0.5, "trial": 0}, {"acc": 0.5, "trial": 1}]}
    pt, s = summarize({"grid": grid, "cells": cells})
    assert abs(pt["gap_mean"] - 0.2) < 1e-12 and abs(pt["acc_std"] - 0.1414213) < 1e-6
    assert "gap_mean" not in s
    # a trial missing on one side drops out of the gap, not out of the row's accuracy
    cells["s"] = [{"acc": 0.4, "trial": 1}]
    pt, s = summarize({"grid": grid, "cells": cells})
    assert pt["gap"] == [pytest.approx(0.4)] and pt["gap_n"] == 1 and pt["n"] == 2 and s["n"] == 1


def test_bad_table_is_one_line_error():
    p = subprocess.run([sys.executable, "-m", "tinytlm.paper", "table42"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: unknown table 'table42'") and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("scale", list(SCALES))
def test_every_grid_is_well_formed(scale, tmp_path):
    """Every table at every scale: names it refers to exist, presets exist, and --plan resolves every
    cell's configuration (what a paper-scale run needs before it can start) without running anything."""
    presets = BertConfig.presets()
    for t in TABLES + EXTRA:
        g = grid(t, scale)
        names = [r["name"] for r in g["rows"]]
        assert len(names) == len(set(names)), t
        for r in g["rows"]:
            if r["kind"] == "committee":
                assert set(r["members"]) <= set(names) and r["reference"] in names, (t, r["name"])
                continue
            assert r["model"] in presets, (t, r["model"])
            assert r["gap_of"] is None or r["gap_of"] in names, (t, r["name"])
        assert g["deviations"] or scale == "paper", t
    # (an empty cache and no records: the repository's committed records would make cells "cached")
    cells = main(["all", "--scale", scale, "--plan", "--seeds", "1", "--cache", str(tmp_path / "cache"),
                  "--results", str(tmp_path / "results")])
    assert set(cells) == set(TABLES) and not any(tmp_path.iterdir())
    assert all(c["state"] == "todo" for cs in cells.values() for c in cs)


def test_budget_shares_table5_rows():
    """At cpu and paper scale too, one budget row and the scratch arm are Table 5's rows (so their cells are)."""
    for scale in ("cpu", "paper"):
        t5 = {r["name"]: r for r in grid("table5", scale)["rows"]}
        b = grid("budget", scale)["rows"]
        ws = SCALES[scale]["ws"]["budget"]
        def computed(r):  # what defines a row's cells (its label and the paper's numbers do not)
            return {k: v for k, v in r.items() if k not in ("name", "paper")}
        assert b[-1]["name"] == "no pre-training" and computed(b[-1]) == computed(t5["no pre-training"])
        shared = [r for r in b if r["pretrain"] and r["pretrain"] == t5.get(f"W_s {ws:,}", {}).get("pretrain")]
        assert len(shared) == 1 and shared[0]["finetune"] == t5[f"W_s {ws:,}"]["finetune"]
        assert [r["pretrain"]["epochs"] for r in b[:-1]] == list(SCALES[scale]["budget_epochs"])


@pytest.mark.parametrize("scale", list(SCALES))
def test_committee_members_are_distinct_architectures(scale):
    """Shrinking the BERT-1 variants for a scale must not turn two of Table 8's five into one model."""
    rows = [r for r in grid("table8", scale)["rows"] if r["kind"] == "train" and r["model"].startswith("bert1")]
    archs = {r["model"]: BertConfig.preset(r["model"], **r["overrides"]) for r in rows}
    assert len(archs) == 5 and len({repr(a) for a in archs.values()}) == 5
    assert [a.n_head for a in archs.values()] == [8, 12, 24, 12, 12]  # the paper's head counts survive
