"""sparse-code's flags for the reference implementation's behaviour (docs/reference-differences.md):
--dict-specials (the dictionary sample's [CLS]/[SEP]) and --solver fista (the tokens' coder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mlsm.core import hf
from mlsm.core.config import SparseCodeConfig
from mlsm.core.errors import MLSMError
from mlsm.pipeline import sparse_code
from mlsm.pipeline.solvers import nn_lasso
from mlsm.pipeline.token_stream import TokenStream
from tests.fault_kit import cli, make_tiny_aux, write_corpus
from tests.test_fused import CODE, FORWARD  # the fused tests' forward and coding settings


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A token stream, the extract of it, and its default (exact, no specials) codes."""
    root = tmp_path_factory.mktemp("reference-flags")
    aux = make_tiny_aux(root / "aux")
    corpus = write_corpus(root / "corpus.txt", docs=30)
    assert cli(["tokenize", "--corpus", corpus, "--tokenizer-from", aux, "--max-tokens", "1500",
                "--out", root / "tokens", "--no-progress"]) == 0
    assert cli(["extract", "--aux", aux, "--layers", "2", *FORWARD, "--no-progress", "--tokens", root / "tokens",
                "--out", root / "extract"]) == 0
    assert cli(["sparse-code", *CODE, "--extract-dir", root / "extract", "--out", root / "exact"]) == 0
    special = hf.special_token_ids(hf.load_tokenizer(aux))
    stream = TokenStream(root / "tokens")
    tokens = np.concatenate(stream.sequences(0, len(stream.seq_lengths)))
    return dict(root=root, aux=aux, special={special["cls"], special["sep"]}, tokens=tokens)


class _Recording:
    """A source that hands over the states of the rows the dictionary sample asks for, and keeps the rows."""

    def __init__(self, source):
        self.source, self.rows = source, []

    def seq_lengths(self):
        return self.source.seq_lengths()

    def sample_states(self, rows):
        self.rows.append(rows)
        return self.source.sample_states(rows)

    def __getattr__(self, name):  # sample_tokens, special
        return getattr(self.source, name)


def _sampled_token_ids(kit, source_cls, **cfg) -> np.ndarray:
    root = kit["root"]
    where = dict(from_tokens=root / "tokens", aux=str(kit["aux"])) if source_cls.__name__ == "FusedSource" \
        else dict(extract_dir=root / "extract")
    c = SparseCodeConfig(out=root / "unused", layer=2, dict_samples=600, heldout=60, progress=False,
                         shard_tokens=300, batch_tokens=128, **where, **cfg)
    rec = _Recording(source_cls(c))
    train_vec, held_vec = sparse_code.dictionary_vectors(rec, c)
    rows = np.concatenate(rec.rows)
    assert len(rows) == len(train_vec) + len(held_vec) > 100
    return kit["tokens"][rows]


@pytest.mark.parametrize("path", ["staged", "fused"])
def test_the_dictionary_sample_leaves_out_cls_and_sep_unless_dict_specials(kit, path):
    from mlsm.pipeline.fused import FusedSource

    source_cls = FusedSource if path == "fused" else sparse_code.StagedSource
    special = np.asarray(sorted(kit["special"]))
    default = _sampled_token_ids(kit, source_cls)
    assert not np.isin(default, special).any()
    with_specials = _sampled_token_ids(kit, source_cls, dict_specials=True)
    assert np.isin(with_specials, special).sum() > 0


def test_dictionary_sample_positions_without_specials_are_the_inner_rows():
    lengths = np.array([5, 3, 7, 4] * 50)
    offs = np.concatenate([[0], np.cumsum(lengths)])
    held, trn = sparse_code.dictionary_sample(lengths, 200, 50, seed=0, specials=False)
    rows = np.concatenate([held, trn])
    seq = np.searchsorted(offs, rows, side="right") - 1
    assert len(rows) == 250 and len(np.unique(rows)) == 250
    assert ((rows > offs[seq]) & (rows < offs[seq + 1] - 1)).all()  # never a sequence's first or last row
    held2, trn2 = sparse_code.dictionary_sample(lengths, 200, 50, seed=0, specials=True)
    rows2 = np.concatenate([held2, trn2])
    seq2 = np.searchsorted(offs, rows2, side="right") - 1
    assert ((rows2 == offs[seq2]) | (rows2 == offs[seq2 + 1] - 1)).any()


