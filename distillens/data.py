"""Instruction data: sources, formats, prompt templates, cached tokenisation and collation.

The pipeline for one split is: resolve the source (local file, folder or hub id) -> read its rows -> map each row
to an `Example` through a format (Dolly, Alpaca, MiniLLM, prompt/response, chat) -> render the prompt with a
template -> tokenise prompt and response -> drop over-long prompts, truncate over-long responses -> cache on disk.
`InstructionDataModule` runs that pipeline in `prepare_data()` (once per node) and loads the cache in `setup()`
(on every rank), so under DDP tokenisation happens once and Lightning's distributed sampler shards the batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import string
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that Hugging Face losses (and ours) skip
CACHE_VERSION = 1  # bump when the tokenised layout or the filters change, to invalidate old caches
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
VALIDATION_STEMS = ("validation", "valid", "val", "dev")
# File stems a folder source looks for, best first; MiniLLM's evaluation folders hold only `valid.jsonl`.
SPLIT_FILE_STEMS = {"train": ("train",), "validation": VALIDATION_STEMS, "test": ("test", *VALIDATION_STEMS)}
GENERIC_STEMS = {"train", "test", "data", *VALIDATION_STEMS}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HUB_PROBE_TIMEOUT_S = 3.0

# The Alpaca prompt (Stanford Alpaca, github.com/tatsu-lab/stanford_alpaca, Apache-2.0), which the paper's data
# (MiniLLM's Dolly and evaluation sets) uses: one variant with an input paragraph, one without.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATE_FIELDS = {"instruction", "input"}


# ----------------------------------------------------------------------------------------------- sources


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
    if path.suffix in DATA_SUFFIXES or value.startswith((".", "/", "~")) or not HUB_ID.match(value):
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
    text = path.read_text(encoding="utf-8")
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


def _as_row(record: Any, path: Path, number: int) -> Row:
    if not isinstance(record, dict):
        raise ValueError(f"{path} row {number}: expected a JSON object, got {type(record).__name__}")
    return Row(record, f"{path} row {number}")


def read_table_rows(path: Path, cache_dir: Path) -> list[Row]:
    """Rows of a .parquet/.csv file, read through `datasets` (kept in memory; its arrow cache under cache_dir)."""
    reader = datasets.Dataset.from_parquet if path.suffix == ".parquet" else datasets.Dataset.from_csv
    try:
        table = reader(str(path), cache_dir=str(cache_dir), keep_in_memory=True)
    except Exception as error:  # datasets/pyarrow raise many types; all mean "this file is unreadable"
        raise ValueError(f"{path}: not a readable {path.suffix[1:]} file ({_first_line(error)})") from error
    return [Row(record, f"{path} row {number}") for number, record in enumerate(table, start=1)]


def hub_offline() -> bool:
    """Whether the user asked for offline mode, read now (the libraries read these variables once, at import)."""
    flags = (
        os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return any(flag.upper() in {"1", "ON", "YES", "TRUE"} for flag in flags) or datasets.config.HF_HUB_OFFLINE


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """A quick HEAD on the hub endpoint, so that no-network machines fail in seconds, not after long retries."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s)
    except urllib.error.HTTPError:
        return True  # the server answered
    except (urllib.error.URLError, OSError):
        return False
    return True


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


# ----------------------------------------------------------------------------------------------- formats


class BadRowError(ValueError):
    """A row that does not fit its format; skipped (and counted) when `skip_bad_rows` is on."""


@dataclass(frozen=True)
class Example:
    """A row in the shared layout every format maps to.

    `references` holds every accepted answer (MiniLLM eval sets list several); `response`, the training target,
    is the first. `messages` is the chat history before the answer, for rows in the chat format only.
    """

    instruction: str
    input: str
    response: str
    references: tuple[str, ...]
    messages: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True)
class RowFormat:
    """Which column holds each role (instruction, input, response, messages) and which roles must be present."""

    name: str
    columns: dict[str, str]
    required: tuple[str, ...]

    def with_field_map(self, field_map: dict[str, str] | None) -> RowFormat:
        columns = {**self.columns, **(field_map or {})}
        return RowFormat(self.name, columns, self.required)

    def matches(self, available: set[str]) -> bool:
        return all(self.columns[role] in available for role in self.required)


ROLES = ("instruction", "input", "response", "messages")
INSTRUCTION_AND_RESPONSE = ("instruction", "response")
ALPACA_COLUMNS = {"instruction": "instruction", "input": "input", "response": "output"}
FORMATS = {
    "chat": RowFormat("chat", {"messages": "messages"}, ("messages",)),
    "dolly": RowFormat(
        "dolly",
        {"instruction": "instruction", "input": "context", "response": "response"},
        INSTRUCTION_AND_RESPONSE,
    ),
    "alpaca": RowFormat("alpaca", ALPACA_COLUMNS, INSTRUCTION_AND_RESPONSE),
    # MiniLLM's evaluation layout is Alpaca's with `output` possibly a list of references (every format takes one).
    "minillm": RowFormat("minillm", ALPACA_COLUMNS, INSTRUCTION_AND_RESPONSE),
    "prompt_response": RowFormat(
        "prompt_response", {"instruction": "prompt", "response": "response"}, INSTRUCTION_AND_RESPONSE
    ),
}
DETECTION_ORDER = ("chat", "dolly", "alpaca", "prompt_response")


