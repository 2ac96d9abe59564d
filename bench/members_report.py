"""What bench/members.py reports: the largest K that fits in device memory, the training and latency tables and
whether the GPU goals were met (bench/README.md, "Stacked members")."""
import math

from bench.common import device_label, markdown_table

GOALS = (("bert1", 5, 3.0), ("bert6", 5, 1.5))  # (model, K, stacked / one-by-one speed-up goal on a GPU)
LATENCY_GOAL = 0.5  # committee stacked batch-1 latency / the single model's, goal on a GPU


def largest_k(rows: list, model: str, budget_gb: float):
    """The largest K whose stacked peak fits in budget_gb, from a least-squares line bytes = a + b*K through
    the measured K values; None with fewer than two."""
    ok = [r for r in rows if r["model"] == model and r["status"] == "ok"]
    pts = [(r["K"], r["stacked_bytes"]) for r in ok]
    if len({k for k, _ in pts}) < 2:
        return None
    mk, mb = sum(k for k, _ in pts) / len(pts), sum(b for _, b in pts) / len(pts)
    b = sum((k - mk) * (y - mb) for k, y in pts) / sum((k - mk) ** 2 for k, _ in pts)
    a = mb - b * mk
    measured = ok[0]["memory"] == "measured"
    how = ("linear fit of the measured CUDA peaks, an extrapolation" if measured else
           "linear fit of the analytic bytes (weights + grads + AdamW, no activations): an upper bound")
    return {"K": math.floor((budget_gb * 1e9 - a) / b) if b > 0 else None, "fixed_bytes": a,
            "bytes_per_member": b, "at_K": sorted({k for k, _ in pts}), "budget_gb": budget_gb, "from": how}


def md_train(r: dict) -> dict:
    """One row of the training table (and of the console log)."""
    def num(v, fmt=".2f", scale=1):
        return "" if v is None else format(v / scale, fmt)
    mem = "" if r["memory"] is None else f" ({r['memory']})"
    return {"model": r["model"], "K": r["K"], "B/member": r["B"], "status": r["status"],
            "stacked seq/s/member": num(r["stacked_seq_per_s"]),
            "one-by-one seq/s/member": num(r["one_by_one_seq_per_s"]),
            "speed-up": num(r["speedup"]), "stacked peak GiB": num(r["stacked_bytes"], scale=2 ** 30) + mem,
            "one-by-one peak GiB": num(r["one_by_one_bytes"], scale=2 ** 30) + mem,
            "steps": "" if r["steps"] is None else f"{r['warmup']}+{r['steps']}", "note": r["note"]}


def goal_lines(train: list, latency, device, smoke: bool) -> list:
    """The GPU goals (GOALS, LATENCY_GOAL): met or not on this device, or not measured."""
    lines, missed = [], False

    def verdict(what: str, value, met) -> str:
        nonlocal missed
        missed |= value is not None and not met
        result = "not measured in this run" if value is None else \
            f"{value:.2f}x, {'met' if met else 'NOT met'} on this device ({device_label(device)})"
        return f"- {what} (GPU goal): {result}"

    for model, K, goal in GOALS:
        r = next((r for r in train if (r["model"], r["K"], r["status"]) == (model, K, "ok")), {})
        lines.append(verdict(f"K={K} {model} stacked >= {goal:g}x one by one", r.get("speedup"),
                             r and r["speedup"] >= goal))
    if latency:
        r = latency["rows"][0]
        lines.append(verdict(f"{latency['members']}-member {latency['committee']} committee stacked, batch-1 latency "
                             f"<= {LATENCY_GOAL:g}x one {latency['single']}", r["vs_single"],
                             r["vs_single"] <= LATENCY_GOAL))
    if missed and device.type != "cuda" and not smoke:
        lines.append("- These are GPU goals (a GPU runs one small model's kernels with most of its units idle, "
                     "which the stacked members fill); a CPU has no such idle capacity, since one model's step "
                     "already keeps every core busy, so stacking has nothing to gain there (a speed-up below 1 "
                     "means the stacked step costs more than the K single ones; this bench does not say why).")
    if smoke:
        lines.append("- (smoke run: these ratios say nothing about performance)")
    return lines


def sections(result: dict) -> list:
    """The report's sections: training, the largest K in memory, the committee latency, the goals."""
    train, lat, out = result["train"], result["latency"], []
    if train:
        out.append("## Training: K members stacked vs one by one\n\n"
                   "Per member: the sequences each member trains on per second (B per step); speed-up = stacked / "
                   "one by one. " + ("Peak memory: torch.cuda.max_memory_allocated of each path." if
                                     train[0]["memory"] == "measured" else
                                     "Peak memory on CPU: weights + grads + AdamW state (analytic); activation "
                                     "memory is not measured there.") + "\n\n"
                   + markdown_table(list(md_train(train[0])), [md_train(r) for r in train]))
    fits = [f"- {m}: largest K in {f['budget_gb']:g} GB: {f['K']} ({f['from']}; K = {', '.join(map(str, f['at_K']))}: "
            f"{f['fixed_bytes'] / 1e9:.2f} GB + {f['bytes_per_member'] / 1e9:.2f} GB per member)"
            for m, f in result["max_members"].items() if f]
    if fits:
        out.append("## Largest K in device memory\n\n" + "\n".join(fits))
    if lat:
        rows = [{"what": r["what"], "models": r["models"], "forwards": r["forwards"],
                 "median ms": f"{r['median_ms']:.2f}", "/ single": f"{r['vs_single']:.2f}"} for r in lat["rows"]]
        out.append("## Committee batch-1 latency\n\nBertForClassification, eval, no_grad, autocast, batch 1; "
                   f"stacked vs one by one logits max abs diff {lat['stacked_vs_one_by_one_max_abs_diff']:.1e}.\n\n"
                   + markdown_table(list(rows[0]), rows))
    if result["goals"]:
        out.append("## Goals\n\n" + "\n".join(result["goals"]))
    return out
