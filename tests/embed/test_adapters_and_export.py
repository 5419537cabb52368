"""Adapters on a frozen encoder, their exact merge into a plain HF encoder, what reaches the optimizer, and the
export that sentence-transformers loads with the stage's pooling and korch's own embeddings."""

from __future__ import annotations

import json

import pytest
import torch
from toy_tokenizer import toy_tokenizer
from transformers import AutoModel, BertConfig

from korch.config import ModelConfig
from korch.eval.embed import cosine_rows, encode, evaluate_folder, idf_weights, load_encoder, load_token_weights
from korch.models.adapters import AdaptedLinear, adapter_state, add_adapters, merge_adapters
from korch.models.encoder import encoder_from_config
from korch.tasks.adapter import AdapterOptions, AdapterTask

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "비가", "온다", "고양이", "잔다", "##가", "남자", "노래", "한다", "."]
TEXTS = ["비가 온다 .", "고양이 잔다", "남자 노래 한다 .", "비가 잔다"]


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer(VOCAB)


def _tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return encoder_from_config(BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, intermediate_size=48, max_position_embeddings=64))


def _hidden(net, tokenizer):
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        return net.eval()(**batch).last_hidden_state


def _perturb_adapters(net):
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".adapters." in name:
                p.add_(0.2 * torch.randn_like(p))


@pytest.mark.parametrize("sizes", [[8], [4, 8]], ids=["bottleneck", "hierarchical"])
def test_adapters_freeze_the_base_and_merge_exactly(tokenizer, sizes):
    net = _tiny_encoder()
    before = _hidden(net, tokenizer)
    add_adapters(net, sizes)
    assert torch.allclose(_hidden(net, tokenizer), before, atol=1e-6)  # zero-initialised up projections: identity
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters." in n for n in trainable)
    assert len(adapter_state(net)) == 4 * len(sizes) * 2  # (down, up) x (weight, bias) per adapter, 2 layers
    _perturb_adapters(net)
    adapted = _hidden(net, tokenizer)
    assert not torch.allclose(adapted, before, atol=1e-3)
    merged = merge_adapters(net)
    assert not any(isinstance(m, AdaptedLinear) for m in merged.modules())
    torch.testing.assert_close(_hidden(merged, tokenizer), adapted, rtol=1e-4, atol=1e-5)


def test_only_adapter_parameters_reach_the_optimizer(tokenizer):
    task = AdapterTask(AdapterOptions(kind="hierarchical", r=8, language_r=4), ModelConfig(), tokenizer, 32,
                       {"hard_negatives": 0})
    net = add_adapters(_tiny_encoder(), task.options.sizes)
    # The loop's parameter groups (korch.train.loop): trainable parameters only.
    groups = [[p for p in net.parameters() if p.ndim > 1 and p.requires_grad],
              [p for p in net.parameters() if p.ndim <= 1 and p.requires_grad]]
    optimizer = torch.optim.AdamW([{"params": g} for g in groups], lr=1e-3)
    batch = task.collate({"input_ids": [[2, 5, 6, 3], [2, 7, 8, 3]], "positive_ids": [[2, 5, 8, 3], [2, 7, 3]],
                          "negative_ids": [[], []], "score": [0.0, 0.0]}, torch.Generator())
    task.loss(net, batch).backward()
    optimizer.step()
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.ndim)
    adapter_params = sum(t.numel() for t in adapter_state(net).values())
    assert state_bytes == 2 * 4 * adapter_params  # Adam's two fp32 moments, for adapter weights only
    assert adapter_params == 2 * ((32 * 4 + 4 + 4 * 32 + 32) + (32 * 8 + 8 + 8 * 32 + 32))


