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
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tinytlm.tasks import TaskSpec, ensure_task, load_task, parse_labels
from tinytlm.checkpoint import load_checkpoint, save_checkpoint
from tinytlm.committee import accuracy, per_label_accuracy, predict_logits
from tinytlm.common import UserError, cli, default_data_root, default_raw_root, short_hash, write_json
from tinytlm.data import Shard, epoch_order, get_batch
from tinytlm.model import BertConfig, BertForClassification
from tinytlm.tokstats import pair_stats, task_counts, wiki_counts
from tinytlm.train import (RunLog, autocast, device_name, lr_at, make_optimizer, parse_run_args, prepare_model,
                           print_config, resolve_device)

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
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the model
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    kernels: str = "torch"  # torch | triton
    out: str = ""  # run directory (default runs/<name>)
    data: str = ""  # prepared data root (default $TINYTLM_DATA or ./data)
    raw: str = ""  # raw data root (default $TINYTLM_RAW or ../shared/data)
    quiet: bool = False  # no per-epoch lines (the paper runner)

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


def run_arm(cfg: ClsConfig, overrides: dict, init_state, out: Path) -> dict:
    for name in ("epochs", "decay_epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} {getattr(cfg, name)}: must be >= 1")
    device = resolve_device(cfg.device)
    raw = Path(cfg.raw) if cfg.raw else default_raw_root()
    data_root = Path(cfg.data) if cfg.data else default_data_root()
    spec = cfg.spec()
    task_dir = ensure_task(spec, raw, data_root)
    train, ytr, test, yte, meta = load_task(task_dir)
    n_labels = len(meta["label_names"])
    stats = token_stats(task_counts(task_dir), init_state)  # before training: a late failure loses nothing
    lr = cfg.lr or TASK_DEFAULTS[spec.task][0]
    wd = cfg.wd if cfg.wd >= 0 else TASK_DEFAULTS[spec.task][1]

    torch.manual_seed(cfg.seed)
    if init_state is not None:
        model_cfg = BertConfig.from_dict(init_state["model_config"])
        model = BertForClassification(model_cfg, n_labels)
        trunk = {k[len("bert."):]: v for k, v in init_state["model"].items() if k.startswith("bert.")}
        try:
            model.bert.load_state_dict(trunk)  # strict: the trunk must match exactly
        except RuntimeError as e:
            raise UserError(f"{init_state['path']}: its weights do not match its config ({str(e).splitlines()[0]})")
    else:
        model_cfg = BertConfig.preset(cfg.model, **overrides)
        model = BertForClassification(model_cfg, n_labels)
    top = max(int(train.ids.max(initial=0)), int(test.ids.max(initial=0)))
    if top >= model_cfg.vocab_size:
        raise UserError(f"{task_dir}: token ids reach {top}, the model's vocabulary has {model_cfg.vocab_size}")
    if train.row_len > model_cfg.max_pos:
        raise UserError(f"{train.path}: rows of {train.row_len} tokens exceed the model's {model_cfg.max_pos} positions")
    config = {**asdict(cfg), "lr": lr, "wd": wd, "task_dir": task_dir.name, "model_config": model_cfg.to_dict()}
    if not cfg.quiet:
        print_config("config", {k: v for k, v in config.items() if k != "model_config"})
    raw_model = model
    model = prepare_model(model, device, cfg.kernels, cfg.compile, cfg.compile_mode)
    opt = make_optimizer(raw_model, lr, wd, device)
    log = RunLog(out, config, device)

    n = len(train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.decay_epochs * steps_per_epoch
    ytr_t = torch.from_numpy(ytr)
    accs, step = [], 0
    bar = tqdm(range(cfg.epochs), desc=f"finetune {'pre-trained' if init_state else 'scratch'}", unit="epoch",
               disable=cfg.quiet or None)
    graphs = cfg.compile and cfg.compile_mode == "reduce-overhead"
    train_s = eval_s = 0.0  # wall time of the training steps and of the scoring, for the records' seq/s
    for epoch in bar:
        order = epoch_order(n, cfg.seed, epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)
        t0 = time.perf_counter()
        for b in range(steps_per_epoch):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are consumed
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, lr)
            rows = np.sort(order[b * cfg.batch_size:(b + 1) * cfg.batch_size])
            x = get_batch(train.ids, rows, device)
            y = ytr_t[rows].to(device)
            with autocast(device):
                _, loss = model(x, targets=y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach().float()
            step += 1
        loss_sum = loss_sum.item()  # syncs: the training steps are done
        t1 = time.perf_counter()
        logits = predict_logits(model, test.ids, device)  # syncs too (.cpu() of the logits)
        train_s += t1 - t0
        eval_s += time.perf_counter() - t1
        acc = accuracy(logits, yte)
        accs.append(acc)
        log.write({"kind": "epoch", "epoch": epoch, "step": step, "train_loss": loss_sum / steps_per_epoch,
                   "test_acc": acc})
        bar.set_postfix(loss=f"{loss_sum / steps_per_epoch:.3f}", test_acc=f"{acc:.4f}")
        if not cfg.quiet:
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: train loss {loss_sum / steps_per_epoch:.4f}, "
                       f"test acc {acc:.4f}")

    test_fp = test.checksum.hex()
    result = {
        "task": task_dir.name, "arm": "pretrained" if init_state else "scratch",
        "init": init_state["path"] if init_state else None,
        "pretrain": init_state["data"] if init_state else None,
        "acc": accs[-1], "acc_best_selected_on_test": max(accs), "best_epoch": int(np.argmax(accs)) + 1,
        "acc_per_epoch": accs, "per_label_acc": dict(zip(meta["label_names"], per_label_accuracy(logits, yte, n_labels))),
        "token_stats": stats, "n_train": n, "n_test": len(test), "seed": cfg.seed, "lr": lr, "wd": wd,
        "epochs": cfg.epochs, "model_config": model_cfg.to_dict(), "params": raw_model.num_params(),
        "device": device_name(device),
        # wall time per sequence, first epoch (compilation) included
        "seq_per_s": round(n * cfg.epochs / max(train_s, 1e-9), 1),
        "eval_seq_per_s": round(len(test) * cfg.epochs / max(eval_s, 1e-9), 1),
    }
    save_checkpoint(out / "ckpt.pt", kind="cls", model=raw_model, optimizer=None, step=step, epoch=cfg.epochs,
                    train_config=config, data={"task_dir": task_dir.name, "spec": asdict(spec)},
                    extra={"task": spec.task, "spec": asdict(spec), "label_names": meta["label_names"],
                           "test_fingerprint": test_fp, "acc": accs[-1], "init": result["init"]})
    write_json(out / "result.json", result)
    return result


