"""trainer/export.py: an exported checkpoint loads in transformers and computes our hidden states."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from mlsm.cli import cli
from mlsm.core.bert import BertConfig, Student
from mlsm.core.errors import MLSMError
from mlsm.core.hf import save_model_dir
from mlsm.trainer.export import MLM_HEAD_FILE, MLSM_HEAD_FILE, export_model, load_mlsm_head
from tests.test_data import make_tokenizer_dir

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=32)


def _student_step_dir(tmp_path, mlm: bool = True, num_atoms: int | None = 11):
    torch.manual_seed(0)
    student = Student(BertConfig(**SMALL), num_atoms=num_atoms, mlm=mlm).eval()
    # Non-trivial LayerNorm/bias values, so a dropped or misnamed tensor shows in the hidden states.
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tok = make_tokenizer_dir(tmp_path / "tok")
    step = tmp_path / "run" / "step-0000010"
    tensors = {**student.encoder_state_dict(), **student.head_state_dict()}
    save_model_dir(step, student.config, tensors, tok,
                   extra_json={"mlsm": {"objective": "mlsm", "num_atoms": num_atoms, "codes_layer": 4,
                                        "codes_lambda": 0.05, "step": 10}})
    return student, step


def test_export_loads_in_transformers_with_same_hidden_states(tmp_path):
    import transformers  # hard: make test installs it (the test extra); a missing one is a failure, not a skip
    student, _ = _student_step_dir(tmp_path)
    out = tmp_path / "export"
    info = export_model(tmp_path / "run", out)  # a run dir resolves to its latest step
    assert info["step"] == 10 and set(info["heads"]) == {"mlsm_head", "mlm_head"}
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                 MLSM_HEAD_FILE, MLM_HEAD_FILE):
        assert (out / name).is_file(), name

    hf = transformers.AutoModel.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "BertModel"
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, SMALL["vocab_size"], (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    types = torch.zeros_like(ids)
    types[2, 6:] = 1
    with torch.no_grad():
        ours = student.encoder(ids, mask, types, output_hidden_states=True)
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == SMALL["num_hidden_layers"] + 1
    keep = mask.bool()
    for a, b in zip(ours, theirs, strict=True):
        assert (a - b).abs()[keep].max().item() <= 1e-4

    # model.safetensors holds only BertModel names: the heads live in their own files.
    from safetensors.torch import load_file

    keys = set(load_file(str(out / "model.safetensors")))
    assert keys == set(student.encoder_state_dict())
    head = load_mlsm_head(out)
    x = torch.randn(4, SMALL["hidden_size"])
    with torch.no_grad():
        assert torch.allclose(head(x), student.mlsm_head(x), atol=1e-6)

    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("w1 w2 w3")["input_ids"][1:-1] == [tok.convert_tokens_to_ids(w) for w in ("w1", "w2", "w3")]
    assert json.loads((out / "config.json").read_text())["mlsm"]["codes_layer"] == 4


def test_export_refuses_existing_output_and_cli_reports(tmp_path):
    _student_step_dir(tmp_path, mlm=False)
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MLSMError, match="not empty"):
        export_model(tmp_path / "run", out)
    assert (out / "keep.txt").read_text() == "mine"
    res = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), "--out", str(out), "--force"])
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / MLSM_HEAD_FILE).is_file()
    assert not (out / MLM_HEAD_FILE).exists()


def test_export_of_encoder_only_dir_has_no_head(tmp_path):
    torch.manual_seed(0)
    student = Student(BertConfig(**SMALL), num_atoms=None, mlm=True)
    tok = make_tokenizer_dir(tmp_path / "tok")
    save_model_dir(tmp_path / "hf", student.config, student.encoder_state_dict(), tok)
    export_model(tmp_path / "hf", tmp_path / "export")
    with pytest.raises(MLSMError, match="no mlsm_head"):
        load_mlsm_head(tmp_path / "export")
