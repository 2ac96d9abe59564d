"""Export a run as a Hugging Face folder: `transformers` loads it with from_pretrained.

    python -m tinytlm.export runs/mlm-tiny-random-ws4000-s0 hf/mlm-tiny   # -> BertForMaskedLM
    python -m tinytlm.export runs/cls-a/ckpt.pt hf/cls-a                   # -> BertForSequenceClassification
    python -m tinytlm.export RUN OUT --vocab ../shared/data/bert-base-uncased-vocab.txt

RUN is a run directory (its ckpt.pt) or a checkpoint file; OUT must not exist or be empty. OUT gets:

    config.json              transformers' BertConfig (a classifier's id2label / label2id are the task's labels)
    model.safetensors        the weights under transformers' keys (tinytlm/hf.py); pytorch_model.bin when the
                             safetensors package is not installed
    vocab.txt                a byte copy of the vocabulary the run's data was tokenized with
    tokenizer.json           the same WordPiece for the `tokenizers` library (what AutoTokenizer reads)
    tokenizer_config.json    uncased BERT, model_max_length = the run's row length; + special_tokens_map.json
    tinytlm_export.json      where it came from: checkpoint, checksum, step, vocabulary sha256

The vocabulary is found from the checkpoint's data record (the prepared folder's meta.json names it, or the
run's raw root holds it); its sha256 must equal the one recorded when the data was tokenized. --vocab PATH
names it when it has moved. Refused, one line each: a model with a conv stem (HF BERT has none), a stacked run
folder (stack.json: export each member folder it names), a --gap folder (export its pretrained/ or scratch/).
Everything is written into a temp folder beside OUT, renamed to OUT at the end: a failed or interrupted export
leaves nothing behind.

Transformers' tokenizer is the Rust one, which differs from the pure-Python BertTokenizer, and so from ours, on
a few rare inputs (word-final sigma, unassigned code points: bench/results/tokenizer.md). Its decode() also
joins punctuation back ("hello, world"), where our decode() leaves "hello , world"; the ids are the same.
"""
import json
import shutil
from pathlib import Path

from tinytlm.checkpoint import build_model, checkpoint_file, load_checkpoint
from tinytlm.common import (ArgParser, UserError, add_option, atomic_dir, cli, default_data_root, default_raw_root,
                            read_json, sha256_file, write_json)
from tinytlm.hf import hf_config_dict, to_hf_state_dict
from tinytlm.tokenizer import MAX_WORD_CHARS, SPECIALS, WordPieceTokenizer

VOCAB_NAME = "bert-base-uncased-vocab.txt"  # the file every data-preparation default reads from the raw root


# -----------------------------------------------------------------------------
# what to export

def checkpoint_of(run) -> Path:
    """The checkpoint file of RUN; a stacked or --gap folder (no model of its own) is refused, naming what to export."""
    p = Path(run)
    if (p / "stack.json").is_file():
        members = read_json(p / "stack.json", "stack manifest").get("members", [])
        raise UserError(f"{p}: a stacked run of {len(members)} members; export each member folder: "
                        f"{', '.join(map(str, members))}")
    if (p / "gap_config.json").is_file() and not (p / "ckpt.pt").is_file():
        raise UserError(f"{p}: a --gap folder; export one arm: {p / 'pretrained'} or {p / 'scratch'}")
    return checkpoint_file(p)


def _meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def data_metas(state: dict) -> list:
    """meta.json of the prepared folders the run read (the task's first, then the pre-training shard's)."""
    d, tc = state.get("data") or {}, state.get("train_config") or {}
    paths = []
    if "task_dir" in d:  # a classifier: data/<task folder>
        paths.append(Path(tc.get("data") or default_data_root()) / d["task_dir"] / "meta.json")
    for rec in (d, (state.get("extra") or {}).get("pretrain") or {}):
        if "shard" in rec:  # data/wikipedia/wiki.bin or data/pretrain/<set>.bin: the Wikipedia meta names the vocab
            shard = Path(rec["shard"])
            paths += [shard.parent / "meta.json", shard.parent.parent / "wikipedia" / "meta.json"]
    return [(p, m) for p in paths if (m := _meta(p))]


def find_vocab(state: dict, metas: list, vocab=None) -> tuple:
    """(vocab path, recorded sha256 or None): --vocab, else the first candidate whose sha256 is the recorded one."""
    recorded = next(((p, m["vocab_sha256"]) for p, m in metas if m.get("vocab_sha256")), None)
    if vocab is not None:
        vocab = Path(vocab)
        if not vocab.is_file():
            raise UserError(f"--vocab {vocab}: file not found")
        if recorded and sha256_file(vocab) != recorded[1]:
            raise UserError(f"--vocab {vocab}: not the vocabulary the run's data was tokenized with "
                            f"(sha256 differs from {recorded[0]})")
        return vocab, recorded and recorded[1]
    tc = state.get("train_config") or {}
    candidates = [Path(m["vocab"]) for _, m in metas if m.get("vocab")]
    candidates += [Path(tc.get("raw") or default_raw_root()) / VOCAB_NAME, default_raw_root() / VOCAB_NAME]
    for c in dict.fromkeys(candidates):  # in order, without repeats
        if c.is_file() and (recorded is None or sha256_file(c) == recorded[1]):
            return c, recorded and recorded[1]
    want = f" with the sha256 recorded in {recorded[0]}" if recorded else ""
    where = ", ".join(map(str, dict.fromkeys(candidates)))
    raise UserError(f"{state['path']}: the vocabulary{want} is not at {where}; give --vocab PATH")


