"""WordPieceTokenizer: ids equal Hugging Face's slow BertTokenizer on real and adversarial text; layout; errors.

The reference is the pure-Python BertTokenizer (transformers 5.x ships it as `BertTokenizerLegacy`; in 4.x it is
`BertTokenizer` itself). transformers 5.x's `BertTokenizer` is backed by the Rust `tokenizers` library; it is
checked too, and its known differences from the slow one are pinned in test_rust_vs_slow_disagreements.
"""
import csv
import itertools
import json
import lzma
import random
import sys
import unicodedata

import numpy as np
import pytest

from tinytlm.common import UserError
from tinytlm import tokenizer as tk
from tinytlm.tokenizer import WordPieceTokenizer

MAX_LEN = 128
# texts per data set: >= 20,000 in all; the slow reference needs ~1 ms per short text, ~4 ms per wiki article
COUNTS = {"ag_news": 7600, "dbpedia": 6000, "fewrel": 6000, "wikipedia": 1000}

HARD = [
    "", " ", "\t\n\r", "Hello, World!", "Ünïcödé naïve café résumé Zoë Ångström Øresund",
    "e\u0301 combining acute, a\u0308\u0304 stacked, \u0301 lone mark", "ΟΔΟΣ Σίσυφος ΣΑΣ. Σ",
    "中文字符测试 日本語のテキスト 한국어 텍스트", "mixed中文english", "\U00020000\U0002B820\U0002B81F\U0002CEAF ext",
    "emoji 😀👍🏽 👨‍👩‍👧 flags 🇺🇸 ❤️", "zero\u200bwidth\u200cjoin\u200dx \ufeffbom",
    "ctrl\x00nul\x01\x07bell\x7fdel \ufffd repl", "fullwidth ＡＢＣ １２３ ！？（）",
    "a" * 100, "a" * 101, "x" * 99 + "é", "supercalifragilistic" * 6, "word" + "\u0301" * 120,
    "!!!???...---,,,;;;", "...!?\"'`~@#$%^&*()_+-=[]{}|\\:;<>,./", "non\u00a0breaking\u00a0space",
    "tab\there\nnew\rline", "line\u2028separator\u2029para", "İstanbul ıi I İ", "İ" * 60,
    "straße STRASSE ß ẞ", "ligatures ﬁ ﬂ ﬀ ﬃ Æsir œuvre", "RTL: שלום עולם مرحبا بالعالم \u200f\u200e",
    "[MASK] is a [CLS] token [SEP] [PAD] [UNK]", "x[MASK]y [mask] [Mask]", "[[MASK]] [MASK][MASK]",
    "[MA\u200bSK] a[MA\u200bSK] [MA\x00SK]",
    "vertical\x0btab form\x0cfeed fs\x1cgs\x1drs\x1eus\x1f nel\x85x",
    "en\u2013dash em\u2014dash \u2018quotes\u2019 \u201cdouble\u201d \u00abguill\u00bb",
    "1,234.56 $100 €200 £3 ¥4 50% 3.14e-10", "http://example.com/path?q=1&r=2 user@mail.org",
    "ℌ𝔢𝔩𝔩𝔬 𝐛𝐨𝐥𝐝 ① ② ㈱ ™ ½", "Thai สวัสดี", "Devanagari नमस्ते हिन्दी", "ﾊﾝｶｸ カタカナ ひらがな",
    "\u3000ideographic\u3000space\u3000", "\u2003em space\u2009thin\u202fnarrow\u205fmath\u1680ogham",
    "a\u0300\u0301\u0302\u0303\u0304" * 30, "Ǆ ǅ ǆ ﬅ ŉ ΐ ǰ", "soft\u00adhyphen", "don't rock'n'roll C++ C# .NET",
    "x" * 30 + "😀" + "y" * 80, "\ud7ff\ue000 private use \U000F0000", "𝟘𝟙𝟚 Ⅻ ⅻ Ⓐⓑⓒ",
    "Å (U+212B) Ω (U+2126) K (U+212A) \u00b5 \u03bc", "a\u0345 iota subscript ᾳ ᾼ", "x\u034fy \u0301\u0301 \u0301",
]
# Inputs on which the Rust tokenizer (tokenizers' BertNormalizer/BertPreTokenizer) differs from the slow one.
RUST_DIFFERS = {
    "ΟΔΟΣ Σίσυφος ΣΑΣ. Σ",  # Python's str.lower() gives a word-final Σ as ς; Rust lower-cases char by char (σ)
    "\U00020000\U0002B820\U0002B81F\U0002CEAF ext",  # unassigned code points (Cn): slow drops them, Rust keeps -> [UNK]
    "\ud7ff\ue000 private use \U000F0000",  # unassigned / private-use (Cn, Co): same
    "[MA\u200bSK] a[MA\u200bSK] [MA\x00SK]",  # a word that *becomes* "[MASK]" after cleaning: slow keeps the special
}


