"""Accuracy along the blocks: a new head trained on the frozen output of each block (b = 0 is the embeddings).

Pre-training run: per state b (embeddings, the conv stem if any, block 1 .. N) an MLM probe of the trained
head's shape -- dense (H x H) + GELU + LayerNorm + decoder -- whose decoder is TIED to the model's
frozen word embeddings (V x H, not trained), with its own bias (V,). Trained: dense, LayerNorm and
decoder bias, on the run's own W_s rows with fresh BERT masks (15%, 80/10/10; seeded), the trunk frozen
in eval mode. Then every probe predicts the held-out masked tokens (the fixed masks of
tinytlm/mlm_eval.py): APT and <APT> per block. init "fresh" is the model's init (normal(0, init_std),
zero biases, LayerNorm identity); init "head" copies the trained head, and with 0 steps the last
block's probe IS the trained head.

Classifier run: per state a linear probe (H -> labels) on the [CLS] position (the one the classifier's
pooler reads), trained on the task's train rows, scored on its test rows.

Budget (ProbeConfig, all options of tinytlm.analyze): `steps` AdamW steps of `batch_size` rows for every
probe at once (one trunk pass feeds all of them), lr decaying linearly to 0, no warm-up.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from tinytlm.analyze_model import (block_states, check_single, cls_position, hidden_size, mlm_head_parts,
                                   state_names, word_weight)
from tinytlm.common import UserError
from tinytlm.data import epoch_order, get_batch, mask_generator, mask_tokens
from tinytlm.precision import autocast
from tinytlm.train import lr_at


@dataclass
class ProbeConfig:
    steps: int = 300  # optimizer steps of every probe
    batch_size: int = 32  # rows per step: W_s rows (freshly masked) or the task's train rows
    lr: float = 1e-3  # AdamW peak learning rate, decayed linearly to 0, no warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    seed: int = 0  # row order, masks and the fresh initialisation
    init: str = "fresh"  # MLM probes: "fresh" (the model's init) or "head" (a copy of the trained head)
    log_every: int = 50  # steps between the records of the probes' training losses

    def validate(self):
        if self.steps < 0 or self.batch_size < 1 or self.log_every < 1:
            raise UserError(f"probe budget steps={self.steps} batch={self.batch_size}: steps >= 0, batch >= 1")
        if not (0 < self.lr < float("inf")) or not (0 <= self.weight_decay < float("inf")):
            raise UserError(f"--probe-lr {self.lr} / weight decay {self.weight_decay}: positive (>= 0) and finite")
        if self.init not in ("fresh", "head"):
            raise UserError(f"--probe-init {self.init!r}: choose fresh or head")


class MLMProbe(nn.Module):
    """dense + GELU + LayerNorm + decoder tied to a frozen (V, H) matrix passed in, with its own bias."""

    def __init__(self, hidden: int, vocab: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.ln = nn.LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, h, decoder):  # h (N, H), decoder (V, H) -> logits (N, V)
        return F.linear(self.ln(F.gelu(self.dense(h))), decoder, self.bias)


def mlm_probes(model, cfg: ProbeConfig) -> list:
    """One MLMProbe per state of the model, initialised fresh (seeded) or as copies of the trained head."""
    parts = mlm_head_parts(model)
    H, V, std = hidden_size(model), model.config.vocab_size, model.config.init_std
    g = torch.Generator().manual_seed(cfg.seed)
    probes = []
    for _ in state_names(model):
        p = MLMProbe(H, V, parts["eps"])
        with torch.no_grad():
            if cfg.init == "head":
                for name in ("dense.weight", "dense.bias", "ln.weight", "ln.bias", "bias"):
                    p.get_parameter(name).copy_(parts[name])
            else:  # the model's own init (tinytlm/model.py: _init_weights)
                p.dense.weight.copy_(torch.randn(H, H, generator=g) * std)
                p.dense.bias.zero_()
        probes.append(p)
    return probes


def _step_rows(n: int, cfg: ProbeConfig, step: int) -> np.ndarray:
    """The rows of one probe step: epochs over n rows in a seeded order, as the training loops draw them."""
    per_epoch = -(-n // cfg.batch_size)
    epoch, b = divmod(step, per_epoch)
    return epoch_order(n, cfg.seed, epoch)[b * cfg.batch_size:(b + 1) * cfg.batch_size]


def train_mlm_probes(model, rows: np.ndarray, special_ids: dict, cfg: ProbeConfig, device, precision="fp32") -> tuple:
    """(probes, records): one MLM probe per state trained on the W_s rows (n, T); records = the probes'
    window losses every log_every steps (one list entry per state)."""
    check_single(model)
    model.eval()
    probes = [p.to(device) for p in mlm_probes(model, cfg)]
    params = [q for p in probes for q in p.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    decoder = word_weight(model).detach()  # (V, H): tied and frozen
    sp, V = special_ids, model.config.vocab_size
    records, window = [], torch.zeros(len(probes) + 1)  # loss sums per probe, steps in the window
    for step in tqdm(range(cfg.steps), desc="MLM probes", unit="step", dynamic_ncols=True, disable=None):
        x = get_batch(rows, _step_rows(len(rows), cfg, step), device)  # (B, T)
        inputs, targets = mask_tokens(x, mask_generator(device, cfg.seed, step), vocab_size=V, mask_id=sp["mask"],
                                      special_ids=tuple(sp.values()))
        chosen = targets != -100  # (B, T)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.lr)
        if chosen.any():
            with torch.no_grad(), autocast(device, precision):
                states = block_states(model, inputs, x != sp["pad"])  # n_states x (B, T, H)
            with autocast(device, precision):
                losses = torch.stack([F.cross_entropy(p(s[chosen], decoder).float(), targets[chosen])
                                      for p, s in zip(probes, states)])  # (n_states,)
            losses.sum().backward()  # the probes share no weight: each gets its own loss's gradient
            opt.step()
            opt.zero_grad(set_to_none=True)
            window += torch.cat([losses.detach().float().cpu(), torch.ones(1)])
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            records.append(_record(step + 1, cfg, window))
            window.zero_()
    return [p.eval() for p in probes], records


def _record(step: int, cfg: ProbeConfig, window) -> dict:
    n = max(1.0, float(window[-1]))
    return {"kind": "probe", "step": step, "lr": lr_at(step - 1, cfg.steps, cfg.lr),
            "loss": [float(v) / n for v in window[:-1]]}


@torch.no_grad()
def probe_predictions(model, probes: list, held, device, precision: str = "fp32") -> list:
    """Per state: (targets (N,), predictions (N,)) of its probe at every held-out masked position, in the
    order of tinytlm.analyze_apt.held_out_predictions (the fixed masks of tinytlm/mlm_eval.py)."""
    model.eval()
    decoder = word_weight(model).detach()
    ys, preds = [], [[] for _ in probes]
    for i in range(0, len(held), held.batch_size):
        x, inp, tgt = (t[i:i + held.batch_size].to(device) for t in (held.ids, held.inputs, held.targets))
        chosen = tgt != -100  # (B, T)
        with autocast(device, precision):
            states = block_states(model, inp, x != held.pad)
            for out, p, s in zip(preds, probes, states):
                out.append(p(s[chosen], decoder).argmax(-1).cpu())  # (N_b,)
        ys.append(tgt[chosen].cpu())
    y = torch.cat(ys).numpy()
    return [(y, torch.cat(p).numpy()) for p in preds]


# -----------------------------------------------------------------------------
# classifier runs: linear probes on [CLS]

@torch.no_grad()
def cls_features(model, ids: np.ndarray, pad_id: int, device, batch_size: int = 256, precision: str = "fp32") -> list:
    """Per state: the [CLS] position's hidden state (N, H), fp32 on the CPU, eval mode."""
    check_single(model)
    model.eval()
    out = None
    for i in tqdm(range(0, len(ids), batch_size), desc="features", unit="batch", dynamic_ncols=True, disable=None):
        x = torch.from_numpy(np.asarray(ids[i:i + batch_size]).astype(np.int64)).to(device)  # (B, T)
        with autocast(device, precision):
            states = [cls_position(s).float().cpu() for s in block_states(model, x, x != pad_id)]  # (B, H) each
        out = [[s] for s in states] if out is None else [o + [s] for o, s in zip(out, states)]
    return [torch.cat(o) for o in out]


