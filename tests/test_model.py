"""Behaviour of the BERT stack: loss at init, sparse head, overfitting, conv stem, padding, configs."""
import math
import os

import pytest
import torch

from tinytlm.common import UserError
from tinytlm.kernel_path import Impl
from tinytlm.mlm_rows import mlm_rows
from tinytlm.model import BertConfig, BertForClassification, BertForMLM, ConvStem


def _batch(vocab, B=4, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1000 if vocab > 2000 else 5, vocab, (B, T), generator=g)
    idx[:, 0] = 101 if vocab > 2000 else 1  # [CLS]
    targets = torch.full_like(idx, -100)
    chosen = torch.rand(B, T, generator=g) < 0.3
    chosen[:, 0] = False
    chosen[0, 1] = True  # at least one target
    targets[chosen] = idx[chosen]
    return idx, targets


def test_loss_at_init_is_ln_vocab():
    torch.manual_seed(0)
    cfg = BertConfig.preset("tiny")
    model = BertForMLM(cfg).eval()
    idx, targets = _batch(cfg.vocab_size)
    rows, y = mlm_rows(targets)
    with torch.no_grad():
        counts, loss = model(idx, targets=y, rows=rows)
        logits, none = model(idx, rows=rows)
    assert logits.shape == ((targets != -100).sum().item(), cfg.vocab_size) and none is None
    assert counts.shape == (1, 3) and counts[0, 2] == len(y)  # given targets: counts, no logits
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.5


def test_sparse_head_equals_dense_head():
    torch.manual_seed(0)
    cfg = BertConfig.preset("tiny", vocab_size=500)
    model = BertForMLM(cfg).eval()
    idx, targets = _batch(cfg.vocab_size)
    rows, y = mlm_rows(targets)
    with torch.no_grad():
        _, sparse_loss = model(idx, targets=y, rows=rows)
        sparse_logits, _ = model(idx, rows=rows)
        _, dense_loss = model(idx, targets=targets)
        dense_logits, none = model(idx)
        all_logits = dense_logits
    sel = targets != -100
    assert dense_logits.shape == (*idx.shape, cfg.vocab_size) and none is None
    torch.testing.assert_close(sparse_logits, dense_logits[sel])  # row-major order of the chosen positions
    torch.testing.assert_close(all_logits, dense_logits)
    torch.testing.assert_close(sparse_loss, dense_loss)
    torch.testing.assert_close(sparse_loss, torch.nn.functional.cross_entropy(dense_logits[sel], targets[sel]))


