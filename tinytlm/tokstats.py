"""Token statistics of a (pre-training subset, task) pairing, and the constructed pre-training sets.

    python -m tinytlm.tokstats --ws 40000 --task agnews
    python -m tinytlm.tokstats --task fewrel --build custom          # Tables 1-2's custom-made set
    python -m tinytlm.tokstats --task fewrel --build raised-tm --ws 40000   # Tables 4, 7

Definitions (PAPER.md): T_W = distinct ids in the first W_s Wikipedia rows; T_C =
distinct ids in the task's train+test rows; T_M = |T_C minus T_W|. The special tokens
[PAD] [CLS] [SEP] [MASK] [UNK] are excluded from every count. Beyond the paper, two
frequency-weighted overlaps, one number per pairing (c_C, c_W = token counts in the
task and in the pre-training subset; averages over the task's token occurrences):
- occ_overlap: share of the task's token occurrences whose token occurs in the subset;
- log_freq_overlap: mean of ln(1 + c_W(t)) over the task's token occurrences, i.e. the
  coverage weighted by how often pre-training saw each token (0 with no pre-training);
- occ_overlap_10: share of the task's occurrences whose token occurs >= 10 times.

Constructed sets, written as shards under DATA/pretrain/ (rows keep the shuffled order):
- custom: the Wikipedia rows whose tokens all lie in T_C (Tables 1-2);
- raised-tm: rows made only of tokens NOT in T_C plus the k most frequent Wikipedia
  tokens, the first W_s of them; with --top-k 0 (default) k is the smallest value
  that still gives W_s rows, which makes T_M as large as possible.
"""
from pathlib import Path

import numpy as np

from tinytlm.common import (ArgParser, UserError, add_option, cli, default_data_root, default_raw_root, read_json,
                            save_npy, write_json)
from tinytlm.data import BERT_SPECIAL_IDS, Shard, special_ids, write_shard


def specials_of(shard: Shard) -> list:
    """The special ids of the vocabulary a shard was made with (its folder's meta.json)."""
    return list(special_ids(shard.path.parent).values())


def counts(ids: np.ndarray, vocab_size: int, specials=tuple(BERT_SPECIAL_IDS.values())) -> np.ndarray:
    """Occurrences of every id, specials zeroed. ids: any shape."""
    c = np.bincount(np.asarray(ids).reshape(-1), minlength=vocab_size).astype(np.int64)
    c[list(specials)] = 0
    return c


def wiki_counts(shard: Shard, ws: int, chunk: int = 65536) -> np.ndarray:
    if ws > len(shard):
        raise UserError(f"--ws {ws}: the Wikipedia shard {shard.path} has only {len(shard)} rows")
    c = np.zeros(shard.vocab_size, dtype=np.int64)
    for i in range(0, ws, chunk):
        c += counts(shard.ids[i:min(ws, i + chunk)], shard.vocab_size, specials_of(shard))
    return c


def pair_stats(c_task: np.ndarray, c_wiki: np.ndarray) -> dict:
    """T_W, T_C, T_M and the weighted overlaps of one pairing."""
    in_task, in_wiki = c_task > 0, c_wiki > 0
    occ = c_task.sum()
    return {
        "T_W": int(in_wiki.sum()),
        "T_C": int(in_task.sum()),
        "T_M": int((in_task & ~in_wiki).sum()),
        "occ_overlap": float(c_task[in_wiki].sum() / occ) if occ else 0.0,
        "log_freq_overlap": float((c_task * np.log1p(c_wiki)).sum() / occ) if occ else 0.0,
        "occ_overlap_10": float(c_task[c_wiki >= 10].sum() / occ) if occ else 0.0,
    }


def task_counts(task_dir: Path) -> np.ndarray:
    train, test = Shard(task_dir / "train.bin"), Shard(task_dir / "test.bin")
    sp = specials_of(train)
    return counts(train.ids, train.vocab_size, sp) + counts(test.ids, test.vocab_size, sp)


def rows_within(ids: np.ndarray, allowed: np.ndarray, chunk: int = 65536,
                specials=tuple(BERT_SPECIAL_IDS.values())) -> np.ndarray:
    """Indices of rows whose every token is allowed (specials always allowed)."""
    allowed = allowed.copy()
    allowed[list(specials)] = True
    keep = [np.flatnonzero(allowed[ids[i:i + chunk]].all(axis=1)) + i for i in range(0, len(ids), chunk)]
    return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)


def build_custom(wiki: Shard, c_task: np.ndarray):
    """Rows of the whole Wikipedia shard whose tokens all lie in T_C."""
    return rows_within(wiki.ids, c_task > 0, specials=specials_of(wiki))


