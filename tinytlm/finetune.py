"""Fine-tune a BERT classifier on AG News, DBpedia-14 or FewRel, with or without pre-training.

    python train_cls.py --task agnews                               # no pre-training (scratch bert6)
    python train_cls.py --task agnews --init runs/mlm-bert6-random-ws40000-s0
    python train_cls.py --task agnews --init runs/mlm-... --gap      # both arms, same seed: the gap
    python train_cls.py --task fewrel --labels 0,2,5,10,11,12,13,14,15,3 --init runs/mlm-...
    python train_cls.py --task agnews --model tiny --train-per-label 200 --test-per-label 200 --epochs 5
    python train_cls.py --task agnews --init hf:path/to/bert-base-uncased --gap   # a Hugging Face BERT folder
    python train_cls.py --task agnews --seeds 0,1,2,3,4 --init runs/b1x5 --out runs/c  # 5 stacked, one run

The architecture comes from the checkpoint when --init is given, else from --model
and --arch. Test accuracy is printed each epoch; the reported result is the
final epoch's accuracy (the best epoch's is also reported, labelled as selected on
test). Outputs in --out (default runs/<name>): config.json, metrics.jsonl, ckpt.pt
(a classifier checkpoint ensemble.py reads) and result.json. With --seeds, one classifier per seed
is trained as one stacked model; member s is written to OUT/s<s>/ as `--seed s --out OUT/s<s>` writes
it, and `--resume OUT` continues them all (see tinytlm/members.py).
"""
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tinytlm.checkpoint import load_checkpoint, load_group
from tinytlm.common import UserError, cli, config_hash, home, read_json, write_json
from tinytlm.dist import Dist
from tinytlm.session import read_stack, write_stack
from tinytlm.finetune_loop import run_arm, run_members
from tinytlm.model import BertConfig
from tinytlm.config import RunSwitches, from_saved, given_fields, option, parse_run_args, resumed_config, switch
from tinytlm.tasks import TaskFields, TaskSpec
from tinytlm.train import member_seeds, refuse_existing


# -----------------------------------------------------------------------------
# config

@dataclass
class ClsConfig(TaskFields, RunSwitches):
    """train_cls's flags."""
    entity_markers: bool = option(False, "FewRel: mark head and tail")
    init: str = option("", "train_mlm checkpoint or run directory, or hf:DIR (a HF BERT folder); empty = no "
                       "pre-training", kind="file")
    model: str = option("bert6", "model preset for scratch runs (ignored with --init); --arch overrides its fields")
    epochs: int = option(50, "fine-tuning epochs", low=1)
    decay_epochs: int = option(0, "the lr decays linearly to 0 over this many epochs (0 = min(--epochs, 50): "
                               "PAPER.md's decay over the first 50)", low=0)
    batch_size: int = option(32, "sequences per step", low=1)
    lr: float = option(0.0, "AdamW lr (0 = the task's default from PAPER.md)", low=0)
    weight_decay: float = option(-1.0, "AdamW weight decay (-1 = the task's default)", low=0, also=(-1.0,),
                                 aliases=("--wd",))
    seed: int = option(0, "data order, head init, dropout", low=0)
    seeds: str = option("", "comma-separated seeds: one classifier per seed, trained stacked (excludes --seed)")
    gap: bool = option(False, "run both arms (pre-trained and scratch) with the same seed and print the gap")
    quiet: bool = switch(False, "no per-epoch lines (the paper runner)")

    def spec(self) -> TaskSpec:
        return TaskFields.spec(self, entity_markers=self.entity_markers)


def parse(argv=None):
    return parse_run_args(ClsConfig, __doc__, "fine-tuning", argv)


# -----------------------------------------------------------------------------
# one arm

def report(r: dict):
    s = r["token_stats"]
    ts = f"T_C {s['T_C']:,}  T_W {s['T_W']:,}  T_M {s['T_M']:,}" if s else \
        "token stats unavailable (pre-training data unknown or gone)"
    print(f"[{r['arm']}] {r['task']}: final-epoch test acc {r['acc']:.4f} "
          f"(best {r['acc_best_selected_on_test']:.4f} at epoch {r['best_epoch']}, selected on test); {ts}")
    print("  per label: " + ", ".join(f"{k} {v:.3f}" for k, v in r["per_label_acc"].items()))


def main_write(path, obj):
    """write_json, by rank 0 alone under torchrun (tinytlm/dist.py)."""
    if Dist().main:
        write_json(path, obj)


def load_init(init: str):
    """The pre-trained state --init names: a train_mlm checkpoint or run, or hf:DIR; None for no init."""
    if init.startswith("hf:"):
        from tinytlm.hf import hf_init_state
        return hf_init_state(init[3:])
    return load_checkpoint(init, kind="mlm") if init else None


