"""Accuracy per token (APT) on the held-out rows, with the fixed masks of tinytlm/mlm_eval.py.

For token id t: APT(t) = correct(t) / occ(t), where occ(t) counts the held-out positions whose original
token is t and that the MLM masking selected (masked, replaced by a random id or left unchanged: every
"modified" position), and correct(t) those of them where the model's argmax prediction is t.
<APT> is the plain mean of APT(t) over the tokens with occ(t) >= min_occ (default 1: every token the
held-out masks select at least once); the position-weighted mean, sum correct / sum occ, is the
accuracy tinytlm/mlm_eval.py reports as val_mlm_acc (same rows, masks, batches and forward).

APT against frequency: each token's count in the run's W_s rows (the rows it was pre-trained on,
checked against the checkpoint's checksum), in log2 bins [2^k, 2^(k+1)); tokens the W_s rows never
contain (count 0) form a bin of their own. With a task, its T_M tokens (in the task, never in W_s)
are reported apart as well.

    from tinytlm.analyze_apt import mean_apt
    mean_apt("runs/mlm-tiny-random-ws4000-s0")      # <APT> of that checkpoint (CPU), a float
"""
from pathlib import Path

import numpy as np
import torch

from tinytlm.analyze_model import check_single, is_mlm, mlm_logits
from tinytlm.common import UserError
from tinytlm.data import Shard, payload_checksum
from tinytlm.mlm_eval import VAL_SEED, HeldOut
from tinytlm.tokstats import counts
from tinytlm.precision import autocast


# -----------------------------------------------------------------------------
# the run's data: held-out rows and W_s counts

def _moved(recorded: str, data_root, what: str) -> Path:
    """A recorded data file, or the same file under another prepared-data root: DATA/<folder>/<name>."""
    p = Path(recorded)
    p = Path(data_root) / p.parent.name / p.name if data_root else p
    if not p.is_file():
        raise UserError(f"{p}: {what} not found" + ("" if data_root else " (give --data DIR, the prepared data root)"))
    return p


def held_out(state: dict, data_root=None) -> tuple:
    """(HeldOut, meta): the held-out rows and fixed masks a pre-training checkpoint was scored on, and what
    they are (shard, rows, checksum, mask seed, masked positions). data_root: read
    DATA/wikipedia/wiki.val.bin instead of the recorded path (checked against the recorded checksum)."""
    val, where = state["data"].get("val"), state.get("path", "checkpoint")
    if not val and not data_root:
        raise UserError(f"{where}: the run has no held-out rows (trained with --val_every 0, or before "
                        f"wiki.val.bin existed); give --data DIR holding wikipedia/wiki.val.bin")
    path = val["shard"] if val else Path(data_root) / "wikipedia" / "wiki.val.bin"
    shard = Shard(_moved(path, data_root, "the run's held-out rows"), verify=True)
    if val and shard.checksum.hex() != val["checksum"]:
        raise UserError(f"{shard.path}: not the held-out rows this run was scored on (checksum differs)")
    if len(shard) == 0:
        raise UserError(f"{shard.path}: no held-out rows")
    held = HeldOut(shard, state["data"]["special_ids"], shard.vocab_size)
    return held, {"shard": str(shard.path), "rows": len(shard), "checksum": shard.checksum.hex(),
                  "mask_seed": VAL_SEED, "masked": int((held.targets != -100).sum())}


def ws_rows(state: dict, data_root=None) -> np.ndarray:
    """The W_s rows (ws, T) a pre-training checkpoint was trained on, checked against its rows checksum."""
    d, where = state["data"], state.get("path", "checkpoint")
    if not d.get("shard") or not d.get("ws"):
        raise UserError(f"{where}: no pre-training rows recorded (an empty W_s): APT against frequency needs them")
    shard = Shard(_moved(d["shard"], data_root, "the run's pre-training rows"))
    if d["ws"] > len(shard):
        raise UserError(f"{shard.path}: {len(shard)} rows, the run was trained on the first {d['ws']}")
    rows = shard.ids[:d["ws"]]
    if d.get("rows_checksum") and payload_checksum(rows).hex() != d["rows_checksum"]:
        raise UserError(f"{shard.path}: its first {d['ws']} rows are not the ones this run was trained on")
    return rows


def ws_counts(state: dict, rows: np.ndarray, vocab_size: int) -> np.ndarray:
    """Occurrences (V,) of every id in the W_s rows, special tokens zeroed; an empty W_s is an error."""
    c = counts(rows, vocab_size, tuple(state["data"]["special_ids"].values()))
    if c.sum() == 0:
        raise UserError(f"{state.get('path', 'checkpoint')}: its W_s rows hold no token (an empty W_s)")
    return c


# -----------------------------------------------------------------------------
# predictions and counts

