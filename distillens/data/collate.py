"""Collation: tokenised rows padded into batches, right-padded with labels for teacher forcing, left-padded prompts
for generation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from distillens.losses import IGNORE_INDEX

PROMPT_LENGTHS = "prompt_lengths"
"""The training batch's (B,) prompt length of each row: where its response starts (on-policy training answers the
prompts). Optional in a batch built by hand: only on-policy training reads it."""

EXAMPLE_INDEX = "example_index"
"""The batch's (B,) row of each example in its split, when the rows carry one (``IndexedRows``): where a teacher
cache keeps that example's targets, whatever order the loader drew it in."""


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
    """Right-padded teacher-forcing batches; labels are the ids on response/EOS tokens, -100 elsewhere, and each
    row's prompt length is kept (``PROMPT_LENGTHS``), and its index in the split when it has one (``EXAMPLE_INDEX``)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_sequences(
            [f["input_ids"] for f in features], self.pad_token_id, "right", self.pad_to_multiple_of
        )  # (B, T), (B, T)
        prompt_lengths = torch.tensor([f["prompt_length"] for f in features])  # (B,)
        in_prompt = torch.arange(input_ids.shape[1]) < prompt_lengths[:, None]  # (B, T)
        labels = input_ids.masked_fill(in_prompt | (attention_mask == 0), IGNORE_INDEX)  # (B, T)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "position_ids": position_ids_from_mask(attention_mask),  # (B, T)
            PROMPT_LENGTHS: prompt_lengths,  # (B,)
        }
        if all("index" in f for f in features):
            batch[EXAMPLE_INDEX] = torch.tensor([f["index"] for f in features])  # (B,)
        return batch


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

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A whole batch's rows in one read, as `datasets` serves them to a DataLoader."""
        fetch = getattr(self.rows, "__getitems__", None)  # a plain list has none
        rows = fetch(indices) if fetch is not None else [self.rows[index] for index in indices]
        return [{**row, "index": index} for row, index in zip(rows, indices, strict=True)]
