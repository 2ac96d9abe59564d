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

Trials run in a subprocess (`python -m tests.fuzz_inputs TRIALS.json RESULTS.json`) that calls each command's
main(argv) through tinytlm.common.cli, as its script does, capturing stdout and stderr; every file of the
world (runs, data, files) is hashed before and after a trial.

    trials = make_trials(all_commands())      # deterministic: the world's paths stay "{W}/..."
    results = run_in_subprocess(world, trials)
    problems = [p for t, r in zip(trials, results) if (p := verdict(t, r))]
"""
import contextlib
import hashlib
import importlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import traceback
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


# -----------------------------------------------------------------------------
# the world the trials point at, and running them

def unwritable(world: Path) -> str:
    """A folder nothing may be written under: a read-only folder, or, as root (who may write anywhere), /sys."""
    if os.geteuid() == 0:
        return "/sys/tinytlm-fuzz/out"
    ro = world / "files" / "readonly"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o500)
    return str(ro / "out")


def make_files(world: Path):
    """The wrong things a path may name: a text file, an empty file, an empty folder, a damaged checkpoint."""
    files = world / "files"
    (files / "folder").mkdir(parents=True, exist_ok=True)
    (files / "text").write_text("not what a command wants\n")
    (files / "empty").write_bytes(b"")
    (files / "damaged").mkdir(exist_ok=True)
    (files / "damaged" / "ckpt.pt").write_bytes(b"PK\x03\x04 a checkpoint cut short")
    for d in ("out", "cwd", "home"):
        (world / d).mkdir(exist_ok=True)


def fill(value, world: Path):
    if isinstance(value, list):
        return [fill(v, world) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, world) for k, v in value.items()}
    if value is None:
        return None
    return value.replace("{W}", str(world)).replace("{UNWRITABLE}", unwritable(world))


def snapshot(world: Path) -> dict:
    """Every file of the world (shared data linked in left out): its hash; large files by their size, time and
    first and last MiB."""
    out = {}
    for p in sorted(world.rglob("*")):
        if p.is_symlink() or any(q.is_symlink() for q in p.relative_to(world).parents if str(q) != "."):
            continue
        if p.is_file():
            st = p.stat()
            if st.st_size <= 4 << 20:
                out[str(p)] = hashlib.sha1(p.read_bytes()).hexdigest()
            else:
                with open(p, "rb") as f:
                    head = f.read(1 << 20)
                    f.seek(-(1 << 20), 2)
                    out[str(p)] = f"{st.st_size}:{st.st_mtime_ns}:{hashlib.sha1(head + f.read()).hexdigest()}"
    return out


class TrialTimeout(BaseException):
    """A trial ran past its time (BaseException: code that catches Exception does not swallow it)."""


def _alarm(signum, frame):
    raise TrialTimeout()


def run_one(t: dict, world: Path, limit: int) -> dict:
    """One trial in this process, as its script runs it (tinytlm.common.cli), or, for an expected-good value,
    the command's own parse. -> code, stdout, stderr, changed files, new files."""
    from tinytlm.common import cli
    main, parser, check = COMMANDS.get(t["command"]) or t["spec"]
    argv, env = fill(t["argv"], world), fill(t["env"], world)
    saved = dict(os.environ)
    os.environ.update(env)
    before = snapshot(world)
    out, err, code = io.StringIO(), io.StringIO(), 0
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if t["expect"] == "good":
                    resolve(check)(argv) if check else resolve(parser)().parse_args(argv)
                else:
                    sys.argv = [t["command"], *argv]
                    cli(lambda: resolve(main)(argv))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except TrialTimeout:
                code = "timeout"
            except BaseException as e:  # what escapes cli: a traceback, as the script would print it
                code = 1
                if t["expect"] == "good" and type(e).__name__ == "UserError":
                    code = 2
                    print(f"error: {e}", file=sys.stderr)
                else:
                    traceback.print_exc()
    finally:
        signal.alarm(0)
        os.environ.clear()
        os.environ.update(saved)
    after = snapshot(world)
    return {"code": code, "stdout": out.getvalue()[-2000:], "stderr": err.getvalue()[-4000:],
            "changed": sorted(k for k in before if before[k] != after.get(k)),
            "new": sorted(k for k in after if k not in before), "argv": argv, "env": env}


