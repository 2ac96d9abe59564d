"""Which implementation a model runs, chosen when it is built: `Impl(kernels, unpad, head, dropout,
attn_blocks)`.

    impl = Impl(kernels="triton", unpad=True)    # validated here, once: a bad name is a one-line UserError
    model = BertForMLM(cfg, impl=impl)           # passed down to every SelfAttention, ConvStem and MLMHead

kernels: "torch" (the plain-torch reference, any device) or "triton" (kernels/, CUDA or the interpreter).
unpad: the encoder runs on the packed real tokens (tinytlm/unpad.py) instead of the padded (B, T) batch.
head: how the MLM decoder and its cross-entropy run when the model is given targets: "plain" (the full
(N, V) logits, then F.cross_entropy: the reference) or "chunked" (kernels/linear_ce.py: `head_chunk` rows
at a time (at most), not all N x V logits at large batches; faster on CPU, bench/results/2026-12-07-cpu-members.md).
`default_head(device)` is the rule a run uses: chunked on the CPU, plain elsewhere (not measured there);
`default_unpad(device)` is --unpad auto's: packed on the CPU.
attn_blocks: with the torch attention on packed tokens, the sequences sorted by length and cut into at most
this many blocks, each padded only to its own longest (tinytlm/unpad.py length_blocks), instead of all B rows to
T; 1 = the (B, T) layout. `default_attn_blocks(device)`: 4 on the CPU.
dropout: every dropout of the model (embeddings, attention output, FFN output, classifier, attention
probabilities): "torch" (nn.Dropout and SDPA's dropout_p: the reference) or "fast" (kernels/dropout.py: the
keep-mask from four 15-bit lanes per 64-bit draw, p quantized to 1/32768; the attention then runs SDPA's math
explicitly with that dropout on the probabilities while training with p > 0, and SDPA otherwise).
`default_dropout(device)` is the rule a run uses: fast on the CPU (bench/results/2026-12-07-cpu-dropout.md),
torch elsewhere (on CUDA F.dropout fuses under compile and the Triton attention has its own dropout: not
measured there).

The attention implementations below have one method per token layout: `padded` (a (B, T) batch and its
key-padding mask) and `packed` (the packed real tokens and their tinytlm.unpad.Packing). The layout
object calls the method that fits it (`Padded.attend`, `Packing.attend`), so neither the attention
module nor these classes branch on what they were handed. The Triton modules are imported when the
model is built: torch.compile does not trace importlib, and a forward only calls what is stored.
"""
import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinytlm.common import UserError
from tinytlm.members import linear, member_counts
from tinytlm.unpad import pack, unpack

KERNELS = ("torch", "triton")
HEADS = ("plain", "chunked")
DROPOUTS = ("torch", "fast")


def default_head(device) -> str:
    """The MLM head a run on `device` uses: chunked where it measured faster (the CPU), else the reference."""
    return "chunked" if torch.device(device).type == "cpu" else "plain"


def default_unpad(device) -> bool:
    """Whether --unpad auto packs the real tokens on `device`: on a CPU, where the padding is time spent for
    nothing (AG News rows 41% real tokens: a `tiny` fine-tuning step 1.27x, Wikipedia 68%: 1.08x, bf16, batch
    32; docs/scaling.md); not elsewhere, where it has not been measured (the GPU session measures it)."""
    return torch.device(device).type == "cpu"


def default_attn_blocks(device) -> int:
    """How many length blocks the torch attention on packed tokens uses on `device` (tinytlm/unpad.py length_blocks):
    up to 4 on the CPU, where SDPA pays for the (B, T) padding (bf16, batch 32, `tiny`: an AG News fine-tuning
    step 1.42x, a Wikipedia MLM step 1.07x over one (B, T) layout; docs/scaling.md); 1 elsewhere (not measured)."""
    return 4 if torch.device(device).type == "cpu" else 1


def default_dropout(device) -> str:
    """The dropout a run on `device` uses: fast where it measured faster (the CPU), else the reference."""
    return "fast" if torch.device(device).type == "cpu" else "torch"


def kernel_module(name: str):
    """kernels/<name>.py (Triton is optional, so imported on demand): the checkout's top-level `kernels`
    package, or `tinytlm.kernels` where tinytlm is installed (setup.py puts kernels/ there)."""
    try:
        return importlib.import_module(f"kernels.{name}")
    except ModuleNotFoundError:
        return importlib.import_module(f"tinytlm.kernels.{name}")


