"""File what a GPU session brought back: cell records, benchmark reports, rebuilt table reports.

    PYTHONPATH=. python bench/gpu_import.py /work/.device/.../gpu_session.tgz

- cell records (results/cells/<scale>/*.json in the tarball) go to results/cells/<scale>/; a record
  already there is never overwritten (a different one is reported and kept as committed);
- the benchmark reports go to bench/results/<date>-<device>-<what>.md (probe, train, members) plus one
  <date>-<device>-gpu-session.md: stages and their times, the kernel checks (AOT compile check, a verdict per
  path), the chosen path per model,
  and every scheduled cell with its estimate and actual time; date and device are the session's;
- the reports of the tables the session worked on are rebuilt from all records
  (python -m tinytlm.paper TABLE --scale SCALE --report).
Every output is a function of the tarball and the records, so importing the same tarball twice
changes nothing the second time.
"""
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from bench.common import device_slug
from tinytlm.common import ArgParser, UserError, cli, read_json

REPO = Path(__file__).resolve().parents[1]


def place(src: Path, folder: Path, stem: str, suffix: str = ".md") -> str:
    """Copy src to folder/stem.md unless an identical copy is there; a different file of that name
    (another session the same day) pushes this one to stem-2.md, -3, ... Returns what happened."""
    data = src.read_bytes()
    for i in range(1, 100):
        dest = folder / (f"{stem}{suffix}" if i == 1 else f"{stem}-{i}{suffix}")
        if not dest.exists():
            folder.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            return f"wrote {dest.relative_to(folder.parents[1])}"
        if dest.read_bytes() == data:
            return f"unchanged {dest.relative_to(folder.parents[1])}"
    raise UserError(f"{folder}: 99 reports named {stem}: clean up first")


def jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def kernel_lines(k: dict, smoke: bool) -> list:
    """The kernel stage (bench/gpu_kernels.py's report): the AOT compile check, then one verdict per path."""
    how = "under the Triton interpreter" if smoke else "natively"
    lines = ["", f"## Kernel checks ({how})", ""]
    aot = k.get("aot") or {}
    if aot.get("summary"):
        s = aot["summary"]
        lines += [f"AOT compile check (bench/aot.py, this machine's versions): exit {aot['rc']} in {aot['seconds']} s, "
                  f"{s['specialisations']} specialisations ({s.get('cache_hits', 0)} from the carried or an earlier "
                  f"cache), {len(aot.get('failures') or [])} failures, largest shared memory "
                  + ", ".join(f"{a} {n:,} B" for a, n in s["max_shared"].items()) + ".", ""]
    elif aot:
        lines += [f"AOT compile check: exit {aot.get('rc')} after {aot.get('seconds')} s, no report.", ""]
    lines += ["| path | verdict | passed | failed | not run |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {p} | {r['verdict']} | {r['passed']} | {r['failed']} | {r['not_run']} |"
              for p, r in k.get("paths", {}).items()]
    failed = [f"- {p}: {c['name']}: {c['error']}" for p, r in k.get("paths", {}).items() for c in r["checks"]
              if c["status"] == "failed"]
    return lines + ([""] + failed if failed else [])


def session_md(w: Path, session: dict) -> str:
    """The session summary, from the files in the tarball alone."""
    lines = [f"# GPU session {session['started']} on {session['device']}", "",
             f"- command: `{session['command']}` (GPU_SECONDS {session['gpu_seconds']}, "
             f"{'SMOKE: a CPU check, not a performance number' if session['smoke'] else 'scale ' + session['scale']})",
             f"- git revision: `{session['git']}`", "", "## Stages", "", "| stage | status | exit | seconds |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {s['stage']} | {s['status']} | {s['rc']} | {s['seconds']} |" for s in jsonl(w / "stages.jsonl")]
    if (w / "kernels.json").is_file():
        lines += kernel_lines(read_json(w / "kernels.json"), session["smoke"])
    if (w / "bench" / "throughput.json").is_file():
        best = read_json(w / "bench" / "throughput.json").get("best") or {}
        lines += ["", "## Path chosen per model (fastest that passed its tests)", "",
                  "| model | batch | stack | seq/s | forward seq/s | first step s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {m} | {b.get('B')} | {b.get('stack')} | {b.get('seq_per_s', 0):.0f} | "
                  f"{b.get('infer_seq_per_s') or 0:.0f} | {b.get('first_step_s') or 0:.1f} |" for m, b in best.items()]
    if (w / "bench" / "members.json").is_file():
        goals = read_json(w / "bench" / "members.json").get("goals") or ["- (no goal measured: the run stopped early)"]
        lines += ["", "## Stacked members (bench/members.py)", "", *goals]
    units = jsonl(w / "results" / "schedule.jsonl")
    if units:
        lines += ["", "## Cells scheduled", "", "| table | row | seed | status | estimate s | actual s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {u['table']} | {u['row']} | {u['seed']} | {u['status']} | {u['estimate_s']} | "
                  f"{u.get('actual_s', '')} |" for u in units]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tarball", type=Path, help="gpu_session.tgz as the device tool brought it back")
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout to file into")
    ap.add_argument("--no-reports", action="store_true", help="do not rebuild the table reports")
    args = ap.parse_args(argv)
    if not args.tarball.is_file():
        raise UserError(f"{args.tarball}: not found")
    repo = args.repo
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        try:
            with tarfile.open(args.tarball) as tf:
                tf.extractall(w, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise UserError(f"{args.tarball}: not a readable tarball ({type(e).__name__})")
        if not (w / "session.json").is_file():
            raise UserError(f"{args.tarball}: no session.json: not a gpu_session.sh tarball")
        session = read_json(w / "session.json")
        tag = f"{session['started'][:10]}-{device_slug(session['device'])}"
        log, new, kept = [], {}, []
        for rec in sorted((w / "results" / "cells").glob("*/*.json")):
            dest = repo / "results" / "cells" / rec.parent.name / rec.name
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(rec, dest)
                new.setdefault(rec.parent.name, []).append(rec.name)
            elif dest.read_bytes() != rec.read_bytes():
                kept.append(dest)
        log.append(f"records: {sum(map(len, new.values()))} new" + "".join(f", {len(v)} at scale {k}"
                                                                           for k, v in new.items()))
        log += [f"kept the committed {p.relative_to(repo)} (the tarball's differs)" for p in kept]
        bench = repo / "bench" / "results"
        for what in ("probe", "train", "members"):
            if (w / "bench" / f"{what}.md").is_file():
                log.append(place(w / "bench" / f"{what}.md", bench, f"{tag}-{what}"))
        summary = w / "session.md"
        summary.write_text(session_md(w, session))
        log.append(place(summary, bench, f"{tag}-gpu-session"))
        tables = list(dict.fromkeys(u["table"] for u in jsonl(w / "results" / "schedule.jsonl")
                                    if u["status"] in ("done", "recorded")))
    if tables and not args.no_reports:
        from tinytlm.paper import main as paper
        for t in tables:
            paper([t, "--scale", session["scale"], "--report", "--results", str(repo / "results"),
                   "--cache", str(repo / "runs" / "paper")])
            log.append(f"report results/{session['scale']}/{t}.md rebuilt")
    print("\n".join(log))
    return {"new": new, "kept": [str(p) for p in kept], "tables": tables}


if __name__ == "__main__":
    cli(main)
