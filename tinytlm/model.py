"""BERT for tiny-scale pre-training: the paper's BERT-N, optional conv stem, MLM and classifier heads.

The trunk follows Hugging Face BertModel (post-LN, exact GELU, learned absolute positions,
token-type embeddings), so a checkpoint maps onto HF keys with the table in `tinytlm/hf.py`.
BERT-1 variants of the paper (Table 8) put a small conv stem between the embeddings and the
encoder: the (B, T, H) embedding output is treated as a one-channel (T x H) image.

    cfg = BertConfig.preset("tiny")
    model = BertForMLM(cfg)                         # impl=Impl(kernels="triton", unpad=True) for the fast paths
    logits, _ = model(idx, attention_mask)          # the head on every position: logits (B, T, V)
    rows, y = mlm_rows(targets)                     # tinytlm/mlm_rows.py: the chosen positions
    counts, loss = model(idx, attention_mask, y, rows=rows)   # the sparse head's counts (K, 3), the MLM loss

Given targets, a model returns no logits but `counts` (K, 3) per member: [cross-entropy summed over its
targets != -100, correct argmax predictions, number of targets] (only the sums carry a gradient) and the
loss, each member's mean (a scalar for one model). The MLM head's decoder + cross-entropy is then the
implementation chosen when the model is built (Impl.head): the plain full logits or kernels/linear_ce.py's
chunks of at most Impl.head_chunk rows of the N x 30,522 logits.

Every module takes `members` (default 1): K > 1 builds K independent models of this shape as one
stacked model (weights with a leading member dimension, the members folded into the batch, see
tinytlm/members.py). Read the code with K = 1 and it is plain BERT.
Implementations are chosen when a model is built (tinytlm/kernel_path.py's `Impl`) and passed down:
the attention and conv stem kernels (torch reference or Triton), the dropout (nn.Dropout and SDPA's, or
kernels/dropout.py's everywhere), and unpad: the encoder runs on the packed
real tokens (K*N, H) instead of (B, T, H), attention per sequence; the same results (tinytlm/unpad.py).
Every forward has one path: the encoder runs in the batch's token layout (`Padded` or `Packing`), whose
methods the attention calls, and the trunk returns (B, T, H) either way.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinytlm.common import UserError
from tinytlm.kernel_path import Impl
from tinytlm.members import Embedding, LayerNorm, Linear, linear, member_counts, member_means
from tinytlm.stem import ConvStem, fold_bn  # noqa: F401 (fold_bn: part of the model API)
from tinytlm.unpad import layout

@dataclass
class BertConfig:
    n_layer: int = 6  # transformer blocks
    n_head: int = 12  # attention heads; hidden size = n_head * head_dim
    head_dim: int = 64  # width of one head (the paper keeps 64 and scales heads)
    ffn_mult: int = 4  # MLP inner width = ffn_mult * hidden
    max_pos: int = 128  # learned absolute positions (every text is padded to 128)
    vocab_size: int = 30522  # bert-base-uncased WordPiece ids
    type_vocab: int = 2  # token-type (segment) ids
    dropout: float = 0.1  # dropout on embeddings and on each residual branch
    attn_dropout: float = 0.1  # dropout on the attention probabilities
    ln_eps: float = 1e-12  # LayerNorm epsilon (HF BERT default)
    init_std: float = 0.02  # std of the normal init of Linear and Embedding weights
    pad_id: int = 0  # [PAD]: zero embedding row, masked out as an attention key
    n_conv: int = 0  # conv layers in the stem before the encoder; 0 = no stem
    conv_channels: int = 64  # channels d of every conv layer of the stem
    conv_kernel: tuple = (3, 3)  # stem kernel (kh over tokens, kw over hidden units)

    def __post_init__(self):
        if isinstance(self.conv_kernel, list):
            self.conv_kernel = tuple(self.conv_kernel)  # a list after a JSON round trip
        for f in dataclasses.fields(self):  # wrong types are errors, never silently used
            v, want = getattr(self, f.name), type(f.default)
            if want is float and type(v) is int:
                setattr(self, f.name, float(v))
            elif type(v) is not want:
                raise UserError(f"model config {f.name}={v!r} (--arch {f.name}): expected {want.__name__}")
        if len(self.conv_kernel) != 2 or any(type(k) is not int or k < 1 for k in self.conv_kernel):
            raise UserError(f"model config conv_kernel={self.conv_kernel!r} (--arch conv_kernel): expected (kh, kw) "
                            "positive ints")
        for name in ("n_layer", "n_head", "head_dim", "ffn_mult", "max_pos", "vocab_size", "type_vocab",
                     "conv_channels"):
            if getattr(self, name) < 1:
                raise UserError(f"model config {name}={getattr(self, name)} (--arch {name}=...): must be >= 1")
        if self.n_conv < 0 or not 0 <= self.pad_id < self.vocab_size:
            bad = "n_conv" if self.n_conv < 0 else "pad_id"
            raise UserError(f"model config {bad}={getattr(self, bad)} (--arch {bad}=...): out of range")
        for name in ("dropout", "attn_dropout"):  # `not 0 <= v < 1` is also true for nan
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"model config {name}={getattr(self, name)} (--arch {name}=...): must be in [0, 1)")
        for name in ("ln_eps", "init_std"):
            if not 0.0 < getattr(self, name) < float("inf"):
                raise UserError(f"model config {name}={getattr(self, name)} (--arch {name}=...): "
                                "must be positive and finite")

    @property
    def hidden(self) -> int:
        return self.n_head * self.head_dim

    @property
    def latency_layers(self) -> int:
        """The paper's latency in sequential layers: 4 per transformer block, 1 per conv layer, plus 1.

        The paper counts BERT-6 as 6 x 4 + 1 = 25 and BERT-1 with 2 conv layers as 4 + 3 = 7; one
        formula fits both: 4 * n_layer + n_conv + 1. The paper does not itemise the 4 or the +1; we read
        the +1 as the output layer (with a stem it could equally be the 1x1 projection: same total).
        """
        return 4 * self.n_layer + self.n_conv + 1

    @classmethod
    def presets(cls) -> list:
        return list(_PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides) -> "BertConfig":
        if name not in _PRESETS:
            raise UserError(f"unknown model preset {name!r}; valid: {', '.join(_PRESETS)}")
        return cls.from_dict({**_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise UserError(f"unknown model config key(s) {', '.join(unknown)}; valid: {', '.join(fields)}")
        return cls(**d)


# Table 8 names: cl<conv layers>-d<channels>-<kh>x<kw>-h<heads>; Table 9 adds the 1-conv-layer member.
_PRESETS = {
    "bert6": dict(n_layer=6, n_head=12),
    "bert1": dict(n_layer=1, n_head=12),
    "tiny": dict(n_layer=2, n_head=2),  # hidden 128: CPU smoke runs and tests
    "bert1-cl2-d64-3x3-h8": dict(n_layer=1, n_head=8, n_conv=2, conv_channels=64, conv_kernel=(3, 3)),
    "bert1-cl2-d64-3x3-h12": dict(n_layer=1, n_head=12, n_conv=2, conv_channels=64, conv_kernel=(3, 3)),
    "bert1-h24": dict(n_layer=1, n_head=24),
    "bert1-cl2-d64-16x3-h12": dict(n_layer=1, n_head=12, n_conv=2, conv_channels=64, conv_kernel=(16, 3)),
    "bert1-cl3-d32-3x3-h12": dict(n_layer=1, n_head=12, n_conv=3, conv_channels=32, conv_kernel=(3, 3)),
    "bert1-cl1-d64-3x3-h12": dict(n_layer=1, n_head=12, n_conv=1, conv_channels=64, conv_kernel=(3, 3)),
}


# --- modules ---

class Embeddings(nn.Module):
    """word + position + token type, then LayerNorm and dropout (as HF BertEmbeddings)."""

    def __init__(self, cfg: BertConfig, members=1, impl=Impl()):
        super().__init__()
        # padding_idx = [PAD] = 0; the reference code passed pad_token_id=101 and froze [CLS] instead.
        self.word = Embedding(cfg.vocab_size, cfg.hidden, padding_idx=cfg.pad_id, members=members)
        self.pos = Embedding(cfg.max_pos, cfg.hidden, members=members)
        self.token_type = Embedding(cfg.type_vocab, cfg.hidden, members=members)
        self.ln = LayerNorm(cfg.hidden, eps=cfg.ln_eps, members=members)
        self.drop = impl.dropout_layer(cfg.dropout)  # nn.Dropout or kernels/dropout.py (Impl.dropout)
        self.members = members

    def forward(self, idx, token_type_ids):
        # idx (B, T)
        pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
        if self.members > 1:
            pos = pos.expand_as(idx)  # (K*B, T): each member reads its own position table
        x = self.word(idx) + self.token_type(token_type_ids) + self.pos(pos)  # (B, T, H)
        return self.drop(self.ln(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the real tokens of each sequence; q, k, v from one fused Linear(H, 3H)."""

    def __init__(self, cfg: BertConfig, members=1, impl=Impl()):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = Linear(cfg.hidden, 3 * cfg.hidden, members)  # rows: [query; key; value]
        self.proj = Linear(cfg.hidden, cfg.hidden, members)
        self.attn_dropout = cfg.attn_dropout
        self.attention = impl.attention()  # SDPA (the reference), its math with fast dropout, or Triton

    def forward(self, x, tokens):
        # x (B, T, H) padded or (K*N, H) packed, and its layout (tinytlm.unpad.Padded or Packing): who
        # attends to whom (a sequence's real tokens); packed fillers get 0
        p = self.attn_dropout if self.training else 0.0
        return self.proj(tokens.attend(self.attention, self.qkv(x), self.n_head, p))  # as x


