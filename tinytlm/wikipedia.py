"""Prepare the Wikipedia pre-training shard: shuffle the articles with seed 42, tokenize, write.

    python data_prep/wikipedia.py                  # all articles under $TINYTLM_RAW or ../shared/data
    python data_prep/wikipedia.py --rows 5000      # only the first 5,000 rows of the shuffled order

Row i of the shard is article perm[i] of the input (files sorted by name, lines in
order), perm = np.random.default_rng(42).permutation(n_articles) -- the same
generator call Hugging Face `datasets.Dataset.shuffle(seed=42)` makes. So the W_s
subset is the first W_s rows, and subsets are prefixes of each other, as in the
paper's code. `--rows N` tokenizes only that prefix (a quick demo); the full shard
has every article. The last min(2,000, n/10) rows of the shuffled order are held out for
validation (wiki.val.bin): no W_s prefix ever contains them, so W_s is at most n minus those.
Input: JSONL objects with `title` and `text` (`.jsonl`,
`.jsonl.xz`, `.jsonl.gz`) or, with pyarrow installed, the Hugging Face
`wikimedia/wikipedia` parquet files, anywhere under RAW/wikipedia/.
"""
import gzip
import json
import lzma
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tinytlm.common import (ArgParser, UserError, add_option, atomic_dir, cli, default_data_root, default_raw_root,
                            read_json, save_npy, sha256_file, write_json)
from tinytlm.data import Shard, checked_shard, write_shard
from tinytlm.download import fetch_missing
from tinytlm.tokenizer import WordPieceTokenizer

SEED = 42
MAX_POS = 128  # the model's positions: longer rows cannot be used
VAL_MAX = 2000  # validation rows: the last ones of the shuffled order (fewer for a small corpus)


def val_count(n: int) -> int:
    """How many of n articles are held out for validation: min(2,000, n // 10)."""
    return min(VAL_MAX, n // 10)


# -----------------------------------------------------------------------------
# reading

def wiki_files(raw: Path) -> list[Path]:
    root = raw / "wikipedia"
    if not root.is_dir():
        raise UserError(f"{root}: Wikipedia folder not found (set --raw or $TINYTLM_RAW; "
                        "python -m tinytlm.download wikipedia fetches it)")
    pats = ("*.jsonl", "*.jsonl.xz", "*.jsonl.gz", "*.parquet")
    files = sorted({p for pat in pats for p in root.rglob(pat)})
    if not files:
        raise UserError(f"{root}: no .jsonl, .jsonl.xz, .jsonl.gz or .parquet files")
    return files


def open_text(path: Path):
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8")


def read_articles(path: Path) -> tuple[list[str], list]:
    """(texts, ids) of one file; ids are page ids where the file has them, else None."""
    texts, ids = [], []
    try:
        if path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise UserError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)")
            table = pq.read_table(path, columns=None)
            if "text" not in table.column_names:
                raise UserError(f"{path}: parquet file has no 'text' column")
            texts = table.column("text").to_pylist()
            ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * len(texts)
            return texts, ids
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    texts.append(obj["text"])
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"{path}:{lineno}: not a JSON object with a 'text' field")
                ids.append(obj.get("id"))
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise UserError(f"{path}: unreadable ({e})")
    return texts, ids


# -----------------------------------------------------------------------------
# tokenizing in parallel

_tok = None


def _init_worker(vocab_path):
    global _tok
    _tok = WordPieceTokenizer.from_file(vocab_path)


def _encode_chunk(args):
    texts, max_len = args
    return _tok.encode_batch(texts, max_len=max_len)


def encode_parallel(texts, vocab_path, max_len, workers, chunk=1000, desc="tokenize"):
    """encode_batch over `workers` processes, in order, with a progress bar."""
    chunks = [(texts[i:i + chunk], max_len) for i in range(0, len(texts), chunk)]
    out = np.zeros((len(texts), max_len), dtype=np.uint16)
    workers = min(workers, len(chunks))
    if workers <= 1:
        _init_worker(vocab_path)
        results = map(_encode_chunk, chunks)
        pool = None
    else:
        # spawned, not forked: a fork copies whatever lock another thread (tqdm's monitor, torch's pools)
        # holds at that moment, and a worker can hang on it forever
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                         initargs=(str(vocab_path),))
        results = pool.imap(_encode_chunk, chunks)
    bar = tqdm(total=len(texts), desc=desc, unit="rows", disable=None)
    pos = 0
    try:
        for arr in results:
            out[pos:pos + len(arr)] = arr
            pos += len(arr)
            bar.update(len(arr))
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        bar.close()
    if pool is not None:
        # the workers end on their own: Pool.terminate() after a finished imap could hang here, on a
        # queue lock it takes and keeps while workers wait on it (seen under load, 2026-11-30)
        pool.close()
        pool.join()
    return out