def resolve_format(name: str, field_map: dict[str, str] | None, columns: set[str], origin: str) -> RowFormat:
    """The named format, or the first one (chat, Dolly, Alpaca/MiniLLM, prompt/response) whose fields are there."""
    if name != "auto":
        return FORMATS[name].with_field_map(field_map)
    for candidate in DETECTION_ORDER:
        row_format = FORMATS[candidate].with_field_map(field_map)
        if row_format.matches(columns):
            return row_format
    raise ValueError(
        f"{origin}: cannot detect the format from fields {sorted(columns)}; set `format` "
        f"({', '.join(FORMATS)}) or map your field names with `field_map`"
    )


def row_to_example(row: Row, row_format: RowFormat) -> Example:
    """Map one row to an `Example`, raising `BadRowError` naming the field, the file and the row."""
    if row_format.name == "chat":
        return _chat_example(row, row_format)
    instruction = _text_field(row, row_format, "instruction", required=True)
    context = _text_field(row, row_format, "input", required=False)
    references = _references(row, row_format)
    return Example(instruction, context, references[0], references)


def _field_value(row: Row, row_format: RowFormat, role: str, required: bool) -> Any:
    column = row_format.columns.get(role)
    value = row.values.get(column) if column else None
    if value is None and required:
        raise BadRowError(f"{row.where}: missing field {column!r} (format {row_format.name})")
    return value


def _text_field(row: Row, row_format: RowFormat, role: str, required: bool) -> str:
    value = _field_value(row, row_format, role, required)
    if value is None:
        return ""
    if not isinstance(value, str):
        column = row_format.columns[role]
        raise BadRowError(f"{row.where}: field {column!r} must be a string, got {type(value).__name__}")
    return value


def _references(row: Row, row_format: RowFormat) -> tuple[str, ...]:
    value = _field_value(row, row_format, "response", required=True)
    answers = value if isinstance(value, list) else [value]
    column = row_format.columns["response"]
    if not answers or not all(isinstance(answer, str) for answer in answers):
        raise BadRowError(f"{row.where}: field {column!r} must be a string or a non-empty list of strings")
    return tuple(answers)


def _chat_example(row: Row, row_format: RowFormat) -> Example:
    column = row_format.columns["messages"]
    messages = _field_value(row, row_format, "messages", required=True)
    well_formed = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not well_formed or not messages:
        raise BadRowError(
            f"{row.where}: field {column!r} must be a non-empty list of {{role, content}} strings"
        )
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise BadRowError(f"{row.where}: field {column!r} must end with an assistant message after a prompt")
    history = tuple({"role": m["role"], "content": m["content"]} for m in messages[:-1])
    answer = messages[-1]["content"]
    return Example(history[-1]["content"], "", answer, (answer,), history)


# ----------------------------------------------------------------------------------------------- templates


def validate_template(template: str) -> None:
    """Reject a template string early (at construction, before any data is read)."""
    if template in ("alpaca", "chat"):
        return
    if "{" not in template:
        raise ValueError(
            f"template {template!r}: use 'alpaca', 'chat' or a string with an {{instruction}} placeholder"
        )
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ValueError(f"template {template!r}: not a valid format string ({error})") from None
    if unknown := fields - TEMPLATE_FIELDS:
        raise ValueError(
            f"template {template!r}: unknown placeholder(s) {sorted(unknown)}; use {{instruction}}, {{input}}"
        )
    if "instruction" not in fields:
        raise ValueError(f"template {template!r}: needs an {{instruction}} placeholder")


def make_prompt_renderer(template: str, tokenizer: PreTrainedTokenizerBase) -> Callable[[Example], str]:
    """A function Example -> prompt text for "alpaca", "chat" (the tokenizer's chat template) or a user string."""
    validate_template(template)
    if template == "alpaca":
        return render_alpaca
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"template 'chat': tokenizer {tokenizer.name_or_path!r} has no chat template")
        return lambda example: render_chat(example, tokenizer)
    return lambda example: render_string(example, template)


def render_alpaca(example: Example) -> str:
    """Alpaca's prompt, in its no-input variant when the row has no input."""
    return render_string(example, ALPACA_WITH_INPUT if example.input else ALPACA_NO_INPUT)


def render_string(example: Example, template: str) -> str:
    """A `str.format` template with {instruction} and {input} (validated by `validate_template`)."""
    return template.format(instruction=example.instruction, input=example.input)


