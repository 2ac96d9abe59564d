"""Run configs and their command lines: one table of flags, their help and their constraints.

Every field of a run config is declared with `option(default, help, ...)` (or `switch(...)`), whose
metadata is read three times: by the command line (`--name value`, help text), by `validate` (the
constraints, checked once, where the config is made: `__post_init__`), and by a bad-input fuzzer that
wants to know what a flag accepts (choices, bounds, path kind). Model fields are not flags: they travel
as one `--arch key=value,...` (`arch_overrides`).

    @dataclass
    class MyConfig(Switches):
        epochs: int = option(50, "passes over the data", low=1)

        def __post_init__(self):
            validate(self)
"""
import argparse
import dataclasses
import sys
from dataclasses import dataclass

from tinytlm.common import ArgParser, UserError, read_json, violation
from tinytlm.kernel_path import Impl, default_attn_blocks, default_dropout, default_head, default_unpad
from tinytlm.model import BertConfig
from tinytlm.precision import PRECISIONS


# -----------------------------------------------------------------------------
# one field: its default, its help and what it accepts

def option(default, help: str, *, choices=None, pattern=None, low=None, above=None, also=(), kind=None, aliases=(),
           switch=False, bare=None):
    """A config field that is a flag. help: one line for --help. choices: the values allowed; low: the
    smallest allowed (inclusive), above: a bound it must exceed; pattern: a regular expression a string must
    match whole; also: other values allowed besides (a
    sentinel such as -1 = "the task's default"); floats must be finite. kind: "file" | "dir" | "out" for
    a path. aliases: other flag names (a deprecated spelling). switch: see `switch`. bare: the value of the
    flag given without one (`--compile` = on; a bool's is True)."""
    meta = {"help": help, "choices": choices, "pattern": pattern, "low": low, "above": above, "also": tuple(also),
            "kind": kind, "aliases": tuple(aliases), "switch": switch, "bare": bare}
    return dataclasses.field(default=default, metadata=meta)


def switch(default, help: str = "", **kw):
    """A field that changes where or how fast a run goes, or what it prints, but not what it computes: it
    may change when a run is resumed, and it is not part of a cell's identity in the paper runner. Every
    other field must stay what the run started with."""
    return option(default, help, switch=True, **kw)


def switches(cls) -> set:
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("switch")}


def problem(f, v) -> str:
    """What is wrong with value v of field f ("" when nothing is): the constraints of its metadata."""
    want = type(f.default)
    if type(v) is not want and not (want is float and type(v) is int):  # (e.g. a config file's 2.5 epochs)
        return f"expected {want.__name__}"
    return violation(f.metadata, v)


def describe(cls) -> list:
    """Every flag of a config class as data, for tools that probe the command line (a bad-input fuzzer):
    name, type, default, help and the constraints validate() applies."""
    return [{"flag": f"--{f.name}", "type": type(f.default).__name__, "default": f.default,
             **{k: v for k, v in f.metadata.items() if v not in (None, (), "")}} for f in dataclasses.fields(cls)]


