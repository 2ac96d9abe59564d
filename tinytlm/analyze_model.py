"""The one place where the analysis reaches inside a model (written against tinytlm/model.py as it is).

Everything tinytlm.analyze* needs from a BertForMLM or BertForClassification goes through these
functions: the hidden states after the embeddings, the conv stem and every block; the trained MLM head
and its parts; the trained classifier head with some of its input nodes silenced. When the model's
forward path changes, this module is the one to adapt; the tests of tests/test_analyze.py say whether
it still agrees with the model's own forward.

The analysis runs one model (K = 1) in eval mode (no dropout), on padded rows (B, T).
"""
import torch
import torch.nn.functional as F

from tinytlm.common import UserError
from tinytlm.mlm_rows import mlm_rows
from tinytlm.model import BertForClassification, BertForMLM
from tinytlm.unpad import Padded


def check_single(model):
    """The analysis reads one model: a stacked model's members are analysed one checkpoint at a time."""
    if getattr(model, "members", 1) != 1:
        raise UserError(f"analysis takes one model, not a stack of {model.members} members (give a member's run)")
    return model


def is_mlm(model) -> bool:
    return isinstance(model, BertForMLM)


def is_classifier(model) -> bool:
    return isinstance(model, BertForClassification)


def hidden_size(model) -> int:
    return model.config.hidden


def head_dim(model) -> int:
    return model.config.head_dim


def state_names(model) -> list:
    """Names of what block_states returns: "emb" (b = 0), "stem" (with a conv stem), "block1" .. "blockN"."""
    cfg = model.config
    return ["emb"] + (["stem"] if cfg.n_conv > 0 else []) + [f"block{i + 1}" for i in range(cfg.n_layer)]


def block_states(model, idx, attention_mask) -> list:
    """The hidden states (B, T, H) after the embeddings, the stem (if any) and each block, in that order.
    idx (B, T) token ids; attention_mask (B, T) True = real token. The last one is what the head reads."""
    bert = model.bert
    x = bert.embeddings(idx, torch.zeros_like(idx))  # (B, T, H): token type 0, as every run trains
    states = [x]
    if model.config.n_conv > 0:
        x = bert.stem(x)  # (B, T, H): the padded image, as the model runs it
        states.append(x)
    tokens = Padded(attention_mask.bool())  # every token attends to the real ones of its row
    for block in bert.encoder.blocks:
        x = block(x, tokens)  # (B, T, H)
        states.append(x)
    return states


# -----------------------------------------------------------------------------
# the MLM head

def mlm_logits(model, inputs, attention_mask, targets):
    """The model's own sparse-head forward, exactly as tinytlm/mlm_eval.py calls it: (logits (N, V) at the
    chosen positions in row-major order, their targets (N,))."""
    rows, y = mlm_rows(targets)
    logits, _ = model(inputs, attention_mask=attention_mask, rows=rows)
    return logits, y


def word_weight(model):
    """The word-embedding matrix (V, H) the MLM decoder is tied to."""
    return model.bert.embeddings.word.weight


def mlm_head(model, h):
    """The trained MLM head on hidden states h (..., H): logits (..., V)."""
    return model.head(h, word_weight(model))


def mlm_head_parts(model) -> dict:
    """The trained head's own weights (the decoder is the word embeddings): dense (H, H) and its bias,
    LayerNorm weight and bias (H,), eps, and the decoder's bias (V,)."""
    head = model.head
    return {"dense.weight": head.dense.weight, "dense.bias": head.dense.bias, "ln.weight": head.ln.weight,
            "ln.bias": head.ln.bias, "bias": head.bias, "eps": head.ln.eps}


# -----------------------------------------------------------------------------
# the classifier head

def cls_position(h):
    """The state the classifier head reads: position 0 ([CLS]) of (B, T, H) -> (B, H)."""
    return h[:, 0]


def classifier_fields(model, h_cls, keep=None):
    """The trained classifier head's output fields (B, C) (the logits, before any softmax) on [CLS] states
    h_cls (B, H). keep (H,) 0/1: every weight from the nodes with keep 0 silenced (their inputs zeroed,
    which is the same), biases kept."""
    head = model.head
    x = h_cls if keep is None else h_cls * keep  # (B, H)
    pooled = torch.tanh(F.linear(x, head.pooler.weight, head.pooler.bias))  # (B, H); dropout: eval mode
    return F.linear(pooled, head.out.weight, head.out.bias)  # (B, C)


def n_labels(model) -> int:
    return model.n_labels
