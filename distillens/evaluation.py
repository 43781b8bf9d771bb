"""Evaluation: the settings of generation-based evaluation and the evaluator that ``distillens test`` and
validation generation drive (through ``callbacks.GenerationEvaluation``).

The protocol follows the paper (README, "The paper's setups"): answers are *sampled* with top_k=0, top_p=1, T=1
(``generation``), scored with ROUGE-L and the other configured metrics (``metrics``), and reported as mean and std
over generation seeds (``results``). Each rank answers its share of a set; the evaluator gathers the answers
(``records``) before scoring. Nothing here imports Lightning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from distillens.generation import decoded_answers, generate_ids, generation_config, several_ranks
from distillens.metrics import check_metrics
from distillens.records import GenerationRecord, Runs, gather_records, records_from_batch
from distillens.results import score_records, summarize_runs

GENERATORS = ("student", "teacher")


@dataclass
class GenerationSettings:
    """How answers are generated and scored: in ``distillens test``, and during validation when ``every_n_val > 0``."""

    max_new_tokens: int = 256
    """Longest generated response in tokens (the paper's evaluation: 256, as prompts of up to 256 tokens are
    left-padded to 256 and generation stops at a total length of 512)."""
    do_sample: bool = True
    """Sample (the paper: top_k 0, top_p 1, temperature 1) or decode greedily."""
    top_k: int = 0
    """Top-k filter when sampling; 0 disables it."""
    top_p: float = 1.0
    """Nucleus filter when sampling; 1 disables it."""
    temperature: float = 1.0
    """Sampling temperature."""
    no_repeat_ngram_size: int = 0
    """Never generate an n-gram of this size twice in a sequence (prompt included), as transformers' option of the
    same name; 0 turns it off. The paper's evaluation: 6."""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [10, 20, 30, 40, 50])
    """Generation seeds (MiniLLM's five): test reports mean and std over them all; validation uses the first."""
    metrics: list[str] = dataclasses.field(default_factory=lambda: ["rougeL", "exact_match"])
    """Scores to compute: rougeL, exact_match, sbert (SBERT cosine similarity; needs the ``sbert`` extra)."""
    every_n_val: int = 0
    """Generate on the validation prompts at every N-th validation and log ``val/<metric>``; 0 never does."""
    max_prompts: int | None = None
    """Validation generation answers only the first this many validation prompts; None answers them all."""
    generator: str = "student"
    """Which model answers: "student", or "teacher" for the reference row of the paper's tables."""
    output_dir: str | None = None
    """Where ``distillens test`` writes results.json, results.md and the answers; default ``<run folder>/eval``."""

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("generation.seeds is empty: give at least one generation seed")
        if self.every_n_val < 0:
            raise ValueError(f"generation.every_n_val={self.every_n_val}: use 0 (never) or a positive count")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"generation.max_prompts={self.max_prompts}: use a positive count or null")
        if self.generator not in GENERATORS:
            raise ValueError(f"generation.generator={self.generator!r}: use one of {', '.join(GENERATORS)}")
        check_metrics(self.metrics)

    def generation(self, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
        """The transformers settings of these answers, every knob pinned (``generation.generation_config``)."""
        return generation_config(
            tokenizer,
            self.max_new_tokens,
            self.do_sample,
            self.top_k,
            self.top_p,
            self.temperature,
            self.no_repeat_ngram_size,
        )


class GenerationEvaluator:
    """Answers prompt batches under the configured settings, collects them per set and seed, and scores them.

    Batches come from the data module's generation loaders: left-padded ``input_ids`` and ``attention_mask`` with
    each row's ``index``, ``prompts`` and ``references``, and the set's ``name``. Under data parallelism each rank
    answers its shard; ``results`` and ``validation_scores`` are collectives that every rank calls.

    Args:
        settings: sampling, seeds and metrics.
        tokenizer: decodes the answers (and gives the eos/pad ids).
    """

    def __init__(self, settings: GenerationSettings, tokenizer: PreTrainedTokenizerBase) -> None:
        self.settings, self.tokenizer = settings, tokenizer
        self.runs: Runs = {}

    def answer(self, model: PreTrainedModel, batch: dict[str, Any], seed: int) -> list[GenerationRecord]:
        """``model``'s answers to a left-padded prompt batch, sampled as configured under ``seed``."""
        new_tokens = generate_ids(
            model, batch["input_ids"], batch["attention_mask"], self.settings.generation(self.tokenizer),
            seed=batch_seed(seed, batch["index"][0]), synced_gpus=several_ranks(),
        )  # (B, new)  # fmt: skip
        return records_from_batch(batch, *decoded_answers(self.tokenizer, new_tokens))

    def add(self, model: PreTrainedModel, batch: dict[str, Any]) -> None:
        """Answer one batch of a named set under every generation seed (this rank's answers)."""
        by_seed = self.runs.setdefault(batch["name"], {})
        for seed in self.settings.seeds:
            by_seed.setdefault(seed, []).extend(self.answer(model, batch, seed))

    def results(self, data: dict[str, Any] | None = None) -> tuple[dict[str, Any], Runs] | None:
        """Every rank's answers gathered (each example once, in order) and the results table; None if none.

        ``data``: the data module's ``eval_protocol()`` (prompt and reference filters), recorded with the table.
        """
        if not self.runs:
            return None
        runs = {
            name: {seed: gather_records(records) for seed, records in by_seed.items()}
            for name, by_seed in self.runs.items()
        }  # every rank takes part in each gather, in the same (set, seed) order
        self.runs = {}
        head = {"generator": self.settings.generator, "generation": dataclasses.asdict(self.settings)}
        return {
            **head,
            **({"data": data} if data is not None else {}),
            **summarize_runs(runs, self.settings.metrics),
        }, runs

    def validation_scores(
        self, model: PreTrainedModel, batches: Iterator[dict[str, Any]]
    ) -> dict[str, float]:
        """Scores of the answers to (this rank's shard of) the validation prompts under the first seed."""
        seed, records = self.settings.seeds[0], []
        for batch in batches:
            records += self.answer(model, batch, seed)
        return score_records(gather_records(records), self.settings.metrics)


def batch_seed(seed: int, first_index: int) -> int:
    """The sampling seed of one batch: the generation seed mixed with the batch's first example index.

    Seeding every batch with the bare generation seed would give row j of every batch the same random draws;
    mixing in the index decorrelates batches while keeping a run reproducible.
    """
    return seed * 1_000_003 + first_index
