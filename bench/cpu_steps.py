"""The training steps bench/cpu.py times on a CPU: one per variant, a variant being data,

    {"precision": "fp32" | "bf16", "head": "plain" | ..., "compile": a --compile value, "members": K}

so that a new option slots in as one more key. precision bf16 is `torch.autocast("cpu", dtype=torch.bfloat16)`
around the forward (master weights and AdamW state stay fp32, as train_mlm.py's --precision bf16); head is the
MLM head implementation (tinytlm/kernel_path.py's Impl field `head`); dropout Impl's `dropout` (a variant without
the key: torch); compile goes through tinytlm.train.prepare_model as --compile does; members K > 1 is one stacked
model of K members (tinytlm/members.py), each fed the same batch.

`default_variant` is what train_mlm.py / train_cls.py do by default on this machine. This module runs today's
code only: the code before issue 21 is timed by bench/cpu_worker.py's pre_issue_step, in its own tree.
"""
import contextlib

import torch

from bench.common import CLS, MASK, PAD, SEP, token_batch, train_flops
from tinytlm.config import Switches
from tinytlm.data import mask_generator, mask_tokens
from tinytlm.kernel_path import Impl
from tinytlm.mlm_rows import mlm_rows
from tinytlm.model import BertConfig, BertForClassification, BertForMLM
from tinytlm.precision import resolve_precision
from tinytlm.train import compile_mode, make_optimizer, prepare_model

BASELINE = {"precision": "fp32", "head": "plain", "compile": "off", "members": 1}  # before issue 21: fp32, eager
N_LABELS = 4  # the classifier's outputs (AG News)


def default_variant(device) -> dict:
    """The variant a run gets by default on this machine: --precision's and --compile's defaults resolved for it,
    and the MLM head and dropout of the Impl a run's switches resolve to (tinytlm/config.py Switches.impl)."""
    sw = Switches()
    impl = sw.impl(device)
    return {"precision": resolve_precision(sw.precision, device), "head": impl.head,
            "compile": compile_mode(sw.compile, device) or "off", "members": 1, "dropout": impl.dropout}


def variant_name(v: dict) -> str:
    """'fp32 eager plain-head' style: what differs is readable in a table."""
    comp = "eager" if v["compile"] == "off" else f"compile {v['compile']}"
    return f"{v['precision']} {comp} {v['head']}-head" + (f" K={v['members']}" if v["members"] > 1 else "")


def impl_of(v: dict) -> Impl:
    """The Impl of a variant: its head and dropout (default "torch"), padded."""
    return Impl(head=v["head"], dropout=v.get("dropout", "torch"))


def amp(v: dict):
    return torch.autocast("cpu", dtype=torch.bfloat16) if v["precision"] == "bf16" else contextlib.nullcontext()


# -----------------------------------------------------------------------------
# one batch, the same for every variant

def batch(kind: str, cfg: BertConfig, B: int, T: int, seed: int) -> dict:
    """kind "mlm": ids masked as train_mlm.py masks them (Bernoulli 15%) and the sparse head's targets;
    kind "cls": ids and labels. Synthetic ids (bench/common.py token_batch, every 4th row padded)."""
    x = token_batch(B, T, torch.Generator().manual_seed(seed))  # (B, T)
    if kind == "cls":
        labels = torch.randint(0, N_LABELS, (B,), generator=torch.Generator().manual_seed(seed))  # (B,)
        return {"x": x, "am": x != PAD, "y": labels}
    inputs, targets = mask_tokens(x, mask_generator(torch.device("cpu"), seed, 0), vocab_size=cfg.vocab_size,
                                  mask_id=MASK, special_ids=(PAD, CLS, SEP))
    return {"x": inputs, "am": x != PAD, "y": targets}


def real_batch(kind: str, cfg: BertConfig, B: int, seed: int, raw, data) -> dict:
    """As `batch`, on the rows a user trains on: kind "mlm", the first B rows of the Wikipedia shard (prepared
    under the data root `data` from `raw` when missing), masked as train_mlm.py masks them; kind "cls", B rows
    drawn (seed) from the demo's AG News sample (1,000 train rows per label) and their labels. Their real
    tokens are a share of the 128 slots (AG News ~41%, Wikipedia ~70%) that synthetic rows do not have."""
    import numpy as np

    from tinytlm.tasks import TaskSpec, ensure_task, load_task
    from tinytlm.wikipedia import ensure_wiki
    if kind == "cls":
        spec = TaskSpec("agnews", train_per_label=1000, test_per_label=250).resolved()
        train, y, *_ = load_task(ensure_task(spec, raw, data, quiet=True))
        rows = np.sort(np.random.default_rng(seed).choice(len(train), B, replace=False))
        x = torch.from_numpy(train.ids[rows].astype(np.int64))  # (B, T)
        return {"x": x, "am": x != PAD, "y": torch.from_numpy(np.asarray(y)[rows]).long()}  # AG News: N_LABELS
    x = torch.from_numpy(ensure_wiki(B, raw, data, quiet=True).ids[:B].astype(np.int64))  # (B, T)
    inputs, targets = mask_tokens(x, mask_generator(torch.device("cpu"), seed, 0), vocab_size=cfg.vocab_size,
                                  mask_id=MASK, special_ids=(PAD, CLS, SEP))
    return {"x": inputs, "am": x != PAD, "y": targets}


def flops(kind: str, cfg: BertConfig, b: dict) -> int:
    """Useful FLOPs of one training step of one member (bench/common.py train_flops; a classifier's head is
    left out: it is (H x labels), nothing beside the trunk)."""
    B, T = b["x"].shape
    return train_flops(cfg, B, T, int((b["y"] != -100).sum()) if kind == "mlm" else 0)


def step_fn(kind: str, cfg: BertConfig, v: dict, b: dict, lr: float = 5.5e-5, impl: Impl = None):
    """A function doing one optimizer step of the variant on the batch: forward (under its precision), backward,
    AdamW step, zero_grad -- train_mlm.py's / train_cls.py's step, K members fed the same rows. impl: the model's
    (default: impl_of(v))."""
    K, impl = v["members"], impl or impl_of(v)
    torch.manual_seed(0)
    raw = (BertForMLM(cfg, members=K, impl=impl) if kind == "mlm" else
           BertForClassification(cfg, N_LABELS, members=K, impl=impl))
    model = prepare_model(raw, torch.device("cpu"), v["compile"]).train()
    opt = make_optimizer(raw, lr, 0.01, torch.device("cpu"))
    x, am, y = (torch.cat([b[k]] * K) for k in ("x", "am", "y"))  # (K*B, ...), member-major
    rows, y = mlm_rows(y, 0, K) if kind == "mlm" else (None, y)  # the sparse head's rows: the chosen ones

    def step():
        with amp(v):
            _, loss = model(x, am, y, rows=rows) if kind == "mlm" else model(x, am, y)
        loss.sum().backward()  # K members: the sum of their mean losses
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
