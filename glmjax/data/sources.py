"""Raw text sources: the embedded standard-library corpus, text files / globs, JSONL, TFDS.

A *source spec* is a short string naming where the text comes from:

* ``stdlib`` — the ``.py`` files of the running Python's standard library (no test dirs, no
  site-packages), split train/validation by a hash of each file's relative path;
* ``text:PATTERN`` — plain text files (glob; ``,`` separates several patterns; ``gs://``, ``s3://`` and
  other ``scheme://`` patterns go through ``tf.io.gfile``), streamed line by line: a file is one
  document, or, past ``TEXT_PIECE_LINES`` (4096) lines, consecutive documents of that many whole
  lines (a multi-GB shard never sits in memory; a document never spans two files; every line ends
  in a newline);
  split by a hash of each file's path relative to the matched files' common folder (moving the data
  keeps the split);
* ``jsonl:PATTERN[@FIELD]`` — JSON-lines files, one document per line, text in ``FIELD`` (default
  ``text``); lines are assigned to a split by a hash of (file name, line number);
* ``tfds:NAME[@FIELD]`` — a TensorFlow Datasets dataset (``name/config:version``), when installed.

Files are the unit of sharding: data stream ``i`` of ``n`` (``streams.py``) reads files ``i, i+n, ...``
of its split, so streams read disjoint data that together covers the split. A split with fewer files
than streams is sharded by document instead (every stream reads every file and keeps documents
``i, i+n, ...``). Bytes that are not valid UTF-8 become
U+FFFD; empty files are skipped (and counted in a log line).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import sysconfig
from typing import Iterator, Sequence

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A parsed source spec (see the module docstring)."""

    kind: str  # "stdlib" | "text" | "jsonl" | "tfds"
    pattern: str = ""  # glob(s) for text/jsonl, dataset name for tfds
    field: str = "text"  # JSON / TFDS feature holding the text

    @property
    def key(self) -> str:
        """Canonical string, used in cache keys and task names."""
        if self.kind == "stdlib":
            return f"stdlib[{sysconfig.get_python_version()}]"
        return f"{self.kind}:{self.pattern}@{self.field}"


def parse_spec(spec: str) -> SourceSpec:
    """Parses ``stdlib`` / ``text:GLOB`` / ``jsonl:GLOB[@FIELD]`` / ``tfds:NAME[@FIELD]``."""
    spec = spec.strip()
    if spec == "stdlib":
        return SourceSpec("stdlib")
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("text", "jsonl", "tfds") or not rest:
        raise ValueError(
            f"data source {spec!r} is not understood: use 'stdlib', 'text:/path/*.txt', "
            "'jsonl:/path/*.jsonl@field' or 'tfds:name/config:version@field'"
        )
    field = "text"
    if kind in ("jsonl", "tfds") and "@" in rest:
        rest, field = rest.rsplit("@", 1)
    return SourceSpec(kind, rest, field)


def _stable_fraction(key: str) -> float:
    """A number in [0, 1) that depends only on ``key`` (stable across machines and runs)."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2.0**64


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_files() -> list[str]:
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return out


def is_url(path: str) -> bool:
    """``gs://...``, ``s3://...``, ``ram://...``: read through ``tf.io.gfile``, not the local filesystem."""
    return "://" in path


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def file_size(path: str) -> int:
    return _gfile().stat(path).length if is_url(path) else os.path.getsize(path)


def _url_glob(pat: str) -> list[str]:
    gfile = _gfile()
    hits = gfile.glob(pat) if glob.has_magic(pat) else ([pat] if gfile.exists(pat) else [])
    return sorted(p for p in hits if not gfile.isdir(p))


def _relative(path: str, root: str) -> str:
    if is_url(path):
        return path[len(root):].lstrip("/") if path.startswith(root) else path
    return os.path.relpath(path, root)


def _common_root(files: list[str]) -> str:
    if not is_url(files[0]):
        return os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
    prefix = os.path.commonprefix(files) if len(files) > 1 else files[0]
    return prefix[:prefix.rfind("/") + 1]


def _glob_files(pattern: str) -> list[str]:
    files = []
    for pat in pattern.split(","):
        pat = pat.strip()
        if is_url(pat):
            hits = _url_glob(pat)
        else:
            pat = os.path.expanduser(pat)
            hits = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
        if not hits:
            why = "does not exist" if not glob.has_magic(pat) else "matches no file"
            raise FileNotFoundError(
                f"data source path {pat!r} {why} (cwd: {os.getcwd()}). Fix: point data.task at "
                "existing files, e.g. --config.data.task='text:/data/corpus/*.txt'"
            )
        files += hits
    return sorted(set(files))


def split_of(key: str, validation_fraction: float) -> str:
    """The split ('train' or 'validation') a file or document with this key belongs to."""
    return "validation" if _stable_fraction(key) < validation_fraction else "train"


