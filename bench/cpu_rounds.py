"""bench/cpu.py's steps section, the parent's side: a tree of the code before issue 21, one worker process per
variant (bench/cpu_worker.py), and timed rounds interleaved across the workers in the order bench/common.py
interleaved_times calls functions (rotations), so a load that comes and goes falls on every variant alike.

    with revision_tree("0cb7440") as (tree, commit), workers({"baseline": (spec, tree), ...}) as ws:
        times = interleaved_rounds(ws, 7)   # {name: [ms of each round]}

A worker's PYTHONPATH is its tree alone (this checkout's root, or the revision's), and the worker reports the
tinytlm it imported: `workers` checks it came from that tree (the editable install of another checkout would
otherwise go unnoticed).
"""
import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bench.common import REPO, rotations
from tinytlm.common import UserError

WORKER = Path(__file__).resolve().with_name("cpu_worker.py")


def resolve_commit(rev: str) -> str:
    """The full hash of git revision `rev` in this checkout's repository; one it does not know (or no git, as on
    a machine given the work tree only): UserError."""
    try:
        p = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=REPO,
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"--baseline_rev {rev!r}: git failed ({e})")
    if p.returncode != 0 or not p.stdout.strip():
        raise UserError(f"--baseline_rev {rev!r}: not a commit of the repository at {REPO}")
    return p.stdout.strip()


@contextlib.contextmanager
def revision_tree(rev: str):
    """(a temporary directory holding tinytlm/ and kernels/ of git revision `rev`, its full hash). `git archive`
    into the directory: nothing is registered in the repository (no worktree to prune after a kill), and the
    directory goes when the block ends, an error's included."""
    commit = resolve_commit(rev)
    tar = subprocess.run(["git", "archive", "--format=tar", commit, "tinytlm", "kernels"], cwd=REPO,
                         capture_output=True, check=True).stdout
    with tempfile.TemporaryDirectory(prefix="tinytlm-rev-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            t.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        yield Path(tmp), commit


class Worker:
    """One bench/cpu_worker.py process: started with its spec and tree; ready() waits for it to build and warm
    up its step (its facts); round() is one timed step (ms, the worker's own clock)."""

    def __init__(self, name: str, spec: dict, tree: Path, cwd: str):
        self.name, self.tree, self.facts = name, Path(tree).resolve(), None
        self.err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty worker never blocks on it
        self.p = subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.err, text=True, cwd=cwd,
                                  env={**os.environ, "PYTHONPATH": str(self.tree)})

    def _line(self) -> str:
        line = self.p.stdout.readline()
        if not line:
            self.p.wait()
            self.err.seek(0)
            raise RuntimeError(f"bench/cpu_worker.py {self.name} ended (exit {self.p.returncode}):\n"
                               + self.err.read()[-3000:])
        return line.strip()

    def ready(self) -> dict:
        """Wait for `ready <facts>`; the facts (also kept as .facts), their tinytlm checked to be the tree's."""
        word, _, facts = self._line().partition(" ")
        if word != "ready":
            raise RuntimeError(f"bench/cpu_worker.py {self.name}: expected `ready ...`, got {word!r}")
        facts = json.loads(facts)
        if not Path(facts["tinytlm"]).resolve().is_relative_to(self.tree):
            raise RuntimeError(f"bench/cpu_worker.py {self.name} imported tinytlm from {facts['tinytlm']}, "
                               f"not from its tree {self.tree}")
        self.facts = facts
        return facts

    def round(self) -> float:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        return float(self._line())

    def close(self) -> None:
        """Ask it to quit; kill it if it does not within 30 s (or was stopped mid-step by an error here)."""
        with contextlib.suppress(OSError):
            self.p.stdin.write("quit\n")
            self.p.stdin.close()
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.err.close()


@contextlib.contextmanager
def workers(specs: dict):
    """{name: (spec, tree)} -> {name: Worker}, every one started at once (they build and warm up side by side,
    untimed) and ready; all closed when the block ends."""
    ws = {}
    with tempfile.TemporaryDirectory(prefix="tinytlm-worker-") as cwd:  # no checkout in the cwd: PYTHONPATH rules
        try:
            for name, (spec, tree) in specs.items():
                ws[name] = Worker(name, spec, tree, cwd)
            for w in ws.values():
                w.ready()
            yield ws
        finally:
            for w in ws.values():
                w.close()


def interleaved_rounds(ws: dict, n: int) -> dict:
    """{name: [ms of each of n rounds]}: a round steps every worker once, one at a time, the order rotating."""
    times = {k: [] for k in ws}
    for names in rotations(list(ws), n):
        for name in names:
            times[name].append(ws[name].round())
    return times
