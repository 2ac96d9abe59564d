"""Pre-train a BERT with masked-language modelling on the first W_s rows of shuffled Wikipedia.

    python train_mlm.py --ws 40000                                  # the paper's BERT-6 setup
    python train_mlm.py --model tiny --ws 2000 --epochs 2            # a CPU-sized run
    python train_mlm.py --model bert1 --n_conv 2 --conv_kernel 16,3 --ws 40000
    python train_mlm.py --pretrain_set custom --task fewrel           # Tables 1-2's custom-made set
    python train_mlm.py --resume runs/mlm-tiny-random-ws2000-s0      # continue exactly
    python train_mlm.py --model bert1 --seeds 0,1,2,3,4 --out runs/b1  # 5 models as one stacked run

Defaults are the paper's: bert6, 50 epochs, batch 32, AdamW lr 5.5e-5, weight decay
1e-2, linear decay to 0 over all optimizer steps, no warm-up. Outputs in --out
(default runs/<name>): config.json, metrics.jsonl (a header line, then step and
epoch records), ckpt.pt (every epoch and on Ctrl-C). With --seeds, one model per seed is
trained in one stacked model (tinytlm/members.py); member s is written to OUT/s<s>/ exactly as
`--seed s --out OUT/s<s>` writes it (without --out: the run name of its single run), and
OUT/stack.json lets `--resume OUT` continue all members.
"""
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from tinytlm.checkpoint import build_model, load_checkpoint, load_group, save_members, set_rng_state
from tinytlm.common import Interrupted, UserError, cli, config_hash, home, read_json, write_json
from tinytlm.data import epoch_order, get_batch, mask_generator, mask_tokens, special_ids
from tinytlm.dist import Dist
from tinytlm.members import clip_grad_norm_members, member_loss_sums, stack_models, stack_optimizer_states
from tinytlm.kernel_path import Impl
from tinytlm.mlm_rows import mlm_rows
from tinytlm.model import BertConfig, BertForMLM
from tinytlm.train import (NonFinite, QuietLog, RunLog, StopAtBoundary, autocast, check_rows, deferred_sigint, grad_norms, lr_at,
                           make_optimizer, member_seeds, parse_run_args, prepare_model, print_config, refuse_existing,
                           resolve_device, resumed_config, roots, switch)


# -----------------------------------------------------------------------------
# config

@dataclass
class MLMConfig:
    model: str = "bert6"  # preset name (see BertConfig.presets()); model flags below override it
    ws: int = 40000  # W_s: rows of the shuffled Wikipedia shard (random set) or cap of a constructed set (0 = all)
    pretrain_set: str = "random"  # random | custom | raised-tm
    task: str = "fewrel"  # constructed sets: the task whose tokens define them
    labels: str = ""  # constructed sets: the task's label indices (default all)
    train_per_label: int = 0  # constructed sets: the task's sample size (0 = paper's)
    test_per_label: int = 0  # constructed sets: the task's sample size (0 = paper's)
    fewrel_source: str = "val_wiki"  # constructed sets on FewRel: val_wiki | train_wiki
    epochs: int = 50  # passes over the pre-training rows
    batch_size: int = 32  # sequences per optimizer step
    lr: float = 5.5e-5  # peak AdamW learning rate, decayed linearly to 0
    weight_decay: float = 1e-2  # AdamW weight decay
    grad_clip: float = 0.0  # max gradient norm (0 = off; the paper's code does not clip)
    mask_per_row: int = 0  # 0: Bernoulli 15% masking; k > 0: exactly k chosen per row (static shapes)
    mask_cap: int = 0  # k > 0: Bernoulli 15% masking, at most k chosen per row (static shapes, the paper's masks)
    seed: int = 0  # data order, masks, init and dropout all follow from it
    seeds: str = ""  # comma-separated seeds: one model per seed, trained stacked (excludes --seed)
    device: str = switch("auto")  # auto | cpu | cuda
    compile: bool = switch(False)  # torch.compile the model
    compile_mode: str = switch("default")  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    kernels: str = switch("torch")  # torch | triton attention/conv-stem kernels
    unpad: bool = switch(False)  # run on the packed real tokens, not the padding (tinytlm/unpad.py)
    log_every: int = switch(50)  # optimizer steps between metric records
    save_every: int = switch(1)  # epochs between checkpoints (0 = only the final one and at Ctrl-C/SIGTERM)
    val_every: int = switch(1)  # epochs between held-out MLM evaluations, and at the end (0 = never)
    max_steps: int = switch(0)  # stop after this many steps (0 = all epochs); the schedule still spans all epochs
    interrupt_at: int = switch(0)  # testing: deliver a Ctrl-C in the middle of this step (1-based; 0 = never)
    out: str = switch("")  # run directory (default runs/<name>)
    resume: str = switch("")  # run directory or checkpoint to continue exactly
    data: str = switch("")  # prepared data root (default $TINYTLM_DATA or ./data)
    raw: str = switch("")  # raw data root (default $TINYTLM_RAW, else ../shared/data if it exists, else data/raw)

    def run_name(self, overrides=None) -> str:
        extra = f"-{config_hash(overrides)}" if overrides else ""  # e.g. --n_conv 2 gets its own folder
        task = f"-{self.task}" if self.pretrain_set != "random" else ""
        seed = self.seeds.replace(",", "+") if self.seeds else self.seed
        return f"mlm-{self.model}{extra}-{self.pretrain_set}{task}-ws{self.ws}-s{seed}"


