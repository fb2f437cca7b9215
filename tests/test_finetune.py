"""trainer/finetune.py + trainer/scores.py: exact metrics, task formats, and learning on toy tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mlsm.cli import cli
from mlsm.core.bert import BertConfig, Student
from mlsm.core.config import FinetuneConfig
from mlsm.core.errors import MLSMError
from mlsm.core.hf import save_model_dir
from mlsm.trainer.export import export_model
from mlsm.trainer.finetune import load_task, markdown_table, read_classification, run_finetune
from mlsm.trainer.scores import accuracy, macro_f1, mcc, mean_std, scores
from tests.test_train import one_thread  # noqa: F401  (autouse: tiny models on one thread)

N_WORDS = 45  # words w0..w44 in 5 topics of 9
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SMALL = dict(vocab_size=len(SPECIALS) + N_WORDS, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64, max_position_embeddings=64)


def _tokenizer_dir(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(N_WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.add_special_tokens(SPECIALS)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    student = Student(BertConfig(**SMALL), num_atoms=7, mlm=False)
    step = root / "run" / "step-0000005"
    save_model_dir(step, student.config, {**student.encoder_state_dict(), **student.head_state_dict()},
                   _tokenizer_dir(root / "tok"), extra_json={"mlsm": {"objective": "mlsm", "step": 5}})
    return step


def _topic_sentence(rng, topic: int, n: int) -> list[str]:
    return [f"w{9 * topic + int(i)}" for i in rng.integers(9, size=n)]


def _write_topic_task(folder, n_train=240, n_eval=60, classes=3, seed=0):
    """Sentences whose words all come from one topic; the label is the topic."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_eval), ("test", n_eval)):
        with open(folder / f"{split}.tsv", "w") as f:
            f.write("sentence\tlabel\n")
            for _ in range(n):
                t = int(rng.integers(classes))
                f.write(" ".join(_topic_sentence(rng, t, int(rng.integers(3, 10)))) + f"\tt{t}\n")
    return folder


