"""The token layouts a trunk runs in: the padded (B, T) batch as it is (`Padded`), or its real tokens
packed into one (N, ...) tensor (`Packing`); `layout` picks one as the model's Impl says (unpad).

Pre-training rows average about 90 real tokens of 128 and task texts fewer, so a padded step spends about
a quarter of its matmuls on padding. With `--unpad` the encoder runs on the packed real tokens only (as
MosaicBERT and ModernBERT do), attention per sequence (kernels/attention_varlen.py; with the torch kernels
SDPA on the padded layout, packed again); the heads read real positions only anyway (the sparse MLM head
its chosen tokens, the classifier [CLS]), from the trunk's output put back in the padded layout by one
gather. The embeddings (a lookup and a LayerNorm per token: cheap) and a conv stem run on the padded
batch, the stem because it convolves the padded (T x H) image, padding included, as the paper defines it;
the packing follows them.

    p = pack_plan(attention_mask, members=K)   # one host sync: the token budget; = layout(mask, K, unpad=True)
    x = pack(embeddings, p)                      # (B, T, H) -> (K*N, H), N = p.budget tokens per member
    y = unpack(x, p)                             # back to (B, T, H), 0 at padding

Layout. K stacked members (tinytlm/members.py) fold into the batch member-major, and a member's Linear
weights apply to its own slab of rows, so the packed tensor is K slabs of N rows each: member k's real
tokens in row-major order (row b's are rows seq_start[b] .. seq_start[b] + seq_len[b] - 1), then
fillers up to N. Each member gets the same budget N: the largest member's token count rounded up to a
multiple of BUCKET (at most B'*T). The fillers are padding positions of that member (real [PAD]
embeddings, finite), belong to no sequence, and their attention output is 0; nothing reads them.

Static shapes. A budget rounded up to a bucket (128 tokens, or a 32nd of a member's slots in larger
batches) gives a few distinct shapes over a run (one graph or CUDA graph each; at most 32) instead of one
per batch. The waste is budget - real tokens, on average half a bucket per member per step, plus, with
K > 1, the gap between each member's count and the largest (measured on the first 40,000 Wikipedia rows:
bench/train_throughput.py reports it per case). Computing the budget reads the token count on the host
(`pack_plan` is kept out of torch.compile's graphs): one device sync per step.

Exactness. Every token sees what it sees in the padded layout: its own embedding (position included, so
masks with holes work too), its sequence's real keys, the same weights. Only the order of the
rows in the matmuls changes, so losses and gradients equal the padded path's up to fp32 rounding
(tests/test_unpad.py). With dropout on, the masks are other draws than the padded path's.
"""
from dataclasses import dataclass

import numpy as np
import torch

BUCKET = 128  # tokens: a member's budget is its token count rounded up to a multiple of this (or of B'*T / 32)


# -----------------------------------------------------------------------------
# the token layouts: which tokens attend to which
#
# Both layouts answer the same questions, so the trunk and the attention have one path each:
#   rows(x)        a padded (B, T, ...) tensor -> the rows the encoder runs on
#   padded(y)      those rows -> (B, T, ...) again (0 at padding when packed)
#   attend(attention, qkv, n_head, p)   attention over the rows, by the implementation's method for
#                  this layout (tinytlm/kernel_path.py: `padded` or `packed`)


@dataclass
class Padded:
    """A padded (B, T) batch as it is: each row one sequence, attending to its real tokens."""
    key_mask: torch.Tensor  # (B, T) bool, True = a real token that may be attended to

    def rows(self, x):
        return x  # (B, T, ...)

    def padded(self, y):
        return y  # (B, T, ...)

    def attend(self, attention, qkv, n_head, p):
        return attention.padded(qkv, self.key_mask, n_head, p)  # (B, T, 3H) -> (B, T, H)


