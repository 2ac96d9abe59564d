"""The grid of every paper table at three scales, the paper's numbers beside it, and the figures.

    from tinytlm.paper_tables import grid
    g = grid("table5", "cpu")       # {"rows": [...], "plot": "gap_vs_ws", "deviations": [...], ...}

A grid is a list of rows. A "train" row fine-tunes one classifier per seed, optionally
from a pre-trained checkpoint; a "committee" row sums the logits of other rows' members.
    name      row label in the report
    pretrain  None (no pre-training) or train_mlm fields: pretrain_set, ws, epochs, lr, ...
    model     preset, shared by the pre-trained and the scratch arm so a gap compares like with like
    overrides BertConfig fields on top of the preset
    finetune  train_cls fields: task, labels, train_per_label, test_per_label, fewrel_source, lr, weight_decay, epochs
    gap_of    name of the row to subtract (same seed) for the gap, or None
    seed_offset  added to the seed (two members with one architecture differ only by it)
    paper     the paper's numbers for this row (PAPER.md), shown beside ours
Scales: paper = the paper's sizes (BERT-6, 50 + 50 epochs); cpu = a 2-core budget of about
30 minutes a table; mini = seconds, for the CI test.
"""
import math

from tinytlm.model import BertConfig

# FewRel val_wiki has 16 relations; the paper's 10-label experiments draw 10 of its 64 train
# relations, which we do not have at 630/70, so three fixed sets of 10 val_wiki indices stand in.
VAL_SETS = ("0,1,2,3,4,5,6,7,8,9", "6,7,8,9,10,11,12,13,14,15", "0,2,4,6,8,10,12,13,14,15")
BERT1_VARIANTS = ("bert1-cl2-d64-3x3-h8", "bert1-cl2-d64-3x3-h12", "bert1-h24", "bert1-cl2-d64-16x3-h12",
                  "bert1-cl3-d32-3x3-h12")

# the labels sweep (beyond the paper), fixed before any of its results was seen: AG News train rows per label,
# 3 fine-tuning seeds, all from one pre-trained checkpoint (the scale's Table 5 row at W_s = ws["labels"])
LABEL_SIZES = (16, 32, 64, 128, 256, 1000)
LABEL_SEEDS = 3

SCALES = {
    # model: the BERT-6 stand-in; pt_seqs: pre-training sequences per checkpoint (epochs = seqs / W_s,
    # capped at 50); pretrain_seeds: distinct pre-training seeds (fine-tuning seeds beyond reuse seed 0)
    "paper": dict(model="bert6", overrides={}, seeds=5, pretrain_seeds=5, pt_epochs=50, pt_seqs=None,
                  pt_lr=5.5e-5, ft_epochs=50, ft_lr=None, member_hidden=0, member_conv_div=1,
                  sizes={"fewrel10": (630, 70), "fewrel64": (100, 30), "agnews": (1000, 1000),
                         "dbpedia": (96, 100)},
                  ws={"table3": (2000, 5000, 10000, 20000, 40000, 90000), "table5": (2000, 5000, 40000, 90000),
                      "table6": (5000, 10000, 20000, 90000), "raised": 40000, "raised_db": 20000,
                      "small": 5000, "committee": 40000, "custom_cap": 0, "budget": 40000, "labels": 40000},
                  budget_epochs=(2, 10, 50), pt_mask_cap=32, label_sizes=LABEL_SIZES),
    # cpu: tiny runs at 20-250 seq/s on the shared 2-core machine depending on load. Fine-tuning needs a
    # few hundred steps to leave chance level (a scratch probe: 150 steps at 5e-4 gave 0.51 on AG News),
    # so the per-label train sizes stay near the paper's and the W_s sweep has two points.
    "cpu": dict(model="tiny", overrides={}, seeds=3, pretrain_seeds=1, pt_epochs=50, pt_seqs=24000,
                pt_lr=5e-4, ft_epochs=4, ft_lr=5e-4, member_hidden=96, member_conv_div=8,
                sizes={"fewrel10": (300, 70), "fewrel64": (20, 20), "agnews": (1000, 250), "dbpedia": (96, 100)},
                ws={"table3": (2000, 8000), "table5": (2000, 8000), "table6": (2000, 8000),
                    "raised": 8000, "raised_db": 8000, "small": 2000, "committee": 2000, "custom_cap": 8000,
                    "budget": 8000, "labels": 8000},
                budget_epochs=(3, 12, 24), pt_mask_cap=0,  # 3 = Table 5's W_s 8,000 checkpoint (24,000 seqs)
                label_sizes=LABEL_SIZES),
    "mini": dict(model="tiny", overrides={"n_layer": 1, "n_head": 1}, seeds=2, pretrain_seeds=1, pt_epochs=1,
                 pt_seqs=None, pt_lr=5e-4, ft_epochs=1, ft_lr=3e-4,
                 member_hidden=24, member_conv_div=16,
                 sizes={"fewrel10": (4, 4), "fewrel64": (2, 2), "agnews": (8, 8), "dbpedia": (4, 4)},
                 ws={"table3": (64, 128), "table5": (64,), "table6": (64, 128), "raised": 128,
                     "raised_db": 128, "small": 64, "committee": 128, "custom_cap": 128, "budget": 64,
                     "labels": 64},
                 budget_epochs=(1, 2), pt_mask_cap=0, label_sizes=(2, 8)),
}

