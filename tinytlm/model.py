"""BERT for tiny-scale pre-training: the paper's BERT-N, optional conv stem, MLM and classifier heads.

The trunk follows Hugging Face BertModel (post-LN, exact GELU, learned absolute positions,
token-type embeddings), so a checkpoint maps onto HF keys with the table in `tinytlm/hf.py`.
BERT-1 variants of the paper (Table 8) put a small conv stem between the embeddings and the
encoder: the (B, T, H) embedding output is treated as a one-channel (T x H) image.

    cfg = BertConfig.preset("tiny")
    model = BertForMLM(cfg)
    logits, loss = model(idx, attention_mask, targets)   # sparse head: logits (N_sel, V)

Every module takes `members` (default 1): K > 1 builds K independent models of this shape as one
stacked model (weights with a leading member dimension, the members folded into the batch, see
tinytlm/members.py). Read the code with K = 1 and it is plain BERT.
Unpadded (`model.unpad = True`, or `unpad=True` per call): the trunk runs on the packed real tokens
(K*N, H) instead of (B, T, H), attention per sequence; the same results, see tinytlm/unpad.py.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinytlm.common import UserError
from tinytlm.kernel_path import kernel_module
from tinytlm.members import Embedding, LayerNorm, Linear, linear, member_loss
from tinytlm.stem import ConvStem, fold_bn  # noqa: F401 (fold_bn: part of the model API)
from tinytlm.unpad import Packing, mlm_positions, mlm_targets, pack, pack_plan, unpack  # noqa: F401 (mlm_: model API)

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
                raise UserError(f"model config {f.name}={v!r}: expected {want.__name__}")
        if len(self.conv_kernel) != 2 or any(type(k) is not int or k < 1 for k in self.conv_kernel):
            raise UserError(f"model config conv_kernel={self.conv_kernel!r}: expected (kh, kw) positive ints")
        for name in ("n_layer", "n_head", "head_dim", "ffn_mult", "max_pos", "vocab_size", "type_vocab",
                     "conv_channels"):
            if getattr(self, name) < 1:
                raise UserError(f"model config {name}={getattr(self, name)} (--{name}): must be >= 1")
        if self.n_conv < 0 or not 0 <= self.pad_id < self.vocab_size:
            bad = "n_conv" if self.n_conv < 0 else "pad_id"
            raise UserError(f"model config {bad}={getattr(self, bad)} (--{bad}): out of range")
        for name in ("dropout", "attn_dropout"):  # `not 0 <= v < 1` is also true for nan
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"model config {name}={getattr(self, name)} (--{name}): must be in [0, 1)")
        for name in ("ln_eps", "init_std"):
            if not 0.0 < getattr(self, name) < float("inf"):
                raise UserError(f"model config {name}={getattr(self, name)} (--{name}): must be positive and finite")

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

    def __init__(self, cfg: BertConfig, members=1):
        super().__init__()
        # padding_idx = [PAD] = 0; the reference code passed pad_token_id=101 and froze [CLS] instead.
        self.word = Embedding(cfg.vocab_size, cfg.hidden, padding_idx=cfg.pad_id, members=members)
        self.pos = Embedding(cfg.max_pos, cfg.hidden, members=members)
        self.token_type = Embedding(cfg.type_vocab, cfg.hidden, members=members)
        self.ln = LayerNorm(cfg.hidden, eps=cfg.ln_eps, members=members)
        self.drop = nn.Dropout(cfg.dropout)
        self.members = members

    def forward(self, idx, token_type_ids, pos=None):
        # idx (B, T), or packed tokens (K*N,) with their positions pos (K*N,)
        if pos is None:
            pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
            if self.members > 1:
                pos = pos.expand_as(idx)  # (K*B, T): each member reads its own position table
        x = self.word(idx) + self.token_type(token_type_ids) + self.pos(pos)  # (B, T, H) or (K*N, H)
        return self.drop(self.ln(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key-padding mask; q, k, v from one fused Linear(H, 3H)."""

    def __init__(self, cfg: BertConfig, members=1):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = Linear(cfg.hidden, 3 * cfg.hidden, members)  # rows: [query; key; value]
        self.proj = Linear(cfg.hidden, cfg.hidden, members)
        self.attn_dropout = cfg.attn_dropout
        self.kernels = "torch"  # "torch" (reference, any device) or "triton"; see set_kernels

    def forward(self, x, mask):
        # x (B, T, H) and mask (B, T) bool, True = real token that may be attended to; or packed
        # tokens x (K*N, H) and their tinytlm.unpad.Packing: attention per sequence, fillers get 0
        p = self.attn_dropout if self.training else 0.0
        qkv = self.qkv(x)  # (B, T, 3H) or (K*N, 3H)
        if not isinstance(mask, Packing):
            return self.proj(self._padded(qkv, mask, p))
        if self.kernels == "triton":
            q, k, v = qkv.view(-1, 3, self.n_head, self.head_dim).unbind(1)  # 3 x (K*N, nh, D)
            y = kernel_module("attention_varlen").attention_varlen(q, k, v, mask.seq_start, mask.seq_len, mask.T, p)
            return self.proj(y.flatten(1))  # (K*N, H)
        y = pack(self._padded(unpack(qkv, mask), mask.real.view(-1, mask.T), p), mask)  # torch: SDPA, padded
        return self.proj(torch.where(mask.valid[:, None], y, 0.0))  # (K*N, H)

    def _padded(self, qkv, key_padding_mask, p):
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # 3 x (B, T, nh, D)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, D)
        if self.kernels == "triton":
            # seed None: a fresh dropout seed drawn on x's device from its torch generator per call
            y = kernel_module("attention").attention(q, k, v, key_padding_mask, p)
        else:
            mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, T), broadcast over heads and queries
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H)


