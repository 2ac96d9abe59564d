"""The fine-tuning loop: K >= 1 classifiers of one shape, one stacked model (K = 1: one plain model).

tinytlm/finetune.py holds the command line, the gap and resuming; tinytlm/session.py the setup, the step,
the save and the interruption context this loop shares with pre-training; this module reads the task,
builds the classifiers, trains, scores every epoch and writes the results.
"""
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tinytlm.committee import accuracy, per_label_accuracy, predict_member_logits
from tinytlm.common import UserError, write_json
from tinytlm.data import Shard, epoch_order, get_batch
from tinytlm.kernel_path import Impl
from tinytlm.model import BertConfig, BertForClassification
from tinytlm.session import (build_members, check_group, interruptible, open_device, precision_fields, run_precision,
                             save, setup, train_step)
from tinytlm.tasks import ensure_task, load_task
from tinytlm.tokstats import pair_stats, task_counts, wiki_counts
from tinytlm.train import StopAtBoundary, check_rows, device_name, lr_at, print_config, roots

# PAPER.md: Table 1 fine-tunes FewRel at 8e-5 / 1e-2; Tables 3-7 mostly 5e-5 with weight decay 1e-3..2e-2
TASK_DEFAULTS = {"agnews": (5e-5, 1e-2), "dbpedia": (5e-5, 1e-2), "fewrel": (8e-5, 1e-2)}


def token_stats(c_task, init_state):
    """T_C / T_W / T_M of this pairing (T_W = 0 without pre-training), or None when the pre-training
    shard is gone or no longer holds the rows the checkpoint was trained on."""
    if init_state is None:
        return pair_stats(c_task, np.zeros_like(c_task))
    d = init_state["data"]
    if "shard" not in d:  # e.g. a Hugging Face checkpoint: its pre-training data is unknown
        return None
    try:
        return pair_stats(c_task, wiki_counts(Shard(d["shard"]), d["ws"]))
    except UserError:
        return None


def run_arm(cfg, overrides: dict, init_state, out: Path, resume_state=None) -> dict:
    """Fine-tune one classifier into `out`: ckpt.pt at the start, after every epoch and at a Ctrl-C or
    SIGTERM (at a step boundary), then result.json. resume_state: an unfinished checkpoint of this arm,
    continued exactly (same data order, dropout and lr schedule; CPU: bitwise the uninterrupted run)."""
    return run_members([cfg], overrides, [init_state], [out], [resume_state] if resume_state else None)[0]


@dataclass
class TaskData:
    """The task a fine-tuning trains on and scores, with the hyper-parameters it resolves to."""
    spec: object  # the resolved TaskSpec
    task_dir: Path  # its prepared folder
    train: object  # the train Shard, and ytr its labels
    ytr: np.ndarray
    test: object  # the test Shard, and yte its labels
    yte: np.ndarray
    label_names: list
    lr: float  # --lr, or the task's default
    wd: float  # --weight_decay, or the task's default


def load(cfg, d) -> TaskData:
    """The task of cfg, prepared by rank 0 first under torchrun."""
    raw, data_root = roots(cfg)
    spec = cfg.spec()
    with d.main_first():  # rank 0 prepares the task, the others read it
        task_dir = ensure_task(spec, raw, data_root)
        train, ytr, test, yte, meta = load_task(task_dir)
    lr = cfg.lr or TASK_DEFAULTS[spec.task][0]
    wd = cfg.weight_decay if cfg.weight_decay >= 0 else TASK_DEFAULTS[spec.task][1]
    return TaskData(spec, task_dir, train, ytr, test, yte, meta["label_names"], lr, wd)


def start(cfgs: list, overrides: dict, init_states: list, outs: list, resume_states) -> tuple:
    """(session, task, progress, configs): the task, the members and the shared setup. progress: what each
    member knew when it started and has done since (kept in its checkpoints' extra)."""
    cfg = cfgs[0]
    d, device = open_device(cfg)
    precision = run_precision(cfg, device, resume_states)
    task = load(cfg, d)
    if resume_states:  # what each member knew when it started, kept in its checkpoint
        check_group(resume_states, lambda st: "" if st["extra"]["test_fingerprint"] == task.test.checksum.hex() else
                    f"{st['path']}: {task.test.path} is not the test set this run started with")
        progress = [st["extra"] for st in resume_states]
    else:
        counts = task_counts(task.task_dir)
        progress = [new_progress(task, ini, counts) for ini in init_states]
    impl = cfg.impl(device)  # the implementations every forward runs on, chosen at construction
    model, model_cfg = build_members(resume_states, lambda k: new_classifier(
        cfgs[k].seed, init_states[k], cfg.model, overrides, len(task.label_names), impl), len(cfgs), impl)
    check_rows(max(int(task.train.ids.max(initial=0)), int(task.test.ids.max(initial=0))), task.train.row_len,
               model_cfg, task.task_dir)
    configs = [{**asdict(c), **precision_fields(c, precision), "impl": asdict(impl), "lr": task.lr,
                "weight_decay": task.wd, "task_dir": task.task_dir.name, "model_config": model_cfg.to_dict()}
               for c in cfgs]  # config.json and the metrics header: what ran, the resolved Impl included
    if not cfg.quiet:
        seeds = ",".join(str(c.seed) for c in cfgs)
        print_config("config", {k: v for k, v in configs[0].items() if k not in ("model_config", "seed", "out")}
                     | {"seeds" if len(cfgs) > 1 else "seed": seeds, "out": ", ".join(map(str, outs))})
    s = setup(cfg, d, device, model, resume_states, task.lr, task.wd, outs, [c.seed for c in cfgs], configs,
              precision=precision)
    return s, task, progress, configs


