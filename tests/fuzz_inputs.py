"""A bad-input fuzzer driven by the commands' own parsers (issue 23).

For every command it builds the argparse parser (without running the command) and reads, per option, the one
table of constraints the command validates with (`action.constraint`: tinytlm.config's field metadata for the
training commands, tinytlm.common.add_option's for the others). From the option's type and that table it makes
trials: every wrong kind of value (numbers 0, negative, nan, inf, huge, not a number; paths missing, a file
for a folder and a folder for a file, an empty file, a path through a file, an unwritable folder, a run of
another kind, a damaged checkpoint; URLs; lists; unknown choices), the exclusive pairs the parser or its help
names, and the environment variables the package reads (ENV). Each trial expects one of

    bad   the table says it is wrong: exit 2, one stderr line naming the option, variable or file, no traceback,
          nothing written and nothing changed;
    good  the table says it is valid: the command's own parse accepts it (running it would take long);
    any   nothing declares it either way: it runs, or fails as a bad value must; never a traceback.

tests/fuzz_runner.py runs the trials and judges them:

    trials = make_trials()      # deterministic: the world's paths stay "{W}/..."
    results = run_in_subprocess(world, trials)
    problems = [p for t, r in zip(trials, results) if (p := verdict(t, r))]
"""
import importlib
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# -----------------------------------------------------------------------------
# the commands: name -> main, parser, and the parse a valid value must pass ("module:attribute")

COMMANDS = {
    "train_mlm": ("tinytlm.pretrain:main", "tests.fuzz_inputs:mlm_parser", "tinytlm.pretrain:parse"),
    "train_cls": ("tinytlm.finetune:main", "tests.fuzz_inputs:cls_parser", "tinytlm.finetune:parse"),
    "ensemble": ("tinytlm.ensemble:main", "tinytlm.ensemble:parser", None),
    "data_prep/wikipedia": ("tinytlm.wikipedia:main", "tinytlm.wikipedia:parser", None),
    "data_prep/tasks": ("tinytlm.tasks:main", "tinytlm.tasks:parser", None),
    "tokstats": ("tinytlm.tokstats:main", "tinytlm.tokstats:parser", None),
    "paper": ("tinytlm.paper:main", "tinytlm.paper:parser", None),
    "demo": ("tinytlm.demo:main", "tinytlm.demo:parser", None),
    "export": ("tinytlm.export:main", "tinytlm.export:parser", None),
    "report": ("tinytlm.report:main", "tinytlm.report:parser", None),
    "download": ("tinytlm.download:main", "tinytlm.download:parser", None),
    "analyze": ("tinytlm.analyze:main", "tinytlm.analyze:parser", "tests.fuzz_inputs:analyze_check"),
}

SMALL = ["--model", "tiny", "--arch", "n_layer=1,n_head=1,head_dim=32", "--device", "cpu"]
ROOTS = ["--raw", "{W}/raw", "--data", "{W}/data"]
TASK = ["--task", "agnews", "--train-per-label", "4", "--test-per-label", "2"]

# a valid, short command line per command: each trial changes one option of it
BASE = {
    "train_mlm": [*SMALL, "--ws", "16", "--epochs", "1", "--batch_size", "8", *ROOTS, "--out", "{W}/out/run"],
    "train_cls": [*TASK, *SMALL, "--epochs", "1", "--batch_size", "8", "--quiet", *ROOTS, "--out", "{W}/out/run"],
    "ensemble": ["{W}/runs/cls", "--latency-samples", "1", "--device", "cpu", *ROOTS],
    "data_prep/wikipedia": ["--raw", "{W}/raw", "--out", "{W}/out/data", "--rows", "16", "--workers", "1"],
    "data_prep/tasks": [*TASK, "--raw", "{W}/raw", "--out", "{W}/out/data"],
    "tokstats": [*TASK, "--ws", "16", *ROOTS],
    "paper": ["table1", "--scale", "mini", "--plan", "--cache", "{W}/out/cache", "--results", "{W}/out/results",
              "--device", "cpu", *ROOTS],
    "demo": ["--ws", "16", "--pretrain-epochs", "1", "--train-per-label", "4", "--test-per-label", "2",
             "--finetune-epochs", "1", "--out", "{W}/out/demo"],
    "export": ["{W}/runs/mlm", "{W}/out/export"],
    "report": ["{W}/runs/cls", "--out", "{W}/out/report"],
    "download": ["vocab", "--to", "{W}/out/dl", "--mirror", "http://127.0.0.1:9", "--quiet"],  # never the internet
    "analyze": ["{W}/runs/mlm", "--out", "{W}/out/analysis", "--what", "apt", "--device", "cpu", *TASK],
}

BASE_FAILS = {"download"}  # commands whose base line itself fails (a closed port): errors may name any input