def validate(cfg):
    """Every field of cfg against its metadata: the first wrong one is a one-line error naming its flag."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        why = problem(f, v)
        if why:
            raise UserError(f"--{f.name} {v!r}: {why}" if isinstance(v, str) else f"--{f.name} {v}: {why}")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE = ("off", "auto", "on") + COMPILE_MODES  # --compile: on = the default mode; auto: train.py's AUTO_COMPILE
UNPAD = ("off", "auto", "on")  # --unpad: auto = tinytlm/kernel_path.py default_unpad(device)


def _on_off(v):
    """A switch's old boolean spelling (true/false, a config file's bool) as on/off; any other value as it is."""
    return {"true": "on", "false": "off"}.get(str(v).lower(), v)


def compile_option(on, mode: str = "default") -> str:
    """--compile's value for the two fields it replaced (compile true/false, compile_mode): old saved
    configs, config files and bench paths."""
    return ("on" if mode == "default" else mode) if on else "off"


def fold_compile(d: dict) -> dict:
    """A config dict saved before --compile took a mode: `compile: true/false` and `compile_mode` -> one value."""
    if not isinstance(d.get("compile"), bool) and "compile_mode" not in d:
        return d
    d = dict(d)
    mode = d.pop("compile_mode", "default")
    if isinstance(d.get("compile"), bool):
        d["compile"] = compile_option(d["compile"], mode)
    return d


REMOVED_FLAGS = {"--compile_mode": "--compile MODE (e.g. --compile reduce-overhead)"}


def refuse_removed(argv):
    """A flag this version no longer has, on a command line: a one-line error with its new spelling."""
    for a in (sys.argv[1:] if argv is None else argv):
        flag = a.split("=")[0].replace("-", "_").replace("__", "--", 1)
        if flag in REMOVED_FLAGS:
            raise UserError(f"{a.split('=')[0]} is gone: use {REMOVED_FLAGS[flag]}")


# -----------------------------------------------------------------------------
# switches every command shares: the device, the speed and the data roots

@dataclass
class Switches:
    """What the training commands and the paper runner share: where a run goes and how fast, never what
    it computes (a run may change them on --resume; they are no part of a paper cell's identity)."""
    device: str = switch("auto", "auto | cpu | cuda | cuda:N", pattern=r"auto|cpu|cuda(:\d+)?")
    compile: str = switch("auto", "torch.compile: off | auto (where it pays, docs/kernels-and-speed.md) | on | a "
                          "mode (reduce-overhead records CUDA graphs); --compile alone = on", choices=COMPILE,
                          bare="on")
    kernels: str = switch("torch", "attention/conv-stem kernels: torch (the reference) or triton",
                          choices=("torch", "triton"))
    unpad: str = switch("auto", "run on the packed real tokens, not the padding (tinytlm/unpad.py): off | on | auto "
                        "(on a CPU, where it measured faster; off elsewhere, not measured there); --unpad alone = on",
                        choices=UNPAD, bare="on")
    precision: str = switch("auto", "bf16 autocast around the forwards, or fp32; auto: bf16 on CUDA and on CPUs with "
                            "native bf16 (tinytlm/precision.py; --resume: the run's own)", choices=PRECISIONS)
    data: str = switch("", "prepared data root (default $TINYTLM_DATA or ./data)", kind="dir")
    raw: str = switch("", "raw data root (default $TINYTLM_RAW, else ../shared/data if it exists, else data/raw)",
                      kind="dir")

    def __post_init__(self):
        # the old boolean spellings (--compile true, "unpad": false in a config file) stay readable
        self.compile, self.unpad = (_on_off(v) for v in (self.compile, self.unpad))
        validate(self)

    def impl(self, device=None) -> Impl:
        """The implementations every forward of the run's model uses, chosen when it is built; on `device`,
        the MLM head, --unpad auto, the dropout and the attention's length blocks as their rules pick
        (tinytlm/kernel_path.py default_head, default_unpad, default_dropout, default_attn_blocks), else the
        references: the plain head, padded, torch's dropout, one (B, T) layout."""
        auto = device is not None and default_unpad(device)
        unpad = self.unpad == "on" or (self.unpad == "auto" and auto)
        if device is None:
            return Impl(self.kernels, unpad)
        return Impl(self.kernels, unpad, head=default_head(device), dropout=default_dropout(device),
                    attn_blocks=default_attn_blocks(device))


@dataclass
class RunSwitches(Switches):
    """The switches of a training run: its folder, what it continues, how often it saves."""
    out: str = switch("", "run directory (default runs/<name>)", kind="out")
    resume: str = switch("", "run directory (or checkpoint) to continue exactly", kind="run")
    save_every: int = switch(1, "epochs between checkpoints (0 = only the final one and at Ctrl-C/SIGTERM)", low=0)


# -----------------------------------------------------------------------------
# config <-> command line

def _parse_tuple(s):
    try:
        return tuple(int(x) for x in str(s).replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")


def _parse_bool(s):
    v = str(s).lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _arg_type(default):
    if isinstance(default, bool):
        return _parse_bool
    if isinstance(default, tuple):
        return _parse_tuple
    return type(default) if default is not None else str


def add_dataclass_args(ap, cls, group_title=None, only=None):
    """One `--name value` flag per dataclass field (also `--name-with-hyphens`), its help from the field's
    metadata; `only`: the names of the fields to add (default all)."""
    g = ap.add_argument_group(group_title or cls.__name__)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        aliases = f.metadata.get("aliases", ())
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else []) + list(aliases)
        bare = True if isinstance(default, bool) else f.metadata.get("bare")
        flag = {"nargs": "?", "const": bare} if bare is not None else {}  # `--quiet` = true, `--compile` = on
        help = f.metadata.get("help", "") + "".join(f" ({a}: a deprecated alias)" for a in aliases)
        action = g.add_argument(*names, dest=f.name, type=_arg_type(default), **flag, default=default,
                                help=f"{help} (default {default!r})" if help else f"(default {default!r})")
        action.constraint = dict(f.metadata)  # the table validate() applies, for a bad-input fuzzer


def dataclass_from_args(cls, args):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def arch_overrides(text: str) -> dict:
    """`--arch n_conv=2,conv_kernel=16x3`: BertConfig fields over the preset, typed as the field is."""
    fields = {f.name: f.default for f in dataclasses.fields(BertConfig)}
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if key not in fields or not eq:
            raise UserError(f"--arch {item!r}: " + (f"unknown key {key!r} (valid: {', '.join(fields)})" if eq else
                                                    "expected key=value, e.g. --arch n_conv=2,conv_kernel=16x3"))
        try:
            out[key] = _arg_type(fields[key])(value)
        except (ValueError, argparse.ArgumentTypeError):
            raise UserError(f"--arch {key}={value}: expected {type(fields[key]).__name__}")
    return out


def given_fields(cls, argv) -> set:
    """The fields the command line names explicitly (`--name`, `--name=value`, a hyphenated or alias
    spelling), whatever their value: on --resume, `--max_steps 0` given is not `--max_steps` left out."""
    names = {}
    for f in dataclasses.fields(cls):
        for n in [f.name, f.name.replace("_", "-"), *(a.lstrip("-") for a in f.metadata.get("aliases", ()))]:
            names["--" + n] = f.name
    return {names[a.split("=")[0]] for a in (sys.argv[1:] if argv is None else argv) if a.split("=")[0] in names}


def run_parser(cls, doc: str, title: str) -> ArgParser:
    """The command line of a training command: its dataclass flags, `--arch` and `--config FILE`."""
    ap = ArgParser(description=doc.split("\n\n")[0])
    config = ap.add_argument("--config", default="", help="JSON file of flag values (command-line flags win)")
    arch = ap.add_argument("--arch", action="append", default=[], help="model fields over the --model preset, e.g. "
                           "n_conv=2,conv_kernel=16x3,dropout=0 (BertConfig in tinytlm/model.py; may be repeated)")
    config.constraint, arch.constraint = {"kind": "file"}, {"kind": "arch"}  # for a bad-input fuzzer
    add_dataclass_args(ap, cls, title)
    return ap


def parse_run_args(cls, doc: str, title: str, argv=None):
    """(script config, model overrides) from the command line: the script's dataclass flags, `--arch`
    and `--config FILE`. Unknown flags and keys, and bad values, are one-line errors."""
    refuse_removed(argv)
    ap = run_parser(cls, doc, title)
    pre, _ = ap.parse_known_args(argv)
    file_arch = {}
    if pre.config:
        values = fold_compile(read_json(pre.config, "config"))
        fields = {f.name: f for f in dataclasses.fields(cls)}
        aliases = {a.lstrip("-"): f.name for f in fields.values() for a in f.metadata.get("aliases", ())}
        values = {aliases.get(k, k): v for k, v in values.items()}
        model = {f.name for f in dataclasses.fields(BertConfig)}
        unknown = sorted(set(values) - set(fields) - model - {"arch"})
        if unknown:
            raise UserError(f"{pre.config}: unknown key {unknown[0]!r}")
        file_arch = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in model}
        ap.set_defaults(**{k: [v] if k == "arch" else v for k, v in values.items() if k not in model})
    args = ap.parse_args(argv)
    given = given_fields(cls, argv)
    if "seeds" in given and "seed" in given:
        raise UserError("--seed and --seeds exclude each other (one run, or one stacked run per seed list)")
    if "seeds" in given and not str(args.seeds).strip():
        raise UserError("--seeds: empty; give comma-separated seeds, e.g. --seeds 0,1,2")
    overrides = {**file_arch, **arch_overrides(",".join(args.arch))}
    cfg = dataclass_from_args(cls, args)
    BertConfig.preset(cfg.model, **overrides)  # a bad model field is an error now, before any work
    return cfg, overrides


