"""trainer/export.py: an exported checkpoint loads in transformers and computes our hidden states; its model
card states the run's own figures (tests/test_pipeline_e2e.py checks them along the whole stage chain)."""

from __future__ import annotations

import json
import re

import h5py
import pytest
import torch
from click.testing import CliRunner

from mlsm.cli import cli
from mlsm.core.bert import BertConfig, Student
from mlsm.core.errors import MLSMError
from mlsm.core.hf import save_model_dir
from mlsm.trainer.export import MLM_HEAD_FILE, MLSM_HEAD_FILE, export_model, load_mlsm_head
from mlsm.trainer.model_card import CARD
from mlsm.trainer.train import run_pretrain
from tests.test_data import make_tokenizer_dir
from tests.test_train import SMALL as SMALL_RUN
from tests.test_train import _cfg, _metrics, codes_h5, one_thread, tokens_h5  # noqa: F401  (fixtures)

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


# --------------------------------------------------------------------------- the model card


def card_rows(text: str) -> dict[str, str]:
    """The card's two-column tables as {field: value}."""
    return dict(re.findall(r"^\| (.+?) \| (.+?) \|$", text, re.M))


def run_card_snippet(export_dir, monkeypatch) -> dict:
    """The card's Python block, executed as written from the export folder; returns its namespace."""
    block = re.search(r"```python\n(.*?)```", (export_dir / CARD).read_text(), re.S).group(1)
    monkeypatch.chdir(export_dir)
    ns: dict = {}
    exec(compile(block, str(export_dir / CARD), "exec"), ns)
    return ns


def load_card(export_dir):
    try:
        from huggingface_hub import ModelCard
    except ImportError:
        pytest.skip("huggingface_hub is not installed (the test extra has it); the card cannot be validated")
    return ModelCard.load(export_dir / CARD)


def test_card_states_the_runs_own_figures_and_its_snippet_runs(codes_h5, tmp_path, monkeypatch):
    run = tmp_path / "run"
    summary = run_pretrain(_cfg(codes_h5, run, steps=12, batch_size=16, lr=5e-3))
    out = tmp_path / "export"
    info = export_model(run, out, license="apache-2.0", languages=("en",))
    assert info["model_card"] == CARD and info["dictionary"] is None  # this synthetic data has no dictionary.h5
    card = load_card(out)
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.language == ["en"]
    assert {"mlsm", "masked-latent-semantic-modeling", "feature-extraction"} <= set(card.data.tags)

    rows = card_rows((out / CARD).read_text())
    doc = json.loads((run / "run.json").read_text())
    with h5py.File(codes_h5) as f:
        attrs, n_tokens = dict(f.attrs), f["tokens"].shape[0]
    assert int(rows["checkpoint step"]) == doc["config"]["steps"] == 12
    assert int(rows["batch size (sequences per step)"]) == doc["config"]["batch_size"]
    assert float(rows["peak learning rate"]) == doc["config"]["lr"]
    assert int(rows["K (dictionary atoms)"]) == attrs["K"] and int(rows["auxiliary layer"]) == attrs["layer"]
    assert float(rows["lambda (L1 penalty)"]) == pytest.approx(attrs["lambda"])
    assert int(rows["training tokens"]) == n_tokens
    # what this data does not record is said to be missing, not made up
    for field in ("auxiliary model", "solver tolerance (certified relative duality gap)", "corpus fingerprint"):
        assert rows[field] == "not recorded", field
    last = _metrics(run)[-1]
    loss, at = re.match(r"(\S+) \(step (\d+)\)", rows["loss at the logged step"]).groups()
    assert int(at) == last["step"] == 12 and float(loss) == pytest.approx(last["loss"], rel=1e-5)
    assert float(rows["context-free baseline"]) == pytest.approx(doc["context_free_baseline"]["loss"], rel=1e-5)
    assert float(rows["loss / baseline"]) == pytest.approx(summary["loss_over_baseline"], rel=1e-4)

    ns = run_card_snippet(out, monkeypatch)
    assert ns["lsp"].shape == (*ns["inputs"]["input_ids"].shape, attrs["K"])
    torch.testing.assert_close(ns["lsp"].sum(-1), torch.ones(ns["lsp"].shape[:2]))


def test_card_of_an_mlm_run_says_it_has_no_auxiliary_model(tokens_h5, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run_pretrain(_cfg(tokens_h5, run, objective="mlm", steps=3))
    out = tmp_path / "export"
    export_model(run, out)
    card = load_card(out)
    assert card.data.license == "unknown" and "masked-latent-semantic-modeling" not in card.data.tags
    assert "masked-language-modeling" in card.data.tags
    rows = card_rows((out / CARD).read_text())
    for field in ("auxiliary model", "auxiliary layer", "K (dictionary atoms)", "lambda (L1 penalty)"):
        assert rows[field] == "none: an MLM-only run has no auxiliary model", field
    ns = run_card_snippet(out, monkeypatch)
    assert "head" not in ns and ns["hidden"].shape[-1] == SMALL_RUN["hidden_size"]


def test_card_of_a_source_outside_a_run_says_its_training_is_not_recorded(tmp_path):
    _student_step_dir(tmp_path)  # a checkpoint folder with no run.json beside it
    export_model(tmp_path / "run", tmp_path / "export")
    card = load_card(tmp_path / "export")
    assert "no run.json" in card.text
    rows = card_rows(card.text)
    assert rows["peak learning rate"] == rows["context-free baseline"] == "not recorded"
    assert rows["checkpoint step"] == "10"  # the checkpoint's own config.json has it