def _write_token_task(folder, n_train=150, n_eval=40, seed=0):
    """Tag of a word = parity of its index; every 4th token is unlabelled (`_`)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_eval), ("test", n_eval)):
        with open(folder / f"{split}.conll", "w") as f:
            for _ in range(n):
                for j, w in enumerate(rng.integers(N_WORDS, size=int(rng.integers(3, 12)))):
                    tag = "_" if j % 4 == 3 else ("EVEN" if w % 2 == 0 else "ODD")
                    f.write(f"w{w}\t{tag}\n")
                f.write("\n")
    return folder


# --------------------------------------------------------------------------- metrics


def test_metrics_match_hand_computed_values():
    gold, pred = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    assert accuracy(gold, pred) == pytest.approx(4 / 6)
    # F1: class 0 = 2*1/(2+2), class 1 = 2*2/(2+3), class 2 = 2*1/(2+1)
    assert macro_f1(gold, pred, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert macro_f1([0, 0], [0, 0], 4) == pytest.approx(1.0)  # absent classes do not count
    # tp=2 fn=1 tn=3 fp=1: (2*3 - 1*1) / sqrt(3*3*4*4) = 5/12
    assert mcc([1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1, 0]) == pytest.approx(5 / 12)
    assert mcc([1, 0, 1, 0], [1, 1, 1, 1]) == 0.0  # an empty margin
    assert set(scores([0, 1], [0, 1], 2)) == {"accuracy", "macro_f1", "mcc"}
    assert "mcc" not in scores([0, 1], [0, 1], 3)
    m, s = mean_std([0.5, 0.7, 0.9])
    assert (m, s) == (pytest.approx(0.7), pytest.approx(0.2))


# --------------------------------------------------------------------------- formats


def test_glue_style_tsv_pairs_jsonl_and_csv(tmp_path):
    p = tmp_path / "train.tsv"
    p.write_text('index\tsentence1\tsentence2\tlabel\n0\tHe said "hi\tto "them"\tentailment\n1\ta\tb\tneutral\n')
    assert read_classification(p) == [('He said "hi', 'to "them"', "entailment"), ("a", "b", "neutral")]
    (tmp_path / "test.tsv").write_text("index\tsentence1\tsentence2\n0\tx\ty\n")  # GLUE test: no labels
    (tmp_path / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tx\ty\tneutral\n")
    task = load_task(tmp_path)
    assert task.kind == "sequence" and set(task.splits) == {"train", "dev"} and task.labels == ["entailment", "neutral"]

    j = tmp_path / "j" / "train.jsonl"
    j.parent.mkdir()
    j.write_text(json.dumps({"text": "good movie", "label": 1}) + "\n" + json.dumps({"text": "bad", "label": 0}) + "\n")
    assert read_classification(j) == [("good movie", None, "1"), ("bad", None, "0")]
    c = tmp_path / "c.csv"
    c.write_text('review,stars\n"fine, really",5\n')
    assert read_classification(c, text_cols=("review",), label_col="stars") == [("fine, really", None, "5")]
    with pytest.raises(MLSMError, match="--text-cols"):
        read_classification(_write(tmp_path / "odd.tsv", "foo\tbar\n1\t2\n"))


def _write(path, text):
    path.write_text(text)
    return path


def test_conll_task_and_bad_inputs(tmp_path):
    task = load_task(_write_token_task(tmp_path / "tok", n_train=5, n_eval=2))
    assert task.kind == "token" and task.labels == ["EVEN", "ODD"]
    words, tags = task.splits["train"][0]
    assert len(words) == len(tags) and tags[3:4] in ([], ["_"])
    with pytest.raises(MLSMError, match="no train file"):
        load_task(tmp_path)
    with pytest.raises(MLSMError, match="not a folder"):
        load_task(tmp_path / "missing")


# --------------------------------------------------------------------------- learning


def test_sequence_task_learns_well_above_chance(tmp_path, model_dir):
    task = _write_topic_task(tmp_path / "topics")
    res = run_finetune(FinetuneConfig(model=str(model_dir), task=task, out_dir=tmp_path / "out", seeds=2,
                                      epochs=4, lr=3e-3, batch=16, device="cpu", progress=False))
    acc = res["summary"]["test"]["accuracy"]
    assert acc["mean"] > 0.8  # chance is 1/3
    assert len(res["seeds"]) == 2 and res["seeds"][0]["test"]["n"] == 60
    assert res["seeds"][0]["train_loss_last"] < res["seeds"][0]["train_loss_first"]
    assert acc["std"] == pytest.approx(np.std([s["test"]["accuracy"] for s in res["seeds"]], ddof=1))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["summary"] == res["summary"] and saved["model_step"] == 5
    assert "| run/step-0000005 | topics | test | 2 |" in (tmp_path / "out" / "results.md").read_text()


def test_token_task_learns_and_ignores_unlabelled(tmp_path, model_dir):
    task = _write_token_task(tmp_path / "parity")
    res = run_finetune(FinetuneConfig(model=str(model_dir), task=task, seeds=1, epochs=5, lr=3e-3, batch=16,
                                      device="cpu", progress=False))
    n_labelled = sum(1 for line in (task / "test.conll").read_text().splitlines()
                     if line and not line.endswith("\t_"))
    assert res["seeds"][0]["test"]["n"] == n_labelled
    assert res["summary"]["test"]["accuracy"]["mean"] > 0.9  # chance is 1/2
    assert "mcc" in res["summary"]["test"]  # binary task


def test_exported_dir_fine_tunes_identically(tmp_path, model_dir):
    task = _write_topic_task(tmp_path / "topics", n_train=48, n_eval=16)
    export_model(model_dir, tmp_path / "hf")
    args = dict(task=task, seeds=1, epochs=1, lr=1e-3, batch=16, device="cpu", progress=False)
    a = run_finetune(FinetuneConfig(model=str(model_dir), **args))
    b = run_finetune(FinetuneConfig(model=str(tmp_path / "hf"), **args))
    assert a["seeds"][0]["train_loss_last"] == b["seeds"][0]["train_loss_last"]
    assert a["summary"] == b["summary"]
    assert (a["model_name"], b["model_name"]) == ("run/step-0000005", "hf")


def test_cli_runs_and_rejects_bad_settings(tmp_path, model_dir):
    task = _write_topic_task(tmp_path / "topics", n_train=32, n_eval=8)
    out = tmp_path / "ft"
    res = CliRunner().invoke(cli, ["finetune", "--model", str(model_dir), "--task", str(task), "--seeds", "1",
                                   "--epochs", "1", "--out", str(out), "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (out / "topics" / "results.json").is_file() and (out / "results.md").is_file()
    assert "topics" in markdown_table([json.loads((out / "topics" / "results.json").read_text())])
    with pytest.raises(MLSMError, match="seeds must be"):
        run_finetune(FinetuneConfig(model=str(model_dir), task=task, seeds=0))
