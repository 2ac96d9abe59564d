"""The batch-1 latency of a committee run stacked vs its members one after another vs one single model: the
latency half of bench/members.py (bench/README.md, "Stacked members").

BertForClassification, eval, no_grad, autocast, batch 1 (one full synthetic row, bench/common.py token_batch):
the committee's members stacked into one model (tinytlm/members.py, load_members: one forward for all members,
tinytlm.committee.member_logits summed), the same members one after another, and one single model; medians of
interleaved calls (bench/common.py interleaved_ms), so a passing load falls on every path alike.
"""
import torch

from bench.common import autocast, free_memory, interleaved_ms, token_batch
from tinytlm.committee import member_logits
from tinytlm.kernel_path import Impl
from tinytlm.members import load_members
from tinytlm.model import BertForClassification
from tinytlm.train import prepare_model


def committee_latency(ccfg, scfg, bc, device) -> dict:
    """Batch-1 latency (median ms of bc.latency_runs interleaved calls after bc.warmup + 2 untimed rounds) of a
    bc.committee_size-member committee of `ccfg` models stacked (one forward) and one after another, and of one
    `scfg` model; the stacked and one-by-one logits' largest difference (the same weights: it must be ~0)."""
    n = bc.committee_size
    torch._dynamo.reset()
    free_memory(device)
    torch.manual_seed(bc.seed)
    with torch.device(device):
        impl = Impl(bc.kernels)
        singles = [BertForClassification(ccfg, bc.n_labels, impl=impl) for _ in range(n)]
        stack = BertForClassification(ccfg, bc.n_labels, members=n, impl=impl)
        single = BertForClassification(scfg, bc.n_labels, impl=impl)
    load_members(stack, [m.state_dict() for m in singles])
    how = "on" if bc.compile else "off"
    singles, stack, single = ([prepare_model(m.eval(), device, how) for m in singles],
                              prepare_model(stack.eval(), device, how), prepare_model(single.eval(), device, how))
    x = token_batch(1, bc.seq_len, torch.Generator().manual_seed(bc.seed)).to(device)  # (1, T), a full row
    calls = {"committee stacked": lambda: member_logits(stack, x).float().sum(0),  # (K, 1, C) -> (1, C)
             "committee one by one": lambda: sum(member_logits(m, x).float().sum(0) for m in singles),
             "single": lambda: member_logits(single, x)}
    with torch.no_grad(), autocast(device):
        diff = (calls["committee stacked"]() - calls["committee one by one"]()).abs().max().item()
        for _ in range(bc.warmup + 2):
            for fn in calls.values():
                fn()
        med = interleaved_ms(calls, bc.latency_runs, device)
    models = [f"{n} x {bc.committee}", f"{n} x {bc.committee}", bc.single]
    rows = [{"what": name, "models": m, "forwards": f, "median_ms": med[name],
             "vs_single": med[name] / med["single"]} for name, m, f in zip(calls, models, (1, n, 1))]
    return {"rows": rows, "members": n, "committee": bc.committee, "single": bc.single,
            "stacked_vs_one_by_one_max_abs_diff": diff}
