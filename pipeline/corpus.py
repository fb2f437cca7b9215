"""Reading the user's corpus: files → documents → lines (DESIGN §2.1).

Formats:
- UTF-8 `.txt` / `.txt.gz`: one sentence or paragraph per line, a blank line between documents;
- `.jsonl` / `.jsonl.gz`: one document per record, its text in the string field `text_field`
  (`--text-field`, default `text`);
- `.parquet`: one document per row, its text in the string column `text_field`;
- a Hugging Face `datasets` folder (`save_to_disk`: `state.json` + `*.arrow`; a DatasetDict folder
  with one split, or one split's folder) or a bare `.arrow` file of one, read through the optional
  `datasets` package (pip install mlsm[datasets]): one document per row, as Parquet.
A record's or row's text is split into lines at its newlines, and blank lines inside it split
documents too. Rows whose text is null are skipped and counted. The Arrow formats are read in
batches of rows (pipeline.corpus_arrow), their schemas checked when the corpus is resolved.

Everything here streams: files are read line by line (Arrow formats a batch of rows at a time), so
memory is bounded by the largest document (itself capped, see MAX_DOC_LINES), never by the corpus.
Dirty input (bad UTF-8, NUL bytes, broken jsonl records, null rows) is repaired or skipped, counted
in CorpusStats and warned about once per file, because one bad byte in a multi-GB corpus should not
kill an hour of extraction. Input the user must fix (missing, unreadable or unsupported files; for
Parquet and datasets, a missing or non-string text column, a corrupt file) raises MLSMError before
any work.
"""

from __future__ import annotations

import glob as globlib
import gzip
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from mlsm.core.errors import MLSMError
from mlsm.core.manifest import files_fingerprint, sha256_json
from mlsm.pipeline import corpus_arrow

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", corpus_arrow.PARQUET, corpus_arrow.ARROW)
JSONL = (".jsonl", ".jsonl.gz")
TEXT_FIELD = "text"
FORMATS = ", ".join(SUFFIXES) + " or a datasets save_to_disk folder"
FIX = "point CORPUS= (or --corpus) at a corpus file, folder or glob, or run `make corpus` for the default one"

# A line longer than this is cut into pieces of this size (at a UTF-8 character boundary), so a
# file without newlines cannot exhaust memory. Real sentences are far shorter; the packer splits
# long lines into sequences anyway, so a cut only moves one sequence boundary.
MAX_LINE_BYTES = 16 << 20
# A document longer than this many lines is yielded in parts, for the same reason: a file with no
# blank lines would otherwise be held in memory as one list.
MAX_DOC_LINES = 200_000

_BOM = b"\xef\xbb\xbf"
_GLOB_CHARS = re.compile(r"[*?\[]")
_JSON_NEWLINES = re.compile(r"\r\n|\r|\n")


@dataclass
class CorpusStats:
    """Counters the extract stage records in its manifest, so dirty input is visible, not silent."""

    files: int = 0
    documents: int = 0
    lines: int = 0
    bytes: int = 0  # decompressed bytes read
    invalid_utf8_lines: int = 0  # undecodable bytes replaced by U+FFFD
    nul_lines: int = 0  # lines (or jsonl records) that had NUL characters removed
    bad_json_lines: int = 0  # jsonl lines that are not objects with a string text field: skipped
    null_records: int = 0  # Parquet / datasets rows whose text is null: skipped
    long_lines_cut: int = 0  # lines longer than MAX_LINE_BYTES, cut into pieces
    long_documents_split: int = 0  # documents longer than MAX_DOC_LINES, yielded in parts
    skipped_files: list[str] = field(default_factory=list)  # files that held no text at all

    def as_dict(self) -> dict:
        return asdict(self)


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for s in SUFFIXES:
        if name.endswith(s):
            return s
    return None


def _is_hidden(path: Path, root: Path) -> bool:
    # Hidden folders under a corpus folder hold tooling, not text: data/.npm keeps the npm
    # packages' own *.txt files, and atomic writes leave .name.tmp files.
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _resolve_dir(folder: Path) -> list[Path]:
    """A datasets folder stands for itself (its split); any other folder for the corpus files inside."""
    if corpus_arrow.is_dataset_folder(folder):
        return [corpus_arrow.dataset_split(folder)]
    return _expand_dir(folder)