def new_progress(task: TaskData, init_state, counts) -> dict:
    """A member's progress record at its start: its arm, its initialisation and token statistics (computed
    before training, so a late failure loses nothing), the test set's fingerprint; no epochs yet."""
    return {"arm": "pretrained" if init_state else "scratch", "init": init_state["path"] if init_state else None,
            "pretrain": init_state["data"] if init_state else None, "stats": token_stats(counts, init_state),
            "task": task.spec.task, "spec": asdict(task.spec), "label_names": task.label_names,
            "test_fingerprint": task.test.checksum.hex(), "accs": [], "loss_sum": 0.0, "train_s": 0.0, "eval_s": 0.0}


def run_members(cfgs: list, overrides: dict, init_states: list, outs: list, resume_states: list = None,
                resume_hint=None) -> list:
    """run_arm for K classifiers of one shape trained as one stacked model (tinytlm/members.py): member k
    has its own config (cfgs[k]: the seed differs), initialisation, run directory and checkpoint, exactly
    as run_arm writes them alone. resume_states: every member's unfinished checkpoint, all at one step.
    resume_hint: what --resume continues, for the message of an interrupted run."""
    cfg, K, outs = cfgs[0], len(cfgs), [Path(o) for o in outs]
    s, task, progress, configs = start(cfgs, overrides, init_states, outs, resume_states)
    d, device, B = s.d, s.device, cfg.batch_size
    steps_per_epoch = math.ceil(len(task.train) / B)
    total = (cfg.decay_epochs or min(cfg.epochs, 50)) * steps_per_epoch  # PAPER.md: decay over the first 50

    def save_now(results=None):  # each member's progress travels in its checkpoint's extra; finished: its result
        data = {"task_dir": task.task_dir.name, "spec": asdict(task.spec)}
        save(s, "cls", s.step // steps_per_epoch, [dict(train_config=c, data=data, extra={
            **p, "acc": p["accs"][-1] if p["accs"] else None, **({"result": results[k]} if results else {})})
            for k, (c, p) in enumerate(zip(configs, progress))], finished=bool(results))

    if not resume_states and cfg.save_every:
        save_now()  # a kill before the first epoch ends can resume too
    epoch0, first = divmod(s.step, steps_per_epoch)
    d.own_dropout()
    bar = tqdm(range(epoch0, cfg.epochs), desc=f"finetune {progress[0]['arm']}" + (f" x{K}" if K > 1 else ""),
               unit="epoch", disable=cfg.quiet or not d.main or None)
    with interruptible(s, bar, save_now, resume_hint or (outs[0].parent if cfg.gap else outs[0])) as sigint:
        for epoch in bar:
            orders = [epoch_order(len(task.train), seed, epoch) for seed in s.seeds]  # each member's own order
            s.model.train()
            loss_sum = torch.tensor([0.0 if epoch > epoch0 or first == 0 or not d.main else p["loss_sum"]
                                     for p in progress], device=device)  # fp32, as saved (torchrun: rank 0's)
            t0 = time.perf_counter()
            for b in range(first if epoch == epoch0 else 0, steps_per_epoch):
                xys = [get_batch(task.train.ids, o[b * B:(b + 1) * B], device, task.ytr) for o in orders]
                x, y = (torch.cat(t).to(device) for t in zip(*xys))  # (K*B, T) and (K*B,), member-major
                if d.on:  # this process's share of the batch
                    x, y = d.rows(x, K), d.rows(y, K, fill=-100)
                # torchrun: summed over this share's rows, / the global batch: DDP's mean is the loss
                _, loss = train_step(s, lr_at(s.step, total, task.lr), x, y, len(xys[0][1]))
                loss_sum += loss.detach().float().view(K)
                # torchrun: every process is asked at the epoch's end (below), so all stop at the same step
                if sigint["set"] and not d.on and b < steps_per_epoch - 1:  # at an epoch's end: score it first
                    keep(progress, d.all_sum(loss_sum).tolist(), time.perf_counter() - t0)
                    raise StopAtBoundary
            logits, losses = score_epoch(s, task, progress, epoch, d.all_sum(loss_sum) / steps_per_epoch, t0, cfg)
            bar.set_postfix(loss=f"{losses[0]:.3f}", test_acc=f"{progress[0]['accs'][-1]:.4f}")
            if epoch + 1 < cfg.epochs and cfg.save_every and (epoch + 1) % cfg.save_every == 0:
                save_now()
            if epoch + 1 < cfg.epochs and d.any(sigint["set"], device):
                raise StopAtBoundary
    results = [result(task, p, c, logits[k], s, cfg, len(cfgs)) for k, (c, p) in enumerate(zip(cfgs, progress))]
    save_now(results)  # a kill before every result.json is written: arms() writes the rest from these checkpoints
    for o, r in zip(outs, results if d.main else []):
        write_json(o / "result.json", r)
    return results