def _read_texts(root):
    """The first COUNTS[name] texts of each data set, read straight from the .xz files."""
    def rows(path):
        with lzma.open(path, "rt", encoding="utf-8", newline="") as f:
            yield from csv.reader(f)

    ag_news = itertools.islice(rows(root / "ag_news/test.csv.xz"), COUNTS["ag_news"])
    out = {"ag_news": [r[1] + " " + r[2] for r in ag_news],
           "dbpedia": [r[2] for r in itertools.islice(rows(root / "dbpedia/test_subset.csv.xz"), COUNTS["dbpedia"])]}
    with lzma.open(root / "fewrel/val_wiki.json.xz", "rt", encoding="utf-8") as f:
        rel = json.load(f)
    # interleave relations so the sample spans all 16
    fewrel = [" ".join(x["tokens"]) for group in itertools.zip_longest(*rel.values()) for x in group if x]
    out["fewrel"] = fewrel[:COUNTS["fewrel"]]
    wiki = root / "wikipedia/enwiki_wikiextractor_Vibhas-hs-edu_WikiTasks.jsonl.xz"
    with lzma.open(wiki, "rt", encoding="utf-8") as f:
        out["wikipedia"] = [json.loads(line)["text"] for line in itertools.islice(f, COUNTS["wikipedia"])]
    return out


@pytest.fixture(scope="session")
def tok(vocab_path):
    return WordPieceTokenizer.from_file(vocab_path, expected_size=30522)


@pytest.fixture(scope="session")
def slow(vocab_path):
    pytest.importorskip("transformers")
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as Slow  # 5.x
    except ImportError:
        from transformers import BertTokenizer as Slow  # 4.x: the pure-Python one
    ref = Slow(str(vocab_path))
    assert not ref.is_fast
    return ref


@pytest.fixture(scope="session")
def real_texts(shared):
    return _read_texts(shared)


@pytest.fixture(scope="session")
def slow_ids(slow, real_texts):
    """Reference ids, computed once (the slow tokenizer is most of this file's runtime)."""
    return {name: [slow(t, max_length=MAX_LEN, truncation=True, padding="max_length")["input_ids"] for t in texts]
            for name, texts in real_texts.items()}


def _first_mismatch(texts, got, want):
    bad = [i for i in range(len(texts)) if list(got[i]) != list(want[i])]
    if not bad:
        return 0, ""
    i = bad[0]
    return len(bad), f"text {i} {texts[i][:200]!r}: got {list(got[i])[:40]} want {list(want[i])[:40]}"


# --- parity with the reference ---------------------------------------------------------------------------

def test_real_texts_match_slow_reference(tok, real_texts, slow_ids):
    assert sum(map(len, real_texts.values())) >= 20_000
    for name, texts in real_texts.items():
        got = tok.encode_batch(texts, max_len=MAX_LEN)
        n_bad, example = _first_mismatch(texts, got, slow_ids[name])
        assert n_bad == 0, f"{name}: {n_bad}/{len(texts)} texts differ; first: {example}"
    # encode() and encode_batch() agree (checked on a slice to keep the test fast)
    texts = real_texts["wikipedia"][:200]
    assert [tok.encode(t) for t in texts] == tok.encode_batch(texts).tolist()


def test_real_texts_match_transformers_bert_tokenizer(vocab_path, tok, real_texts):
    """transformers.BertTokenizer as the library exports it (Rust-backed in 5.x) also agrees on real text."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertTokenizer(str(vocab_path))
    assert ref.vocab_size == tok.vocab_size  # 5.x: a bad path would silently give a 5-token vocabulary
    for name, texts in real_texts.items():
        want = ref(texts, max_length=MAX_LEN, truncation=True, padding="max_length")["input_ids"]
        n_bad, example = _first_mismatch(texts, tok.encode_batch(texts, max_len=MAX_LEN), want)
        assert n_bad == 0, f"{name}: {n_bad}/{len(texts)} texts differ; first: {example}"


@pytest.mark.parametrize("text", HARD, ids=range(len(HARD)))
def test_hard_cases_match_slow_reference(tok, slow, text):
    assert tok.tokenize(text) == slow.tokenize(text)
    for max_len in (MAX_LEN, 5):
        want = slow(text, max_length=max_len, truncation=True, padding="max_length")["input_ids"]
        assert tok.encode(text, max_len=max_len) == want


def test_random_strings_match_slow_reference(tok, slow):
    """Seeded fuzz over the characters where BERT's rules interact (specials, sigma, controls, marks, CJK)."""
    pool = list("aAsSeE09 .,!?'[]#-") + ["[MASK]", "[CLS]", "[MA", "SK]", "Σ", "ς", "İ", "ß", "é", "e\u0301",
                                           "\u0301", "中", "\u200b", "\x00", "\x01", "\x0b", "\x1c", "\x85",
                                           "\u2028", "\u00a0", "\u3000", "\t", "\n", "\ufffd", "\ue000", "😀",
                                           "ﬁ", "Å", "\U0002B81F", "ᄀ", "ᅡ", "Ǆ", "\u0345", "ΐ", "ﾊ", "ﾞ"]
    rng = random.Random(0)
    for _ in range(1500):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 30)))
        max_len = rng.randint(2, 12)
        assert tok.tokenize(text) == slow.tokenize(text), repr(text)
        want = slow(text, max_length=max_len, truncation=True, padding="max_length")["input_ids"]
        assert tok.encode(text, max_len=max_len) == want, repr(text)


