"""The evaluator's own rules (distillens.evaluation): its settings and batch seeds; what it answers and scores is in
test_generation_eval.py and test_eval_protocol.py."""

from __future__ import annotations

import pytest

from distillens.evaluation import GenerationSettings, batch_seed


def test_batch_seed_differs_across_batches_and_seeds():
    seeds = {batch_seed(seed, first) for seed in (1, 2, 3) for first in (0, 8, 16)}
    assert len(seeds) == 9


def test_generation_settings_reject_bad_values():
    with pytest.raises(ValueError, match="every_n_val=-1"):
        GenerationSettings(every_n_val=-1)
    with pytest.raises(ValueError, match="generator='judge'"):
        GenerationSettings(generator="judge")
    with pytest.raises(ValueError, match="seeds is empty"):
        GenerationSettings(seeds=[])
