"""The bad-input fuzzer's runner (issue 23): the world its trials point at, running them as the scripts run,
and the contract each outcome must keep. The trials come from tests/fuzz_inputs.py.

Trials run in a subprocess (`python -m tests.fuzz_runner TRIALS.json RESULTS.json`) that calls each command's
main(argv) through tinytlm.common.cli, as its script does, capturing stdout and stderr; every file of the
world (runs, data, files) is hashed before and after a trial.
"""
import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

from tests.fuzz_inputs import BASE_FAILS, COMMANDS, ENV, ROOT, resolve


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
    p = subprocess.run([sys.executable, "-m", "tests.fuzz_runner", str(todo), str(done)], cwd=ROOT,
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
    # a value nothing declares wrong, or a command whose base line fails too (download: no internet in tests, so
    # its mirror is a closed port): the error may be about another input of the line
    if t["expect"] == "any" or t["command"] in BASE_FAILS:
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