@pytest.mark.parametrize("pooling", ["cls", "mean", "idf"])
def test_export_loads_in_sentence_transformers_with_korchs_embeddings(tokenizer, tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    ids = tokenizer(TEXTS)["input_ids"]
    info = {"token_weights": idf_weights(ids, len(VOCAB))} if pooling == "idf" else {}
    task = AdapterTask(AdapterOptions(r=8, pooling=pooling), ModelConfig(), tokenizer, 32, info)
    net = add_adapters(_tiny_encoder(), [8])
    _perturb_adapters(net)
    adapted = _hidden(net, tokenizer)
    folder = tmp_path / "final"
    folder.mkdir()
    task.save(net, str(folder))
    assert (folder / "adapter.safetensors").exists()
    plain = AutoModel.from_pretrained(folder)  # a plain BertModel: no adapter code needed
    assert type(plain).__name__ == "BertModel"
    torch.testing.assert_close(_hidden(plain, tokenizer), adapted, rtol=1e-4, atol=1e-5)
    model, tok, folder_pooling, max_length = load_encoder(str(folder))
    assert folder_pooling == pooling and max_length == 32
    assert model.pooler is None  # the export has none; a freshly built one would be random and reported missing
    weights = load_token_weights(str(folder))
    assert (weights is None) == (pooling != "idf")
    ours = encode(model, tok, TEXTS, folder_pooling, max_length, token_weights=weights)
    # korch's training-time pooling (the task's `embed`) is the exported one
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(task.embed(AutoModel.from_pretrained(folder).eval(), batch["input_ids"],
                                              batch["attention_mask"]), ours, rtol=1e-4, atol=1e-5)
    theirs = torch.as_tensor(SentenceTransformer(str(folder), device="cpu").encode(TEXTS))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("score\tsentence1\tsentence2\n" + "".join(
        f"{s}\t{a}\t{b}\n" for s, a, b in [(5, TEXTS[0], TEXTS[0]), (4.2, TEXTS[0], TEXTS[3]), (0.5, TEXTS[1], TEXTS[2]),
                                           (1.0, TEXTS[2], TEXTS[3])]))
    result = evaluate_folder(str(folder), str(pairs))
    assert result["sim_mean"] == pytest.approx(sum(cosine_rows(ours[[0, 0]], ours[[0, 3]])) / 2, abs=1e-5)
    pooling_dir = "2_Pooling" if pooling == "idf" else "1_Pooling"
    assert set(json.loads((folder / pooling_dir / "config.json").read_text())) >= {"pooling_mode_mean_tokens"}


def test_idf_stage_data_carries_weights_of_its_own_sentences(tokenizer, tmp_path):
    from types import SimpleNamespace

    from korch.tasks.simcse import SimcseOptions, SimcseTask, prepare_pairs

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("score\tsentence1\tsentence2\n4.5\t비가 온다 .\t비가 잔다\n1.0\t고양이 잔다\t남자 노래 한다 .\n"
                     "4.0\t비가 온다 .\t비가 온다\n")
    tokenizer.save_pretrained(tmp_path / "tok")
    stage = SimpleNamespace(data=SimpleNamespace(inputs=[str(pairs)], seq_len=16), train=SimpleNamespace(seed=1))
    options = SimcseOptions(mode="supervised", loss="cosent", pooling="idf")
    manifest = prepare_pairs(stage, str(tmp_path / "tok"), str(tmp_path / "data"), options)
    info = SimcseTask.data_info(manifest, options)
    # 5 distinct sentences ("비가 온다 ." appears in two pairs, counted once): 비가 in 3, 잔다 in 2, 고양이 in 1
    expected = idf_weights(tokenizer(["비가 온다 .", "비가 잔다", "고양이 잔다", "남자 노래 한다 .", "비가 온다"])["input_ids"],
                           len(VOCAB))
    assert info["token_weights"] == pytest.approx(expected, abs=1e-6)
    vocab = tokenizer.get_vocab()
    assert info["token_weights"][vocab["고양이"]] > info["token_weights"][vocab["잔다"]] > info["token_weights"][vocab["비가"]]
    mean_manifest = prepare_pairs(stage, str(tmp_path / "tok"), str(tmp_path / "mean"), SimcseOptions(pooling="mean"))
    assert "token_weights" not in SimcseTask.data_info(mean_manifest, SimcseOptions())
