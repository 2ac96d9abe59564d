"""Prepare a classification task's shards (the command line of tinytlm/tasks.py, which documents
the formats read and the sampling).

    python data_prep/tasks.py --task agnews                       # 1000/1000 per label
    python data_prep/tasks.py --task fewrel --labels 0,2,5,10,11,12,13,14,15,3   # 630/70 from val_wiki
"""
from tinytlm.common import cli
from tinytlm.tasks import main

if __name__ == "__main__":
    cli(main)
