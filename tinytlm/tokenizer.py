"""WordPiece tokenizer that reproduces Hugging Face's slow (pure-Python) BertTokenizer, uncased.

Reference semantics (transformers' `BertTokenizerLegacy`, the v4 `BertTokenizer` code):
  1. literal special-token strings ("[MASK]", ...) in the raw text are cut out first (HF's added-tokens trie);
  2. clean: drop NUL, U+FFFD and control chars (category C* except \\t \\n \\r); whitespace (\\t \\n \\r, Zs) -> " ";
  3. put spaces around CJK ideographs; NFC; split on whitespace (str.split);
  4. per word: a word equal to a special token is kept whole, else lower() (Python's, so a final Σ becomes ς),
     strip accents (NFD, drop Mn), split off every punctuation char (P* and the ASCII symbols);
  5. greedy longest-match-first WordPiece with "##" continuations; a word over 100 chars, or one with any
     unmatchable remainder, becomes a single [UNK].

Every step after the whitespace split acts on one word, so ids are cached per raw whitespace-separated word and
most text costs one `str.split` plus dict lookups. Truncation stops reading a text once `max_len - 2` ids exist,
which is exact because words are independent.

    tok = WordPieceTokenizer.from_file("../shared/data/bert-base-uncased-vocab.txt", expected_size=30522)
    ids = tok.encode("Hello world!", max_len=128)     # [CLS] hello world ! [SEP] [PAD] ...
    arr = tok.encode_batch(texts, max_len=128)        # (N, 128) uint16
"""
import re
import unicodedata
from pathlib import Path

import numpy as np

from tinytlm.common import UserError

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_WORD_CHARS = 100  # HF WordpieceTokenizer.max_input_chars_per_word
CACHE_LIMIT = 500_000  # raw words kept in the cache (~100 MB); the cache is simply cleared when full

# str.split() splits on these, but BERT's cleaning deletes them (they are control chars, category Cc), which
# joins their neighbours: "a\x1cb" is the one word "ab". Texts containing one take the regex split below.
_CC_SPACES = re.compile("[\x0b\x0c\x1c-\x1f\x85]")
# What BERT treats as a word separator: \t \n \r and Zs (mapped to " "), plus U+2028/U+2029, which survive
# cleaning (Zl, Zp are not C*) and are then split on by str.split(). tests check this list against unicodedata.
SEPARATORS = " \t\n\r\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_SEP_SPLIT = re.compile(f"[{SEPARATORS}]+")
# The five specials as HF's trie matches them in raw text: anywhere, case-sensitive, none a prefix of another.
_SPECIAL_RE = re.compile(r"(\[(?:PAD|UNK|CLS|SEP|MASK)\])")
# ASCII fast path: after lower(), a word splits into runs of non-punctuation and single punctuation chars.
_ASCII_PUNCT = r"!-/:-@\[-`{-~"
_ASCII_PIECES = re.compile(f"[^{_ASCII_PUNCT}]+|[{_ASCII_PUNCT}]")

# BERT's "Chinese character" ranges (CJK Unified Ideographs and extensions, compatibility ideographs).
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(cp):
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_control(ch):
    return ch not in "\t\n\r" and unicodedata.category(ch)[0] == "C"


def _is_whitespace(ch):
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_punct(ch):
    cp = ord(ch)
    # BERT counts every non-alphanumeric printable ASCII char as punctuation ("$", "^", "`" are not P*).
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch)[0] == "P"


def _split_punct(word):
    """"a.b!" -> ["a", ".", "b", "!"]: each punctuation char alone, the runs between kept."""
    out, run = [], []
    for ch in word:
        if _is_punct(ch):
            if run:
                out.append("".join(run))
                run = []
            out.append(ch)
        else:
            run.append(ch)
    if run:
        out.append("".join(run))
    return out


