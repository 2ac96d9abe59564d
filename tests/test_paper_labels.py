"""The labels sweep (beyond the paper: the gap against AG News rows per label at one pre-trained checkpoint),
<APT> in the records and reports, and the paper runner's analyze target."""
import pytest

from tinytlm.paper import main
from tinytlm.paper_cells import Runner, table_cells
from tinytlm.paper_tables import LABEL_SIZES, SCALES, default_seeds, grid, pretrain_seeds


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


def test_labels_plan_lists_the_sweep(tmp_path):
    """--plan: 36 fine-tunings and the one pre-training, nothing run; the sequences per cell follow the sizes."""
    planned = main(["labels", "--scale", "cpu", "--plan", "--cache", str(tmp_path / "c"),
                    "--results", str(tmp_path / "r")])["labels"]
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()
    tunings = [c for c in planned if c["cell"] == "finetune"]
    assert len(tunings) == 36 and sum(c["cell"] == "pretrain" for c in planned) == 1
    # 4 labels x n rows x 4 epochs, each size twice (two arms) and 3 seeds
    assert sorted(c["seqs"] for c in tunings) == sorted(16 * n for n in LABEL_SIZES for _ in range(6))
