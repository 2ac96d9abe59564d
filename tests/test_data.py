"""Data layer: shards, Wikipedia preparation, task sampling, token statistics, bad input."""
import gzip
import json
import lzma
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tinytlm.common import UserError, atomic_path
from tinytlm.data import HEADER, Shard, epoch_order, get_batch, mask_tokens, mask_generator, write_shard
from tinytlm.tokstats import build_raised_tm, counts, pair_stats, rows_within

REPO = Path(__file__).resolve().parents[1]


# -----------------------------------------------------------------------------
# shards

def test_shard_round_trip(tmp_path):
    ids = np.random.default_rng(0).integers(0, 30522, size=(37, 128)).astype(np.uint16)
    write_shard(tmp_path / "a.bin", ids, 30522)
    s = Shard(tmp_path / "a.bin", verify=True)
    assert (len(s), s.row_len, s.vocab_size) == (37, 128, 30522)
    assert s.ids.dtype == np.uint16 and np.array_equal(s.ids, ids)
    assert (tmp_path / "a.bin").stat().st_size == HEADER.size + ids.nbytes
    assert not list(tmp_path.glob(".*tmp"))  # the temp file was renamed, none left


def test_shard_rejects_ids_outside_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab"):
        write_shard(tmp_path / "a.bin", np.array([[5, 12]]), 10)


@pytest.mark.parametrize("damage", ["truncate", "trailing", "flip", "magic", "header"])
def test_shard_damage_detected(tmp_path, damage):
    p = tmp_path / "a.bin"
    write_shard(p, np.arange(4 * 16, dtype=np.uint16).reshape(4, 16), 30522)
    raw = bytearray(p.read_bytes())
    if damage == "truncate":
        raw = raw[:-3]
    elif damage == "trailing":
        raw += b"\0\0"
    elif damage == "flip":
        raw[HEADER.size + 10] ^= 0xFF
    elif damage == "magic":
        raw[:8] = b"NOTSHARD"
    else:
        raw = raw[:20]
    p.write_bytes(bytes(raw))
    match = {"truncate": "truncated", "trailing": "trailing", "flip": "checksum", "magic": "magic",
             "header": "truncated"}[damage]
    with pytest.raises(UserError, match=match):
        Shard(p, verify=True)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# masking and batch order

