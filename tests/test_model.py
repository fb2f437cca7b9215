"""mlsm/core/bert.py: our BERT must reproduce HF BertModel on real weights, stop at the asked layer,
and run the heads only at masked positions."""

import pytest
import torch

from mlsm.core.bert import PRESETS, BertConfig, BertEncoder, Student
from mlsm.core.errors import MLSMError
from mlsm.core.hf import load_encoder, load_tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Héllo wörld, this is a shorter one!",
    "Tiny.",
]


def _batch(tok, sentences):
    encs = [tok.encode(s).ids for s in sentences]
    T = max(map(len, encs))
    ids = torch.zeros(len(encs), T, dtype=torch.long)
    mask = torch.zeros(len(encs), T, dtype=torch.long)
    for i, e in enumerate(encs):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask


@pytest.fixture(scope="module")
def minilm():
    enc, cfg, path = load_encoder(None)
    tok = load_tokenizer(path)
    ids, mask = _batch(tok, SENTENCES)
    assert (mask == 0).any(), "the batch must contain padding to test the mask"
    return enc, cfg, path, ids, mask


def test_hidden_states_match_transformers_every_layer(minilm):
    import transformers  # hard: make test installs it (the test extra); a missing one is a failure, not a skip
    enc, cfg, path, ids, mask = minilm
    hf = transformers.BertModel.from_pretrained(str(path)).float().eval()
    with torch.no_grad():
        ours = enc(ids, mask, output_hidden_states=True)
        theirs = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == cfg.num_hidden_layers + 1 == 7
    real = mask.bool()
    for layer, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.shape == b.shape
        diff = (a - b).abs()[real].max().item()
        assert diff <= 1e-4, f"layer {layer}: max abs diff {diff}"


def test_padding_does_not_change_real_tokens(minilm):
    enc, _, _, ids, mask = minilm
    with torch.no_grad():
        batched = enc(ids, mask, output_hidden_states=True)
        for i in range(ids.shape[0]):
            n = int(mask[i].sum())
            alone = enc(ids[i : i + 1, :n], output_hidden_states=True)
            for layer, (a, b) in enumerate(zip(batched, alone, strict=True)):
                diff = (a[i, :n] - b[0]).abs().max().item()
                assert diff <= 1e-5, f"sentence {i} layer {layer}: padding changed states by {diff}"


def test_num_layers_stops_early(minilm):
    enc, cfg, _, ids, mask = minilm
    calls = []
    hooks = [blk.register_forward_hook(lambda m, i, o, j=j: calls.append(j)) for j, blk in enumerate(enc.encoder.layer)]
    try:
        with torch.no_grad():
            full = enc(ids, mask, output_hidden_states=True)
            assert len(calls) == cfg.num_hidden_layers
            for k in (0, 2, cfg.num_hidden_layers):
                calls.clear()
                h = enc(ids, mask, num_layers=k)
                assert calls == list(range(k)), f"num_layers={k} ran blocks {calls}"
                assert torch.equal(h, full[k])
                calls.clear()
                states = enc(ids, mask, num_layers=k, output_hidden_states=True)
                assert len(states) == k + 1 and len(calls) == k
                assert torch.equal(states[-1], full[k])
    finally:
        for hk in hooks:
            hk.remove()
    with pytest.raises(MLSMError, match="layer 7"):
        enc(ids, mask, num_layers=7)


def _tiny_cfg(**kw):
    return BertConfig.preset("tiny", vocab_size=kw.pop("vocab_size", 100))


def test_student_heads_run_only_at_masked_positions():
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    student = Student(cfg, num_atoms=37, mlm=True).eval()
    B, T = 3, 10
    ids = torch.randint(5, cfg.vocab_size, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, 6:] = 0
    masked_index = torch.tensor([1, 4, 13, 25])
    seen = []
    for head in (student.mlsm_head, student.mlm_head):
        head.transform.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad():
        out = student(ids, mask, masked_index)
        assert out["mlsm_logits"].shape == (4, 37)
        assert out["mlm_logits"].shape == (4, cfg.vocab_size)
        assert seen == [4, 4], "heads must see only the gathered rows"
        h = student.encoder(ids, mask).reshape(B * T, -1)
        torch.testing.assert_close(out["mlsm_logits"], student.mlsm_head(h)[masked_index])
        torch.testing.assert_close(out["mlm_logits"], student.mlm_head(h)[masked_index])

    only_mlsm = Student(cfg, num_atoms=5, mlm=False)
    out = only_mlsm(ids, mask, torch.tensor([0]))
    assert out["mlm_logits"] is None and out["mlsm_logits"].shape == (1, 5)
    assert only_mlsm.mlm_head is None
    with pytest.raises(MLSMError):
        Student(cfg, num_atoms=None, mlm=False)


