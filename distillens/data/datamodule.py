"""`InstructionDataModule`: Lightning's hooks and dataloaders around the data pipeline (`data/pipeline.py`) and its
cache (`data/cache.py`), for every configured split."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from distillens.data.cache import ensure_cached, load_cached, split_cache_path
from distillens.data.collate import GenerationCollator, IndexedRows, TrainingCollator
from distillens.data.loading import EpochShuffleSampler, ResumableDataLoader
from distillens.data.pipeline import (
    PipelineSettings,
    SourceReader,
    SplitPlan,
    build_split,
    check_at_least_one,
    check_choices,
    check_reference_minimums,
    check_sizes,
    plan_splits,
)
from distillens.data.tokenisation import SplitStats, tokenizer_fingerprint

log = logging.getLogger(__name__)


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
        check_choices(format, field_map, template)
        check_sizes(max_length, max_prompt_length, val_size, validation)
        check_at_least_one(
            batch_size=batch_size, eval_batch_size=eval_batch_size, pad_to_multiple_of=pad_to_multiple_of,
            max_samples=max_samples,
        )  # fmt: skip
        self.train, self.validation = train, validation
        self.test = [test] if isinstance(test, str) else list(test or [])
        self.template, self.max_length, self.max_prompt_length = template, max_length, max_prompt_length
        self.seed, self.batch_size, self.eval_batch_size = seed, batch_size, eval_batch_size or batch_size
        self.num_workers, self.pad_to_multiple_of = num_workers, pad_to_multiple_of
        self.cache_dir = Path(cache_dir)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._tokenizer_key: str | None = None
        self.splits: dict[str, datasets.Dataset] = {}  # tokenised splits by name, filled by setup()
        self.stats: dict[str, SplitStats] = {}  # what the filters did to each split (also kept in the cache)
        self._plans = plan_splits(train, validation, self.test, val_size)  # bad paths fail here, early
        self.min_reference_tokens = check_reference_minimums(min_reference_tokens, self.test_set_names)
        self.settings = PipelineSettings(
            format=format, field_map=dict(field_map or {}), template=template, max_length=max_length,
            max_prompt_length=max_prompt_length, min_reference_tokens=self.min_reference_tokens, val_size=val_size,
            seed=seed, max_samples=max_samples, skip_bad_rows=skip_bad_rows, hub_split=hub_split, revision=revision,
        )  # fmt: skip
        self._reader = SourceReader(self.settings, self.cache_dir)
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
            IndexedRows(rows),  # each row's index: where a teacher cache keeps its targets
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
        collator = TrainingCollator(self.pad_token_id, self.pad_to_multiple_of)
        return self._loader("validation", collator, indexed=True)

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

    def _ensure_cached(self, plan: SplitPlan) -> Path:
        """The split's cache folder, running the pipeline into it first when it is missing."""
        self._require_tokenizer()
        source_key = self._reader.fingerprint(plan)
        path = split_cache_path(self.cache_dir, plan, self.settings, source_key, self._tokenizer_key)
        return ensure_cached(path, lambda stats: self._build(plan, stats))

    def split_key(self, name: str) -> str:
        """A split's token-cache folder name: a hash of all its rows depend on (part of a teacher cache's key)."""
        return self._ensure_cached(self._plans[name]).name

    def _build(self, plan: SplitPlan, stats: SplitStats) -> datasets.Dataset:
        """The pipeline for one split (a method, so that a test can count the builds of each process)."""
        return build_split(plan, self.settings, self._require_tokenizer(), self._reader, stats)

    def _load(self, name: str) -> datasets.Dataset:
        """A tokenised split, memory-mapped from the cache (cheap to share with dataloader workers)."""
        path = self._ensure_cached(self._plans[name])
        dataset, self.stats[name] = load_cached(path)
        log.info("%s: %d tokenised rows from %s", name, self.stats[name].kept, path)
        return dataset
