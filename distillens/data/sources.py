"""Sources: where a split's rows come from (a local file, a folder of files, or a hub dataset) and reading them.

Each row is kept with where it came from (`Row.where`), so that errors further down can name the file and the row.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from distillens.hub import hub_reachable, is_hub_id, offline_requested

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
VALIDATION_STEMS = ("validation", "valid", "val", "dev")
# File stems a folder source looks for, best first; MiniLLM's evaluation folders hold only `valid.jsonl`.
SPLIT_FILE_STEMS = {"train": ("train",), "validation": VALIDATION_STEMS, "test": ("test", *VALIDATION_STEMS)}
GENERIC_STEMS = {"train", "test", "data", *VALIDATION_STEMS}


@dataclass(frozen=True)
class Source:
    """Where one split comes from: local data files (read in order and concatenated) or a hub dataset."""

    origin: str  # the user's string, for messages
    name: str  # the set's name (file stem, folder name or hub id's last part)
    files: tuple[Path, ...] = ()
    hub_id: str | None = None


def resolve_source(value: str, role: str) -> Source:
    """Turn a config string into a `Source`.

    A folder holding a file named after the role (e.g. `validation.jsonl` or `valid.jsonl` for "validation")
    means that file; any other folder means all its data files. A string that is no existing path but looks like
    `owner/name` is a hub id; one that looks like a file path raises `FileNotFoundError`.
    """
    path = Path(value).expanduser()
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise ValueError(
                f"{value}: unsupported file type {path.suffix!r}; use one of {', '.join(DATA_SUFFIXES)}"
            )
        return Source(value, _set_name(path), files=(path,))
    if path.is_dir():
        return Source(value, path.name, files=_folder_files(path, role))
    if path.suffix in DATA_SUFFIXES or value.startswith((".", "/", "~")) or not is_hub_id(value):
        raise FileNotFoundError(f"{value}: no such data file or folder")
    return Source(value, value.rsplit("/", 1)[-1], hub_id=value)


def _set_name(path: Path) -> str:
    """A file's set name: its stem, or its folder's name for generic stems (MiniLLM's `dolly/valid.jsonl`)."""
    return path.parent.name if path.stem in GENERIC_STEMS and path.parent.name else path.stem


def _folder_files(folder: Path, role: str) -> tuple[Path, ...]:
    """The folder's file for this role; or all its data files, when none is named after a split."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: folder has no {'/'.join(DATA_SUFFIXES)} files")
    for stem in SPLIT_FILE_STEMS[role]:
        if matches := [p for p in files if p.stem == stem]:
            return (matches[0],)
    if split_files := [p.name for p in files if p.stem in GENERIC_STEMS - {"data"}]:
        raise FileNotFoundError(f"{folder}: no {role} file among its split files {split_files}")
    return tuple(files)


def file_fingerprint(files: Sequence[Path]) -> str:
    """Hash of the files' names and contents: a cache key that changes exactly when the data changes."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Row:
    """One raw record and where it came from, so that errors can name the file and the row."""

    values: dict[str, Any]
    where: str  # e.g. "data/x.jsonl row 7"


def read_json_rows(path: Path) -> list[Row]:
    """Rows of a .json/.jsonl file: a JSON array of objects, or one object per line (row number = line number).

    Parsed by hand rather than through `datasets` so that a syntax error names the line.
    """
    text = read_utf8(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {error.lineno}: not valid JSON ({error.msg})") from None
        return [_as_row(record, path, number) for number, record in enumerate(records, start=1)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number}: not valid JSON ({error.msg})") from None
        rows.append(_as_row(record, path, number))
    return rows


def read_utf8(path: Path) -> str:
    """A text file's contents, without the byte-order mark some editors write first; bytes that are not UTF-8 are
    an error naming the file and the line."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path} line {line}: not UTF-8 text (byte {data[error.start]:#04x}); save the file as UTF-8"
        ) from None


def _as_row(record: Any, path: Path, number: int) -> Row:
    if not isinstance(record, dict):
        raise ValueError(f"{path} row {number}: expected a JSON object, got {type(record).__name__}")
    return Row(record, f"{path} row {number}")


def read_table_rows(path: Path, cache_dir: Path) -> list[Row]:
    """Rows of a .parquet/.csv file, read through `datasets` (kept in memory; its arrow cache under cache_dir)."""
    reader = datasets.Dataset.from_parquet if path.suffix == ".parquet" else datasets.Dataset.from_csv
    try:
        with _datasets_quiet():
            table = reader(str(path), cache_dir=str(cache_dir), keep_in_memory=True)
    except Exception as error:  # datasets/pyarrow raise many types; all mean "this file is unreadable"
        reason = _first_line(
            _innermost(error)
        )  # pandas' "Expected 2 fields in line 3", not datasets' wrapper
        raise ValueError(f"{path}: not a readable {path.suffix[1:]} file ({reason})") from error
    return [Row(record, f"{path} row {number}") for number, record in enumerate(table, start=1)]


@contextmanager
def _datasets_quiet() -> Iterator[None]:
    """No progress bar or error record from `datasets` while it reads a file: a bad file is the one error line
    ``read_table_rows`` raises, and a good one too quick to need a bar."""
    logger = logging.getLogger("datasets")
    level, bars = logger.level, datasets.utils.logging.is_progress_bar_enabled()
    logger.setLevel(logging.CRITICAL)
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()


def _innermost(error: BaseException) -> BaseException:
    """The exception at the bottom of a chain of causes: the parser's own message."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def hub_offline() -> bool:
    """Whether the user asked for offline mode: in the environment now, or in `datasets`' settings."""
    return offline_requested() or datasets.config.HF_HUB_OFFLINE


@contextmanager
def _datasets_offline(offline: bool) -> Iterator[None]:
    """Make `datasets` and `huggingface_hub` honour an offline flag set after they were imported."""
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def load_hub_dataset(hub_id: str, split: str, revision: str | None, cache_dir: Path) -> datasets.Dataset:
    """A hub split through `datasets`, cached under cache_dir; any failure becomes one line naming the id."""
    offline = hub_offline()
    what = f"Hugging Face dataset {hub_id!r} (split {split!r}, revision {revision or 'main'})"
    if not offline and not hub_reachable():
        raise ConnectionError(
            f"cannot load {what}: the hub is unreachable (no network?); use a local file, or set HF_HUB_OFFLINE=1 "
            f"to use a copy cached under {cache_dir}"
        )
    try:
        with _datasets_offline(offline):
            return datasets.load_dataset(hub_id, split=split, revision=revision, cache_dir=str(cache_dir))
    except Exception as error:  # network, missing repo, missing split, missing cache: all reported alike
        where = f"offline and not cached under {cache_dir}" if offline else _first_line(error)
        raise ConnectionError(f"cannot load {what}: {where}") from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
