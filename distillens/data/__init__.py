"""Instruction data: sources, formats, prompt templates, the pipeline that tokenises a split, its cache, collation
and loading.

The pipeline for one split (`pipeline.py`) is: resolve the source (local file, folder or hub id) -> read its rows
-> map each row to an `Example` through a format (Dolly, Alpaca, MiniLLM, prompt/response, chat) -> render the
prompt with a template -> tokenise prompt and response -> drop over-long prompts, truncate over-long responses;
`cache.py` keeps the result on disk. `InstructionDataModule` runs that pipeline in `prepare_data()` (once per node)
and loads the cache in `setup()` (on every rank), so under DDP tokenisation happens once and Lightning's
distributed sampler shards the batches.

`InstructionDataModule` is imported on first use (it needs Lightning): code that only collates or tokenises, such
as on-policy training, loads this package without Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distillens.data.collate import (
    GenerationCollator,
    IndexedRows,
    TrainingCollator,
    pad_sequences,
    position_ids_from_mask,
)
from distillens.data.formats import Example
from distillens.data.loading import EpochShuffleSampler, ResumableDataLoader
from distillens.data.templates import make_prompt_renderer
from distillens.data.tokenisation import SplitStats, tokenize_examples

if TYPE_CHECKING:
    from distillens.data.datamodule import InstructionDataModule

__all__ = [
    "EpochShuffleSampler",
    "Example",
    "GenerationCollator",
    "IndexedRows",
    "InstructionDataModule",
    "ResumableDataLoader",
    "SplitStats",
    "TrainingCollator",
    "make_prompt_renderer",
    "pad_sequences",
    "position_ids_from_mask",
    "tokenize_examples",
]


def __getattr__(name: str) -> Any:
    """`InstructionDataModule`, imported with Lightning when first asked for."""
    if name == "InstructionDataModule":
        from distillens.data.datamodule import InstructionDataModule

        return InstructionDataModule
    raise AttributeError(f"module 'distillens.data' has no attribute {name!r}")
