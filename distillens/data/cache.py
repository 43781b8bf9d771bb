"""The on-disk cache of tokenised splits: keyed by everything that changes the rows, written atomically, read back
memory-mapped.

A split's folder under ``cache_dir/tokenised/`` is named after its split and a hash of its settings, so a changed
source file, tokenizer, template, length limit or filter builds a new folder instead of reading a stale one; a
folder holds ``dataset/`` (Arrow, through `datasets`) and ``stats.json`` (what the filters did), and is published
whole by a rename, so a run killed while writing never leaves half a cache that a later run would read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets

from distillens.data.pipeline import PipelineSettings, SplitPlan
from distillens.data.tokenisation import SplitStats
from distillens.hub import build_once

CACHE_VERSION = 2  # bump when the tokenised layout or the filters change, to invalidate old caches


def split_cache_path(
    cache_dir: Path, plan: SplitPlan, settings: PipelineSettings, source_key: str, tokenizer_key: str
) -> Path:
    """The split's cache folder: its name and a hash of what its rows depend on."""
    keyed = {
        "version": CACHE_VERSION,
        "split": plan.name,
        "part": plan.part,
        "source": source_key,
        "tokenizer": tokenizer_key,
        "template": settings.template,
        "format": settings.format,
        "field_map": settings.field_map,
        "lengths": [settings.max_length, settings.max_prompt_length],
        "long_prompts": plan.long_prompts,
        "min_reference_tokens": settings.min_reference_tokens.get(plan.name),
        "val_size": settings.val_size if plan.part else None,
        "seed": settings.seed if plan.part else None,
        "max_samples": settings.max_samples,
        "skip_bad_rows": settings.skip_bad_rows,
    }
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / "tokenised" / f"{plan.name}-{key}"


def ensure_cached(path: Path, build: Callable[[SplitStats], datasets.Dataset]) -> Path:
    """``path``, after building the split into it with ``build(stats)`` when no complete copy is there."""
    if not (path / "stats.json").is_file():
        stats = SplitStats()
        save_atomically(build(stats), stats, path)
    return path


def load_cached(path: Path) -> tuple[datasets.Dataset, SplitStats]:
    """A cached split, memory-mapped (cheap to share with dataloader workers), and its filter counts."""
    stats = SplitStats(**json.loads((path / "stats.json").read_text()))
    return datasets.load_from_disk(str(path / "dataset")), stats


def save_atomically(dataset: datasets.Dataset, stats: SplitStats, path: Path) -> None:
    """Write to a temporary folder then rename, so a concurrent or interrupted run never sees half a cache."""

    def write(staging: Path) -> None:
        with quiet_progress_bars():
            dataset.save_to_disk(str(staging / "dataset"))
        (staging / "stats.json").write_text(json.dumps(stats.__dict__))

    build_once(path, write)  # when another process finished first, its copy is identical and is kept


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Hide `datasets`' per-save progress bars (noise next to our one-line counts), then restore the setting."""
    were_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not were_disabled:
            datasets.utils.enable_progress_bars()
