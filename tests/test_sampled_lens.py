"""The sampled lens term (loss.lens_pairs_per_step, loss.lens_token_fraction): unbiased, exact when it keeps everything.

- The draw: m of k pairs and ceil(f N) of the N supervised tokens, uniformly, as a pure function of its seed.
- Averaged over every possible draw, the estimate equals the exact lens term and its gradient (an identity, checked
  to float precision), and the seeded draws of training average to it within their own standard error.
- m = k and f = 1 give the exact path bit for bit; validation computes the exact term whatever the options.
- A resumed run draws what the uninterrupted one drew (the logged curves match step for step).
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import build_tiny_module, checkpoint_every_step, tiny_fit_config, write_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distillens.lightning_cli import run_cli
from distillens.module import DistillationModule
from distillens.objective import LayerPairs, LossConfig
from distillens.sampling import LensDraw, draw_lens_subset, draw_seed

VOCAB = 101


def build(monkeypatch, **loss) -> DistillationModule:
    """Three layer pairs on tiny random models; the same weights for every call (seeded)."""
    torch.manual_seed(0)
    module = build_tiny_module(
        monkeypatch,
        student=(3, 32),
        teacher=(4, 48),
        vocab=VOCAB,
        loss=LossConfig(kd_weight=0.5, lens_weight=1.0, chunk_size=4, **loss),
        layers=LayerPairs(student=[1, 2, 3], teacher=[2, 3, 4]),
    )
    return module.train()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    labels = torch.full_like(input_ids, -100)
    labels[0, 6:9] = input_ids[0, 6:9]  # rows with different supervised spans: 3 + 2 = 5 supervised targets
    labels[1, 7:9] = input_ids[1, 7:9]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def lens_and_gradient(module: DistillationModule, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The lens term's token sum and the gradient of the whole objective, flattened over the student's parameters."""
    module.zero_grad(set_to_none=False)
    terms = module(batch)
    terms.total().backward()
    gradient = torch.cat([p.grad.flatten() for p in module.student.parameters()])
    return terms["lens"].detach(), gradient.clone()


# ----------------------------------------------------------------------------------------------------------------
# The draw


def test_draw_keeps_m_pairs_and_n_tokens_of_the_mask():
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 2:9], mask[2, [1, 5]] = True, True  # N = 9 supervised tokens, row 1 has none
    draw = draw_lens_subset(mask, pairs=5, pairs_per_step=2, token_fraction=0.5, seed=7)
    assert len(draw.pairs) == 2 and draw.pairs == sorted(set(draw.pairs)) and set(draw.pairs) <= set(range(5))
    assert int(draw.mask.sum()) == math.ceil(0.5 * 9) and not (draw.mask & ~mask).any()
    assert draw.token_scale == 9 / 5


def test_draw_is_a_pure_function_of_its_seed():
    mask = torch.rand(4, 16, generator=torch.Generator().manual_seed(1)) > 0.4
    draws = [draw_lens_subset(mask, 5, 2, 0.3, draw_seed(42, step, 0)) for step in range(20)]
    again = [draw_lens_subset(mask, 5, 2, 0.3, draw_seed(42, step, 0)) for step in range(20)]
    for first, second in zip(draws, again, strict=True):
        assert first.pairs == second.pairs and torch.equal(first.mask, second.mask)
    assert len({tuple(d.pairs) for d in draws}) > 1, "every step drew the same pairs"
    assert draw_seed(42, 3, 0) != draw_seed(42, 3, 1) != draw_seed(43, 3, 1)


def test_every_pair_and_token_is_drawn_with_probability_m_over_k_and_n_over_n():
    """Inclusion frequencies over 3,000 seeded draws, within 5 binomial standard deviations of m/k and n/N."""
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1:5], mask[1, 3:6] = True, True  # N = 7
    draws = 3000
    pair_counts, token_counts = torch.zeros(5), torch.zeros(2, 6)
    for seed in range(draws):
        draw = draw_lens_subset(
            mask, pairs=5, pairs_per_step=2, token_fraction=0.4, seed=draw_seed(0, seed, 0)
        )
        pair_counts[draw.pairs] += 1
        token_counts += draw.mask
    for counts, p in ((pair_counts, 2 / 5), (token_counts[mask], 3 / 7)):
        sigma = math.sqrt(draws * p * (1 - p))
        assert ((counts - draws * p).abs() < 5 * sigma).all(), (counts, draws * p)
    assert token_counts[~mask].sum() == 0


