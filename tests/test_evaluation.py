"""The evaluator's own rules (distillens.evaluation); what it answers and scores is in test_generation_eval.py and
test_eval_protocol.py."""

from __future__ import annotations

from distillens.evaluation import batch_seed


def test_batch_seed_differs_across_batches_and_seeds():
    seeds = {batch_seed(seed, first) for seed in (1, 2, 3) for first in (0, 8, 16)}
    assert len(seeds) == 9
