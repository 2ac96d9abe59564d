"""Padded vs --unpad training steps, alternated (A, B, A, B, ...) so that a passing load on a shared machine
falls on both; medians. The README's CPU figures for --unpad come from this loop.

    PYTHONPATH=. python bench/unpad_ab.py --model bert6 --batch_size 32 --rounds 4
    PYTHONPATH=. python bench/unpad_ab.py --model bert6 --task agnews     # the classifier on AG News rows
    PYTHONPATH=. python bench/unpad_ab.py --model tiny --task agnews --bf16 --rounds 12   # as a CPU run by default
    PYTHONPATH=. python bench/unpad_ab.py --model tiny --task agnews --bf16 --blocks 1,2,4   # + length blocks

--blocks: the unpadded arms, one per count of the torch attention's length blocks (Impl.attn_blocks,
tinytlm/unpad.py length_blocks; 1 = SDPA on the (B, T) layout); every arm is timed in each round.

MLM: the first 4*B rows of the prepared Wikipedia shard, BERT masking; --task: 4*B rows drawn (seed 0) from
that task's prepared train shard, BertForClassification. One untimed round first; fp32, or with --bf16 as a CPU run
computes by default (bf16 autocast, the CPU's MLM head and dropout: tinytlm/kernel_path.py default_head and
default_dropout, fused AdamW, freed memory kept: tinytlm/cpu_memory.py). Prints the medians and the fastest rounds.
"""
import statistics
import time

import numpy as np
import torch

from tinytlm.common import ArgParser, add_option, cli, default_data_root
from tinytlm.cpu_memory import keep_freed_memory
from tinytlm.data import mask_generator, mask_tokens
from tinytlm.kernel_path import Impl, default_dropout, default_head
from tinytlm.mlm_rows import mlm_rows
from tinytlm.model import BertConfig, BertForClassification, BertForMLM


def batches(args, B: int) -> list:
    """4 batches of (inputs, attention mask, targets)."""
    from pathlib import Path
    data = Path(args.data) if args.data else default_data_root()
    if args.task:
        from tinytlm.tasks import TaskSpec, ensure_task, load_task
        train, y, *_ = load_task(ensure_task(TaskSpec(args.task).resolved(), out=data))
        rows = np.sort(np.random.default_rng(0).choice(len(train), 4 * B, replace=False))
        ids, ys = torch.from_numpy(train.ids[rows].astype(np.int64)), torch.from_numpy(y[rows])
        return [(ids[i * B:(i + 1) * B], ids[i * B:(i + 1) * B] != 0, ys[i * B:(i + 1) * B]) for i in range(4)]
    from tinytlm.wikipedia import ensure_wiki
    ids = torch.from_numpy(ensure_wiki(4 * B, None, data, quiet=True).ids[:4 * B].astype(np.int64))
    out = []
    for i in range(4):
        x = ids[i * B:(i + 1) * B]
        inp, tgt = mask_tokens(x, mask_generator("cpu", 0, i), vocab_size=30522, mask_id=103, special_ids=(0, 101, 102))
        out.append((inp, x != 0, tgt))
    return out


def loss(model, x, am, y, task):
    """A classifier's loss, or the MLM loss of the sparse head on the chosen tokens."""
    if task:
        return model(x, am, targets=y)[1]
    rows, y = mlm_rows(y)
    return model(x, am, targets=y, rows=rows)[1]


def main(argv=None):
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bert6", help="BertConfig preset")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds (each: one padded, one unpadded step)")
    ap.add_argument("--task", default="", help="agnews | dbpedia | fewrel: the classifier on that task's rows")
    ap.add_argument("--data", default="", help="prepared data root (default $TINYTLM_DATA or ./data)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast, the CPU's default head, kept freed memory")
    add_option(ap, "--blocks", default="1", pattern=r"[1-9]\d*(,[1-9]\d*)*",
               help="comma-separated length-block counts (>= 1) of the unpadded arms")
    args = ap.parse_args(argv)
    blocks = [int(g) for g in args.blocks.split(",")]
    if args.bf16:
        keep_freed_memory()
    bs = batches(args, args.batch_size)
    cfg = BertConfig.preset(args.model)
    arms = {"padded": (False, 1), **{"unpadded" + (f" {g} blocks" if g > 1 else ""): (True, g) for g in blocks}}
    models, opts = {}, {}
    for arm, (unpad, g) in arms.items():  # the same init for every arm
        torch.manual_seed(0)
        impl = (Impl(unpad=unpad, head=default_head("cpu"), dropout=default_dropout("cpu"), attn_blocks=g)
                if args.bf16 else Impl(unpad=unpad, attn_blocks=g))
        models[arm] = (BertForClassification(cfg, int(max(b[2].max() for b in bs)) + 1, impl=impl) if args.task
                       else BertForMLM(cfg, impl=impl)).train()
        opts[arm] = torch.optim.AdamW(models[arm].parameters(), lr=5.5e-5, weight_decay=0.01,
                                      fused=args.bf16)  # --bf16: as tinytlm/train.py make_optimizer on a CPU
    times = {arm: [] for arm in arms}
    for r in range(args.rounds + 1):
        for arm in arms:
            x, am, y = bs[r % 4]
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                out = loss(models[arm], x, am, y, args.task)
            out.sum().backward()
            opts[arm].step()
            opts[arm].zero_grad(set_to_none=True)
            if r:  # round 0 warms up
                times[arm].append(time.perf_counter() - t0)
    real = float(np.mean([b[1].float().mean() for b in bs]))
    med, fast = ({arm: f(t) for arm, t in times.items()} for f in (statistics.median, min))
    print(f"{args.model} {'cls ' + args.task if args.task else 'MLM'} B={args.batch_size} ({real:.1%} real tokens"
          f"{', bf16' if args.bf16 else ''}), medians (fastest rounds), x padded:")
    for arm in arms:
        print(f"  {arm:<20} {1e3 * med[arm]:6.0f} ms ({1e3 * fast[arm]:.0f})  {med['padded'] / med[arm]:.2f}x "
              f"({fast['padded'] / fast[arm]:.2f}x)")


if __name__ == "__main__":
    cli(main)