class _Spelled:
    """Sequences of 10 tokens whose rows 4 and 5 are a [SEP] and a [CLS] spelled out in the text."""

    special = {"cls": 101, "sep": 102}

    def __init__(self, n_seq=300):
        self.tokens = np.tile(np.array([101, 7, 8, 9, 102, 101, 10, 11, 12, 102]), n_seq)
        self.lengths, self.rows = np.full(n_seq, 10), []

    def seq_lengths(self):
        return self.lengths

    def sample_tokens(self, rows):
        return self.tokens[rows]

    def sample_states(self, rows):
        self.rows.append(rows)
        return np.random.default_rng(0).standard_normal((len(rows), 4)).astype(np.float16) + 1


def test_a_cls_or_sep_spelled_out_inside_a_sequence_is_left_out_too():
    for specials, expect_inner in ((False, False), (True, True)):
        src = _Spelled()
        cfg = SparseCodeConfig(dict_samples=1500, heldout=100, dict_specials=specials, dict_per_sequence=5.0)
        train_vec, held_vec = sparse_code.dictionary_vectors(src, cfg)
        rows = np.concatenate(src.rows)
        assert len(rows) == len(train_vec) + len(held_vec) > 500
        assert bool(np.isin(rows % 10, [4, 5]).any()) is expect_inner
        assert bool(np.isin(rows % 10, [0, 9]).any()) is expect_inner
    # without them the sample is the draw minus the spelled-out ones, nothing else is dropped
    held, trn = sparse_code.dictionary_sample(src.lengths, 1500, 100, 0, 5.0, specials=False)
    kept = sparse_code._drop_specials(src, held, trn)
    assert sum(map(len, kept)) == int((~np.isin(np.concatenate([held, trn]) % 10, [4, 5])).sum())


def test_dict_specials_is_recorded_and_another_setting_is_not_reused(kit):
    out = kit["root"] / "exact"
    man = json.loads((out / "manifest.json").read_text())
    assert man["params"]["dict_specials"] is False and man["params"]["solver"] == "exact"
    assert "fista_steps" not in man["params"]
    with h5py.File(out / "dictionary.h5", "r") as f:
        assert not f.attrs["dict_specials"]
    with pytest.raises(MLSMError, match="dict_specials"):
        sparse_code.run_sparse_code(SparseCodeConfig(extract_dir=kit["root"] / "extract", out=out, layer=2, K=16,
                                                     dict_samples=600, heldout=60, batch_size=256, progress=False,
                                                     dict_specials=True))
    # The dictionary's own key holds it too: a dictionary.h5 of the other setting found in a fresh
    # folder is learnt again, one of the same setting is reused.
    with h5py.File(out / "dictionary.h5", "r") as f:
        key, D = f.attrs["params_key"], f["D"][:]
    for flags, reused in (([], True), (["--dict-specials"], False)):
        other = kit["root"] / f"copied-{len(flags)}"
        other.mkdir()
        shutil.copy(out / "dictionary.h5", other / "dictionary.h5")
        assert cli(["sparse-code", *CODE, *flags, "--extract-dir", kit["root"] / "extract", "--out", other,
                    "--dictionary-only"]) == 0
        with h5py.File(other / "dictionary.h5", "r") as f:
            assert (f.attrs["params_key"] == key) is reused and bool(f.attrs["dict_specials"]) is not reused
            assert np.array_equal(f["D"][:], D) is reused


# --------------------------------------------------------------------------- --solver fista


def _objective(X, D, A, lam):
    r = X - A @ D.T
    return 0.5 * (r * r).sum(1) + lam * A.sum(1)


