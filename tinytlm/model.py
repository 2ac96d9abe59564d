"""BERT for tiny-scale pre-training: the paper's BERT-N, optional conv stem, MLM and classifier heads.

The trunk follows Hugging Face BertModel (post-LN, exact GELU, learned absolute positions,
token-type embeddings), so a checkpoint maps onto HF keys with the table in `tinytlm/hf.py`.
BERT-1 variants of the paper (Table 8) put a small conv stem between the embeddings and the
encoder: the (B, T, H) embedding output is treated as a one-channel (T x H) image.

    cfg = BertConfig.preset("tiny")
    model = BertForMLM(cfg)
    logits, loss = model(idx, attention_mask, targets)   # sparse head: logits (N_sel, V)
"""
import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinytlm.common import UserError
from tinytlm.kernel_path import kernel_module

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
        if len(self.conv_kernel) != 2 or any(type(k) is not int for k in self.conv_kernel):
            raise UserError(f"model config conv_kernel={self.conv_kernel!r}: expected (kh, kw) ints")

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

    def __init__(self, cfg: BertConfig):
        super().__init__()
        # padding_idx = [PAD] = 0; the reference code passed pad_token_id=101 and froze [CLS] instead.
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden, padding_idx=cfg.pad_id)
        self.pos = nn.Embedding(cfg.max_pos, cfg.hidden)
        self.token_type = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx, token_type_ids):
        pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
        x = self.word(idx) + self.token_type(token_type_ids) + self.pos(pos)  # (B, T, H)
        return self.drop(self.ln(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key-padding mask; q, k, v from one fused Linear(H, 3H)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)  # rows: [query; key; value]
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_dropout = cfg.attn_dropout
        self.kernels = "torch"  # "torch" (reference, any device) or "triton"; see set_kernels

    def forward(self, x, key_padding_mask):
        # x (B, T, H); key_padding_mask (B, T) bool, True = real token that may be attended to
        B, T, H = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # 3 x (B, T, nh, D)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, D)
        p = self.attn_dropout if self.training else 0.0
        if self.kernels == "triton":
            # seed None: a fresh dropout seed drawn on x's device from its torch generator per call
            y = kernel_module("attention").attention(q, k, v, key_padding_mask, p)
        else:
            mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, T), broadcast over heads and queries
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, H)  # (B, T, H)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.hidden, cfg.ffn_mult * cfg.hidden)
        self.proj = nn.Linear(cfg.ffn_mult * cfg.hidden, cfg.hidden)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))  # exact erf GELU, HF hidden_act="gelu"


class Block(nn.Module):
    """Post-LN transformer block, as BERT: LayerNorm after each residual sum."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, key_padding_mask):
        x = self.ln1(x + self.drop(self.attn(x, key_padding_mask)))
        x = self.ln2(x + self.drop(self.mlp(x)))
        return x


class ConvStem(nn.Module):
    """Conv layers of the paper's BERT-1 variants, on the embedding output seen as a 1-channel image.

    n_conv x [Conv2d(c_in -> d, kernel, 'same') + BatchNorm2d + GELU], c_in = 1 for the first,
    then Conv2d(d -> 1, 1x1) + BatchNorm2d + GELU back to one channel. Shape (B, T, H) is kept.
    As in the reference code, padded positions are not masked: the kernel sees their embeddings,
    so outputs near the end of a text depend on how much padding follows (texts are always 128).
    """

    def __init__(self, cfg: BertConfig):
        super().__init__()
        d, k = cfg.conv_channels, cfg.conv_kernel
        self.convs = nn.ModuleList(nn.Conv2d(1 if i == 0 else d, d, k, padding="same") for i in range(cfg.n_conv))
        self.bns = nn.ModuleList(nn.BatchNorm2d(d) for _ in range(cfg.n_conv))
        self.proj = nn.Conv2d(d, 1, 1)
        self.proj_bn = nn.BatchNorm2d(1)
        self.kernels = "torch"  # "torch" (reference) or "triton"; see set_kernels

    def forward(self, x):
        # x (B, T, H)
        conv = functools.partial(F.conv2d, padding="same")  # what nn.Conv2d(padding="same") calls
        if self.kernels == "triton":
            ks = kernel_module("conv_stem")
            # pure inference folds BN into the convs (one fused op); with autograd on (training, or
            # gradients in eval mode) only the convs are kernels and BN runs as a module (batch
            # statistics in train mode, running statistics in eval mode)
            if not self.training and not torch.is_grad_enabled():
                return ks.conv_stem_infer(x, self.fold())
            conv = ks.conv2d_same  # Triton forward, torch backward
        h = x.unsqueeze(1)  # (B, 1, T, H)
        for c, bn in zip(self.convs, self.bns):
            h = F.gelu(bn(conv(h, c.weight, c.bias)))  # (B, d, T, H)
        return F.gelu(self.proj_bn(conv(h, self.proj.weight, self.proj.bias))).squeeze(1)  # (B, T, H)

    @torch.no_grad()
    def fold(self) -> list:
        """Eval-mode parameters for the fused inference op: one {"weight": (C_out, C_in, kh, kw), "bias":
        (C_out,)} per conv layer with its BatchNorm (running statistics) folded in, then the 1x1 projection's."""
        return [dict(zip(("weight", "bias"), fold_bn(c.weight, c.bias, bn.running_mean, bn.running_var, bn.weight,
                                                     bn.bias, bn.eps)))
                for c, bn in [*zip(self.convs, self.bns), (self.proj, self.proj_bn)]]


