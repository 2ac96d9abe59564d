"""Bad input, one table over every command: each case exits with code 2 and exactly one line on stderr naming
the argument or file and what is wrong (no traceback), leaves nothing partial behind and overwrites nothing.

Each case builds what it needs in its own folder (malformed raw files, damaged checkpoints and shards, runs
that exist or have finished), runs the command in this process (as its script runs it: tinytlm.common.cli)
and compares every file of its folder and of the shared finished runs before and after.
"""
import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tinytlm import analyze, ensemble, finetune, paper, pretrain, tasks, tokstats, wikipedia
from tests.test_engine import SMALL, assert_one_line_error, run as run_script

COMMANDS = {"train_mlm": pretrain.main, "train_cls": finetune.main, "ensemble": ensemble.main, "paper": paper.main,
            "data_prep/wikipedia": wikipedia.main, "data_prep/tasks": tasks.main, "tokstats": tokstats.main,
            "analyze": analyze.main}
with contextlib.suppress(ImportError):
    from tinytlm import export
    COMMANDS["export"] = export.main


def run(command, argv):
    return run_script([command, *argv], COMMANDS)


def snapshot(*dirs) -> dict:
    """Every file under dirs: its bytes' hash (symlinked shared data left out)."""
    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.is_file() and not p.is_symlink() and not any(q.is_symlink() for q in p.parents):
                out[str(p)] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


# -----------------------------------------------------------------------------
# what the cases are made of

TASK = ["--task", "agnews", "--train-per-label", "4", "--test-per-label", "2", "--epochs", "1", "--batch_size", "8",
        "--quiet"]
AG_ROW = '"3","Wall St. rises","Stocks rose on Monday."\n'


@pytest.fixture(scope="module")
def runs(roots, tmp_path_factory):
    """Finished runs every case may point at (and must leave untouched): an MLM run, a classifier run, and a
    small MLM model with a conv stem."""
    from tinytlm.checkpoint import save_checkpoint
    from tinytlm.model import BertConfig, BertForMLM
    raw, data = roots
    base = tmp_path_factory.mktemp("runs")
    pretrain.main([*SMALL, "--ws", "16", "--epochs", "1", "--batch_size", "8", "--raw", str(raw), "--data", str(data),
                   "--out", str(base / "mlm")])
    finetune.main([*TASK, *SMALL, "--raw", str(raw), "--data", str(data), "--out", str(base / "cls")])
    cfg = BertConfig.preset("tiny", n_layer=1, n_head=1, head_dim=32, n_conv=1, conv_kernel=(3, 3))
    save_checkpoint(base / "stem" / "ckpt.pt", kind="mlm", model=BertForMLM(cfg), optimizer=None, step=0, epoch=0,
                    train_config={"model": "tiny"}, data={})
    return base


