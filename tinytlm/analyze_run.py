"""The analyses of one checkpoint, for tinytlm.analyze: what each reads (prepare_*) and what it writes (analyse_*).

prepare_mlm / prepare_cls load and check everything an analysis reads (the model, the held-out rows, the
W_s rows, the task's rows) and raise a one-line UserError before anything is computed; analyse_mlm /
analyse_cls compute and return {file name: content} (a dict -> JSON, {name: array} -> .npz, a list of
records -> JSONL) and a summary line. Nothing here writes a file.
"""
from pathlib import Path

import numpy as np

from tinytlm import analyze_apt as apt
from tinytlm.analyze_confusion import confusion_report
from tinytlm.analyze_model import check_single, classifier_fields, n_labels, state_names
from tinytlm.analyze_probes import (ProbeConfig, cls_features, linear_probe_fields, probe_predictions,
                                    train_linear_probes, train_mlm_probes)
from tinytlm.analyze_shp import shp_block
from tinytlm.checkpoint import build_model
from tinytlm.common import UserError, default_data_root, default_raw_root, read_json
from tinytlm.data import special_ids
from tinytlm.train import check_rows


def roots(args, recorded: dict) -> tuple:
    """(raw, data) roots: the flags, else those the run recorded in its train_config, else the defaults."""
    raw = args.raw or recorded.get("raw") or default_raw_root()
    data = args.data or recorded.get("data") or default_data_root()
    return Path(raw), Path(data)


def probe_config(args) -> ProbeConfig:
    cfg = ProbeConfig(steps=args.probe_steps, batch_size=args.probe_batch, lr=args.probe_lr,
                      weight_decay=args.probe_wd, seed=args.probe_seed, init=args.probe_init)
    cfg.validate()
    return cfg


def vocab_words(folder: Path, vocab_size: int):
    """id -> token string from the vocabulary a prepared folder's meta.json names, or None (unreadable)."""
    try:
        words = Path(read_json(folder / "meta.json", "meta").get("vocab", "")).read_text(encoding="utf-8")
    except (UserError, OSError, AttributeError):
        return None
    words = words.splitlines()
    return words if len(words) == vocab_size else None


def header(state: dict, device, args) -> dict:
    """What every output file says about where it comes from (precision: the resolved one, and as asked)."""
    return {"checkpoint": state["path"], "step": state["step"], "model_config": state["model_config"],
            "device": str(device), "precision": args.precision, "precision_requested": args.precision_requested}


# -----------------------------------------------------------------------------
# a pre-training run

def prepare_mlm(state: dict, args) -> dict:
    """Model, held-out rows (and their meta), W_s rows and counts, the task's counts (--task), vocabulary."""
    model = check_single(build_model(state))
    held, held_meta = apt.held_out(state, args.data)
    check_rows(int(held.ids.max()), held.ids.shape[1], model.config, held_meta["shard"])
    rows = apt.ws_rows(state, args.data)
    wsc = apt.ws_counts(state, rows, model.config.vocab_size)
    task = None
    if args.task:
        from tinytlm.tasks import ensure_task, spec_from_args
        from tinytlm.tokstats import task_counts
        task = task_counts(ensure_task(spec_from_args(args), *roots(args, state["train_config"])))
    return {"model": model, "held": held, "held_meta": held_meta, "rows": rows, "wsc": wsc, "task": task,
            "special_ids": state["data"]["special_ids"],
            "words": vocab_words(Path(held_meta["shard"]).parent, model.config.vocab_size)}


def analyse_mlm(state: dict, ctx: dict, asked: tuple, args, device) -> tuple:
    """({file: content}, summary): apt.json, blocks.json/.npz, probes.jsonl, confusion.json/.npz as asked."""
    model, held, wsc = ctx["model"].to(device), ctx["held"], ctx["wsc"]
    V = model.config.vocab_size
    targets, preds = apt.held_out_predictions(model, held, device, args.precision)
    correct, occ = apt.token_counts(targets, preds, V)
    report = apt.apt_report(correct, occ, wsc, args.min_occ, ctx["task"])
    recorded = (state["extra"].get("val") or {}).get("val_mlm_acc")
    head = {**header(state, device, args), "held_out": ctx["held_meta"],
            "ws": {k: state["data"].get(k) for k in ("pretrain_set", "ws", "shard", "rows_checksum", "task")}}
    files = {}
    if "apt" in asked:
        files["apt.json"] = {"kind": "apt", **head, "val_mlm_acc": recorded, "task": args.task or None, **report}
    sets = [("head", targets, preds)]  # the model's own head, then a probe per state
    if "blocks" in asked:
        sets += mlm_blocks(model, ctx, args, device, head, report, occ, files)
    if "confusion" in asked:
        summaries, arrays = {}, {}
        for name, y, p in sets:
            summaries[name], a = confusion_report(y, p, args.cluster_threshold, ctx["words"])
            arrays.update({f"{name}.{k}": v for k, v in a.items()})
        files["confusion.json"] = {"kind": "confusion", **head, "states": summaries}
        files["confusion.npz"] = arrays
    line = f"<APT> {report['mean_apt']:.4f}, accuracy {report['accuracy']:.6f}"
    return files, line + (f" (the run's val_mlm_acc {recorded:.6f})" if recorded is not None else "")