# the environment variables the package reads: name -> (kind, the command that reads it)
ENV = {
    "TINYTLM_HOME": ("dir", "paper"),
    "TINYTLM_DATA": ("dir", "tokstats"),
    "TINYTLM_RAW": ("dir", "tokstats"),
    "TINYTLM_MIRROR": ("url", "download"),
    "TINYTLM_NO_DOWNLOAD": ("flag", "tokstats"),
    "TINYTLM_INTERRUPT_AT": ("step", "train_mlm"),
}
ENV_BASE = {  # the command lines the variables are tried with: without the flags that would override them
    "paper": ["table1", "--scale", "mini", "--plan", "--device", "cpu"],
    "tokstats": [*TASK, "--ws", "16"],
    "download": ["vocab", "--to", "{W}/out/dl", "--quiet"],
    "train_mlm": BASE["train_mlm"],
}


def resolve(spec: str):
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def mlm_parser():
    from tinytlm import pretrain
    from tinytlm.config import run_parser
    return run_parser(pretrain.MLMConfig, pretrain.__doc__, "training")


def cls_parser():
    from tinytlm import finetune
    from tinytlm.config import run_parser
    return run_parser(finetune.ClsConfig, finetune.__doc__, "fine-tuning")


def analyze_check(argv):
    from tinytlm import analyze
    analyze.check_args(analyze.parser().parse_args(argv))


# -----------------------------------------------------------------------------
# values: every wrong kind that fits an option's type, and the verdict its table gives

NUMBERS = ["0", "-1", "nan", "inf", "-inf", "1e400", "99999999999999999999", "x", "", "1.5"]
PATHS = {  # kind -> [(value, expect)]
    "file": [("{W}/files/missing", "bad"), ("{W}/files/folder", "bad"), ("{W}/files/empty", "bad"),
             ("{W}/files/text/x", "bad"), ("{W}/files/damaged/ckpt.pt", "bad"), ("{W}/runs/cls", "any"),
             ("{W}/runs/stack", "any"), ("{W}/runs/gap", "any"), ("{W}/runs/mlm", "any")],
    "dir": [("{W}/files/missing", "any"), ("{W}/files/text", "bad"), ("{W}/files/text/x", "bad"),
            ("{W}/files/folder", "any")],
    "out": [("{W}/files/text", "bad"), ("{W}/files/text/x", "bad"), ("{UNWRITABLE}", "bad"), ("{W}/runs/mlm", "any"),
            ("{W}/runs/cls", "any"), ("{W}/runs/stack", "any"), ("{W}/runs/gap", "any")],
    "run": [("{W}/files/missing", "bad"), ("{W}/files/text", "bad"), ("{W}/files/empty", "bad"),
            ("{W}/files/folder", "bad"), ("{W}/files/text/x", "bad"), ("{W}/files/damaged", "bad"),
            ("{W}/files/damaged/ckpt.pt", "bad"), ("{W}/runs/mlm", "any"), ("{W}/runs/cls", "any"),
            ("{W}/runs/stack", "any"), ("{W}/runs/gap", "any")],
    "outfile": [("{W}/files/folder", "bad"), ("{W}/files/text/x", "bad"), ("{UNWRITABLE}", "bad"),
                ("{W}/files/text", "any")],
    "url": [("example.com/files", "bad"), ("gopher://127.0.0.1/x", "bad"), ("http://127.0.0.1:9", "bad")],
    "list": [("", "any"), (",", "any"), ("0,0", "any"), ("x,y", "bad"), ("1,,2", "any"), ("99999", "any"),
             ("-1", "any")],
    "arch": [("", "any"), ("n_layer", "bad"), ("bogus=1", "bad"), ("n_layer=x", "bad"), ("n_layer=0", "bad"),
             ("n_layer=-1", "bad"), ("dropout=nan", "bad"), ("n_head=3", "any"), ("conv_kernel=0x0", "bad")],
    "step": [("x", "bad"), ("-1", "bad"), ("1.5", "bad"), ("0", "good")],
    "flag": [("maybe", "any"), ("0", "any")],
}
LISTS = {"seeds", "labels", "what"}  # comma-separated options (their kind, when the table has none)


def constraint(action) -> dict:
    return dict(getattr(action, "constraint", None) or {})


def converter(action):
    """The option's conversion of its text, before any constraint (Checked wraps one)."""
    t = action.type
    return getattr(t, "convert", t) or str


def kind_of(action) -> str:
    meta, name = constraint(action), action.dest
    if meta.get("kind"):
        return meta["kind"]
    if name in LISTS:
        return "list"
    conv = converter(action)
    if action.nargs == 0:
        return "switch"  # store_true
    if getattr(conv, "__name__", "") == "_parse_bool":
        return "bool"
    if getattr(conv, "__name__", "") == "_parse_tuple":
        return "tuple"
    if conv in (int, float):
        return "number"
    if meta.get("choices") or meta.get("pattern") or action.choices:
        return "choice"
    return "text"


