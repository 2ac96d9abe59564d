"""Pre-train a BERT with masked-language modelling on the first W_s rows of shuffled Wikipedia.

    python train_mlm.py --ws 40000                                  # the paper's BERT-6 setup
    python train_mlm.py --model tiny --ws 2000 --epochs 2            # a CPU-sized run
    python train_mlm.py --model bert1 --arch n_conv=2,conv_kernel=16x3 --ws 40000
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
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from tinytlm.checkpoint import load_checkpoint, load_group
from tinytlm.common import UserError, cli, config_hash, home, read_json
from tinytlm.config import RunSwitches, from_saved, given_fields, option, parse_run_args, resumed_config, switch
from tinytlm.data import epoch_order, get_batch, mask_generator, mask_tokens, special_ids
from tinytlm.mlm_rows import mlm_rows
from tinytlm.model import BertConfig, BertForMLM
from tinytlm.session import (build_members, check_group, interruptible, open_device, precision_fields, read_stack,
                             run_precision, save, setup, train_step, write_stack)
from tinytlm.tasks import TASKS, TaskFields
from tinytlm.train import StopAtBoundary, check_rows, lr_at, member_seeds, print_config, refuse_existing, roots


# -----------------------------------------------------------------------------
# config

@dataclass
class MLMConfig(TaskFields, RunSwitches):
    """train_mlm's flags: the task fields name the task of a constructed pre-training set."""
    task: str = option("fewrel", "constructed sets: the task whose tokens define them", choices=tuple(TASKS))
    model: str = option("bert6", "model preset (see BertConfig.presets()); --arch overrides its fields")
    ws: int = option(40000, "W_s: rows of the shuffled Wikipedia shard (random set) or cap of a constructed set "
                     "(0 = all)", low=0)
    pretrain_set: str = option("random", "pre-training set", choices=("random", "custom", "raised-tm"))
    epochs: int = option(50, "passes over the pre-training rows", low=1)
    batch_size: int = option(32, "sequences per optimizer step", low=1)
    lr: float = option(5.5e-5, "peak AdamW learning rate, decayed linearly to 0", above=0)
    weight_decay: float = option(1e-2, "AdamW weight decay", low=0)
    grad_clip: float = option(0.0, "max gradient norm (0 = off; the paper's code does not clip)", low=0)
    mask_cap: int = option(0, "k > 0: Bernoulli 15%% masking, at most k chosen per row (static shapes, the "
                           "paper's masks); 0: no cap", low=0)
    seed: int = option(0, "data order, masks, init and dropout all follow from it", low=0)
    seeds: str = option("", "comma-separated seeds: one model per seed, trained stacked (excludes --seed)")
    log_every: int = switch(50, "optimizer steps between metric records", low=1)
    val_every: int = switch(1, "epochs between held-out MLM evaluations, and at the end (0 = never)", low=0)
    max_steps: int = switch(0, "stop after this many steps (0 = all epochs); the schedule still spans all epochs",
                            low=0)

    def run_name(self, overrides=None) -> str:
        extra = f"-{config_hash(overrides)}" if overrides else ""  # e.g. --arch n_conv=2 gets its own folder
        task = f"-{self.task}" if self.pretrain_set != "random" else ""
        seed = self.seeds.replace(",", "+") if self.seeds else self.seed
        return f"mlm-{self.model}{extra}-{self.pretrain_set}{task}-ws{self.ws}-s{seed}"


def parse(argv=None):
    return parse_run_args(MLMConfig, __doc__, "training", argv)


# -----------------------------------------------------------------------------
# data

def pretrain_rows(cfg: MLMConfig):
    """(ids array of the pre-training rows, data meta) for the chosen pre-training set."""
    from tinytlm.tasks import ensure_task
    from tinytlm.wikipedia import ensure_wiki
    from tinytlm.data import Shard
    from tinytlm.tokstats import build_pretrain_set, pretrain_path
    raw, data = roots(cfg)
    if cfg.pretrain_set == "random":
        if cfg.ws == 0:
            raise UserError("--ws 0: nothing to pre-train on (the no-pre-training arm is train_cls.py without --init)")
        shard = ensure_wiki(cfg.ws, raw, data)
        return rows_meta(shard, shard.ids[:cfg.ws], data, {"pretrain_set": "random", "ws": cfg.ws})
    spec = cfg.spec()
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

