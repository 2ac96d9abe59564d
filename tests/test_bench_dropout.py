"""bench/dropout.py --quick (shrunk sizes) runs and writes its report: the command, the load, both sections with a
ratio in every row. Speeds are not asserted (bench/, never timed tests); a bad --clock is one line, exit 2."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, "bench/dropout.py", *args], cwd=REPO, env={**os.environ, "PYTHONPATH": "."},
                          capture_output=True, text=True, timeout=300)


def test_quick_writes_both_sections(tmp_path):
    out = tmp_path / "dropout.md"
    r = _run("--quick", "--threads", "1", "--clock", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    md = out.read_text()
    assert "PYTHONPATH=. python bench/dropout.py --quick" in md and "load average" in md
    assert "## The dropout alone" in md and "## One training step" in md
    rows = [line for line in md.splitlines() if line.startswith("| float") or line.startswith("| bfloat")
            or line.startswith("| tiny")]
    assert len(rows) == 4 + 2 and all(line.count("x |") >= 2 for line in rows), rows


def test_bad_clock_is_one_line():
    r = _run("--quick", "--clock", "sundial")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--clock" in r.stderr