def arm(cfg: ClsConfig, overrides: dict, init_state, out: Path) -> dict:
    """One arm, resumable: finished -> its result.json; an unfinished checkpoint -> resumed exactly; else
    started (also after a kill between the final checkpoint and result.json: the run is deterministic)."""
    return arms([cfg], overrides, [init_state], [out])[0]


def arms(cfgs: list, overrides: dict, init_states: list, outs: list, resume_hint=None) -> list:
    """arm() for K members of one shape: the finished ones are read back, the others trained stacked,
    one stacked run per starting point (fresh, or the step their checkpoints stopped at). Checkpoints are
    taken at the members' common step (load_group: a kill between the members' renames leaves one a save
    ahead), and a finished checkpoint whose result.json a kill prevented holds that result."""
    results, todo = [None] * len(cfgs), {}
    pending = [k for k, o in enumerate(outs) if not ((o / "result.json").is_file() and (o / "ckpt.pt").is_file())]
    for k in set(range(len(outs))) - set(pending):
        results[k] = read_json(outs[k] / "result.json")
    saved = [k for k in pending if (outs[k] / "ckpt.pt").is_file()]
    states = dict(zip(saved, load_group([outs[k] for k in saved], kind="cls"))) if saved else {}
    for k in pending:
        state = states.get(k)
        if state and state["optimizer"] is None and "result" in state["extra"]:
            results[k] = json.loads(json.dumps(state["extra"]["result"]))  # as result.json reads back
            main_write(outs[k] / "result.json", results[k])
            continue
        # a start-of-run checkpoint (step 0) is a fresh start: with the members that have none (a kill between
        # the first save's renames) it starts again as one stack; an older finished one is trained again
        state = state if state and state["optimizer"] is not None and state["step"] > 0 else None
        todo.setdefault(state["step"] if state else None, []).append((k, state))
    for group in todo.values():
        ks = [k for k, _ in group]
        states = [st for _, st in group] if group[0][1] is not None else None
        done = run_members([cfgs[k] for k in ks], overrides, [init_states[k] for k in ks], [outs[k] for k in ks],
                           states, resume_hint)
        for k, r in zip(ks, done):
            results[k] = r
    return results


def gap_arms(cfg: ClsConfig, out: Path, init_state=None) -> dict:
    """The gap: same seed, same data, same architecture; only the initialisation differs. Each arm
    resumes from where it stopped; gap.json at the end."""
    return gap_members([cfg], [out], [init_state or load_init(cfg.init)])[0]


def gap_members(cfgs: list, outs: list, init_states: list, resume_hint=None) -> list:
    """gap_arms for K members: the pre-trained arms stacked, then the scratch arms stacked; out/gap.json each."""
    shapes = {str(BertConfig.from_dict(st["model_config"]).to_dict()) for st in init_states}
    if len(shapes) > 1:
        raise UserError(f"{init_states[1]['path']}: the members' --init checkpoints differ in shape; "
                        f"stacked members share one architecture")
    scratch_overrides = BertConfig.from_dict(init_states[0]["model_config"]).to_dict()
    rps = arms(cfgs, {}, init_states, [o / "pretrained" for o in outs], resume_hint)
    rss = arms([replace(c, init="") for c in cfgs], scratch_overrides, [None] * len(cfgs),
               [o / "scratch" for o in outs], resume_hint)
    gaps = []
    for c, out, rp, rs in zip(cfgs, outs, rps, rss):
        report(rp)
        report(rs)
        gap = {"task": rp["task"], "acc_pretrained": rp["acc"], "acc_scratch": rs["acc"],
               "gap": rp["acc"] - rs["acc"], "token_stats": rp["token_stats"], "seed": c.seed}
        main_write(out / "gap.json", gap)
        print(f"gap = {rp['acc']:.4f} - {rs['acc']:.4f} = {gap['gap']:+.4f}  (final epoch, seed {c.seed})")
        gaps.append(gap)
    return gaps


def resume(cfg: ClsConfig, overrides: dict, given: set = ()) -> dict:
    """--resume DIR: a single arm's run directory, or a --gap folder (both arms, then the gap)."""
    where = Path(cfg.resume)
    m = read_stack(where, kind="cls")
    if m:
        saved = resumed_config(cfg, from_saved(ClsConfig, m["config"]), overrides, given)
        if all((Path(o) / ("gap.json" if saved.gap else "result.json")).is_file() for o in m["members"]):
            raise UserError(f"{where}: this stacked run has finished; nothing to resume")
        return run_stack(saved, m["overrides"], [Path(o) for o in m["members"]], where)
    gap_file = where / "gap_config.json"
    if gap_file.is_file():
        saved = from_saved(ClsConfig, read_json(gap_file, "gap config"))
    else:
        state = load_checkpoint(where, kind="cls", fallback=True)
        if state["optimizer"] is None and "result" in state["extra"] and not (where / "result.json").is_file():
            print(f"{state['path']}: finished; writing its result.json (a kill came before it)")
            r = json.loads(json.dumps(state["extra"]["result"]))  # as result.json reads back
            main_write(where / "result.json", r)
            report(r)
            return r
        if state["optimizer"] is None:
            raise UserError(f"{state['path']}: this run has finished; nothing to resume")
        saved = from_saved(ClsConfig, state["train_config"])
    saved = resumed_config(cfg, saved, overrides, given)
    if gap_file.is_file():
        if (where / "gap.json").is_file():
            raise UserError(f"{where}: this gap run has finished (gap.json); nothing to resume")
        return gap_arms(replace(saved, out=str(where)), where)
    r = run_arm(replace(saved, out=str(where)), {}, None, Path(state["path"]).parent, state)
    report(r)
    return r