def _expand_dir(folder: Path) -> list[Path]:
    found = []
    datasets: list[Path] = []  # datasets folders met so far: their *.arrow files are theirs, not corpus files
    for p in sorted(folder.rglob("*"), key=lambda q: q.relative_to(folder).as_posix()):
        if _is_hidden(p, folder) or any(d in p.parents for d in datasets):
            continue
        if p.is_dir():
            if corpus_arrow.is_dataset_folder(p):
                datasets.append(p)
                found.append(corpus_arrow.dataset_split(p))
            continue
        if _suffix(p) is None:
            continue
        if not p.is_file():
            raise MLSMError(f"{p} in the corpus folder {folder} is not a readable file (a broken link?). "
                            "Remove or fix it.")
        found.append(p)
    if not found:
        raise MLSMError(f"the corpus folder {folder} contains no corpus files ({FORMATS}). "
                        f"Put text files there, or {FIX}.")
    return found


def _resolve_one(spec: str | os.PathLike) -> list[Path]:
    text = os.path.expanduser(os.fspath(spec))
    path = Path(text)
    if path.is_dir():
        return _resolve_dir(path)
    if path.is_file():
        if _suffix(path) is None:
            raise MLSMError(f"{path} has an unsupported extension: a corpus file must end in "
                            f"{', '.join(SUFFIXES)}. Rename or convert it.")
        return [path]
    if _GLOB_CHARS.search(text):
        matches = sorted(globlib.glob(text, recursive=True))
        if not matches:
            raise MLSMError(f"the corpus pattern {text!r} matches nothing. Check the pattern, or {FIX}.")
        out: list[Path] = []
        ignored = []
        for m in matches:
            p = Path(m)
            if p.is_dir():
                out.extend(_resolve_dir(p))
            elif _suffix(p) is not None:
                out.append(p)
            else:
                ignored.append(m)
        if not out:
            raise MLSMError(f"the corpus pattern {text!r} matches {len(matches)} paths, none a corpus file "
                            f"({', '.join(SUFFIXES)}). Narrow the pattern to text files.")
        if ignored:
            log.warning("corpus pattern %r: ignoring %d files with other extensions (e.g. %s)",
                        text, len(ignored), ignored[0])
        return out
    if path.is_symlink():
        raise MLSMError(f"the corpus path {path} is a broken link. Fix the link, or {FIX}.")
    raise MLSMError(f"the corpus path {path} does not exist. {FIX[0].upper() + FIX[1:]}.")


def _check_readable(path: Path, text_field: str) -> None:
    """Open each file before any work starts, so a permission problem (or, for the Arrow formats, a
    corrupt file or a missing text column) is not found an hour in."""
    try:
        if path.is_dir():  # a datasets folder: its files are opened by the schema check below
            pass
        elif path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                f.read(1)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except PermissionError as e:
        raise MLSMError(f"cannot read the corpus file {path} (permission denied). "
                        "Fix its permissions (chmod a+r) or leave it out of the corpus.") from e
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise MLSMError(f"{path} is not a valid gzip file ({e}). Re-compress it or drop the .gz suffix.") from e
    except OSError as e:
        raise MLSMError(f"cannot read the corpus file {path} ({e}). Fix it or leave it out of the corpus.") from e
    kind = _kind(path)
    if kind == "parquet":
        corpus_arrow.check_parquet(path, text_field)
    elif kind == "dataset":
        corpus_arrow.check_dataset(path, text_field)


