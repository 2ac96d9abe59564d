"""python -m tinytlm.export: the folder loads in transformers and computes what our model computes."""
import contextlib
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.test_engine import assert_one_line_error, mlm_args
from tinytlm import export, finetune, pretrain
from tinytlm.checkpoint import build_model, load_checkpoint, save_checkpoint
from tinytlm.common import cli
from tinytlm.hf import from_hf_state_dict, hf_init_state, load_hf_dir
from tinytlm.model import BertConfig, BertForMLM
from tinytlm.tokenizer import WordPieceTokenizer

transformers = pytest.importorskip("transformers")

AGNEWS = ["World", "Sports", "Business", "Sci/Tech"]
TEXTS = [
    "Café naïve Zürich Ångström résumé façade",  # accents: stripped after lower-casing
    "Don't stop!!! (e.g., 3.14) costs $5 -- #tag @you 50% off & more...",  # punctuation, ASCII symbols
    "xyzzyqwertyplugh zzzvvvkkk ☃ snowman 🙂 emoji",  # pieces of unknown words, [UNK] for unknown chars
    "a" * 101 + " " + "b" * 100 + " antidisestablishmentarianism-like",  # > 100 chars: [UNK]; 100: pieces
    "HeLLo WORLD\tand\nnew  lines; 東京 and 北京 [MASK] [CLS]x",  # case, whitespace, CJK, specials in text
    " ".join(["tokenization"] * 80),  # 160 pieces: truncated to 126 + [CLS] [SEP]
    "",
]


