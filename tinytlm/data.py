"""Token shards, labels, batches and MLM masking.

A shard is one file: a fixed 64-byte header followed by the token ids, row-major,
rows x row_len, read back with np.memmap (no copy, no parse):

    offset  size  field
    0       8     magic b"TTLMSHRD"
    8       4     format version (uint32, = 1)
    12      4     dtype code (uint32: 1 = uint16, 2 = uint32)
    16      8     rows (uint64)
    24      4     row length (uint32)
    28      4     vocabulary size (uint32; every id is < this)
    32      16    blake2b-128 checksum of the payload
    48      16    zero padding

Labels live in a sidecar `<name>.labels.npy` (int64), and a `meta.json` in the
shard's folder records sources and their sha256, seed, counts and label names.
Every file is written to a temp name and renamed, so a crash never leaves a
broken shard behind.
"""
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch

from tinytlm.common import UserError, atomic_path, save_npy

MAGIC = b"TTLMSHRD"
VERSION = 1
HEADER = struct.Struct("<8sIIQII16s16x")  # 64 bytes, see the table above
assert HEADER.size == 64
DTYPES = {1: np.uint16, 2: np.uint32}
DTYPE_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
IGNORE = -100  # Hugging Face's ignore index for MLM targets
# bert-base-uncased's special ids; every prepared folder records those of its vocabulary in meta.json
BERT_SPECIAL_IDS = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}


def special_ids(folder) -> dict:
    """The special-token ids ({pad, unk, cls, sep, mask}) of the vocabulary a prepared folder (Wikipedia
    or a task) was tokenized with, from its meta.json; folders prepared before they were recorded used
    bert-base-uncased's."""
    meta = Path(folder) / "meta.json"
    return (json.loads(meta.read_text()).get("special_ids") if meta.is_file() else None) or dict(BERT_SPECIAL_IDS)


# -----------------------------------------------------------------------------
# shards

