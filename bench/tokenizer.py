"""Tokenizer throughput: tinytlm's WordPieceTokenizer vs the Rust `tokenizers` BERT tokenizer, one core each.

    python bench/tokenizer.py                        # 20,000 Wikipedia articles + 7,600 AG News texts
    python bench/tokenizer.py --wiki 5000 --raw ../shared/data

Both tokenizers encode the same texts to [CLS] ... [SEP] + [PAD], 128 ids, and the ids are checked equal.
Rust runs single-threaded (RAYON_NUM_THREADS=1) so the ratio is per core. Times are process CPU seconds
(the sandbox is shared, so wall time is noisier); tokens/s counts non-[PAD] ids, specials included.
Two workloads: "truncated" (max_len 128, what data preparation does) and "full" (every token of every text).
Ours starts each workload with an empty word cache (cold) and is then timed again (warm). Writes nothing.
"""
import argparse
import os
import sys
import time

os.environ["RAYON_NUM_THREADS"] = "1"  # must be set before tokenizers starts its thread pool
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import numpy as np

from tinytlm.common import default_raw_root, git_revision
from tinytlm.tokenizer import WordPieceTokenizer

# -----------------------------------------------------------------------------
# data


def load_texts(raw, n_wiki):
    import csv
    import itertools
    import json
    import lzma
    wiki_file = raw / "wikipedia/enwiki_wikiextractor_Vibhas-hs-edu_WikiTasks.jsonl.xz"
    with lzma.open(wiki_file, "rt", encoding="utf-8") as f:
        wiki = [json.loads(line)["text"] for line in itertools.islice(f, n_wiki)]
    with lzma.open(raw / "ag_news/test.csv.xz", "rt", encoding="utf-8", newline="") as f:
        ag = [r[1] + " " + r[2] for r in csv.reader(f)]
    return {"wikipedia": wiki, "ag_news": ag}

# -----------------------------------------------------------------------------
# timing


def cpu_time(fn):
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


def bench(name, texts, ours, rust, max_len):
    """Time both on one workload; max_len=None means no truncation or padding."""
    if max_len is None:
        rust.no_truncation()
        rust.no_padding()
        ours._cache.clear()
        mine, cold = cpu_time(lambda: [ours.token_ids(t) for t in texts])
        _, warm = cpu_time(lambda: [ours.token_ids(t) for t in texts])
        theirs, t_rust = cpu_time(lambda: [e.ids[1:-1] for e in rust.encode_batch(texts)])
        assert mine == theirs, f"{name}: ids differ"
        n_tok = sum(map(len, mine)) + 2 * len(texts)
    else:
        rust.enable_truncation(max_len)
        rust.enable_padding(length=max_len, pad_id=ours.pad_id)
        ours._cache.clear()
        mine, cold = cpu_time(lambda: ours.encode_batch(texts, max_len=max_len))
        _, warm = cpu_time(lambda: ours.encode_batch(texts, max_len=max_len))
        # the Rust side includes building the same uint16 array, which any consumer needs
        theirs, t_rust = cpu_time(lambda: np.array([e.ids for e in rust.encode_batch(texts)], dtype=np.uint16))
        assert np.array_equal(mine, theirs), f"{name}: ids differ"
        n_tok = int((mine != ours.pad_id).sum())
    label = f"{name} ({'full' if max_len is None else f'max_len {max_len}'})"
    print(f"{label:<26} {len(texts):>6} texts {n_tok:>10,} tokens | "
          f"ours cold {n_tok / cold:>10,.0f} tok/s  warm {n_tok / warm:>10,.0f} tok/s | "
          f"rust {n_tok / t_rust:>10,.0f} tok/s | ratio cold {t_rust / cold:.2f}x warm {t_rust / warm:.2f}x")

# -----------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raw", default=str(default_raw_root()), help="shared data folder")
    p.add_argument("--wiki", type=int, default=20000, help="Wikipedia articles to read")
    args = p.parse_args()
    from pathlib import Path

    import tokenizers
    raw = Path(args.raw)
    vocab = raw / "bert-base-uncased-vocab.txt"
    ours = WordPieceTokenizer.from_file(vocab, expected_size=30522)
    rust = tokenizers.BertWordPieceTokenizer(str(vocab), lowercase=True)
    data = load_texts(raw, args.wiki)
    print(f"git {git_revision()} | python {sys.version.split()[0]} | tokenizers {tokenizers.__version__} | "
          f"RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']} | CPU seconds per core")
    for max_len in (128, None):
        for name, texts in data.items():
            bench(name, texts, ours, rust, max_len)


if __name__ == "__main__":
    main()