@dataclass
class Packing:
    """Where every token of a padded (B, T) batch goes in the packed (K*N, ...) layout, and back."""
    index: torch.Tensor  # (K*N,) long: each packed row's flat position in the padded (B*T) layout
    valid: torch.Tensor  # (K*N,) bool: the row is a real token (False: a filler)
    slot: torch.Tensor  # (B*T,) long: each padded position's packed row (padding: its member's first row)
    real: torch.Tensor  # (B*T,) bool: the attention mask, flattened
    seq_start: torch.Tensor  # (B,) int32: row b's first packed row
    seq_len: torch.Tensor  # (B,) int32: row b's real tokens
    T: int  # padded row length, the longest a sequence can be (max_seqlen)
    budget: int  # N: packed rows per member (the static shape)
    blocks: "LengthBlocks" = None  # its sequences in length blocks for a padded attention (pack_plan's blocks > 1)

    @property
    def key_mask(self) -> torch.Tensor:
        return self.real.view(-1, self.T)  # (B, T) bool: the padded layout's attention mask

    def rows(self, x):
        return pack(x, self)  # (B, T, ...) -> (K*N, ...)

    def padded(self, y):
        return unpack(y, self)  # (K*N, ...) -> (B, T, ...)

    def attend(self, attention, qkv, n_head, p):
        return attention.packed(qkv, self, n_head, p)  # (K*N, 3H) -> (K*N, H)


def layout(attention_mask: torch.Tensor, members: int = 1, unpad: bool = False, blocks: int = 1):
    """The layout a trunk runs a batch in: Padded, or (unpad) the Packing of its real tokens (one host sync),
    its sequences also in at most `blocks` length blocks (LengthBlocks) when blocks > 1.
    attention_mask (B, T) bool/0-1, True = real token."""
    mask = attention_mask.bool()
    return pack_plan(mask, members, blocks=blocks) if unpad else Padded(mask)