class Case:
    """Paths a case builds on: its own folder (`d`), the shared roots and the finished runs."""

    def __init__(self, d: Path, roots, runs: Path):
        self.d, (self.raw, self.data), self.runs = d, roots, runs

    def roots(self):
        return ["--raw", str(self.raw), "--data", str(self.data)]

    def raw_with(self, files: dict, data=True) -> list:
        """--raw/--data flags of a raw root like the shared one with `files` (relative path: text) in place
        of what is there; a fresh data root, so the damaged files are read."""
        raw = self.d / "raw"
        raw.mkdir()
        for name in ("bert-base-uncased-vocab.txt", "ag_news", "dbpedia", "fewrel", "wikipedia"):
            mine = [f for f in files if f == name or f.startswith(name + "/")]
            if not mine:
                (raw / name).symlink_to((self.raw / name).resolve())
        for f, text in files.items():
            (raw / f).parent.mkdir(parents=True, exist_ok=True)
            (raw / f).write_text(text)
        return ["--raw", str(raw)] + (["--data", str(self.d / "data")] if data else [])

    def vocab_without(self, token: str) -> str:
        return "".join(t for t in (self.raw / "bert-base-uncased-vocab.txt").read_text().splitlines(True)
                       if t.strip() != token)

    def copy_run(self, name: str) -> Path:
        dst = self.d / name
        shutil.copytree(self.runs / name, dst)
        return dst

    def damaged_ckpt(self, how: str, name="mlm") -> Path:
        """A copy of a run's checkpoint, cut in half or with one byte of its weights changed, and no ckpt.prev.pt."""
        run = self.copy_run(name)
        (run / "ckpt.prev.pt").unlink(missing_ok=True)
        p = run / "ckpt.pt"
        if how == "truncated":
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        else:
            st = torch.load(p, weights_only=False)
            w = next(iter(st["model"].values()))
            w.view(-1)[0] += 1.0
            torch.save(st, p)
        return run

    def wiki_shard(self, how: str) -> list:
        """--raw/--data flags whose prepared Wikipedia shard is damaged."""
        data = self.d / "data"
        shutil.copytree(self.data / "wikipedia", data / "wikipedia")
        p = data / "wikipedia" / "wiki.bin"
        b = bytearray(p.read_bytes())
        if how == "truncated":
            b = b[: len(b) // 2]
        elif how == "altered":
            b[-4] ^= 1  # one token id one off: still a valid id
        else:  # another kind: a task's shard where the Wikipedia shard should be
            b = bytearray(next(self.data.glob("agnews*/train.bin")).read_bytes())
        p.write_bytes(bytes(b))
        return ["--raw", str(self.raw), "--data", str(data)]


MLM = [*SMALL, "--ws", "16", "--epochs", "1", "--batch_size", "8"]


def mlm(c, *extra, roots=None):
    return [*MLM, *(roots or c.roots()), "--out", str(c.d / "out"), *extra]


def cls(c, *extra, roots=None):
    return [*TASK, *SMALL, *(roots or c.roots()), "--out", str(c.d / "out"), *extra]


GOOD_LINES = "".join(json.dumps({"id": i, "text": f"article {i} is fine"}) + "\n" for i in range(20))
FEWREL_OK = {"P1": [{"tokens": ["a", "b", "c"], "h": ["a", "Q1", [[0]]], "t": ["c", "Q2", [[2]]]}] * 4,
             "P2": [{"tokens": ["d", "e", "f"], "h": ["d", "Q3", [[0]]], "t": ["e", "Q4", [[1]]]}] * 4}
FEWREL_NO_T = {"P1": FEWREL_OK["P1"], "P2": [{"tokens": ["d", "e"], "h": ["d", "Q3", [[0]]]}] * 4}

# (command, argv from a Case, words the one line must contain)
CASES = [
    # train_mlm: numbers
    ("train_mlm", lambda c: mlm(c, "--lr", "nan"), ["--lr nan"]),
    ("train_mlm", lambda c: mlm(c, "--lr", "inf"), ["--lr inf"]),
    ("train_mlm", lambda c: mlm(c, "--weight_decay", "-0.1"), ["--weight_decay -0.1"]),
    ("train_mlm", lambda c: mlm(c, "--grad_clip", "-1"), ["--grad_clip -1"]),
    ("train_mlm", lambda c: mlm(c, "--arch", "dropout=1.5"), ["dropout=1.5", "[0, 1)"]),
    ("train_mlm", lambda c: mlm(c, "--arch", "attn_dropout=-0.1"), ["attn_dropout"]),
    ("train_mlm", lambda c: mlm(c, "--arch", "n_head=0"), ["n_head=0", ">= 1"]),
    ("train_mlm", lambda c: mlm(c, "--arch", "n_layer=0"), ["n_layer"]),
    ("train_mlm", lambda c: mlm(c, "--arch", "head_dim=-4"), ["head_dim"]),
    ("train_mlm", lambda c: mlm(c, "--ws", "-5"), ["--ws -5"]),
    ("train_mlm", lambda c: mlm(c, "--epochs", "0"), ["--epochs"]),
    ("train_mlm", lambda c: mlm(c, "--batch_size", "-1"), ["--batch_size"]),
    ("train_mlm", lambda c: mlm(c, "--epochs", "two"), ["--epochs"]),
    ("train_mlm", lambda c: mlm(c, "--val_every", "-1"), ["--val_every -1"]),
    ("train_mlm", lambda c: mlm(c, "--kernels", "cuda-magic"), ["--kernels"]),
    ("train_mlm", lambda c: mlm(c, "--model", "bert99"), ["bert99"]),
    # train_mlm: seeds and conflicting flags
    ("train_mlm", lambda c: mlm(c, "--seeds", ","), ["--seeds"]),
    ("train_mlm", lambda c: mlm(c, "--seeds", "0,0"), ["--seeds", "0,0"]),
    ("train_mlm", lambda c: mlm(c, "--seeds", "0,-1"), ["--seeds"]),
    ("train_mlm", lambda c: mlm(c, "--seed", "3", "--seeds", "0,1"), ["--seed", "--seeds"]),
    # train_mlm: existing, finished, missing and damaged runs
    ("train_mlm", lambda c: [*MLM, *c.roots(), "--out", str(c.copy_run("mlm"))], ["already holds a checkpoint"]),
    ("train_mlm", lambda c: ["--resume", str(c.copy_run("mlm"))], ["finished"]),
    ("train_mlm", lambda c: ["--resume", str(c.d / "nothing")], ["nothing", "not found"]),
    ("train_mlm", lambda c: ["--resume", str(c.copy_run("cls"))], ["'cls'", "'mlm'"]),
    ("train_mlm", lambda c: ["--resume", str(c.damaged_ckpt("truncated"))], ["ckpt.pt", "not a readable checkpoint"]),
    ("train_mlm", lambda c: ["--resume", str(c.damaged_ckpt("altered"))], ["ckpt.pt", "checksum mismatch"]),
    # train_mlm: malformed raw data and shards
    ("train_mlm", lambda c: mlm(c, roots=c.raw_with({"bert-base-uncased-vocab.txt": c.vocab_without("[MASK]")})),
     ["bert-base-uncased-vocab.txt", "[MASK]"]),
    ("train_mlm", lambda c: mlm(c, roots=c.raw_with({"wikipedia/a.jsonl": GOOD_LINES + '{oops\n'})),
     ["a.jsonl:21", "not a JSON object"]),
    ("train_mlm", lambda c: mlm(c, roots=c.raw_with({"wikipedia/a.jsonl": GOOD_LINES + '{"id": 1, "title": "t"}\n'})),
     ["a.jsonl:21", "'text'"]),
    ("train_mlm", lambda c: mlm(c, roots=c.wiki_shard("truncated")), ["wiki.bin"]),
    ("train_mlm", lambda c: mlm(c, roots=c.wiki_shard("altered")), ["wiki.bin", "checksum mismatch"]),
    ("train_mlm", lambda c: mlm(c, roots=c.wiki_shard("another kind")), ["wiki.bin", "not the shard"]),
    # train_cls
    ("train_cls", lambda c: cls(c, "--lr", "nan"), ["--lr nan"]),
    ("train_cls", lambda c: cls(c, "--weight_decay", "-2"), ["--weight_decay -2"]),
    ("train_cls", lambda c: cls(c, "--task", "imdb"), ["imdb"]),
    ("train_cls", lambda c: cls(c, "--train-per-label", "-1"), ["--train_per_label -1"]),
    ("train_cls", lambda c: cls(c, "--labels", "1,x"), ["--labels"]),
    ("train_cls", lambda c: cls(c, "--labels", "1,1"), ["--labels"]),
    ("train_cls", lambda c: cls(c, "--labels", "0,9"), ["--labels"]),
    ("train_cls", lambda c: cls(c, "--seeds", "2,2"), ["--seeds"]),
    ("train_cls", lambda c: cls(c, "--gap"), ["--gap", "--init"]),
    ("train_cls", lambda c: cls(c, "--init", str(c.runs / "mlm"), "--arch", "n_layer=2"), ["--arch", "--init"]),
    ("train_cls", lambda c: cls(c, "--init", str(c.runs / "cls")), ["'cls'", "'mlm'"]),
    ("train_cls", lambda c: cls(c, "--init", str(c.damaged_ckpt("truncated"))), ["ckpt.pt"]),
    ("train_cls", lambda c: cls(c, "--init", str(c.runs / "mlm" / "metrics.jsonl")), ["metrics.jsonl"]),
    ("train_cls", lambda c: [*TASK, *SMALL, *c.roots(), "--out", str(c.copy_run("cls"))], ["already holds"]),
    ("train_cls", lambda c: ["--resume", str(c.copy_run("cls"))], ["finished"]),
    ("train_cls", lambda c: cls(c, roots=c.raw_with({"ag_news/train.csv": AG_ROW * 8 + '"2","only a title"\n',
                                                     "ag_news/test.csv": AG_ROW * 8})),
     ["train.csv:9", "3 columns"]),
    ("train_cls", lambda c: cls(c, roots=c.raw_with({"ag_news/train.csv": AG_ROW * 8 + '"7","a","b"\n',
                                                     "ag_news/test.csv": AG_ROW * 8})),
     ["train.csv:9", "label '7'", "out of range"]),
    ("train_cls", lambda c: cls(c, "--task", "fewrel", "--train-per-label", "2", "--test-per-label", "1",
                                roots=c.raw_with({"fewrel/val_wiki.json": json.dumps(FEWREL_NO_T)})),
     ["val_wiki.json", "P2", "instance 1", "tokens/h/t"]),
    ("train_cls", lambda c: cls(c, "--task", "fewrel", roots=c.raw_with({"fewrel/val_wiki.json": "[1, 2"})),
     ["val_wiki.json", "FewRel JSON"]),
    ("train_cls", lambda c: cls(c, roots=c.raw_with({"bert-base-uncased-vocab.txt": c.vocab_without("[CLS]")})),
     ["bert-base-uncased-vocab.txt", "[CLS]"]),
    # ensemble
    ("ensemble", lambda c: [], ["ckpts"]),
    ("ensemble", lambda c: [str(c.d / "none.pt")], ["none.pt", "not found"]),
    ("ensemble", lambda c: [str(c.runs / "mlm")], ["'mlm'", "'cls'"]),
    ("ensemble", lambda c: [str(c.damaged_ckpt("altered", "cls"))], ["ckpt.pt", "checksum"]),
    # data_prep
    ("data_prep/wikipedia", lambda c: [*c.raw_with({}, data=False), "--out", str(c.d / "o"), "--rows", "-1"],
     ["--rows -1"]),
    ("data_prep/wikipedia", lambda c: ["--out", str(c.d / "o"), "--max-len", "1",
                                       *c.raw_with({"wikipedia/a.jsonl": '{"id": 1, "text": "x"}\n'}, data=False)],
     ["--max-len 1"]),
    ("data_prep/wikipedia", lambda c: ["--out", str(c.d / "o"), *c.raw_with({"wikipedia/notes.txt": "x"}, data=False)],
     ["wikipedia", ".jsonl"]),
    ("data_prep/wikipedia", lambda c: ["--out", str(c.d / "o"), *c.raw_with(
        {"wikipedia/a.jsonl": '{"id": 1, "text": "x"}\n', "bert-base-uncased-vocab.txt": "[PAD]\n[UNK]\n"},
        data=False)], ["bert-base-uncased-vocab.txt", "[MASK]"]),
    ("data_prep/tasks", lambda c: ["--task", "yelp", "--out", str(c.d / "o")], ["yelp"]),
    ("data_prep/tasks", lambda c: ["--task", "dbpedia", "--out", str(c.d / "o"), *c.raw_with(
        {"dbpedia/train.csv": '"1","t","x","extra"\n', "dbpedia/test.csv": '"1","t","x"\n'}, data=False)],
     ["train.csv:1", "3 columns"]),
    ("data_prep/tasks", lambda c: ["--max-len", "1", "--out", str(c.d / "o"), "--raw", str(c.raw)], ["--max-len 1"]),
    ("data_prep/tasks", lambda c: ["--out", str(c.d / "o"), *c.raw_with({"ag_news/train.csv": "",
                                                                        "ag_news/test.csv": ""}, data=False)],
     ["train.csv", "empty"]),
    # tokstats, paper
    ("tokstats", lambda c: ["--ws", "-1", *c.roots()], ["--ws -1"]),
    ("tokstats", lambda c: ["--task", "imdb", *c.roots()], ["imdb"]),
    ("paper", lambda c: ["table99", "--cache", str(c.d / "c"), "--results", str(c.d / "r")], ["table99"]),
    ("paper", lambda c: ["table5", "--scale", "huge", "--cache", str(c.d / "c"), "--results", str(c.d / "r")],
     ["huge"]),
    ("paper", lambda c: ["table5", "--seeds", "0", "--cache", str(c.d / "c"), "--results", str(c.d / "r")],
     ["--seeds 0"]),
    # analyze (tinytlm/analyze.py; more cases in tests/test_analyze.py)
    ("analyze", lambda c: [str(c.runs / "cls"), "--what", "apt"], ["classifier", "no apt analysis"]),
    ("analyze", lambda c: [str(c.runs / "mlm"), "--what", "shp"], ["pre-training", "no shp analysis"]),
    ("analyze", lambda c: [str(c.d / "none")], ["none", "no such run folder"]),
    ("analyze", lambda c: [str(c.runs / "mlm"), "--shp-norm", "z"], ["--shp-norm"]),
    ("analyze", lambda c: [str(c.runs / "mlm"), "--data", str(c.d)], ["wiki.val.bin", "not found"]),
    # export (tinytlm/export.py)
    ("export", lambda c: [str(c.runs / "stem"), str(c.d / "hf")], ["conv stem"]),
    ("export", lambda c: [str(c.runs / "mlm"), str(c.copy_run("cls"))], ["cls"]),
    ("export", lambda c: [str(c.d / "none"), str(c.d / "hf")], ["none"]),
]


def case_id(case) -> str:
    return f"{case[0]}:{CASES.index(case)}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_input_is_one_line_and_leaves_everything_as_it_was(case, roots, runs, tmp_path, monkeypatch):
    command, argv, words = case
    if command not in COMMANDS:
        pytest.skip(f"{command}: not in this tree")
    monkeypatch.setenv("TINYTLM_NO_DOWNLOAD", "1")  # (malformed local data is the point, not a download)
    c = Case(tmp_path, roots, runs)
    args = argv(c)
    before = snapshot(tmp_path, runs)
    r = run(command, args)
    assert_one_line_error(r, *words)
    assert snapshot(tmp_path, runs) == before  # nothing new, nothing changed: no partial output, no overwrite


def test_the_table_covers_every_command():
    assert len(CASES) >= 40 and {c[0] for c in CASES} >= set(COMMANDS)
