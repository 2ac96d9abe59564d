"""Prepare a classification task: balanced per-label train/test samples, tokenized into shards.

    python data_prep/tasks.py --task agnews                       # 1000/1000 per label
    python data_prep/tasks.py --task dbpedia                      # 100/100 (96 train exist here)
    python data_prep/tasks.py --task fewrel --labels 0,2,5,10,11,12,13,14,15,3   # 630/70 from val_wiki
    python data_prep/tasks.py --task fewrel --fewrel-source train_wiki --train-per-label 20 --test-per-label 20

Formats read (first match wins, under RAW/<folder>/):
- AG News: `train.csv` / `test.csv` (class 1-4, title, description; also .xz/.gz and
  the shared `train_subset.csv.xz`), or Hugging Face `ag_news` jsonl/parquet (text,
  label 0-3). Text = title + " " + description, exactly as HF builds its text field;
  backslashes (the CSV's "\\" line-break remnants) are kept as they are, as HF keeps them.
- DBpedia-14: `train.csv` / `test.csv` (class 1-14, title, content; also the shared
  `*_subset.csv.xz`) or HF `dbpedia_14` jsonl/parquet. Text = content, as the paper's code.
- FewRel: `val_wiki.json` / `train_wiki.json` ({relation: [{tokens, h, t}]}, also .xz/.gz;
  train_wiki falls back to the shared lower-cased `train_wiki_cfrl_lowercased.json.xz`),
  or HF `few_rel` jsonl/parquet. Text = tokens joined by spaces; `--entity-markers`
  wraps head and tail in [E1] ... [/E1] and [E2] ... [/E2].

Sampling: for each label, the rows of that label are permuted by
np.random.default_rng([42, label]) and the first N taken (so smaller samples are
prefixes of larger ones). Train rows come from the train split and test rows from
the test split; FewRel has one pool per relation, so train takes the first N_train
of the permutation and test the next N_test (disjoint). A label with fewer rows than
asked gives all it has, and the tool says so.
"""
import argparse
import csv
import gzip
import json
import lzma
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tinytlm.common import (ArgParser, UserError, add_option, atomic_dir, cli, default_data_root, default_raw_root,
                            read_json, save_npy, sha256_file, write_json)
from tinytlm.config import add_dataclass_args, option
from tinytlm.data import Shard, checked_shard, write_labels, write_shard
from tinytlm.download import fetch_missing
from tinytlm.tokenizer import WordPieceTokenizer

SEED = 42
MAX_POS = 128
TASKS = {
    # name: (raw folder, default train/test per label, label names for CSV sources)
    "agnews": ("ag_news", (1000, 1000), ["World", "Sports", "Business", "Sci/Tech"]),
    "dbpedia": ("dbpedia", (100, 100), ["Company", "EducationalInstitution", "Artist", "Athlete",
                                        "OfficeHolder", "MeanOfTransportation", "Building", "NaturalPlace",
                                        "Village", "Animal", "Plant", "Album", "Film", "WrittenWork"]),
    "fewrel": ("fewrel", (630, 70), None),
}


@dataclass
class TaskFields:
    """The flags that name a classification task's sample, declared once: train_cls's config, train_mlm's
    (its constructed pre-training sets are a task's) and the analysis commands share them."""
    task: str = option("agnews", "agnews | dbpedia | fewrel", choices=tuple(TASKS))
    labels: str = option("", "label indices of the source, comma-separated (default all)")
    train_per_label: int = option(0, "train rows per label (0 = the paper's)", low=0)
    test_per_label: int = option(0, "test rows per label (0 = the paper's)", low=0)
    fewrel_source: str = option("val_wiki", "FewRel's pool of relations", choices=("val_wiki", "train_wiki"))

    def spec(self, entity_markers: bool = False, max_len: int = 128) -> "TaskSpec":
        """The resolved TaskSpec these fields name (the paper's sample sizes filled in)."""
        return TaskSpec(task=self.task, train_per_label=self.train_per_label, test_per_label=self.test_per_label,
                        labels=parse_labels(self.labels), fewrel_source=self.fewrel_source,
                        entity_markers=entity_markers, max_len=max_len).resolved()