# the paper's fine-tuning (lr, weight decay) per table (PAPER.md, last paragraph)
PAPER_HP = {"table1": (8e-5, 1e-2), "table2": (5e-5, 1.1e-2), "table3": (5e-5, 1e-2), "table4": (5e-5, 1e-2),
            "table5": (5e-5, 1e-2), "table6": (5e-5, 1e-2), "table7": (5e-5, 1e-2), "table8": (1e-4, 1e-2),
            "table9": (1e-4, 1.1e-2)}

TITLES = {
    "table1": "Table 1: BERT-6 pre-trained on custom-made sets, FewRel 10 labels",
    "table2": "Table 2: BERT-6 pre-trained on custom-made sets, FewRel 64 labels",
    "table3": "Table 3: gap vs random W_s, FewRel",
    "table4": "Table 4: raised T_M at fixed W_s, FewRel",
    "table5": "Table 5: gap vs random W_s, AG News",
    "table6": "Table 6: gap vs random W_s, DBpedia-14",
    "table7": "Table 7: raised T_M, DBpedia-14",
    "table8": "Table 8: pre-trained BERT-1 variants and their soft committee, FewRel",
    "table9": "Table 9: BERT-1 without pre-training and their soft committee, AG News",
    "budget": "Beyond the paper: gap vs pre-training length at a fixed W_s, AG News",
    "labels": "Beyond the paper: gap vs labelled rows per label at one pre-trained checkpoint, AG News",
}
PLOTS = {"table3": "gap_vs_ws", "table5": "gap_vs_ws", "table6": "gap_vs_ws", "table4": "acc_vs_tm",
         "table7": "acc_vs_tm", "table8": "committee", "table9": "committee", "budget": "gap_vs_budget",
         "labels": "gap_vs_labels"}
NOT_REPRODUCED = {  # rows the paper has and we cannot run at all
    "table5": [{"name": "W_s 6,000,000 (pre-trained DistilBERT)", "paper": {"T_W": 30522, "T_M": 0, "acc": 0.935,
                                                                           "gap": 0.095}}],
    "table6": [{"name": "full pre-training", "paper": {"gap": 0.053}}],
}


TABLE5_PAPER = {90000: {"T_W": 28302, "T_M": 90, "acc": 0.891, "gap": 0.051},
                40000: {"T_W": 27798, "T_M": 249, "acc": 0.878, "gap": 0.038},
                5000: {"T_W": 22137, "T_M": 2736, "acc": 0.861, "gap": 0.021},
                2000: {"T_W": 16871, "T_M": 5473, "acc": 0.854, "gap": 0.014},
                0: {"T_W": 0, "T_M": 17072, "acc": 0.840, "gap": 0}}


def _task(kind, s, table, labels=""):
    """train_cls fields for a task kind at scale s, with the table's fine-tuning hyper-parameters."""
    tr, te = s["sizes"][kind]
    lr, wd = PAPER_HP[table]
    f = {"task": "fewrel" if kind.startswith("fewrel") else kind, "train_per_label": tr, "test_per_label": te,
         "lr": s["ft_lr"] or lr, "weight_decay": wd, "epochs": s["ft_epochs"], "decay_epochs": s["ft_epochs"]}
    if kind == "fewrel10":
        f.update(labels=labels or VAL_SETS[0], fewrel_source="val_wiki")
    if kind == "fewrel64":
        f.update(fewrel_source="train_wiki")
    return f


