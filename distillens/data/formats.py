"""Formats: which column of a row holds the instruction, input, response or chat messages (Dolly, Alpaca,
MiniLLM, prompt/response, chat), detected from the fields or named, and the mapping of a row to an `Example`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distillens.data.sources import Row


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

CHAT_ROLES = ("system", "user", "assistant")
"""Roles a chat row's messages may take (what chat templates render)."""
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
    unknown = sorted({m["role"] for m in messages} - set(CHAT_ROLES))
    if unknown:
        raise BadRowError(
            f"{row.where}: field {column!r} has unknown role(s) {unknown}; use {', '.join(CHAT_ROLES)}"
        )
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise BadRowError(f"{row.where}: field {column!r} must end with an assistant message after a prompt")
    history = tuple({"role": m["role"], "content": m["content"]} for m in messages[:-1])
    answer = messages[-1]["content"]
    return Example(history[-1]["content"], "", answer, (answer,), history)
