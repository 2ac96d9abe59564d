"""--init hf:DIR: a Hugging Face BERT checkpoint folder fine-tunes like a train_mlm checkpoint."""
import pytest
import torch

from tinytlm import finetune
from tinytlm.hf import from_hf_state_dict, hf_init_state, load_hf_dir

transformers = pytest.importorskip("transformers")


@pytest.fixture()
def hf_dir(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=256,
                                  max_position_embeddings=128, vocab_size=30522)
    model = transformers.BertForMaskedLM(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


def test_load_hf_dir_gives_the_same_logits(hf_dir):
    path, hf = hf_dir
    config, sd = load_hf_dir(path)
    ours = from_hf_state_dict(sd, config).eval()
    x = torch.randint(1000, 30000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_old_key_spellings_and_bare_bert_model(hf_dir, tmp_path):
    path, hf = hf_dir
    _, sd = load_hf_dir(path)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((path / "config.json").read_text())
    # a bare BertModel checkpoint with the pre-2019 LayerNorm names and a position_ids buffer
    renamed = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}
    bare = {}
    for k, v in sd.items():
        if k.startswith("bert."):
            k = k[len("bert."):]
            for today, then in renamed.items():
                k = k.replace(today, then)
            bare[k] = v
    bare["embeddings.position_ids"] = torch.arange(128)[None]
    torch.save(bare, old / "pytorch_model.bin")
    a, b = hf_init_state(path), hf_init_state(old)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_finetune_from_hf_dir(hf_dir, roots, tmp_path):
    path, _ = hf_dir
    raw, data = roots
    r = finetune.main(["--task", "agnews", "--train-per-label", "4", "--test-per-label", "3", "--epochs", "1",
                        "--raw", str(raw), "--data", str(data), "--device", "cpu", "--init", f"hf:{path}",
                        "--out", str(tmp_path / "cls")])
    assert r["arm"] == "pretrained" and r["init"] == f"hf:{path}" and r["token_stats"] is None
    assert r["model_config"]["n_layer"] == 1 and r["model_config"]["n_head"] == 2