def test_masking_statistics_and_specials():
    g = torch.Generator().manual_seed(0)
    B, T = 64, 128
    idx = torch.randint(1000, 30000, (B, T), generator=g)
    idx[:, 0], idx[:, -1] = 101, 102
    idx[: B // 2, 100:] = 0  # padding in half the rows
    idx[B // 2:, 99] = 102
    inputs, targets = mask_tokens(idx, mask_generator("cpu", 1, 0), vocab_size=30522, mask_id=103,
                                  special_ids=(0, 101, 102))
    chosen = targets != -100
    special = (idx == 0) | (idx == 101) | (idx == 102)
    assert not (chosen & special).any()
    assert torch.equal(targets[chosen], idx[chosen])
    rate = chosen.sum().item() / (~special).sum().item()
    assert 0.13 < rate < 0.17
    frac_mask = (inputs[chosen] == 103).float().mean().item()
    frac_same = (inputs[chosen] == idx[chosen]).float().mean().item()
    assert 0.76 < frac_mask < 0.84 and 0.07 < frac_same < 0.14
    assert torch.equal(inputs[~chosen], idx[~chosen])


def test_masking_never_chooses_any_special():
    idx = torch.tensor([[101, 100, 103, 100, 103, 0, 0, 102]] * 64)  # only specials: [UNK] and [MASK] included
    idx[:, 6] = 2000  # one ordinary token per row
    inputs, targets = mask_tokens(idx, mask_generator("cpu", 0, 0), vocab_size=30522, mask_id=103,
                                  special_ids=(0, 100, 101, 102, 103), p=0.5)
    chosen = targets != -100
    assert chosen[:, 6].any() and not chosen[:, [0, 1, 2, 3, 4, 5, 7]].any()
    _, t2 = mask_tokens(idx, mask_generator("cpu", 0, 0), vocab_size=30522, mask_id=103,
                        special_ids=(0, 100, 101, 102, 103), per_row=3)
    assert ((t2 != -100).sum(1) == 1).all()  # a fixed count never spills onto specials


def test_masking_fixed_count_and_replay():
    idx = torch.randint(1000, 30000, (8, 128))
    idx[:, 0], idx[:, -1] = 101, 102
    a = mask_tokens(idx, mask_generator("cpu", 3, 7), vocab_size=30522, mask_id=103, special_ids=(0, 101, 102),
                    per_row=19)
    b = mask_tokens(idx, mask_generator("cpu", 3, 7), vocab_size=30522, mask_id=103, special_ids=(0, 101, 102),
                    per_row=19)
    assert ((a[1] != -100).sum(1) == 19).all()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same (seed, step) -> same masks
    c = mask_tokens(idx, mask_generator("cpu", 3, 8), vocab_size=30522, mask_id=103, special_ids=(0, 101, 102))
    assert not torch.equal(a[1], c[1])


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert np.array_equal(epoch_order(100, 1, 2), epoch_order(100, 1, 2))
    assert not np.array_equal(epoch_order(100, 1, 2), epoch_order(100, 1, 3))
    assert sorted(epoch_order(100, 1, 2)) == list(range(100))


# -----------------------------------------------------------------------------
# Wikipedia preparation on a small hand-made raw folder

@pytest.fixture()
def small_raw(tmp_path, vocab_path):
    raw = tmp_path / "raw"
    (raw / "wikipedia").mkdir(parents=True)
    (raw / "bert-base-uncased-vocab.txt").symlink_to(vocab_path)
    arts = [{"id": i, "title": f"T{i}", "text": f"article number {i} about topic {i % 7} in the year {1900 + i}."}
            for i in range(60)]
    lines = [json.dumps(a) + "\n" for a in arts]
    (raw / "wikipedia" / "a.jsonl").write_text("".join(lines[:20]))
    with gzip.open(raw / "wikipedia" / "b.jsonl.gz", "wt") as f:
        f.write("".join(lines[20:40]))
    with lzma.open(raw / "wikipedia" / "c.jsonl.xz", "wt") as f:
        f.write("".join(lines[40:]))
    return raw


def test_wikipedia_prefix_subsets_and_determinism(small_raw, tmp_path):
    from tinytlm.wikipedia import prepare
    vocab = small_raw / "bert-base-uncased-vocab.txt"
    full = Shard(prepare(small_raw, tmp_path / "o1", vocab, workers=1, quiet=True), verify=True)
    again = Shard(prepare(small_raw, tmp_path / "o2", vocab, workers=2, quiet=True), verify=True)
    part = Shard(prepare(small_raw, tmp_path / "o3", vocab, rows=10, workers=1, quiet=True), verify=True)
    assert len(full) == 60 and len(part) == 10
    assert np.array_equal(full.ids, again.ids)  # deterministic, independent of the process count
    assert np.array_equal(full.ids[:10], part.ids)  # W_s subsets are prefixes
    perm = np.load(tmp_path / "o1" / "wikipedia" / "perm.npy")
    assert np.array_equal(perm, np.random.default_rng(42).permutation(60))
    pageids = np.load(tmp_path / "o1" / "wikipedia" / "wiki.pageids.npy")
    assert np.array_equal(pageids, perm)  # row i is article perm[i] (here id == input position)
    from tinytlm.tokenizer import WordPieceTokenizer
    tok = WordPieceTokenizer.from_file(vocab)
    assert full.ids[0].tolist() == tok.encode(f"article number {perm[0]} about topic {perm[0] % 7} "
                                              f"in the year {1900 + perm[0]}.")


# -----------------------------------------------------------------------------
# tasks on the shared data

def _prep(shared, out, **kw):
    from tinytlm.tasks import TaskSpec, prepare_task
    return prepare_task(TaskSpec(**kw), shared, out, shared / "bert-base-uncased-vocab.txt", quiet=True)


def test_agnews_per_label_counts_and_nesting(shared, tmp_path):
    d = _prep(shared, tmp_path, task="agnews", train_per_label=50, test_per_label=30)
    small = _prep(shared, tmp_path, task="agnews", train_per_label=20, test_per_label=30)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["counts"] == {"train": [50] * 4, "test": [30] * 4}
    assert meta["label_names"] == ["World", "Sports", "Business", "Sci/Tech"]
    tr, te = np.load(d / "train.rows.npy"), np.load(small / "train.rows.npy")
    y = np.load(d / "train.labels.npy")
    for lab in range(4):  # a smaller sample is a prefix of a larger one, label by label
        assert np.array_equal(te[np.load(small / "train.labels.npy") == lab], tr[y == lab][:20])


def test_agnews_short_labels_take_all_rows(shared, tmp_path):
    d = _prep(shared, tmp_path, task="agnews", train_per_label=1000, test_per_label=10)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["counts"]["train"] == [968, 1000, 1000, 992]  # SOURCES.md: World 968, Sci/Tech 992
    assert meta["short"]["train"] == {"World": 968, "Sci/Tech": 992}


def test_fewrel_train_test_disjoint_and_label_subset(shared, tmp_path):
    d = _prep(shared, tmp_path, task="fewrel", labels=(3, 0, 7), train_per_label=600, test_per_label=100)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["counts"] == {"train": [600] * 3, "test": [100] * 3}
    assert meta["label_names"][0].startswith("P361")  # index 3 of val_wiki's relation order
    tr, te = set(np.load(d / "train.rows.npy")), set(np.load(d / "test.rows.npy"))
    assert not tr & te


# -----------------------------------------------------------------------------
# token statistics on a hand-made example

def test_pair_stats_known_answer():
    vocab = 200
    wiki = np.array([[101, 10, 11, 12, 102, 0], [101, 10, 13, 102, 0, 0]])  # T_W = {10, 11, 12, 13}
    task = np.array([[101, 10, 10, 14, 15, 102], [101, 11, 14, 100, 102, 0]])  # T_C = {10, 11, 14, 15}, [UNK] ignored
    s = pair_stats(counts(task, vocab), counts(wiki, vocab))
    assert (s["T_W"], s["T_C"], s["T_M"]) == (4, 4, 2)  # 14 and 15 are missing
    assert s["occ_overlap"] == pytest.approx(3 / 6)  # 10, 10, 11 of 6 task occurrences
    assert s["log_freq_overlap"] == pytest.approx((2 * np.log(3) + np.log(2)) / 6)
    assert s["occ_overlap_10"] == 0.0
    none = pair_stats(counts(task, vocab), np.zeros(vocab, dtype=np.int64))
    assert (none["T_W"], none["T_M"], none["occ_overlap"]) == (0, 4, 0.0)


def test_constructed_sets_on_hand_made_rows(tmp_path):
    ids = np.array([[101, 10, 11, 102], [101, 10, 20, 102], [101, 20, 21, 102], [101, 21, 0, 0],
                    [101, 20, 20, 102], [101, 10, 21, 102]])
    task = np.zeros(200, dtype=np.int64)
    task[[10, 11]] = 1  # T_C = {10, 11}
    assert rows_within(ids, task > 0).tolist() == [0]  # custom-made: only row 0 is made of task tokens
    write_shard(tmp_path / "w.bin", ids, 200)
    wiki = Shard(tmp_path / "w.bin")
    # raised T_M: non-task tokens (20, 21) qualify rows 2, 3, 4 with k = 0. By frequency the order is
    # 20 (4 occurrences), then 10 and 21 (3 each, ties by id): rows 1 and 5 need token 10, so k = 2.
    rows, k = build_raised_tm(wiki, task, ws=3)
    assert (rows.tolist(), k) == ([2, 3, 4], 0)
    rows, k = build_raised_tm(wiki, task, ws=5)
    assert (rows.tolist(), k) == ([1, 2, 3, 4, 5], 2)
    with pytest.raises(UserError, match="--ws 7"):
        build_raised_tm(wiki, task, ws=7)


# -----------------------------------------------------------------------------
# bad input: one-line error, exit code 2, nothing left behind

def run(args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_user_error(r, *words):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def _raw_with(tmp_path, vocab_path, folder, files):
    raw = tmp_path / "raw"
    (raw / folder).mkdir(parents=True)
    (raw / "bert-base-uncased-vocab.txt").symlink_to(vocab_path)
    for name, text in files.items():
        (raw / folder / name).write_text(text)
    return raw


@pytest.mark.parametrize("train,test,words", [
    ('"1","a","b"\n"2","c"\n', '"1","a","b"\n', ["train.csv:2", "3 columns"]),
    ('"1","a","b"\n"7","c","d"\n', '"1","a","b"\n', ["train.csv:2", "out of range"]),
    ('"1","a","b"\n', '', ["test.csv", "empty"]),
    ('"1","a","b"\n', '"1","a","b"\n"x","a","b"\n', ["test.csv:2", "out of range"]),
])
def test_bad_task_csv(tmp_path, vocab_path, train, test, words):
    raw = _raw_with(tmp_path, vocab_path, "ag_news", {"train.csv": train, "test.csv": test})
    out = tmp_path / "out"
    r = run(["data_prep/tasks.py", "--task", "agnews", "--raw", str(raw), "--out", str(out)])
    assert_user_error(r, *words)
    assert not out.exists() or not list(out.rglob("*.bin"))  # no partial output


def test_bad_arguments_and_files(tmp_path, vocab_path, shared):
    assert_user_error(run(["data_prep/tasks.py", "--task", "imdb", "--out", str(tmp_path)]), "--task", "imdb")
    assert_user_error(run(["data_prep/tasks.py", "--max-len", "512", "--out", str(tmp_path)]), "--max-len")
    assert_user_error(run(["data_prep/tasks.py", "--task", "fewrel", "--labels", "3,99", "--out", str(tmp_path)]),
                      "--labels")
    assert_user_error(run(["data_prep/tasks.py", "--raw", str(tmp_path / "nope"), "--out", str(tmp_path)]), "nope")
    bad_vocab = tmp_path / "vocab.txt"
    bad_vocab.write_text("hello\nworld\n")
    assert_user_error(run(["data_prep/tasks.py", "--vocab", str(bad_vocab), "--out", str(tmp_path)]), "vocab.txt")
    assert_user_error(run(["data_prep/wikipedia.py", "--raw", str(tmp_path), "--out", str(tmp_path)]), "vocab")
    assert_user_error(run(["data_prep/wikipedia.py", "--raw", str(tmp_path), "--out", str(tmp_path),
                           "--vocab", str(vocab_path)]), "wikipedia", "not found")


def test_bad_shard_and_ws_via_tokstats(tmp_path, shared, small_raw):
    data = tmp_path / "data"
    r = run(["-m", "tinytlm.tokstats", "--raw", str(small_raw), "--data", str(data), "--ws", "10"])
    assert r.returncode == 2  # agnews raw files are missing from small_raw
    # prepare a task from the shared data, then damage its shard
    d = _prep(shared, data, task="agnews", train_per_label=5, test_per_label=5)
    r = run(["-m", "tinytlm.tokstats", "--raw", str(small_raw), "--data", str(data), "--ws", "1000",
             "--train-per-label", "5", "--test-per-label", "5"])
    assert_user_error(r, "--ws 1000", "60")
    shard = d / "test.bin"
    shard.write_bytes(shard.read_bytes()[:-7])
    r = run(["-m", "tinytlm.tokstats", "--raw", str(small_raw), "--data", str(data), "--ws", "10",
             "--train-per-label", "5", "--test-per-label", "5"])
    assert_user_error(r, "test.bin", "truncated")


def test_tokstats_without_pretraining_needs_no_wikipedia(tmp_path, shared):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("bert-base-uncased-vocab.txt", "ag_news"):
        (raw / name).symlink_to(shared / name)
    r = run(["-m", "tinytlm.tokstats", "--ws", "0", "--raw", str(raw), "--data", str(tmp_path / "d"),
             "--train-per-label", "5", "--test-per-label", "5"])
    assert r.returncode == 0, r.stderr
    assert "T_W 0 " in r.stdout and not (tmp_path / "d" / "wikipedia").exists()


def test_masking_cap_keeps_the_bernoulli_masks():
    """cap=k: rows with <= k chosen get exactly the uncapped Bernoulli masks; rows with more keep their k
    lowest draws; specials are never chosen either way."""
    idx = torch.randint(1000, 30000, (64, 128))
    idx[:, 0], idx[:, -1] = 101, 102
    idx[:4, 100:] = 0  # a few padded rows
    kw = dict(vocab_size=30522, mask_id=103, special_ids=(0, 101, 102))
    free_in, free_t = mask_tokens(idx, mask_generator("cpu", 1, 2), **kw)
    n_free = (free_t != -100).sum(1)
    cap = int(n_free.float().median())  # about half of the rows exceed it
    cap_in, cap_t = mask_tokens(idx, mask_generator("cpu", 1, 2), cap=cap, **kw)
    n_cap = (cap_t != -100).sum(1)
    under = n_free <= cap
    assert under.any() and (~under).any()
    assert torch.equal(cap_t[under], free_t[under]) and torch.equal(cap_in[under], free_in[under])
    assert (n_cap[~under] == cap).all()
    assert ((cap_t != -100) <= (free_t != -100)).all()  # a subset of the uncapped choice
    assert not (cap_t != -100)[idx == 0].any()
    # a cap of 32 almost never binds at p = 0.15 (128-token rows: 18.9 expected)
    _, t32 = mask_tokens(idx, mask_generator("cpu", 1, 2), cap=32, **kw)
    assert torch.equal(t32, free_t)


def test_special_ids_come_from_the_prepared_folder(tmp_path):
    """Token statistics exclude the specials of the vocabulary the shards were made with (meta.json), not
    bert-base-uncased's ids; folders from before meta.json recorded them fall back to those."""
    from tinytlm.data import BERT_SPECIAL_IDS, special_ids, write_shard
    from tinytlm.tokstats import task_counts
    ids = np.array([[7, 0, 5, 100, 9], [7, 6, 5, 2, 3]])
    for split in ("train", "test"):
        write_shard(tmp_path / f"{split}.bin", ids, 200)
    assert special_ids(tmp_path) == BERT_SPECIAL_IDS
    c = task_counts(tmp_path)
    assert c[0] == 0 and c[100] == 0 and c[5] == 4 and c[7] == 4
    (tmp_path / "meta.json").write_text(json.dumps({"special_ids": {"pad": 5, "unk": 6, "cls": 7, "sep": 8,
                                                                     "mask": 9}}))
    c = task_counts(tmp_path)
    assert c[5] == c[6] == c[7] == c[9] == 0 and c[0] == 2 and c[100] == 2


def test_get_batch_keeps_labels_with_their_rows():
    """Rows asked in any order come back read in ascending order, and the labels come back with them: no
    caller sorts first for its labels to line up."""
    ids = np.arange(40, dtype=np.uint16).reshape(10, 4) * 3  # row r starts with 12 r
    labels = np.arange(10, dtype=np.int64) * 7
    rows = np.array([7, 2, 9, 0])
    x, y = get_batch(ids, rows, torch.device("cpu"), labels)
    assert x.dtype == torch.int64 and x.shape == (4, 4)
    assert (x[:, 0] // 12 * 7).tolist() == y.tolist() == [0, 14, 49, 63]
    assert torch.equal(get_batch(ids, rows, torch.device("cpu")), x)