def member_inits(init: str, seeds: list) -> list:
    """Each member's --init: the one checkpoint for every member, or, when `init` is a stacked
    train_mlm run (its stack.json), member s's own checkpoint DIR/s<s>; "" without pre-training."""
    manifest = Path(init) / "stack.json" if init and not init.startswith("hf:") else None
    if not manifest or not manifest.is_file():
        return [init] * len(seeds)
    m = read_json(manifest, "stack manifest")
    by_seed = {int(s): o for s, o in zip(m["config"]["seeds"].split(","), m["members"])}
    missing = [s for s in seeds if s not in by_seed]
    if m.get("kind") != "mlm" or missing:
        raise UserError(f"{manifest}: " + (f"has no member for seed {missing[0]} (it has {m['config']['seeds']})"
                                           if missing else "not a stacked pre-training"))
    return [by_seed[s] for s in seeds]


def run_name(cfg: ClsConfig, overrides: dict, init_state) -> str:
    arch = init_state["train_config"]["model"] if init_state else cfg.model
    tag = config_hash({"spec": asdict(cfg.spec()), "overrides": overrides, "init": cfg.init})
    return f"cls-{cfg.spec().dirname()}-{arch}-{'pt' if init_state else 'scratch'}-s{cfg.seed}-{tag}"


def run_stack(cfg: ClsConfig, overrides: dict, outs: list, where: Path):
    """A --seeds run (fresh or resumed): member s trains as `--seed s --init <its init> --out outs[k]`."""
    seeds = member_seeds(cfg)
    inits = member_inits(cfg.init, seeds)
    states = {i: load_init(i) for i in set(inits)}
    cfgs = [replace(cfg, seed=s, seeds="", init=i, out=str(o)) for s, i, o in zip(seeds, inits, outs)]
    if cfg.gap:
        for c, o in zip(cfgs, outs):  # each member's folder is a --gap folder of its own
            if not (o / "gap_config.json").is_file():
                main_write(o / "gap_config.json", asdict(c))
        return gap_members(cfgs, outs, [states[i] for i in inits], where)
    results = arms(cfgs, overrides, [states[i] for i in inits], outs, where)
    for r in results:
        report(r)
    return results


def main(argv=None):
    cfg, overrides = parse(argv)
    if cfg.resume:
        return resume(cfg, overrides, given_fields(ClsConfig, argv))
    seeds = member_seeds(cfg)
    init_state = load_init(member_inits(cfg.init, seeds)[0])
    if cfg.gap and init_state is None:
        raise UserError("--gap needs --init CKPT (the pre-trained arm)")
    if init_state is not None and overrides:
        raise UserError(f"--arch ({', '.join(overrides)}) conflicts with --init: the architecture comes from the "
                        f"checkpoint")
    if cfg.seeds:
        where = Path(cfg.out or home() / "runs" / run_name(replace(cfg, seed=cfg.seeds.replace(",", "+")),
                                                           overrides, init_state))
        inits = member_inits(cfg.init, seeds)
        outs = [Path(cfg.out) / f"s{s}" if cfg.out else
                home() / "runs" / run_name(replace(cfg, seed=s, seeds="", init=i), overrides, init_state)
                for s, i in zip(seeds, inits)]
        refuse_existing(where, [d for o in outs for d in ([o / "pretrained", o / "scratch"] if cfg.gap else [o])])
        write_stack(where, "cls", cfg, overrides, outs)  # what --resume continues
        return run_stack(cfg, overrides, outs, where)
    out = Path(cfg.out or home() / "runs" / run_name(cfg, overrides, init_state))
    refuse_existing(out, [out / "pretrained", out / "scratch"] if cfg.gap else [out])
    if not cfg.gap:
        r = run_arm(cfg, overrides, init_state, out)
        report(r)
        return r
    main_write(out / "gap_config.json", asdict(replace(cfg, out=str(out))))  # what --resume OUT continues
    return gap_arms(cfg, out, init_state)


if __name__ == "__main__":
    cli(main)