def resolve_corpus(spec: str | os.PathLike | Iterable[str | os.PathLike], text_field: str = TEXT_FIELD) -> list[Path]:
    """Turn a file, folder, glob or list of them into a deterministic file list, checked up front.

    Folders are searched recursively (hidden folders skipped), folders and globs are sorted, a list
    keeps its order and drops repeats; a datasets folder is one entry. Every file is opened once
    here, and every Parquet / datasets schema checked for the string column `text_field`, so that
    nothing is half done when one turns out to be unreadable.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise MLSMError(f"no corpus given. {FIX[0].upper() + FIX[1:]}.")
    paths: list[Path] = []
    seen = set()
    for s in specs:
        for p in _resolve_one(s):
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(p)
    for p in paths:
        _check_readable(p, text_field)
    return paths


def _kind(path: Path) -> str:
    """How a resolved corpus entry is read: text, jsonl, parquet or dataset (a folder or .arrow file)."""
    suffix = _suffix(path)
    if path.is_dir() or suffix == corpus_arrow.ARROW:
        return "dataset"
    if suffix == corpus_arrow.PARQUET:
        return "parquet"
    return "jsonl" if suffix in JSONL else "text"


def reads_text_field(paths: Iterable[Path]) -> bool:
    """Whether any entry takes its text from a field (--text-field), rather than being plain text."""
    return any(_kind(Path(p)) != "text" for p in paths)


def corpus_fingerprint(paths: list[Path], text_field: str = TEXT_FIELD) -> str:
    """Names, sizes and mtimes of the corpus files (a datasets folder: of every file in it), and the
    text field where one is read and it is not the default: another field makes another corpus. A
    corpus read as before text fields existed (text files, jsonl's "text") keeps the fingerprint it
    had, so its finished stages stay finished."""
    files = []
    for p in map(Path, paths):
        files += sorted(q for q in p.rglob("*") if q.is_file() and not _is_hidden(q, p)) if p.is_dir() else [p]
    fp = files_fingerprint(files)
    named = text_field != TEXT_FIELD and reads_text_field(paths)
    return sha256_json({"files": fp, "text_field": text_field}) if named else fp


def require_nonempty(stats: CorpusStats, text_field: str = TEXT_FIELD) -> None:
    """Called by consumers that got nothing out of the corpus, to say why in the user's terms."""
    if stats.documents > 0:
        return
    detail = f"{stats.files} files, {stats.bytes} bytes"
    if stats.bad_json_lines:
        detail += f", {stats.bad_json_lines} jsonl lines without a string {text_field!r} field"
    if stats.null_records:
        detail += f", {stats.null_records} rows with a null {text_field!r}"
    raise MLSMError(f"the corpus contains no text ({detail}). Check that the files hold non-blank lines "
                    f"(jsonl, Parquet, datasets: records with a {text_field!r} string), or {FIX}.")


def _utf8_cut(chunk: bytes) -> int:
    """Largest prefix length of `chunk` that does not end inside a UTF-8 character."""
    i = len(chunk) - 1
    while i > 0 and len(chunk) - i < 4 and chunk[i] & 0xC0 == 0x80:  # continuation bytes 10xxxxxx
        i -= 1
    lead = chunk[i]
    size = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
    cut = i if len(chunk) - i < size else len(chunk)
    return cut or len(chunk)


def _raw_lines(f: IO[bytes], cap: int | None) -> Iterator[tuple[bytes, bool]]:
    """Yield (piece, was_cut) with bounded memory; a cut never splits a UTF-8 character."""
    carry = b""
    while True:
        chunk = f.readline(cap) if cap else f.readline()
        if not chunk:
            if carry:
                yield carry, True
            return
        chunk = carry + chunk
        carry = b""
        if cap and not chunk.endswith(b"\n") and len(chunk) >= cap:
            cut = _utf8_cut(chunk)
            carry = chunk[cut:]
            yield chunk[:cut], True
        else:
            yield chunk, False


class _FileReader:
    """Per-file decoding with counters and once-per-file warnings."""

    def __init__(self, path: Path, stats: CorpusStats):
        self.path = path
        self.stats = stats
        self.warned: set[str] = set()
        self.first = True

    def warn_once(self, kind: str, msg: str, *args) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            log.warning("%s: " + msg + " (further ones in this file are only counted)", self.path, *args)

    def decode(self, raw: bytes, lineno: int) -> str:
        self.stats.bytes += len(raw)
        if self.first:
            self.first = False
            if raw.startswith(_BOM):
                raw = raw[len(_BOM):]
        if b"\x00" in raw:
            raw = raw.replace(b"\x00", b"")
            self.stats.nul_lines += 1
            self.warn_once("nul", "line %d contains NUL bytes; they were removed", lineno)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.stats.invalid_utf8_lines += 1
            self.warn_once("utf8", "line %d is not valid UTF-8; bad bytes were replaced by U+FFFD", lineno)
            return raw.decode("utf-8", errors="replace")


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _text_lines(path: Path, reader: _FileReader) -> Iterator[str | None]:
    """Yield stripped lines of a text file, None for a document break."""
    with _open(path) as f:
        lineno = 1
        prev_cut = False
        for raw, cut in _raw_lines(f, MAX_LINE_BYTES):
            if cut and not prev_cut:
                reader.stats.long_lines_cut += 1
                reader.warn_once("long", "line %d is longer than %d bytes; it is cut into pieces",
                                 lineno, MAX_LINE_BYTES)
            in_long_line = cut or prev_cut
            prev_cut = cut
            line = reader.decode(raw, lineno).strip()
            lineno += 0 if cut else 1
            if line or not in_long_line:  # a blank piece of a long line is no document break
                yield line or None


def _record_lines(body: str, reader: _FileReader, where: str) -> Iterator[str | None]:
    """A record's text as lines, None at blank lines inside it and after it (the document ends)."""
    if "\x00" in body:
        body = body.replace("\x00", "")
        reader.stats.nul_lines += 1
        reader.warn_once("nul", "%s contains NUL characters; they were removed", where)
    for line in body.split("\n") if "\r" not in body else _JSON_NEWLINES.split(body):  # str.split is faster than the regex
        yield line.strip() or None
    yield None


def _jsonl_lines(path: Path, reader: _FileReader, text_field: str) -> Iterator[str | None]:
    """Yield the lines of each record's text, None between records and at blank lines inside one."""
    with _open(path) as f:
        for lineno, (raw, _) in enumerate(_raw_lines(f, None), 1):
            text = reader.decode(raw, lineno).strip()
            if not text:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                reader.stats.bad_json_lines += 1
                reader.warn_once("json", 'line %d is not a JSON object with a string "%s" field; skipped', lineno,
                                 text_field)
                continue
            yield from _record_lines(record[text_field], reader, f"the record on line {lineno}")


def _row_lines(batches: Iterable[pa.Array | pa.ChunkedArray], reader: _FileReader) -> Iterator[str | None]:
    """The lines of each row of Arrow text batches, as _record_lines gives them; null rows are skipped."""
    row = 0
    for column in batches:
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            column = column.cast(pa.large_string())  # dictionary or view strings: binary_length wants these
        reader.stats.bytes += pc.sum(pc.binary_length(column)).as_py() or 0
        for body in column.to_pylist():
            row += 1
            if body is None:
                reader.stats.null_records += 1
                reader.warn_once("null", "row %d has a null text; skipped", row)
            elif "\r" in body or "\x00" in body:
                yield from _record_lines(body, reader, f"row {row}")
            else:  # the common case, inlined: one generator layer less per line
                for line in body.split("\n"):
                    yield line.strip() or None
                yield None


def _lines(path: Path, reader: _FileReader, text_field: str) -> Iterator[str | None]:
    kind = _kind(path)
    if kind == "parquet":
        return _row_lines(corpus_arrow.parquet_texts(path, text_field), reader)
    if kind == "dataset":
        return _row_lines(corpus_arrow.dataset_texts(path, text_field), reader)
    return _jsonl_lines(path, reader, text_field) if kind == "jsonl" else _text_lines(path, reader)


def iter_documents(
    paths: Iterable[Path], stats: CorpusStats | None = None, progress: bool = False, text_field: str = TEXT_FIELD,
) -> Iterator[list[str]]:
    """Stream documents (lists of non-empty, stripped lines) from resolved corpus files, in order.

    Documents never span files. Empty documents are not yielded. `stats` is updated as reading
    goes, so a consumer that stops early sees counts for what it read. `text_field` names the
    jsonl field / Arrow column holding a record's text.
    """
    stats = stats if stats is not None else CorpusStats()
    paths = list(paths)
    for path in tqdm(paths, desc="corpus", unit="file", disable=not progress or len(paths) < 2):
        path = Path(path)
        stats.files += 1
        reader = _FileReader(path, stats)
        lines = _lines(path, reader, text_field)
        doc: list[str] = []
        docs_before = stats.documents
        try:
            for line in lines:
                if line is not None:
                    doc.append(line)
                    if len(doc) < MAX_DOC_LINES:
                        continue
                    stats.long_documents_split += 1
                    reader.warn_once("longdoc", "a document has more than %d lines; it is yielded in parts "
                                     "(add blank lines between documents)", MAX_DOC_LINES)
                if doc:
                    stats.documents += 1
                    stats.lines += len(doc)
                    yield doc
                    doc = []
        except (OSError, EOFError, zlib.error, pa.ArrowException) as e:
            raise MLSMError(f"reading the corpus file {path} failed ({e}); it may be truncated or corrupt. "
                            "Fix or remove it.") from e
        if doc:
            stats.documents += 1
            stats.lines += len(doc)
            yield doc
        if stats.documents == docs_before:
            stats.skipped_files.append(str(path))
            log.warning("%s contains no text; it adds nothing to the corpus", path)