def run_all(trials: list, world: Path, limit: int = 30) -> list:
    """Every trial in this process, one after another, in the world's cwd and environment."""
    os.chdir(world / "cwd")
    os.environ.update({"TINYTLM_RAW": str(world / "raw"), "TINYTLM_DATA": str(world / "data"),
                       "TINYTLM_HOME": str(world / "home"), "TINYTLM_NO_DOWNLOAD": "1"})
    os.environ.pop("TINYTLM_INTERRUPT_AT", None)
    os.environ.pop("TINYTLM_MIRROR", None)
    return [run_one(t, world, limit) for t in trials]


def run_in_subprocess(world: Path, trials: list, limit: int = 30, timeout: int = 3600) -> list:
    """run_all in a fresh interpreter (its environment, cwd and imports are its own)."""
    todo, done = world.parent / f"{world.name}-trials.json", world.parent / f"{world.name}-results.json"
    todo.write_text(json.dumps({"world": str(world), "limit": limit, "trials": trials}))
    p = subprocess.run([sys.executable, "-m", "tests.fuzz_inputs", str(todo), str(done)], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"the fuzzer's runner failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(done.read_text())


# -----------------------------------------------------------------------------
# the contract

def names_it(line: str, t: dict, r: dict) -> bool:
    """Whether the error line names the option (any spelling), the variable or a file the trial gave."""
    opt = t["option"]
    words = [w for o in opt.split("+") for w in (o, o.replace("_", "-"), o.replace("-", "_").lstrip("_"))]
    given = [Path(v) for v in [*r["argv"], *r["env"].values()] if "/" in str(v)]
    words += [str(q) for p in given for q in [p, *p.parents] if len(q.parts) > 2]  # a file named, or its folder
    if not opt.startswith("-") and opt not in ENV:  # a positional: its value, quoted
        words += [repr(v) for v in r["argv"]]
    if t["expect"] == "any":  # a value nothing declares wrong: the error may be about another input of the line
        words += [v for v in r["argv"] if v.startswith("--") or "/" in v] + list(r["env"])
    return any(w and w in line for w in words)


def verdict(t: dict, r: dict) -> str:
    """What is wrong with a trial's outcome ("" when it keeps the contract)."""
    code, lines = r["code"], r["stderr"].strip().splitlines()
    if code == "timeout":
        return "not refused where it enters (still running at the time limit)" if t["expect"] == "bad" else ""
    if "Traceback (most recent call last)" in r["stderr"] or code not in (0, 2):
        return f"exit {code} with a traceback: {lines[-1] if lines else ''}"
    if t["expect"] == "good":
        return f"a valid value refused: {lines[0] if lines else ''}" if code else ""
    if code == 0:
        return "a wrong value accepted (exit 0)" if t["expect"] == "bad" else ""
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"{len(lines)} stderr lines, not one 'error: ...' line: {r['stderr'][-300:]!r}"
    if not names_it(lines[0], t, r):
        return f"the error does not name {t['option']}: {lines[0]}"
    if r["changed"] or r["new"]:
        return f"files written or changed on a refusal: {(r['changed'] + r['new'])[:3]}"
    return ""


def report(trials: list, results: list) -> tuple:
    """(per command: trials run, the failures as lines) and prints both."""
    counts, failures = {}, []
    for t, r in zip(trials, results):
        counts[t["command"]] = counts.get(t["command"], 0) + 1
        why = verdict(t, r)
        if why:
            shown = " ".join(r["argv"])[-160:]
            env = " ".join(f"{k}={v}" for k, v in r["env"].items())
            failures.append(f"{t['command']} {t['option']} [{t['expect']}] {env} {shown}\n    -> {why}")
    print("trials per command: " + ", ".join(f"{c} {n}" for c, n in counts.items()) + f"; {len(trials)} in all")
    for f in failures:
        print("FAIL " + f)
    return counts, failures


if __name__ == "__main__":
    todo, done = map(Path, sys.argv[1:3])  # before a trial sets sys.argv
    job = json.loads(todo.read_text())
    done.write_text(json.dumps(run_all(job["trials"], Path(job["world"]), job["limit"])))