def basic_tokenize(word, specials=frozenset(SPECIALS)):
    """BERT's BasicTokenizer on one raw word (no separators, no special-token substring): the general path."""
    chars = []
    for ch in word:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if _is_whitespace(ch):
            chars.append(" ")
        elif _is_cjk(cp):
            chars += (" ", ch, " ")
        else:
            chars.append(ch)
    out = []
    for tok in unicodedata.normalize("NFC", "".join(chars)).split():
        # HF passes the specials as never_split: a word that only *becomes* "[MASK]" after cleaning
        # (e.g. "[MA\u200bSK]") stays the special token.
        if tok in specials:
            out.append(tok)
            continue
        tok = "".join(c for c in unicodedata.normalize("NFD", tok.lower()) if unicodedata.category(c) != "Mn")
        out += _split_punct(tok)
    return " ".join(out).split()  # HF re-splits on whitespace; also drops words emptied by accent stripping


class WordPieceTokenizer:
    """Uncased BERT WordPiece tokenizer; ids equal HF's slow BertTokenizer(vocab_file, do_lower_case=True)."""

    def __init__(self, tokens, source="vocab"):
        # tokens: the vocabulary in id order. `source` names the file in error messages.
        self.inv_vocab = list(tokens)  # id -> piece
        self.vocab = {t: i for i, t in enumerate(self.inv_vocab)}  # piece -> id
        self.vocab_size = len(self.inv_vocab)
        if len(self.vocab) != self.vocab_size:
            dup = next(t for i, t in enumerate(self.inv_vocab) if self.vocab[t] != i)
            raise UserError(f"{source}: duplicate vocabulary entry {dup!r}")
        missing = [s for s in SPECIALS if s not in self.vocab]
        if missing:
            raise UserError(f"{source}: vocabulary lacks special token(s) {' '.join(missing)}")
        # ids are stored as uint16, so the largest id must be <= 65535
        if self.vocab_size > 65536:
            raise UserError(f"{source}: {self.vocab_size} tokens do not fit uint16 ids (max 65,536)")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self.vocab[s] for s in SPECIALS)
        self._specials = frozenset(SPECIALS)
        # "##" pieces keyed without the prefix, so the WordPiece loop needs no string concatenation
        self._cont = {t[2:]: i for t, i in self.vocab.items() if t.startswith("##")}
        # no piece is longer than this, so longer candidates are skipped (same result as HF's full scan)
        self._max_head = max(map(len, self.vocab))
        self._max_cont = max(map(len, self._cont), default=0)
        self._cache = {}  # raw word -> tuple of ids

    def special_ids(self) -> dict:
        """{pad, unk, cls, sep, mask}: ids, as every prepared folder records them in meta.json."""
        return {"pad": self.pad_id, "unk": self.unk_id, "cls": self.cls_id, "sep": self.sep_id, "mask": self.mask_id}

    @classmethod
    def from_file(cls, vocab_path, expected_size=None):
        """Load a BERT vocab.txt (one piece per line, line number = id), as HF's load_vocab reads it."""
        path = Path(vocab_path)
        if not path.is_file():
            raise UserError(f"{path}: vocabulary file not found")
        try:
            with open(path, encoding="utf-8") as f:
                tokens = [line.rstrip("\n") for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read vocabulary ({e.__class__.__name__})")
        if not tokens:
            raise UserError(f"{path}: vocabulary file is empty")
        tok = cls(tokens, source=str(path))
        if expected_size is not None and tok.vocab_size != expected_size:
            raise UserError(f"{path}: vocabulary has {tok.vocab_size} tokens, expected {expected_size}")
        return tok

    # --- WordPiece ---------------------------------------------------------------------------------------

    def _wordpiece(self, word):
        """Greedy longest-match-first split of one normalized, punctuation-free word into ids."""
        n = len(word)
        if n > MAX_WORD_CHARS:
            return [self.unk_id]
        vocab, cont = self.vocab, self._cont
        i = vocab.get(word)
        if i is not None:  # most words are a single piece
            return [i]
        ids, start, table, longest = [], 0, vocab, self._max_head
        while start < n:
            end = min(n, start + longest)
            while end > start:
                i = table.get(word[start:end])
                if i is not None:
                    break
                end -= 1
            else:
                return [self.unk_id]  # an unmatchable remainder makes the whole word [UNK]
            ids.append(i)
            start, table, longest = end, cont, self._max_cont
        return ids

    def _word_ids(self, raw):
        """ids of one raw whitespace-separated word (cached by the caller)."""
        if "[" in raw and _SPECIAL_RE.search(raw):
            ids = []
            for k, seg in enumerate(_SPECIAL_RE.split(raw)):
                # split() with a capture group alternates text, special, text, ...
                if k % 2:
                    ids.append(self.vocab[seg])
                elif seg:
                    ids += self._word_ids(seg)
            return tuple(ids)
        if raw.isascii() and raw.isprintable():
            # fast path: no control chars, no CJK, NFC/accents are no-ops; lower() is plain ASCII
            pieces = _ASCII_PIECES.findall(raw.lower())
        else:
            pieces = basic_tokenize(raw, self._specials)
        ids = []
        for p in pieces:
            ids += self._wordpiece(p)
        return tuple(ids)

    def _ids(self, text, limit=None):
        """Token ids of `text` without specials; stops after `limit` ids (None: all)."""
        if not isinstance(text, str):
            raise UserError(f"tokenizer input must be str, got {type(text).__name__}")
        cache, ids = self._cache, []
        if limit == 0:
            return ids
        if _CC_SPACES.search(text):
            words, rest = _SEP_SPLIT.split(text), None
        elif limit is None:
            words, rest = text.split(), None
        else:
            # split only as far as needed: each word gives >= 1 id almost always, so `limit` words usually
            # suffice; the unsplit remainder is only read if they did not
            words = text.split(None, limit)
            rest = words.pop() if len(words) > limit else None
        while True:
            for w in words:
                t = cache.get(w)
                if t is None:
                    if len(cache) >= CACHE_LIMIT:
                        cache.clear()
                    t = cache[w] = self._word_ids(w)
                ids += t
                if limit is not None and len(ids) >= limit:
                    return ids[:limit]
            if rest is None:
                return ids
            words = rest.split(None, limit)
            rest = words.pop() if len(words) > limit else None

    # --- public API --------------------------------------------------------------------------------------

    def tokenize(self, text):
        """Word pieces of `text`, untruncated, without [CLS]/[SEP]."""
        inv = self.inv_vocab
        return [inv[i] for i in self._ids(text)]

    def token_ids(self, text):
        """Ids of `text`, untruncated, without [CLS]/[SEP]."""
        return self._ids(text)

    def _check_len(self, max_len):
        if not isinstance(max_len, int) or max_len < 2:
            raise UserError(f"max_len must be an int >= 2 (room for [CLS] and [SEP]), got {max_len!r}")

    def encode(self, text, max_len=128):
        """[CLS] pieces [SEP] [PAD]..., length max_len; pieces truncated so [SEP] always fits (HF
        `tok(text, max_length=max_len, truncation=True, padding="max_length")`)."""
        self._check_len(max_len)
        ids = self._ids(text, max_len - 2)
        return [self.cls_id, *ids, self.sep_id] + [self.pad_id] * (max_len - 2 - len(ids))

    def encode_batch(self, texts, max_len=128):
        """encode() for each text, as an (N, max_len) uint16 array."""
        self._check_len(max_len)
        out = np.full((len(texts), max_len), self.pad_id, dtype=np.uint16)
        out[:, 0] = self.cls_id
        for r, text in enumerate(texts):
            ids = self._ids(text, max_len - 2)
            n = len(ids)
            out[r, 1:n + 1] = ids
            out[r, n + 1] = self.sep_id
        return out

    def decode(self, ids, skip_special=True):
        """Ids back to text the way HF joins pieces ("un ##aff" -> "unaff"); lower-cased, accents gone.
        skip_special drops [PAD] [CLS] [SEP] [MASK] (not [UNK], which marks lost text)."""
        specials = {self.pad_id, self.cls_id, self.sep_id, self.mask_id} if skip_special else set()
        pieces = [self.inv_vocab[int(i)] for i in ids if int(i) not in specials]
        return " ".join(pieces).replace(" ##", "").strip()