def _pretrain(s, ws, pretrain_set="random", task=None):
    """train_mlm fields; constructed sets also name the task whose tokens define them."""
    epochs = s["pt_epochs"]
    if s["pt_seqs"]:
        epochs = max(1, min(epochs, math.ceil(s["pt_seqs"] / max(ws, 1))))
    p = {"pretrain_set": pretrain_set, "ws": ws, "epochs": epochs, "lr": s["pt_lr"]}
    if s["pt_mask_cap"]:  # static sparse-head shapes (CUDA graphs); the masks are the paper's but in rare rows
        p["mask_cap"] = s["pt_mask_cap"]
    if task:
        p.update({k: task[k] for k in ("task", "labels", "train_per_label", "test_per_label", "fewrel_source")
                  if k in task})
    return p


def _member(s, model: str) -> dict:
    """BERT-1 member overrides at a reduced scale. The five Table 8 variants differ in heads, conv layers,
    kernel and channels: all of it is kept (hidden fixed, head_dim = hidden / heads; channels divided), so
    no two members collapse into one architecture."""
    if not s["member_hidden"]:
        return {}
    p = BertConfig.preset(model)
    if s["member_hidden"] % p.n_head:
        raise ValueError(f"member_hidden {s['member_hidden']} is not a multiple of {model}'s {p.n_head} heads")
    o = {"head_dim": s["member_hidden"] // p.n_head}
    if p.n_conv:
        o["conv_channels"] = max(1, p.conv_channels // s["member_conv_div"])
    return o


def _row(name, s, ft, pretrain=None, gap_of="no pre-training", paper=None, model=None, overrides=None, seed_offset=0):
    return {"name": name, "kind": "train", "pretrain": pretrain, "model": model or s["model"],
            "overrides": s["overrides"] if overrides is None else overrides, "finetune": ft,
            "gap_of": gap_of if pretrain else None, "paper": paper or {}, "seed_offset": seed_offset}


def _nearest(paper, ws):
    """The paper's numbers at W_s, or at its nearest W_s (log scale) labelled as such."""
    if ws in paper or not paper:
        return paper.get(ws)
    near = min((k for k in paper if k), key=lambda k: abs(math.log(k / ws)))
    return {"at W_s": near, **paper[near]}


def _sweep(s, table, kind, ws_list, paper):
    ft = _task(kind, s, table)
    rows = [_row(f"W_s {ws:,}", s, ft, _pretrain(s, ws), paper=_nearest(paper, ws)) for ws in ws_list]
    return rows + [_row("no pre-training", s, ft, paper=paper.get(0))]


def _raised(s, table, kind, ws, paper, small=True):
    ft = _task(kind, s, table)
    rows = [_row(f"random W_s {ws:,}", s, ft, _pretrain(s, ws), paper=paper.get("random")),
            _row(f"raised T_M W_s {ws:,}", s, ft, _pretrain(s, ws, "raised-tm", ft), paper=paper.get("raised"))]
    if small:
        rows.append(_row(f"random W_s {s['ws']['small']:,}", s, ft, _pretrain(s, s["ws"]["small"]),
                         paper=paper.get("small")))
    return rows + [_row("no pre-training", s, ft, paper=paper.get(0))]


def _labels(s, ws) -> list:
    """The labels sweep: per size, the pre-trained arm (Table 5's checkpoint at W_s ws, its pre-training
    unchanged) and the scratch arm, with Table 5's fine-tuning recipe but for the train rows per label. At
    1,000 rows per label (AG News at the paper's size) both arms are Table 5's own cells."""
    rows = []
    for n in s["label_sizes"]:
        ft = {**_task("agnews", s, "table5"), "train_per_label": n}
        scratch = f"{n:,} per label: no pre-training"
        at_paper = n == SCALES["paper"]["sizes"]["agnews"][0]  # the paper's Table 5 recipe
        rows += [_row(f"{n:,} per label: W_s {ws:,}", s, ft, _pretrain(s, ws), scratch,
                      paper={**_nearest(TABLE5_PAPER, ws), "from": "Table 5"} if at_paper else None),
                 _row(scratch, s, ft, paper={**TABLE5_PAPER[0], "from": "Table 5"} if at_paper else None)]
    return rows


def default_seeds(table: str, scale: str) -> int:
    """Fine-tuning seeds of a table when --seeds is not given: the scale's, but LABEL_SEEDS for the labels
    sweep (at most the mini scale's, which is for tests)."""
    s = SCALES[scale]["seeds"]
    if table != "labels":
        return s
    return min(LABEL_SEEDS, s) if scale == "mini" else LABEL_SEEDS


def pretrain_seeds(table: str, scale: str) -> int:
    """Distinct pre-training seeds: the scale's, but one for the labels sweep (one fixed checkpoint)."""
    return 1 if table == "labels" else SCALES[scale]["pretrain_seeds"]


def grid(table: str, scale: str) -> dict:
    s, w = SCALES[scale], SCALES[scale]["ws"]
    if table == "table1":
        paper = [{"ws": 37936, "T_W": 12829, "T_M": 1053, "acc": 0.864, "gap": 0.066},
                 {"ws": 20589, "T_W": 13959, "T_M": 6492, "acc": 0.795, "gap": 0.069},
                 {"ws": 46898, "T_W": 13342, "T_M": 1084, "acc": 0.871, "gap": 0.058}]
        rows = []
        for i, labels in enumerate(VAL_SETS):
            ft = _task("fewrel10", s, table, labels)
            scratch = f"set {labels}: no pre-training"
            rows += [_row(f"set {labels}: custom", s, ft, _pretrain(s, w["custom_cap"], "custom", ft), scratch,
                          paper={**paper[i], "label set": "paper set %d" % (i + 1)}),
                     _row(scratch, s, ft)]
    elif table == "table2":
        rows = []
        for (tr, te), p in (((20, 20), {"ws": 60655, "T_C": 11135, "T_M": 764, "acc": 0.456, "gap": 0.149}),
                            ((30, 20), {"ws": 105101, "T_C": 12306, "T_M": 562, "acc": 0.476, "gap": 0.123})):
            if scale == "mini":
                tr, te = tr // 10, te // 10
            ft = {**_task("fewrel64", s, table), "train_per_label": tr, "test_per_label": te}
            scratch = f"{tr}/{te}: no pre-training"
            rows += [_row(f"{tr}/{te}: custom", s, ft, _pretrain(s, w["custom_cap"], "custom", ft), scratch, paper=p),
                     _row(scratch, s, ft)]
    elif table == "table3":
        paper = {90000: {"gap": 0.07}, 40000: {"gap": "0.043-0.05"}, 20000: {"gap": "0.043-0.05"},
                 2000: {"gap": "~0.01"}}
        rows = _sweep(s, table, "fewrel10", w["table3"], paper)
        ft64 = _task("fewrel64", s, table)
        rows += [_row(f"64 labels: W_s {w['raised']:,}", s, ft64, _pretrain(s, w["raised"]),
                      "64 labels: no pre-training", paper={"acc": 0.625, "ws": 40000}),
                 _row("64 labels: no pre-training", s, ft64)]
    elif table == "table4":
        p10 = {"random": {"T_W": 27782, "T_M": 15, "acc": 0.860}, "raised": {"T_W": 14799, "T_M": 8661, "acc": 0.823},
               "small": {"T_W": 22137, "T_M": 11059, "acc": 0.827}}
        rows = _raised(s, table, "fewrel10", w["raised"], p10)
        for r in _raised(s, table, "fewrel64", w["raised"], {"random": {"acc": 0.625}, "raised": {"acc": 0.578},
                                                            "small": {"acc": 0.579}}):
            r["name"] = "64 labels: " + r["name"]
            r["gap_of"] = r["gap_of"] and "64 labels: no pre-training"
            rows.append(r)
    elif table == "table5":
        rows = _sweep(s, table, "agnews", w["table5"], TABLE5_PAPER)
    elif table == "table6":
        paper = {0: {"acc": 0.938, "gap": 0}, 5000: {"acc": 0.957, "gap": 0.019}, 10000: {"acc": 0.972, "gap": 0.034},
                 20000: {"acc": 0.979, "gap": 0.041}, 90000: {"gap": 0.047}}
        rows = _sweep(s, table, "dbpedia", w["table6"], paper)
    elif table == "table7":
        rows = _raised(s, table, "dbpedia", w["raised_db"],
                       {"random": {"acc": 0.979}, "raised": {"T_W": 12006, "T_M": 10250, "acc": 0.948},
                        0: {"acc": 0.938}}, small=False)
    elif table == "table8":
        rows = []
        paper = [(0.846, 0.592), (0.841, 0.607), (0.841, 0.592), (0.836, 0.614), (0.836, 0.610)]
        for kind, j, tag in (("fewrel10", 0, "10 labels"), ("fewrel64", 1, "64 labels")):
            ft = _task(kind, s, table)
            names = []
            for v, p in zip(BERT1_VARIANTS, paper):
                names.append(f"{tag}: {v}")
                rows.append(_row(names[-1], s, ft, _pretrain(s, w["committee"]), None, {"acc": p[j]}, model=v,
                                 overrides=_member(s, v)))
            rows.append({"name": f"{tag}: committee", "kind": "committee", "members": names,
                         "reference": f"{tag}: {s['model']} W_s {w['committee']:,}",
                         "paper": {"acc": (0.866, 0.634)[j]}})
            rows.append(_row(f"{tag}: {s['model']} W_s {w['committee']:,}", s, ft, _pretrain(s, w["committee"]),
                             None, {"acc": (0.865, 0.625)[j]}))
    elif table == "table9":
        ft = _task("agnews", s, table)
        mo = _member(s, "bert1")
        rows = [_row("bert1 (0 CLs, 12 heads) #1", s, ft, model="bert1", overrides=mo, paper={"acc": 0.839}),
                _row("bert1 (0 CLs, 12 heads) #2", s, ft, model="bert1", overrides=mo, paper={"acc": 0.834},
                     seed_offset=1000),
                _row("bert1 (1 CL, d 64, 3x3)", s, ft, model="bert1-cl1-d64-3x3-h12",
                     overrides=_member(s, "bert1-cl1-d64-3x3-h12"), paper={"acc": 0.820}),
                {"name": "committee", "kind": "committee", "paper": {"acc": 0.868},
                 "reference": f"{s['model']} W_s {w['small']:,}",
                 "members": ["bert1 (0 CLs, 12 heads) #1", "bert1 (0 CLs, 12 heads) #2", "bert1 (1 CL, d 64, 3x3)"]},
                _row(f"{s['model']} W_s {w['small']:,}", s, ft, _pretrain(s, w["small"]), None, {"acc": 0.861})]
    elif table == "budget":
        # is a missing gap a matter of pre-training too little? same W_s, same fine-tuning, longer pre-training
        ft, ws = _task("agnews", s, "table5"), w["budget"]
        paper = {(40000, 50): {"acc": 0.878, "gap": 0.038, "from": "Table 5"}}
        rows = [_row(f"W_s {ws:,} x{e} epochs", s, ft, {**_pretrain(s, ws), "epochs": e}, paper=paper.get((ws, e)))
                for e in s["budget_epochs"]]
        rows.append(_row("no pre-training", s, ft, paper={"acc": 0.840, "from": "Table 5"}))
    elif table == "labels":
        rows = _labels(s, w["labels"])
    else:
        raise KeyError(table)
    return {"table": table, "title": TITLES[table], "scale": scale, "rows": rows, "plot": PLOTS.get(table),
            "not_reproduced": NOT_REPRODUCED.get(table, []), "deviations": deviations(table, scale)}


def deviations(table: str, scale: str) -> list:
    s = SCALES[scale]
    d = []
    if scale != "paper":
        model = s["model"] + (f" {s['overrides']}" if s["overrides"] else "")
        d.append(f"scale {scale}: model {model} instead of BERT-6; fine-tuning "
                 f"{s['ft_epochs']} epochs at lr {s['ft_lr']} (linear decay over them) instead of 50; "
                 f"pre-training lr {s['pt_lr']}, epochs = "
                 + ("the sweep's (below)" if table == "budget" else f"min(50, ceil({s['pt_seqs']} / W_s))")
                 + f" instead of 50; {s['seeds']} seeds; per-label sizes {s['sizes']}"
                 if s["pt_seqs"] else f"scale {scale}: a miniature for tests; numbers mean nothing")
    if s["pt_mask_cap"]:
        d.append(f"MLM masks: the paper's Bernoulli 15% draw, but at most {s['pt_mask_cap']} masked tokens per row "
                 "(the lowest draws are kept), so the sparse MLM head has static shapes for CUDA graphs; a full "
                 "128-token row (126 candidates) exceeds 32 with probability 8e-4, every other row gets exactly "
                 "the uncapped mask")
    if s["pretrain_seeds"] < s["seeds"]:
        d.append(f"one pre-trained checkpoint per setting (seed 0) is shared by all {s['seeds']} fine-tuning "
                 f"seeds, so the spread covers fine-tuning only")
    if table in ("table1", "table3", "table4", "table8"):
        d.append(f"FewRel 10 labels come from the genuine val_wiki (16 relations), label indices "
                 f"{'; '.join(VAL_SETS) if table == 'table1' else VAL_SETS[0]}, "
                 "not from the paper's 64 train relations")
    if table in ("table2", "table3", "table4", "table8"):
        d.append("FewRel 64 labels use the lower-cased CFRL copy of train_wiki (132-403 instances per relation), "
                 f"per-label size {s['sizes']['fewrel64'] if table != 'table2' else '20/20 and 30/20'} "
                 "instead of 630/70")
    if table in ("table1", "table2"):
        d.append("custom-made sets come from our 325k-article Wikipedia (5% of the paper's pool), so they are smaller"
                 + (f"; capped at W_s {s['ws']['custom_cap']:,}" if s["ws"]["custom_cap"] else ""))
    if table in ("table6", "table7"):
        d.append("DBpedia has 96 train rows per label here (the paper: 100)")
    if table in ("table4", "table7"):
        d.append("raised-T_M sets: non-task tokens plus the fewest most-frequent Wikipedia tokens that still give "
                 "W_s rows (tinytlm.tokstats), which maximises T_M; the paper's exact token list is not given")
    if table == "table8":
        d.append("the paper does not state Table 8's W_s; we use the same W_s as our BERT-6 reference row")
    if table in ("table8", "table9") and s["member_hidden"]:
        d.append(f"BERT-1 members keep the paper's head counts and conv layers and kernels, but every member has "
                 f"hidden {s['member_hidden']} (head_dim = {s['member_hidden']} / heads; the paper: 64 per head) "
                 f"and 1/{s['member_conv_div']} of the conv channels, to fit the CPU budget")
    if table in ("table3", "table5", "table6") and scale != "paper":
        d.append(f"W_s values {', '.join(f'{x:,}' for x in s['ws'][table])} instead of the paper's "
                 f"{', '.join(f'{x:,}' for x in SCALES['paper']['ws'][table])}; the paper column shows the "
                 "paper's row at the nearest W_s ('at W_s')")
    if table == "budget":
        d.append("not in the paper: the paper pre-trains 50 epochs at every W_s; this sweep varies only the "
                 f"number of pre-training epochs ({', '.join(map(str, s['budget_epochs']))}) at W_s "
                 f"{s['ws']['budget']:,}, with Table 5's fine-tuning, to test whether a missing gap is a matter "
                 "of too little pre-training")
    if table in ("table5", "table6"):
        d.append("the paper's fully pre-trained model row cannot be run: shown as 'not reproduced'")
    if table == "labels":
        d.append(_labels_note(s, default_seeds(table, scale)))
    return d


def _labels_note(s, seeds: int) -> str:
    """What the labels sweep is, since the paper has no such table."""
    steps = ", ".join(f"{n:,}: {math.ceil(4 * n / 32) * s['ft_epochs']:,}" for n in s["label_sizes"])
    return (f"not in the paper: the paper fine-tunes AG News on 1,000 rows per label only. This sweep fine-tunes "
            f"on {', '.join(f'{n:,}' for n in s['label_sizes'])} train rows per label (tinytlm.tasks' seeded "
            f"sample; the same test rows as Table 5 at every size), from one fixed pre-trained checkpoint (Table 5's "
            f"W_s {s['ws']['labels']:,} row, seed 0) and from scratch, {seeds} seeds paired, with Table 5's "
            f"fine-tuning recipe: {s['ft_epochs']} epochs at every size, so a smaller set also gets fewer "
            f"optimizer steps (rows per label: steps at batch 32 {steps}). The grid was fixed in code before any "
            "of its "
            "results was seen; nothing is tuned by the gap")
