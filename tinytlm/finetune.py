"""Fine-tune a BERT classifier on AG News, DBpedia-14 or FewRel, with or without pre-training.

    python train_cls.py --task agnews                               # no pre-training (scratch bert6)
    python train_cls.py --task agnews --init runs/mlm-bert6-random-ws40000-s0
    python train_cls.py --task agnews --init runs/mlm-... --gap      # both arms, same seed: the gap
    python train_cls.py --task fewrel --labels 0,2,5,10,11,12,13,14,15,3 --init runs/mlm-...
    python train_cls.py --task agnews --model tiny --train-per-label 200 --test-per-label 200 --epochs 5
    python train_cls.py --task agnews --init hf:path/to/bert-base-uncased --gap   # a Hugging Face BERT folder

The architecture comes from the checkpoint when --init is given, else from --model
and the model flags. Test accuracy is printed each epoch; the reported result is the
final epoch's accuracy (the best epoch's is also reported, labelled as selected on
test). Outputs in --out (default runs/<name>): config.json, metrics.jsonl, ckpt.pt
(a classifier checkpoint ensemble.py reads) and result.json.
"""
import math
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tinytlm.tasks import TaskSpec, ensure_task, load_task, parse_labels
from tinytlm.checkpoint import build_model, load_checkpoint, save_checkpoint, set_rng_state
from tinytlm.committee import accuracy, per_label_accuracy, predict_logits
from tinytlm.common import Interrupted, UserError, cli, config_hash, home, read_json, write_json
from tinytlm.data import Shard, epoch_order, get_batch
from tinytlm.model import BertConfig, BertForClassification
from tinytlm.tokstats import pair_stats, task_counts, wiki_counts
from tinytlm.train import (RunLog, StopAtBoundary, autocast, check_rows, deferred_sigint, device_name, lr_at,
                           make_optimizer, parse_run_args, prepare_model, print_config, refuse_existing,
                           resolve_device, resumed_config, roots, switch)

# PAPER.md: Table 1 fine-tunes FewRel at 8e-5 / 1e-2; Tables 3-7 mostly 5e-5 with weight decay 1e-3..2e-2
TASK_DEFAULTS = {"agnews": (5e-5, 1e-2), "dbpedia": (5e-5, 1e-2), "fewrel": (8e-5, 1e-2)}


# -----------------------------------------------------------------------------
# config

@dataclass
class ClsConfig:
    task: str = "agnews"  # agnews | dbpedia | fewrel
    labels: str = ""  # label indices of the source, comma-separated (default all)
    train_per_label: int = 0  # train rows per label (0 = the paper's)
    test_per_label: int = 0  # test rows per label (0 = the paper's)
    fewrel_source: str = "val_wiki"  # val_wiki | train_wiki
    entity_markers: bool = False  # FewRel: mark head and tail
    init: str = ""  # train_mlm checkpoint or run directory, or hf:DIR (a HF BERT folder); empty = no pre-training
    model: str = "bert6"  # preset for scratch runs (ignored with --init)
    epochs: int = 50  # fine-tuning epochs
    decay_epochs: int = 50  # the lr decays linearly to 0 over this many epochs (PAPER.md)
    batch_size: int = 32  # sequences per step
    lr: float = 0.0  # AdamW lr (0 = the task's default from PAPER.md)
    wd: float = -1.0  # AdamW weight decay (-1 = the task's default)
    seed: int = 0  # data order, head init, dropout
    gap: bool = False  # run both arms (pre-trained and scratch) with the same seed and print the gap
    device: str = switch("auto")  # auto | cpu | cuda
    compile: bool = switch(False)  # torch.compile the model
    compile_mode: str = switch("default")  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    kernels: str = switch("torch")  # torch | triton
    out: str = switch("")  # run directory (default runs/<name>)
    data: str = switch("")  # prepared data root (default $TINYTLM_DATA or ./data)
    raw: str = switch("")  # raw data root (default $TINYTLM_RAW or ../shared/data)
    quiet: bool = switch(False)  # no per-epoch lines (the paper runner)
    resume: str = switch("")  # a run directory (one arm) or a --gap folder to continue exactly
    save_every: int = switch(1)  # epochs between checkpoints (0 = only the final one and at Ctrl-C/SIGTERM)
    interrupt_at: int = switch(0)  # testing: deliver a Ctrl-C in the middle of this step (1-based; 0 = never)

    def spec(self) -> TaskSpec:
        return TaskSpec(task=self.task, train_per_label=self.train_per_label, test_per_label=self.test_per_label,
                        labels=parse_labels(self.labels), fewrel_source=self.fewrel_source,
                        entity_markers=self.entity_markers).resolved()


