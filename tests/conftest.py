import contextlib
import os
from pathlib import Path

import pytest

import torch

# Without a GPU, Triton kernels run through the interpreter; the variable must be set before
# @triton.jit runs. On a GPU they run natively (set TRITON_INTERPRET=1 to force the interpreter).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# No test downloads from the internet (tests/test_download.py serves its files from 127.0.0.1 and
# clears this for itself); a command that would download fails with its one-line "not found" instead.
os.environ.setdefault("TINYTLM_NO_DOWNLOAD", "1")

SHARED = Path(os.environ.get("TINYTLM_RAW", Path(__file__).resolve().parents[2] / "shared" / "data"))
VOCAB = SHARED / "bert-base-uncased-vocab.txt"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long test, left out of CI (run with -m slow)")


def pytest_sessionstart(session):
    """Under CI=true, missing shared data fails the run with one line: the ~70 tests that need it would
    otherwise skip, and a run with a third of the suite skipped would go green."""
    if os.environ.get("CI") == "true" and not SHARED.is_dir():
        pytest.exit(f"shared data not found at {SHARED} (CI=true: the tests that need it would skip); "
                    f"set TINYTLM_RAW to the data folder", returncode=2)


@pytest.fixture
def interrupt(monkeypatch):
    """`with interrupt(n): main(...)`: the run delivers itself a Ctrl-C in the middle of its step n
    (TINYTLM_INTERRUPT_AT, the test hook of tinytlm.train.interrupt_step), and only inside the block."""
    @contextlib.contextmanager
    def at(step: int):
        monkeypatch.setenv("TINYTLM_INTERRUPT_AT", str(step))
        try:
            yield
        finally:
            monkeypatch.delenv("TINYTLM_INTERRUPT_AT")
    return at


@pytest.fixture(scope="session")
def shared():
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def vocab_path(shared):
    return VOCAB


@pytest.fixture(scope="session")
def roots(tmp_path_factory, shared):
    """A raw root with a small Wikipedia (the shared vocab and tasks linked in) and an empty data root."""
    base = tmp_path_factory.mktemp("roots")
    raw = base / "raw"
    (raw / "wikipedia").mkdir(parents=True)
    for name in ("bert-base-uncased-vocab.txt", "ag_news", "dbpedia", "fewrel"):
        (raw / name).symlink_to(shared / name)
    import lzma
    with lzma.open(shared / "wikipedia" / "enwiki_wikiextractor_Vibhas-hs-edu_WikiTasks.jsonl.xz", "rt") as f:
        lines = [next(f) for _ in range(120)]
    (raw / "wikipedia" / "small.jsonl").write_text("".join(lines))
    return raw, base / "data"
