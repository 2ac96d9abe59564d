"""Import and export Hugging Face BERT weights: a key map, no transformers import needed.

Our parameter names are short; this table maps them onto the keys of
`transformers.BertForMaskedLM` / `BertForSequenceClassification` (transformers 5.x).
`i` is the block index.

| ours                                     | Hugging Face                                           |
| ---------------------------------------- | ------------------------------------------------------ |
| bert.embeddings.word.weight              | bert.embeddings.word_embeddings.weight                 |
| bert.embeddings.pos.weight               | bert.embeddings.position_embeddings.weight             |
| bert.embeddings.token_type.weight        | bert.embeddings.token_type_embeddings.weight           |
| bert.embeddings.ln.{weight,bias}         | bert.embeddings.LayerNorm.{weight,bias}                |
| bert.encoder.blocks.i.attn.qkv.{w,b}     | bert.encoder.layer.i.attention.self.{query,key,value}.{w,b} (split) |
| bert.encoder.blocks.i.attn.proj.{w,b}    | bert.encoder.layer.i.attention.output.dense.{w,b}      |
| bert.encoder.blocks.i.ln1.{w,b}          | bert.encoder.layer.i.attention.output.LayerNorm.{w,b}  |
| bert.encoder.blocks.i.mlp.fc.{w,b}       | bert.encoder.layer.i.intermediate.dense.{w,b}          |
| bert.encoder.blocks.i.mlp.proj.{w,b}     | bert.encoder.layer.i.output.dense.{w,b}                |
| bert.encoder.blocks.i.ln2.{w,b}          | bert.encoder.layer.i.output.LayerNorm.{w,b}            |
| MLM: head.dense.{w,b}                    | cls.predictions.transform.dense.{w,b}                  |
| MLM: head.ln.{w,b}                       | cls.predictions.transform.LayerNorm.{w,b}              |
| MLM: head.bias                           | cls.predictions.bias and cls.predictions.decoder.bias (tied in HF) |
| MLM: (tied) bert.embeddings.word.weight  | cls.predictions.decoder.weight (tied in HF)            |
| classifier: head.pooler.{w,b}            | bert.pooler.dense.{w,b}                                |
| classifier: head.out.{w,b}               | classifier.{w,b}                                       |

(split): our fused qkv weight and bias are HF's query, key and value, split in 3 along dim 0.
HF's BertForMaskedLM has no pooler; our pooler lives in the classifier head, so an MLM trunk
loads into a classifier with `clf.bert.load_state_dict(mlm.bert.state_dict())`.
Models with a conv stem (n_conv > 0) have no HF counterpart and are refused.
Import: `load_hf_dir` / `hf_init_state` (train_cls.py --init hf:DIR); export: `hf_config_dict` and
`to_hf_state_dict(model, tied=False)`, written as a folder by tinytlm/export.py.
"""
import torch

from tinytlm.common import UserError
from tinytlm.model import BertConfig, BertForClassification, BertForMLM

# (ours, HF) for keys that are a plain rename; {i} is the block index.
_EMB = [("bert.embeddings.word.weight", "bert.embeddings.word_embeddings.weight"),
        ("bert.embeddings.pos.weight", "bert.embeddings.position_embeddings.weight"),
        ("bert.embeddings.token_type.weight", "bert.embeddings.token_type_embeddings.weight"),
        ("bert.embeddings.ln.weight", "bert.embeddings.LayerNorm.weight"),
        ("bert.embeddings.ln.bias", "bert.embeddings.LayerNorm.bias")]
_BLOCK = [("attn.proj", "attention.output.dense"), ("ln1", "attention.output.LayerNorm"),
          ("mlp.fc", "intermediate.dense"), ("mlp.proj", "output.dense"), ("ln2", "output.LayerNorm")]
_MLM = [("head.dense.weight", "cls.predictions.transform.dense.weight"),
        ("head.dense.bias", "cls.predictions.transform.dense.bias"),
        ("head.ln.weight", "cls.predictions.transform.LayerNorm.weight"),
        ("head.ln.bias", "cls.predictions.transform.LayerNorm.bias"),
        ("head.bias", "cls.predictions.bias")]
_CLS = [("head.pooler.weight", "bert.pooler.dense.weight"), ("head.pooler.bias", "bert.pooler.dense.bias"),
        ("head.out.weight", "classifier.weight"), ("head.out.bias", "classifier.bias")]