def parse(argv=None):
    return parse_run_args(ClsConfig, __doc__, "fine-tuning", argv)


# -----------------------------------------------------------------------------
# one arm

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


def run_arm(cfg: ClsConfig, overrides: dict, init_state, out: Path, resume_state=None) -> dict:
    """Fine-tune one classifier into `out`: ckpt.pt at the start, after every epoch and at a Ctrl-C or
    SIGTERM (at a step boundary), then result.json. resume_state: an unfinished checkpoint of this arm,
    continued exactly (same data order, dropout and lr schedule; CPU: bitwise the uninterrupted run)."""
    for name in ("epochs", "decay_epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} {getattr(cfg, name)}: must be >= 1")
    for name in ("save_every", "interrupt_at"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} {getattr(cfg, name)}: must be >= 0")
    device = resolve_device(cfg.device)
    raw, data_root = roots(cfg)
    spec = cfg.spec()
    task_dir = ensure_task(spec, raw, data_root)
    train, ytr, test, yte, meta = load_task(task_dir)
    n_labels = len(meta["label_names"])
    lr = cfg.lr or TASK_DEFAULTS[spec.task][0]
    wd = cfg.wd if cfg.wd >= 0 else TASK_DEFAULTS[spec.task][1]

    if resume_state is not None:  # what the run knew when it started, kept in its checkpoint
        progress = resume_state["extra"]
        if progress["test_fingerprint"] != test.checksum.hex():
            raise UserError(f"{resume_state['path']}: {test.path} is not the test set this run started with")
        model = build_model(resume_state)
        model_cfg = model.config
    else:
        progress = {"arm": "pretrained" if init_state else "scratch",
                    "init": init_state["path"] if init_state else None,
                    "pretrain": init_state["data"] if init_state else None,
                    # before training: a late failure loses nothing
                    "stats": token_stats(task_counts(task_dir), init_state),
                    "task": spec.task, "spec": asdict(spec), "label_names": meta["label_names"],
                    "test_fingerprint": test.checksum.hex(), "accs": [], "loss_sum": 0.0, "train_s": 0.0,
                    "eval_s": 0.0}
        torch.manual_seed(cfg.seed)
        if init_state is not None:
            model_cfg = BertConfig.from_dict(init_state["model_config"])
            model = BertForClassification(model_cfg, n_labels)
            trunk = {k[len("bert."):]: v for k, v in init_state["model"].items() if k.startswith("bert.")}
            try:
                model.bert.load_state_dict(trunk)  # strict: the trunk must match exactly
            except RuntimeError as e:
                raise UserError(f"{init_state['path']}: its weights do not match its config "
                                f"({str(e).splitlines()[0]})")
        else:
            model_cfg = BertConfig.preset(cfg.model, **overrides)
            model = BertForClassification(model_cfg, n_labels)
    check_rows(max(int(train.ids.max(initial=0)), int(test.ids.max(initial=0))), train.row_len, model_cfg, task_dir)
    config = {**asdict(cfg), "lr": lr, "wd": wd, "task_dir": task_dir.name, "model_config": model_cfg.to_dict()}
    if not cfg.quiet:
        print_config("config", {k: v for k, v in config.items() if k != "model_config"})
    raw_model = model
    model = prepare_model(model, device, cfg.kernels, cfg.compile, cfg.compile_mode)
    opt = make_optimizer(raw_model, lr, wd, device)
    step = 0
    if resume_state is not None:
        opt.load_state_dict(resume_state["optimizer"])
        set_rng_state(resume_state["rng"])
        step = resume_state["step"]
        print(f"resuming {resume_state['path']} at step {step}")
    log = RunLog(out, config, device, resume=resume_state is not None)

    n = len(train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.decay_epochs * steps_per_epoch
    ytr_t = torch.from_numpy(ytr)
    accs = progress["accs"]

    def save(finished=False):  # the arm's progress travels in the checkpoint's extra
        save_checkpoint(out / "ckpt.pt", kind="cls", model=raw_model, optimizer=None if finished else opt, step=step,
                        epoch=step // steps_per_epoch, train_config=config,
                        data={"task_dir": task_dir.name, "spec": asdict(spec)},
                        extra={**progress, "acc": accs[-1] if accs else None})

    if resume_state is None and cfg.save_every:
        save()  # a kill before the first epoch ends can resume too
    epoch0, first = divmod(step, steps_per_epoch)
    bar = tqdm(range(epoch0, cfg.epochs), desc=f"finetune {progress['arm']}", unit="epoch",
               disable=cfg.quiet or None)
    graphs = cfg.compile and cfg.compile_mode == "reduce-overhead"
    try:
        with deferred_sigint() as sigint:
            for epoch in bar:
                order = epoch_order(n, cfg.seed, epoch)
                model.train()
                if epoch > epoch0 or first == 0:
                    progress["loss_sum"] = 0.0
                loss_sum = torch.tensor(progress["loss_sum"], device=device)  # fp32, as saved
                t0 = time.perf_counter()
                for b in range(first if epoch == epoch0 else 0, steps_per_epoch):
                    if graphs:
                        torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are consumed
                    for g in opt.param_groups:
                        g["lr"] = lr_at(step, total, lr)
                    rows = np.sort(order[b * cfg.batch_size:(b + 1) * cfg.batch_size])
                    x = get_batch(train.ids, rows, device)
                    y = ytr_t[rows].to(device)
                    with autocast(device):
                        _, loss = model(x, targets=y)
                    if cfg.interrupt_at and step + 1 == cfg.interrupt_at:
                        signal.raise_signal(signal.SIGINT)  # testing: a Ctrl-C in the middle of a step
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    loss_sum += loss.detach().float()
                    step += 1
                    if sigint["set"] and b < steps_per_epoch - 1:  # at an epoch's end: score it first
                        progress["loss_sum"] = loss_sum.item()
                        progress["train_s"] += time.perf_counter() - t0
                        raise StopAtBoundary
                epoch_loss = loss_sum.item() / steps_per_epoch  # syncs: the training steps are done
                t1 = time.perf_counter()
                logits = predict_logits(model, test.ids, device)  # syncs too (.cpu() of the logits)
                progress["train_s"] += t1 - t0
                progress["eval_s"] += time.perf_counter() - t1
                acc = accuracy(logits, yte)
                accs.append(acc)
                progress["loss_sum"] = 0.0
                log.write({"kind": "epoch", "epoch": epoch, "step": step, "train_loss": epoch_loss, "test_acc": acc})
                bar.set_postfix(loss=f"{epoch_loss:.3f}", test_acc=f"{acc:.4f}")
                if not cfg.quiet:
                    tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: train loss {epoch_loss:.4f}, test acc {acc:.4f}")
                if epoch + 1 < cfg.epochs:
                    if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
                        save()
                    if sigint["set"]:
                        raise StopAtBoundary
    except StopAtBoundary:
        bar.close()
        save()
        raise Interrupted(f"interrupted at step {step}: checkpoint {out / 'ckpt.pt'}; continue with --resume "
                          f"{out.parent if cfg.gap else out}")
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(f"stopped in the middle of step {step + 1}; {out / 'ckpt.pt'} holds the last saved "
                          f"state") from None

    result = {
        "task": task_dir.name, "arm": progress["arm"], "init": progress["init"], "pretrain": progress["pretrain"],
        "acc": accs[-1], "acc_best_selected_on_test": max(accs), "best_epoch": int(np.argmax(accs)) + 1,
        "acc_per_epoch": accs, "per_label_acc": dict(zip(meta["label_names"], per_label_accuracy(logits, yte, n_labels))),
        "token_stats": progress["stats"], "n_train": n, "n_test": len(test), "seed": cfg.seed, "lr": lr, "wd": wd,
        "epochs": cfg.epochs, "model_config": model_cfg.to_dict(), "params": raw_model.num_params(),
        "device": device_name(device),
        # wall time per sequence, first epoch (compilation) included
        "seq_per_s": round(n * cfg.epochs / max(progress["train_s"], 1e-9), 1),
        "eval_seq_per_s": round(len(test) * cfg.epochs / max(progress["eval_s"], 1e-9), 1),
    }
    save(finished=True)
    write_json(out / "result.json", result)
    return result


def report(r: dict):
    s = r["token_stats"]
    ts = f"T_C {s['T_C']:,}  T_W {s['T_W']:,}  T_M {s['T_M']:,}" if s else "token stats unavailable (pre-training data unknown or gone)"
    print(f"[{r['arm']}] {r['task']}: final-epoch test acc {r['acc']:.4f} "
          f"(best {r['acc_best_selected_on_test']:.4f} at epoch {r['best_epoch']}, selected on test); {ts}")
    print("  per label: " + ", ".join(f"{k} {v:.3f}" for k, v in r["per_label_acc"].items()))


def load_init(init: str):
    """The pre-trained state --init names: a train_mlm checkpoint or run, or hf:DIR; None for no init."""
    if init.startswith("hf:"):
        from tinytlm.hf import hf_init_state
        return hf_init_state(init[3:])
    return load_checkpoint(init, kind="mlm") if init else None


def arm(cfg: ClsConfig, overrides: dict, init_state, out: Path) -> dict:
    """One arm, resumable: finished -> its result.json; an unfinished checkpoint -> resumed exactly; else
    started (also after a kill between the final checkpoint and result.json: the run is deterministic)."""
    if (out / "result.json").is_file() and (out / "ckpt.pt").is_file():
        return read_json(out / "result.json")
    state = load_checkpoint(out, kind="cls") if (out / "ckpt.pt").is_file() else None
    return run_arm(cfg, overrides, init_state, out, state if state and state["optimizer"] is not None else None)


def gap_arms(cfg: ClsConfig, out: Path, init_state=None) -> dict:
    """The gap: same seed, same data, same architecture; only the initialisation differs. Each arm
    resumes from where it stopped; gap.json at the end."""
    init_state = init_state or load_init(cfg.init)
    scratch_overrides = BertConfig.from_dict(init_state["model_config"]).to_dict()
    rp = arm(cfg, {}, init_state, out / "pretrained")
    rs = arm(replace(cfg, init=""), scratch_overrides, None, out / "scratch")
    report(rp)
    report(rs)
    gap = {"task": rp["task"], "acc_pretrained": rp["acc"], "acc_scratch": rs["acc"], "gap": rp["acc"] - rs["acc"],
           "token_stats": rp["token_stats"], "seed": cfg.seed}
    write_json(out / "gap.json", gap)
    print(f"gap = {rp['acc']:.4f} - {rs['acc']:.4f} = {gap['gap']:+.4f}  (final epoch, seed {cfg.seed})")
    return gap


def resume(cfg: ClsConfig, overrides: dict) -> dict:
    """--resume DIR: a single arm's run directory, or a --gap folder (both arms, then the gap)."""
    where = Path(cfg.resume)
    gap_file = where / "gap_config.json"
    if gap_file.is_file():
        saved = ClsConfig(**read_json(gap_file, "gap config"))
    else:
        state = load_checkpoint(where, kind="cls")
        if state["optimizer"] is None:
            raise UserError(f"{state['path']}: this run has finished; nothing to resume")
        saved = ClsConfig(**{k: v for k, v in state["train_config"].items() if k in ClsConfig.__dataclass_fields__})
    saved = resumed_config(cfg, saved, overrides)
    if gap_file.is_file():
        if (where / "gap.json").is_file():
            raise UserError(f"{where}: this gap run has finished (gap.json); nothing to resume")
        return gap_arms(replace(saved, out=str(where)), where)
    r = run_arm(replace(saved, out=str(where)), {}, None, Path(state["path"]).parent, state)
    report(r)
    return r


def main(argv=None):
    cfg, overrides = parse(argv)
    if cfg.resume:
        return resume(cfg, overrides)
    init_state = load_init(cfg.init)
    if cfg.gap and init_state is None:
        raise UserError("--gap needs --init CKPT (the pre-trained arm)")
    if init_state is not None and overrides:
        raise UserError(f"model flags ({', '.join('--' + k for k in overrides)}) conflict with --init: "
                        f"the architecture comes from the checkpoint")
    arch = init_state["train_config"]["model"] if init_state else cfg.model
    tag = config_hash({"spec": asdict(cfg.spec()), "overrides": overrides, "init": cfg.init})
    name = f"cls-{cfg.spec().dirname()}-{arch}-{'pt' if init_state else 'scratch'}-s{cfg.seed}-{tag}"
    out = Path(cfg.out or home() / "runs" / name)
    refuse_existing(out, [out / "pretrained", out / "scratch"] if cfg.gap else [out])
    if not cfg.gap:
        r = run_arm(cfg, overrides, init_state, out)
        report(r)
        return r
    write_json(out / "gap_config.json", asdict(replace(cfg, out=str(out))))  # what --resume OUT continues
    return gap_arms(cfg, out, init_state)


if __name__ == "__main__":
    cli(main)