class MLP(nn.Module):
    def __init__(self, cfg: BertConfig, members=1):
        super().__init__()
        self.fc = Linear(cfg.hidden, cfg.ffn_mult * cfg.hidden, members)
        self.proj = Linear(cfg.ffn_mult * cfg.hidden, cfg.hidden, members)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))  # exact erf GELU, HF hidden_act="gelu"


class Block(nn.Module):
    """Post-LN transformer block, as BERT: LayerNorm after each residual sum."""

    def __init__(self, cfg: BertConfig, members=1):
        super().__init__()
        self.attn = SelfAttention(cfg, members)
        self.ln1 = LayerNorm(cfg.hidden, eps=cfg.ln_eps, members=members)
        self.mlp = MLP(cfg, members)
        self.ln2 = LayerNorm(cfg.hidden, eps=cfg.ln_eps, members=members)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask):  # mask: (B, T) key-padding mask, or the Packing of packed x (K*N, H)
        x = self.ln1(x + self.drop(self.attn(x, mask)))
        x = self.ln2(x + self.drop(self.mlp(x)))
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: BertConfig, members=1):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, members) for _ in range(cfg.n_layer))

    def forward(self, x, mask):
        for block in self.blocks:
            x = block(x, mask)
        return x


class MLMHead(nn.Module):
    """dense + GELU + LayerNorm, then a decoder tied to the word embeddings plus its own bias."""

    def __init__(self, cfg: BertConfig, members=1):
        super().__init__()
        self.dense = Linear(cfg.hidden, cfg.hidden, members)
        self.ln = LayerNorm(cfg.hidden, eps=cfg.ln_eps, members=members)
        self.bias = nn.Parameter(torch.zeros(members, cfg.vocab_size) if members > 1 else torch.zeros(cfg.vocab_size))

    def forward(self, h, word_weight):
        # h (..., H); word_weight (V, H) is passed in, so the tie is one parameter and one state_dict key
        return linear(self.ln(F.gelu(self.dense(h))), word_weight, self.bias)  # (..., V)


class ClassifierHead(nn.Module):
    """Pooler (dense + tanh on the [CLS] position 0), dropout, linear to the labels."""

    def __init__(self, cfg: BertConfig, n_labels: int, members=1):
        super().__init__()
        self.pooler = Linear(cfg.hidden, cfg.hidden, members)
        self.drop = nn.Dropout(cfg.dropout)
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
    """The shared trunk: embeddings, optional conv stem, encoder. Returns hidden states (B, T, H)."""

    def __init__(self, cfg: BertConfig, members=1):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg, members)
        self.stem = ConvStem(cfg, members) if cfg.n_conv > 0 else None
        self.encoder = Encoder(cfg, members)

    def forward(self, idx, attention_mask=None, token_type_ids=None, packing=None):
        """idx (B, T) token ids; attention_mask (B, T) 1/True = real token (default: idx != pad_id).
        packing: a tinytlm.unpad.Packing of attention_mask: the packed hidden states (K*N, H) instead."""
        if attention_mask is None:
            attention_mask = idx != self.config.pad_id
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(idx)
        p = packing
        if p is not None and self.stem is None:  # the real tokens only, each at its position in its sequence
            return self.encoder(self.embeddings(pack(idx, p), pack(token_type_ids, p), pos=p.positions()), p)
        x = self.embeddings(idx, token_type_ids)  # (B, T, H)
        if self.stem is not None:  # on the padded (T x H) image, padding included, as the paper defines it
            x = self.stem(x)
        return self.encoder(x, attention_mask.bool()) if p is None else self.encoder(pack(x, p), p)  # (K*N, H)