def member_dirs(cfg: MLMConfig, overrides: dict) -> list:
    """Each member's run directory: OUT/s<seed> with --seeds and --out, else its single run's."""
    if not cfg.seeds:
        return [Path(cfg.out or home() / "runs" / cfg.run_name(overrides))]
    return [Path(cfg.out) / f"s{s}" if cfg.out else home() / "runs" / replace(cfg, seeds="", seed=s).run_name(overrides)
            for s in member_seeds(cfg)]


def stack_dir(cfg: MLMConfig, overrides: dict) -> Path:
    """Where a stacked run keeps stack.json (what --resume continues): --out, else runs/<name with s0+1+...>."""
    return Path(cfg.out or home() / "runs" / cfg.run_name(overrides))


def new_model(seed: int, model: str, overrides: dict, impl):
    """A member as its single run starts it: seeded, then built."""
    torch.manual_seed(seed)
    return BertForMLM(BertConfig.preset(model, **overrides), impl=impl)


def start(cfg: MLMConfig, overrides: dict, states, outs: list) -> tuple:
    """(session, ids, data meta, held-out set or None, member configs): data, members and the shared setup."""
    d, device = open_device(cfg)
    precision = run_precision(cfg, device, states)
    seeds = member_seeds(cfg)
    torch.manual_seed(seeds[0])
    with d.main_first():  # rank 0 prepares the data, the others read it
        ids, data_meta = pretrain_rows(cfg)
        held = held_out(cfg, data_meta) if cfg.val_every and d.main else None
    if states:
        check_group(states, lambda st: "" if st["data"].get("rows_checksum") == data_meta["rows_checksum"] else
                    f"{st['path']}: the pre-training rows differ from the ones this run started with "
                    f"({data_meta['shard']}); prepare the same data again to resume")
    impl = cfg.impl(device)  # the implementations every forward runs on, chosen at construction
    model, model_cfg = build_members(states, lambda k: new_model(seeds[k], cfg.model, overrides, impl), len(seeds),
                                     impl)
    check_rows(int(ids.max(initial=0)), ids.shape[1], model_cfg, data_meta["shard"])
    member_cfgs = [replace(cfg, seed=s, seeds="", out=str(o)) if cfg.seeds else cfg for s, o in zip(seeds, outs)]
    prec = precision_fields(cfg, precision)
    member_cfgs = [replace(c, precision=precision) for c in member_cfgs]  # (their checkpoints' train_config)
    configs = [{**asdict(c), **prec, "impl": asdict(impl), "model_config": model_cfg.to_dict(), "data": data_meta}
               for c in member_cfgs]  # config.json and the metrics header: what ran, the resolved Impl included
    print_config("config", {**asdict(cfg), **prec, "data": data_meta})
    print(f"model {cfg.model}: {model.num_params() / 1e6:.1f}M parameters, latency {model_cfg.latency_layers} layers"
          + (f"; {len(seeds)} members stacked (seeds {cfg.seeds})" if cfg.seeds else ""))
    s = setup(cfg, d, device, model, states, cfg.lr, cfg.weight_decay, outs, seeds, configs, cfg.grad_clip,
              precision)
    return s, ids, data_meta, held, member_cfgs