@torch.no_grad()
def held_out_predictions(model, held: HeldOut, device, precision: str = "fp32") -> tuple:
    """(targets (N,), predictions (N,)) at every held-out masked position, int64 numpy, in row-major
    order: the model's own forward on the batches HeldOut.evaluate uses, so the counts are its counts."""
    check_single(model)
    if not is_mlm(model):
        raise UserError("APT needs a pre-training (MLM) checkpoint; a classifier has no MLM head")
    was = model.training
    model.eval()
    ys, preds = [], []
    try:
        for i in range(0, len(held), held.batch_size):
            x, inp, tgt = (t[i:i + held.batch_size].to(device) for t in (held.ids, held.inputs, held.targets))
            with autocast(device, precision):
                logits, y = mlm_logits(model, inp, x != held.pad, tgt)  # (N_b, V), (N_b,)
            ys.append(y.cpu())
            preds.append(logits.argmax(-1).cpu())
    finally:
        model.train(was)
    return torch.cat(ys).numpy(), torch.cat(preds).numpy()


def token_counts(targets: np.ndarray, preds: np.ndarray, vocab_size: int) -> tuple:
    """(correct (V,), occ (V,)) int64: per original token id, right predictions and occurrences."""
    occ = np.bincount(targets, minlength=vocab_size).astype(np.int64)
    correct = np.bincount(targets[preds == targets], minlength=vocab_size).astype(np.int64)
    return correct, occ


def mean_over_tokens(correct: np.ndarray, occ: np.ndarray, min_occ: int = 1, where=None) -> float:
    """<APT>: the mean of correct/occ over the tokens with occ >= min_occ (and where[t], if given);
    nan when there are none."""
    sel = occ >= max(1, min_occ)
    if where is not None:
        sel &= where
    return float((correct[sel] / occ[sel]).mean()) if sel.any() else float("nan")


def group(correct, occ, sel, min_occ: int = 1) -> dict:
    """Tokens, occurrences, <APT> and position-weighted accuracy of the tokens in the boolean mask sel."""
    scored = sel & (occ >= max(1, min_occ))
    n = int(occ[scored].sum())
    return {"tokens": int(scored.sum()), "occurrences": n,
            "mean_apt": _num(mean_over_tokens(correct, occ, min_occ, sel)),
            "accuracy": _num(correct[scored].sum() / n if n else float("nan"))}


def _num(x):
    """A float for JSON: nan (nothing to average) becomes None."""
    return None if x != x else float(x)


def frequency_bins(correct, occ, wsc, min_occ: int = 1) -> list:
    """APT against the W_s count: the unseen tokens (count 0), then log2 bins [2^k, 2^(k+1)) up to the
    largest count; each bin as group() describes it, with its bounds lo <= count < hi."""
    bins = [{"lo": 0, "hi": 1, **group(correct, occ, wsc == 0, min_occ)}]
    top = int(wsc.max(initial=0))
    k = 0
    while (1 << k) <= top:
        lo, hi = 1 << k, 1 << (k + 1)
        bins.append({"lo": lo, "hi": hi, **group(correct, occ, (wsc >= lo) & (wsc < hi), min_occ)})
        k += 1
    return bins


def apt_report(correct, occ, wsc, min_occ: int = 1, task_counts: np.ndarray = None) -> dict:
    """The APT part of apt.json: per token [correct, occurrences] and its W_s count (every token the masks
    select), <APT>, the accuracy, the frequency bins and, with a task's counts, T_M apart from the rest."""
    ids = np.flatnonzero(occ)
    out = {
        "accuracy": _num(correct.sum() / occ.sum() if occ.sum() else float("nan")),
        "mean_apt": _num(mean_over_tokens(correct, occ, min_occ)),
        "min_occ": min_occ,
        "masked": int(occ.sum()),
        "tokens": {str(t): [int(correct[t]), int(occ[t])] for t in ids},
        "ws_counts": {str(t): int(wsc[t]) for t in ids},
        "T_W": int((wsc > 0).sum()),
        "by_frequency": frequency_bins(correct, occ, wsc, min_occ),
    }
    if task_counts is not None:
        in_task = task_counts > 0
        out["task_tokens"] = {"T_C": int(in_task.sum()), "T_M": int((in_task & (wsc == 0)).sum()),
                              "T_M_group": group(correct, occ, in_task & (wsc == 0), min_occ),
                              "seen_group": group(correct, occ, in_task & (wsc > 0), min_occ)}
    return out


# -----------------------------------------------------------------------------
# one number for the paper runner

def mean_apt(run_or_model, held: HeldOut = None, device="cpu", data_root=None, min_occ: int = 1,
             precision: str = "fp32") -> float:
    """<APT> of a pre-training checkpoint (a run folder or ckpt.pt path) or of a BertForMLM on the
    held-out rows (the run's, or `held` for a model). device: "cpu" or "cuda"; precision: "fp32" | "bf16"
    (tinytlm/precision.py; the paper runner scores in its cells' precision)."""
    from tinytlm.checkpoint import build_model, load_checkpoint
    device = torch.device(device)
    if isinstance(run_or_model, (str, Path)):
        state = load_checkpoint(run_or_model, kind="mlm")
        held = held or held_out(state, data_root)[0]
        model = build_model(state)
    elif held is None:
        raise UserError("mean_apt of a model needs its held-out rows (held=HeldOut(...))")
    else:
        model = run_or_model
    targets, preds = held_out_predictions(model.to(device), held, device, precision)
    return mean_over_tokens(*token_counts(targets, preds, model.config.vocab_size), min_occ)
