"""Our BERT equals Hugging Face BERT, weight for weight, in both directions of the key map."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from tinytlm.common import UserError
from tinytlm.hf import from_hf_state_dict, hf_config, to_hf_state_dict
from tinytlm.mlm_rows import mlm_rows
from tinytlm.model import BertConfig, BertForClassification, BertForMLM

N_LABELS = 5


def _batch(cfg, B=2, T=16):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(1000, cfg.vocab_size, (B, T), generator=g)
    idx[:, 0] = 101  # [CLS]
    mask = torch.ones(B, T, dtype=torch.long)
    idx[1, 10:], mask[1, 10:] = 0, 0  # second row padded
    return idx, mask


def _hf_model(cfg, task):
    kw = hf_config(cfg, N_LABELS if task == "cls" else None)
    hcfg = transformers.BertConfig(**kw, attn_implementation="eager")
    if task == "cls":
        return transformers.BertForSequenceClassification(hcfg).eval()
    return transformers.BertForMaskedLM(hcfg).eval()


def _scramble(model):
    """Perturb every parameter: biases and LayerNorms start at 0/1, where a mis-mapped key would hide."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _ours(cfg, task):
    return (BertForClassification(cfg, N_LABELS) if task == "cls" else BertForMLM(cfg)).eval()


@pytest.mark.parametrize("task", ["mlm", "cls"])
@pytest.mark.parametrize("name", ["tiny", "bert1", "bert6"])
def test_parity_both_ways(name, task):
    torch.manual_seed(0)
    # bert6 with a 2k vocabulary: the same stack, a third of the parameters to initialise
    cfg = BertConfig.preset(name, **({"vocab_size": 2000} if name == "bert6" else {}))
    idx, mask = _batch(cfg)
    ours, hf = _scramble(_ours(cfg, task)), _hf_model(cfg, task)

    # ours -> HF: every HF key is written, none is left over
    res = hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert res.missing_keys == [] and res.unexpected_keys == []
    with torch.no_grad():
        a, _ = ours(idx, mask)
        b = hf(input_ids=idx, attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    # HF -> ours: another (scrambled) HF model copied into ours gives its logits
    torch.manual_seed(1)
    hf2 = _scramble(_hf_model(cfg, task))
    ours2 = from_hf_state_dict(hf2.state_dict(), cfg)
    assert type(ours2) is type(ours)
    with torch.no_grad():
        a, _ = ours2.eval()(idx, mask)
        b = hf2(input_ids=idx, attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and the round trip reproduces HF's state dict exactly (tied keys included)
    back, ref = to_hf_state_dict(ours2), hf2.state_dict()
    assert back.keys() == ref.keys()
    assert all(torch.equal(back[k], ref[k]) for k in ref)


def test_parity_losses():
    torch.manual_seed(0)
    cfg = BertConfig.preset("tiny")
    idx, mask = _batch(cfg)
    ours, hf = _scramble(_ours(cfg, "mlm")), _hf_model(cfg, "mlm")
    hf.load_state_dict(to_hf_state_dict(ours))
    targets = torch.full_like(idx, -100)
    targets[0, 3], targets[1, 5], targets[1, 7] = idx[0, 3], idx[1, 5], idx[1, 7]
    rows, y = mlm_rows(targets)  # our sparse head on the three chosen positions
    with torch.no_grad():
        _, loss = ours(idx, mask, y, rows=rows)
        ref = hf(input_ids=idx, attention_mask=mask, labels=targets).loss
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


def test_mlm_state_dict_gives_classifier_with_fresh_head():
    cfg = BertConfig.preset("tiny", vocab_size=200)
    mlm = _hf_model(cfg, "mlm")
    clf = from_hf_state_dict(mlm.state_dict(), cfg, n_labels=3)
    assert isinstance(clf, BertForClassification) and clf.n_labels == 3
    torch.testing.assert_close(clf.bert.embeddings.word.weight, mlm.bert.embeddings.word_embeddings.weight)


def test_refuses_conv_stem_and_foreign_keys():
    with pytest.raises(UserError):
        to_hf_state_dict(BertForMLM(BertConfig.preset("bert1-cl1-d64-3x3-h12", vocab_size=100, n_head=2)))
    cfg = BertConfig.preset("tiny", vocab_size=200)
    sd = _hf_model(cfg, "mlm").state_dict()
    with pytest.raises(UserError):  # a 3-layer checkpoint does not fit a 2-layer config
        from_hf_state_dict({**sd, "bert.encoder.layer.2.output.dense.bias": torch.zeros(128)}, cfg)
    with pytest.raises(UserError):  # missing weights
        from_hf_state_dict({k: v for k, v in sd.items() if "layer.1." not in k}, cfg)
    with pytest.raises(UserError):  # wrong width
        from_hf_state_dict(sd, BertConfig.preset("tiny", vocab_size=200, n_head=4))


def test_training_steps_match_hf():
    """Five AdamW steps from the same weights on the same masked batches: the losses of our model
    (sparse head) and of transformers.BertForMaskedLM (dense head) stay equal, so gradients match too."""
    import transformers
    from tinytlm.data import mask_generator, mask_tokens
    from tinytlm.hf import hf_config, to_hf_state_dict
    torch.manual_seed(0)
    cfg = BertConfig.preset("tiny", n_layer=2, dropout=0.0, attn_dropout=0.0)
    ours = BertForMLM(cfg)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**hf_config(cfg), attn_implementation="eager"))
    hf.load_state_dict(to_hf_state_dict(ours))
    opt_a = torch.optim.AdamW(ours.parameters(), lr=1e-3, weight_decay=0.01)
    opt_b = torch.optim.AdamW(hf.parameters(), lr=1e-3, weight_decay=0.01)
    for step in range(5):
        idx = torch.randint(1000, 30000, (4, 24), generator=torch.Generator().manual_seed(step))
        idx[:, 0], idx[:, -1] = 101, 102
        idx[1, 12:] = 0
        idx[1, 11] = 102
        inputs, targets = mask_tokens(idx, mask_generator("cpu", 0, step), vocab_size=30522, mask_id=103,
                                      special_ids=(0, 100, 101, 102, 103))
        rows, y = mlm_rows(targets)  # our sparse head against HF's dense one
        _, la = ours(inputs, attention_mask=idx != 0, targets=y, rows=rows)
        lb = hf(input_ids=inputs, attention_mask=(idx != 0).long(), labels=targets).loss
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
        for opt, loss in ((opt_a, la), (opt_b, lb)):
            loss.backward()
            opt.step()
            opt.zero_grad()