def render_chat(example: Example, tokenizer: PreTrainedTokenizerBase) -> str:
    """The conversation up to the assistant's turn, ending with the template's generation prompt."""
    user_turn = f"{example.instruction}\n\n{example.input}" if example.input else example.instruction
    messages = list(example.messages) or [{"role": "user", "content": user_turn}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ----------------------------------------------------------------------------------------------- tokenisation


@dataclass
class SplitStats:
    """What happened to the rows of one split; every row read ends up in exactly one count."""

    rows_read: int = 0
    bad_rows_skipped: int = 0
    in_other_split: int = 0  # went to the other side of the val_size split
    over_max_samples: int = 0
    long_prompts_dropped: int = 0
    short_references_dropped: int = 0  # test sets with a min_reference_tokens
    kept: int = 0
    prompts_truncated: int = 0  # among the kept (test sets: long prompts are cut, not dropped)
    responses_truncated: int = 0  # among the kept


@dataclass
class Tokenised:
    """Token ids of the kept examples, where each prompt ends, which examples were kept, and how many were cut."""

    sequences: list[list[int]] = field(default_factory=list)  # prompt + response + EOS
    prompt_lengths: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # indices into the input examples
    truncated: int = 0
    cut_prompts: set[int] = field(
        default_factory=set
    )  # indices (as `kept`) of prompts cut to max_prompt_length


def tokenize_examples(
    prompts: Sequence[str],
    responses: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    prompt_special_tokens: bool,
    max_length: int,
    max_prompt_length: int,
    truncate_prompts: bool = False,
) -> Tokenised:
    """Tokenise prompt/response pairs for teacher forcing, dropping long prompts and cutting long responses.

    Prompt and response are tokenised separately and concatenated, so the boundary is exact by construction even
    where BPE would merge across it (a prompt ending in a space, say), and training sees the very prompt ids
    that generation will be given. The prompt gets the tokenizer's special tokens (a BOS for Llama-2-style
    tokenizers) unless a chat template already wrote them. Prompts over `max_prompt_length` are dropped, or, with
    `truncate_prompts` (evaluation sets, as the paper's protocol), cut to their first `max_prompt_length` tokens;
    responses are cut to fit `max_length`, and a cut response loses its EOS (the model should not learn to stop).
    """
    prompt_ids = tokenizer(list(prompts), add_special_tokens=prompt_special_tokens)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    result = Tokenised()
    for index, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        if len(prompt) > max_prompt_length:
            if not truncate_prompts:
                continue
            prompt = prompt[:max_prompt_length]
            result.cut_prompts.add(index)
        target = [*response, tokenizer.eos_token_id][: max_length - len(prompt)]
        result.truncated += len(target) <= len(response)
        result.sequences.append([*prompt, *target])
        result.prompt_lengths.append(len(prompt))
        result.kept.append(index)
    return result


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of everything that changes the ids: vocabulary and merges, special tokens, added BOS, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = (
        backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    parts = [
        type(tokenizer).__name__,
        str(tokenizer.name_or_path),
        vocabulary,
        str((tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer("x")["input_ids"])),
        str(getattr(tokenizer, "chat_template", None)),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- collation


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str, multiple_of: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the batch's longest sequence (rounded up to `multiple_of`); returns ids and attention mask."""
    longest = max(len(sequence) for sequence in sequences)
    width = -(-longest // multiple_of) * multiple_of if multiple_of else longest
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (B, T)
    for row, sequence in enumerate(sequences):
        span = slice(0, len(sequence)) if side == "right" else slice(width - len(sequence), width)
        input_ids[row, span] = torch.as_tensor(sequence, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting from 0 at each row's first real token (left padding too); 0 on padding."""
    return (attention_mask.cumsum(dim=-1) - 1).clamp(min=0) * attention_mask  # (B, T)


@dataclass(frozen=True)
class TrainingCollator:
    """Right-padded teacher-forcing batches; labels are the ids on response/EOS tokens, -100 elsewhere."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_sequences(
            [f["input_ids"] for f in features], self.pad_token_id, "right", self.pad_to_multiple_of
        )  # (B, T), (B, T)
        prompt_lengths = torch.tensor([f["prompt_length"] for f in features])  # (B,)
        in_prompt = torch.arange(input_ids.shape[1]) < prompt_lengths[:, None]  # (B, T)
        labels = input_ids.masked_fill(in_prompt | (attention_mask == 0), IGNORE_INDEX)  # (B, T)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "position_ids": position_ids_from_mask(attention_mask),  # (B, T)
        }


@dataclass(frozen=True)
class GenerationCollator:
    """Left-padded prompt-only batches for `generate`, with the references to score against and the set's name."""

    pad_token_id: int
    set_name: str
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [f["input_ids"][: f["prompt_length"]] for f in features]
        input_ids, attention_mask = pad_sequences(
            prompts, self.pad_token_id, "left", self.pad_to_multiple_of
        )  # (B, P), (B, P)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask),  # (B, P)
            "prompts": [f["prompt"] for f in features],
            "references": [list(f["references"]) for f in features],
            "index": [f["index"] for f in features],  # row in the split (orders gathered shards)
            "name": self.set_name,
        }


class IndexedRows(torch.utils.data.Dataset):
    """A split whose rows also carry their position, so that generations from several ranks (which
    DistributedSampler pads with repeats) can be de-duplicated and put back in dataset order."""

    def __init__(self, rows: datasets.Dataset) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.rows[index], "index": index}


# ----------------------------------------------------------------------------------------------- training order


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A random order of the rows that depends on (seed, epoch) only.

    PyTorch's RandomSampler draws its order from the global random state, which a resumed run does not share with
    the interrupted one; this order is recomputed identically after a restart. Lightning calls `set_epoch` before
    every epoch, directly or through the DistributedSamplerWrapper it puts around this sampler under DDP.
    """

    def __init__(self, num_rows: int, seed: int) -> None:
        self.num_rows, self.seed, self.epoch = num_rows, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_rows, generator=generator).tolist())  # (N,)


class ResumableDataLoader(DataLoader):
    """A DataLoader that continues an interrupted epoch at the exact next batch.

    Its state (`state_dict()`) is the epoch and the number of batches handed out in it. Lightning fetches batches
    one by one from a loader that has a length (it prefetches only when the length is unknown), so when a
    checkpoint is written that number is exactly the batches the training loop has taken. The first pass over the
    saved epoch after `load_state_dict` (or the `resume_at` argument) skips those batches: they are still read,
    which costs a few milliseconds each and works with any sampler Lightning substitutes (DDP, workers); another
    epoch is not skipped. Resume with the same batch size and number of devices.

    Args:
        resume_at: a `state_dict()` to resume from. An argument as well as `load_state_dict`, because Lightning
            rebuilds the loader from its arguments when it inserts a distributed sampler.
    """

    def __init__(
        self, dataset: Any, *args: Any, resume_at: dict[str, int] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.resume_at = dict(resume_at) if resume_at else None
        self._position = {"epoch": 0, "batches": 0}

    def state_dict(self) -> dict[str, int]:
        return dict(self._position)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.resume_at = dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        """Batches of the current epoch, minus those already trained on before a restart.

        A generator, so nothing happens before the first batch is asked for: Lightning creates the iterator before
        it restores the checkpoint and sets the sampler's epoch.
        """
        epoch = getattr(self.sampler, "epoch", 0)
        skip = self._batches_to_skip(epoch)
        self._position = {"epoch": epoch, "batches": 0}
        batches = super().__iter__()
        for batch in batches:
            self._position["batches"] += 1
            if self._position["batches"] > skip:
                yield batch

    def _batches_to_skip(self, epoch: int) -> int:
        """The saved position's batch count if it is this epoch's, once; 0 otherwise."""
        resume, self.resume_at = self.resume_at, None
        return resume["batches"] if resume is not None and resume["epoch"] == epoch else 0


# ----------------------------------------------------------------------------------------------- data module


@dataclass
class _SplitPlan:
    """What one split needs: its source, role, and (for a split cut from train) which part of it."""

    name: str
    source: Source
    role: str  # "train", "validation" or "test"
    part: str | None = None  # "train" or "validation" when val_size cuts one source in two


class InstructionDataModule(L.LightningDataModule):
    """Instruction-tuning data for distillation: training pairs, validation loss, and generation eval sets.

    Call `connect(tokenizer)` before `prepare_data()`/`setup()` (the CLI does it once the models are built).
    Training and validation batches are right-padded dicts (`input_ids`, `attention_mask`, `labels`,
    `position_ids`); test and predict batches are left-padded prompts with `references`, `prompts` and `name`
    (one dataloader per test set).

    Args:
        train: Training data: a .jsonl/.json/.parquet/.csv file, a folder (its `train.*` file, else all its
            data files), or a Hugging Face dataset id such as `databricks/databricks-dolly-15k`.
        validation: Validation data (same kinds as `train`; a folder means its `validation.*`/`valid.*` file).
            Leave unset and use `val_size` to hold rows out of `train` instead.
        test: Generation evaluation set(s), usually in the MiniLLM layout; a list gives several sets, each named
            after its file stem (or its folder, for generic stems such as `valid.jsonl`).
        hub_split: Split to load for hub ids; unset means "train", "validation" or "test" by role.
        revision: Hub revision (branch, tag or commit) for hub ids; pin it for reproducible caches.
        format: Row layout: "auto" (detected from the fields), "dolly", "alpaca", "minillm", "prompt_response"
            or "chat" (a `messages` list of {role, content}).
        field_map: Your column names for the roles `instruction`, `input`, `response`, `messages`,
            e.g. {"instruction": "question", "response": "answer"}.
        template: Prompt template: "alpaca" (with/without input, as in the paper's data), "chat" (the tokenizer's
            chat template) or your own string with an {instruction} and optionally an {input} placeholder.
        max_length: Longest prompt + response + EOS in tokens; longer responses are truncated (and counted).
        max_prompt_length: Longest prompt in tokens; training and validation rows with longer prompts are dropped,
            test-set prompts are cut to their first `max_prompt_length` tokens (the paper's protocol); both are
            counted in the log.
        min_reference_tokens: Per test set name, the fewest tokens (of the run's tokenizer) a reference must have:
            rows whose references are all shorter are dropped and counted (the paper: {sni: 11, unni: 11}).
        val_size: Rows of `train` to hold out for validation: a count (the paper holds out 1000 Dolly rows) or a
            fraction in (0, 1). The split is deterministic given `seed`.
        seed: Seed of the `val_size` split and of the training order (one fixed permutation per epoch).
        batch_size: Training (and validation-loss) batch size per device.
        eval_batch_size: Generation batch size per device; unset means `batch_size`.
        num_workers: DataLoader worker processes.
        pad_to_multiple_of: Pad each batch's length up to a multiple of this (8 suits tensor cores); unset pads
            to the batch's longest sequence only.
        cache_dir: Folder for tokenised splits (`tokenised/`) and downloaded hub data (`hub/`).
        skip_bad_rows: Skip rows that lack a required field or have the wrong type, logging how many, instead of
            stopping with an error.
        max_samples: Keep at most this many rows per split (the first ones), for quick runs.
    """

    def __init__(
        self,
        train: str | None = None,
        validation: str | None = None,
        test: str | list[str] | None = None,
        hub_split: str | None = None,
        revision: str | None = None,
        format: str = "auto",
        field_map: dict[str, str] | None = None,
        template: str = "alpaca",
        max_length: int = 512,
        max_prompt_length: int = 256,
        min_reference_tokens: dict[str, int] | None = None,
        val_size: int | float | None = None,
        seed: int = 42,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
        cache_dir: str = "data/cache",
        skip_bad_rows: bool = False,
        max_samples: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_choices(format, field_map, template)
        _check_sizes(max_length, max_prompt_length, val_size, validation)
        _check_at_least_one(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            pad_to_multiple_of=pad_to_multiple_of,
            max_samples=max_samples,
        )
        self.train, self.validation, self.hub_split, self.revision = train, validation, hub_split, revision
        self.test = [test] if isinstance(test, str) else list(test or [])
        self.format, self.field_map, self.template = format, dict(field_map or {}), template
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.val_size, self.seed, self.max_samples = val_size, seed, max_samples
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pad_to_multiple_of = num_workers, pad_to_multiple_of
        self.cache_dir, self.skip_bad_rows = Path(cache_dir), skip_bad_rows
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._tokenizer_key: str | None = None
        self.splits: dict[str, datasets.Dataset] = {}  # tokenised splits by name, filled by setup()
        self.stats: dict[str, SplitStats] = {}  # what the filters did to each split (also kept in the cache)
        self._plans = _plan_splits(train, validation, self.test, val_size)  # bad paths fail here, early
        self.min_reference_tokens = _check_reference_minimums(min_reference_tokens, self.test_set_names)
        self._hub_datasets: dict[tuple[str, str], datasets.Dataset] = {}
        self._train_resume_at: dict[str, int] | None = None  # from a checkpoint, see load_state_dict

    # ------------------------------------------------------------------ wiring

    def connect(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Give the data module the (teacher's and student's shared) tokenizer; needed before any data is built."""
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has no eos token; set tokenizer.eos_token"
            )
        self.tokenizer = tokenizer
        self._tokenizer_key = tokenizer_fingerprint(tokenizer)

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, or its eos id when it has none (GPT-2)."""
        tokenizer = self._require_tokenizer()
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def test_set_names(self) -> list[str]:
        """Names of the generation evaluation sets, in the order of the test dataloaders."""
        return [name for name, plan in self._plans.items() if plan.role == "test"]

    def eval_protocol(self) -> dict[str, Any]:
        """How the test sets were filtered, for results tables: prompt limit, prompts cut, rows dropped per set."""
        tested = [name for name in self.test_set_names if name in self.stats]
        return {
            "max_prompt_length": self.max_prompt_length,
            "min_reference_tokens": dict(self.min_reference_tokens),
            "prompts_truncated": {name: self.stats[name].prompts_truncated for name in tested},
            "short_references_dropped": {name: self.stats[name].short_references_dropped for name in tested},
        }

    def prepare_data(self) -> None:
        """Tokenise every configured split into the cache (Lightning runs this once per node, before setup)."""
        for plan in self._plans.values():
            self._ensure_cached(plan)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits the stage needs from the cache (building any that prepare_data did not)."""
        self._require_tokenizer()
        wanted = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}
        roles = wanted.get(stage or "", ("train", "validation", "test"))
        if stage == "fit" and self.train is None:
            raise ValueError("InstructionDataModule.train is not set: fitting needs training data")
        for name, plan in self._plans.items():
            if plan.role in roles and name not in self.splits:
                self.splits[name] = self._load(name)

    # ------------------------------------------------------------------ dataloaders

    def train_dataloader(self) -> ResumableDataLoader:
        """Right-padded training batches in an order fixed by `seed` and the epoch, resumable mid-epoch."""
        if "train" not in self.splits:
            self.splits["train"] = self._load("train")
        rows = self.splits["train"]
        return ResumableDataLoader(
            rows,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(rows), self.seed),
            num_workers=self.num_workers,
            collate_fn=TrainingCollator(self.pad_token_id, self.pad_to_multiple_of),
            resume_at=self._train_resume_at,
        )

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position, saved in checkpoints so that a resumed fit continues at the next batch.

        Lightning also saves the loader's own state, but hands it back only when the loader is built after the
        checkpoint is restored; `configure_optimizers` builds it earlier (through `estimated_stepping_batches`,
        Lightning issue #20550). A data module's state is restored before any loader exists.
        """
        loader = self.trainer.train_dataloader if self.trainer is not None else None
        return {"train_position": loader.state_dict()} if isinstance(loader, ResumableDataLoader) else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_resume_at = state_dict.get("train_position")

    def val_dataloader(self) -> DataLoader | list:
        """Teacher-forced validation batches (for the validation loss); empty when there is no validation set."""
        if "validation" not in self._plans:
            return []
        return self._loader("validation", TrainingCollator(self.pad_token_id, self.pad_to_multiple_of))

    def test_dataloader(self) -> list[DataLoader]:
        """One generation dataloader per test set (see `test_set_names`)."""
        return [self.generation_dataloader(name) for name in self.test_set_names]

    def predict_dataloader(self) -> list[DataLoader]:
        """Generation over the test sets, or over the validation set when no test set is configured."""
        names = self.test_set_names or ["validation"]
        return [self.generation_dataloader(name) for name in names]

    def generation_dataloader(self, name: str = "validation") -> DataLoader:
        """Left-padded prompt batches of one split ("validation" or a test set's name), with references and
        each row's `index` in the split."""
        collator = GenerationCollator(self.pad_token_id, name, self.pad_to_multiple_of)
        return self._loader(name, collator, batch_size=self.eval_batch_size, indexed=True)

    def _loader(
        self,
        name: str,
        collator: Callable,
        shuffle: bool = False,
        batch_size: int | None = None,
        indexed: bool = False,
    ) -> DataLoader:
        if name not in self.splits:
            if name not in self._plans:
                raise ValueError(f"no split named {name!r}; configured: {sorted(self._plans)}")
            self.splits[name] = self._load(name)
        return DataLoader(
            IndexedRows(self.splits[name]) if indexed else self.splits[name],
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collator,
        )

    # ------------------------------------------------------------------ building and caching

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise RuntimeError(
                "InstructionDataModule has no tokenizer: call datamodule.connect(tokenizer) first"
            )
        return self.tokenizer

    def _cache_path(self, plan: _SplitPlan) -> Path:
        source = plan.source
        source_key = file_fingerprint(source.files) if source.files else self._hub_fingerprint(plan)
        settings = {
            "version": CACHE_VERSION,
            "split": plan.name,
            "part": plan.part,
            "source": source_key,
            "tokenizer": self._tokenizer_key,
            "template": self.template,
            "format": self.format,
            "field_map": self.field_map,
            "lengths": [self.max_length, self.max_prompt_length],
            "long_prompts": "truncate" if plan.role == "test" else "drop",
            "min_reference_tokens": self.min_reference_tokens.get(plan.name),
            "val_size": self.val_size if plan.part else None,
            "seed": self.seed if plan.part else None,
            "max_samples": self.max_samples,
            "skip_bad_rows": self.skip_bad_rows,
        }
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
        return self.cache_dir / "tokenised" / f"{plan.name}-{key}"

    def _ensure_cached(self, plan: _SplitPlan) -> Path:
        """The split's cache folder, tokenising into it first when it is missing."""
        self._require_tokenizer()
        path = self._cache_path(plan)
        if not (path / "stats.json").is_file():
            stats = SplitStats()
            _save_atomically(self._build(plan, stats), stats, path)
        return path

    def _load(self, name: str) -> datasets.Dataset:
        """A tokenised split, memory-mapped from the cache (cheap to share with dataloader workers)."""
        path = self._ensure_cached(self._plans[name])
        self.stats[name] = SplitStats(**json.loads((path / "stats.json").read_text()))
        log.info("%s: %d tokenised rows from %s", name, self.stats[name].kept, path)
        return datasets.load_from_disk(str(path / "dataset"))

    def _build(self, plan: _SplitPlan, stats: SplitStats) -> datasets.Dataset:
        examples = self._read_examples(plan, stats)
        if plan.name in self.min_reference_tokens:
            examples, stats.short_references_dropped = _drop_short_references(
                examples, self.tokenizer, self.min_reference_tokens[plan.name]
            )
        render = make_prompt_renderer(self.template, self._require_tokenizer())
        prompts = [render(example) for example in examples]
        tokenised = tokenize_examples(
            prompts,
            [example.response for example in examples],
            self.tokenizer,
            prompt_special_tokens=self.template != "chat",
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            truncate_prompts=plan.role == "test",
        )
        stats.long_prompts_dropped = len(examples) - len(tokenised.kept)
        stats.kept, stats.responses_truncated = len(tokenised.kept), tokenised.truncated
        stats.prompts_truncated = len(tokenised.cut_prompts)
        _log_stats(plan, stats, self.max_prompt_length, self.max_length)
        if not tokenised.kept:
            raise ValueError(
                f"{plan.name} set from {plan.source.origin} is empty after filtering: {_describe(stats)}"
            )
        return datasets.Dataset.from_dict(
            {
                "input_ids": tokenised.sequences,
                "prompt_length": tokenised.prompt_lengths,
                "prompt": [  # a cut prompt as the model sees it
                    self.tokenizer.decode(ids[:length]) if i in tokenised.cut_prompts else prompts[i]
                    for i, ids, length in zip(
                        tokenised.kept, tokenised.sequences, tokenised.prompt_lengths, strict=True
                    )
                ],
                "references": [list(examples[i].references) for i in tokenised.kept],
            }
        )

    def _read_examples(self, plan: _SplitPlan, stats: SplitStats) -> list[Example]:
        """Rows -> examples (bad rows raised or skipped), then the val_size cut and the max_samples cap."""
        rows = self._read_rows(plan)
        stats.rows_read = len(rows)
        if not rows:
            raise ValueError(f"{plan.source.origin}: no rows")
        row_format = resolve_format(self.format, self.field_map, set(rows[0].values), plan.source.origin)
        if row_format.name == "chat" and self.template != "chat":
            raise ValueError(
                f"{plan.source.origin}: format 'chat' needs template 'chat', not {self.template!r}"
            )
        examples = []
        for row in rows:
            try:
                examples.append(row_to_example(row, row_format))
            except BadRowError:
                if not self.skip_bad_rows:
                    raise
                stats.bad_rows_skipped += 1
        if plan.part:
            examples, stats.in_other_split = _cut(
                examples, plan.part, self.val_size, self.seed, plan.source.origin
            )
        if self.max_samples is not None and len(examples) > self.max_samples:
            stats.over_max_samples = len(examples) - self.max_samples
            examples = examples[: self.max_samples]
        return examples

    def _read_rows(self, plan: _SplitPlan) -> list[Row]:
        source = plan.source
        if source.hub_id is not None:
            return self._hub_rows(plan)
        table_cache = self.cache_dir / "tables"
        rows: list[Row] = []
        for path in source.files:
            rows += (
                read_table_rows(path, table_cache)
                if path.suffix in (".parquet", ".csv")
                else read_json_rows(path)
            )
        return rows

    def _hub_split(self, plan: _SplitPlan) -> str:
        return self.hub_split or ("train" if plan.part else plan.role)

    def _hub_fingerprint(self, plan: _SplitPlan) -> str:
        dataset = self._hub_dataset(plan)
        # datasets' own fingerprint of the downloaded files: it changes when the hub data changes
        return f"{plan.source.hub_id}@{self.revision}:{self._hub_split(plan)}:{dataset._fingerprint}"

    def _hub_dataset(self, plan: _SplitPlan) -> datasets.Dataset:
        key = (plan.source.hub_id, self._hub_split(plan))
        if key not in self._hub_datasets:
            self._hub_datasets[key] = load_hub_dataset(*key, self.revision, self.cache_dir / "hub")
        return self._hub_datasets[key]

    def _hub_rows(self, plan: _SplitPlan) -> list[Row]:
        where = f"{plan.source.hub_id}[{self._hub_split(plan)}]"
        return [Row(record, f"{where} row {n}") for n, record in enumerate(self._hub_dataset(plan), start=1)]


def _check_choices(row_format: str, field_map: dict[str, str] | None, template: str) -> None:
    """Configuration errors surface when the data module is built, before any model or data is loaded."""
    if row_format != "auto" and row_format not in FORMATS:
        raise ValueError(f"format {row_format!r}: use 'auto' or one of {', '.join(FORMATS)}")
    if unknown := set(field_map or {}) - set(ROLES):
        raise ValueError(f"field_map keys {sorted(unknown)}: the roles are {', '.join(ROLES)}")
    validate_template(template)


def _check_sizes(
    max_length: int, max_prompt_length: int, val_size: int | float | None, validation: str | None
) -> None:
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"max_prompt_length={max_prompt_length} must be positive and below max_length={max_length}"
        )
    if val_size is not None and validation is not None:
        raise ValueError("give either validation or val_size, not both")
    if val_size is not None and (val_size <= 0 or (isinstance(val_size, float) and val_size >= 1)):
        raise ValueError(f"val_size={val_size}: use a row count >= 1 or a fraction in (0, 1)")


def _check_reference_minimums(minimums: dict[str, int] | None, test_sets: list[str]) -> dict[str, int]:
    """`min_reference_tokens` names test sets by their names (file stem, or folder for valid.jsonl)."""
    minimums = dict(minimums or {})
    for name, tokens in minimums.items():
        if name not in test_sets:
            raise ValueError(
                f"min_reference_tokens: no test set named {name!r} (test sets: {', '.join(test_sets) or 'none'})"
            )
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"min_reference_tokens[{name!r}]={tokens!r}: use a positive token count")
    return minimums


def _drop_short_references(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, minimum: int
) -> tuple[list[Example], int]:
    """The examples with at least one reference of `minimum` tokens or more, and how many were dropped."""
    kept = [
        example
        for example in examples
        if any(
            len(ids) >= minimum
            for ids in tokenizer(list(example.references), add_special_tokens=False)["input_ids"]
        )
    ]
    return kept, len(examples) - len(kept)


def _check_at_least_one(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name}={value}: must be at least 1")


def _plan_splits(
    train: str | None, validation: str | None, test: list[str], val_size: int | float | None
) -> dict[str, _SplitPlan]:
    """Name every split and resolve its source; a val_size split makes two plans over the train source."""
    plans: dict[str, _SplitPlan] = {}
    if train is not None:
        source = resolve_source(train, "train")
        plans["train"] = _SplitPlan("train", source, "train", "train" if val_size else None)
        if val_size:
            plans["validation"] = _SplitPlan("validation", source, "validation", "validation")
    if validation is not None:
        plans["validation"] = _SplitPlan("validation", resolve_source(validation, "validation"), "validation")
    for value in test:
        source = resolve_source(value, "test")
        if source.name in plans:
            raise ValueError(
                f"test set {value!r}: name {source.name!r} is already taken; rename the file or folder"
            )
        plans[source.name] = _SplitPlan(source.name, source, "test")
    return plans


def _cut(examples: list[Example], part: str, val_size: int | float, seed: int, origin: str):
    """One side of a seeded random train/validation split; returns it and the number of rows on the other side."""
    count = round(val_size * len(examples)) if isinstance(val_size, float) else val_size
    if not 0 < count < len(examples):
        raise ValueError(
            f"val_size={val_size} leaves no training or no validation rows in {origin} ({len(examples)} rows)"
        )
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))  # (N,)
    validation_rows = set(order[:count].tolist())
    chosen = [e for i, e in enumerate(examples) if (i in validation_rows) == (part == "validation")]
    return chosen, len(examples) - len(chosen)