def parse(argv=None):
    return parse_run_args(MLMConfig, __doc__, "training", argv)


# -----------------------------------------------------------------------------
# data

def pretrain_rows(cfg: MLMConfig):
    """(ids array of the pre-training rows, data meta) for the chosen pre-training set."""
    from tinytlm.tasks import TaskSpec, ensure_task, parse_labels
    from tinytlm.wikipedia import ensure_wiki
    from tinytlm.data import Shard
    from tinytlm.tokstats import build_pretrain_set, pretrain_path
    raw, data = roots(cfg)
    if cfg.ws < 0:
        raise UserError(f"--ws {cfg.ws}: must be >= 0")
    if cfg.pretrain_set == "random":
        if cfg.ws == 0:
            raise UserError("--ws 0: nothing to pre-train on (the no-pre-training arm is train_cls.py without --init)")
        shard = ensure_wiki(cfg.ws, raw, data)
        return rows_meta(shard, shard.ids[:cfg.ws], data, {"pretrain_set": "random", "ws": cfg.ws})
    if cfg.pretrain_set not in ("custom", "raised-tm"):
        raise UserError(f"--pretrain_set {cfg.pretrain_set!r}: choose random, custom or raised-tm")
    spec = TaskSpec(task=cfg.task, labels=parse_labels(cfg.labels), train_per_label=cfg.train_per_label,
                    test_per_label=cfg.test_per_label, fewrel_source=cfg.fewrel_source).resolved()
    task_dir = ensure_task(spec, raw, data)
    path = pretrain_path(data, cfg.pretrain_set, task_dir.name, cfg.ws if cfg.pretrain_set == "raised-tm" else 0)
    if not path.is_file() or "wiki_rows" not in read_json(path.with_suffix(".meta.json"), "pre-training set meta"):
        # (a set built before the held-out rows existed may hold some of them: built again)
        print(f"building the {cfg.pretrain_set} pre-training set for {task_dir.name} ...")
        path = build_pretrain_set(cfg.pretrain_set, task_dir, ensure_wiki(-1, raw, data), cfg.ws, 0, data)
    shard = Shard(path)
    n = min(cfg.ws, len(shard)) if cfg.ws else len(shard)
    return rows_meta(shard, shard.ids[:n], data, {"pretrain_set": cfg.pretrain_set, "ws": n, "task": task_dir.name})