def train_linear_probes(features: list, labels: np.ndarray, n_labels: int, cfg: ProbeConfig, device) -> tuple:
    """(probes, records): one nn.Linear(H, n_labels) per state's features (N, H), trained together with
    AdamW on the cross-entropy; records as train_mlm_probes writes them."""
    g = torch.Generator().manual_seed(cfg.seed)
    probes = []
    for f in features:
        p = nn.Linear(f.shape[1], n_labels)
        with torch.no_grad():  # the model's init: normal(0, 0.02), zero bias
            p.weight.copy_(torch.randn(p.weight.shape, generator=g) * 0.02)
            p.bias.zero_()
        probes.append(p.to(device))
    opt = torch.optim.AdamW([q for p in probes for q in p.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    records, window = [], torch.zeros(len(probes) + 1)
    for step in tqdm(range(cfg.steps), desc="linear probes", unit="step", dynamic_ncols=True, disable=None):
        rows = torch.from_numpy(_step_rows(len(y), cfg, step))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr)
        yb = y[rows].to(device)
        losses = torch.stack([F.cross_entropy(p(f[rows].to(device)), yb) for p, f in zip(probes, features)])
        losses.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        window += torch.cat([losses.detach().cpu(), torch.ones(1)])
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            records.append(_record(step + 1, cfg, window))
            window.zero_()
    return [p.eval() for p in probes], records


@torch.no_grad()
def linear_probe_fields(probe, feats, keep=None, device="cpu"):
    """A linear probe's output fields (N, C) on features (N, H), the nodes with keep 0 silenced."""
    x = feats if keep is None else feats * keep
    return probe(x.to(device)).float().cpu()
