"""Paired bootstrap intervals (distillens.intervals) against what they must give on data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from distillens.intervals import paired_bootstrap


def test_a_constant_difference_has_a_zero_width_interval():
    found = paired_bootstrap([np.full((4, 10), 1.5), np.full((4, 3), 1.5)])
    assert (found.mean, found.low, found.high) == pytest.approx((1.5, 1.5, 1.5))
    assert (found.seeds, found.positive) == (4, 4)


def test_the_mean_is_the_mean_of_set_means_and_seeds_are_counted_by_sign():
    first = np.array([[1.0, 3.0], [-4.0, -2.0]])  # seed means 2, -3
    second = np.array([[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])  # seed means 1, 1
    found = paired_bootstrap([first, second])
    assert found.mean == pytest.approx((first.mean() + second.mean()) / 2)
    assert found.positive == 1  # seed 1: (2 + 1) / 2 > 0; seed 2: (-3 + 1) / 2 < 0
    assert found.low <= found.mean <= found.high


def test_prompt_noise_gives_the_normal_theory_width():
    """One seed, many prompts with unit-variance noise: the 95% interval is about mean ± 1.96 / sqrt(P)."""
    prompts = 2000
    noise = np.random.default_rng(1).standard_normal((1, prompts)) + 0.3
    found = paired_bootstrap([noise])
    half = 1.96 * noise.std() / np.sqrt(prompts)
    assert found.high - found.low == pytest.approx(2 * half, rel=0.1)
    assert (found.low + found.high) / 2 == pytest.approx(noise.mean(), abs=0.1 * half)


def test_seed_noise_widens_the_interval():
    """The same prompts under seeds that disagree: resampling seeds must show it (prompts alone would not)."""
    base = np.random.default_rng(2).standard_normal((1, 200)) * 0.01
    agree = np.repeat(base, 4, axis=0) + 1.0
    disagree = agree + np.array([[2.0], [-2.0], [2.0], [-2.0]])
    narrow, wide = paired_bootstrap([agree]), paired_bootstrap([disagree])
    assert narrow.high - narrow.low < 0.01 and wide.high - wide.low > 1.0
    assert narrow.mean == pytest.approx(wide.mean)


def test_mismatched_seeds_are_refused():
    with pytest.raises(ValueError, match="same seeds"):
        paired_bootstrap([np.zeros((3, 4)), np.zeros((2, 4))])
    with pytest.raises(ValueError, match="no evaluation set"):
        paired_bootstrap([])