@dataclass(frozen=True)
class Impl:
    """The implementations a model runs (frozen: chosen once, when the model is built)."""
    kernels: str = "torch"  # attention and conv stem: "torch" (reference) or "triton" (kernels/)
    unpad: bool = False  # the encoder runs on the packed real tokens (tinytlm/unpad.py), not the padding
    head: str = "plain"  # MLM decoder + cross-entropy: "plain" (full logits, the reference) or "chunked"
    head_chunk: int = 1024  # rows of logits the chunked head holds at once (at most; bench/mlm_head.py)
    dropout: str = "torch"  # every dropout: "torch" (nn.Dropout, SDPA's dropout_p: the reference) or "fast"
    attn_blocks: int = 1  # packed + torch attention: sequences in at most this many length blocks (1: (B, T))

    def __post_init__(self):
        if self.kernels not in KERNELS:
            raise UserError(f"--kernels {self.kernels!r}: choose {' or '.join(KERNELS)}")
        if self.kernels == "triton" and importlib.util.find_spec("triton") is None:
            raise UserError("--kernels triton needs the triton package; use --kernels torch")
        if type(self.unpad) is not bool:
            raise UserError(f"--unpad {self.unpad!r}: expected true or false")
        if self.head not in HEADS or type(self.head_chunk) is not int or self.head_chunk < 1:
            raise UserError(f"MLM head {self.head!r} (chunk {self.head_chunk!r}): choose {' or '.join(HEADS)}, "
                            "chunk >= 1")
        if self.dropout not in DROPOUTS:
            raise UserError(f"dropout implementation {self.dropout!r}: choose {' or '.join(DROPOUTS)}")
        if type(self.attn_blocks) is not int or self.attn_blocks < 1:
            raise UserError(f"attention length blocks {self.attn_blocks!r}: expected an integer >= 1")

    def check_device(self, device):
        """Triton kernels run on CUDA, or on the CPU under the (slow) interpreter only."""
        if self.kernels == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError("--kernels triton needs a CUDA device (or TRITON_INTERPRET=1 for the slow CPU interpreter)")

    def attention(self):
        """The attention implementation every SelfAttention of the model calls."""
        if self.kernels == "triton":
            return TritonAttention()  # its own dropout on the probabilities, whatever self.dropout
        return TorchAttention(kernel_module("dropout").dropout if self.dropout == "fast" else None)

    def dropout_layer(self, p: float) -> nn.Module:
        """A dropout module of probability p: nn.Dropout, or FastDropout (kernels/dropout.py)."""
        return FastDropout(p) if self.dropout == "fast" else nn.Dropout(p)

    def conv_stem_kernels(self):
        """kernels/conv_stem.py for the Triton stem, or None for the torch reference."""
        return kernel_module("conv_stem") if self.kernels == "triton" else None

    def mlm_head(self):
        """The MLM decoder + cross-entropy MLMHead calls with targets: PlainHead or ChunkedHead."""
        return ChunkedHead(self.head_chunk) if self.head == "chunked" else PlainHead()


class FastDropout(nn.Module):
    """nn.Dropout's drop-in on kernels/dropout.py (no weights: the model's state_dict keys are unchanged)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._dropout = kernel_module("dropout").dropout

    def forward(self, x):
        return self._dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PlainHead:
    """The reference: the full logits (N, V), then member_counts' F.cross_entropy and argmax."""

    def counts(self, x, weight, bias, targets, members: int):
        # x (K*N, H) member-major; weight (V, H) or (K, V, H); bias (V,) or (K, V); targets (K*N,) -> (K, 3)
        return member_counts(linear(x, weight, bias), targets, members)


class ChunkedHead:
    """kernels/linear_ce.py: the same (K, 3) counts, `chunk` rows of logits at a time."""

    def __init__(self, chunk: int):
        self.chunk = chunk
        self._lce = kernel_module("linear_ce").linear_cross_entropy

    def counts(self, x, weight, bias, targets, members: int):
        xk, tk = x.reshape(members, -1, x.size(-1)), targets.reshape(members, -1)  # (K, N, H), (K, N)
        loss, correct, count = self._lce(xk, weight, bias, tk, self.chunk)
        return torch.stack([loss, correct.float(), count.float()], 1)  # (K, 3)