def test_fista_codes_are_non_negative_near_the_exact_optimum_and_not_the_exact_codes():
    g = torch.Generator().manual_seed(0)
    d, K, B, lam = 48, 192, 300, 0.05
    D = torch.nn.functional.normalize(torch.randn(d, K, generator=g), dim=0)
    X = torch.nn.functional.normalize(torch.randn(B, d, generator=g) + 0.5 * torch.randn(B, 1, generator=g), dim=1)
    gram = D.T @ D
    exact = sparse_code.token_coder(SparseCodeConfig(lam=lam), D, gram)(X)
    fista = sparse_code.token_coder(SparseCodeConfig(lam=lam, solver="fista", fista_steps=100), D, gram)(X)
    assert (fista.codes >= 0).all()
    f_obj, e_obj = _objective(X, D, fista.codes, lam), _objective(X, D, exact.codes, lam)
    assert torch.allclose(fista.primal, f_obj, rtol=1e-4, atol=1e-6)  # the primal it reports is its codes'
    assert (f_obj >= e_obj * (1 - 1e-4) - 1e-6).all()  # the exact codes are optimal to tol=1e-4
    assert float(((f_obj - e_obj) / e_obj).mean()) < 1e-2  # and 100 FISTA steps come close
    assert (fista.codes - exact.codes).abs().max() > 1e-4  # the flag changes the codes
    assert (fista.rel_gap >= 0).all()
    again = nn_lasso(X, D, lam, tol=1e-4, gram=gram)
    assert torch.equal(again.codes, exact.codes)  # exact is nn_lasso, as before


def _codes(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in ("tokens", "seq_offsets", "codes/indptr", "codes/indices", "codes/values")}


def test_solver_fista_codes_both_paths_alike_and_the_manifest_says_so(kit):
    root = kit["root"]
    dictionary = ["--dictionary", root / "exact" / "dictionary.h5"]
    staged, fused = root / "fista-staged", root / "fista-fused"
    assert cli(["sparse-code", *CODE, *dictionary, "--solver", "fista", "--fista-steps", "30",
                "--extract-dir", root / "extract", "--out", staged]) == 0
    assert cli(["sparse-code", *CODE, *dictionary, "--solver", "fista", "--fista-steps", "30", *FORWARD,
                "--from-tokens", root / "tokens", "--aux", kit["aux"], "--out", fused]) == 0
    a, b, exact = _codes(staged / "codes.h5"), _codes(fused / "codes.h5"), _codes(root / "exact" / "codes.h5")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # one coder for both sources
    assert (a["codes/values"] >= 0).all()
    assert not (len(a["codes/values"]) == len(exact["codes/values"])
                and np.array_equal(a["codes/values"], exact["codes/values"]))
    for out in (staged, fused):
        man = json.loads((out / "manifest.json").read_text())
        assert man["params"]["solver"] == "fista" and man["params"]["fista_steps"] == 30
        assert man["solver"].startswith("fista_fixed: 30") and man["report"]["engine"] == "fista"
        with h5py.File(out / "codes.h5", "r") as f:
            assert f.attrs["solver"] == man["solver"] and f.attrs["fista_steps"] == 30
            assert "tolerance" not in f.attrs
    with pytest.raises(MLSMError, match="solver"):  # a folder coded by the other solver is not reused
        sparse_code.run_sparse_code(SparseCodeConfig(extract_dir=root / "extract", out=staged, layer=2, K=16,
                                                     dict_samples=600, heldout=60, batch_size=256, progress=False,
                                                     dictionary=root / "exact" / "dictionary.h5"))


def test_the_cli_offers_the_flags():
    from click.testing import CliRunner

    from mlsm.cli import cli as group

    code = CliRunner().invoke(group, ["sparse-code", "--help"]).output
    assert "--dict-specials / --no-dict-specials" in code and "--solver [exact|fista]" in code
    assert "--fista-steps" in code
