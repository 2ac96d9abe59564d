"""What bench/train_throughput.py reports: empty records, the fastest path per model, the goals, the table rows.

A case record (one (model, batch, stack)) holds its path (train_mlm.py settings; None for hf), status ("ok",
"failed", "skipped", "n/a") and note, and for an ok case: seq_per_s, ms_per_step (the mean of the timed steps),
mfu, peak_gib, first_step_s (the first step alone: a compiled path's compile), warmup_s (every warm-up step),
compile_s (warmup_s less the warm-up steps at the steady rate: compiling and recompiling, apart from the
throughput), gflop_per_step and the real / budgeted tokens per B*T slot.
"""
from bench.train_stacks import flags


def blank(e: dict, status: str, note: str) -> dict:
    """A case record with no numbers (skipped, n/a, failed)."""
    return {"model": e["model"], "B": e["B"], "stack": e["stack"], "path": e["path"], "status": status, "note": note,
            **dict.fromkeys(("seq_per_s", "ms_per_step", "mfu", "peak_gib", "first_step_s", "warmup_s",
                             "compile_s", "gflop_per_step", "tokens"))}


def best_paths(cases: list, infer: dict) -> dict:
    """Per model: the fastest ok tinytlm stack at the smallest batch with one (the paper trains at 32)."""
    best = {}
    for model in dict.fromkeys(c["model"] for c in cases):
        ok = [c for c in cases if c["model"] == model and c["status"] == "ok" and c["path"] is not None]
        if ok:
            top = max((c for c in ok if c["B"] == min(c["B"] for c in ok)), key=lambda c: c["seq_per_s"])
            keys = ("B", "stack", "path", "seq_per_s", "ms_per_step", "mfu", "first_step_s", "warmup_s", "compile_s")
            best[model] = {**{k: top[k] for k in keys}, "infer_seq_per_s": infer.get(model, {}).get("seq_per_s")}
    return best


def summary(cases: list) -> list:
    """The goals: tinytlm-best / HF on bert6 at its smallest batch (>= 5x) and its seq/s (>= 8,500), MFU at the
    largest batch (>= 45%); and every unpadded stack against its padded twin."""
    def top(model, B, hf):
        ok = [c for c in cases if c["model"] == model and c["B"] == B and c["status"] == "ok"
              and (c["path"] is None) == hf]
        return max(ok, key=lambda c: c["seq_per_s"]) if ok else None

    lines = []
    for model in dict.fromkeys(c["model"] for c in cases):
        batches = sorted({c["B"] for c in cases if c["model"] == model and c["status"] == "ok"})
        if not batches:
            continue
        ours, hf = top(model, batches[0], False), top(model, batches[0], True)
        if model == "bert6" and ours and hf:
            lines.append(f"- bert6, B={batches[0]}: tinytlm best ({ours['stack']}) / HF = "
                         f"{ours['seq_per_s'] / hf['seq_per_s']:.2f}x in seq/s (goal >= 5x); "
                         f"{ours['seq_per_s']:,.0f} seq/s (goal >= 8,500)")
        r = top(model, batches[-1], False)
        if r:
            lines.append(f"- {model}, B={batches[-1]}: best tinytlm MFU {100 * r['mfu']:.1f}% ({r['stack']}; "
                         "goal >= 45%)")
    ok = {(c["model"], c["B"], c["stack"]): c for c in cases if c["status"] == "ok"}
    for (model, B, stack), c in ok.items():  # unpadded / padded, and what the padding and the budget were
        if stack.endswith("+unpad") and (model, B, stack[:-6]) in ok:
            t, ratio = c["tokens"], c["seq_per_s"] / ok[(model, B, stack[:-6])]["seq_per_s"]
            lines.append(f"- {model}, B={B}: {stack} / {stack[:-6]} = {ratio:.2f}x (real tokens "
                         f"{100 * t['real']:.1f}% of the B*T slots, token budget {100 * t['budget']:.1f}%)")
    return lines


def md_row(c: dict) -> dict:
    """One row of the markdown table (and of the console log): the numbers formatted, the path as its flags."""
    def num(v, fmt):
        return "" if v is None else format(v, fmt)
    tflops = None if c["ms_per_step"] is None else c["gflop_per_step"] / c["ms_per_step"]
    return {"model": c["model"], "B": c["B"], "stack": c["stack"], "status": c["status"],
            "ms/step": num(c["ms_per_step"], ".2f"), "seq/s": num(c["seq_per_s"], ".0f"),
            "TFLOP/s": num(tflops, ".1f"),
            "MFU": "" if c["mfu"] is None else f"{100 * c['mfu']:.1f}%", "peak GiB": num(c["peak_gib"], ".2f"),
            "1st step s": num(c["first_step_s"], ".1f"), "warmup s": num(c["warmup_s"], ".1f"),
            "compile s": num(c.get("compile_s"), ".1f"),
            "GFLOP/step": num(c["gflop_per_step"], ".1f"), "flags": flags(c["path"]), "note": c["note"],
            "real / budget": f"{c['tokens']['real']:.3f} / {c['tokens']['budget']:.3f}" if c["tokens"] else ""}