def fold_bn(conv_w, conv_b, bn_mean, bn_var, bn_w, bn_b, eps):
    """Fold an eval-mode BatchNorm into the preceding conv: returns (weight, bias) with
    conv'(x) = bn(conv(x)). conv_b may be None; bn_w / bn_b may be None (affine=False)."""
    scale = torch.rsqrt(bn_var.float() + eps) * (bn_w.float() if bn_w is not None else 1.0)
    bias = ((conv_b.float() if conv_b is not None else 0.0) - bn_mean.float()) * scale
    bias = bias + (bn_b.float() if bn_b is not None else 0.0)
    return (conv_w.float() * scale[:, None, None, None]).to(conv_w.dtype), bias.to(conv_w.dtype)


class Encoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))

    def forward(self, x, key_padding_mask):
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return x


class MLMHead(nn.Module):
    """dense + GELU + LayerNorm, then a decoder tied to the word embeddings plus its own bias."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h, word_weight):
        # h (..., H); word_weight (V, H) is passed in, so the tie is one parameter and one state_dict key
        return F.linear(self.ln(F.gelu(self.dense(h))), word_weight, self.bias)  # (..., V)


class ClassifierHead(nn.Module):
    """Pooler (dense + tanh on the [CLS] position 0), dropout, linear to the labels."""

    def __init__(self, cfg: BertConfig, n_labels: int):
        super().__init__()
        self.pooler = nn.Linear(cfg.hidden, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden, n_labels)

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
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class BertModel(nn.Module):
    """The shared trunk: embeddings, optional conv stem, encoder. Returns hidden states (B, T, H)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.stem = ConvStem(cfg) if cfg.n_conv > 0 else None
        self.encoder = Encoder(cfg)

    def forward(self, idx, attention_mask=None, token_type_ids=None):
        # idx (B, T) token ids; attention_mask (B, T) 1/True = real token; default: idx != pad_id
        if attention_mask is None:
            attention_mask = idx != self.config.pad_id
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(idx)
        x = self.embeddings(idx, token_type_ids)  # (B, T, H)
        if self.stem is not None:
            x = self.stem(x)
        return self.encoder(x, attention_mask.bool())


class _Pretrained(nn.Module):
    def _init(self):
        self.apply(lambda m: _init_weights(m, self.config.init_std))

    def num_params(self) -> int:
        """Parameter count; a tied weight is one parameter and counted once."""
        return sum(p.numel() for p in self.parameters())


class BertForMLM(_Pretrained):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        self.head = MLMHead(cfg)
        self._init()

    def forward(self, idx, attention_mask=None, targets=None, token_type_ids=None, sparse=True, per_row=0):
        """targets (B, T): original id at the chosen positions, -100 elsewhere (HF convention).

        Without targets: logits (B, T, V), loss None. With targets and sparse=True (default): the
        head runs only on the chosen positions, logits (N, V) aligned with mlm_targets(targets,
        per_row), loss = the mean cross-entropy over the chosen positions. per_row=0: N = number
        chosen (a dynamic shape); per_row=k: N = B*k (a static shape, see mlm_positions).
        sparse=False: the dense head over all positions, logits (B, T, V), the same loss.
        """
        h = self.bert(idx, attention_mask, token_type_ids)  # (B, T, H)
        word_weight = self.bert.embeddings.word.weight
        if targets is None:
            return self.head(h, word_weight), None
        if sparse:
            pos = mlm_positions(targets, per_row)
            if per_row:
                h = h.gather(1, pos[..., None].expand(-1, -1, h.size(-1)))  # (B, k, H)
                logits = self.head(h.reshape(-1, h.size(-1)), word_weight)  # (B*k, V)
            else:
                logits = self.head(h[pos], word_weight)  # (N_sel, V); boolean indexing syncs once
            return logits, F.cross_entropy(logits, mlm_targets(targets, per_row, pos), ignore_index=-100)
        logits = self.head(h, word_weight)  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)  # (B*T, V)
        return logits, loss


def mlm_positions(targets, per_row=0):
    """Where the sparse MLM head runs. per_row=0: the (B, T) bool mask of chosen positions.
    per_row=k: (B, k) indices, chosen positions first; a row with fewer than k chosen is filled
    with unchosen positions whose target is -100 (ignored by the loss), so the shape is static:
    no host sync, and CUDA graphs can replay the step."""
    chosen = targets != -100  # (B, T)
    if not per_row:
        return chosen
    return chosen.float().topk(per_row, dim=1, sorted=False).indices  # (B, k)


def mlm_targets(targets, per_row=0, pos=None):
    """Targets aligned with the sparse head's logits (-100 where a static slot is unused)."""
    pos = mlm_positions(targets, per_row) if pos is None else pos
    return targets.gather(1, pos).reshape(-1) if per_row else targets[pos]  # (N,)


class BertForClassification(_Pretrained):
    def __init__(self, cfg: BertConfig, n_labels: int):
        super().__init__()
        self.config = cfg
        self.n_labels = n_labels
        self.bert = BertModel(cfg)
        self.head = ClassifierHead(cfg, n_labels)
        self._init()

    def forward(self, idx, attention_mask=None, targets=None, token_type_ids=None):
        """targets (B,) label indices. Returns logits (B, n_labels) and the mean cross-entropy or None."""
        logits = self.head(self.bert(idx, attention_mask, token_type_ids))  # (B, n_labels)
        loss = F.cross_entropy(logits, targets) if targets is not None else None
        return logits, loss