class MLP(nn.Module):
    def __init__(self, cfg: BertConfig, members=1):
        super().__init__()
        self.fc = Linear(cfg.hidden, cfg.ffn_mult * cfg.hidden, members)
        self.proj = Linear(cfg.ffn_mult * cfg.hidden, cfg.hidden, members)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))  # exact erf GELU, HF hidden_act="gelu"


class Block(nn.Module):
    """Post-LN transformer block, as BERT: LayerNorm after each residual sum."""

    def __init__(self, cfg: BertConfig, members=1, impl=Impl()):
        super().__init__()
        self.attn = SelfAttention(cfg, members, impl)
        self.ln1 = LayerNorm(cfg.hidden, eps=cfg.ln_eps, members=members)
        self.mlp = MLP(cfg, members)
        self.ln2 = LayerNorm(cfg.hidden, eps=cfg.ln_eps, members=members)
        self.drop = impl.dropout_layer(cfg.dropout)

    def forward(self, x, tokens):  # tokens: the layout of x, tinytlm.unpad.Padded or Packing
        x = self.ln1(x + self.drop(self.attn(x, tokens)))
        x = self.ln2(x + self.drop(self.mlp(x)))
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: BertConfig, members=1, impl=Impl()):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, members, impl) for _ in range(cfg.n_layer))

    def forward(self, x, tokens):
        for block in self.blocks:
            x = block(x, tokens)
        return x


