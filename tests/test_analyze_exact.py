"""The analysis on hand-made models and counts: APT, the confusion clusters and the SHP matrices known exactly.

The hand-made trunk is the identity on word embeddings: vocabulary 16, hidden 32, word embedding e_t = +4 at
node t and -4 at node 16 + t (mean 0, variance 1, so every LayerNorm leaves it as it is), no positions or
token types, and every block's attention and MLP output projections zero (each block: x = LN(LN(x)) = x).
"""
from collections import Counter

import numpy as np
import pytest
import torch

from tinytlm.analyze_apt import held_out_predictions, mean_over_tokens, token_counts
from tinytlm.analyze_confusion import confusion_counts, confusion_report, normalised, strong_clusters
from tinytlm.analyze_model import block_states, cls_position, mlm_head, state_names
from tinytlm.analyze_run import head_fields
from tinytlm.analyze_shp import field_matrix, label_clusters, shp_block, shp_stats
from tinytlm.data import write_shard, Shard
from tinytlm.mlm_eval import HeldOut
from tinytlm.model import BertConfig, BertForClassification, BertForMLM

V, H, A = 16, 32, 4.0
SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
C = 5  # the hand-made MLM head predicts C wherever it reads [MASK]


def identity_trunk(model):
    cfg = model.config
    with torch.no_grad():
        emb = model.bert.embeddings
        emb.word.weight.zero_()
        for t in range(1, V):
            emb.word.weight[t, t], emb.word.weight[t, V + t] = A, -A
        emb.pos.weight.zero_()
        emb.token_type.weight.zero_()
        for block in model.bert.encoder.blocks:
            for lin in (block.attn.proj, block.mlp.proj):
                lin.weight.zero_()
                lin.bias.zero_()
    assert cfg.hidden == H
    return model


def config(**kw):
    return BertConfig(n_layer=2, n_head=2, head_dim=16, vocab_size=V, max_pos=12, dropout=0.0, attn_dropout=0.0, **kw)


def hand_made_mlm():
    """Predicts its input token, and C at [MASK]: f(t) = t, f([MASK]) = C."""
    model = identity_trunk(BertForMLM(config()))
    with torch.no_grad():
        model.bert.embeddings.word.weight[SPECIAL["mask"]] = model.bert.embeddings.word.weight[C]
        model.head.dense.weight.copy_(torch.eye(H))
        model.head.dense.bias.zero_()
        model.head.bias.zero_()
        model.head.bias[SPECIAL["mask"]] = -100.0  # [MASK] ties with C in the tied decoder: never predicted
    return model.eval()


def rows(n=40, seed=0):
    """[CLS] t ... t [SEP] [PAD]..., rows of 12 with 4 to 10 tokens from 5..15."""
    g = np.random.default_rng(seed)
    out = np.zeros((n, 12), dtype=np.int64)
    for r in out:
        k = g.integers(4, 11)
        r[0], r[1:k + 1], r[k + 1] = SPECIAL["cls"], g.integers(5, V, k), SPECIAL["sep"]
    return out


def test_apt_of_a_hand_made_model_is_known_exactly(tmp_path):
    write_shard(tmp_path / "val.bin", rows(), V)
    held = HeldOut(Shard(tmp_path / "val.bin"), SPECIAL, V, batch_size=7)  # batches of 7: several, one short
    model = hand_made_mlm()
    targets, preds = held_out_predictions(model, held, torch.device("cpu"))
    chosen = held.targets != -100
    inputs = held.inputs[chosen].numpy()
    expected_pred = np.where(inputs == SPECIAL["mask"], C, inputs)  # f: [MASK] -> C, anything else -> itself
    assert np.array_equal(targets, held.targets[chosen].numpy()) and np.array_equal(preds, expected_pred)
    correct, occ = token_counts(targets, preds, V)
    for t in range(V):  # right: left unchanged, or replaced by itself, or masked when t = C
        sel = targets == t
        want = int(((inputs[sel] == t) | ((inputs[sel] == SPECIAL["mask"]) & (t == C))).sum())
        assert (correct[t], occ[t]) == (want, int(sel.sum()))
    assert correct[C] > 0.7 * occ[C] and correct[6] < 0.5 * occ[6]  # C is right when masked too
    seen = [t for t in range(V) if occ[t]]
    assert mean_over_tokens(correct, occ) == pytest.approx(np.mean([correct[t] / occ[t] for t in seen]), abs=1e-15)
    # the confusion counts are the (target, f(input)) pairs
    r, c, n = confusion_counts(targets, preds)
    assert dict(zip(zip(r.tolist(), c.tolist()), n.tolist())) == Counter(zip(targets.tolist(), expected_pred.tolist()))


