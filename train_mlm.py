"""Pre-train a BERT with masked-language modelling (the command line of tinytlm/pretrain.py).

    python train_mlm.py --ws 40000                                  # the paper's BERT-6 setup
    python train_mlm.py --model tiny --ws 2000 --epochs 2            # a CPU-sized run
    python train_mlm.py --resume runs/mlm-tiny-random-ws2000-s0      # continue exactly
"""
from tinytlm.common import cli
from tinytlm.pretrain import main

if __name__ == "__main__":
    cli(main)