@dataclass(frozen=True)
class TaskSpec:
    task: str = "agnews"  # agnews | dbpedia | fewrel
    train_per_label: int = 0  # 0 = the paper's default for the task
    test_per_label: int = 0  # 0 = the paper's default for the task
    labels: tuple = ()  # indices into the source's label list; () = all
    fewrel_source: str = "val_wiki"  # val_wiki | train_wiki
    entity_markers: bool = False  # FewRel: wrap head/tail in [E1]..[/E1], [E2]..[/E2]
    max_len: int = 128  # tokens per row

    def resolved(self) -> "TaskSpec":
        if self.task not in TASKS:
            raise UserError(f"--task {self.task!r}: unknown task (choose from {', '.join(TASKS)})")
        if self.fewrel_source not in ("val_wiki", "train_wiki"):
            raise UserError(f"--fewrel-source {self.fewrel_source!r}: choose val_wiki or train_wiki")
        if not 2 <= self.max_len <= MAX_POS:
            raise UserError(f"--max-len {self.max_len}: must be between 2 and the model's {MAX_POS} positions")
        tr, te = TASKS[self.task][1]
        d = asdict(self)
        d.update(train_per_label=self.train_per_label or tr, test_per_label=self.test_per_label or te)
        if d["train_per_label"] < 0 or d["test_per_label"] < 0:
            raise UserError("--train-per-label/--test-per-label must be positive")
        return TaskSpec(**d)

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSpec":
        """The spec saved in a checkpoint or meta.json (JSON turns the labels tuple into a list)."""
        return cls(**{**d, "labels": tuple(d.get("labels", ()))}).resolved()

    def dirname(self) -> str:
        s = self.resolved()
        name = s.task + (f"-{s.fewrel_source}" if s.task == "fewrel" else "")
        name += f"-{s.train_per_label}x{s.test_per_label}"
        if s.labels:
            name += "-l" + ".".join(map(str, s.labels))
        if s.entity_markers:
            name += "-em"
        return name + (f"-len{s.max_len}" if s.max_len != 128 else "")


# -----------------------------------------------------------------------------
# reading the canonical formats

def _open(path: Path):
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8", newline="")


def _find(folder: Path, names: list[str]) -> Path:
    for n in names:
        hits = sorted(folder.rglob(n)) if "*" in n else [folder / n]
        hits = [h for h in hits if h.is_file()]
        if hits:
            return hits[0]
    raise UserError(f"{folder}: none of {', '.join(names)} found (set --raw or $TINYTLM_RAW; "
                    "python -m tinytlm.download fetches the canonical files)")