def payload_checksum(arr: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    step = 1 << 24  # hash in 16 MiB slices so a memmap is never fully copied
    for i in range(0, flat.size, step):
        h.update(flat[i:i + step])
    return h.digest()


def write_shard(path, ids: np.ndarray, vocab_size: int):
    """Write ids (rows, row_len) atomically; the smallest dtype that holds vocab_size is used."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"shard ids must be 2-D (rows, row_len), got shape {ids.shape}")
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    assert vocab_size <= np.iinfo(dtype).max + 1, "vocabulary does not fit the shard dtype"
    if ids.size and int(ids.max()) >= vocab_size:
        raise ValueError(f"id {int(ids.max())} >= vocab size {vocab_size}")
    ids = np.ascontiguousarray(ids, dtype=dtype)
    header = HEADER.pack(MAGIC, VERSION, DTYPE_CODES[np.dtype(dtype)], ids.shape[0], ids.shape[1],
                         vocab_size, payload_checksum(ids))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(ids.tobytes())


class Shard:
    """A read-only, memory-mapped shard. `shard.ids` is an (rows, row_len) np.memmap."""

    def __init__(self, path, verify=False):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: shard not found")
        size = self.path.stat().st_size
        if size < HEADER.size:
            raise UserError(f"{self.path}: truncated shard ({size} bytes, header needs {HEADER.size})")
        with open(self.path, "rb") as f:
            magic, version, code, rows, row_len, vocab, checksum = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise UserError(f"{self.path}: not a tinytlm shard (bad magic {magic!r})")
        if version != VERSION:
            raise UserError(f"{self.path}: shard format version {version}, this code reads {VERSION}")
        if code not in DTYPES:
            raise UserError(f"{self.path}: unknown dtype code {code}")
        dtype = np.dtype(DTYPES[code])
        expected = HEADER.size + rows * row_len * dtype.itemsize
        if size != expected:
            what = "truncated" if size < expected else "has trailing bytes"
            raise UserError(f"{self.path}: shard {what}: {size} bytes, header says {expected}")
        self.rows, self.row_len, self.vocab_size, self.checksum = rows, row_len, vocab, checksum
        self.ids = (np.memmap(self.path, dtype=dtype, mode="r", offset=HEADER.size, shape=(rows, row_len))
                    if rows else np.zeros((0, row_len), dtype))
        if verify:
            self.verify()

    def verify(self):
        if payload_checksum(self.ids) != self.checksum:
            raise UserError(f"{self.path}: checksum mismatch, the shard is corrupt; prepare it again")
        return self

    def __len__(self):
        return self.rows

    def labels(self) -> np.ndarray:
        p = labels_path(self.path)
        if not p.is_file():
            raise UserError(f"{p}: labels file not found")
        y = np.load(p)
        if y.shape != (self.rows,):
            raise UserError(f"{p}: {y.shape[0]} labels for {self.rows} shard rows")
        return y


def checked_shard(path, checksum: str = None) -> Shard:
    """A shard whose payload matches its header's checksum and, when given, the checksum its meta.json
    recorded (a shard of another kind or another preparation is refused): one pass over the file."""
    shard = Shard(path, verify=True)
    if checksum and shard.checksum.hex() != checksum:
        raise UserError(f"{shard.path}: not the shard its meta.json describes (another kind of shard, or "
                        f"another preparation); prepare it again")
    return shard


def labels_path(shard_path) -> Path:
    shard_path = Path(shard_path)
    return shard_path.with_name(shard_path.stem + ".labels.npy")


def write_labels(shard_path, labels):
    save_npy(labels_path(shard_path), np.asarray(labels, dtype=np.int64))


# -----------------------------------------------------------------------------
# batches

def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: a function of (seed, epoch) alone, so a resumed run replays it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def get_batch(ids: np.ndarray, rows: np.ndarray, device, labels: np.ndarray = None):
    """Gather rows of a (memmapped) id array into an int64 tensor on device, (B, T). The rows are read in
    ascending order (sequential on disk), so the batch holds them sorted, whatever order `rows` asks for;
    with labels (one per row of ids), returns (x, y), y the labels of x's rows in x's order."""
    rows = np.sort(rows)  # sorted reads are sequential on disk
    x = torch.from_numpy(ids[rows].astype(np.int64))
    y = None if labels is None else torch.from_numpy(np.asarray(labels)[rows])
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
        y = None if y is None else y.to(device)
    return x if labels is None else (x, y)


# -----------------------------------------------------------------------------
# masked language modelling

def mask_tokens(idx: torch.Tensor, gen: torch.Generator, *, vocab_size: int, mask_id: int,
                special_ids, p: float = 0.15, per_row: int = 0, cap: int = 0):
    """BERT masking on idx's device: choose p of the non-special tokens, 80% -> [MASK],
    10% -> a random id, 10% unchanged. Returns (inputs, targets) with targets = original id
    at the chosen positions and -100 elsewhere.

    per_row > 0 chooses exactly min(per_row, candidates) tokens in each row instead of a
    Bernoulli draw, so full rows always give the same number of predictions (static shapes).
    cap > 0 keeps the Bernoulli draw but at most `cap` chosen per row (the lowest draws): the
    sparse head then fits `cap` static slots per row (CUDA graphs) and the masks are the
    uncapped ones in every row with <= cap chosen (same random numbers are drawn).
    """
    B, T = idx.shape
    special = torch.zeros_like(idx, dtype=torch.bool)
    for s in special_ids:
        special |= idx == s
    u = torch.rand((B, T), generator=gen, device=idx.device)  # (B, T)
    if per_row:
        score = u.masked_fill(special, 2.0)  # specials sort last
        lowest = score.topk(min(per_row, T), dim=1, largest=False).indices  # (B, k): exactly k, ties or not
        chosen = torch.zeros_like(special).scatter_(1, lowest, True) & ~special
    else:
        chosen = (u < p) & ~special
        if cap and cap < T:  # keep the `cap` lowest draws among the chosen
            lowest = u.masked_fill(~chosen, 2.0).topk(cap, dim=1, largest=False).indices  # (B, cap)
            chosen &= torch.zeros_like(chosen).scatter_(1, lowest, True)
    action = torch.rand((B, T), generator=gen, device=idx.device)  # (B, T)
    random_ids = torch.randint(0, vocab_size, (B, T), generator=gen, device=idx.device)
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(idx, mask_id), idx)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    targets = torch.where(chosen, idx, torch.full_like(idx, IGNORE))
    return inputs, targets


def mask_generator(device, seed: int, step: int) -> torch.Generator:
    """A generator seeded from (seed, step): masks depend on the step alone, so resume replays them."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) % (1 << 63))
    return g