def mlm_blocks(model, ctx, args, device, head: dict, report: dict, occ, files: dict) -> list:
    """Train an MLM probe per state, score it on the held-out masks: blocks.json/.npz and probes.jsonl into
    files; returns (state, targets, predictions) per state for the confusion analysis."""
    cfg = probe_config(args)
    probes, records = train_mlm_probes(model, ctx["rows"], ctx["special_ids"], cfg, device, args.precision)
    names = state_names(model)
    per = probe_predictions(model, probes, ctx["held"], device, args.precision)
    counts = [apt.token_counts(y, p, model.config.vocab_size)[0] for y, p in per]
    files["probes.jsonl"] = records
    files["blocks.json"] = {
        "kind": "blocks-mlm", **head, "probe": vars(cfg),
        "decoder": "tied to the model's frozen word embeddings; own bias",
        "states": [{"state": n, "mean_apt": apt.mean_over_tokens(c, occ, args.min_occ),
                    "accuracy": float(c.sum() / occ.sum()),
                    "by_frequency": apt.frequency_bins(c, occ, ctx["wsc"], args.min_occ)}
                   for n, c in zip(names, counts)],
        "head": {"mean_apt": report["mean_apt"], "accuracy": report["accuracy"]}}
    files["blocks.npz"] = {"names": np.array(names), "correct": np.stack(counts), "occ": occ, "ws_counts": ctx["wsc"]}
    return [(n, y, p) for n, (y, p) in zip(names, per)]


# -----------------------------------------------------------------------------
# a classifier run

def prepare_cls(state: dict, args) -> dict:
    """The classifier and its task's train and test rows (the test set it was scored on, checked)."""
    from tinytlm.tasks import TaskSpec, ensure_task, load_task
    model = check_single(build_model(state))
    task_dir = ensure_task(TaskSpec.from_dict(state["data"]["spec"]), *roots(args, state["train_config"]))
    train, ytr, test, yte, meta = load_task(task_dir)
    fp = state["extra"].get("test_fingerprint")
    if fp and test.checksum.hex() != fp:
        raise UserError(f"{test.path}: not the test set {state['path']} was scored on")
    check_rows(max(int(train.ids.max(initial=0)), int(test.ids.max(initial=0))), train.row_len, model.config,
               task_dir)
    return {"model": model, "train": (train.ids, ytr), "test": (test.ids, yte), "task_dir": task_dir,
            "pad": special_ids(task_dir)["pad"], "label_names": meta["label_names"]}


def head_fields(model, device):
    """fields_fn of the trained classifier head for tinytlm.analyze_shp.shp_block (CPU tensors in and out)."""
    def fn(feats, keep):
        return classifier_fields(model, feats.to(device), None if keep is None else keep.to(device)).float().cpu()
    return fn


def probe_fields(probe, device):
    """fields_fn of a linear probe for tinytlm.analyze_shp.shp_block."""
    def fn(feats, keep):
        return linear_probe_fields(probe, feats, keep, device)
    return fn


def analyse_cls(state: dict, ctx: dict, asked: tuple, args, device) -> tuple:
    """({file: content}, summary): blocks.json (a linear probe's test accuracy per state), probes.jsonl, shp.json."""
    model = ctx["model"].to(device)
    names, C = state_names(model), n_labels(model)
    (xtr, ytr), (xte, yte) = ctx["train"], ctx["test"]
    ftr, fte = (cls_features(model, x, ctx["pad"], device, precision=args.precision)
                for x in (xtr, xte))  # per state (N, H)
    own = head_fields(model, device)(fte[-1], None)  # (N_test, C): the trained head on the last state
    own_acc = float((own.argmax(-1).numpy() == yte).mean())
    recorded = state["extra"].get("acc")
    head = {**header(state, device, args), "task_dir": str(ctx["task_dir"]), "labels": ctx["label_names"],
            "n_train": len(ytr), "n_test": len(yte), "head_accuracy": own_acc, "recorded_accuracy": recorded}
    files, probes = {}, None
    if "blocks" in asked or ("shp" in asked and args.shp_blocks == "all"):
        cfg = probe_config(args)
        probes, files["probes.jsonl"] = train_linear_probes(ftr, ytr, C, cfg, device)
        accs = [float((linear_probe_fields(p, f, device=device).argmax(-1).numpy() == yte).mean())
                for p, f in zip(probes, fte)]
        if "blocks" in asked:
            files["blocks.json"] = {"kind": "blocks-cls", **head, "probe": vars(cfg),
                                    "states": [{"state": n, "accuracy": a} for n, a in zip(names, accs)]}
    if "shp" in asked:
        size, last = args.shp_group or model.config.head_dim, len(names) - 1
        blocks = []
        for i in (range(len(names)) if args.shp_blocks == "all" else [last]):
            fn = head_fields(model, device) if i == last else probe_fields(probes[i], device)
            blocks.append({"state": names[i], "head": "trained head" if i == last else "linear probe",
                           **shp_block(fn, fte[i], yte, C, size, args.shp_threshold, args.shp_norm)})
        files["shp.json"] = {"kind": "shp", **head, "blocks": blocks,
                             "snr_per_block": {b["state"]: b["mean_snr"] for b in blocks}}
    line = f"head accuracy {own_acc:.4f}"
    return files, line + (f" (recorded {recorded:.4f})" if recorded is not None else "")
