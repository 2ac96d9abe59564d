"""Helpers every script shares: one-line user errors, flag constraints, atomic writes, paths, hashes, run headers."""
import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1]  # the checkout, or site-packages once installed


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


class ArgParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad type) are one-line UserErrors with exit code 2."""

    def error(self, message):
        raise UserError(message)


def violation(meta: dict, v) -> str:
    """What is wrong with value v under a flag's constraints ("" when nothing is). meta: choices (the values
    allowed), pattern (a regular expression a string must match whole), low (smallest allowed, inclusive),
    above (a bound it must exceed), also (other values allowed besides, a sentinel such as -1); floats must
    be finite. The one rule set: run configs (tinytlm.config) and every other command's flags use it."""
    if v in meta.get("also", ()):
        return ""
    if meta.get("kind") in ("dir", "out", "outfile") and str(v):
        return path_problem(Path(v), meta["kind"])
    if meta.get("choices") and v not in meta["choices"]:
        return f"choose {', '.join(map(str, meta['choices']))}"
    if meta.get("pattern") and not re.fullmatch(meta["pattern"], v):
        return f"expected {meta['help'].split(';')[0]}"
    if isinstance(v, float) and not math.isfinite(v):
        return "must be finite"
    if meta.get("above") is not None and not v > meta["above"]:
        return "must be positive and finite" if meta["above"] == 0 else f"must be > {meta['above']}"
    if meta.get("low") is not None and v < meta["low"]:
        return f"must be >= {meta['low']}" + (f" (or {', '.join(map(str, meta['also']))})" if meta.get("also") else "")
    return ""


def path_problem(p: Path, kind: str) -> str:
    """A folder (kind dir | out) or an output file (outfile) that cannot be one: a file for a folder or the
    reverse, or a path through a file. Whether it exists is the command's to say (a root may be created)."""
    if kind in ("dir", "out") and p.exists() and not p.is_dir():
        return "not a folder"
    if kind == "outfile" and p.is_dir():
        return "a folder, not a file"
    if not p.exists() and any(q.is_file() for q in p.parents):
        return "a path through a file"
    return ""


class Checked:
    """An argparse `type` that converts a value and checks it against its flag's constraints (`violation`):
    a wrong value is a one-line UserError naming the flag (as tinytlm.config.validate words it), raised
    where the value enters."""

    def __init__(self, convert, meta: dict, flag: str):
        self.convert, self.meta, self.flag = convert, meta, flag
        self.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its own errors

    def __call__(self, text):
        try:
            v = self.convert(text)
        except ValueError:
            raise UserError(f"{self.flag} {text!r}: expected {self.__name__}")
        why = violation(self.meta, v)
        if why and not self.flag.startswith("-"):  # a positional: "unknown table 'table42'; choose ..."
            form = self.meta.get("unknown", "unknown {flag} {v!r}; {why}")
            raise UserError(form.format(flag=self.flag, v=v, why=why))
        if why:
            raise UserError(f"{self.flag} {v!r}: {why}" if isinstance(v, str) else f"{self.flag} {v}: {why}")
        return v


def add_option(ap, *names, type=str, help: str = "", kind=None, **constraints):
    """ap.add_argument with the flag's constraints declared beside it (see `violation`; kind: what a string
    names, "file" | "dir" | "out" | "run" for a path, "url", "list"; unknown: a positional's error for a
    value not in its choices, a format of flag, v and why): argparse checks them as it reads the value, and
    a bad-input fuzzer reads the same table from the action's `constraint`. Other keywords go to
    add_argument."""
    keys = ("choices", "pattern", "low", "above", "also", "unknown")
    meta = {"help": help, "kind": kind, **{k: constraints.pop(k) for k in keys if k in constraints}}
    meta["also"] = tuple(meta.get("also", ()))
    checked = type is float or kind or any(meta.get(k) not in (None, ()) for k in keys)  # floats: finite
    if "action" not in constraints:  # store_true and the like take no type
        flag = names[0] if names[0].startswith("-") else constraints.get("metavar", names[0]).lower()
        constraints["type"] = Checked(type, meta, flag) if checked else type
    action = ap.add_argument(*names, help=help, **constraints)
    action.constraint = meta
    return action


class Interrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM; the message says what was saved and how to go on.
    Library code raises it (never sys.exit); cli() prints it and exits with 130."""


def cli(main):
    """Run main(argv) as a command: UserError, a full disk or an unwritable folder -> 'error: ...' (one line) on
    stderr and exit 2; Ctrl-C -> exit 130."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # a full disk, an unwritable folder: every write is atomic, so nothing partial is left
        if e.errno not in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM):
            raise
        print(f"error: {e.filename or 'writing'}: {e.strerror or e}; the files written before are intact",
              file=sys.stderr)
        sys.exit(2)


def env_folder(name: str):
    """The folder an environment variable names (None when unset or empty), checked where it enters: a file,
    or a path through one, is a one-line error naming the variable."""
    v = os.environ.get(name)
    if not v:
        return None
    why = path_problem(Path(v), "dir")
    if why:
        raise UserError(f"{name}={v}: {why}")
    return Path(v)


def home() -> Path:
    """Where data, runs and results go by default: $TINYTLM_HOME, else the current directory (the
    repository root, run as the README does); never the installed package's folder."""
    return env_folder("TINYTLM_HOME") or Path(".")


def default_raw_root() -> Path:
    """Raw data root: $TINYTLM_RAW, else ../shared/data beside the home folder when it exists, else
    download_root() (where tinytlm.download puts the files, and the commands fetch what they need)."""
    env = env_folder("TINYTLM_RAW")
    if env:
        return env
    shared = home() / ".." / "shared" / "data"
    return shared if shared.is_dir() else download_root()


def download_root() -> Path:
    """Where downloaded raw data goes when there is no other: data/raw in the home folder."""
    return home() / "data" / "raw"


def default_data_root() -> Path:
    """Prepared shards: $TINYTLM_DATA, else data/ in the home folder."""
    return env_folder("TINYTLM_DATA") or home() / "data"


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds.

    A crash or Ctrl-C inside the block removes the temp file, so `path` is either the
    old complete file or the new complete file, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:  # name the file being written, not its temp file
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temp folder beside `path`; it replaces `path` only if the block succeeds."""
    import shutil
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f".{path.name}.{os.getpid()}.old")
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists():  # put the previous complete folder back
                os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_npy(path, arr):
    import numpy as np
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def read_json(path, what="file"):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON {what} ({e.__class__.__name__})")


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def config_hash(obj, digits: int = 8) -> str:
    """Hex digits naming a configuration (sha256 of its sorted JSON): 8 in run folder names, 12 in
    the paper runner's cell keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:digits]


def git_revision() -> str:
    """The checkout's short revision, "-dirty" with uncommitted changes to tracked files; installed,
    that of the repository around the current directory. Without git (the GPU machine gets the work
    tree only): the revision bench/gpu_session.sh recorded at prep in $TINYTLM_DATA/REVISION, marked
    as such; else "unknown"."""
    where = SOURCE if (SOURCE / ".git").exists() else Path.cwd()
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = dirty = ""
    if rev:
        return rev + ("-dirty" if dirty else "")
    recorded = default_data_root() / "REVISION"
    return f"{recorded.read_text().strip()} (recorded at prep)" if recorded.is_file() else "unknown"
