"""The end-to-end demo: data, pre-training, fine-tuning with the gap, a committee. About 10 minutes on 2 CPU cores.

    python -m tinytlm.demo                 # everything under runs/demo/
    python -m tinytlm.demo --ws 2000 --pretrain-epochs 2 --train-per-label 300   # quicker

Raw data comes from $TINYTLM_RAW or ../shared/data; where neither exists (a fresh clone), the demo first
downloads what it needs into data/raw -- the vocabulary, AG News and the first Wikipedia parquet file
(reading it needs pyarrow) -- and says so (tinytlm/download.py).

Steps: prepare the first W_s rows of shuffled Wikipedia and AG News (if missing), print
the token statistics, pre-train the `tiny` BERT with MLM, fine-tune it on a small AG
News sample (~1,000 train / 250 test rows per label) with and without pre-training
(same seed: the gap), fine-tune a second
pre-trained member with another seed, and evaluate the soft committee of the two.
It is a demonstration of the pipeline at CPU size, not a reproduction: at this size
the gap is small and noisy (see results/ for the real experiments).
"""
import shutil
import time
from pathlib import Path

from tinytlm import ensemble, finetune, pretrain, tokstats
from tinytlm.checkpoint import load_checkpoint
from tinytlm.common import ArgParser, add_option, cli, default_raw_root, home, read_json, write_json
from tinytlm.download import fetch_missing


def parser() -> ArgParser:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_option(ap, "--ws", type=int, default=4000, help="Wikipedia rows to pre-train on", low=1)
    add_option(ap, "--pretrain-epochs", type=int, default=3, help="MLM epochs", low=1)
    add_option(ap, "--train-per-label", type=int, default=1000, help="AG News train rows per label", low=1)
    add_option(ap, "--test-per-label", type=int, default=250, help="AG News test rows per label", low=1)
    add_option(ap, "--finetune-epochs", type=int, default=3, help="fine-tuning epochs", low=1)
    add_option(ap, "--out", type=Path, default=home() / "runs" / "demo", help="output folder", kind="out")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    t0 = time.time()
    settings = {k: str(v) for k, v in vars(args).items()}
    if (args.out / "demo.json").is_file() and read_json(args.out / "demo.json") != settings:
        print(f"{args.out} holds a demo run with other settings: starting afresh")
        shutil.rmtree(args.out)
    write_json(args.out / "demo.json", settings)
    task = ["--task", "agnews", "--train-per-label", str(args.train_per_label),
            "--test-per-label", str(args.test_per_label)]

    print(f"\n== 1. data and token statistics (W_s = {args.ws:,}) ==")
    # a fresh clone has no raw data: fetch all the demo needs up front (pyarrow is checked before any byte)
    fetch_missing(["vocab", "agnews", "wikipedia"], default_raw_root(), wiki_rows=args.ws)
    tokstats.main([*task, "--ws", str(args.ws)])

    print("\n== 2. MLM pre-training of `tiny` ==")
    # a second run of the demo reuses what the first finished (and resumes what it left half-done)
    mlm = args.out / "mlm"
    if not (mlm / "ckpt.pt").is_file():
        # a higher lr than the paper's 5.5e-5: `tiny` sees few steps here
        pretrain.main(["--model", "tiny", "--ws", str(args.ws), "--epochs", str(args.pretrain_epochs),
                       "--lr", "5e-4", "--out", str(mlm)])
    elif load_checkpoint(mlm, kind="mlm")["optimizer"] is not None:
        pretrain.main(["--resume", str(mlm)])
    else:
        print(f"reusing {mlm}")

    print("\n== 3. fine-tuning with and without pre-training (the gap) ==")
    # the cpu scale of the paper runner: a few epochs at a higher lr than the paper's 5e-5 x 50 epochs
    ft = [*task, "--epochs", str(args.finetune_epochs), "--decay_epochs", str(args.finetune_epochs), "--lr", "5e-4",
          "--quiet"]
    gap_dir = args.out / "gap"
    if (gap_dir / "gap.json").is_file():
        gap = read_json(gap_dir / "gap.json")
        print(f"reusing {gap_dir}: gap {gap['gap']:+.4f}")
    else:
        for arm in ("pretrained", "scratch"):  # an earlier run stopped between the arms: start the gap afresh
            shutil.rmtree(gap_dir / arm, ignore_errors=True)
        gap = finetune.main([*ft, "--init", str(mlm), "--gap", "--out", str(gap_dir)])

    print("\n== 4. a second pre-trained member (seed 1) and the soft committee ==")
    member2 = args.out / "member2"
    if not (member2 / "result.json").is_file():
        shutil.rmtree(member2, ignore_errors=True)
        finetune.main([*ft, "--init", str(mlm), "--seed", "1", "--out", str(member2)])
    res = ensemble.main([str(gap_dir / "pretrained"), str(member2), "--latency-samples", "20"])

    print(f"\n== summary ({time.time() - t0:.0f} s) ==")
    print(f"AG News ({args.train_per_label}/{args.test_per_label} per label), tiny BERT: pre-trained "
          f"{gap['acc_pretrained']:.4f}, scratch {gap['acc_scratch']:.4f}, gap {gap['gap']:+.4f}; "
          f"committee of 2 pre-trained members {res['committee']['acc']:.4f}")
    print("At this CPU size pre-training is far too short to help (see results/README.md); "
          "python -m tinytlm.paper TABLE runs the paper's experiments.")


if __name__ == "__main__":
    cli(main)