@torch.compiler.disable  # a host sync: kept out of compiled graphs (a graph break under torch.compile)
def pack_plan(attention_mask: torch.Tensor, members: int = 1, bucket: int = 0, blocks: int = 1) -> Packing:
    """The packing of a padded batch. attention_mask (B, T) bool/0-1, True = real token, B = K*B' rows
    member-major; bucket: tokens (0: BUCKET, or a 32nd of a member's B'*T slots if that is more, so a run
    has at most 32 shapes); blocks > 1: the sequences' length blocks too (length_blocks). One host sync (the
    largest member's token count sets the budget; the rows' lengths, for the blocks)."""
    mask = attention_mask.bool()
    B, T = mask.shape
    K = members
    if B % K:
        raise ValueError(f"pack_plan: {B} rows do not split into {K} members")
    per = B // K * T  # padded positions per member
    bucket = bucket or max(BUCKET, per // 32)
    m = mask.reshape(K, per)  # (K, B'*T)
    counts = m.sum(1)  # (K,)
    budget = min(-(-max(int(counts.max()), 1) // bucket) * bucket, per)  # syncs once
    # each position's rank in its member's packed order: real tokens first in row-major order, then padding
    rank = torch.where(m, m.cumsum(1) - 1, counts[:, None] + (~m).cumsum(1) - 1)  # (K, B'*T), a permutation
    order = torch.empty_like(rank).scatter_(1, rank, torch.arange(per, device=mask.device).expand(K, per))
    base = torch.arange(K, device=mask.device)[:, None]  # (K, 1)
    index = (order[:, :budget] + base * per).reshape(-1)  # (K*N,)
    valid = (torch.arange(budget, device=mask.device) < counts[:, None]).reshape(-1)  # (K*N,)
    slot = torch.where(rank < budget, rank, 0) + base * budget  # (K, B'*T)
    lens = mask.sum(1).view(K, -1)  # (K, B')
    starts = lens.cumsum(1) - lens + base * budget  # (K, B')
    plan = Packing(index, valid, slot.reshape(-1), mask.reshape(-1), starts.reshape(-1).int(), lens.reshape(-1).int(),
                   T, budget)
    if blocks > 1:
        plan.blocks = length_blocks(plan.seq_start, plan.seq_len, K * budget, blocks)
    return plan


def pack(x: torch.Tensor, p: Packing) -> torch.Tensor:
    """(B, T, ...) padded -> (K*N, ...) packed (fillers hold the padding they were taken from)."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, p.index)


def unpack(y: torch.Tensor, p: Packing) -> torch.Tensor:
    """(K*N, ...) packed -> (B, T, ...) padded, 0 at padding."""
    B = p.seq_len.numel()
    out = y.index_select(0, p.slot)  # (B*T, ...)
    real = p.real.view(-1, *([1] * (y.dim() - 1)))
    return torch.where(real, out, out.new_zeros(())).view(B, p.T, *y.shape[1:])


# -----------------------------------------------------------------------------
# length blocks: the packed sequences in a few padded blocks, for an attention that runs on a padded layout
#
# SDPA on the packed tokens first puts them back in the (B, T) layout, and its work goes with B * T^2: a
# batch of AG News texts (53 real tokens of 128 on average, the longest of 32 ~104) pays for padding that
# nothing reads. Sorted by length and cut into a few blocks, each padded only to its longest sequence, the
# same attention costs sum(n_g * L_g^2): ~0.30 of the (B, T) layout's on AG News batches of 32 with up to 4
# blocks, ~0.69 on Wikipedia rows (half of them full), by the cost model below without its fixed cost per
# block. Each sequence sees exactly its own real keys, as before; only the dropout draws differ (other shapes).

BLOCK_OVERHEAD = 128 * (128 + 64)  # a block's fixed cost in the model's units: one more full row of 128


@dataclass
class LengthBlocks:
    """The sequences of a Packing in length blocks: block g holds n_g sequences, each padded to the block's
    longest, L_g. `blocks`: per block (gather (n_g * L_g,) long: the packed row each slot reads, a padding slot
    its sequence's last real token; key_mask (n_g, L_g) bool, True = a real token). `back` (K*N,) long: each
    packed row's place in the blocks' slots concatenated; a filler's is one past them (a zero row)."""
    blocks: list
    back: torch.Tensor


def block_cuts(lens: list, max_blocks: int) -> list:
    """Where to cut ascending lengths into at most max_blocks blocks, as the indices where each block ends (the
    last = len(lens)), so that the modelled cost sum(n_g * L_g * (L_g + 64) + BLOCK_OVERHEAD) is least: a
    block's score and softmax work goes with n L^2, its per-token copies with n L (64: a head's width), and each
    block costs a few more small ops. Exact (dynamic programming over the sorted lengths)."""
    n = len(lens)
    top = np.concatenate([[0.0], np.asarray(lens, dtype=np.float64)])  # top[j]: the longest of the first j
    i, j = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    cost = np.where(j > i, (j - i) * top[j] * (top[j] + 64) + BLOCK_OVERHEAD, np.inf)  # (n+1, n+1): block (i, j]
    best, starts = [cost[0]], [None]  # best[g-1][j]: the least cost of the first j rows in g blocks
    for _ in range(max_blocks - 1):
        total = best[-1][:, None] + cost  # (i, j): the first i rows in the blocks so far, then block (i, j]
        starts.append(total.argmin(0))
        best.append(total.min(0))
    g = int(np.argmin([b[n] for b in best]))  # the block count that costs least
    cuts = [n]
    for level in range(g, 0, -1):  # walk back: where the last block of the best split of the first cuts[0] starts
        cuts.insert(0, int(starts[level][cuts[0]]))
    return cuts


def length_blocks(seq_start: torch.Tensor, seq_len: torch.Tensor, rows: int, max_blocks: int) -> LengthBlocks:
    """The length blocks of a packing's sequences (seq_start, seq_len (B,) int32; rows = K*N packed rows): the
    non-empty sequences sorted by length (stable) and cut by block_cuts. Reads the lengths on the host."""
    dev = seq_len.device
    lens, starts = seq_len.tolist(), seq_start.tolist()
    order = sorted((b for b in range(len(lens)) if lens[b] > 0), key=lens.__getitem__)  # ascending, no empties
    blocks, offset, first = [], 0, 0
    back = torch.full((rows,), -1, dtype=torch.long, device=dev)
    for end in block_cuts([lens[b] for b in order], max_blocks) if order else []:
        seqs = order[first:end]
        top = lens[seqs[-1]]  # the block's longest sequence: its padded length L
        start = torch.tensor([starts[b] for b in seqs], device=dev)[:, None]  # (n, 1)
        length = torch.tensor([lens[b] for b in seqs], device=dev)[:, None]  # (n, 1)
        slot = torch.arange(top, device=dev)  # (L,)
        key_mask = slot < length  # (n, L)
        gather = (start + torch.minimum(slot, length - 1)).reshape(-1)  # (n * L,): padding reads the last token
        real = key_mask.reshape(-1)
        back[gather[real]] = torch.arange(offset, offset + gather.numel(), device=dev)[real]
        blocks.append((gather, key_mask))
        offset, first = offset + gather.numel(), end
    back[back < 0] = offset  # fillers: the zero row after the blocks' slots
    return LengthBlocks(blocks, back)
