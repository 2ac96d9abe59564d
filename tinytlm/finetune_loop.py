"""The fine-tuning loop: K >= 1 classifiers of one shape, one stacked model (K = 1: one plain model).

tinytlm/finetune.py holds the config, the command line, the gap and resuming; this module trains.
"""
import math
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tinytlm.checkpoint import build_model, save_members, set_rng_state
from tinytlm.committee import accuracy, per_label_accuracy, predict_member_logits
from tinytlm.common import Interrupted, UserError, write_json
from tinytlm.data import Shard, epoch_order, get_batch
from tinytlm.dist import Dist
from tinytlm.kernel_path import Impl
from tinytlm.members import member_loss_sums, stack_models, stack_optimizer_states
from tinytlm.model import BertConfig, BertForClassification
from tinytlm.tasks import ensure_task, load_task
from tinytlm.tokstats import pair_stats, task_counts, wiki_counts
from tinytlm.train import (NonFinite, QuietLog, RunLog, StopAtBoundary, autocast, check_rows, deferred_sigint, device_name,
                           grad_norms, lr_at, make_optimizer, prepare_model, print_config, resolve_device, roots)

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


def run_members(cfgs: list, overrides: dict, init_states: list, outs: list, resume_states: list = None,
                resume_hint=None) -> list:
    """run_arm for K classifiers of one shape trained as one stacked model (tinytlm/members.py): member k
    has its own config (cfgs[k]: the seed differs), initialisation, run directory and checkpoint, exactly
    as run_arm writes them alone. resume_states: every member's unfinished checkpoint, all at one step.
    resume_hint: what --resume continues, for the message of an interrupted run."""
    cfg, K = cfgs[0], len(cfgs)
    for name in ("epochs", "decay_epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} {getattr(cfg, name)}: must be >= 1")
    for name in ("save_every", "interrupt_at"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} {getattr(cfg, name)}: must be >= 0")
    if not 0.0 <= cfg.lr < float("inf"):  # also refuses nan; 0 = the task's default
        raise UserError(f"--lr {cfg.lr}: must be positive and finite (0 = the task's default)")
    if not (cfg.wd == -1.0 or 0.0 <= cfg.wd < float("inf")):
        raise UserError(f"--wd {cfg.wd}: must be >= 0 and finite (-1 = the task's default)")
    d = Dist()  # torchrun: this process's share of every batch (tinytlm/dist.py); else one process
    device = d.setup(resolve_device(cfg.device))
    raw, data_root = roots(cfg)
    spec = cfg.spec()
    with d.main_first():  # rank 0 prepares the task, the others read it
        task_dir = ensure_task(spec, raw, data_root)
        train, ytr, test, yte, meta = load_task(task_dir)
    n_labels = len(meta["label_names"])
    lr = cfg.lr or TASK_DEFAULTS[spec.task][0]
    wd = cfg.wd if cfg.wd >= 0 else TASK_DEFAULTS[spec.task][1]
    seeds = [c.seed for c in cfgs]

    impl = Impl(cfg.kernels, cfg.unpad)  # the implementations every forward runs on
    if resume_states:  # what each member knew when it started, kept in its checkpoint
        progress = [st["extra"] for st in resume_states]
        for st in resume_states:
            if st["extra"]["test_fingerprint"] != test.checksum.hex():
                raise UserError(f"{st['path']}: {test.path} is not the test set this run started with")
        if len({st["step"] for st in resume_states}) > 1:
            raise UserError(f"{resume_states[0]['path']}: the members' checkpoints are at different steps "
                            f"({', '.join(str(st['step']) for st in resume_states)}); resume each alone")
        singles = [build_model(st, impl) for st in resume_states]
    else:
        counts = task_counts(task_dir)
        progress = [{"arm": "pretrained" if ini else "scratch", "init": ini["path"] if ini else None,
                     "pretrain": ini["data"] if ini else None,
                     "stats": token_stats(counts, ini),  # before training: a late failure loses nothing
                     "task": spec.task, "spec": asdict(spec), "label_names": meta["label_names"],
                     "test_fingerprint": test.checksum.hex(), "accs": [], "loss_sum": 0.0, "train_s": 0.0,
                     "eval_s": 0.0} for ini in init_states]
        singles = [new_classifier(c.seed, ini, cfg.model, overrides, n_labels, impl)
                   for c, ini in zip(cfgs, init_states)]
    model_cfg = singles[0].config
    model = stack_models(singles)
    del singles
    check_rows(max(int(train.ids.max(initial=0)), int(test.ids.max(initial=0))), train.row_len, model_cfg, task_dir)
    configs = [{**asdict(c), "lr": lr, "wd": wd, "task_dir": task_dir.name, "model_config": model_cfg.to_dict()}
               for c in cfgs]
    if not cfg.quiet:
        print_config("config", {k: v for k, v in configs[0].items() if k not in ("model_config", "seed", "out")}
                     | {"seeds" if K > 1 else "seed": ",".join(map(str, seeds)), "out": ", ".join(map(str, outs))})
    raw_model = model
    model = d.wrap(prepare_model(model, device, cfg.compile, cfg.compile_mode), device,
                   cfg.compile_mode)
    opt = make_optimizer(raw_model, lr, wd, device)
    params = list(raw_model.parameters())
    step = 0
    if resume_states:
        opt.load_state_dict(stack_optimizer_states(raw_model, [st["optimizer"] for st in resume_states]) if K > 1
                            else resume_states[0]["optimizer"])
        set_rng_state(resume_states[0]["rng"])
        step = resume_states[0]["step"]
        print(f"resuming {', '.join(st['path'] for st in resume_states)} at step {step}")
    stack = {"seeds": seeds, "members": [str(o) for o in outs]} if K > 1 else None
    logs = [RunLog(o, {**c, "world_size": d.world}, device, resume=bool(resume_states), stack=stack) if d.main
            else QuietLog() for o, c in zip(outs, configs)]

    n = len(train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.decay_epochs * steps_per_epoch
    ytr_t = torch.from_numpy(ytr)

    nonfinite = NonFinite(outs, seeds, device, "try a lower --lr")

    def save(results=None):  # each member's progress travels in its checkpoint's extra; finished: its result
        nonfinite.check()
        if d.main:  # (rank 0 alone writes)
            save_members(raw_model, [(o / "ckpt.pt", dict(
                kind="cls", optimizer=None if results else opt, step=step, epoch=step // steps_per_epoch,
                train_config=c, data={"task_dir": task_dir.name, "spec": asdict(spec)},
                extra={**p, "acc": p["accs"][-1] if p["accs"] else None, **({"result": results[k]} if results else {})}))
                for k, (o, c, p) in enumerate(zip(outs, configs, progress))])

    if not resume_states and cfg.save_every:
        save()  # a kill before the first epoch ends can resume too
    epoch0, first = divmod(step, steps_per_epoch)
    arm = progress[0]["arm"] + (f" x{K}" if K > 1 else "")
    d.own_dropout()
    bar = tqdm(range(epoch0, cfg.epochs), desc=f"finetune {arm}", unit="epoch",
               disable=cfg.quiet or not d.main or None)
    graphs = cfg.compile and cfg.compile_mode == "reduce-overhead"
    try:
        with deferred_sigint() as sigint:
            for epoch in bar:
                orders = [epoch_order(n, s, epoch) for s in seeds]  # each member's own data order
                model.train()
                if epoch > epoch0 or first == 0:
                    for p in progress:
                        p["loss_sum"] = 0.0
                loss_sum = torch.tensor([p["loss_sum"] if d.main else 0.0 for p in progress],  # fp32, as saved
                                        device=device)  # (torchrun: rank 0 holds what was saved)
                t0 = time.perf_counter()
                for b in range(first if epoch == epoch0 else 0, steps_per_epoch):
                    if graphs:
                        torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are consumed
                    for g in opt.param_groups:
                        g["lr"] = lr_at(step, total, lr)
                    rows = [np.sort(o[b * cfg.batch_size:(b + 1) * cfg.batch_size]) for o in orders]
                    x = torch.cat([get_batch(train.ids, r, device) for r in rows])  # (K*B, T), member-major
                    y = torch.cat([ytr_t[r] for r in rows]).to(device)
                    if d.on:  # this process's share of the batch
                        x, y = d.rows(x, K), d.rows(y, K, fill=-100)
                    with autocast(device):
                        logits, loss = model(x, targets=y)
                    if cfg.interrupt_at and step + 1 == cfg.interrupt_at:
                        signal.raise_signal(signal.SIGINT)  # testing: a Ctrl-C in the middle of a step
                    if d.on:  # summed over this share's rows, / the global batch: DDP's mean is the loss
                        loss = member_loss_sums(logits, y, K) / len(rows[0])
                        (loss.sum() * d.world).backward()
                    else:
                        loss.sum().backward()  # K members: the sum of their mean losses, no coupling
                    nonfinite.update(loss, step + 1, grad_norms(params, K))
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    loss_sum += loss.detach().float().view(K)
                    step += 1
                    # torchrun: every process is asked at the epoch's end (below), so all stop at the same step
                    if sigint["set"] and not d.on and b < steps_per_epoch - 1:  # at an epoch's end: score it first
                        dt = time.perf_counter() - t0
                        for p, v in zip(progress, d.all_sum(loss_sum).tolist()):
                            p["loss_sum"], p["train_s"] = v, p["train_s"] + dt
                        raise StopAtBoundary
                epoch_loss = (d.all_sum(loss_sum) / steps_per_epoch).tolist()  # syncs: the steps are done
                nonfinite.check()
                t1 = time.perf_counter()
                logits = predict_member_logits(model.module if d.on else model, test.ids, device)  # (K, N, C); syncs
                t2 = time.perf_counter()
                for k, (p, log) in enumerate(zip(progress, logs)):
                    p["train_s"] += t1 - t0
                    p["eval_s"] += t2 - t1
                    p["accs"].append(accuracy(logits[k], yte))
                    p["loss_sum"] = 0.0
                    log.write({"kind": "epoch", "epoch": epoch, "step": step, "train_loss": epoch_loss[k],
                               "test_acc": p["accs"][-1]})
                accs = [p["accs"][-1] for p in progress]
                bar.set_postfix(loss=f"{epoch_loss[0]:.3f}", test_acc=f"{accs[0]:.4f}")
                if not cfg.quiet:
                    tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: train loss {', '.join(f'{v:.4f}' for v in epoch_loss)}, "
                               f"test acc {', '.join(f'{a:.4f}' for a in accs)}")
                if epoch + 1 < cfg.epochs:
                    if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
                        save()
                    if d.any(sigint["set"], device):
                        raise StopAtBoundary
    except StopAtBoundary:
        bar.close()
        save()
        raise Interrupted(f"interrupted at step {step}: checkpoint {outs[0] / 'ckpt.pt'}"
                          f"{f' and {K - 1} more' if K > 1 else ''}; continue with --resume "
                          f"{resume_hint or (outs[0].parent if cfg.gap else outs[0])}")
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(f"stopped in the middle of step {step + 1}; {outs[0] / 'ckpt.pt'} holds the last saved "
                          f"state") from None
    except (OSError, UserError):  # a full disk, a non-finite loss: the bar ends before the one-line error
        bar.close()
        raise

    results = []
    for k, (c, p, o) in enumerate(zip(cfgs, progress, outs)):
        accs = p["accs"]
        results.append({
            "task": task_dir.name, "arm": p["arm"], "init": p["init"], "pretrain": p["pretrain"],
            "acc": accs[-1], "acc_best_selected_on_test": max(accs), "best_epoch": int(np.argmax(accs)) + 1,
            "acc_per_epoch": accs,
            "per_label_acc": dict(zip(meta["label_names"], per_label_accuracy(logits[k], yte, n_labels))),
            "token_stats": p["stats"], "n_train": n, "n_test": len(test), "seed": c.seed, "lr": lr, "wd": wd,
            "epochs": cfg.epochs, "model_config": model_cfg.to_dict(), "params": raw_model.num_params(),
            "device": device_name(device),
            # wall time per sequence, first epoch (compilation) included; stacked: this member's share
            "seq_per_s": round(n * cfg.epochs / max(p["train_s"], 1e-9), 1),
            "eval_seq_per_s": round(len(test) * cfg.epochs / max(p["eval_s"], 1e-9), 1),
            **({"stacked": K} if K > 1 else {}),
        })
    save(results)  # a kill before every result.json is written: arms() writes the rest from these checkpoints
    for o, r in zip(outs, results if d.main else []):
        write_json(o / "result.json", r)
    return results


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
