"""One split's way from its source to tokenised rows, as plain functions: name the splits and resolve their sources,
read rows, map them to examples, filter and cut, render prompts and tokenise.

`InstructionDataModule` runs this for every split and caches the result (`data/cache.py`); nothing here knows
about Lightning, so the pipeline can be run, tested and reused (a teacher pass, a script) without a trainer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from distillens.data.formats import FORMATS, ROLES, BadRowError, Example, resolve_format, row_to_example
from distillens.data.sources import (
    Row,
    Source,
    file_fingerprint,
    load_hub_dataset,
    read_json_rows,
    read_table_rows,
    resolve_source,
)
from distillens.data.templates import make_prompt_renderer, validate_template
from distillens.data.tokenisation import SplitStats, tokenize_examples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineSettings:
    """The data module's settings that decide which rows a split holds and how they are tokenised (each one is
    documented on `InstructionDataModule`)."""

    format: str = "auto"
    field_map: dict[str, str] = field(default_factory=dict)
    template: str = "alpaca"
    max_length: int = 512
    max_prompt_length: int = 256
    min_reference_tokens: dict[str, int] = field(default_factory=dict)
    val_size: int | float | None = None
    seed: int = 42
    max_samples: int | None = None
    skip_bad_rows: bool = False
    hub_split: str | None = None
    revision: str | None = None


@dataclass
class SplitPlan:
    """What one split needs: its source, role, and (for a split cut from train) which part of it."""

    name: str
    source: Source
    role: str  # "train", "validation" or "test"
    part: str | None = None  # "train" or "validation" when val_size cuts one source in two

    @property
    def long_prompts(self) -> str:
        """Test-set prompts over the limit are cut (the paper's protocol); training and validation rows dropped."""
        return "truncate" if self.role == "test" else "drop"


# ---------------------------------------------------------------------------------------------- checks and plans


def check_choices(row_format: str, field_map: dict[str, str] | None, template: str) -> None:
    """Configuration errors surface when the data module is built, before any model or data is loaded."""
    if row_format != "auto" and row_format not in FORMATS:
        raise ValueError(f"format {row_format!r}: use 'auto' or one of {', '.join(FORMATS)}")
    if unknown := set(field_map or {}) - set(ROLES):
        raise ValueError(f"field_map keys {sorted(unknown)}: the roles are {', '.join(ROLES)}")
    validate_template(template)


def check_sizes(
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


def check_reference_minimums(minimums: dict[str, int] | None, test_sets: list[str]) -> dict[str, int]:
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


def check_at_least_one(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name}={value}: must be at least 1")


def plan_splits(
    train: str | None, validation: str | None, test: list[str], val_size: int | float | None
) -> dict[str, SplitPlan]:
    """Name every split and resolve its source; a val_size split makes two plans over the train source."""
    plans: dict[str, SplitPlan] = {}
    if train is not None:
        source = resolve_source(train, "train")
        plans["train"] = SplitPlan("train", source, "train", "train" if val_size else None)
        if val_size:
            plans["validation"] = SplitPlan("validation", source, "validation", "validation")
    if validation is not None:
        plans["validation"] = SplitPlan("validation", resolve_source(validation, "validation"), "validation")
    for value in test:
        source = resolve_source(value, "test")
        if source.name in plans:
            raise ValueError(
                f"test set {value!r}: name {source.name!r} is already taken; rename the file or folder"
            )
        plans[source.name] = SplitPlan(source.name, source, "test")
    return plans


# ---------------------------------------------------------------------------------------------- reading


class SourceReader:
    """Reads the splits' sources: local files (tables through a parquet/csv cache under ``cache_dir/tables``) or
    hub datasets, each downloaded (or read from `datasets`' cache under ``cache_dir/hub``) once."""

    def __init__(self, settings: PipelineSettings, cache_dir: Path) -> None:
        self.settings, self.cache_dir = settings, cache_dir
        self._hub_datasets: dict[tuple[str, str], datasets.Dataset] = {}

    def rows(self, plan: SplitPlan) -> list[Row]:
        """Every row of the split's source: its local files in order, or the hub dataset."""
        if plan.source.hub_id is not None:
            where = f"{plan.source.hub_id}[{self._hub_split(plan)}]"
            return [
                Row(record, f"{where} row {n}") for n, record in enumerate(self._hub_dataset(plan), start=1)
            ]
        rows: list[Row] = []
        for path in plan.source.files:
            table = path.suffix in (".parquet", ".csv")
            rows += read_table_rows(path, self.cache_dir / "tables") if table else read_json_rows(path)
        return rows

    def fingerprint(self, plan: SplitPlan) -> str:
        """What identifies the source's content: its files' fingerprint, or datasets' own fingerprint of the
        downloaded hub files (it changes when the hub data changes)."""
        if plan.source.files:
            return file_fingerprint(plan.source.files)
        fingerprint = self._hub_dataset(plan)._fingerprint
        return f"{plan.source.hub_id}@{self.settings.revision}:{self._hub_split(plan)}:{fingerprint}"

    def _hub_split(self, plan: SplitPlan) -> str:
        return self.settings.hub_split or ("train" if plan.part else plan.role)

    def _hub_dataset(self, plan: SplitPlan) -> datasets.Dataset:
        key = (plan.source.hub_id, self._hub_split(plan))
        if key not in self._hub_datasets:
            self._hub_datasets[key] = load_hub_dataset(*key, self.settings.revision, self.cache_dir / "hub")
        return self._hub_datasets[key]


def read_examples(
    plan: SplitPlan, settings: PipelineSettings, rows: list[Row], stats: SplitStats
) -> list[Example]:
    """Rows -> examples (bad rows raised or skipped), then the val_size cut and the max_samples cap."""
    stats.rows_read = len(rows)
    if not rows:
        raise ValueError(f"{plan.source.origin}: no rows")
    row_format = resolve_format(settings.format, settings.field_map, set(rows[0].values), plan.source.origin)
    if row_format.name == "chat" and settings.template != "chat":
        raise ValueError(
            f"{plan.source.origin}: format 'chat' needs template 'chat', not {settings.template!r}"
        )
    examples = []
    for row in rows:
        try:
            examples.append(row_to_example(row, row_format))
        except BadRowError:
            if not settings.skip_bad_rows:
                raise
            stats.bad_rows_skipped += 1
    answered = [e for e in examples if any(reference.strip() for reference in e.references)]
    stats.empty_responses_dropped = len(examples) - len(answered)
    examples = answered
    if plan.part:
        examples, stats.in_other_split = cut(
            examples, plan.part, settings.val_size, settings.seed, plan.source.origin
        )
    if settings.max_samples is not None and len(examples) > settings.max_samples:
        stats.over_max_samples = len(examples) - settings.max_samples
        examples = examples[: settings.max_samples]
    return examples


def cut(examples: list[Example], part: str, val_size: int | float, seed: int, origin: str):
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


def drop_short_references(
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


# ---------------------------------------------------------------------------------------------- tokenising


def build_split(
    plan: SplitPlan,
    settings: PipelineSettings,
    tokenizer: PreTrainedTokenizerBase,
    reader: SourceReader,
    stats: SplitStats,
) -> datasets.Dataset:
    """The split's tokenised rows (`input_ids`, `prompt_length`, `prompt`, `references`), with what each filter
    did counted in ``stats``."""
    examples = read_examples(plan, settings, reader.rows(plan), stats)
    if plan.name in settings.min_reference_tokens:
        examples, stats.short_references_dropped = drop_short_references(
            examples, tokenizer, settings.min_reference_tokens[plan.name]
        )
    if not examples:  # nothing left to tokenise (e.g. every response empty)
        raise empty_after_filtering(plan, stats)
    return tokenise_split(plan, settings, examples, tokenizer, stats)


def tokenise_split(
    plan: SplitPlan,
    settings: PipelineSettings,
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    stats: SplitStats,
) -> datasets.Dataset:
    """Render each example's prompt, tokenise prompt and response under the length limits, keep what fits."""
    render = make_prompt_renderer(settings.template, tokenizer)
    prompts = [render(example) for example in examples]
    tokenised = tokenize_examples(
        prompts,
        [example.response for example in examples],
        tokenizer,
        prompt_special_tokens=settings.template != "chat",
        max_length=settings.max_length,
        max_prompt_length=settings.max_prompt_length,
        truncate_prompts=plan.long_prompts == "truncate",
    )
    stats.long_prompts_dropped = len(examples) - len(tokenised.kept)
    stats.kept, stats.responses_truncated = len(tokenised.kept), tokenised.truncated
    stats.prompts_truncated = len(tokenised.cut_prompts)
    log_stats(plan, stats, settings.max_prompt_length, settings.max_length)
    if not tokenised.kept:
        raise empty_after_filtering(plan, stats)
    shown_prompts = [  # a cut prompt as the model sees it
        tokenizer.decode(ids[:length]) if i in tokenised.cut_prompts else prompts[i]
        for i, ids, length in zip(tokenised.kept, tokenised.sequences, tokenised.prompt_lengths, strict=True)
    ]
    return datasets.Dataset.from_dict(
        {
            "input_ids": tokenised.sequences,
            "prompt_length": tokenised.prompt_lengths,
            "prompt": shown_prompts,
            "references": [list(examples[i].references) for i in tokenised.kept],
        }
    )


# ---------------------------------------------------------------------------------------------- what was kept


def empty_after_filtering(plan: SplitPlan, stats: SplitStats) -> ValueError:
    return ValueError(
        f"{plan.name} set from {plan.source.origin} is empty after filtering: {describe(stats)}"
    )


def describe(stats: SplitStats) -> str:
    """Where the rows went, for logs and for the empty-split error."""
    return ", ".join(
        [
            f"{stats.rows_read} rows read",
            f"{stats.bad_rows_skipped} bad rows skipped",
            f"{stats.empty_responses_dropped} dropped for empty responses",
            f"{stats.in_other_split} in the other val_size split",
            f"{stats.over_max_samples} over max_samples",
            f"{stats.short_references_dropped} dropped for short references",
            f"{stats.long_prompts_dropped} dropped for long prompts",
        ]
    )


def log_stats(plan: SplitPlan, stats: SplitStats, max_prompt_length: int, max_length: int) -> None:
    """What the filters did, as progress (stdout): dropping long prompts and cutting long responses is the
    configured protocol, not a problem. Rows that do not fit their format or have no answer are warnings."""
    log.info("%s (%s): kept %d rows; %s", plan.name, plan.source.origin, stats.kept, describe(stats))
    if stats.bad_rows_skipped:
        log.warning("%s: skipped %d bad rows (skip_bad_rows=True)", plan.name, stats.bad_rows_skipped)
    if stats.empty_responses_dropped:
        log.warning("%s: dropped %d rows with an empty response", plan.name, stats.empty_responses_dropped)
    notes = [
        (
            stats.long_prompts_dropped,
            f"dropped %d rows with prompts over max_prompt_length={max_prompt_length} tokens",
        ),
        (
            stats.prompts_truncated,
            f"cut %d prompts to their first max_prompt_length={max_prompt_length} tokens",
        ),
        (stats.responses_truncated, f"truncated %d responses to fit max_length={max_length} tokens"),
    ]
    for count, note in notes:
        if count:
            log.info(f"%s: {note}", plan.name, count)