def resumed_config(cfg, saved, overrides: dict, given: set = ()):
    """The saved config of a run being resumed, with the switches this command line gives (`given`: named
    on it, see given_fields; a switch that differs from its default counts as given too); a flag that
    would change what is computed is a one-line error."""
    default, allowed = type(cfg)(), switches(type(cfg))
    given = set(given) | {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}
    bad = [f for f in sorted(given) if f not in allowed and getattr(cfg, f) != getattr(saved, f)]
    if bad or overrides:
        raise UserError(f"--resume continues the saved configuration; --{bad[0] if bad else 'arch'} cannot change "
                        f"(only {', '.join('--' + f for f in sorted(allowed - {'resume'}))} can)")
    return dataclasses.replace(saved, **{f: getattr(cfg, f) for f in given if f in allowed})


RENAMED = {"wd": "weight_decay"}  # saved configs from before a rename
DROPPED = {"mask_per_row": 0}  # fields gone since, that a saved config may hold at their neutral value


def from_saved(cls, saved: dict):
    """A config saved by an earlier version (stack.json, a checkpoint's train_config): renamed fields under
    their new name, dropped ones left out (an old run that used one in earnest is refused)."""
    d = {RENAMED.get(k, k): v for k, v in fold_compile(saved).items()}
    for k, neutral in DROPPED.items():
        if d.pop(k, neutral) != neutral:
            raise UserError(f"a saved config uses --{k} {saved[k]}, which this version no longer has")
    return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})