def number_values(action) -> list:
    from tinytlm.common import violation
    meta, conv, out = constraint(action), converter(action), []
    declared = any(meta.get(k) is not None for k in ("low", "above", "choices")) or conv is float
    for text in NUMBERS:
        try:
            v = conv(text)
        except ValueError:
            out.append((text, "bad"))
            continue
        why = violation(meta, v)
        out.append((text, "bad" if why else "good" if declared else "any"))
    return out


def choice_values(action) -> list:
    from tinytlm.common import violation
    meta = constraint(action)
    if action.choices and not meta.get("choices"):
        meta["choices"] = tuple(action.choices)
    out = [(text, "bad" if violation(meta, text) else "good") for text in ("bogus", "", "CPU", "cuda:x")]
    valid = (meta.get("choices") or ("cpu",))[0]
    return out + [(str(valid), "good")]


def values(action) -> list:
    """[(text, expect)] for one option."""
    kind = kind_of(action)
    if kind == "number":
        return number_values(action)
    if kind == "choice":
        return choice_values(action)
    if kind == "bool":
        return [("maybe", "bad"), ("2", "bad"), ("true", "good"), ("0", "good")]
    if kind == "tuple":
        return [("x", "bad"), ("", "bad"), ("1,2", "any")]
    if kind == "switch":
        return [(None, "good")]
    if kind in PATHS:
        return PATHS[kind]
    return [("bogus", "any"), ("", "any")]


# -----------------------------------------------------------------------------
# trials

def trial(command, argv, expect, option, env=None) -> dict:
    return {"command": command, "argv": argv, "expect": expect, "option": option, "env": env or {}}


def with_option(base: list, ap, action, text) -> list:
    """base with the option set to text (replacing its value there); a positional: the base's k-th word (the
    base lines start with their positionals)."""
    argv = list(base)
    if not action.option_strings:
        k = [a for a in ap._actions if not a.option_strings].index(action)
        return argv[:k] + [text] + argv[k + 1:]
    flag, names = action.option_strings[0], set(action.option_strings)
    if action.nargs == 0:  # a switch: given, and the switches it excludes left out
        rivals = {o for g in ap._mutually_exclusive_groups if action in g._group_actions
                  for a in g._group_actions if a is not action for o in a.option_strings}
        return [a for a in argv if a not in rivals] + ([] if flag in argv else [flag])
    for i, a in enumerate(argv):
        if a in names and action.nargs == "?":  # `--quiet` given bare: its value goes after it
            return argv[:i] + [flag, text] + argv[i + 1:]
        if a in names and i + 1 < len(argv):
            return argv[:i] + [flag, text] + argv[i + 2:]
    return argv + [flag, text]


def pairs(command, ap) -> list:
    """The exclusive pairs: argparse's mutually exclusive groups, and the options whose help says 'excludes --x'."""
    out = []
    for g in ap._mutually_exclusive_groups:
        acts = g._group_actions
        out += [[a.option_strings[0] for a in acts[:2]]]
    for a in ap._actions:
        m = re.search(r"excludes (--\w+)", a.help or "")
        if m:
            out.append([a.option_strings[0], m.group(1)])
    return out


def pair_value(ap, flag):
    act = next(a for a in ap._actions if flag in a.option_strings)
    if act.nargs == 0:
        return [flag]
    return [flag, "0,1" if act.dest == "seeds" else "1"]


def command_trials(command, ap) -> list:
    base, out = BASE[command], []
    for action in ap._actions:
        if action.dest == "help":
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        for text, expect in values(action):
            if text == "{UNWRITABLE}" and "--plan" in base:  # a run that writes nothing may name any folder
                expect = "any"
            out.append(trial(command, with_option(base, ap, action, text), expect, name))
    for a, b in pairs(command, ap):
        out.append(trial(command, [*base, *pair_value(ap, a), *pair_value(ap, b)], "bad", f"{a}+{b}"))
    return out


def env_trials() -> list:
    out = []
    for var, (kind, command) in ENV.items():
        for text, expect in PATHS[kind]:
            out.append(trial(command, ENV_BASE[command], expect, var, {var: text}))
    return out


def make_trials(commands=COMMANDS) -> list:
    """Every trial of every command, in a fixed order (no randomness here: sample() draws from it)."""
    out = []
    for command, (_, parser, _) in commands.items():
        out += command_trials(command, resolve(parser)())
    return out + (env_trials() if commands is COMMANDS else [])


def sample(trials: list, per_command: int, seed: int = 0) -> list:
    """A seeded sample: per command, `per_command` trials, the expected-bad ones first."""
    rng, out = random.Random(seed), []
    for command in dict.fromkeys(t["command"] for t in trials):
        mine = [t for t in trials if t["command"] == command and t["expect"] != "good"]
        out += rng.sample(mine, min(per_command, len(mine)))
    return out