def build_raised_tm(wiki: Shard, c_task: np.ndarray, ws: int, top_k: int = 0):
    """(rows, k): the first ws rows made of non-task tokens plus the top_k most frequent tokens."""
    c_all = wiki_counts(wiki, len(wiki))
    by_freq = np.argsort(-c_all, kind="stable")

    def rows_for(k):
        allowed = c_task == 0
        allowed[by_freq[:k]] = True
        return rows_within(wiki.ids, allowed, specials=specials_of(wiki))

    if top_k:
        rows = rows_for(top_k)
    else:  # smallest k with >= ws rows: binary search, the row count only grows with k
        lo, hi = 0, int((c_all > 0).sum())
        if len(rows_for(hi)) < ws:
            raise UserError(f"--ws {ws}: even with every Wikipedia token allowed there are fewer rows")
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if len(rows_for(mid)) < ws else (lo, mid)
        top_k, rows = lo, rows_for(lo)
    if len(rows) < ws:
        raise UserError(f"--ws {ws}: only {len(rows)} rows qualify with --top-k {top_k}; raise --top-k")
    return rows[:ws], top_k


def pretrain_path(data_root: Path, kind: str, task_dirname: str, ws: int = 0, top_k: int = 0) -> Path:
    name = f"{kind}-{task_dirname}" + (f"-ws{ws}" if ws else "") + (f"-k{top_k}" if top_k else "")
    return data_root / "pretrain" / (name + ".bin")


def build_pretrain_set(kind: str, task_dir: Path, wiki: Shard, ws: int = 0, top_k: int = 0,
                       data_root: Path = None) -> Path:
    """Write the custom or raised-tm shard for a task and return its path (always rebuilt)."""
    data_root = data_root or task_dir.parent
    c_task = task_counts(task_dir)
    meta_wiki = read_json(wiki.path.parent / "meta.json", "Wikipedia meta")
    if not meta_wiki.get("complete"):
        raise UserError(f"{wiki.path}: built with --rows; constructed sets need the full shard "
                        f"(run python data_prep/wikipedia.py)")
    if kind == "custom":
        rows, info = build_custom(wiki, c_task), {}
        path = pretrain_path(data_root, kind, task_dir.name)
    elif kind == "raised-tm":
        if ws <= 0:
            raise UserError("--build raised-tm needs --ws N (rows to keep)")
        rows, k = build_raised_tm(wiki, c_task, ws, top_k)
        info = {"top_k": int(k)}
        path = pretrain_path(data_root, kind, task_dir.name, ws, top_k)
    else:
        raise UserError(f"--build {kind!r}: choose custom or raised-tm")
    if len(rows) == 0:
        raise UserError(f"no Wikipedia row is made only of the allowed tokens for {task_dir.name}")
    ids = np.asarray(wiki.ids[rows])
    write_shard(path, ids, wiki.vocab_size)
    stats = pair_stats(c_task, counts(ids, wiki.vocab_size, specials_of(wiki)))
    save_npy(path.with_suffix(".rows.npy"), rows)  # which Wikipedia shard rows were kept
    write_json(path.with_suffix(".meta.json"), {"kind": kind, "task": task_dir.name, "rows": int(len(rows)),
                                                "wiki_rows": int(len(wiki)),  # the rows before the held-out ones
                                                **info, **stats})
    return path


def parser() -> ArgParser:
    from tinytlm.tasks import add_task_args
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_task_args(ap)
    add_option(ap, "--ws", type=int, default=40000, help="Wikipedia rows (W_s); 0 = no pre-training", low=0)
    add_option(ap, "--build", default="", help="custom | raised-tm: also build that pre-training set",
               choices=("custom", "raised-tm"), also=("",))
    add_option(ap, "--top-k", type=int, default=0, help="raised-tm: frequent tokens kept (0 = smallest that fits)",
               low=0)
    add_option(ap, "--raw", type=Path, default=default_raw_root(), help="raw data root", kind="dir")
    add_option(ap, "--data", type=Path, default=default_data_root(), help="prepared data root", kind="dir")
    return ap


def main(argv=None):
    from tinytlm.tasks import ensure_task, spec_from_args
    from tinytlm.wikipedia import ensure_wiki
    args = parser().parse_args(argv)
    task_dir = ensure_task(spec_from_args(args), args.raw, args.data)
    c_task = task_counts(task_dir)
    wiki = ensure_wiki(args.ws if not args.build else -1, args.raw, args.data) if (args.ws or args.build) else None
    c_wiki = wiki_counts(wiki, args.ws) if args.ws else np.zeros_like(c_task)  # W_s = 0: no pre-training
    s = pair_stats(c_task, c_wiki)
    print(f"task {task_dir.name}  W_s {args.ws:,}  T_W {s['T_W']:,}  T_C {s['T_C']:,}  T_M {s['T_M']:,}  "
          f"occ_overlap {s['occ_overlap']:.4f}  log_freq_overlap {s['log_freq_overlap']:.3f}  "
          f"occ_overlap_10 {s['occ_overlap_10']:.4f}")
    if args.build:
        path = build_pretrain_set(args.build, task_dir, wiki, args.ws, args.top_k, args.data)
        m = read_json(path.with_suffix(".meta.json"))
        extra = f"  top_k {m['top_k']:,}" if "top_k" in m else ""
        print(f"{args.build} set {path}: W_s {m['rows']:,}  T_W {m['T_W']:,}  T_M {m['T_M']:,}{extra}")


if __name__ == "__main__":
    cli(main)
