"""Fine-tune a BERT classifier, with or without pre-training (the command line of tinytlm/finetune.py).

    python train_cls.py --task agnews                               # no pre-training (scratch bert6)
    python train_cls.py --task agnews --init runs/mlm-... --gap      # both arms, same seed: the gap
"""
from tinytlm.common import cli
from tinytlm.finetune import main

if __name__ == "__main__":
    cli(main)
