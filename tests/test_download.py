"""tinytlm.download against a local HTTP server on 127.0.0.1 that plays the Hugging Face hub and GitHub.

The server serves small fixture files under the real URL layout (resolve URLs that redirect to a blob store,
the tree API with its LFS sha256 in two pages, GitHub raw paths) and can cut a transfer off mid-file, ignore a
Range header, or publish a wrong checksum. Nothing here reaches the internet.
"""
import hashlib
import io
import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tinytlm import download
from tinytlm.common import UserError
from tinytlm.download import GITHUB, HF, Remote

REPO = Path(__file__).resolve().parents[1]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        hub = self.server
        path, _, query = self.path.partition("?")
        rng = self.headers.get("Range")
        hub.log.append((path, rng))
        if path in hub.trees:  # the tree API, in two pages linked by a Link header
            entries = hub.trees[path]
            half = (len(entries) + 1) // 2
            if query == "cursor=2":
                return self._send(200, json.dumps(entries[half:]).encode())
            link = f'<{hub.url}{path}?cursor=2>; rel="next"'
            return self._send(200, json.dumps(entries[:half]).encode(), [("Link", link)])
        if path in hub.redirect:  # the hub's resolve URL sends LFS files on to its file store
            return self._send(302, headers=[("Location", hub.redirect[path])])
        if path not in hub.files:
            return self._send(404)
        data, start = hub.files[path], 0
        if rng and path not in hub.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                return self._send(416)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if path in hub.cut and start == 0:  # the connection drops halfway (HTTP/1.0: it closes after this)
            hub.cut.discard(path)
            body = body[:len(body) // 2]
        self.wfile.write(body)


class Hub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.reset()

    def reset(self):
        self.files, self.trees, self.redirect, self.log = {}, {}, {}, []
        self.cut, self.ignore_range = set(), set()

    def publish(self, remote: Remote, data: bytes, sha256=None):
        """Serve `data` as `remote`; an HF file also in its folder's tree listing, as LFS (sha256 given or its own)."""
        path = remote.url(self.url)[len(self.url):]
        if remote.host == HF:
            blob = f"/blobs/{hashlib.sha256(data).hexdigest()}"
            self.files[blob], self.redirect[path] = data, blob
            tree = remote.tree_url(self.url)[len(self.url):]
            oid = sha256 or hashlib.sha256(data).hexdigest()
            self.trees.setdefault(tree, []).append({"type": "file", "path": remote.path, "size": len(data),
                                                    "oid": "0" * 40, "lfs": {"oid": oid, "size": len(data)}})
            return blob
        self.files[path] = data
        return path


@pytest.fixture(scope="module")
def server():
    hub = Hub()
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    yield hub
    hub.shutdown()


@pytest.fixture
def hub(server):
    server.reset()
    return server


def hf(path, repo="datasets/test/set"):
    return Remote(HF, repo, "c0ffee", path, f"set/{path.rpartition('/')[2]}")


PAYLOAD = bytes(range(256)) * 40 + b"the end"  # 10,247 bytes


# --- one file: resumption, redirects, listings, checksums ---------------------------------------------------

def test_fetch_follows_the_hub_and_resumes_a_cut_transfer(hub, tmp_path):
    others = [hf(f"data/other-{i}.parquet") for i in range(3)]
    for r in others:
        hub.publish(r, b"x")
    r = hf("data/train-00003.parquet")  # listed on the second page of its folder
    blob = hub.publish(r, PAYLOAD)
    hub.cut.add(blob)
    [out] = download.fetch([r], tmp_path, hub.url, quiet=True)
    assert out == tmp_path / "set/train-00003.parquet" and out.read_bytes() == PAYLOAD
    assert not list(tmp_path.rglob("*.part"))
    tree = r.tree_url(hub.url)[len(hub.url):]
    assert (tree, None) in hub.log and any(p == tree for p, _ in hub.log[1:])  # both pages were read
    # the second request carried the Range through the redirect, from where the first one stopped
    assert (blob, f"bytes={len(PAYLOAD) // 2}-") in hub.log
    n = len(hub.log)
    download.fetch([r], tmp_path, hub.url, quiet=True)  # complete files are skipped, without a request
    assert len(hub.log) == n


def test_a_partial_file_from_an_earlier_run_is_resumed(hub, tmp_path):
    r = Remote(GITHUB, "owner/repo", "c0ffee", "data/x.json", "x/x.json",
               (("sha256", hashlib.sha256(PAYLOAD).hexdigest()), ("md5", hashlib.md5(PAYLOAD).hexdigest())))
    path = hub.publish(r, PAYLOAD)
    part = tmp_path / "x" / ".x.json.part"
    part.parent.mkdir()
    part.write_bytes(PAYLOAD[:1000])
    download.fetch_file(r, tmp_path, hub.url, quiet=True)
    assert (tmp_path / "x/x.json").read_bytes() == PAYLOAD and hub.log == [(path, "bytes=1000-")]
    # a server that ignores the Range sends the whole file: the part starts over instead of growing
    (tmp_path / "x/x.json").unlink()
    part.write_bytes(PAYLOAD[:1000])
    hub.ignore_range.add(path)
    download.fetch_file(r, tmp_path, hub.url, quiet=True)
    assert (tmp_path / "x/x.json").read_bytes() == PAYLOAD
    # a part that already holds the whole file: the server answers 416 and the file is checked as it is
    (tmp_path / "x/x.json").unlink()
    part.write_bytes(PAYLOAD)
    hub.ignore_range.clear()
    download.fetch_file(r, tmp_path, hub.url, quiet=True)
    assert (tmp_path / "x/x.json").read_bytes() == PAYLOAD and hub.log[-1] == (path, f"bytes={len(PAYLOAD)}-")


def test_a_corrupt_partial_file_is_fetched_again_from_the_start(hub, tmp_path):
    r = hf("data/a.parquet")
    blob = hub.publish(r, PAYLOAD)
    part = tmp_path / "set" / ".a.parquet.part"
    part.parent.mkdir()
    part.write_bytes(b"garbage" * 10)
    download.fetch_file(r, tmp_path, hub.url, quiet=True)
    assert (tmp_path / "set/a.parquet").read_bytes() == PAYLOAD
    assert [rng for p, rng in hub.log if p == blob] == ["bytes=70-", None]


def test_a_wrong_checksum_keeps_nothing(hub, tmp_path):
    r = hf("data/bad.parquet")
    hub.publish(r, PAYLOAD, sha256="ab" * 32)  # the listing publishes another sha256
    with pytest.raises(UserError, match=r"sha256 [0-9a-f]{64} \(expected abab"):
        download.fetch_file(r, tmp_path, hub.url, quiet=True)
    pinned = Remote(GITHUB, "owner/repo", "c0ffee", "data/p.json", "x/p.json", (("md5", "0" * 32),))
    hub.publish(pinned, PAYLOAD)
    with pytest.raises(UserError, match="md5"):
        download.fetch_file(pinned, tmp_path, hub.url, quiet=True)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # neither the file nor a part


def test_http_and_connection_errors_are_one_line_user_errors(hub, tmp_path):
    missing = Remote(GITHUB, "owner/repo", "c0ffee", "nope.json", "x/nope.json", (("md5", "0" * 32),))
    with pytest.raises(UserError, match="HTTP 404"):
        download.fetch_file(missing, tmp_path, hub.url, quiet=True)
    with pytest.raises(UserError, match="lists no data/ghost.parquet"):
        hub.publish(hf("data/real.parquet"), b"x")
        download.fetch_file(hf("data/ghost.parquet"), tmp_path, hub.url, quiet=True)
    with pytest.raises(UserError, match="--mirror"):  # nothing listens on port 9 of 127.0.0.1
        download.fetch_file(missing, tmp_path, "http://127.0.0.1:9", quiet=True)


def test_the_catalogue_is_pinned():
    for name, files in download.SOURCES.items():
        for r in files:
            assert re.fullmatch(r"[0-9a-f]{40}", r.rev), (name, r)
            assert r.host == HF or r.digests, f"{r.path}: GitHub publishes no checksum, so one must be pinned"
    assert len(download.remotes("wikipedia")) == 41 and len(download.remotes("wikipedia", 2)) == 2
    assert download.remotes("wikipedia", 1)[0].url() == (
        "https://huggingface.co/datasets/wikimedia/wikipedia/resolve/b04c8d1ceb2f5cd4588862100d08de323dccfbaa/"
        "20231101.en/train-00000-of-00041.parquet")
    assert download.remotes("wikipedia", 1)[0].tree_url() == (
        "https://huggingface.co/api/datasets/wikimedia/wikipedia/tree/b04c8d1ceb2f5cd4588862100d08de323dccfbaa/"
        "20231101.en")
    assert download.remotes("vocab")[0].tree_url().startswith("https://huggingface.co/api/models/google-bert/")
    with pytest.raises(UserError, match="--files 42"):
        download.remotes("wikipedia", 42)


# --- the command line ----------------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tinytlm.download", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def test_cli_fetches_wikipedia_files_and_fails_in_one_line(hub, tmp_path):
    for r in download.remotes("wikipedia", 3):
        hub.publish(r, r.path.encode() * 100)
    hub.cut.add(hub.redirect[download.remotes("wikipedia", 1)[0].url(hub.url)[len(hub.url):]])
    r = run_cli("wikipedia", "--files", "2", "--to", str(tmp_path), "--mirror", hub.url, "--quiet")
    assert r.returncode == 0, r.stderr
    got = sorted(p.name for p in (tmp_path / "wikipedia/20231101.en").iterdir())
    assert got == ["train-00000-of-00041.parquet", "train-00001-of-00041.parquet"], got
    assert "2 files complete" in r.stdout and "2 of 41 Wikipedia files" in r.stdout
    hub.publish(download.remotes("vocab")[0], b"[PAD]\nnot the vocabulary\n")  # fails its pinned sha256
    r = run_cli("vocab", "--to", str(tmp_path), "--mirror", hub.url, "--quiet")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "sha256" in lines[0], r.stderr
    assert not (tmp_path / "bert-base-uncased-vocab.txt").exists()
    r = run_cli("imdb", "--to", str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error: 'imdb': unknown data set"), r.stderr


# --- the commands' fallback: no raw data anywhere ------------------------------------------------------------

TINY_VOCAB = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "news", "team", "wins", "stocks",
                        "fall", "world", "new", "chip", ",", "."]) + "\n"