class MLMHead(nn.Module):
    """dense + GELU + LayerNorm, then a decoder tied to the word embeddings plus its own bias; given targets,
    the decoder and the cross-entropy run as impl.head chooses (tinytlm/kernel_path.py)."""

    def __init__(self, cfg: BertConfig, members=1, impl=Impl()):
        super().__init__()
        self.dense = Linear(cfg.hidden, cfg.hidden, members)
        self.ln = LayerNorm(cfg.hidden, eps=cfg.ln_eps, members=members)
        self.bias = nn.Parameter(torch.zeros(members, cfg.vocab_size) if members > 1 else torch.zeros(cfg.vocab_size))
        self.decode, self.members = impl.mlm_head(), members

    def transform(self, h):
        """dense + GELU + LayerNorm: what the decoder reads, (..., H)."""
        return self.ln(F.gelu(self.dense(h)))

    def forward(self, h, word_weight):
        # h (..., H); word_weight (V, H) is passed in, so the tie is one parameter and one state_dict key
        return linear(self.transform(h), word_weight, self.bias)  # (..., V)

    def counts(self, h, word_weight, targets):
        """h (K*N, H) member-major, targets (K*N,) -> (K, 3) per member: loss sum, correct, count."""
        return self.decode.counts(self.transform(h), word_weight, self.bias, targets, self.members)


class ClassifierHead(nn.Module):
    """Pooler (dense + tanh on the [CLS] position 0), dropout, linear to the labels."""

    def __init__(self, cfg: BertConfig, n_labels: int, members=1, impl=Impl()):
        super().__init__()
        self.pooler = Linear(cfg.hidden, cfg.hidden, members)
        self.drop = impl.dropout_layer(cfg.dropout)
        self.out = Linear(cfg.hidden, n_labels, members)

    def forward(self, h):
        pooled = torch.tanh(self.pooler(h[:, 0]))  # (B, H)
        return self.out(self.drop(pooled))  # (B, n_labels)


# --- models ---