def _heads(qkv, n_head):
    """(B, T, 3H) fused projections -> q, k, v (B, nh, T, D)."""
    B, T, _ = qkv.shape
    q, k, v = qkv.view(B, T, 3, n_head, -1).unbind(2)  # 3 x (B, T, nh, D)
    return (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, D)


def _merge(y):
    """(B, nh, T, D) -> (B, T, H)."""
    B, _, T, _ = y.shape
    return y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H)


def math_attention(q, k, v, mask, p, dropout):
    """SDPA's math path (ATen's _scaled_dot_product_attention_math), written out so that `dropout` (a
    function (x, p) -> x dropped, e.g. kernels/dropout.py's) drops the probabilities. q, k, v (B, nh, T, D);
    mask (B, 1, 1, T) bool, True = may be attended to -> (B, nh, T, D) in q's dtype. As the math path: fp16 and
    bf16 inputs computed in fp32 (autocast off inside), q and k each scaled by D^-1/4, a False key's score
    -inf, a row with no key gets probabilities 0 (_safe_softmax), the dropout on the fp32 probabilities."""
    dtype = q.dtype
    with torch.autocast(q.device.type, enabled=False):
        if dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        s = q.size(-1) ** -0.25
        scores = (q * s) @ (k * s).transpose(-2, -1)  # (B, nh, T, T)
        scores = scores.masked_fill(~mask, float("-inf"))  # SDPA adds 0 / -inf for a boolean mask
        probs = torch.ops.aten._safe_softmax(scores, -1)  # (B, nh, T, T), 0 on a row with no key (traceable)
        return (dropout(probs, p) @ v).to(dtype)  # (B, nh, T, D)


class TorchAttention:
    """The reference: F.scaled_dot_product_attention on the padded layout (any device). Given a dropout
    function (Impl.dropout "fast"), a training call with p > 0 runs math_attention with it instead."""

    def __init__(self, dropout=None):
        self._dropout = dropout

    def padded(self, qkv, key_mask, n_head, p):
        # qkv (B, T, 3H), key_mask (B, T) bool, True = a real token that may be attended to -> (B, T, H)
        q, k, v = _heads(qkv, n_head)
        mask = key_mask[:, None, None, :]  # (B, 1, 1, T), broadcast over heads and queries
        if p > 0 and self._dropout is not None:
            return _merge(math_attention(q, k, v, mask, p, self._dropout))
        return _merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p))

    def packed(self, qkv, packing, n_head, p):
        # qkv (K*N, 3H): SDPA on a padded layout, packed again; the fillers' output is 0 -> (K*N, H)
        if packing.blocks is not None and not torch.compiler.is_compiling():  # compiled: one static layout
            return self.length_blocks(qkv, packing.blocks, n_head, p)
        y = pack(self.padded(unpack(qkv, packing), packing.key_mask, n_head, p), packing)
        return torch.where(packing.valid[:, None], y, 0.0)

    def length_blocks(self, qkv, blocks, n_head, p):
        # qkv (K*N, 3H) -> (K*N, H): per length block (tinytlm.unpad.LengthBlocks) the padded attention on
        # (n_g, L_g), its slots concatenated with a zero row for the fillers, then each packed row's own
        ys = [self.padded(qkv.index_select(0, gather).view(*key_mask.shape, -1), key_mask, n_head, p).flatten(0, 1)
              for gather, key_mask in blocks.blocks]  # (n_g * L_g, H) each
        return torch.cat([*ys, qkv.new_zeros(1, qkv.size(1) // 3)]).index_select(0, blocks.back)


class TritonAttention:
    """kernels/attention.py on the padded layout, kernels/attention_varlen.py on the packed one."""

    def __init__(self):
        self._attention = kernel_module("attention").attention
        self._varlen = kernel_module("attention_varlen").attention_varlen

    def padded(self, qkv, key_mask, n_head, p):
        # seed None: a fresh dropout seed drawn on qkv's device from its torch generator per call
        return _merge(self._attention(*_heads(qkv, n_head), key_mask, p))  # (B, T, H)

    def packed(self, qkv, packing, n_head, p):
        q, k, v = qkv.view(qkv.size(0), 3, n_head, -1).unbind(1)  # 3 x (K*N, nh, D)
        y = self._varlen(q, k, v, packing.seq_start, packing.seq_len, packing.T, p)  # (K*N, nh, D)
        return y.flatten(1)  # (K*N, H)