def test_rust_vs_slow_disagreements(vocab_path, slow):
    """Pin where tokenizers' Rust BERT pipeline differs from the slow reference (see bench/results/tokenizer.md)."""
    tokenizers = pytest.importorskip("tokenizers")
    rust = tokenizers.BertWordPieceTokenizer(str(vocab_path), lowercase=True)
    differs = {t for t in HARD if rust.encode(t, add_special_tokens=False).tokens != slow.tokenize(t)}
    assert differs == RUST_DIFFERS


# --- layout ----------------------------------------------------------------------------------------------

def test_encode_layout_truncation_padding(tok):
    a, b, c = (tok.vocab[w] for w in ("a", "b", "c"))
    assert tok.encode("a b c", max_len=8) == [tok.cls_id, a, b, c, tok.sep_id] + [tok.pad_id] * 3
    assert tok.encode("a b c", max_len=4) == [tok.cls_id, a, b, tok.sep_id]  # truncated, [SEP] kept
    assert tok.encode("a b c", max_len=2) == [tok.cls_id, tok.sep_id]
    assert tok.encode("", max_len=3) == [tok.cls_id, tok.sep_id, tok.pad_id]
    # truncation that cuts a multi-piece word and skips words that give no ids
    text = "\u0301 \u0301 unaffable " * 3
    full = tok.token_ids(text)
    assert len(full) > 4 and len(tok.tokenize("unaffable")) > 1
    for n in range(2, len(full) + 4):
        ids = tok.encode(text, max_len=n)
        k = min(n - 2, len(full))
        assert ids == [tok.cls_id, *full[:k], tok.sep_id] + [tok.pad_id] * (n - 2 - k)
    for bad in (1, 0, -3, 2.5):
        with pytest.raises(UserError, match="max_len"):
            tok.encode("a", max_len=bad)
    with pytest.raises(UserError, match="str"):
        tok.encode(b"bytes")


def test_encode_batch_dtype_shape(tok):
    texts = ["hello world", "", "a " * 300]
    arr = tok.encode_batch(texts, max_len=16)
    assert arr.dtype == np.uint16 and arr.shape == (3, 16)
    assert arr.tolist() == [tok.encode(t, max_len=16) for t in texts]
    assert tok.encode_batch([], max_len=16).shape == (0, 16)
    assert tok.decode(arr[0]) == "hello world"


def test_cache_eviction_keeps_results(tok, monkeypatch):
    text = "the cache is cleared when full, which must not change any id"
    want = tok.encode(text)
    monkeypatch.setattr(tk, "CACHE_LIMIT", 3)
    tok._cache.clear()
    assert tok.encode(text) == want and len(tok._cache) <= 3


def test_separator_tables_match_unicodedata():
    """SEPARATORS / _CC_SPACES must be exactly how cleaning + str.split() treat whitespace on this Python."""
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        is_cc = unicodedata.category(ch) == "Cc" and ch not in "\t\n\r"  # BERT keeps these three as spaces
        assert bool(tk._SEP_SPLIT.match(ch)) == (ch.isspace() and not is_cc), hex(cp)
        assert bool(tk._CC_SPACES.match(ch)) == (ch.isspace() and is_cc), hex(cp)


# --- vocabulary errors -----------------------------------------------------------------------------------

def test_vocab_properties(tok):
    assert tok.vocab_size == 30522 == len(tok.inv_vocab) == len(tok.vocab)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert all(tok.vocab[t] == i for i, t in enumerate(tok.inv_vocab))


def test_bad_vocab_raises_user_error(tmp_path, vocab_path):
    with pytest.raises(UserError, match="not found"):
        WordPieceTokenizer.from_file(tmp_path / "nope.txt")
    lines = vocab_path.read_text(encoding="utf-8").splitlines()
    no_mask = tmp_path / "no_mask.txt"
    no_mask.write_text("\n".join(t for t in lines if t != "[MASK]") + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"no_mask\.txt.*\[MASK\]"):
        WordPieceTokenizer.from_file(no_mask)
    big = tmp_path / "big.txt"
    big.write_text("\n".join(lines + [f"tok{i}" for i in range(65537 - len(lines))]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"big\.txt.*uint16"):
        WordPieceTokenizer.from_file(big)
    with pytest.raises(UserError, match="expected 30000"):
        WordPieceTokenizer.from_file(vocab_path, expected_size=30000)
    dup = tmp_path / "dup.txt"
    dup.write_text("\n".join(lines + ["the"]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="duplicate"):
        WordPieceTokenizer.from_file(dup)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        WordPieceTokenizer.from_file(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"[PAD]\n\xff\xfe\n")
    with pytest.raises(UserError, match="cannot read"):
        WordPieceTokenizer.from_file(latin)