class _Pretrained(nn.Module):
    unpad = False  # run on the packed real tokens (tinytlm/unpad.py); a forward's unpad= overrides it

    def _init(self):
        self.apply(lambda m: _init_weights(m, self.config.init_std))

    def _packing(self, idx, attention_mask, unpad):
        """The batch's Packing when unpadded (unpad: None = self.unpad, a bool, or a ready Packing), else None."""
        unpad = self.unpad if unpad is None else unpad
        if isinstance(unpad, Packing) or not unpad:
            return unpad or None
        return pack_plan(idx != self.config.pad_id if attention_mask is None else attention_mask, self.members)

    def num_params(self) -> int:
        """Parameter count (of one member); a tied weight is one parameter and counted once."""
        return sum(p.numel() for p in self.parameters()) // self.members

    def loss(self, logits, targets):
        """Mean cross-entropy over targets != -100; K members: each member's mean, shape (K,)."""
        if self.members == 1:
            return F.cross_entropy(logits, targets, ignore_index=-100)
        return member_loss(F.cross_entropy(logits, targets, ignore_index=-100, reduction="none"), targets,
                           self.members)


class BertForMLM(_Pretrained):
    def __init__(self, cfg: BertConfig, members=1):
        super().__init__()
        self.config, self.members = cfg, members
        self.bert = BertModel(cfg, members)
        self.head = MLMHead(cfg, members)
        self._init()

    def with_members(self, k: int):
        """A new model of this shape with k members (the stacking helpers build it on the meta device)."""
        return BertForMLM(self.config, members=k)

    def forward(self, idx, attention_mask=None, targets=None, token_type_ids=None, sparse=True, per_row=0,
                unpad=None):
        """targets (B, T): original id at the chosen positions, -100 elsewhere (HF convention).

        Without targets: logits (B, T, V), loss None. With targets and sparse=True (default): the
        head runs only on the chosen positions, logits (N, V) aligned with mlm_targets(targets,
        per_row), loss = the mean cross-entropy over the chosen positions. per_row=0: N = number
        chosen (a dynamic shape); per_row=k: N = B*k (a static shape, see mlm_positions).
        sparse=False: the dense head over all positions, logits (B, T, V), the same loss.
        K members: B = K*B' rows, member-major; the loss is the members' mean losses, shape (K,).
        unpad (default self.unpad): the trunk runs on the packed real tokens; the same outputs, except
        logits at padding (the head reads hidden states 0 there).
        """
        p = self._packing(idx, attention_mask, unpad)
        h = self.bert(idx, attention_mask, token_type_ids, packing=p)  # (B, T, H), or packed (K*N, H)
        if p is not None:
            h = unpack(h, p)  # (B, T, H): one gather; the sparse head reads real (chosen) positions only
        word_weight = self.bert.embeddings.word.weight
        if targets is None:
            return self.head(h, word_weight), None
        if sparse:
            pos = mlm_positions(targets, per_row, self.members)
            if per_row:
                h = h.gather(1, pos[..., None].expand(-1, -1, h.size(-1)))  # (B, k, H)
                logits = self.head(h.reshape(-1, h.size(-1)), word_weight)  # (B*k, V)
            elif self.members > 1:  # pos (K, N): N slots in every member
                h = h.view(self.members, -1, h.size(-1)).gather(1, pos[..., None].expand(-1, -1, h.size(-1)))
                logits = self.head(h.view(-1, h.size(-1)), word_weight)  # (K*N, V)
            else:
                logits = self.head(h[pos], word_weight)  # (N_sel, V); boolean indexing syncs once
            return logits, self.loss(logits, mlm_targets(targets, per_row, pos, self.members))
        logits = self.head(h, word_weight)  # (B, T, V)
        return logits, self.loss(logits.view(-1, logits.size(-1)), targets.view(-1))  # (B*T, V)


class BertForClassification(_Pretrained):
    def __init__(self, cfg: BertConfig, n_labels: int, members=1):
        super().__init__()
        self.config, self.members = cfg, members
        self.n_labels = n_labels
        self.bert = BertModel(cfg, members)
        self.head = ClassifierHead(cfg, n_labels, members)
        self._init()

    def with_members(self, k: int):
        """A new model of this shape with k members (the stacking helpers build it on the meta device)."""
        return BertForClassification(self.config, self.n_labels, members=k)

    def forward(self, idx, attention_mask=None, targets=None, token_type_ids=None, unpad=None):
        """targets (B,) label indices. Returns logits (B, n_labels) and the mean cross-entropy or None
        (K members: B = K*B' rows, member-major, and the members' mean losses (K,)). unpad (default
        self.unpad): the trunk runs on the packed real tokens ([CLS], read at position 0, must be one)."""
        p = self._packing(idx, attention_mask, unpad)
        h = self.bert(idx, attention_mask, token_type_ids, packing=p)  # (B, T, H), or packed (K*N, H)
        logits = self.head(h if p is None else unpack(h, p))  # (B, n_labels)
        return logits, self.loss(logits, targets) if targets is not None else None
