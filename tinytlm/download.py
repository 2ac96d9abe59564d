"""Download the raw data sets and the vocabulary, at pinned revisions, into the layout data_prep reads.

    python -m tinytlm.download vocab agnews          # what the demo's fine-tuning needs (no pyarrow)
    python -m tinytlm.download wikipedia --files 1   # the first of Wikipedia's 41 parquet files
    python -m tinytlm.download all --to /big/disk/raw
    python -m tinytlm.download fewrel --mirror http://127.0.0.1:8000

What lands where, under the raw root (--to; default $TINYTLM_RAW, else ../shared/data when it exists, else
data/raw):

    vocab      bert-base-uncased-vocab.txt            google-bert/bert-base-uncased vocab.txt (Hugging Face)
    agnews     ag_news/{train,test}.csv               the original CSVs (GitHub mhjabreel/CharCnn_Keras, torchtext's)
    dbpedia    dbpedia/{train,test}-00000-of-00001.parquet    HF fancyzhx/dbpedia_14 (reading it needs pyarrow)
    fewrel     fewrel/{train_wiki,val_wiki,pid2name}.json      GitHub thunlp/FewRel
    wikipedia  wikipedia/20231101.en/train-000NN-of-00041.parquet  HF wikimedia/wikipedia (needs pyarrow)

Each file is written to `.NAME.part`, resumed with an HTTP Range request where a download broke off (in this
run or an earlier one), checked against its digest -- the sha256 the hub publishes for the file at the pinned
revision, or a digest pinned below -- and only then renamed to NAME: a file under its final name is complete,
and files already there are skipped. `--mirror URL` fetches the files (and the hub's listings) from URL
instead of https://huggingface.co and https://raw.githubusercontent.com, with the same paths.

When no raw data is found (no --raw, no $TINYTLM_RAW, no ../shared/data), the commands fetch what they need
into data/raw themselves and say so (`fetch_missing`, called where the 'not found' errors are raised);
TINYTLM_NO_DOWNLOAD=1 turns that off and $TINYTLM_MIRROR gives them a mirror.
"""
import hashlib
import http.client
import importlib.util
import json
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tinytlm.common import ArgParser, UserError, add_option, cli, default_raw_root, download_root

HF = "https://huggingface.co"
GITHUB = "https://raw.githubusercontent.com"
# pinned revisions: the commits the files are fetched at
BERT_REV = "86b5e0934494bd15c9632b12f734a8a67f723594"  # google-bert/bert-base-uncased
AGNEWS_REV = "555590db4219b1243abb1918effd6a7425a2d75f"  # mhjabreel/CharCnn_Keras (shared/data/SOURCES.md)
DBPEDIA_REV = "9abd46cf7fc8b4c64290f26993c540b92aa145ac"  # fancyzhx/dbpedia_14
FEWREL_REV = "278a2315d2138810a379cd8d5718914dc56e2582"  # thunlp/FewRel (shared/data/SOURCES.md)
WIKI_REV = "b04c8d1ceb2f5cd4588862100d08de323dccfbaa"  # wikimedia/wikipedia
WIKI_CONFIG, WIKI_FILES = "20231101.en", 41
WIKI_ROWS_PER_FILE = 100_000  # fewer articles than a file holds (6.4M / 41 ~ 156k): the files a --ws needs
TIMEOUT = 60  # seconds without an answer before a request fails
ATTEMPTS = 5  # a transfer that breaks off is resumed this often in one run


@dataclass(frozen=True)
class Remote:
    """One file: where it is published (host, repository, pinned revision, path) and where it goes."""
    host: str  # HF or GITHUB: the default base URL
    repo: str  # HF: "datasets/owner/name" or "owner/name" (a model); GitHub: "owner/name"
    rev: str  # the commit
    path: str  # in the repository
    dest: str  # under the raw root
    digests: tuple = ()  # pinned (algorithm, hex) pairs; () = the sha256 the hub publishes

    def url(self, base=None) -> str:
        base = (base or self.host).rstrip("/")
        middle = "/resolve" if self.host == HF else ""
        return f"{base}/{self.repo}{middle}/{self.rev}/{urllib.parse.quote(self.path)}"

    def tree_url(self, base=None) -> str:
        """The hub's listing of the folder that holds the file (its entries carry the LFS sha256)."""
        api = self.repo if self.repo.startswith("datasets/") else f"models/{self.repo}"
        folder = self.path.rpartition("/")[0]
        return f"{(base or self.host).rstrip('/')}/api/{api}/tree/{self.rev}/{urllib.parse.quote(folder)}".rstrip("/")