def test_the_hand_made_trunk_passes_embeddings_through_every_state():
    model = hand_made_mlm()
    x = torch.from_numpy(rows(3))
    states = block_states(model, x, x != 0)
    assert state_names(model) == ["emb", "block1", "block2"] and len(states) == 3
    want = model.bert.embeddings.word.weight[x]  # (B, T, H)
    for s in states:
        assert torch.allclose(s, want, atol=1e-5)
    with torch.no_grad():  # the adapter's head is the model's own dense head
        assert torch.allclose(mlm_head(model, states[-1]), model(x)[0], atol=1e-5)


def test_the_adapter_agrees_with_the_forward_of_a_model_with_a_conv_stem():
    torch.manual_seed(0)
    model = BertForMLM(config(n_conv=1, conv_channels=4)).eval()
    x = torch.from_numpy(rows(3))
    assert state_names(model) == ["emb", "stem", "block1", "block2"]
    with torch.no_grad():
        states = block_states(model, x, x != 0)
        assert len(states) == 4 and torch.allclose(mlm_head(model, states[-1]), model(x)[0], atol=1e-5)


def test_confusion_normalisation_and_clusters_are_known_exactly():
    pairs = {(10, 10): 4, (10, 11): 2, (11, 11): 4, (11, 10): 1, (12, 12): 2, (12, 13): 1, (13, 13): 3,
             (14, 14): 1, (14, 15): 3, (15, 15): 5, (15, 14): 3, (16, 16): 2, (17, 17): 4, (17, 12): 1}
    targets = np.array([i for (i, _), n in pairs.items() for _ in range(n)])
    preds = np.array([j for (_, j), n in pairs.items() for _ in range(n)])
    order = np.random.default_rng(0).permutation(len(targets))  # the order of positions does not matter
    rows_, cols, counts = confusion_counts(targets[order], preds[order])
    kept, r, c, n, values = normalised(rows_, cols, counts)
    assert kept.tolist() == [10, 11, 12, 13, 15, 16, 17]  # 14's row maximum (3, at 15) is off the diagonal
    got = {(i, j): v for i, j, v in zip(r.tolist(), c.tolist(), values.tolist())}
    assert got == {(10, 10): 1, (10, 11): 0.5, (11, 11): 1, (11, 10): 0.25, (12, 12): 1, (12, 13): 0.5,
                   (13, 13): 1, (15, 15): 1, (16, 16): 1, (17, 17): 1, (17, 12): 0.25}  # 15 -> 14: 14 left out
    assert strong_clusters(kept, r, c, values, 0.5) == [[10, 11], [12, 13]]
    assert strong_clusters(kept, r, c, values, 0.25) == [[12, 13, 17], [10, 11]]  # largest first
    assert strong_clusters(kept, r, c, values, 0.6) == []
    summary, arrays = confusion_report(targets, preds, 0.5, words=[f"w{i}" for i in range(20)])
    assert summary["kept"] == 7 and summary["tokens"] == 8 and summary["clusters"] == 2
    assert summary["size_distribution"] == {"1": 3, "2": 2}
    assert summary["largest"] == [["w10", "w11"], ["w12", "w13"]]
    assert arrays["counts"].sum() == sum(v for (i, j), v in pairs.items() if i != 14 and j != 14)


# -----------------------------------------------------------------------------
# single-head performance

T = float(np.tanh(A))


def hand_made_classifier():
    """4 labels; label i = the token 5 + i at position 0. Pooler = identity, so pooled = tanh(e_t): +T at node t,
    -T at node 16 + t. Head 0 (nodes 0-15) recognises every label alone; head 1 (nodes 16-31) sees labels 0
    and 1 as one cluster, misses 3, and gives label 2's rows a field of 0.8 T at output 3 (noise)."""
    model = identity_trunk(BertForClassification(config(), n_labels=4))
    w = torch.zeros(4, H)
    for i in range(4):
        w[i, 5 + i] = 1.0  # head 0
    w[0, 21] = w[1, 21] = w[0, 22] = w[1, 22] = -1.0  # head 1: labels 0 and 1 (nodes 16 + 5, 16 + 6)
    w[3, 23] = -0.8  # head 1: label 2's node feeds output 3
    with torch.no_grad():
        model.head.pooler.weight.copy_(torch.eye(H))
        model.head.pooler.bias.zero_()
        model.head.out.weight.copy_(w)
        model.head.out.bias.zero_()
    return model.eval()


