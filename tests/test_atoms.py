"""mlsm atoms (pipeline/atoms.py): the JSON's figures against a plain recomputation from dense codes,
bad input, and the page itself in a headless chromium (skipped, saying why, where there is none)."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter

import h5py
import numpy as np
import pytest
import torch

from mlsm.cli import main
from mlsm.core import hf
from mlsm.core.config import AtomsConfig
from mlsm.core.errors import MLSMError
from mlsm.core.layout import CODES, DICTIONARY, MANIFEST, TOKENIZER_DIR, dictionary_fingerprint
from mlsm.core.manifest import write_json_atomic
from mlsm.pipeline.atoms import atom_report
from mlsm.pipeline.codes import dense_to_csr, merge_parts, write_part
from mlsm.pipeline.layer_report import atom_stats

K, D_HID = 24, 16
WORDS = ["river", "bank", "money", "water", "loan", "boat", "fish", "the", "of", "and", "play", "##ing", "city",
         "music", "song", "run"]
SMALL = dict(top_tokens=3, min_count=2, contexts=3, window=4, neighbours=3, token_atoms=4, few=2, progress=False)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    """A codes folder as sparse-code writes it (parts + virtual codes.h5, dictionary.h5, tokenizer/),
    with planted structure: each word has a home atom (some share one), plus a few weak random atoms;
    some tokens have no code, and the special tokens have codes that must not be counted."""
    root = tmp_path_factory.mktemp("atoms")
    folder = root / "codes"
    model_dir = hf.resolve_model_dir(None)
    tok = hf.load_tokenizer(model_dir)
    ids = [tok.token_to_id(w) for w in WORDS]
    assert None not in ids
    special = hf.special_token_ids(tok)
    rng = np.random.default_rng(0)
    home = rng.integers(0, K - 4, len(WORDS))  # atoms K-4.. fire only weakly and at random; some may stay dead
    seqs, codes = [], []
    for _ in range(70):
        words = rng.integers(0, len(WORDS), rng.integers(6, 28))
        seq = np.r_[special["cls"], np.asarray(ids)[words], special["sep"]].astype(np.int32)
        a = np.zeros((len(seq), K), np.float32)
        a[1:-1][np.arange(len(words)), home[words]] = rng.uniform(0.3, 1.0, len(words))
        extra = rng.integers(0, K, (len(seq), 2))
        a[np.arange(len(seq))[:, None], extra] += rng.uniform(0.01, 0.2, extra.shape) * (rng.random(extra.shape) < 0.5)
        a[rng.random(len(seq)) < 0.05] = 0  # tokens without a target
        a[0, K - 1] = a[-1, K - 1] = 0.9  # [CLS], [SEP]: never masked, never counted
        seqs.append(seq), codes.append(a)
    folder.mkdir(parents=True)
    (folder / "parts").mkdir()
    parts = []
    for i, sl in enumerate((slice(0, 40), slice(40, 70))):
        tokens = np.concatenate(seqs[sl])
        counts, idx, vals = dense_to_csr(np.concatenate(codes[sl]))
        part = folder / "parts" / f"part-{i:05d}.h5"
        write_part(part, tokens, np.array([len(s) for s in seqs[sl]]), counts, idx, vals)
        parts.append(part)
    D = rng.standard_normal((D_HID, K)).astype(np.float32)
    D /= np.linalg.norm(D, axis=0)
    with h5py.File(folder / DICTIONARY, "w") as f:
        f["D"] = D
    merge_parts(parts, folder / CODES, {"K": K, "lambda": 0.05, "layer": 6, "dictionary_fingerprint":
                                        dictionary_fingerprint(D), "tokenizer_fingerprint": hf.tokenizer_fingerprint(tok)},
                copy=False)
    hf.copy_tokenizer_files(model_dir, folder / TOKENIZER_DIR)
    tokens = np.concatenate(seqs).astype(np.int64)
    offsets = np.r_[0, np.cumsum([len(s) for s in seqs])]
    return {"folder": folder, "tok": tok, "A": np.concatenate(codes), "tokens": tokens, "offsets": offsets, "D": D,
            "special": set(special[k] for k in ("cls", "sep", "pad", "mask")), "root": root}


@pytest.fixture(scope="module")
def report(fixture):
    out = fixture["root"] / "page" / "atoms.html"
    rep = atom_report(AtomsConfig(codes=fixture["folder"], out=out, **SMALL))
    return rep, out


def _counted(fx):
    return np.array([t not in fx["special"] for t in fx["tokens"]])


def test_usage_mass_and_classes_match_a_dense_recount(fixture, report):
    rep, _ = report
    keep = _counted(fixture)
    A, tokens = fixture["A"][keep], fixture["tokens"][keep]
    assert rep["meta"]["tokens_counted"] == keep.sum() and rep["meta"]["K"] == K
    assert rep["meta"]["empty_code_share"] == pytest.approx(((A > 0).sum(1) == 0).mean())
    assert rep["meta"]["nnz_per_token"] == pytest.approx((A > 0).sum(1).mean())
    mass = A.astype(np.float64).sum(0) / A.sum()
    for a in range(K):
        fired = A[:, a] > 0
        got = rep["atoms"][a]
        assert got["id"] == a and got["n"] == fired.sum()
        assert got["usage"] == pytest.approx(fired.mean(), rel=1e-3)
        assert got["mass"] == pytest.approx(mass[a], rel=1e-3, abs=1e-9)
        types = Counter(tokens[fired].tolist())
        assert got["types"] == len(types)
        if not types:
            want = "dead"
        elif max(types.values()) >= 0.5 * fired.sum():
            want = "lexical"
        elif len(types) <= SMALL["few"]:
            want = "few-type"
        else:
            want = "semantic"
        assert got["class"] == want, a
    # the summary is layer-report's measure (its dense path) on the same codes
    want = atom_stats(torch.from_numpy(A), tokens, SMALL["few"])
    for k, v in want.items():
        assert rep["summary"]["layer_report"][k] == pytest.approx(v), k
    by_class = {c["class"]: c for c in rep["summary"]["classes"]}
    assert sum(c["atoms"] for c in by_class.values()) == K
    assert by_class["lexical"]["used_share"] == pytest.approx(want["lexical_atom_share"])
    assert sum(c["mass_share"] for c in by_class.values()) == pytest.approx(1.0)


def test_top_tokens_token_index_and_neighbours_match_a_recount(fixture, report):
    rep, _ = report
    keep = _counted(fixture)
    A, tokens = fixture["A"][keep], fixture["tokens"][keep]
    vocab = rep["vocab"]
    for a in range(K):
        fired = A[:, a] > 0
        n = Counter(tokens[fired].tolist())
        w: dict[int, float] = {}
        for t, v in zip(tokens[fired].tolist(), A[fired, a].tolist(), strict=True):
            w[t] = w.get(t, 0.0) + v
        by_count = sorted(n, key=lambda t: (-n[t], t))[:SMALL["top_tokens"]]
        assert [t for t, _ in rep["atoms"][a]["by_count"]] == by_count
        assert [c for _, c in rep["atoms"][a]["by_count"]] == [n[t] for t in by_count]
        eligible = [t for t in n if n[t] >= SMALL["min_count"]]
        by_mean = sorted(eligible, key=lambda t: (-w[t] / n[t], t))[:SMALL["top_tokens"]]
        assert [t for t, *_ in rep["atoms"][a]["by_mean"]] == by_mean
        assert [m for _, m, _ in rep["atoms"][a]["by_mean"]] == pytest.approx([w[t] / n[t] for t in by_mean], rel=1e-3)
        for t in by_count + by_mean:
            assert vocab[str(t)] == fixture["tok"].id_to_token(t)
    for t in set(tokens.tolist()):
        rows = tokens == t
        per_atom = Counter(np.nonzero(A[rows] > 0)[1].tolist())
        if not per_atom:
            assert str(t) not in rep["tokens"]
            continue
        n_t, listed = rep["tokens"][str(t)]
        assert n_t == rows.sum()
        top = sorted(per_atom, key=lambda a: (-per_atom[a], a))[:SMALL["token_atoms"]]
        assert listed == [[a, per_atom[a]] for a in top]
    D = fixture["D"].astype(np.float64)
    cos = (D.T @ D) / np.outer(np.linalg.norm(D, axis=0), np.linalg.norm(D, axis=0))
    for a in range(K):
        others = sorted((j for j in range(K) if j != a), key=lambda j: -cos[a, j])[:SMALL["neighbours"]]
        assert [j for j, _ in rep["atoms"][a]["near"]] == others
        assert [s for _, s in rep["atoms"][a]["near"]] == pytest.approx([cos[a, j] for j in others], abs=2e-3)


def test_contexts_are_the_strongest_occurrences_of_distinct_types_first(fixture, report):
    rep, _ = report
    tok, tokens, A, offsets = fixture["tok"], fixture["tokens"], fixture["A"], fixture["offsets"]
    C, win = SMALL["contexts"], SMALL["window"]
    for a in range(K):
        occ = [(float(A[p, a]), p) for p in np.flatnonzero(A[:, a] > 0) if tokens[p] not in fixture["special"]]
        occ.sort(key=lambda x: (-x[0], x[1]))
        best: dict[int, tuple[float, int]] = {}
        for v, p in occ:
            best.setdefault(int(tokens[p]), (v, p))
        chosen = [p for _, p in sorted(best.values(), key=lambda x: (-x[0], x[1]))[:C]]
        chosen += [p for _, p in occ if p not in chosen][:C - len(chosen)]
        got = rep["atoms"][a]["contexts"]
        assert [c[3] for c in got] == pytest.approx([float(A[p, a]) for p in chosen], rel=1e-3)
        for (left, hit, right, _), p in zip(got, chosen, strict=True):
            s = np.searchsorted(offsets, p, side="right") - 1
            lo, hi = max(offsets[s], p - win), min(offsets[s + 1], p + win + 1)
            assert left + hit + right == tok.decode(tokens[lo:hi].tolist(), skip_special_tokens=True)
            piece = tok.id_to_token(int(tokens[p]))
            assert hit == (piece.removeprefix("##") if left else piece)  # a word piece joins the word before it
            assert not left or left.endswith(" ") != piece.startswith("##")


def test_page_is_self_contained_and_inlines_the_json_twin(report):
    rep, out = report
    page = out.read_text(encoding="utf-8")
    twin = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert twin == json.loads(json.dumps(rep))
    inline = re.search(r'<script type="application/json" id="atoms-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(inline) == twin
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "<link" not in page
    assert "@import" not in page and "fetch(" not in page


def test_a_sample_of_sequences_counts_whole_sequences(fixture, tmp_path):
    rep = atom_report(AtomsConfig(codes=fixture["folder"], out=tmp_path / "a.html", max_tokens=300, **SMALL))
    lengths = np.diff(fixture["offsets"])  # 8 or more each, [CLS] and [SEP] (not counted) included
    assert 300 - 2 * (300 // 8 + 1) <= rep["meta"]["tokens_counted"] < 300 + lengths.max()
    assert rep["meta"]["tokens_in_file"] == len(fixture["tokens"])


def _fails(cfg, match):
    with pytest.raises(MLSMError, match=match):
        atom_report(cfg)
    assert not cfg.out.exists() and not cfg.out.with_suffix(".json").exists()


def test_bad_folders_are_clear_errors_and_write_nothing(fixture, tmp_path):
    out = tmp_path / "r" / "atoms.html"
    _fails(AtomsConfig(codes=tmp_path / "nope", out=out, progress=False), "nope is not a folder")
    (tmp_path / "empty").mkdir()
    _fails(AtomsConfig(codes=tmp_path / "empty", out=out, progress=False), "codes.h5 not found")
    _fails(AtomsConfig(codes=fixture["folder"], out=tmp_path / "atoms.txt", progress=False), "HTML page")
    # an extract folder the codes were not made from
    ex = tmp_path / "extract"
    write_json_atomic(ex / MANIFEST, {"stage": "extract", "complete": True, "params": {}, "shards": []})
    _fails(AtomsConfig(codes=fixture["folder"], extract_dir=ex, out=out, progress=False), "records no extract fingerprint")
    # a copied folder whose tokenizer is another one
    other = tmp_path / "codes"
    shutil.copytree(fixture["folder"], other)
    shutil.rmtree(other / TOKENIZER_DIR)
    (other / TOKENIZER_DIR).mkdir()
    (other / TOKENIZER_DIR / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]))
    _fails(AtomsConfig(codes=other, out=out, progress=False), "is not the one")
    shutil.rmtree(other / TOKENIZER_DIR)
    _fails(AtomsConfig(codes=other, out=out, progress=False), "no tokenizer folder")


def test_extract_dir_is_checked_against_the_codes_fingerprint(fixture, tmp_path):
    from mlsm.core.manifest import sha256_file

    ex = tmp_path / "extract"
    write_json_atomic(ex / MANIFEST, {"stage": "extract", "complete": True, "aux": "toy", "params": {}, "shards": []})
    codes = tmp_path / "codes"
    shutil.copytree(fixture["folder"], codes)
    with h5py.File(codes / CODES, "a") as f:
        f.attrs["extract_fingerprint"] = sha256_file(ex / MANIFEST)
    rep = atom_report(AtomsConfig(codes=codes, extract_dir=ex, out=tmp_path / "ok.html", **SMALL))
    assert rep["meta"]["aux"] == "toy"
    write_json_atomic(ex / MANIFEST, {"stage": "extract", "complete": True, "aux": "other", "params": {}, "shards": []})
    _fails(AtomsConfig(codes=codes, extract_dir=ex, out=tmp_path / "no.html", progress=False), "was not made from")


def test_cli_writes_both_files_and_reports_errors(fixture, tmp_path, capsys):
    out = tmp_path / "cli" / "atoms.html"
    main(["atoms", "--codes", str(fixture["folder"]), "--out", str(out), "--no-progress", "--contexts", "2"])
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["meta"]["params"]["contexts"] == 2
    with pytest.raises(SystemExit) as e:
        main(["atoms", "--codes", str(tmp_path / "missing"), "--out", str(tmp_path / "x.html")])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


# --------------------------------------------------------------------------- the page in a browser


def _chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); the page was not opened in a browser")
    return path


def test_the_search_box_shows_the_atoms_a_token_fires_most(fixture, report):
    from playwright.sync_api import sync_playwright

    exe = _chromium()
    rep, out = report
    word = "bank"
    tid = str(fixture["tok"].token_to_id(word))
    want = [str(a) for a, _ in rep["tokens"][tid][1]]
    shots = out.parent
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(out.as_uri())
            page.wait_for_selector('body[data-ready="1"]')
            first = page.locator("#cards .atom").count()
            assert first == min(24, K)  # the first page of the list, most used first
            usage = [float(a["usage"]) for a in sorted(rep["atoms"], key=lambda a: (-a["usage"], a["id"]))]
            shown = [int(x) for x in page.locator("#cards .atom").evaluate_all("els => els.map(e => e.dataset.atom)")]
            assert [rep["atoms"][a]["usage"] for a in shown] == usage[:first]
            page.locator("#search").press_sequentially(word, delay=30)
            page.wait_for_selector('body[data-ready="1"]')
            got = page.locator("#cards .atom").evaluate_all("els => els.map(e => e.dataset.atom)")
            assert got == want
            assert word in page.locator("#result-title").inner_text()
            page.screenshot(path=str(shots / "search.png"), full_page=True)
            page.locator("#search").fill("")
            page.locator("#search").press_sequentially(want[0], delay=30)
            page.wait_for_selector('body[data-ready="1"]')
            assert page.locator("#cards .atom").evaluate_all("els => els.map(e => e.dataset.atom)") == [want[0]]
            assert page.locator("#cards .atom mark").count() == len(rep["atoms"][int(want[0])]["contexts"])
            page.screenshot(path=str(shots / "atom.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    assert (shots / "search.png").stat().st_size > 10_000
    print(f"screenshots: {shots / 'search.png'}, {shots / 'atom.png'}")