def _github(repo, rev, path, dest, **digests):
    return Remote(GITHUB, repo, rev, path, dest, tuple(digests.items()))


SOURCES = {
    # vocab.txt is a plain git file on the hub (no LFS sha256 published): its sha256 is pinned (SOURCES.md)
    "vocab": [Remote(HF, "google-bert/bert-base-uncased", BERT_REV, "vocab.txt", "bert-base-uncased-vocab.txt",
                     (("sha256", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),))],
    # GitHub publishes no sha256: train.csv's md5 is torchtext's pin, test.csv's sha256 that of the shared copy
    "agnews": [_github("mhjabreel/CharCnn_Keras", AGNEWS_REV, "data/ag_news_csv/train.csv", "ag_news/train.csv",
                       md5="b1a00f826fdfbd249f79597b59e1dc12"),
               _github("mhjabreel/CharCnn_Keras", AGNEWS_REV, "data/ag_news_csv/test.csv", "ag_news/test.csv",
                       sha256="521465c2428ed7f02f8d6db6ffdd4b5447c1c701962353eb2c40d548c3c85699")],
    "dbpedia": [Remote(HF, "datasets/fancyzhx/dbpedia_14", DBPEDIA_REV, f"dbpedia_14/{s}-00000-of-00001.parquet",
                       f"dbpedia/{s}-00000-of-00001.parquet") for s in ("train", "test")],
    # train_wiki.json: the md5 datamaestro pins; val_wiki and pid2name: the sha256 of the shared copies
    "fewrel": [_github("thunlp/FewRel", FEWREL_REV, "data/train_wiki.json", "fewrel/train_wiki.json",
                       md5="5e663e9c3f1bfbdb2de72696e9504fd7"),
               _github("thunlp/FewRel", FEWREL_REV, "data/val_wiki.json", "fewrel/val_wiki.json",
                       sha256="76bb44c2485b6faed358a3ce040eadafcc8a8835245cd7e6afc1bef672d4a0bf"),
               _github("thunlp/FewRel", FEWREL_REV, "data/pid2name.json", "fewrel/pid2name.json",
                       sha256="eeedd25512a8e4c2bc06b78009836d27de81807bcba6ed929debd5cd713c07ea")],
    "wikipedia": [Remote(HF, "datasets/wikimedia/wikipedia", WIKI_REV,
                         f"{WIKI_CONFIG}/train-{i:05d}-of-{WIKI_FILES:05d}.parquet",
                         f"wikipedia/{WIKI_CONFIG}/train-{i:05d}-of-{WIKI_FILES:05d}.parquet")
                  for i in range(WIKI_FILES)],
}


def remotes(name: str, wiki_files: int = 0) -> list:
    """The files of one data set; Wikipedia: its first `wiki_files` files (0 = all 41)."""
    if name not in SOURCES:
        raise UserError(f"{name!r}: unknown data set (choose from {', '.join(SOURCES)} or all)")
    if name == "wikipedia" and wiki_files:
        if not 1 <= wiki_files <= WIKI_FILES:
            raise UserError(f"--files {wiki_files}: Wikipedia has {WIKI_FILES} files")
        return SOURCES[name][:wiki_files]
    return SOURCES[name]


def have_pyarrow() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


# -----------------------------------------------------------------------------
# HTTP: requests, the hub's listings, one resumable transfer

class _BrokeOff(Exception):
    """A transfer that ended before the file did; the part file keeps what came, for the next attempt."""


def _request(url, offset=0):
    headers = {"User-Agent": "tinytlm-download"}
    if offset:
        headers["Range"] = f"bytes={offset}-"  # urllib keeps it across the hub's redirect to its file store
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing after `offset`: the part file already holds the whole file
            return None
        raise UserError(f"{url}: HTTP {e.code} {e.reason}")
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"{url}: {reason} (no connection? --mirror URL or $TINYTLM_MIRROR fetches from "
                        "elsewhere; a partial file is resumed on the next run)")