@pytest.mark.parametrize(
    ("pairs_per_step", "fraction", "message"),
    [(0, 1.0, "lens_pairs_per_step=0"), (None, 0.0, "lens_token_fraction=0.0"), (None, 1.5, "in \\(0, 1\\]")],
)
def test_out_of_range_options_are_one_clear_error(monkeypatch, pairs_per_step, fraction, message):
    with pytest.raises(ValueError, match=message):
        build(monkeypatch, lens_pairs_per_step=pairs_per_step, lens_token_fraction=fraction)


def test_more_pairs_per_step_than_pairs_says_every_pair_is_used(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="distillens"):
        build(monkeypatch, lens_pairs_per_step=3)
        assert not caplog.records
        build(monkeypatch, lens_pairs_per_step=10)
    (record,) = caplog.records
    assert record.getMessage() == (
        "model.loss.lens_pairs_per_step=10 is more than the 3 layer pairs: every pair is used in every step "
        "(the exact lens term)"
    )


# ----------------------------------------------------------------------------------------------------------------
# The estimate


@pytest.mark.parametrize("pairs_per_step", [3, 10])
def test_drawing_every_pair_and_token_is_the_exact_path_bit_for_bit(monkeypatch, batch, pairs_per_step):
    exact = lens_and_gradient(build(monkeypatch), batch)
    full = build(monkeypatch, lens_pairs_per_step=pairs_per_step, lens_token_fraction=1.0)
    for micro_batch in range(3):  # whatever the seed
        full._window_batches = micro_batch
        sampled = lens_and_gradient(full, batch)
        assert torch.equal(sampled[0], exact[0]) and torch.equal(sampled[1], exact[1])


def test_mean_over_every_possible_draw_is_the_exact_term_and_gradient(monkeypatch, batch):
    """The identity behind the estimator: average the estimate over all C(3,1) x C(5,3) equally likely draws."""
    exact = lens_and_gradient(build(monkeypatch), batch)
    module = build(monkeypatch, lens_pairs_per_step=1, lens_token_fraction=0.5)
    mask = batch["labels"][:, 1:] != -100  # (B, T-1)
    positions = mask.reshape(-1).nonzero().squeeze(-1).tolist()
    assert len(positions) == 5
    total_lens, total_grad, draws = 0.0, torch.zeros_like(exact[1], dtype=torch.float64), 0
    for pair, kept in itertools.product(range(3), itertools.combinations(positions, 3)):
        subset = torch.zeros(mask.numel(), dtype=torch.bool)
        subset[list(kept)] = True
        draw = LensDraw(pairs=[pair], mask=subset.reshape(mask.shape), token_scale=5 / 3)
        monkeypatch.setattr(module.objective, "lens_draw", lambda _mask, _training, _seed, draw=draw: draw)
        lens, gradient = lens_and_gradient(module, batch)
        total_lens, total_grad, draws = total_lens + float(lens), total_grad + gradient.double(), draws + 1
    assert draws == 3 * 10
    assert total_lens / draws == pytest.approx(float(exact[0]), rel=1e-5)
    torch.testing.assert_close(total_grad / draws, exact[1].double(), rtol=1e-4, atol=1e-7)


def test_seeded_estimates_average_to_the_exact_term_and_gradient(monkeypatch, batch):
    """100 draws of training's own seeded sampler: the sample mean is within its standard error of the exact value.

    Tolerances: the loss within 4 standard errors; for the gradient, E|mean - exact|^2 = sum of variances / R, and
    the observed squared distance must stay under 5 times that (a biased estimator, e.g. one that forgets the N/n
    token weight, is off by dozens of standard errors).
    """
    exact_lens, exact_grad = lens_and_gradient(build(monkeypatch), batch)
    module = build(monkeypatch, lens_pairs_per_step=1, lens_token_fraction=0.5)
    lenses, grads = [], []
    for micro_batch in range(100):  # each micro-batch index is a different seed of the same step
        module._window_batches = micro_batch
        lens, gradient = lens_and_gradient(module, batch)
        lenses.append(float(lens))
        grads.append(gradient.double())
    lenses_t, grads_t = torch.tensor(lenses, dtype=torch.float64), torch.stack(grads)  # (R,), (R, P)
    draws = len(lenses)
    assert lenses_t.std() > 0, "the draws did not vary"
    standard_error = lenses_t.std() / math.sqrt(draws)
    assert abs(lenses_t.mean() - float(exact_lens)) < 4 * standard_error
    expected_sq = grads_t.var(dim=0).sum() / draws
    observed_sq = (grads_t.mean(0) - exact_grad.double()).pow(2).sum()
    assert observed_sq < 5 * expected_sq, (
        f"|mean - exact|^2 = {observed_sq:.3g}, expected about {expected_sq:.3g}"
    )