def agnews_csv(n_per_label: int, word: str) -> bytes:
    rows = [f'"{y}","{word} {i}","the team wins, stocks fall."\n' for y in (1, 2, 3, 4) for i in range(n_per_label)]
    return "".join(rows).encode()


@pytest.fixture
def fresh_clone(hub, tmp_path, monkeypatch):
    """A home folder with no raw data beside it, the hub at 127.0.0.1, and the catalogue's vocabulary and
    AG News replaced by fixtures (their pins are those of the real files)."""
    home = tmp_path / "clone"
    home.mkdir()
    for var in ("TINYTLM_RAW", "TINYTLM_DATA", "TINYTLM_NO_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TINYTLM_HOME", str(home))
    monkeypatch.setenv("TINYTLM_MIRROR", hub.url)
    fixtures = {"vocab": [TINY_VOCAB.encode()], "agnews": [agnews_csv(6, "train"), agnews_csv(4, "test")]}
    for name, datas in fixtures.items():
        files = [Remote(r.host, r.repo, r.rev, r.path, r.dest, (("sha256", hashlib.sha256(d).hexdigest()),))
                 for r, d in zip(download.SOURCES[name], datas)]
        monkeypatch.setitem(download.SOURCES, name, files)
        for r, d in zip(files, datas):
            hub.publish(r, d)
    return home