def _init_weights(module, std):
    """HF BERT init: normal(0, std) for Linear and Embedding, zero biases and padding row, LN = identity.

    Conv and BatchNorm layers of the stem keep PyTorch's defaults, as in the reference code.
    """
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, 0.0, std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[..., module.padding_idx, :].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class BertModel(nn.Module):
    """The shared trunk: embeddings, optional conv stem, encoder. Returns hidden states (B, T, H).

    The embeddings and the stem run on the padded batch (the stem convolves the padded (T x H) image,
    padding included, as the paper defines it); the encoder runs in the batch's layout: the padded rows,
    or (unpad) the packed real tokens, put back in the padded layout at the end (0 at padding)."""

    def __init__(self, cfg: BertConfig, members=1, impl=Impl()):
        super().__init__()
        self.config, self.members, self.unpad, self.blocks = cfg, members, impl.unpad, impl.attn_blocks
        self.embeddings = Embeddings(cfg, members, impl)
        self.stem = ConvStem(cfg, members, impl) if cfg.n_conv > 0 else nn.Identity()  # no weights, no keys
        self.encoder = Encoder(cfg, members, impl)

    def forward(self, idx, attention_mask=None, token_type_ids=None):
        """idx (B, T) token ids; attention_mask (B, T) 1/True = real token (default: idx != pad_id)."""
        if attention_mask is None:
            attention_mask = idx != self.config.pad_id
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(idx)
        tokens = layout(attention_mask, self.members, self.unpad, self.blocks)  # tinytlm.unpad.Padded or Packing
        x = self.embeddings(idx, token_type_ids)  # (B, T, H)
        x = self.stem(x)  # (B, T, H)
        return tokens.padded(self.encoder(tokens.rows(x), tokens))  # (B, T, H)


class _Pretrained(nn.Module):
    def _init(self):
        self.apply(lambda m: _init_weights(m, self.config.init_std))

    def num_params(self) -> int:
        """Parameter count (of one member); a tied weight is one parameter and counted once."""
        return sum(p.numel() for p in self.parameters()) // self.members

    def counts_and_loss(self, counts):
        """(counts (K, 3), the members' mean losses: (K,), or a scalar for one model)."""
        return counts, member_means(counts, self.members)


class BertForMLM(_Pretrained):
    def __init__(self, cfg: BertConfig, members=1, impl=Impl()):
        super().__init__()
        self.config, self.members, self.impl = cfg, members, impl
        self.bert = BertModel(cfg, members, impl)
        self.head = MLMHead(cfg, members, impl)
        self._init()

    def with_members(self, k: int):
        """A new model of this shape with k members (the stacking helpers build it on the meta device)."""
        return BertForMLM(self.config, members=k, impl=self.impl)

    def forward(self, idx, attention_mask=None, targets=None, token_type_ids=None, rows=None):
        """rows (N,): the flat positions in (B*T) the head reads (the sparse head: tinytlm/mlm_rows.py
        chooses them); None: every position. Without targets: (logits (N, V) or (B, T, V), None). targets: the
        ids at those positions, -100 = ignored ((N,) with rows, (B, T) without): (counts (K, 3), loss), no
        logits (module docstring). K members: B = K*B' rows, member-major, rows N/K per member; the loss is the
        members' mean losses (K,). Unpadded, the logits at padding are the head's on hidden states 0."""
        h = self.bert(idx, attention_mask, token_type_ids)  # (B, T, H)
        h = h.reshape(-1, h.size(-1))  # (B*T, H)
        if rows is not None:
            h = h.index_select(0, rows)  # (N, H): the sparse head's rows
        word = self.bert.embeddings.word.weight
        if targets is None:
            logits = self.head(h, word)  # (N, V)
            return (logits if rows is not None else logits.view(*idx.shape, -1)), None
        return self.counts_and_loss(self.head.counts(h, word, targets.reshape(-1)))


class BertForClassification(_Pretrained):
    def __init__(self, cfg: BertConfig, n_labels: int, members=1, impl=Impl()):
        super().__init__()
        self.config, self.members, self.impl = cfg, members, impl
        self.n_labels = n_labels
        self.bert = BertModel(cfg, members, impl)
        self.head = ClassifierHead(cfg, n_labels, members, impl)
        self._init()

    def with_members(self, k: int):
        """A new model of this shape with k members (the stacking helpers build it on the meta device)."""
        return BertForClassification(self.config, self.n_labels, members=k, impl=self.impl)

    def forward(self, idx, attention_mask=None, targets=None, token_type_ids=None):
        """targets (B,) label indices. Returns (logits (B, n_labels), None), or given targets (counts (K, 3),
        the mean cross-entropy) as BertForMLM (K members: B = K*B' rows, member-major, the members' mean
        losses (K,)). Unpadded, [CLS] (read at position 0) must be a real token."""
        h = self.bert(idx, attention_mask, token_type_ids)  # (B, T, H)
        logits = self.head(h)  # (B, n_labels)
        return (logits, None) if targets is None else self.counts_and_loss(member_counts(logits, targets, self.members))