# -----------------------------------------------------------------------------
# main

def count_articles(path: Path) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # read_articles has already said so if pyarrow is missing
        return pq.ParquetFile(path).metadata.num_rows
    try:
        with open_text(path) as f:
            return sum(1 for line in f if line.strip())
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise UserError(f"{path}: unreadable ({e})")


def prepare(raw: Path, out: Path, vocab: Path, rows: int = 0, max_len: int = 128, workers: int = 0,
            quiet=False, rows_flag="--rows") -> Path:
    """Build out/wikipedia/wiki.bin (+ meta.json, perm.npy, wiki.pageids.npy). Returns the shard path.

    Only one file's texts are in memory at a time (the full HF dump is ~20 GB of text): with every
    article, each file is tokenized and the uint16 rows are put in shuffled order at the end; with
    --rows N, the articles are counted first and only the N the prefix needs are read back.
    """
    if max_len > MAX_POS or max_len < 2:
        raise UserError(f"--max-len {max_len}: must be between 2 and the model's {MAX_POS} positions")
    tok = WordPieceTokenizer.from_file(vocab)
    t0 = time.time()
    files = wiki_files(raw)
    workers = workers or os.cpu_count() or 1
    if rows:  # a prefix of the shuffled order
        counts = [count_articles(p) for p in tqdm(files, desc="count", unit="file", disable=quiet or None)]
        n = sum(counts)
        n_val = val_count(n)
        if rows > n - n_val:
            raise UserError(too_many(rows_flag, rows, n))
        perm = np.random.default_rng(SEED).permutation(n)
        dest_row = np.full(n, -1, dtype=np.int64)  # output row of each article, -1 = not read
        dest_row[np.concatenate([perm[:rows], perm[n - n_val:]])] = np.arange(rows + n_val)  # prefix, held out
        ids_arr = np.zeros((rows + n_val, max_len), dtype=np.uint16)
        page_ids = np.full(rows + n_val, -1, dtype=np.int64)
        start = 0
        for p, c in zip(files, counts):
            local = np.flatnonzero(dest_row[start:start + c] >= 0)
            if len(local):
                texts, ids = read_articles(p)
                if len(texts) != c:
                    raise UserError(f"{p}: changed while it was read ({c} then {len(texts)} articles)")
                where = dest_row[start + local]
                ids_arr[where] = encode_parallel([texts[i] for i in local], vocab, max_len, workers,
                                                 desc=f"tokenize {p.name}")
                page_ids[where] = [_page_id(ids[i]) for i in local]
            start += c
        val_arr, ids_arr, page_ids = ids_arr[rows:], ids_arr[:rows], page_ids[:rows]
    else:  # every article
        parts, pids = [], []
        for p in files:
            texts, ids = read_articles(p)
            parts.append(encode_parallel(texts, vocab, max_len, workers, desc=f"tokenize {p.name}"))
            pids += [_page_id(i) for i in ids]
        n = sum(len(a) for a in parts)
        if n == 0:
            raise UserError(f"{raw / 'wikipedia'}: no articles found")
        perm = np.random.default_rng(SEED).permutation(n)
        ids_arr = np.concatenate(parts)[perm]
        page_ids = np.array(pids, dtype=np.int64)[perm]
        val_arr = ids_arr[n - val_count(n):]  # (also the last rows of wiki.bin, which W_s never reaches)
    seconds = time.time() - t0
    with atomic_dir(out / "wikipedia") as dest:  # shard, permutation and meta appear together or not at all
        _write(dest, ids_arr, val_arr, page_ids, tok, perm, files, vocab, n, max_len, seconds)
    shard = out / "wikipedia" / "wiki.bin"
    if not quiet:
        print(f"wrote {shard}: {len(ids_arr):,} of {n:,} articles x {max_len} tokens in {seconds:.0f} s "
              f"({workers} processes)")
    return shard