def held_out(cfg: MLMConfig, data_meta: dict):
    """The held-out validation rows and masks (tinytlm/mlm_eval.py); data_meta records which."""
    from tinytlm.mlm_eval import HeldOut
    from tinytlm.wikipedia import ensure_wiki, val_shard
    raw, data = roots(cfg)
    if not (data / "wikipedia" / "wiki.val.bin").is_file():
        ensure_wiki(0, raw, data)  # (prepared with the shard; missing only if the set was built elsewhere)
    shard = val_shard(data)
    data_meta["val"] = {"shard": str(shard.path), "rows": len(shard), "checksum": shard.checksum.hex()}
    return HeldOut(shard, data_meta["special_ids"], shard.vocab_size)  # (the data's vocabulary: same masks for all)


def rows_meta(shard, ids, data_root: Path, meta: dict):
    """(ids, data meta): where the rows come from, a checksum of exactly these rows (a resumed run
    checks it), and the special-token ids of the vocabulary the shard was made with."""
    from tinytlm.data import payload_checksum
    read_json(data_root / "wikipedia" / "meta.json", "Wikipedia meta")  # a one-line error when it is missing
    return ids, {**meta, "shard": str(shard.path), "shard_checksum": shard.checksum.hex(),
                 "rows_checksum": payload_checksum(ids).hex(), "special_ids": special_ids(data_root / "wikipedia")}


# -----------------------------------------------------------------------------
# training

def validate(cfg: MLMConfig):
    for name in ("epochs", "batch_size", "log_every"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} {getattr(cfg, name)}: must be >= 1")
    for name in ("mask_per_row", "mask_cap", "max_steps", "interrupt_at", "save_every", "val_every"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} {getattr(cfg, name)}: must be >= 0")
    for name, low in (("lr", 0.0), ("weight_decay", 0.0), ("grad_clip", 0.0)):
        v = getattr(cfg, name)
        if not (low <= v < float("inf")) or (name == "lr" and v == 0):  # also refuses nan
            raise UserError(f"--{name} {v}: must be {'positive' if name == 'lr' else '>= 0'} and finite")
    if cfg.mask_per_row and cfg.mask_cap:
        raise UserError("--mask_per_row and --mask_cap exclude each other (exact k per row, or Bernoulli capped at k)")


def member_dirs(cfg: MLMConfig, overrides: dict) -> list:
    """Each member's run directory: OUT/s<seed> with --seeds and --out, else its single run's."""
    if not cfg.seeds:
        return [Path(cfg.out or home() / "runs" / cfg.run_name(overrides))]
    return [Path(cfg.out) / f"s{s}" if cfg.out else home() / "runs" / replace(cfg, seeds="", seed=s).run_name(overrides)
            for s in member_seeds(cfg)]


def stack_dir(cfg: MLMConfig, overrides: dict) -> Path:
    """Where a stacked run keeps stack.json (what --resume continues): --out, else runs/<name with s0+1+...>."""
    return Path(cfg.out or home() / "runs" / cfg.run_name(overrides))


