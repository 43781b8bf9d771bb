"""Instruction data: sources, formats, prompt templates, cached tokenisation and collation.

The pipeline for one split is: resolve the source (local file, folder or hub id) -> read its rows -> map each row
to an `Example` through a format (Dolly, Alpaca, MiniLLM, prompt/response, chat) -> render the prompt with a
template -> tokenise prompt and response -> drop over-long prompts, truncate over-long responses -> cache on disk.
`InstructionDataModule` runs that pipeline in `prepare_data()` (once per node) and loads the cache in `setup()`
(on every rank), so under DDP tokenisation happens once and Lightning's distributed sampler shards the batches.
"""

from __future__ import annotations

from distillens.data.collate import (
    GenerationCollator,
    IndexedRows,
    TrainingCollator,
    pad_sequences,
    position_ids_from_mask,
)
from distillens.data.datamodule import CACHE_VERSION, InstructionDataModule
from distillens.data.formats import (
    ALPACA_COLUMNS,
    DETECTION_ORDER,
    FORMATS,
    INSTRUCTION_AND_RESPONSE,
    ROLES,
    BadRowError,
    Example,
    RowFormat,
    resolve_format,
    row_to_example,
)
from distillens.data.loading import EpochShuffleSampler, ResumableDataLoader
from distillens.data.sources import (
    DATA_SUFFIXES,
    GENERIC_STEMS,
    SPLIT_FILE_STEMS,
    VALIDATION_STEMS,
    Row,
    Source,
    file_fingerprint,
    hub_offline,
    load_hub_dataset,
    read_json_rows,
    read_table_rows,
    resolve_source,
)
from distillens.data.templates import (
    ALPACA_NO_INPUT,
    ALPACA_WITH_INPUT,
    TEMPLATE_FIELDS,
    make_prompt_renderer,
    render_alpaca,
    render_chat,
    render_string,
    validate_template,
)
from distillens.data.tokenisation import SplitStats, Tokenised, tokenize_examples, tokenizer_fingerprint
from distillens.hub import HUB_ID, HUB_PROBE_TIMEOUT_S, hub_reachable
from distillens.losses import IGNORE_INDEX

__all__ = [
    "ALPACA_COLUMNS",
    "ALPACA_NO_INPUT",
    "ALPACA_WITH_INPUT",
    "BadRowError",
    "CACHE_VERSION",
    "DATA_SUFFIXES",
    "DETECTION_ORDER",
    "EpochShuffleSampler",
    "Example",
    "FORMATS",
    "GENERIC_STEMS",
    "GenerationCollator",
    "HUB_ID",
    "HUB_PROBE_TIMEOUT_S",
    "IGNORE_INDEX",
    "INSTRUCTION_AND_RESPONSE",
    "IndexedRows",
    "InstructionDataModule",
    "ROLES",
    "ResumableDataLoader",
    "Row",
    "RowFormat",
    "SPLIT_FILE_STEMS",
    "Source",
    "SplitStats",
    "TEMPLATE_FIELDS",
    "Tokenised",
    "TrainingCollator",
    "VALIDATION_STEMS",
    "file_fingerprint",
    "hub_offline",
    "hub_reachable",
    "load_hub_dataset",
    "make_prompt_renderer",
    "pad_sequences",
    "position_ids_from_mask",
    "read_json_rows",
    "read_table_rows",
    "render_alpaca",
    "render_chat",
    "render_string",
    "resolve_format",
    "resolve_source",
    "row_to_example",
    "tokenize_examples",
    "tokenizer_fingerprint",
    "validate_template",
]
