"""One variant's training step, timed in a process of its own (bench/cpu.py's steps section starts one per
variant through bench/cpu_rounds.py): each variant gets the process a run would have -- the freed memory that
tinytlm/cpu_memory.py keeps is process-wide and cannot be undone -- and the code before issue 21 runs from a
tree of its own revision.

    PYTHONPATH=<tree> python bench/cpu_worker.py '{"kind": "mlm", "model": "tiny", "overrides": {},
                                                   "batch": "/tmp/b.pt", "variant": "pre-issue"}'

spec: kind "mlm" | "cls"; model a BertConfig preset and overrides of its fields; batch a torch.save'd
{"x", "am", "y"} (bench/cpu_steps.py batch, made once by the parent so that every worker steps on the same
rows); variant "pre-issue" (fp32 eager plain head, the revision's own optimizer and memory: the API below
only) or a dict of fields over today's default (today_step: {} is what train_mlm.py / train_cls.py do by
default here, the Impl their switches resolve to included).

Line protocol: the worker opens the device as a run does (the revision's tinytlm.session.open_device: today's
keeps freed memory on a CPU), builds the step, runs WARMUP steps and prints `ready <json>` (the tinytlm it
imported, the variant, threads, whether its open_device keeps freed memory); then for each `go` line on stdin
it runs one step and prints its ms (its own clock: the pipe is not timed); `quit` or the end of stdin ends it.
Anything the code prints goes to stderr, so stdout carries the protocol only. An error: a traceback on stderr,
exit 1.

For the pre-issue variant nothing is imported from bench/ (PYTHONPATH is that revision's tree, whose bench/
differs), only the API that revision 0cb7440 (the last commit before issue 21) and today share:
BertConfig.preset, BertForMLM / BertForClassification(cfg, ..., impl=Impl()), session.open_device,
mlm_rows.mlm_rows, train.make_optimizer.
"""
import dataclasses
import inspect
import json
import os
import sys
import time
from types import SimpleNamespace

import torch

WARMUP = 2  # untimed steps before `ready`: the first ones allocate (and a compiled variant compiles)
N_LABELS = 4  # bench/cpu_steps.py N_LABELS (not imported: see the module docstring)
LR = 5.5e-5  # bench/cpu_steps.py step_fn's
PRE_ISSUE = {"precision": "fp32", "head": "plain", "compile": "off", "members": 1}  # what that code ran


def pre_issue_step(kind: str, cfg, b: dict, device):
    """bench/cpu_steps.py step_fn for one member in fp32 eager with the plain head, in the shared API."""
    from tinytlm.kernel_path import Impl
    from tinytlm.mlm_rows import mlm_rows
    from tinytlm.model import BertForClassification, BertForMLM
    from tinytlm.train import make_optimizer
    torch.manual_seed(0)
    model = (BertForMLM(cfg, impl=Impl()) if kind == "mlm" else
             BertForClassification(cfg, N_LABELS, impl=Impl())).train()
    opt = make_optimizer(model, LR, 0.01, device)  # that revision's: unfused AdamW on a CPU
    x, am, y = b["x"], b["am"], b["y"]
    rows, y = mlm_rows(y, 0, 1) if kind == "mlm" else (None, y)  # the sparse head's rows

    def step():
        _, loss = model(x, am, y, rows=rows) if kind == "mlm" else model(x, am, y)
        loss.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def today_step(kind: str, cfg, b: dict, fields: dict, device):
    """(variant, step): what a run does by default here -- bench/cpu_steps.py default_variant's precision and
    compile, the Impl a run's switches resolve to on this device (tinytlm/config.py Switches.impl, as pretrain.py
    and finetune_loop.py call it: head, unpad, ...) -- with `fields` replaced, through cpu_steps.step_fn. The
    variant records the Impl's fields that are not the references' (`impl`, beside the head)."""
    from bench.cpu_steps import default_variant, step_fn
    from tinytlm.config import Switches
    from tinytlm.kernel_path import Impl
    impl = Switches().impl(device)
    v = {**default_variant(device), **fields}
    impl = dataclasses.replace(impl, head=v["head"])
    ref = dataclasses.asdict(Impl())
    v["impl"] = {k: x for k, x in dataclasses.asdict(impl).items() if k != "head" and x != ref[k]}
    return v, step_fn(kind, cfg, v, b, LR, impl=impl)


def build(spec: dict):
    """(facts for the ready line, step) of spec (see the module docstring)."""
    import tinytlm
    from tinytlm import session
    from tinytlm.model import BertConfig
    _, device = session.open_device(SimpleNamespace(device="cpu"))  # as a run opens it: memory kept or not
    cfg = BertConfig.preset(spec["model"], **spec["overrides"])
    b = torch.load(spec["batch"])
    if spec["variant"] == "pre-issue":
        v, step = PRE_ISSUE, pre_issue_step(spec["kind"], cfg, b, device)
    else:
        v, step = today_step(spec["kind"], cfg, b, spec["variant"], device)
    facts = {"tinytlm": tinytlm.__file__, "variant": v, "threads": torch.get_num_threads(), "pid": os.getpid(),
             "keeps_freed_memory": "keep_freed_memory(" in inspect.getsource(session.open_device)}
    return facts, step


def main(argv=None):
    spec = json.loads((argv if argv is not None else sys.argv[1:])[0])
    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries the protocol only
    facts, step = build(spec)
    for _ in range(WARMUP):
        step()
    print("ready " + json.dumps(facts), file=out, flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd != "go":
            raise ValueError(f"cpu_worker: unknown command {cmd!r} (go or quit)")
        t0 = time.perf_counter()
        step()
        print(f"{(time.perf_counter() - t0) * 1e3:.4f}", file=out, flush=True)


if __name__ == "__main__":
    main()