def test_tied_decoder_and_state_dicts():
    cfg = _tiny_cfg()
    student = Student(cfg, num_atoms=7, mlm=True)
    emb = student.encoder.embeddings.word_embeddings.weight
    assert student.mlm_head.decoder.weight is emb
    assert student.mlm_head.decoder.weight.data_ptr() == emb.data_ptr()
    student = student.to(torch.float64)
    assert student.mlm_head.decoder.weight.data_ptr() == student.encoder.embeddings.word_embeddings.weight.data_ptr()

    heads = student.head_state_dict()
    assert "mlm_head.decoder.weight" not in heads
    assert {"mlm_head.bias", "mlm_head.transform.dense.weight", "mlm_head.transform.LayerNorm.weight",
            "mlsm_head.decoder.weight", "mlsm_head.decoder.bias", "mlsm_head.transform.dense.bias"} <= set(heads)
    assert all(k.startswith(("mlsm_head.", "mlm_head.")) for k in heads)
    enc = student.encoder_state_dict()
    assert "embeddings.word_embeddings.weight" in enc
    assert "encoder.layer.1.attention.self.query.weight" in enc
    assert not any(k.startswith(("pooler.", "mlm_head.", "mlsm_head.")) for k in enc)


def test_parameter_names_match_transformers_bertmodel():
    import transformers  # hard: make test installs it (the test extra); a missing one is a failure, not a skip
    cfg = _tiny_cfg()
    hf = transformers.BertModel(transformers.BertConfig(**cfg.to_hf()))
    theirs = {k: v.shape for k, v in hf.state_dict().items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    ours = {k: v.shape for k, v in BertEncoder(cfg).state_dict().items()}
    assert ours == theirs


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_have_the_right_sizes(name):
    sizes = {"tiny": (2, 128, 2, 512), "mini": (4, 256, 4, 1024), "small": (4, 512, 8, 2048),
             "medium": (8, 512, 8, 2048), "base": (12, 768, 12, 3072)}[name]
    cfg = BertConfig.preset(name, vocab_size=1000)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == sizes
    assert cfg.vocab_size == 1000
    with torch.device("meta"):  # shapes only: no time spent on random init
        enc = BertEncoder(cfg)
    L, H, _, I = sizes
    assert len(enc.encoder.layer) == L
    assert enc.embeddings.word_embeddings.weight.shape == (1000, H)
    assert enc.encoder.layer[-1].intermediate.dense.weight.shape == (I, H)
    assert enc.encoder.layer[0].attention.self.num_heads == sizes[2]


def test_preset_and_config_errors():
    with pytest.raises(MLSMError, match="unknown model preset"):
        BertConfig.preset("huge", 100)
    with pytest.raises(MLSMError, match="hidden_act"):
        BertConfig.from_hf({"hidden_act": "relu"})
    with pytest.raises(MLSMError, match="position_embedding_type"):
        BertConfig.from_hf({"position_embedding_type": "relative_key"})
    with pytest.raises(MLSMError, match="model_type"):
        BertConfig.from_hf({"model_type": "roberta"})
    with pytest.raises(MLSMError, match="divisible"):
        BertConfig(hidden_size=100, num_attention_heads=3)


def test_config_hf_roundtrip():
    cfg = BertConfig.preset("mini", vocab_size=321)
    d = cfg.to_hf()
    assert d["model_type"] == "bert" and d["architectures"] == ["BertModel"] and d["hidden_act"] == "gelu"
    assert BertConfig.from_hf(d) == cfg


def test_init_like_bert():
    torch.manual_seed(0)
    cfg = BertConfig.preset("mini", vocab_size=2000)
    s = Student(cfg, num_atoms=300, mlm=True)
    w = s.encoder.encoder.layer[0].intermediate.dense.weight
    assert abs(w.std().item() - cfg.initializer_range) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.all(s.encoder.embeddings.word_embeddings.weight[cfg.pad_token_id] == 0)
    ln = s.encoder.encoder.layer[1].output.LayerNorm
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    assert torch.all(s.encoder.encoder.layer[1].attention.self.key.bias == 0)
    assert torch.all(s.mlsm_head.decoder.bias == 0) and torch.all(s.mlm_head.bias == 0)
    assert abs(s.mlsm_head.decoder.weight.std().item() - cfg.initializer_range) < 0.002


def test_bf16_autocast_and_all_pad_rows():
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    student = Student(cfg, num_atoms=11, mlm=True)
    ids = torch.randint(5, cfg.vocab_size, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1] = 0  # a row with no real token must not poison the batch with NaN
    idx = torch.tensor([0, 3, 9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = student(ids, mask, idx)
    assert out["mlsm_logits"].dtype == torch.bfloat16
    loss = out["mlsm_logits"].float().logsumexp(-1).sum() + out["mlm_logits"].float().logsumexp(-1).sum()
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