def test_training_commands_download_when_no_raw_data_is_found(fresh_clone, hub, capsys, monkeypatch):
    from tinytlm.tasks import TaskSpec, ensure_task
    spec = TaskSpec("agnews", train_per_label=3, test_per_label=2)
    monkeypatch.setenv("TINYTLM_NO_DOWNLOAD", "1")  # turned off: the 'not found' error stands, nothing is fetched
    with pytest.raises(UserError, match="does not exist"):
        ensure_task(spec)
    assert hub.log == []
    monkeypatch.delenv("TINYTLM_NO_DOWNLOAD")
    dest = ensure_task(spec)
    out = capsys.readouterr().out
    assert "no raw data found" in out and "downloading vocab, agnews (3 files) into" in out, out
    raw = fresh_clone / "data" / "raw"
    assert sorted(p.name for p in (raw / "ag_news").iterdir()) == ["test.csv", "train.csv"]
    assert (dest / "meta.json").is_file() and dest.parent == fresh_clone / "data"
    n = len(hub.log)
    ensure_task(TaskSpec("agnews", train_per_label=2, test_per_label=1))  # raw data there now: no request
    assert len(hub.log) == n and "downloading" not in capsys.readouterr().out


def test_a_chosen_raw_folder_is_never_filled(fresh_clone, hub, tmp_path):
    from tinytlm.tasks import TaskSpec, ensure_task
    empty = tmp_path / "mine"
    empty.mkdir()
    with pytest.raises(UserError, match="not found"):  # --raw / $TINYTLM_RAW: the error, as before
        ensure_task(TaskSpec("agnews"), raw=empty)
    assert hub.log == [] and not list(empty.iterdir())