def test_single_head_matrices_of_a_hand_made_classifier_are_known_exactly():
    model = hand_made_classifier()
    x = torch.from_numpy(rows(24, seed=1))
    labels = np.arange(24) % 4
    x[:, 0] = torch.from_numpy(5 + labels)  # the label's token where [CLS] would be
    with torch.no_grad():
        feats = cls_position(block_states(model, x, x != 0)[-1])  # (24, H)
    res = shp_block(head_fields(model, torch.device("cpu")), feats, labels, 4, size=16, threshold=0.5, norm="column")
    h0, h1 = res["groups"]
    assert h0["nodes"] == [0, 16] and h1["nodes"] == [16, 32]
    assert np.allclose(h0["matrix"], T * np.eye(4), atol=1e-6)
    m1 = T * np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0.8], [0, 0, 0, 0]])
    assert np.allclose(h1["matrix"], m1, atol=1e-6)
    assert np.allclose(res["all_nodes"]["matrix"], T * np.eye(4) + m1, atol=1e-6)
    # head 0: column-centred T (I - 1/4), over its largest entry 3T/4: 1 on the diagonal, -1/3 off it
    assert np.allclose(h0["normalised"], (4 * np.eye(4) - 1) / 3, atol=1e-6)
    assert h0["boolean"] == np.eye(4, dtype=int).tolist() and h0["clusters"] == [[0], [1], [2], [3]]
    assert h0["noise"] == 0 and h0["snr"] == pytest.approx(3.0, abs=1e-5) and h0["accuracy"] == 1.0
    # head 1: centred columns over 0.6 T; one cluster {0, 1}; (2, 3) is the noise; SNR = (5/6) / (4/9)
    assert np.allclose(h1["normalised"], [[5 / 6, 5 / 6, 0, -1 / 3], [5 / 6, 5 / 6, 0, -1 / 3],
                                          [-5 / 6, -5 / 6, 0, 1], [-5 / 6, -5 / 6, 0, -1 / 3]], atol=1e-6)
    assert h1["clusters"] == [[0, 1]] and h1["noise"] == 1
    assert h1["signal"] == pytest.approx(5 / 6, abs=1e-6) and h1["noise_level"] == pytest.approx(4 / 9, abs=1e-6)
    assert h1["snr"] == pytest.approx(15 / 8, abs=1e-5)
    assert res["mean_snr"] == pytest.approx((3 + 15 / 8) / 2, abs=1e-5) and res["mean_noise"] == 0.5
    # single nodes (SNP): node 5 alone is head 0's label-0 node
    snp = shp_block(head_fields(model, torch.device("cpu")), feats, labels, 4, size=1)
    assert len(snp["groups"]) == H and np.allclose(snp["groups"][5]["matrix"], T * np.diag([1, 0, 0, 0]), atol=1e-6)


def test_shp_statistics_by_hand():
    m = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    s = shp_stats(m, threshold=0.5, norm="max")  # over the largest entry: diag(1, 0.5, 0)
    assert s["clusters"] == [[0], [1]] and s["noise"] == 0
    assert s["signal"] == pytest.approx(0.75) and s["noise_level"] == 0.0 and s["snr"] == float("inf")
    assert shp_stats(np.zeros((3, 3)))["snr"] == 0.0 and shp_stats(np.zeros((3, 3)))["clusters"] == []
    b = np.array([[1, 0, 1], [0, 1, 0], [0, 1, 1]], dtype=bool)  # 0-2 and 1-2 join all three
    assert label_clusters(b) == [[0, 1, 2]]
    assert label_clusters(np.array([[0, 1], [1, 0]], dtype=bool)) == []  # no label recognised, no cluster
    f = np.array([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0]])
    assert field_matrix(f, [0, 0, 1], 2).tolist() == [[2.0, 1.0], [0.0, 4.0]]
