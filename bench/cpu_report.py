"""bench/cpu.py's report: the CPU's facts (/proc/cpuinfo) and the markdown sections of a result."""
import platform
from pathlib import Path

from bench.common import markdown_table

FLAGS_OF_NOTE = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma")


def cpu_facts(cpuinfo: str = None) -> dict:
    """{"model", "cores" (logical), "flags" (all), "of_note" (those that decide bf16 and vector speed)}."""
    if cpuinfo is None:
        p = Path("/proc/cpuinfo")
        cpuinfo = p.read_text(errors="replace") if p.is_file() else ""
    model, flags, cores = platform.processor() or platform.machine(), [], 0
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            cores += 1
        elif key == "model name" and not flags:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = value.split()
    return {"model": model, "cores": cores, "flags": flags, "of_note": [f for f in FLAGS_OF_NOTE if f in flags]}


def _f(x, digits=1) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def rows_line(cases: list) -> str:
    """What the batches were: real rows (their share of real tokens per kind) or synthetic ones."""
    kinds = {"mlm": "Wikipedia", "cls": "AG News"}
    if cases and cases[0].get("rows") == "real":
        seen = {c["kind"]: c["real_tokens"] for c in cases}
        return ("- rows: real, " + ", ".join(f"{kinds[k]} ({100 * r:.0f}% real tokens)" for k, r in seen.items())
                + " (`--rows real`)\n")
    return "- rows: synthetic (bench/common.py token_batch: every 4th row padded)\n"


def steps_markdown(st: dict) -> str:
    """The steps section: a row per model, kind and variant, the baseline's revision, the goals met or not."""
    v = st["variants"]
    rows = [{"model": c["model"], "kind": c["kind"], "variant": f"{k}: {v[k]['name']}",
             "freed memory kept": "yes" if t["keeps_freed_memory"] else "no",
             "ms/step": f"{t['ms']:.0f} ({t['ms_median']:.0f})", "seq/s": _f(t["seq_per_s"]),
             "GFLOP/s": _f(t["gflops"]), "of peak": f"{100 * t['of_peak']:.0f}%",
             "x pre-issue": _f(c["x_pre_issue"][k], 2), "x today's fp32": _f(c["x_fp32"][k], 2)}
            for c in st["cases"] for k, t in c["timings"].items()]
    kinds = {"mlm": "MLM pre-training", "cls": "fine-tuning"}
    goals = [f"- `{c['model']}` {kinds[c['kind']]}: default {c['x_pre_issue']['default']:.2f}x the pre-issue "
             f"code, goal {c['goal']:.1f}x: **{'met' if c['goal_met'] else 'not met'}**"
             for c in st["cases"] if c["goal"] is not None]
    return ("## Steps: default vs the code before issue 21 and today's fp32 (same batch; fastest round, median "
            "beside)\n\n"
            f"- baseline: the code before issue 21, revision `{st['baseline_rev']}` (`{st['baseline_commit']}`), "
            "fp32, eager, plain head, its own AdamW and malloc, imported from a temporary tree of that revision "
            f"(`git archive`; tinytlm from `{st['cases'][0]['timings']['baseline']['tinytlm']}`); the other "
            f"variants: today's code, this checkout (`{st['cases'][0]['timings']['default']['tinytlm']}`)\n"
            "- each variant ran in its own worker process (bench/cpu_worker.py: the process a run would have), "
            "the timed rounds interleaved across them, the order rotating\n"
            + rows_line(st["cases"]) +
            "- GFLOP/s counts the work of every one of the B x T slots, padding included: an unpadded variant's "
            "figure is the rate the padded work would have needed\n\n"
            + markdown_table(["model", "kind", "variant", "freed memory kept", "ms/step", "seq/s", "GFLOP/s",
                              "of peak", "x pre-issue", "x today's fp32"], rows)
            + ("\n\nIssue 21's goals (default over the pre-issue code, same batch):\n\n" + "\n".join(goals)
               if goals else ""))


def markdown(res: dict) -> list:
    """The report's sections (bench/common.py write_report adds the title and the header)."""
    cpu, pk = res["cpu"], res["peaks_gflops"]
    out = [f"- code measured: git `{res['git']}` (the revision when the run started)\n"
           f"- CPU: {cpu['model']}, {cpu['cores']} logical cores, {res['threads']} threads; flags of note: "
           f"{', '.join(cpu['of_note']) or 'none'}\n- machine load (1/5/15 min) before: "
           f"{', '.join(f'{x:.2f}' for x in res['load_before'])}; after: "
           f"{', '.join(f'{x:.2f}' for x in res.get('load_after', ()))}\n"
           f"- matmul peaks ({res['config']['matmul_n']}^2): bf16 {pk['bf16']:.0f} GFLOP/s, "
           f"fp32 {pk['fp32']:.0f} GFLOP/s"]
    if "steps" in res:
        out.append(steps_markdown(res["steps"]))
    if "members" in res:
        m = res["members"]
        out.append(f"## K = {m['K']} stacked vs {m['K']} single runs (`tiny`, {m['ws']} rows, "
                   f"{m['steps_per_member']} steps each; wall time, start-up included)\n\n"
                   f"- single: {m['wall_s']['single']:.1f} s (`{m['commands']['single']}` for each seed)\n"
                   f"- stacked: {m['wall_s']['stacked']:.1f} s (`{m['commands']['stacked']}`)\n"
                   f"- stacked / single speed: **{m['stacked_over_single']:.2f}x**")
    if "hf" in res:
        rows = [{"model": c["model"], **{f"{k} ms": _f(ms, 0) for k, ms in c["ms"].items()},
                 **{f"ours / hf {p}": _f(r, 2) for p, r in c["ours_over_hf"].items()}} for c in res["hf"]["cases"]]
        out.append("## Our MLM step vs transformers' BertForMaskedLM (same batch)\n\n" +
                   markdown_table(list(rows[0]), rows))
    if "compile" in res:
        rows = [{"kind": c["kind"], "precision": c["precision"], "eager ms": _f(c["ms"]["eager"], 0),
                 "compiled ms": _f(c["ms"]["compiled"], 0), "cold compile s": _f(c["compile_s"]),
                 "steady speed-up": _f(c["steady_speedup"], 2),
                 "pays after (steps)": "never" if c["pays_after_steps"] is None else f"{c['pays_after_steps']:.0f}",
                 "demo steps": c["demo_steps"], "pays in the demo": "yes" if c["pays_in_demo"] else "no"}
                for c in res["compile"]["cases"]]
        how = "--quick: both eager, nothing compiled" if res["compile"].get("quick") else "cold cache"
        out.append(f"## torch.compile at the demo's size (`{res['compile']['cases'][0]['model']}`, {how})\n\n" +
                   markdown_table(list(rows[0]), rows))
    return out