def _read_records(path: Path) -> list[dict]:
    """HF jsonl or parquet rows as dicts."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)")
        return pq.read_table(path).to_pylist()
    with _open(path) as f:
        try:
            return [json.loads(line) for line in f if line.strip()]
        except ValueError as e:
            raise UserError(f"{path}: not valid JSON lines ({e})")


def _csv_label(row: list, path: Path, lineno: int, n_labels: int) -> int:
    """The 0-based label of a (class 1-n, title, text) CSV row; a malformed row is a one-line error."""
    if len(row) != 3:
        raise UserError(f"{path}:{lineno}: expected 3 columns (class, title, text), got {len(row)}")
    try:
        y = int(row[0]) - 1
    except ValueError:
        y = -1
    if not 0 <= y < n_labels:
        raise UserError(f"{path}:{lineno}: label {row[0]!r} out of range 1-{n_labels}")
    return y


def read_csv_task(task: str, split: str, raw: Path):
    """(texts, labels 0-based, label names, source path) of AG News or DBpedia-14."""
    folder, _, names = TASKS[task]
    path = _find(raw / folder, [f"{split}.csv", f"{split}.csv.xz", f"{split}.csv.gz", f"{split}_subset.csv.xz",
                                f"{split}_subset.csv", f"{split}.jsonl", f"{split}.jsonl.gz", f"{split}-*.parquet"])
    texts, labels = [], []
    if ".csv" in path.name:
        try:
            with _open(path) as f:
                for lineno, row in enumerate(csv.reader(f), 1):
                    labels.append(_csv_label(row, path, lineno, len(names)))
                    texts.append(row[1] + " " + row[2] if task == "agnews" else row[2])
        except (OSError, EOFError, lzma.LZMAError, csv.Error, UnicodeDecodeError) as e:
            raise UserError(f"{path}: unreadable ({e})")
    else:
        for i, r in enumerate(_read_records(path)):
            y = r.get("label")
            if not isinstance(y, int) or not 0 <= y < len(names):
                raise UserError(f"{path}: row {i}: label {y!r} out of range 0-{len(names) - 1}")
            labels.append(y)
            texts.append(r["text"] if task == "agnews" else r["content"])
    if not texts:
        raise UserError(f"{path}: empty data set")
    return texts, np.array(labels, dtype=np.int64), list(names), path


def _fewrel_text(inst: dict, markers: bool) -> str:
    """A FewRel instance's text; its head and tail entities are required (a record without them is not
    FewRel), even where no markers use them. KeyError/IndexError/TypeError: a malformed instance."""
    tokens = [str(t) for t in inst["tokens"]]
    (h0, h1), (t0, t1) = [(pos[0][0], pos[0][-1]) for pos in (inst["h"][2], inst["t"][2])]
    if not all(type(i) is int and 0 <= i < len(tokens) for i in (h0, h1, t0, t1)):
        raise IndexError("entity position outside the tokens")
    if markers:
        # insert from the right so earlier positions stay valid
        for at, mark in sorted([(h0, "[E1]"), (h1 + 1, "[/E1]"), (t0, "[E2]"), (t1 + 1, "[/E2]")], reverse=True):
            tokens.insert(at, mark)
    return " ".join(tokens)


def read_fewrel(source: str, raw: Path, markers: bool):
    """(texts, labels, relation names, path): one pool over all relations, in file key order."""
    names = [f"{source}.json", f"{source}.json.xz", f"{source}.json.gz"]
    if source == "train_wiki":
        names.append("train_wiki_cfrl_lowercased.json.xz")
    path = _find(raw / "fewrel", names + [f"{source}.jsonl", f"{source}-*.parquet"])
    if "json" in path.name and not path.name.endswith(".jsonl"):
        try:
            with _open(path) as f:
                data = json.load(f)
        except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
            raise UserError(f"{path}: not a readable FewRel JSON file ({e})")
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a JSON object {{relation: [instances]}}")
    else:  # HF few_rel rows: relation, tokens, head{indices}, tail{indices}
        data = {}
        for r in _read_records(path):
            inst = {"tokens": r["tokens"], "h": [None, None, r["head"]["indices"]],
                    "t": [None, None, r["tail"]["indices"]]}
            data.setdefault(r["relation"], []).append(inst)
    pid2name = {}
    for pid_file in (raw / "fewrel" / "pid2name.json.xz", raw / "fewrel" / "pid2name.json"):  # shared, downloaded
        if pid_file.is_file():
            with _open(pid_file) as f:
                pid2name = json.load(f)
            break
    texts, labels, rels = [], [], list(data)
    for y, rel in enumerate(rels):
        for i, inst in enumerate(data[rel], 1):
            try:
                texts.append(_fewrel_text(inst, markers))
            except (KeyError, IndexError, TypeError):
                raise UserError(f"{path}: relation {rel}: instance {i} lacks tokens or head/tail "
                                f"entities (tokens/h/t)")
            labels.append(y)
    if not texts:
        raise UserError(f"{path}: empty data set")
    label_names = [f"{r} ({pid2name[r][0]})" if r in pid2name else r for r in rels]
    return texts, np.array(labels, dtype=np.int64), label_names, path


# -----------------------------------------------------------------------------
# sampling and writing

def sample_rows(y: np.ndarray, label: int, n: int, skip: int = 0) -> np.ndarray:
    """Rows [skip, skip + n) of label's seeded permutation (all that exist when fewer)."""
    rows = np.flatnonzero(y == label)
    perm = rows[np.random.default_rng([SEED, label]).permutation(len(rows))]
    return perm[skip:skip + n]


def prepare_task(spec: TaskSpec, raw: Path, out: Path, vocab: Path, quiet=False) -> Path:
    spec = spec.resolved()
    tok = WordPieceTokenizer.from_file(vocab)
    if spec.task == "fewrel":
        texts, y, names, path = read_fewrel(spec.fewrel_source, raw, spec.entity_markers)
        splits = {"train": (texts, y, path), "test": (texts, y, path)}
    else:
        splits = {}
        for split in ("train", "test"):
            texts, y, names, path = read_csv_task(spec.task, split, raw)
            splits[split] = (texts, y, path)
    labels = list(spec.labels) or list(range(len(names)))
    bad = [l for l in labels if not 0 <= l < len(names)]
    if bad or len(set(labels)) != len(labels):
        raise UserError(f"--labels {','.join(map(str, spec.labels))}: indices must be distinct and in "
                        f"0-{len(names) - 1} ({len(names)} labels in this source)")
    final = out / spec.dirname()
    with atomic_dir(final) as dest:  # nothing appears under `final` unless every file was written
        _write_splits(spec, tok, splits, names, labels, dest, vocab, quiet)
    return final


