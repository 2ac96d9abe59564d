"""Prepare the Wikipedia pre-training shard (the command line of tinytlm/wikipedia.py, which
documents the shuffle and the formats read).

    python data_prep/wikipedia.py                  # all articles under $TINYTLM_RAW or ../shared/data
    python data_prep/wikipedia.py --rows 5000      # only the first 5,000 rows of the shuffled order
"""
from tinytlm.common import cli
from tinytlm.wikipedia import main

if __name__ == "__main__":
    cli(main)