def train(cfg: MLMConfig, overrides: dict, resume_state=None, outs: list = None):
    """Pre-train one model (--seed) or one stacked model of one member per seed (--seeds). resume_state:
    a checkpoint (one model) or a list of them (the members', in seed order). outs: the members' run
    directories (default member_dirs)."""
    validate(cfg)
    d = Dist()  # torchrun: this process's share of every batch (tinytlm/dist.py); else one process
    device = d.setup(resolve_device(cfg.device))
    seeds = member_seeds(cfg)
    K = len(seeds)
    outs = [Path(o) for o in outs] if outs else member_dirs(cfg, overrides)
    states = resume_state if isinstance(resume_state, list) else [resume_state] if resume_state else None
    torch.manual_seed(seeds[0])
    with d.main_first():  # rank 0 prepares the data, the others read it
        ids, data_meta = pretrain_rows(cfg)
        held = held_out(cfg, data_meta) if cfg.val_every and d.main else None
    impl = Impl(cfg.kernels, cfg.unpad)  # the implementations every forward runs on
    if states:
        for st in states:
            if st["data"].get("rows_checksum") != data_meta["rows_checksum"]:
                raise UserError(f"{st['path']}: the pre-training rows differ from the ones this run started "
                                f"with ({data_meta['shard']}); prepare the same data again to resume")
        if len({st["step"] for st in states}) > 1:
            raise UserError(f"{states[0]['path']}: the members' checkpoints are at different steps "
                            f"({', '.join(str(st['step']) for st in states)}); resume each alone")
        singles = [build_model(st, impl) for st in states]
    else:
        singles = []
        for s in seeds:  # each member's init is its single run's: seeded alike, built alike
            torch.manual_seed(s)
            singles.append(BertForMLM(BertConfig.preset(cfg.model, **overrides), impl=impl))
    model_cfg = singles[0].config
    model = stack_models(singles)
    del singles
    check_rows(int(ids.max(initial=0)), ids.shape[1], model_cfg, data_meta["shard"])
    sp = data_meta["special_ids"]
    member_cfgs = [replace(cfg, seed=s, seeds="", out=str(o)) if cfg.seeds else cfg for s, o in zip(seeds, outs)]
    configs = [{**asdict(c), "world_size": d.world, "model_config": model_cfg.to_dict(), "data": data_meta}
               for c in member_cfgs]
    print_config("config", {**asdict(cfg), "data": data_meta})
    print(f"model {cfg.model}: {model.num_params() / 1e6:.1f}M parameters, latency {model_cfg.latency_layers} layers"
          + (f"; {K} members stacked (seeds {cfg.seeds})" if cfg.seeds else ""))
    raw_model = model
    model = d.wrap(prepare_model(model, device, cfg.compile, cfg.compile_mode), device,
                   cfg.compile_mode)
    opt = make_optimizer(raw_model, cfg.lr, cfg.weight_decay, device)
    params = list(raw_model.parameters())
    n = len(ids)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    step = 0
    if states:
        opt.load_state_dict(stack_optimizer_states(raw_model, [st["optimizer"] for st in states]) if K > 1
                            else states[0]["optimizer"])
        set_rng_state(states[0]["rng"])
        step = states[0]["step"]
        print(f"resuming {', '.join(st['path'] for st in states)} at step {step} (epoch {step // steps_per_epoch})")
    stack = {"seeds": seeds, "members": [str(o) for o in outs]} if cfg.seeds else None
    logs = [RunLog(o, c, device, resume=bool(states), stack=stack) if d.main else QuietLog()
            for o, c in zip(outs, configs)]
    last = min(total, cfg.max_steps) if cfg.max_steps else total
    slots = cfg.mask_per_row or cfg.mask_cap  # static sparse-head slots per row (0: as many as chosen)
    graphs = cfg.compile and cfg.compile_mode == "reduce-overhead"

    nonfinite = NonFinite(outs, seeds, device, "try a lower --lr, or --grad_clip")

    last_val = [st["extra"].get("val", {}) for st in states] if states else [{}] * K  # the latest evaluation

    def save():  # step // steps_per_epoch = completed epochs; a finished run drops the optimizer state
        nonfinite.check()
        if d.main:  # (rank 0 alone writes)
            save_members(raw_model, [(o / "ckpt.pt", dict(
                kind="mlm", optimizer=None if step == total else opt, step=step, epoch=step // steps_per_epoch,
                train_config=asdict(c), data=data_meta, extra={"val": v} if v else None))
                for o, c, v in zip(outs, member_cfgs, last_val)])

    d.own_dropout()
    bar = tqdm(total=last, initial=step, desc="pretrain", unit="step", dynamic_ncols=True, disable=not d.main or None)
    try:
        with deferred_sigint() as sigint:
            while step < last:
                epoch, first = divmod(step, steps_per_epoch)
                orders = [epoch_order(n, s, epoch) for s in seeds]  # each member's own data order
                sums = torch.zeros(K, 3, device=device)  # this epoch: loss sum, correct predictions, predictions
                win = torch.zeros(K, 4, device=device)  # since the last step record: the same, plus real tokens
                t_win, win_steps, win_seqs = time.time(), 0, 0
                for b in range(first, steps_per_epoch):
                    if graphs:
                        torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are consumed
                    lr = lr_at(step, total, cfg.lr)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    xs = [get_batch(ids, o[b * cfg.batch_size:(b + 1) * cfg.batch_size], device) for o in orders]
                    masked = [mask_tokens(x, mask_generator(device, s, step), vocab_size=model_cfg.vocab_size,
                                          mask_id=sp["mask"], special_ids=tuple(sp.values()),
                                          per_row=cfg.mask_per_row, cap=cfg.mask_cap) for x, s in zip(xs, seeds)]
                    x = torch.cat(xs)  # (K*B, T), member-major
                    inputs, targets = (torch.cat(t) for t in zip(*masked))
                    n_global = (targets.view(K, -1) != -100).sum(1)  # the loss is the mean over these
                    if d.on:  # this process's share of the batch
                        x, inputs, targets = d.rows(x, K), d.rows(inputs, K), d.rows(targets, K, fill=-100)
                    rows, y = mlm_rows(targets, slots, K)  # the sparse head's rows and their targets
                    with autocast(device):  # the key-padding mask comes from the original ids, as in HF
                        logits, loss = model(inputs, attention_mask=x != sp["pad"], targets=y, rows=rows)
                    if cfg.interrupt_at and step + 1 == cfg.interrupt_at:
                        signal.raise_signal(signal.SIGINT)  # testing: a Ctrl-C in the middle of a step
                    if d.on:  # summed over this share's masked tokens, / the global count: DDP's mean is the loss
                        loss = member_loss_sums(logits, y, K) / n_global
                        (loss.sum() * d.world).backward()
                    else:
                        loss.sum().backward()  # K members: the sum of their mean losses, no coupling
                    norms = clip_grad_norm_members(params, cfg.grad_clip, K) if cfg.grad_clip > 0 else \
                        grad_norms(params, K)
                    nonfinite.update(loss, step + 1, norms)  # caught at this step, reported at the next sync
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    win_steps += 1
                    win_seqs += len(xs[0])
                    with torch.no_grad():  # accumulate on the device; synced only when logging
                        y = y.view(K, -1)
                        valid = y != -100
                        n_valid = valid.sum(1)
                        now = torch.stack([loss.detach().float().view(K) * (n_global if d.on else n_valid),
                                           ((logits.argmax(-1).view(K, -1) == y) & valid).sum(1), n_valid], 1)
                        sums += now
                        win += torch.cat([now, (x != sp["pad"]).view(K, -1).sum(1, keepdim=True)], 1)
                    # a record per window of log_every steps (an epoch's last window may be shorter): the
                    # window's loss and accuracy, not a running mean, and its speed (per member)
                    boundary = step % cfg.log_every == 0 or step == last or b == steps_per_epoch - 1
                    if boundary:
                        ws = d.all_sum(win).tolist()  # syncs: the window's steps are done
                        nonfinite.check()
                        dt = max(1e-9, time.time() - t_win)
                        for log, w in zip(logs, ws):
                            rec = {"kind": "step", "step": step, "epoch": epoch, "lr": lr,
                                   "loss": w[0] / max(1, w[2]), "mlm_acc": w[1] / max(1, w[2]), "masked": int(w[2]),
                                   "ms_per_step": 1e3 * dt / win_steps, "seq_per_s": win_seqs / dt,
                                   "tok_per_s": w[3] / dt}
                            log.write(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", ms=f"{rec['ms_per_step']:.0f}",
                                        tok_s=f"{rec['tok_per_s'] * K:.0f}")
                        win.zero_()
                        t_win, win_steps, win_seqs = time.time(), 0, 0
                    bar.update(1)
                    # torchrun: asked of every process at a record (a sync anyway), so all stop at the same step
                    if d.any(sigint["set"], device) if d.on and boundary else sigint["set"] and not d.on:
                        raise StopAtBoundary
                    if step == last:
                        break
                vals = held.evaluate(raw_model, device, K) if held and ((epoch + 1) % cfg.val_every == 0 or
                                                                       step == last) else [{}] * K
                last_val = vals if any(vals) else last_val  # fixed masks; draws no random numbers
                for log, s, v in zip(logs, d.all_sum(sums).tolist(), vals):
                    log.write({"kind": "epoch", "epoch": epoch, "step": step, "partial": step % steps_per_epoch != 0,
                               "loss": s[0] / max(1, s[2]), "mlm_acc": s[1] / max(1, s[2]), **v})
                if (cfg.save_every and (epoch + 1) % cfg.save_every == 0) or step == last:
                    save()  # every save_every epochs, at the end, and where --max_steps stops
    except StopAtBoundary:
        bar.close()
        save()  # (not if the loss went non-finite: nonfinite.check() raises)
        where = stack_dir(cfg, overrides) if cfg.seeds else outs[0]
        raise Interrupted(f"interrupted at step {step}: checkpoint {outs[0] / 'ckpt.pt'}"
                          f"{f' and {K - 1} more' if K > 1 else ''}; continue with --resume {where}")
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(f"stopped in the middle of step {step + 1}; {outs[0] / 'ckpt.pt'} holds the last saved "
                          f"state") from None
    except (OSError, UserError):  # a full disk, a non-finite loss: the bar ends before the one-line error
        bar.close()
        raise
    bar.close()
    print(f"done: {step} steps, checkpoint{'s' if K > 1 else ''} {', '.join(str(o / 'ckpt.pt') for o in outs)}")
    return outs[0] if not cfg.seeds else outs