def keep(progress: list, loss_sums: list, seconds: float):
    """An epoch stopped in its middle: each member's loss sum so far and the time it trained, kept in its
    progress (its checkpoint) so the resumed epoch ends as the uninterrupted one."""
    for p, v in zip(progress, loss_sums):
        p["loss_sum"], p["train_s"] = v, p["train_s"] + seconds


def score_epoch(s, task: TaskData, progress: list, epoch: int, epoch_loss, t0: float, cfg):
    """The end of an epoch: every member scored on the test set, its progress and epoch record written, one
    line printed. Returns the members' test logits (K, N, C) and their epoch losses."""
    epoch_loss = epoch_loss.tolist()  # syncs: the steps are done
    s.nonfinite.check()
    t1 = time.perf_counter()
    logits = predict_member_logits(s.model.module if s.d.on else s.model, task.test.ids, s.device,
                                   precision=s.precision)  # syncs
    t2 = time.perf_counter()
    for k, (p, log) in enumerate(zip(progress, s.logs)):
        p["train_s"] += t1 - t0
        p["eval_s"] += t2 - t1
        p["accs"].append(accuracy(logits[k], task.yte))
        p["loss_sum"] = 0.0
        log.write({"kind": "epoch", "epoch": epoch, "step": s.step, "train_loss": epoch_loss[k],
                   "test_acc": p["accs"][-1]})
    accs = [p["accs"][-1] for p in progress]
    if not cfg.quiet:
        tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: train loss {', '.join(f'{v:.4f}' for v in epoch_loss)}, "
                   f"test acc {', '.join(f'{a:.4f}' for a in accs)}")
    return logits, epoch_loss


def result(task: TaskData, p: dict, c, logits, s, cfg, K: int) -> dict:
    """A member's result.json: final-epoch accuracy (and the best, selected on test), per label, token
    statistics, hyper-parameters, speed."""
    accs, n_labels = p["accs"], len(task.label_names)
    return {
        "task": task.task_dir.name, "arm": p["arm"], "init": p["init"], "pretrain": p["pretrain"],
        "acc": accs[-1], "acc_best_selected_on_test": max(accs), "best_epoch": int(np.argmax(accs)) + 1,
        "acc_per_epoch": accs,
        "per_label_acc": dict(zip(task.label_names, per_label_accuracy(logits, task.yte, n_labels))),
        "token_stats": p["stats"], "n_train": len(task.train), "n_test": len(task.test), "seed": c.seed,
        "lr": task.lr, "wd": task.wd, "epochs": cfg.epochs, "model_config": s.raw_model.config.to_dict(),
        "params": s.raw_model.num_params(), "device": device_name(s.device), "precision": s.precision,
        # wall time per sequence, first epoch (compilation) included; stacked: this member's share
        "seq_per_s": round(len(task.train) * cfg.epochs / max(p["train_s"], 1e-9), 1),
        "eval_seq_per_s": round(len(task.test) * cfg.epochs / max(p["eval_s"], 1e-9), 1),
        **({"stacked": K} if K > 1 else {}),
    }


def new_classifier(seed: int, init_state, model: str, overrides: dict, n_labels: int, impl=Impl()):
    """A classifier as a run with this seed starts it: seeded, then the trunk from init_state (or a fresh
    `model` preset with overrides), the head freshly initialised."""
    torch.manual_seed(seed)
    if init_state is None:
        return BertForClassification(BertConfig.preset(model, **overrides), n_labels, impl=impl)
    m = BertForClassification(BertConfig.from_dict(init_state["model_config"]), n_labels, impl=impl)
    trunk = {k[len("bert."):]: v for k, v in init_state["model"].items() if k.startswith("bert.")}
    try:
        m.bert.load_state_dict(trunk)  # strict: the trunk must match exactly
    except RuntimeError as e:
        raise UserError(f"{init_state['path']}: its weights do not match its config ({str(e).splitlines()[0]})")
    return m