def list_files(spec: SourceSpec, split: str, validation_fraction: float = 0.05) -> list[str]:
    """Sorted files of ``split`` (non-empty ones), for file-based sources.

    stdlib / text: files are split by a hash of their (relative) path; a source of one file is used
    for both splits (with a warning). jsonl: every file serves both splits, lines are split instead.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if spec.kind == "stdlib":
        root = stdlib_root()
        files = _stdlib_files()
        rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    elif spec.kind in ("text", "jsonl"):
        files = _glob_files(spec.pattern)
        # keyed relative to the files' common folder: moving the data elsewhere keeps the same split
        common = _common_root(files)
        rel = lambda p: _relative(p, common)  # noqa: E731
    else:
        raise ValueError(f"source kind {spec.kind!r} has no files")
    sizes = {f: file_size(f) for f in files}
    empty = [f for f in files if sizes[f] == 0]
    if empty:
        # the standard library ships empty __init__.py files: expected there, worth a note elsewhere
        log.log(logging.DEBUG if spec.kind == "stdlib" else logging.WARNING,
                "data source %s: skipped %d empty file(s), e.g. %s", spec.key, len(empty), empty[0])
        files = [f for f in files if sizes[f] > 0]
    if not files:
        raise FileNotFoundError(f"data source {spec.key}: every matched file is empty")
    if spec.kind == "jsonl" or len(files) == 1:
        if len(files) == 1 and spec.kind != "jsonl":
            log.warning("data source %s has one file: train and validation both read it", spec.key)
        return files
    chosen = [f for f in files if split_of(rel(f), validation_fraction) == split]
    if not chosen:  # tiny sources: keep both splits non-empty
        by_hash = sorted(files, key=lambda f: _stable_fraction(rel(f)))
        chosen = [by_hash[0]] if split == "validation" else by_hash[1:]
    return chosen


TEXT_PIECE_LINES = 4096  # a text: file is read as documents of up to this many lines (see the module docstring)


def text_pieces(path: str) -> Iterator[str]:
    """The documents of a ``text:`` file, streamed: runs of up to ``TEXT_PIECE_LINES`` whole lines, each
    line ending in a newline (what the input pipeline reads; bytes that are not UTF-8 become U+FFFD)."""
    with (_gfile().GFile(path, "rb") if is_url(path) else open(path, "rb")) as f:
        lines = []
        for raw in f:
            lines.append(raw.rstrip(b"\n") + b"\n")
            if len(lines) == TEXT_PIECE_LINES:
                yield b"".join(lines).decode("utf-8", errors="replace")
                lines = []
        if lines:
            yield b"".join(lines).decode("utf-8", errors="replace")


def read_text(path: str) -> str:
    """The file's text; bytes that are not UTF-8 become U+FFFD."""
    with (_gfile().GFile(path, "rb") if is_url(path) else open(path, "rb")) as f:
        return f.read().decode("utf-8", errors="replace")


def jsonl_line_text(path: str, index: int, raw: bytes, field: str, split: str,
                    validation_fraction: float) -> str | None:
    """The text of line ``index`` of a JSONL file if it belongs to ``split`` and is valid, else None."""
    if split_of(f"{os.path.basename(path)}:{index}", validation_fraction) != split or not raw.strip():
        return None
    try:
        text = json.loads(raw.decode("utf-8", errors="replace"))[field]
    except (ValueError, KeyError, TypeError):
        log.warning("%s:%d: not a JSON object with a %r field; skipped", path, index + 1, field)
        return None
    return text if isinstance(text, str) and text else None


def jsonl_texts(path: str, field: str, split: str, validation_fraction: float) -> Iterator[str]:
    """Texts of the lines of one JSONL file that belong to ``split``; bad lines are logged, skipped."""
    with (_gfile().GFile(path, "rb") if is_url(path) else open(path, "rb")) as f:
        for i, raw in enumerate(f):
            text = jsonl_line_text(path, i, raw, field, split, validation_fraction)
            if text is not None:
                yield text


def iter_texts(spec: SourceSpec, split: str, validation_fraction: float = 0.05) -> Iterator[str]:
    """All documents of ``split`` in a deterministic order (used to train the tokenizer)."""
    if spec.kind == "tfds":
        import tensorflow_datasets as tfds

        for ex in tfds.as_numpy(tfds.load(spec.pattern, split=split, shuffle_files=False)):
            yield ex[spec.field].decode("utf-8", errors="replace")
        return
    files = list_files(spec, split, validation_fraction)
    # A deterministic spread over the corpus, so a bounded sample is not one corner of it.
    files = sorted(files, key=lambda f: _stable_fraction("order:" + f))
    for f in files:
        if spec.kind == "jsonl":
            yield from jsonl_texts(f, spec.field, split, validation_fraction)
        elif spec.kind == "text":
            yield from text_pieces(f)
        else:
            yield read_text(f)


def shard_files(files: Sequence[str], index: int, count: int) -> list[str]:
    """Files read by stream ``index`` of ``count``: disjoint, together all of them (needs count <= files)."""
    if count > len(files):
        raise ValueError(f"{len(files)} file(s) cannot be split between {count} streams by file")
    return list(files[index::count])
