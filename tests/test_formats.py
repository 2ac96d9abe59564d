"""The canonical public formats a user has: Hugging Face parquet/jsonl and the original CSV/JSON files.

Each test writes the same small data set in two formats and checks both give identical shards.
"""
import csv
import json

import numpy as np
import pytest

from tinytlm.tasks import TaskSpec, prepare_task
from tinytlm.wikipedia import prepare
from tinytlm.data import Shard

ROWS = [(1, "Stocks rise", "Markets\\rallied on Monday."), (2, "Cup final", "The team won 3-1."),
        (1, "Oil falls", "Crude slid #39;sharply#39;."), (2, "Open draw", "Seeds advance."),
        (3, "New chip", "A faster chip."), (4, "Mars probe", "The probe landed."),
        (3, "Bank merger", "Two banks merge."), (4, "Gene study", "Scientists found a gene.")]


def _raw(tmp_path, vocab_path, name):
    raw = tmp_path / name
    raw.mkdir()
    (raw / "bert-base-uncased-vocab.txt").symlink_to(vocab_path)
    return raw


def _shards(dest):
    return [(Shard(dest / f"{s}.bin").ids.tolist(), np.load(dest / f"{s}.labels.npy").tolist())
            for s in ("train", "test")]


def test_agnews_csv_equals_hf_jsonl_and_parquet(tmp_path, vocab_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    spec = TaskSpec(task="agnews", train_per_label=2, test_per_label=2)
    out = {}
    for fmt in ("csv", "jsonl", "parquet"):
        raw = _raw(tmp_path, vocab_path, fmt)
        (raw / "ag_news").mkdir()
        for split in ("train", "test"):
            hf = [{"text": f"{t} {d}", "label": y - 1} for y, t, d in ROWS]  # HF: text = title + " " + description
            if fmt == "csv":
                with open(raw / "ag_news" / f"{split}.csv", "w", newline="") as f:
                    csv.writer(f, quoting=csv.QUOTE_ALL).writerows(ROWS)
            elif fmt == "jsonl":
                (raw / "ag_news" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hf))
            else:
                (raw / "ag_news" / "data").mkdir(exist_ok=True)
                pq.write_table(pa.Table.from_pylist(hf), raw / "ag_news" / "data" / f"{split}-00000-of-00001.parquet")
        out[fmt] = _shards(prepare_task(spec, raw, tmp_path / f"out-{fmt}", raw / "bert-base-uncased-vocab.txt",
                                        quiet=True))
    assert out["csv"] == out["jsonl"] == out["parquet"]
    assert out["csv"][0][1] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_fewrel_json_equals_hf_parquet(tmp_path, vocab_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    data = {"P1": [{"tokens": ["Paris", "is", "in", "France", str(i)], "h": ["paris", "Q1", [[0]]],
                    "t": ["france", "Q2", [[3]]]} for i in range(4)],
            "P2": [{"tokens": ["Bob", "wrote", "Book", str(i)], "h": ["bob", "Q3", [[0]]],
                    "t": ["book", "Q4", [[2]]]} for i in range(4)]}
    raw_json = _raw(tmp_path, vocab_path, "json")
    (raw_json / "fewrel").mkdir()
    (raw_json / "fewrel" / "val_wiki.json").write_text(json.dumps(data))
    raw_pq = _raw(tmp_path, vocab_path, "pq")
    (raw_pq / "fewrel").mkdir()
    rows = [{"relation": rel, "tokens": inst["tokens"], "head": {"text": inst["h"][0], "indices": inst["h"][2]},
             "tail": {"text": inst["t"][0], "indices": inst["t"][2]}} for rel, insts in data.items() for inst in insts]
    pq.write_table(pa.Table.from_pylist(rows), raw_pq / "fewrel" / "val_wiki-00000-of-00001.parquet")
    for markers in (False, True):
        spec = TaskSpec(task="fewrel", train_per_label=3, test_per_label=1, entity_markers=markers)
        a = _shards(prepare_task(spec, raw_json, tmp_path / "oj", raw_json / "bert-base-uncased-vocab.txt", quiet=True))
        b = _shards(prepare_task(spec, raw_pq, tmp_path / "op", raw_pq / "bert-base-uncased-vocab.txt", quiet=True))
        assert a == b
    from tinytlm.tokenizer import WordPieceTokenizer
    tok = WordPieceTokenizer.from_file(vocab_path)
    assert tok.decode(a[0][0][0]).startswith("[ e1 ]")  # the head is marked with --entity-markers


def test_wikipedia_jsonl_equals_hf_parquet(tmp_path, vocab_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    arts = [{"id": str(100 + i), "url": f"u{i}", "title": f"T{i}", "text": f"Text of article {i}, about {i * 7}."}
            for i in range(30)]
    raw_j = _raw(tmp_path, vocab_path, "j")
    (raw_j / "wikipedia").mkdir()
    (raw_j / "wikipedia" / "a.jsonl").write_text("".join(json.dumps({**a, "id": int(a["id"])}) + "\n" for a in arts))
    raw_p = _raw(tmp_path, vocab_path, "p")
    (raw_p / "wikipedia" / "20231101.en").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(arts), raw_p / "wikipedia" / "20231101.en" / "train-00000-of-00001.parquet")
    sj = Shard(prepare(raw_j, tmp_path / "oj", raw_j / "bert-base-uncased-vocab.txt", workers=1, quiet=True))
    sp = Shard(prepare(raw_p, tmp_path / "op", raw_p / "bert-base-uncased-vocab.txt", workers=1, quiet=True))
    assert np.array_equal(sj.ids, sp.ids)
    ids_p = np.load(tmp_path / "op" / "wikipedia" / "wiki.pageids.npy")
    assert np.array_equal(ids_p, 100 + np.random.default_rng(42).permutation(30))  # HF's string ids parsed
