"""Sampled lens term: an unbiased estimate of the DistillLens lens term at a fraction of its cost.

The lens term is a mean over k layer pairs of a sum over N supervised tokens,

    lens = 1/k sum_p sum_t x_pt.

Drawing m of the k pairs uniformly without replacement (set S), and n = ceil(f N) of the N supervised tokens uniformly
without replacement (set R, the same tokens for every drawn pair), independently of each other and of the model,

    estimate = 1/m sum_{p in S} (N/n) sum_{t in R} x_pt

has the exact term as its expectation: every pair is drawn with probability m/k and every token with probability n/N,
so E[estimate] = 1/k sum_p sum_t x_pt. The weights do not depend on the parameters, so the gradient of the estimate is
an unbiased estimate of the gradient too. The vocabulary projections, the cost of the lens, fall to about (m/k) f.

The draw is a pure function of (seed, optimizer step, micro-batch within the step): every data-parallel rank draws the
same pairs, a run is reproducible under its seed, and a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class LensDraw:
    """Which layer pairs and supervised tokens one micro-batch's lens term uses, and the token weight."""

    pairs: list[int]
    """Positions in the list of k layer pairs, ascending."""
    mask: Tensor
    """(B, T) the supervised tokens kept: a subset of the batch's mask."""
    token_scale: float
    """N / n, the inverse inclusion probability of a token: makes the token sum unbiased (1.0 when all are kept)."""


def exact_draw(mask: Tensor, pairs: int) -> LensDraw:
    """Every pair and every supervised token: the exact lens term (validation, and the default)."""
    return LensDraw(pairs=list(range(pairs)), mask=mask, token_scale=1.0)


def check_sampling(pairs_per_step: int | None, token_fraction: float) -> None:
    """Raise one clear line for options outside their range."""
    if pairs_per_step is not None and pairs_per_step < 1:
        raise ValueError(
            f"loss.lens_pairs_per_step={pairs_per_step}: use a positive count, or null for all pairs"
        )
    if not 0.0 < token_fraction <= 1.0:
        raise ValueError(f"loss.lens_token_fraction={token_fraction}: use a fraction in (0, 1]")


# The draw-seed streams: every independent draw of one micro-batch, each named once here so that no two share a seed.
LENS_STREAM: tuple[int, ...] = ()
"""Stream 0, the sampled lens's pairs and tokens: the bare (run seed, step, micro-batch) words, no stream word."""
CHOICE_STREAM = 1
"""Who writes the micro-batch's responses (``onpolicy.choose_source``): the same on every rank."""
SAMPLING_STREAM = 2
"""The sampling of the on-policy answers; followed by the rank."""
DROPOUT_STREAM = 3
"""The training forward pass's dropout masks; followed by the rank."""


def draw_seed(seed: int, step: int, micro_batch: int, *stream: int) -> int:
    """A 63-bit seed mixed from (run seed, optimizer step, micro-batch index) by numpy's SeedSequence.

    Neighbouring steps get unrelated streams (unlike seed + step, which would make step s of seed 1 repeat step s+1
    of seed 0). ``stream``: further non-negative words naming an independent draw of the same micro-batch (one of the
    ``*_STREAM`` above, maybe followed by the rank), so that two draws never share their random numbers; without
    them the seed is the sampled lens's (``LENS_STREAM``).
    """
    words = [seed % 2**63, step, micro_batch, *stream]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def draw_lens_subset(
    mask: Tensor, pairs: int, pairs_per_step: int | None, token_fraction: float, seed: int
) -> LensDraw:
    """Draw m = min(pairs_per_step, k) of the k pairs and ceil(token_fraction N) of the N supervised tokens.

    Args:
        mask: (B, T) truthy where a token is supervised.
        pairs: k, the number of layer pairs.
        pairs_per_step: m; None keeps every pair.
        token_fraction: f in (0, 1]; 1 keeps every supervised token.
        seed: the draw's seed (``draw_seed``); the draw is a pure function of its arguments.

    With m >= k and f = 1 the draw is every pair, the unchanged mask and a weight of exactly 1.0, so the estimate is
    bit for bit the exact term.
    """
    check_sampling(pairs_per_step, token_fraction)
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same stream on every device type
    m = pairs if pairs_per_step is None else min(pairs_per_step, pairs)
    chosen = torch.randperm(pairs, generator=generator)[:m].sort().values.tolist()
    supervised = mask.reshape(-1).nonzero().squeeze(-1)  # (N,) flat positions of the supervised tokens
    total = supervised.numel()
    keep = min(total, max(1, math.ceil(token_fraction * total)))  # n; 0 only when nothing is supervised
    if keep == total:
        return LensDraw(pairs=chosen, mask=mask, token_scale=1.0)
    kept = supervised[torch.randperm(total, generator=generator)[:keep].to(supervised.device)]  # (n,)
    subset = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)  # (B*T,)
    subset[kept] = True
    return LensDraw(pairs=chosen, mask=subset.reshape(mask.shape), token_scale=total / keep)


@contextmanager
def seeded_dropout(seed: int, device: torch.device) -> Iterator[None]:
    """A forward pass's dropout masks (LoRA's, GPT-2's) drawn from ``seed`` (of the run's seed, the step, the
    micro-batch and the rank: ``DROPOUT_STREAM``), and the global random state left as it was.

    Drawn from the global state's running position instead, a resumed run's masks would differ from the
    uninterrupted run's: that position also moves with what happened before (the data loader starting an epoch, a
    validation, building the models) and is not in the checkpoint. Activation checkpointing recomputes the forward
    pass under the state it saved, so the masks match in the backward pass too.
    """
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device.index or 0] if cuda else [], device_type="cuda"):
        torch.manual_seed(seed)
        yield