def label_names(state: dict, metas: list) -> list:
    names = (state.get("extra") or {}).get("label_names") or next(
        (m["label_names"] for _, m in metas if m.get("kind") == "task" and m.get("label_names")), None)
    n = state["n_labels"]
    if names is None or len(names) != n:  # unknown: transformers' own default names
        return [f"LABEL_{i}" for i in range(n)]
    return list(names)


def row_len(state: dict, metas: list, max_pos: int) -> int:
    """Tokens per row the run was trained on (what the exported tokenizer truncates to), at most max_pos."""
    d = state.get("data") or {}
    n = (d.get("spec") or {}).get("max_len") or next((m["row_len"] for _, m in metas if m.get("row_len")), max_pos)
    return min(int(n), max_pos)


# -----------------------------------------------------------------------------
# the files

def tokenizer_files(tok: WordPieceTokenizer, max_len: int) -> dict:
    """{file name: JSON object} for transformers / tokenizers: our uncased WordPiece (see tinytlm/tokenizer.py)."""
    ids = tok.special_ids()
    tokens = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIALS))
    added = [{"id": tok.vocab[s], "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s in sorted(SPECIALS, key=tok.vocab.get)]

    def piece(kind, name, type_id):
        return {kind: {"id": name, "type_id": type_id}}

    post = {"type": "TemplateProcessing",  # [CLS] A [SEP] (B [SEP]), as BertTokenizer
            "single": [piece("SpecialToken", "[CLS]", 0), piece("Sequence", "A", 0), piece("SpecialToken", "[SEP]", 0)],
            "pair": [piece("SpecialToken", "[CLS]", 0), piece("Sequence", "A", 0), piece("SpecialToken", "[SEP]", 0),
                     piece("Sequence", "B", 1), piece("SpecialToken", "[SEP]", 1)],
            "special_tokens": {s: {"id": s, "ids": [ids[k]], "tokens": [s]}
                               for s, k in (("[CLS]", "cls"), ("[SEP]", "sep"))}}
    fast = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            # clean control chars, space CJK, lower-case and strip accents (strip_accents None: with lowercase)
            "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                           "strip_accents": None, "lowercase": True},
            "pre_tokenizer": {"type": "BertPreTokenizer"}, "post_processor": post,
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},  # as BertTokenizer's
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": MAX_WORD_CHARS, "vocab": tok.vocab}}
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "strip_accents": None,
              "tokenize_chinese_chars": True, "model_max_length": max_len, **tokens}
    return {"tokenizer.json": fast, "tokenizer_config.json": config, "special_tokens_map.json": tokens}


def write_weights(sd: dict, folder: Path) -> str:
    """model.safetensors (the format transformers prefers), or pytorch_model.bin without the safetensors package."""
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        import torch
        torch.save(sd, folder / "pytorch_model.bin")
        return "pytorch_model.bin"
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})  # transformers checks "pt"
    return "model.safetensors"


def export(run, out, vocab=None) -> dict:
    """Write the Hugging Face folder of RUN's checkpoint to OUT; returns what was written."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; choose a new OUT")
    state = load_checkpoint(checkpoint_of(run))
    model = build_model(state)
    cfg = model.config
    if cfg.n_conv > 0:
        raise UserError(f"{state['path']}: this model has a conv stem (n_conv={cfg.n_conv}), which Hugging Face "
                        f"BERT cannot express; only models without a stem export")
    metas = data_metas(state)
    vocab_path, sha = find_vocab(state, metas, vocab)
    tok = WordPieceTokenizer.from_file(vocab_path)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"{vocab_path}: {tok.vocab_size} tokens, more than the model's {cfg.vocab_size}")
    recorded = (state.get("data") or {}).get("special_ids") or next(
        (m["special_ids"] for _, m in metas if m.get("special_ids")), None)
    if recorded and recorded != tok.special_ids():
        raise UserError(f"{vocab_path}: special-token ids {tok.special_ids()} differ from the run's {recorded}")
    labels = label_names(state, metas) if state["kind"] == "cls" else None
    config = hf_config_dict(cfg, labels)
    max_len = row_len(state, metas, cfg.max_pos)
    with atomic_dir(out) as tmp:
        weights = write_weights(to_hf_state_dict(model, tied=False), tmp)
        write_json(tmp / "config.json", config)
        shutil.copymode(tmp / "config.json", tmp / weights)  # safetensors writes 0600; give it the umask's mode
        shutil.copyfile(vocab_path, tmp / "vocab.txt")
        for name, obj in tokenizer_files(tok, max_len).items():
            write_json(tmp / name, obj)
        write_json(tmp / "tinytlm_export.json", {
            "checkpoint": state["path"], "checksum": state.get("checksum"), "kind": state["kind"],
            "step": state["step"], "epoch": state["epoch"], "model_config": cfg.to_dict(),
            "vocab": str(vocab_path), "vocab_sha256": sha or sha256_file(vocab_path)})
        files = sorted(p.name for p in tmp.iterdir())
    arch = config["architectures"][0]
    print(f"exported {arch} ({model.num_params() / 1e6:.1f}M parameters, step {state['step']}) from {state['path']} "
          f"to {out}: {', '.join(files)}")
    return {"out": str(out), "architecture": arch, "weights": weights, "files": files, "vocab": str(vocab_path)}


def parser() -> ArgParser:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add_option(ap, "run", help="run directory or checkpoint file (ckpt.pt)", kind="run")
    add_option(ap, "out", help="output folder (must not exist, or be empty)", kind="out")
    add_option(ap, "--vocab", default=None, help="vocabulary file, when it is no longer where the run's data "
               "records it", kind="file")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    return export(args.run, args.out, args.vocab)


if __name__ == "__main__":
    cli(main)