def run_export(*args):
    """`python -m tinytlm.export ARGS` in this process: (exit code, stderr), as tinytlm.common.cli ends it."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli(lambda: export.main([str(a) for a in args]))
            code = 0
        except SystemExit as e:
            code = e.code
    return types.SimpleNamespace(returncode=code, stderr=err.getvalue())


@pytest.fixture(scope="module")
def runs(roots, tmp_path_factory):
    """A briefly pre-trained tiny MLM (2 blocks, 2 heads of 32) and an AG News classifier fine-tuned from it."""
    raw, data = roots
    base = tmp_path_factory.mktemp("export_runs")
    pretrain.main(mlm_args(roots, base / "mlm", "--epochs", "1", "--arch", "n_layer=2,n_head=2"))
    finetune.main(["--task", "agnews", "--train-per-label", "4", "--test-per-label", "3", "--epochs", "1",
                   "--raw", str(raw), "--data", str(data), "--device", "cpu", "--init", str(base / "mlm"),
                   "--out", str(base / "cls")])
    # Scrambled copies (a checkpoint file each, with the run's records): trained this briefly, the weights are
    # still near their init (biases 0, LayerNorms 1, std 0.02), where a wrong key or activation would hide.
    torch.manual_seed(0)
    for kind in ("mlm", "cls"):
        state = load_checkpoint(base / kind)
        model = build_model(state)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))  # MLP pre-activations of std ~1: GELU's curved part
        save_checkpoint(base / f"{kind}-scrambled.pt", kind=kind, model=model, optimizer=None, step=state["step"],
                        epoch=state["epoch"], train_config=state["train_config"], data=state["data"],
                        extra=state["extra"])
    return {"mlm": base / "mlm-scrambled.pt", "cls": base / "cls-scrambled.pt", "cls_run": base / "cls",
            "vocab": raw / "bert-base-uncased-vocab.txt"}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """Both runs exported once (safetensors), shared by the read-only tests."""
    base = tmp_path_factory.mktemp("exported")
    (base / "cls").mkdir()  # an existing empty OUT is allowed
    return {k: {**(r := export.export(runs[k], base / k)), "out": Path(r["out"])} for k in ("mlm", "cls")}


def batch(out):
    """Real texts through the exported tokenizer: rows of different lengths, so the mask has padding."""
    tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = tok(["The game ended in a draw.", "Stocks fell sharply on Monday after the report, analysts said."],
              padding=True, truncation=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    return enc["input_ids"], enc["attention_mask"]


def ours(run):
    return build_model(load_checkpoint(run)).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_mlm_loads_as_bert_for_masked_lm(runs, exported, attn):
    out = exported["mlm"]["out"]
    assert exported["mlm"]["weights"] == "model.safetensors"
    hf, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True,
                                                                 attn_implementation=attn)
    assert type(hf) is transformers.BertForMaskedLM and not hf.training
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    c, mine = hf.config, ours(runs["mlm"])
    cfg = mine.config
    assert (c.hidden_act, c.layer_norm_eps, c.max_position_embeddings, c.type_vocab_size, c.pad_token_id) == \
           ("gelu", cfg.ln_eps, cfg.max_pos, cfg.type_vocab, cfg.pad_id)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (2, 64, 2)
    idx, mask = batch(out)
    with torch.no_grad():
        a, _ = mine(idx, mask)  # without targets our head runs at every position: (B, T, V)
        r = hf(input_ids=idx, attention_mask=mask, output_hidden_states=True)
        h = mine.bert(idx, mask)  # (B, T, H), post-LN: O(1) values, where a small error shows
    assert a.shape == r.logits.shape and (a - r.logits).abs().max() <= 1e-5
    assert (h - r.hidden_states[-1]).abs().max() <= 1e-5
    # the tied decoder is the word embedding matrix, in transformers too
    assert hf.cls.predictions.decoder.weight.data_ptr() == hf.bert.embeddings.word_embeddings.weight.data_ptr()


def test_classifier_loads_with_the_task_labels(runs, exported):
    out = exported["cls"]["out"]
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert type(hf) is transformers.BertForSequenceClassification
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.id2label == dict(enumerate(AGNEWS)) and hf.config.label2id == {n: i for i, n in enumerate(AGNEWS)}
    assert hf.num_labels == 4 and hf.config.problem_type == "single_label_classification"
    idx, mask = batch(out)
    y = torch.tensor([1, 2])
    mine = ours(runs["cls"])
    with torch.no_grad():
        a, _ = mine(idx, mask)  # logits (without targets the model returns them)
        _, la = mine(idx, mask, y)  # given targets: (counts, the mean loss)
        r = hf(input_ids=idx, attention_mask=mask, labels=y, output_hidden_states=True)
        h = mine.bert(idx, mask)  # the trunk: O(1) values (the logits are ~0.1, near a fresh head's)
    assert (a - r.logits).abs().max() <= 1e-5 and abs(la - r.loss) <= 1e-5
    assert (h - r.hidden_states[-1]).abs().max() <= 1e-5
    # padding changes nothing: the short row alone gives the same logits
    n = int(mask[0].sum())
    with torch.no_grad():
        alone = hf(input_ids=idx[:1, :n]).logits
    assert (alone - r.logits[:1]).abs().max() <= 1e-5


def test_tokenizer_gives_our_ids(runs, exported):
    import tokenizers
    out = exported["mlm"]["out"]
    ref = WordPieceTokenizer.from_file(runs["vocab"])
    auto = transformers.AutoTokenizer.from_pretrained(out)
    fast = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))  # the JSON pipeline itself, without transformers
    assert auto.model_max_length == 128 and auto.do_lower_case and auto.vocab_size == ref.vocab_size
    assert (out / "vocab.txt").read_bytes() == runs["vocab"].read_bytes()
    seen = set()
    for text in TEXTS:
        want = ref.encode(text, max_len=128)  # [CLS] ... [SEP] [PAD]...: what our data rows hold
        assert auto(text, truncation=True, padding="max_length")["input_ids"] == want, text
        full = [ref.cls_id, *ref.token_ids(text), ref.sep_id]  # untruncated
        assert auto(text)["input_ids"] == full, text
        assert fast.encode(text).ids == full, text
        seen |= {"unk"} if ref.unk_id in full else set()
        seen |= {"truncated"} if len(full) > 128 else set()
    assert seen == {"unk", "truncated"}  # the texts do reach both cases


def test_round_trip_through_our_import_is_bitwise(runs, exported):
    for kind in ("mlm", "cls"):
        config, sd = load_hf_dir(exported[kind]["out"])
        back, mine = from_hf_state_dict(sd, config).state_dict(), ours(runs[kind]).state_dict()
        assert config == ours(runs[kind]).config and back.keys() == mine.keys()
        assert all(torch.equal(back[k], mine[k]) for k in mine), kind
    trunk = hf_init_state(exported["mlm"]["out"])["model"]  # what train_cls.py --init hf:OUT starts from
    mine = ours(runs["mlm"]).state_dict()
    assert trunk and all(torch.equal(v, mine[k]) for k, v in trunk.items())


def test_bin_fallback_without_safetensors(runs, tmp_path, monkeypatch):
    with monkeypatch.context() as m:  # the package looks missing: importing it fails
        m.setitem(sys.modules, "safetensors", None)
        m.setitem(sys.modules, "safetensors.torch", None)
        with pytest.raises(ImportError):
            __import__("safetensors.torch")
        r = export.export(runs["cls_run"], tmp_path / "bin")  # RUN: a run folder (the others: ckpt files)
    assert r["weights"] == "pytorch_model.bin" and "model.safetensors" not in r["files"]
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "bin")
    idx, mask = batch(tmp_path / "bin")
    with torch.no_grad():
        assert (ours(runs["cls_run"])(idx, mask)[0] - hf(input_ids=idx, attention_mask=mask).logits).abs().max() <= 1e-5
    config, sd = load_hf_dir(tmp_path / "bin")
    back, mine = from_hf_state_dict(sd, config).state_dict(), ours(runs["cls_run"]).state_dict()
    assert all(torch.equal(back[k], mine[k]) for k in mine)


def test_conv_stem_refused_by_the_command(tmp_path):
    torch.manual_seed(0)
    stem = BertForMLM(BertConfig.preset("tiny", n_layer=1, n_head=1, head_dim=16, vocab_size=200, n_conv=1,
                                        conv_channels=4))
    save_checkpoint(tmp_path / "stem.pt", kind="mlm", model=stem, optimizer=None, step=0, epoch=0,
                    train_config={"model": "tiny"}, data={})
    r = subprocess.run([sys.executable, "-m", "tinytlm.export", str(tmp_path / "stem.pt"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert_one_line_error(r, "conv stem", "n_conv=1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stem.pt"]  # no OUT, no temp folder


def test_bad_input_one_line(runs, exported, tmp_path, monkeypatch):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert_one_line_error(run_export(runs["mlm"], full), str(full), "not an empty folder")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert_one_line_error(run_export(runs["mlm"], exported["mlm"]["out"]), "not an empty folder")
    assert_one_line_error(run_export(tmp_path / "nothing", tmp_path / "o"), "nothing", "not found")
    assert_one_line_error(run_export(runs["mlm"], tmp_path / "o", "--bogus"), "--bogus")
    # a stacked run and a --gap folder hold no model of their own: the error names what to export
    (tmp_path / "stack").mkdir()
    (tmp_path / "stack" / "stack.json").write_text(json.dumps({"kind": "mlm", "members": ["runs/x/s0", "runs/x/s1"]}))
    assert_one_line_error(run_export(tmp_path / "stack", tmp_path / "o"), "2 members", "runs/x/s0, runs/x/s1")
    (tmp_path / "gap").mkdir()
    (tmp_path / "gap" / "gap_config.json").write_text("{}")
    assert_one_line_error(run_export(tmp_path / "gap", tmp_path / "o"), "pretrained", "scratch")
    # --vocab must be the vocabulary the data was tokenized with (its sha256 is recorded)
    other = tmp_path / "vocab.txt"
    other.write_text(runs["vocab"].read_text().replace("[unused0]", "[unused_x]"))
    assert_one_line_error(run_export(runs["mlm"], tmp_path / "o", "--vocab", other), "--vocab", "not the vocabulary")
    assert not (tmp_path / "o").exists()


def test_vocab_not_found_then_given(runs, tmp_path, monkeypatch):
    """A checkpoint whose data record leads nowhere: a one-line error asking for --vocab, which then works."""
    monkeypatch.setenv("TINYTLM_RAW", str(tmp_path / "no-raw"))
    state = load_checkpoint(runs["mlm"])
    save_checkpoint(tmp_path / "moved.pt", kind="mlm", model=build_model(state), optimizer=None, step=state["step"],
                    epoch=state["epoch"], train_config={**state["train_config"], "raw": str(tmp_path / "gone")},
                    data={"shard": str(tmp_path / "gone" / "wikipedia" / "wiki.bin")})
    assert_one_line_error(run_export(tmp_path / "moved.pt", tmp_path / "o"), "--vocab", "bert-base-uncased-vocab.txt")
    assert run_export(tmp_path / "moved.pt", tmp_path / "o", "--vocab", runs["vocab"]).returncode == 0
    assert (tmp_path / "o" / "vocab.txt").read_bytes() == runs["vocab"].read_bytes()


def test_a_failed_export_leaves_nothing(runs, tmp_path, monkeypatch):
    def broken(*a):
        raise OSError(28, "No space left on device", "tokenizer.json")
    monkeypatch.setattr(export, "tokenizer_files", broken)
    assert_one_line_error(run_export(runs["mlm"], tmp_path / "o"), "No space left")
    assert list(tmp_path.iterdir()) == []  # neither OUT nor its temp folder