def _describe(stats: SplitStats) -> str:
    """Where the rows went, for logs and for the empty-split error."""
    return ", ".join(
        [
            f"{stats.rows_read} rows read",
            f"{stats.bad_rows_skipped} bad rows skipped",
            f"{stats.in_other_split} in the other val_size split",
            f"{stats.over_max_samples} over max_samples",
            f"{stats.short_references_dropped} dropped for short references",
            f"{stats.long_prompts_dropped} dropped for long prompts",
        ]
    )


def _log_stats(plan: _SplitPlan, stats: SplitStats, max_prompt_length: int, max_length: int) -> None:
    log.info("%s (%s): kept %d rows; %s", plan.name, plan.source.origin, stats.kept, _describe(stats))
    if stats.bad_rows_skipped:
        log.warning("%s: skipped %d bad rows (skip_bad_rows=True)", plan.name, stats.bad_rows_skipped)
    if stats.long_prompts_dropped:
        log.warning(
            "%s: dropped %d rows with prompts over max_prompt_length=%d tokens",
            plan.name,
            stats.long_prompts_dropped,
            max_prompt_length,
        )
    if stats.prompts_truncated:
        log.warning(
            "%s: cut %d prompts to their first max_prompt_length=%d tokens",
            plan.name,
            stats.prompts_truncated,
            max_prompt_length,
        )
    if stats.responses_truncated:
        log.warning(
            "%s: truncated %d responses to fit max_length=%d tokens",
            plan.name,
            stats.responses_truncated,
            max_length,
        )


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide `datasets`' per-save progress bars (noise next to our one-line counts), then restore the setting."""
    were_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not were_disabled:
            datasets.utils.enable_progress_bars()


def _save_atomically(dataset: datasets.Dataset, stats: SplitStats, path: Path) -> None:
    """Write to a temporary folder then rename, so a concurrent or interrupted run never sees half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    with _quiet_progress_bars():
        dataset.save_to_disk(str(staging / "dataset"))
    (staging / "stats.json").write_text(json.dumps(stats.__dict__))
    try:
        staging.rename(path)
    except OSError:  # another process finished first: its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