def published_digests(remote: Remote, base=None, listings=None) -> tuple:
    """((algorithm, hex),) the hub publishes for the file at the pinned revision: the sha256 of an LFS file,
    the git blob sha1 of a plain one. `listings` caches the folder listings of one run."""
    url = remote.tree_url(base)
    listings = {} if listings is None else listings
    if url not in listings:
        entries, page = {}, url
        while page:  # the listing comes in pages, linked by `Link: <next>; rel="next"`
            resp = _request(page)
            with resp:
                try:
                    entries.update({e["path"]: e for e in json.load(resp)})
                except (ValueError, TypeError, KeyError) as e:
                    raise UserError(f"{page}: not a hub tree listing ({e.__class__.__name__})")
                nxt = re.search(r'<([^>]+)>\s*;\s*rel="next"', resp.headers.get("Link", ""))
            page = nxt.group(1) if nxt else None
        listings[url] = entries
    entry = listings[url].get(remote.path)
    if entry is None:
        raise UserError(f"{url}: the hub lists no {remote.path} at revision {remote.rev}")
    if entry.get("lfs"):
        return (("sha256", entry["lfs"]["oid"]),)
    return (("git-blob-sha1", entry["oid"]),)


def file_digests(path: Path, algorithms) -> dict:
    """{algorithm: hex} of a file in one pass; git-blob-sha1 is git's object id (sha1 of 'blob SIZE\\0' + bytes)."""
    hashes = {a: hashlib.sha1() if a == "git-blob-sha1" else hashlib.new(a) for a in algorithms}
    if "git-blob-sha1" in hashes:
        hashes["git-blob-sha1"].update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            for h in hashes.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashes.items()}


def _transfer(url, part: Path, desc, quiet):
    """Append the rest of the file at `url` to `part` (from its current size, by a Range request)."""
    offset = part.stat().st_size if part.exists() else 0
    resp = _request(url, offset)
    if resp is None:
        return
    part.parent.mkdir(parents=True, exist_ok=True)
    with resp:
        if offset:
            start = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if resp.status != 206 or not start or int(start.group(1)) != offset:
                offset = 0  # the server sent the whole file (it ignored the Range): start over
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        with open(part, "ab" if offset else "wb") as f, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                     disable=quiet or None) as bar:
            while True:
                try:
                    chunk = resp.read(1 << 20)
                except (http.client.HTTPException, OSError, socket.timeout) as e:
                    raise _BrokeOff(str(e) or e.__class__.__name__)
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size < total:
        raise _BrokeOff(f"ended at {part.stat().st_size:,} of {total:,} bytes")


def fetch_file(remote: Remote, to: Path, base=None, listings=None, quiet=False) -> Path:
    """Download one file into to/remote.dest: resumable, verified, renamed into place when complete."""
    dest = Path(to) / remote.dest
    if dest.is_file():
        return dest
    url = remote.url(base)
    expected = dict(remote.digests or published_digests(remote, base, listings))
    part = dest.with_name(f".{dest.name}.part")
    for fresh in (False, True):  # a resumed file that fails its check is fetched once more from byte 0
        resumed = part.exists() and part.stat().st_size > 0
        for attempt in range(1, ATTEMPTS + 1):
            try:
                _transfer(url, part, remote.dest, quiet)
                break
            except _BrokeOff as e:
                if attempt == ATTEMPTS:
                    raise UserError(f"{url}: the transfer broke off {ATTEMPTS} times ({e}); run again to resume "
                                    f"from {part}")
        got = file_digests(part, expected)
        bad = [f"{a} {got[a]} (expected {h})" for a, h in expected.items() if got[a] != h.lower()]
        if not bad:
            os.replace(part, dest)
            if not quiet:
                print(f"  {dest} ({dest.stat().st_size:,} bytes, {' and '.join(expected)} verified)")
            return dest
        part.unlink()
        if fresh or not resumed:
            raise UserError(f"{url}: {', '.join(bad)}; the download was deleted (a damaged transfer, or another file)")


def fetch(files, to: Path, mirror=None, quiet=False) -> list:
    """Download `files` (Remotes) into the raw root `to`; files already there are skipped."""
    listings, out = {}, []
    for r in files:
        out.append(fetch_file(r, to, mirror, listings, quiet))
    return out


# -----------------------------------------------------------------------------
# the fallback of the commands: no raw data anywhere, so fetch what is needed

def auto_download(raw: Path) -> bool:
    """Whether the commands may download into `raw`: only into the default download folder (data/raw, the raw
    root when neither --raw, $TINYTLM_RAW nor ../shared/data gives one), never into a folder the user chose,
    and not with TINYTLM_NO_DOWNLOAD=1."""
    if os.environ.get("TINYTLM_NO_DOWNLOAD", "") not in ("", "0"):
        return False
    return Path(raw).resolve() == download_root().resolve()