class Window:
    """The step records: per member, the loss, accuracy and speed of the log_every steps since the last
    record (an epoch's last window may be shorter), accumulated on the device and synced only to write."""

    def __init__(self, s):
        self.s = s
        self.sums = torch.zeros(s.members, 4, device=s.device)  # loss sum, correct, predictions, real tokens
        self.t, self.steps, self.seqs = time.time(), 0, 0

    def add(self, counts, real_tokens, seqs: int):
        """counts: (K, 3) of this step (the model's counts); real_tokens: (K*B, T) bool, the non-padding."""
        self.sums += torch.cat([counts, real_tokens.view(self.s.members, -1).sum(1, keepdim=True)], 1)
        self.steps, self.seqs = self.steps + 1, self.seqs + seqs

    def record(self, epoch: int, lr: float, bar):
        w_all = self.s.d.all_sum(self.sums).tolist()  # syncs: the window's steps are done
        self.s.nonfinite.check()
        dt = max(1e-9, time.time() - self.t)
        for log, w in zip(self.s.logs, w_all):
            rec = {"kind": "step", "step": self.s.step, "epoch": epoch, "lr": lr, "loss": w[0] / max(1, w[2]),
                   "mlm_acc": w[1] / max(1, w[2]), "masked": int(w[2]), "ms_per_step": 1e3 * dt / self.steps,
                   "seq_per_s": self.seqs / dt, "tok_per_s": w[3] / dt}
            log.write(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", ms=f"{rec['ms_per_step']:.0f}",
                        tok_s=f"{rec['tok_per_s'] * self.s.members:.0f}")
        self.sums.zero_()
        self.t, self.steps, self.seqs = time.time(), 0, 0


def train(cfg: MLMConfig, overrides: dict, resume_state=None, outs: list = None):
    """Pre-train one model (--seed) or one stacked model of one member per seed (--seeds). resume_state:
    a checkpoint (one model) or a list of them (the members', in seed order). outs: the members' run
    directories (default member_dirs)."""
    outs = [Path(o) for o in outs] if outs else member_dirs(cfg, overrides)
    states = resume_state if isinstance(resume_state, list) else [resume_state] if resume_state else None
    s, ids, data_meta, held, member_cfgs = start(cfg, overrides, states, outs)
    d, device, seeds, K, B = s.d, s.device, s.seeds, s.members, cfg.batch_size
    sp, slots = data_meta["special_ids"], cfg.mask_cap  # slots: static sparse-head slots per row (0: as chosen)
    vocab = s.raw_model.config.vocab_size
    steps_per_epoch = math.ceil(len(ids) / B)
    total = cfg.epochs * steps_per_epoch
    last = min(total, cfg.max_steps) if cfg.max_steps else total
    last_val = [st["extra"].get("val", {}) for st in states] if states else [{}] * K  # the latest evaluation

    def save_now():  # step // steps_per_epoch = completed epochs; a finished run drops the optimizer state
        save(s, "mlm", s.step // steps_per_epoch, [dict(train_config=asdict(c), data=data_meta, extra={"val": v}
                                                        if v else None) for c, v in zip(member_cfgs, last_val)],
             finished=s.step == total)

    d.own_dropout()
    bar = tqdm(total=last, initial=s.step, desc="pretrain", unit="step", dynamic_ncols=True, disable=not d.main or None)
    with interruptible(s, bar, save_now, stack_dir(cfg, overrides) if cfg.seeds else outs[0]) as sigint:
        while s.step < last:
            epoch, first = divmod(s.step, steps_per_epoch)
            orders = [epoch_order(len(ids), seed, epoch) for seed in seeds]  # each member's own data order
            sums = torch.zeros(K, 3, device=device)  # this epoch: loss sum, correct predictions, predictions
            window = Window(s)
            for b in range(first, steps_per_epoch):
                lr = lr_at(s.step, total, cfg.lr)
                xs = [get_batch(ids, o[b * B:(b + 1) * B], device) for o in orders]
                masked = [mask_tokens(x, mask_generator(device, seed, s.step), vocab_size=vocab,
                                      mask_id=sp["mask"], special_ids=tuple(sp.values()), cap=cfg.mask_cap)
                          for x, seed in zip(xs, seeds)]
                x = torch.cat(xs)  # (K*B, T), member-major
                inputs, targets = (torch.cat(t) for t in zip(*masked))
                n_global = (targets.view(K, -1) != -100).sum(1)  # the loss is the mean over these
                if d.on:  # this process's share of the batch
                    x, inputs, targets = d.rows(x, K), d.rows(inputs, K), d.rows(targets, K, fill=-100)
                # (the key-padding mask comes from the original ids, as in HF)
                rows, y = mlm_rows(targets, slots, K)  # the sparse head's rows and their targets
                # counts (K, 3): this share's loss sum, correct predictions and masked tokens per member
                counts, loss = train_step(s, lr, inputs, y, n_global, attention_mask=x != sp["pad"], rows=rows)
                counts = counts.detach()
                sums += counts
                window.add(counts, x != sp["pad"], len(xs[0]))
                boundary = s.step % cfg.log_every == 0 or s.step == last or b == steps_per_epoch - 1
                if boundary:
                    window.record(epoch, lr, bar)
                bar.update(1)
                # torchrun: asked of every process at a record (a sync anyway), so all stop at the same step
                if d.any(sigint["set"], device) if d.on and boundary else sigint["set"] and not d.on:
                    raise StopAtBoundary
                if s.step == last:
                    break
            due = held and ((epoch + 1) % cfg.val_every == 0 or s.step == last)
            vals = held.evaluate(s.raw_model, device, K, s.precision) if due else [{}] * K
            last_val = vals if any(vals) else last_val  # fixed masks; draws no random numbers
            for log, m, v in zip(s.logs, d.all_sum(sums).tolist(), vals):
                log.write({"kind": "epoch", "epoch": epoch, "step": s.step, "partial": s.step % steps_per_epoch != 0,
                           "loss": m[0] / max(1, m[2]), "mlm_acc": m[1] / max(1, m[2]), **v})
            if (cfg.save_every and (epoch + 1) % cfg.save_every == 0) or s.step == last:
                save_now()  # every save_every epochs, at the end, and where --max_steps stops
    print(f"done: {s.step} steps, checkpoint{'s' if K > 1 else ''} {', '.join(str(o / 'ckpt.pt') for o in outs)}")
    return outs[0] if not cfg.seeds else outs