def test_overfits_one_batch():
    torch.manual_seed(0)
    cfg = BertConfig.preset("tiny", vocab_size=200, n_layer=1, dropout=0.0, attn_dropout=0.0)
    model = BertForMLM(cfg)
    idx, targets = _batch(cfg.vocab_size, B=4, T=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    rows, y = mlm_rows(targets)
    for _ in range(15):
        _, loss = model(idx, targets=y, rows=rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")  # torch perf note for 16x3
@pytest.mark.parametrize("n_conv", [1, 2, 3])
@pytest.mark.parametrize("kernel", [(3, 3), (16, 3)])
def test_conv_stem_shapes(n_conv, kernel):
    cfg = BertConfig(n_layer=1, n_head=2, head_dim=8, vocab_size=50, n_conv=n_conv, conv_channels=4,
                     conv_kernel=kernel)
    stem = ConvStem(cfg)
    assert len(stem.convs) == n_conv and stem.convs[0].in_channels == 1 and stem.proj.out_channels == 1
    assert stem.convs[-1].kernel_size == kernel
    x = torch.randn(3, 20, cfg.hidden)
    assert stem(x).shape == x.shape
    model = BertForMLM(cfg)
    logits, _ = model(torch.randint(1, 50, (3, 20)))
    assert logits.shape == (3, 20, 50)
    assert torch.isfinite(logits).all()


def test_conv_stem_sits_between_embeddings_and_encoder():
    torch.manual_seed(0)
    cfg = BertConfig.preset("bert1-cl2-d64-3x3-h8", vocab_size=50, n_head=2, head_dim=8)
    model = BertForMLM(cfg).eval()
    idx = torch.randint(1, 50, (2, 12))
    seen = {}
    model.bert.stem.register_forward_hook(lambda m, i, o: seen.update(stem_in=i[0], stem_out=o))
    model.bert.encoder.register_forward_pre_hook(lambda m, a: seen.update(enc_in=a[0]))
    with torch.no_grad():
        model(idx)
    torch.testing.assert_close(seen["stem_in"], model.bert.embeddings(idx, torch.zeros_like(idx)))
    assert seen["enc_in"] is seen["stem_out"]


@pytest.mark.parametrize("cls", ["mlm", "cls"])
def test_padding_does_not_change_real_tokens(cls):
    torch.manual_seed(0)
    cfg = BertConfig.preset("tiny", vocab_size=300)
    model = (BertForMLM(cfg) if cls == "mlm" else BertForClassification(cfg, 3)).eval()
    idx = torch.randint(5, 300, (2, 10))
    idx[:, 0] = 1
    padded = torch.cat([idx, torch.zeros(2, 6, dtype=torch.long)], dim=1)  # (2, 16), pad_id 0
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(padded)  # mask inferred from idx != pad_id
        c, _ = model(padded, attention_mask=(padded != 0).long())
    if cls == "mlm":
        b, c = b[:, :10], c[:, :10]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the mask matters: attending to the padding changes the outputs
        d, _ = model(padded, attention_mask=torch.ones_like(padded))
    assert not torch.allclose(a, d[:, :10] if cls == "mlm" else d, atol=1e-3)


def test_presets_and_latency():
    names = BertConfig.presets()
    for n in ["bert6", "bert1", "tiny", "bert1-cl2-d64-3x3-h8", "bert1-cl2-d64-3x3-h12", "bert1-h24",
              "bert1-cl2-d64-16x3-h12", "bert1-cl3-d32-3x3-h12", "bert1-cl1-d64-3x3-h12"]:
        assert n in names
    assert BertConfig.preset("bert6").latency_layers == 25
    assert BertConfig.preset("bert1-cl2-d64-3x3-h12").latency_layers == 7
    assert BertConfig.preset("bert6").hidden == 768 and BertConfig.preset("tiny").hidden == 128
    assert BertConfig.preset("bert1-h24").hidden == 1536
    c = BertConfig.preset("bert1-cl2-d64-16x3-h12")
    assert (c.n_layer, c.n_head, c.n_conv, c.conv_channels, c.conv_kernel) == (1, 12, 2, 64, (16, 3))
    c = BertConfig.preset("bert1-cl3-d32-3x3-h12", vocab_size=100)
    assert (c.n_conv, c.conv_channels, c.vocab_size) == (3, 32, 100)
    assert BertConfig.from_dict(c.to_dict()) == c


def test_config_errors():
    with pytest.raises(UserError, match="bert6"):  # the message lists the valid names
        BertConfig.preset("bert7")
    with pytest.raises(UserError, match="n_layer"):
        BertConfig.preset("tiny", n_layers=3)
    with pytest.raises(UserError):
        BertConfig.from_dict({**BertConfig().to_dict(), "hidden_size": 768})
    with pytest.raises(UserError):
        BertConfig.preset("tiny", n_head="2")
    with pytest.raises(UserError, match="--kernels 'cuda'"):  # validated once, where the Impl is made
        BertForMLM(BertConfig.preset("tiny", vocab_size=50), impl=Impl("cuda"))
    with pytest.raises(UserError, match="--unpad"):
        Impl(unpad="yes")


def test_classifier_loads_pretrained_trunk():
    torch.manual_seed(0)
    cfg = BertConfig.preset("bert1-cl1-d64-3x3-h12", vocab_size=100, n_head=2, head_dim=16, conv_channels=4)
    mlm = BertForMLM(cfg)
    clf = BertForClassification(cfg, n_labels=4)
    clf.bert.load_state_dict(mlm.bert.state_dict())  # strict: the trunks have the same keys
    for k, v in mlm.bert.state_dict().items():
        assert torch.equal(clf.bert.state_dict()[k], v)
    mlm.eval(), clf.eval()
    idx = torch.randint(1, 100, (2, 8))
    torch.testing.assert_close(clf.bert(idx), mlm.bert(idx))
    counts, loss = clf(idx, targets=torch.tensor([0, 3]))
    assert clf(idx)[0].shape == (2, 4) and counts.shape == (1, 3) and loss.ndim == 0


def test_init_and_param_count():
    torch.manual_seed(0)
    cfg = BertConfig.preset("tiny", vocab_size=1000)
    model = BertForMLM(cfg)
    emb = model.bert.embeddings.word.weight
    assert torch.all(emb[cfg.pad_id] == 0) and abs(emb.std().item() - cfg.init_std) < 2e-3
    assert torch.all(model.bert.encoder.blocks[0].attn.qkv.bias == 0)
    H, V, L = cfg.hidden, cfg.vocab_size, cfg.n_layer
    block = 4 * H * H + 4 * H + 2 * (4 * H * H) + 4 * H + H + 4 * H  # attn, 2 LN, MLP
    want = (V + cfg.max_pos + cfg.type_vocab) * H + 2 * H + L * block + (H * H + H + 2 * H + V)
    assert model.num_params() == want  # the tied decoder weight is counted once
    assert "head.decoder.weight" not in model.state_dict()


@pytest.mark.parametrize("train", [False, True])
def test_triton_kernels_match_torch_path(train):
    pytest.importorskip("triton")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    device = "cuda" if torch.cuda.is_available() and not interpreted else "cpu"
    if device == "cpu" and not interpreted:
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    torch.manual_seed(0)
    # no dropout: the two paths draw different dropout masks; BatchNorm still uses batch stats in train
    cfg = BertConfig(n_layer=1, n_head=2, head_dim=16, vocab_size=60, max_pos=16, n_conv=1, conv_channels=4,
                     dropout=0.0, attn_dropout=0.0)
    model = BertForClassification(cfg, 3).to(device).train(train)
    triton = BertForClassification(cfg, 3, impl=Impl("triton")).to(device).train(train)
    triton.load_state_dict(model.state_dict())  # the same weights, on the Triton kernels
    idx = torch.randint(1, 60, (2, 12), device=device)
    idx[1, 8:] = 0
    y = torch.tensor([0, 2], device=device)
    ref, ref_loss = model(idx)[0], model(idx, targets=y)[1]
    ref_loss.backward()
    ref_grad = model.bert.encoder.blocks[0].attn.qkv.weight.grad.clone()
    assert type(triton.bert.encoder.blocks[0].attn.attention).__name__ == "TritonAttention"
    assert triton.bert.stem.infer is not None and model.bert.stem.infer is None
    out, loss = triton(idx)[0], triton(idx, targets=y)[1]
    loss.backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(triton.bert.encoder.blocks[0].attn.qkv.weight.grad, ref_grad, atol=1e-4, rtol=1e-4)


def test_static_sparse_head_equals_dynamic():
    """slots=k gathers a fixed (B, k) set of positions; loss and logits equal the dynamic and dense heads."""
    from tinytlm.data import mask_generator, mask_tokens
    torch.manual_seed(0)
    model = BertForMLM(BertConfig.preset("tiny", n_layer=1)).eval()
    idx = torch.randint(1000, 30000, (4, 32))
    idx[:, 0], idx[:, -1] = 101, 102
    idx[0, 4:] = 0  # a short row: 2 candidates, fewer than k
    idx[0, 3] = 102
    k = 5
    inputs, targets = mask_tokens(idx, mask_generator("cpu", 0, 0), vocab_size=30522, mask_id=103,
                                  special_ids=(0, 101, 102), per_row=k)
    rows, y = mlm_rows(targets)
    _, dyn_loss = model(inputs, targets=y, rows=rows)
    dense_logits, _ = model(inputs)  # (B, T, V)
    rows_st, y_st = mlm_rows(targets, k)
    _, st_loss = model(inputs, targets=y_st, rows=rows_st)
    st_logits, _ = model(inputs, rows=rows_st)
    assert st_logits.shape == (4 * k, 30522)
    assert (y_st != -100).sum() == len(y) == 2 + 3 * k  # the short row leaves 3 slots unused
    torch.testing.assert_close(st_loss, dyn_loss)
    pos = rows_st.view(4, k) % 32  # (B, k): each slot's column in its row
    expect = dense_logits.gather(1, pos[..., None].expand(-1, -1, dense_logits.size(-1))).reshape(4 * k, -1)
    torch.testing.assert_close(st_logits, expect, atol=1e-4, rtol=1e-4)