def fetch_missing(names, raw: Path, wiki_rows: int = 0, quiet=False):
    """The commands' fallback, called where 'not found' errors are raised: download the files of `names` that
    `raw` lacks when auto_download(raw), saying what and where; else do nothing (the errors stand).
    Wikipedia: enough files for `wiki_rows` articles (one file for 0 or -1, every article of what is there)."""
    if not auto_download(raw):
        return
    wiki_files = min(WIKI_FILES, max(1, -(-max(wiki_rows, 0) // WIKI_ROWS_PER_FILE)))
    have = [r for r in remotes("wikipedia", WIKI_FILES) if (Path(raw) / r.dest).is_file()]
    if "wikipedia" in names and have and len(have) < wiki_files:  # more files would reshuffle every W_s subset
        raise UserError(f"{Path(raw) / 'wikipedia'}: {wiki_rows:,} articles need more than the {len(have)} Wikipedia "
                        f"file(s) there; adding files changes the shuffle, so every W_s subset: download all "
                        f"(python -m tinytlm.download wikipedia) and delete the prepared data/wikipedia/")
    files = [r for n in names for r in remotes(n, wiki_files)]
    missing = [r for r in files if not (Path(raw) / r.dest).is_file()]
    if not missing:
        return
    what = [n for n in dict.fromkeys(names) if any(r in missing for r in remotes(n, wiki_files))]
    parquet = [n for n in what if n in ("dbpedia", "wikipedia")]
    if parquet and not have_pyarrow():
        raise UserError(f"no raw data found, and {' and '.join(parquet)} would be downloaded as parquet files, which "
                        "need pyarrow: pip install pyarrow (or pip install -e '.[parquet]'), then run again")
    mirror = env_mirror()
    print(f"no raw data found (no --raw, $TINYTLM_RAW or ../shared/data): downloading {', '.join(what)} "
          f"({len(missing)} files) into {raw} from {mirror or 'huggingface.co / raw.githubusercontent.com'}; "
          "TINYTLM_NO_DOWNLOAD=1 turns this off")
    if "wikipedia" in what:
        print(f"  Wikipedia: its first {wiki_files} of {WIKI_FILES} files only, so the shuffle spans their articles; "
              "the paper's W_s subsets need all of them: python -m tinytlm.download wikipedia")
    fetch(missing, Path(raw), mirror, quiet)


# -----------------------------------------------------------------------------
# command line

URL = r"https?://[^\s/]+(/\S*)?"  # what --mirror and $TINYTLM_MIRROR accept


def env_mirror():
    """$TINYTLM_MIRROR (None when unset), checked as --mirror is."""
    v = os.environ.get("TINYTLM_MIRROR") or None
    if v and not re.fullmatch(URL, v):
        raise UserError(f"TINYTLM_MIRROR={v!r}: expected an http:// or https:// URL")
    return v


def parser() -> ArgParser:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_option(ap, "names", nargs="+", metavar="NAME", help=f"{' | '.join(SOURCES)} | all",
               choices=(*SOURCES, "all"), unknown="{v!r}: unknown data set ({why})")
    add_option(ap, "--to", type=Path, default=default_raw_root(), help="raw data root to fill", kind="out")
    add_option(ap, "--mirror", default=None, help="an http(s) URL to fetch from instead of huggingface.co and "
               "raw.githubusercontent.com (default $TINYTLM_MIRROR)", kind="url", pattern=URL)
    add_option(ap, "--files", type=int, default=0, help="Wikipedia: only its first N parquet files (0 = all 41)",
               low=0)
    add_option(ap, "--quiet", action="store_true", help="no progress bars, no line per file")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    args.mirror = args.mirror or env_mirror()
    names = list(SOURCES) if "all" in args.names else list(dict.fromkeys(args.names))
    files = [r for n in names for r in remotes(n, args.files)]
    if args.files and "wikipedia" not in names:
        raise UserError("--files counts Wikipedia's files: add wikipedia (or all)")
    print(f"{len(files)} files of {', '.join(names)} into {args.to}" + (f" from {args.mirror}" if args.mirror else ""))
    if {"dbpedia", "wikipedia"} & set(names) and not have_pyarrow():
        print("note: dbpedia and wikipedia are parquet files; reading them needs pyarrow (pip install pyarrow)")
    if "wikipedia" in names and args.files:
        print(f"note: {args.files} of {WIKI_FILES} Wikipedia files: the shuffle, and so every W_s subset, spans only "
              "their articles, not the paper's 6.4M")
    done = fetch(files, args.to, args.mirror, args.quiet)
    print(f"{len(done)} files complete under {args.to}")


if __name__ == "__main__":
    cli(main)