def _write(dest, ids_arr, val_arr, page_ids, tok, perm, files, vocab, n, max_len, seconds):
    write_shard(dest / "wiki.bin", ids_arr, tok.vocab_size)
    write_shard(dest / "wiki.val.bin", val_arr, tok.vocab_size)
    # meta.json names its shards: another file in their place is refused
    checksum, val_checksum = (Shard(dest / f).checksum.hex() for f in ("wiki.bin", "wiki.val.bin"))
    save_npy(dest / "perm.npy", perm)
    save_npy(dest / "wiki.pageids.npy", page_ids)
    write_json(dest / "meta.json", {
        "kind": "wikipedia",
        "sources": [{"file": str(p), "sha256": sha256_file(p)} for p in files],
        "vocab": str(vocab), "vocab_sha256": sha256_file(vocab),
        "seed": SEED, "shuffle": "numpy.random.default_rng(42).permutation(n_articles)",
        "articles_total": n, "rows": int(len(ids_arr)), "row_len": max_len,
        "special_ids": tok.special_ids(),
        "complete": len(ids_arr) == n, "shard_checksum": checksum,
        "val_rows": int(len(val_arr)), "val_checksum": val_checksum,
        "seconds": round(seconds, 1),
    })


def _page_id(x) -> int:
    """Page ids are ints in our JSONL and strings in HF parquet; -1 when missing."""
    try:
        return int(x)
    except (TypeError, ValueError):
        return -1


def ensure_wiki(rows: int, raw: Path = None, out: Path = None, quiet=False) -> Shard:
    """The Wikipedia shard with at least `rows` rows (-1: every article), prepared when missing."""
    raw, out = raw or default_raw_root(), out or default_data_root()
    shard_path = out / "wikipedia" / "wiki.bin"
    meta = read_json(shard_path.parent / "meta.json", "Wikipedia meta") if shard_path.is_file() else {}
    if "val_rows" in meta:  # (one prepared before the held-out rows existed is prepared again)
        shard = checked_shard(shard_path, meta.get("shard_checksum"))
        complete = meta.get("complete", False)
        n_train = meta["articles_total"] - meta["val_rows"] if complete else len(shard)
        if complete or (rows >= 0 and len(shard) >= rows):
            if rows > n_train:
                raise UserError(too_many("--ws", rows, meta["articles_total"]))
            shard.ids, shard.rows = shard.ids[:n_train], n_train  # the held-out rows are never trained on
            return shard
    fetch_missing(["vocab", "wikipedia"], raw, wiki_rows=rows)  # no raw data anywhere: download it (download.py)
    if not (raw / "wikipedia").is_dir():
        raise UserError(f"{shard_path}: missing or too short, and no raw Wikipedia under {raw}; run "
                        f"`python data_prep/wikipedia.py --raw DIR`")
    if not quiet:
        print(f"preparing {shard_path} from {raw / 'wikipedia'} ...")
    full = rows < 0 or meta.get("complete", False)  # (a complete shard of an older version stays complete)
    prepare(raw, out, raw / "bert-base-uncased-vocab.txt", 0 if full else rows, quiet=quiet, rows_flag="--ws")
    return ensure_wiki(rows, raw, out, quiet)  # the rows before the held-out ones


def too_many(flag: str, rows: int, n: int) -> str:
    return (f"{flag} {rows}: only {n - val_count(n):,} Wikipedia articles are available ({n:,}, less the last "
            f"{val_count(n):,} of the shuffled order, held out for validation)")


def val_shard(out: Path = None) -> Shard:
    """The held-out validation rows (ensure_wiki has prepared them with the shard)."""
    path = (out or default_data_root()) / "wikipedia" / "wiki.val.bin"
    return checked_shard(path, read_json(path.parent / "meta.json", "Wikipedia meta").get("val_checksum"))


def parser() -> ArgParser:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_option(ap, "--raw", type=Path, default=default_raw_root(), help="raw data root (has wikipedia/)", kind="dir")
    add_option(ap, "--out", type=Path, default=default_data_root(), help="prepared data root", kind="out")
    add_option(ap, "--vocab", type=Path, default=None, help="vocab file (default RAW/bert-base-uncased-vocab.txt)",
               kind="file")
    add_option(ap, "--rows", type=int, default=0, help="tokenize only the first N shuffled rows (0 = all)", low=0)
    add_option(ap, "--max-len", type=int, default=128, help="tokens per row, [CLS] and [SEP] included", low=3)
    add_option(ap, "--workers", type=int, default=0, help="processes (0 = one per core)", low=0)
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    prepare(args.raw, args.out, args.vocab or args.raw / "bert-base-uncased-vocab.txt", args.rows,
            args.max_len, args.workers)


if __name__ == "__main__":
    cli(main)