def test_wikipedia_is_fetched_for_pretraining(fresh_clone, hub, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from tinytlm.wikipedia import ensure_wiki
    texts = [f"the world news {i}, a new chip." for i in range(30)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": [str(i) for i in range(30)], "text": texts}), buf)
    first = download.remotes("wikipedia", 1)[0]
    hub.publish(first, buf.getvalue())
    shard = ensure_wiki(20, quiet=True)
    out = capsys.readouterr().out
    assert "downloading vocab, wikipedia (2 files)" in out and "first 1 of 41 files" in out, out
    assert len(shard) == 20 and (fresh_clone / "data/raw" / first.dest).is_file()
    # more articles than that one file holds: fetching a second would reshuffle every W_s subset, so no
    with pytest.raises(UserError, match="change the shuffle|changes the shuffle"):
        ensure_wiki(download.WIKI_ROWS_PER_FILE + 1, quiet=True)
    assert not (fresh_clone / "data/raw" / download.remotes("wikipedia", 2)[1].dest).exists()


def test_demo_fetches_what_it_needs_first(fresh_clone, hub, monkeypatch, capsys):
    from tinytlm import demo

    class Stop(Exception):
        pass

    def stop(argv):
        raise Stop

    monkeypatch.setattr(download, "have_pyarrow", lambda: False)  # the check comes before any byte is fetched
    with pytest.raises(UserError, match="wikipedia would be downloaded as parquet files, which need pyarrow"):
        demo.main(["--out", str(fresh_clone / "runs/demo")])
    assert hub.log == []
    monkeypatch.setattr(download, "have_pyarrow", lambda: True)
    first = download.remotes("wikipedia", 1)[0]
    hub.publish(first, b"a parquet file")
    monkeypatch.setattr(demo.tokstats, "main", stop)  # step 1 would start here
    with pytest.raises(Stop):
        demo.main(["--out", str(fresh_clone / "runs/demo")])
    assert "downloading vocab, agnews, wikipedia (4 files)" in capsys.readouterr().out
    raw = fresh_clone / "data/raw"
    assert all((raw / r.dest).is_file() for n in ("vocab", "agnews") for r in download.SOURCES[n])
    assert [p.name for p in (raw / "wikipedia").rglob("*.parquet")] == ["train-00000-of-00041.parquet"]