def test_validation_computes_the_exact_term_whatever_the_options(monkeypatch, batch):
    exact = build(monkeypatch).eval()
    sampled = build(monkeypatch, lens_pairs_per_step=1, lens_token_fraction=0.2).eval()
    with torch.no_grad():
        want, got = exact(batch), sampled(batch)
    assert want.keys() == got.keys() and {"lens/s1_t2", "lens/s2_t3", "lens/s3_t4"} <= got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_training_with_a_subset_of_pairs_reports_no_per_pair_term(monkeypatch, batch):
    """Lightning re-logs a step metric's last value when a step does not log it: an undrawn pair would show a stale
    value, so per-pair curves come from validation (exact) when m < k."""
    terms = build(monkeypatch, lens_pairs_per_step=2)(batch)
    assert "lens" in terms and not [name for name in terms if name.startswith("lens/")]
    terms = build(monkeypatch, lens_pairs_per_step=3, lens_token_fraction=0.5)(batch)
    assert len([name for name in terms if name.startswith("lens/")]) == 3


# ----------------------------------------------------------------------------------------------------------------
# Resume: the draw depends on (seed, step, micro-batch) only


def tiny_config(folder: Path, cache_dir: Path, steps: int) -> Path:
    """configs/tiny.yaml with two layer pairs, m = 1 and f = 0.5, a checkpoint every step, outputs under folder.

    The tiny data has five batches per epoch: from step 2 to 5 the run also crosses an epoch boundary.
    """
    config = tiny_fit_config(folder, cache_dir, max_steps=steps, limit_val_batches=0)
    config["trainer"]["callbacks"] = [checkpoint_every_step()]
    config["model"]["layers"] = {"student": [1, 2], "teacher": [2, 4]}
    config["model"]["loss"] = {"lens_pairs_per_step": 1, "lens_token_fraction": 0.5}
    return write_config(config, folder / "sampled.yaml")


def logged(run: Path) -> dict[str, dict[int, float]]:
    """Every train/ scalar as {step: value}, from the run's TensorBoard files."""
    found: dict[str, dict[int, float]] = {}
    for path in sorted(run.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        for name in events.Tags()["scalars"]:
            if name.startswith("train/") and name != "train/tokens_per_sec":
                found.setdefault(name, {}).update({e.step: e.value for e in events.Scalars(name)})
    return found


def fit(config: Path, *extra: str):
    with mock.patch.object(sys, "argv", ["distillens"]):  # pytest's own arguments are not the CLI's
        return run_cli(["fit", "--config", str(config), *extra])


def test_resumed_run_draws_what_the_uninterrupted_run_drew(tmp_path):
    cache = tmp_path / "cache"
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    reference_dir.mkdir(), resumed_dir.mkdir()
    fit(tiny_config(reference_dir, cache, steps=5))
    reference = logged(reference_dir / "tiny")
    assert {"train/loss", "train/lens", "train/kd"} <= set(reference)
    assert not [
        name for name in reference if name.startswith("train/lens/")
    ]  # m < k: no per-pair train curve
    checkpoint = reference_dir / "tiny" / "checkpoints" / "step2.ckpt"
    fit(tiny_config(resumed_dir, cache, steps=5), "--ckpt_path", str(checkpoint))
    resumed = logged(resumed_dir / "tiny")
    for name, values in resumed.items():
        assert min(values) >= 2, f"{name} logged before the resume point: {sorted(values)}"
        for step, value in values.items():
            assert value == pytest.approx(reference[name][step], rel=1e-6, abs=0), f"{name} at step {step}"
    assert {name for name in reference if set(reference[name]) & {2, 3, 4}} == set(resumed)