def report(r: dict):
    s = r["token_stats"]
    ts = f"T_C {s['T_C']:,}  T_W {s['T_W']:,}  T_M {s['T_M']:,}" if s else "token stats unavailable (pre-training data unknown or gone)"
    print(f"[{r['arm']}] {r['task']}: final-epoch test acc {r['acc']:.4f} "
          f"(best {r['acc_best_selected_on_test']:.4f} at epoch {r['best_epoch']}, selected on test); {ts}")
    print("  per label: " + ", ".join(f"{k} {v:.3f}" for k, v in r["per_label_acc"].items()))


def main(argv=None):
    cfg, overrides = parse(argv)
    if cfg.init.startswith("hf:"):
        from tinytlm.hf import hf_init_state
        init_state = hf_init_state(cfg.init[3:])
    else:
        init_state = load_checkpoint(cfg.init, kind="mlm") if cfg.init else None
    if cfg.gap and init_state is None:
        raise UserError("--gap needs --init CKPT (the pre-trained arm)")
    if init_state is not None and overrides:
        raise UserError(f"model flags ({', '.join('--' + k for k in overrides)}) conflict with --init: "
                        f"the architecture comes from the checkpoint")
    arch = init_state["train_config"]["model"] if init_state else cfg.model
    tag = short_hash({"spec": asdict(cfg.spec()), "overrides": overrides, "init": cfg.init})
    name = f"cls-{cfg.spec().dirname()}-{arch}-{'pt' if init_state else 'scratch'}-s{cfg.seed}-{tag}"
    out = Path(cfg.out or f"runs/{name}")
    done = [p for p in ([out / "pretrained", out / "scratch"] if cfg.gap else [out]) if (p / "ckpt.pt").is_file()]
    if done:
        raise UserError(f"{done[0]} already holds a classifier checkpoint; choose another --out")
    if not cfg.gap:
        r = run_arm(cfg, overrides, init_state, out)
        report(r)
        return r
    # the gap: same seed, same data, same architecture; only the initialisation differs
    scratch_overrides = BertConfig.from_dict(init_state["model_config"]).to_dict()
    rp = run_arm(cfg, {}, init_state, out / "pretrained")
    rs = run_arm(replace(cfg, init=""), scratch_overrides, None, out / "scratch")
    report(rp)
    report(rs)
    gap = {"task": rp["task"], "acc_pretrained": rp["acc"], "acc_scratch": rs["acc"], "gap": rp["acc"] - rs["acc"],
           "token_stats": rp["token_stats"], "seed": cfg.seed}
    write_json(out / "gap.json", gap)
    print(f"gap = {rp['acc']:.4f} - {rs['acc']:.4f} = {gap['gap']:+.4f}  (final epoch, seed {cfg.seed})")
    return gap


if __name__ == "__main__":
    cli(main)