def main(argv=None):
    cfg, overrides = parse(argv)
    if not cfg.resume:
        outs = member_dirs(cfg, overrides)
        refuse_existing(outs[0] if not cfg.seeds else stack_dir(cfg, overrides), outs)
        if cfg.seeds:  # what --resume continues: the stack's config and its members' folders
            write_stack(stack_dir(cfg, overrides), "mlm", cfg, overrides, outs)
        return train(cfg, overrides, outs=outs)
    given = given_fields(MLMConfig, argv)
    m = read_stack(cfg.resume, kind="mlm")
    if m:  # a stacked run: every member, from its own checkpoint
        saved = resumed_config(cfg, from_saved(MLMConfig, m["config"]), overrides, given)
        missing = [o for o in m["members"] if not (Path(o) / "ckpt.pt").is_file()]
        if missing:  # killed before (or during) the members' first save: the stack starts again, exactly
            print(f"{missing[0]}: no checkpoint yet; the stack starts again from step 0", file=sys.stderr)
            return train(saved, m["overrides"], None, outs=m["members"])
        states = load_group(m["members"], kind="mlm")
        if all(st["optimizer"] is None for st in states):
            raise UserError(f"{cfg.resume}: this stacked run has finished; nothing to resume")
        return train(saved, m["overrides"], states, outs=m["members"])
    resume_state = load_checkpoint(cfg.resume, kind="mlm", fallback=True)
    if resume_state["optimizer"] is None:
        raise UserError(f"{resume_state['path']}: this run has finished; nothing to resume")
    saved = resumed_config(cfg, from_saved(MLMConfig, resume_state["train_config"]), overrides, given)
    saved.out = saved.out or str(Path(resume_state["path"]).parent)
    return train(saved, {}, resume_state)


if __name__ == "__main__":
    cli(main)