_QKV = ("query", "key", "value")


def _renames(cfg: BertConfig, classifier: bool) -> list:
    """All (ours, HF) plain-rename pairs for a model of this config (qkv handled separately)."""
    pairs = list(_EMB)
    for i in range(cfg.n_layer):
        for ours, hf in _BLOCK:
            for p in ("weight", "bias"):
                pairs.append((f"bert.encoder.blocks.{i}.{ours}.{p}", f"bert.encoder.layer.{i}.{hf}.{p}"))
    return pairs + (_CLS if classifier else _MLM)


def _check_no_stem(cfg: BertConfig):
    if cfg.n_conv > 0:
        raise UserError(f"n_conv={cfg.n_conv}: models with a conv stem have no Hugging Face equivalent")


def hf_config(config: BertConfig, n_labels=None) -> dict:
    """Keyword arguments for `transformers.BertConfig` describing the same model."""
    kw = dict(hidden_size=config.hidden, num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
              intermediate_size=config.ffn_mult * config.hidden, max_position_embeddings=config.max_pos,
              vocab_size=config.vocab_size, type_vocab_size=config.type_vocab, layer_norm_eps=config.ln_eps,
              hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.attn_dropout,
              initializer_range=config.init_std, pad_token_id=config.pad_id, hidden_act="gelu")
    if n_labels is not None:
        kw["num_labels"] = n_labels
    return kw


def hf_config_dict(config: BertConfig, label_names=None) -> dict:
    """The config.json of the matching transformers model: BertForMaskedLM, or with label_names (in label
    index order) BertForSequenceClassification with id2label / label2id and single-label cross-entropy."""
    _check_no_stem(config)
    d = {"architectures": ["BertForSequenceClassification" if label_names is not None else "BertForMaskedLM"],
         "model_type": "bert", **hf_config(config), "position_embedding_type": "absolute",
         "tie_word_embeddings": True,  # MLM: the decoder is the word embedding matrix, as ours
         "classifier_dropout": None}  # None: HF's classifier dropout is hidden_dropout_prob, as our head's
    if label_names is not None:
        names = [str(n) for n in label_names]
        if len(set(names)) != len(names):
            raise UserError(f"label names are not unique: {', '.join(names)}")
        d.update(id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)},
                 problem_type="single_label_classification")
    return d


def to_hf_state_dict(model, tied: bool = True) -> dict:
    """State dict with the keys (and tied duplicates) of the matching transformers model. tied=False leaves
    out the MLM decoder's weight and bias, which transformers ties to the word embeddings and
    cls.predictions.bias on loading (what its save_pretrained writes; safetensors refuses shared tensors)."""
    cfg = model.config
    _check_no_stem(cfg)
    classifier = isinstance(model, BertForClassification)
    sd = model.state_dict()
    out = {hf: sd[ours] for ours, hf in _renames(cfg, classifier)}
    for i in range(cfg.n_layer):
        for p in ("weight", "bias"):
            parts = sd[f"bert.encoder.blocks.{i}.attn.qkv.{p}"].chunk(3, dim=0)  # 3 x (H, H) or (H,)
            for name, t in zip(_QKV, parts):
                out[f"bert.encoder.layer.{i}.attention.self.{name}.{p}"] = t.clone()
    if not classifier and tied:  # HF lists its tied decoder weight and bias as keys of their own
        out["cls.predictions.decoder.weight"] = sd["bert.embeddings.word.weight"]
        out["cls.predictions.decoder.bias"] = sd["head.bias"]
    return out