def _write_splits(spec, tok, splits, names, labels, dest, vocab, quiet):
    meta = {"kind": "task", "spec": asdict(spec), "seed": SEED, "label_names": [names[l] for l in labels],
            "source_label_index": labels, "vocab_sha256": sha256_file(vocab), "special_ids": tok.special_ids(),
            "sources": {}, "counts": {}, "short": {}}
    for split, want in (("train", spec.train_per_label), ("test", spec.test_per_label)):
        texts, y, path = splits[split]
        skip = spec.train_per_label if (spec.task == "fewrel" and split == "test") else 0
        rows, ys = [], []
        for new, l in enumerate(labels):
            r = sample_rows(y, l, want, skip)
            if len(r) < want:
                meta["short"].setdefault(split, {})[names[l]] = int(len(r))
            rows.append(r)
            ys.append(np.full(len(r), new))
        short = meta["short"].get(split, {})
        if short and not quiet:
            print(f"note: {split}: {len(short)} of {len(labels)} labels have fewer rows than the {want} asked "
                  f"({', '.join(f'{k} {v}' for k, v in list(short.items())[:4])}{', ...' if len(short) > 4 else ''}); "
                  f"all their rows are used")
        rows, ys = np.concatenate(rows), np.concatenate(ys)
        if len(rows) == 0:
            raise UserError(f"{path}: no {split} rows for the chosen labels (empty data set)")
        ids = tok.encode_batch([texts[i] for i in rows], max_len=spec.max_len)
        write_shard(dest / f"{split}.bin", ids, tok.vocab_size)
        meta.setdefault("shard_checksums", {})[split] = Shard(dest / f"{split}.bin").checksum.hex()
        write_labels(dest / f"{split}.bin", ys)
        save_npy(dest / f"{split}.rows.npy", rows)  # source row indices, for provenance
        meta["sources"][split] = {"file": str(path), "sha256": sha256_file(path)}
        meta["counts"][split] = np.bincount(ys, minlength=len(labels)).tolist()
    write_json(dest / "meta.json", meta)
    if not quiet:
        print(f"wrote {spec.dirname()}: {len(labels)} labels, train {sum(meta['counts']['train'])} rows, "
              f"test {sum(meta['counts']['test'])} rows")


def ensure_task(spec: TaskSpec, raw: Path = None, out: Path = None, vocab: Path = None, quiet=False) -> Path:
    """The prepared folder of spec, preparing it first when it is missing."""
    raw = raw or default_raw_root()
    out = out or default_data_root()
    dest = out / spec.dirname()
    if (dest / "meta.json").is_file():
        return dest
    vocab = vocab or raw / "bert-base-uncased-vocab.txt"
    fetch_missing(["vocab", spec.task], raw)  # no raw data anywhere: download it (tinytlm/download.py)
    if not raw.is_dir():
        raise UserError(f"{dest}: not prepared, and the raw data root {raw} does not exist; run "
                        f"`python data_prep/tasks.py --task {spec.task} --raw DIR`")
    return prepare_task(spec, raw, out, vocab, quiet=quiet)


def load_task(dest: Path):
    """(train Shard, train labels, test Shard, test labels, meta) of a prepared folder."""
    meta = read_json(dest / "meta.json", "task meta")
    sums = meta.get("shard_checksums", {})
    train, test = (checked_shard(dest / f"{s}.bin", sums.get(s)) for s in ("train", "test"))
    return train, train.labels(), test, test.labels(), meta


def parse_labels(s: str) -> tuple:
    if not s:
        return ()
    try:
        return tuple(int(x) for x in s.split(","))
    except ValueError:
        raise UserError(f"--labels {s!r}: expected comma-separated label indices, e.g. 5,10,11")


def add_task_args(ap: argparse.ArgumentParser, task_default="agnews"):
    """The TaskFields flags (--task, --labels, --train-per-label, ...) and --entity-markers."""
    add_dataclass_args(ap, TaskFields, "task")
    ap.set_defaults(task=task_default)
    add_option(ap, "--entity-markers", action="store_true", help="FewRel: mark head and tail entities")


def spec_from_args(args) -> TaskSpec:
    fields = TaskFields.__dataclass_fields__
    return TaskFields(**{k: getattr(args, k) for k in fields}).spec(args.entity_markers, getattr(args, "max_len", 128))


def parser() -> ArgParser:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_task_args(ap)
    add_option(ap, "--max-len", type=int, default=128, help="tokens per row, [CLS] and [SEP] included", low=3)
    add_option(ap, "--raw", type=Path, default=default_raw_root(), help="raw data root", kind="dir")
    add_option(ap, "--out", type=Path, default=default_data_root(), help="prepared data root", kind="out")
    add_option(ap, "--vocab", type=Path, default=None, help="vocab (default RAW/bert-base-uncased-vocab.txt)",
               kind="file")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    spec = spec_from_args(args)
    prepare_task(spec, args.raw, args.out, args.vocab or args.raw / "bert-base-uncased-vocab.txt")


if __name__ == "__main__":
    cli(main)
