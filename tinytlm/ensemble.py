"""Evaluate classifiers and their soft committee (sum of raw logits, argmax) on their common test set.

    python ensemble.py runs/cls-fewrel-bert1-pt-s0 runs/cls-fewrel-bert1-h24-pt-s0 ...
    python ensemble.py a/ckpt.pt b/ckpt.pt --json committee.json

Members must share task, label map and test set (checked by the test-set fingerprint
stored in each classifier checkpoint). Prints one row per member: architecture,
parameters, latency in layers (PAPER.md: 4 per transformer block, 1 per conv layer,
+1), measured batch-1 latency and test accuracy; then the committee. The committee's
latency in layers is the deepest member's (members can run side by side, as the paper
counts it); its measured latency is given three times: members one after another, members on
parallel CUDA streams (committee_forward; on CPU the same loop), and stacked.

Stacked: the members of one shape (model config and number of labels) run as one stacked model
(tinytlm/members.py), K members in one forward; mixed shapes make one stack per shape, run one
after another. The accuracies come from the stacked forwards (each member's logits are its own,
equal to a forward of that member alone up to float rounding); the per-member latency is each
member alone.
"""
from pathlib import Path

from tinytlm.checkpoint import build_model, load_checkpoint
from tinytlm.committee import (accuracy, batch1_latency_ms, committee_logits, common_test_set,
                               predict_member_logits, shape_groups, stack_checkpoints)
from tinytlm.common import ArgParser, add_option, cli, default_data_root, default_raw_root, write_json
from tinytlm.kernel_path import Impl
from tinytlm.precision import HELP as PRECISION_HELP, PRECISIONS, resolve_precision
from tinytlm.train import prepare_model, resolve_device


def describe(cfg) -> str:
    s = f"L{cfg.n_layer} H{cfg.n_head}"
    if cfg.n_conv:
        s += f" +{cfg.n_conv}CL d{cfg.conv_channels} {cfg.conv_kernel[0]}x{cfg.conv_kernel[1]}"
    return s


def parser() -> ArgParser:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_option(ap, "ckpts", nargs="+", help="classifier checkpoints or run directories", kind="run")
    add_option(ap, "--device", default="auto", help="auto | cpu | cuda | cuda:N", pattern=r"auto|cpu|cuda(:\d+)?")
    add_option(ap, "--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    add_option(ap, "--kernels", default="torch", help="torch | triton", choices=("torch", "triton"))
    add_option(ap, "--latency-samples", type=int, default=50, help="test sequences timed at batch 1", low=1)
    add_option(ap, "--json", default="", help="write the table as JSON here", kind="outfile")
    add_option(ap, "--data", type=Path, default=default_data_root(), help="prepared data root", kind="dir")
    add_option(ap, "--raw", type=Path, default=default_raw_root(), help="raw data root", kind="dir")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    impl = Impl(args.kernels)

    states = [load_checkpoint(p, kind="cls") for p in args.ckpts]
    task_dir, test, yte = common_test_set(states, args.raw, args.data)

    # one stacked model per shape: its forward gives every member's logits (K, N, C)
    groups = shape_groups(states)
    stacks = [prepare_model(stack_checkpoints([states[i] for i in g], impl), device) for g in groups]
    logits = [None] * len(states)
    for g, stack in zip(groups, stacks):
        for i, lg in zip(g, predict_member_logits(stack, test.ids, device, precision=precision)):
            logits[i] = lg  # (N, C), in the order the checkpoints were given
    group_of = {i: n for n, g in enumerate(groups) for i in g}

    models = [prepare_model(build_model(s, impl), device) for s in states]  # alone, for the latency

    def latency(ms, parallel=False):
        return batch1_latency_ms(ms, test.ids, device, args.latency_samples, parallel=parallel, precision=precision)

    rows = []
    for i, (s, m) in enumerate(zip(states, models)):
        cfg = m.config
        rows.append({"member": s["path"], "arch": describe(cfg), "params": m.num_params(),
                     "latency_layers": cfg.latency_layers, "latency_ms_b1": latency([m]),
                     "acc": accuracy(logits[i], yte), "group": group_of[i]})
    comm = {"member": f"committee of {len(models)}", "arch": "sum of logits",
            "params": sum(r["params"] for r in rows), "latency_layers": max(r["latency_layers"] for r in rows),
            "latency_ms_b1": latency(models), "latency_ms_b1_parallel": latency(models, parallel=True),
            "latency_ms_b1_stacked": latency(stacks),
            "acc": accuracy(committee_logits(logits), yte)}
    group_rows = [{"arch": rows[g[0]]["arch"], "n_labels": states[g[0]]["n_labels"], "members": len(g),
                   "checkpoints": [states[i]["path"] for i in g]} for g in groups]

    print(f"task {task_dir.name}, {len(test)} test rows, device {device}, {precision}")
    print(f"{'member':<48} {'arch':<24} {'params':>9} {'layers':>6} {'ms@b1':>7} {'acc':>7}")
    for r in rows + [comm]:
        name = r["member"] if len(r["member"]) <= 48 else "..." + r["member"][-45:]
        print(f"{name:<48} {r['arch']:<24} {r['params'] / 1e6:>8.1f}M {r['latency_layers']:>6} "
              f"{r['latency_ms_b1']:>7.2f} {r['acc']:>7.4f}")
    print(f"committee batch-1 latency with members on parallel CUDA streams: {comm['latency_ms_b1_parallel']:.2f} ms"
          + ("" if device.type == "cuda" else " (CPU: the same sequential loop)"))
    shapes = ", ".join(f"{g['members']} x {g['arch']}" for g in group_rows)
    print(f"committee batch-1 latency with the members of one shape stacked ({len(stacks)} forward"
          f"{'s' * (len(stacks) > 1)}: {shapes}): {comm['latency_ms_b1_stacked']:.2f} ms")
    result = {"task": task_dir.name, "n_test": len(test), "device": str(device), "precision": precision,
              "precision_requested": args.precision, "members": rows, "committee": comm,
              "groups": group_rows}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    cli(main)
