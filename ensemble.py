"""Evaluate classifiers and their soft committee (the command line of tinytlm/ensemble.py).

    python ensemble.py runs/cls-fewrel-bert1-pt-s0 runs/cls-fewrel-bert1-h24-pt-s0 ...
"""
from tinytlm.common import cli
from tinytlm.ensemble import main

if __name__ == "__main__":
    cli(main)
