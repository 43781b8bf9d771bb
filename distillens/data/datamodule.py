"""`InstructionDataModule`: the pipeline of sources, formats, templates and tokenisation for every configured split,
cached on disk, and the dataloaders Lightning asks for."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from distillens.data.collate import GenerationCollator, IndexedRows, TrainingCollator
from distillens.data.formats import FORMATS, ROLES, BadRowError, Example, resolve_format, row_to_example
from distillens.data.loading import EpochShuffleSampler, ResumableDataLoader
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
from distillens.data.tokenisation import SplitStats, tokenize_examples, tokenizer_fingerprint
from distillens.hub import build_once

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the tokenised layout or the filters change, to invalidate old caches


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
        if not examples:  # nothing left to tokenise (e.g. every response empty)
            raise _empty_after_filtering(plan, stats)
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
            raise _empty_after_filtering(plan, stats)
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
        answered = [e for e in examples if any(reference.strip() for reference in e.references)]
        stats.empty_responses_dropped = len(examples) - len(answered)
        examples = answered
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


def _empty_after_filtering(plan: _SplitPlan, stats: SplitStats) -> ValueError:
    return ValueError(
        f"{plan.name} set from {plan.source.origin} is empty after filtering: {_describe(stats)}"
    )


def _describe(stats: SplitStats) -> str:
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


def _log_stats(plan: _SplitPlan, stats: SplitStats, max_prompt_length: int, max_length: int) -> None:
    """What the filters did, as progress (stdout): dropping long prompts and cutting long responses is the
    configured protocol, not a problem. Rows that do not fit their format or have no answer are warnings."""
    log.info("%s (%s): kept %d rows; %s", plan.name, plan.source.origin, stats.kept, _describe(stats))
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

    def write(staging: Path) -> None:
        with _quiet_progress_bars():
            dataset.save_to_disk(str(staging / "dataset"))
        (staging / "stats.json").write_text(json.dumps(stats.__dict__))

    build_once(path, write)  # when another process finished first, its copy is identical and is kept