def main(argv=None):
    cfg, overrides = parse(argv)
    if not cfg.resume:
        outs = member_dirs(cfg, overrides)
        refuse_existing(outs[0] if not cfg.seeds else stack_dir(cfg, overrides), outs)
        if cfg.seeds and Dist().main:  # what --resume continues: the stack's config and its members' folders
            write_json(stack_dir(cfg, overrides) / "stack.json", {"kind": "mlm",
                                                                 "config": asdict(replace(cfg, interrupt_at=0)),
                                                                 "overrides": overrides,
                                                                 "members": [str(o) for o in outs]})
        return train(cfg, overrides, outs=outs)
    manifest = Path(cfg.resume) / "stack.json"
    if manifest.is_file():  # a stacked run: every member, from its own checkpoint
        m = read_json(manifest, "stack manifest")
        saved = resumed_config(cfg, MLMConfig(**m["config"]), overrides)
        missing = [o for o in m["members"] if not (Path(o) / "ckpt.pt").is_file()]
        if missing:  # killed before (or during) the members' first save: the stack starts again, exactly
            print(f"{missing[0]}: no checkpoint yet; the stack starts again from step 0", file=sys.stderr)
            return train(saved, m["overrides"], None, outs=m["members"])
        states = load_group(m["members"], kind="mlm")
        if all(st["optimizer"] is None for st in states):
            raise UserError(f"{manifest.parent}: this stacked run has finished; nothing to resume")
        return train(saved, m["overrides"], states, outs=m["members"])
    resume_state = load_checkpoint(cfg.resume, kind="mlm", fallback=True)
    saved = MLMConfig(**resume_state["train_config"])
    if resume_state["optimizer"] is None:
        raise UserError(f"{resume_state['path']}: this run has finished; nothing to resume")
    saved = resumed_config(cfg, saved, overrides)
    saved.out = saved.out or str(Path(resume_state["path"]).parent)
    return train(saved, {}, resume_state)


if __name__ == "__main__":
    cli(main)