def from_hf_state_dict(sd: dict, config: BertConfig, n_labels=None):
    """Build our model from a transformers BERT state dict.

    Returns a BertForClassification when `sd` has classifier keys or `n_labels` is given (a
    classifier built from an MLM state dict keeps its freshly initialised head), else a BertForMLM.
    """
    _check_no_stem(config)
    if "classifier.weight" in sd:
        n_labels = sd["classifier.weight"].shape[0]
    classifier = n_labels is not None
    model = BertForClassification(config, n_labels) if classifier else BertForMLM(config)
    ours = {}
    for o, hf in _renames(config, classifier):
        if hf in sd:
            ours[o] = sd[hf]
    for i in range(config.n_layer):
        for p in ("weight", "bias"):
            names = [f"bert.encoder.layer.{i}.attention.self.{n}.{p}" for n in _QKV]
            if all(n in sd for n in names):
                ours[f"bert.encoder.blocks.{i}.attn.qkv.{p}"] = torch.cat([sd[n] for n in names], dim=0)  # (3H, ...)
    # Keys HF has that we derive (tied copies), or that this task does not use (pooler for MLM,
    # MLM/NSP heads for a classifier), are dropped; any other leftover key is an error.
    used = {hf for _, hf in _renames(config, True) + _renames(config, False)}
    used |= {f"bert.encoder.layer.{i}.attention.self.{n}.{p}"
             for i in range(config.n_layer) for n in _QKV for p in ("weight", "bias")}
    unknown = sorted(k for k in sd if k not in used and not k.startswith("cls."))
    if unknown:
        raise UserError(f"unexpected Hugging Face key(s) for this config: {', '.join(unknown[:5])}")
    fresh_head = classifier and "classifier.weight" not in sd
    missing = [k for k in model.state_dict() if k not in ours and not (fresh_head and k.startswith("head."))]
    if missing:
        raise UserError(f"Hugging Face state dict lacks weights for: {', '.join(missing[:5])}")
    try:
        model.load_state_dict(ours, strict=False)
    except RuntimeError as e:  # size mismatch: the config does not describe these weights
        raise UserError(f"Hugging Face weights do not fit the config: {str(e).splitlines()[-1].strip()}")
    return model


def load_hf_dir(path):
    """(BertConfig, HF-keyed state dict) of a Hugging Face BERT checkpoint folder: config.json plus
    model.safetensors (needs the safetensors package) or pytorch_model.bin. Old key spellings
    (LayerNorm gamma/beta, a bare BertModel without the `bert.` prefix) are normalised."""
    from pathlib import Path

    from tinytlm.common import read_json
    path = Path(path)
    c = read_json(path / "config.json", "Hugging Face config")
    if c.get("model_type", "bert") != "bert":
        raise UserError(f"{path / 'config.json'}: model_type {c.get('model_type')!r}; only BERT checkpoints "
                        f"import (DistilBERT and others have another architecture)")
    if c.get("hidden_act", "gelu") != "gelu" or c.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{path / 'config.json'}: needs hidden_act gelu and absolute position embeddings")
    H, heads, inter = c["hidden_size"], c["num_attention_heads"], c["intermediate_size"]
    if H % heads or inter % H:
        raise UserError(f"{path / 'config.json'}: hidden {H} / heads {heads} / intermediate {inter} "
                        "do not fit BertConfig")
    config = BertConfig(n_layer=c["num_hidden_layers"], n_head=heads, head_dim=H // heads, ffn_mult=inter // H,
                        max_pos=c["max_position_embeddings"], vocab_size=c["vocab_size"],
                        type_vocab=c.get("type_vocab_size", 2), dropout=c.get("hidden_dropout_prob", 0.1),
                        attn_dropout=c.get("attention_probs_dropout_prob", 0.1), ln_eps=c.get("layer_norm_eps", 1e-12),
                        init_std=c.get("initializer_range", 0.02), pad_id=c.get("pad_token_id") or 0)
    if (path / "model.safetensors").is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"{path / 'model.safetensors'}: reading it needs the safetensors package")
        sd = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{path}: no model.safetensors or pytorch_model.bin")
    if not any(k.startswith("bert.") for k in sd):  # a bare BertModel
        sd = {("bert." + k if not k.startswith("cls.") else k): v for k, v in sd.items()}
    sd = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
          for k, v in sd.items() if not k.endswith("position_ids")}
    return config, sd


def hf_init_state(path) -> dict:
    """A pre-trained trunk from a Hugging Face BERT folder, shaped like a train_mlm checkpoint
    (what train_cls.py --init hf:DIR loads). The pre-training data is unknown: no token stats."""
    config, sd = load_hf_dir(path)
    trunk = from_hf_state_dict(sd, config, n_labels=1).bert.state_dict()  # the classifier head is dropped
    return {"kind": "mlm", "path": f"hf:{path}", "model_config": config.to_dict(),
            "model": {f"bert.{k}": v for k, v in trunk.items()}, "train_config": {"model": "hf"},
            "data": {"pretrain_set": "hugging face checkpoint", "source": str(path)}, "optimizer": None}
