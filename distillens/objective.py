"""The DistillLens objective, with no Lightning in it: configuration, the forward passes, and the terms.

    L = ce_weight * CE(S) + kd_weight * D_final(T_L, S_L) + lens_weight * mean_pairs D_lens(T_j, S_i)
        (+ mse_weight * the masked MSE feature baseline)

One call of ``Objective`` runs the student (and, when a term reads it, the frozen teacher) on a batch and returns
``Terms``: the number of supervised tokens (labels != IGNORE_INDEX), the token *sum* of every term and the token
mean of every lens layer pair. Sums, not means, because the caller divides by the supervised tokens of a whole
optimizer step or evaluation set (across gradient-accumulation micro-batches and data-parallel ranks), so long and
short micro-batches weigh by their tokens, not by their count. ``Terms.total()`` is the weighted sum,
``Terms.means()`` what a logger shows, and ``Terms.token_sums()`` / ``token_means()`` what an evaluation adds up.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillens.lens import LogitLens, lens_loss, naive_lens_loss, projected_divergence
from distillens.losses import HAS_REFERENCE, IGNORE_INDEX, check_divergence_params, masked_mse
from distillens.sampling import LensDraw, check_sampling, draw_lens_subset, exact_draw
from distillens.sharding import gathered
from distillens.teacher_cache import TEACHER_TARGETS, CachedTargets
from distillens.topk import TopK, topk_divergence

log = logging.getLogger(__name__)


@dataclass
class LossConfig:
    """Weights and choices of the distillation objective; the defaults are the paper's DistillLens runs."""

    ce_weight: float = 0.0
    """Weight of the student's cross-entropy on the reference responses (the paper's KD baselines use 0.5)."""
    kd_weight: float = 1.0
    """Weight of the final-layer divergence between teacher and student output distributions."""
    kd_divergence: str = "reverse_kl"
    """Final-layer divergence: forward_kl, reverse_kl, jeffreys, jsd, skew_forward_kl, skew_reverse_kl, akl, tvd."""
    kd_params: dict[str, float] = field(default_factory=dict)
    """Parameters of the final-layer divergence, e.g. {beta: 0.3}: jsd takes beta (the teacher's weight in the
    mixture, in [0, 1], default 0.5); skew_forward_kl takes alpha (the teacher's weight in the mixture, in [0, 1],
    default 0.1); skew_reverse_kl takes alpha (the student's weight in the mixture, in [0, 1], default 0.1); akl
    takes mu (the teacher's probability mass of the head, in [0, 1], default 0.5); forward_kl, reverse_kl,
    jeffreys and tvd take none."""
    lens_weight: float = 1.0
    """Weight of the logit-lens term, averaged over layer pairs."""
    lens_divergence: str = "jsd"
    """Divergence between lens distributions (the paper: Jensen-Shannon, beta 0.5)."""
    lens_params: dict[str, float] = field(default_factory=dict)
    """Parameters of the lens divergence: the same as kd_params lists for each divergence."""
    mse_weight: float = 0.0
    """Weight of the MSE feature baseline (learned teacher->student projection per pair, supervised tokens only)."""
    temperature: float = 1.0
    """Softmax temperature of both divergences (the paper: 1)."""
    lens_final_norm: bool = True
    """Apply the final norm in the lens; False reproduces the published code, which skips it."""
    chunk_size: int = 256
    """Rows projected to the vocabulary at once by the chunked lens and final-layer losses (peak memory knob)."""
    fused: bool = True
    """Run the divergences' closed-form values and gradients (forward_kl, reverse_kl, jsd) as kernels compiled by
    torch.compile: the same fp32 arithmetic in a few loops per row instead of about twenty passes over memory (how
    much faster: README, Speed). The first steps wait a few seconds for the compiler; where it
    cannot run (no C++ compiler or Triton), one warning says so and the eager kernels run. false: eager always."""
    lens_impl: str = "chunked"
    """How the lens term is computed: "chunked" (memory-bounded, the default) or "naive" (the published code's
    (k, B, T, V) projection, for benchmarks and checks)."""
    lens_pairs_per_step: int | None = None
    """Training steps use m randomly drawn layer pairs (the same on every rank, drawn from seed_everything's seed,
    the step and the micro-batch) for an unbiased estimate of the lens term at about m/k of its cost; null uses
    every pair. Validation always computes the exact term."""
    lens_token_fraction: float = 1.0
    """Training steps use this random fraction of the supervised tokens in the lens term, weighted by its inverse
    (an unbiased estimate); 1 uses every token. Validation always computes the exact term."""

    @property
    def weights(self) -> dict[str, float]:
        """Term name -> weight, for every term of the objective."""
        return {"ce": self.ce_weight, "kd": self.kd_weight, "lens": self.lens_weight, "mse": self.mse_weight}

    @property
    def reads_teacher(self) -> bool:
        """Whether a trained term needs the teacher's forward (SFT with a teacher for initialisation does not)."""
        return bool(self.kd_weight or self.lens_weight or self.mse_weight)

    def check(self, has_teacher: bool) -> None:
        """One clear line for a weight, divergence, parameter or option that cannot work."""
        for name, weight in self.weights.items():
            if weight < 0:
                raise ValueError(f"model.loss.{name}_weight={weight}: loss weights must be >= 0")
        check_divergence_params(self.kd_divergence, self.kd_params, "model.loss.kd_params")
        check_divergence_params(self.lens_divergence, self.lens_params, "model.loss.lens_params")
        check_sampling(self.lens_pairs_per_step, self.lens_token_fraction)
        if self.lens_impl not in LENS_IMPLEMENTATIONS:
            valid = ", ".join(sorted(LENS_IMPLEMENTATIONS))
            raise ValueError(f"loss.lens_impl={self.lens_impl!r}: expected one of {valid}")
        if not has_teacher and self.reads_teacher:
            raise ValueError(
                "model.teacher is not set but loss.kd_weight/lens_weight/mse_weight are not 0: "
                "set a teacher, or zero them for plain SFT (configs/sft.yaml)"
            )
        if not any(self.weights.values()):
            raise ValueError("every loss weight is 0: nothing to train")


@dataclass
class LayerPairs:
    """Which student layer is aligned with which teacher layer (hidden-state indices, 0 = embeddings).

    Give both lists to reproduce the paper exactly, or leave them empty for ``count`` evenly spaced pairs
    (index round(j * L / (count + 1)) for j = 1..count on each side). When the student is a copy of some of the
    teacher's blocks (``model.student.init_from_teacher_layers``), the ``count`` student indices are paired instead
    with the teacher hidden states their blocks were copied from: student block b, a copy of teacher block c, is
    hidden state b + 1 on one side and c + 1 on the other.
    """

    student: list[int] = field(default_factory=list)
    """Student hidden-state indices, e.g. [2, 4, 6, 8, 10] for GPT-2 120M."""
    teacher: list[int] = field(default_factory=list)
    """Teacher hidden-state indices, e.g. [8, 16, 24, 32, 40] for GPT-2 1.5B."""
    count: int = 5
    """Number of evenly spaced pairs when the lists are empty."""

    def resolve(
        self, student_depth: int, teacher_depth: int, copied_from: list[int] | None = None
    ) -> tuple[list[int], list[int]]:
        """Explicit or automatic pairs, checked against both depths.

        ``copied_from``: the teacher block each student block was copied from, when the student is a layer subset.
        """
        student, teacher = list(self.student), list(self.teacher)
        if not student and not teacher:
            student = evenly_spaced(student_depth, self.count)
            if copied_from is not None and len(copied_from) == student_depth:
                teacher = [
                    copied_from[i - 1] + 1 if i > 0 else 0 for i in student
                ]  # hidden index = block + 1
            else:
                teacher = evenly_spaced(teacher_depth, self.count)
        if len(student) != len(teacher):
            raise ValueError(
                f"layer pairs: {len(student)} student layers {student} but {len(teacher)} teacher layers {teacher}"
            )
        bad = [s for s in student if not 0 <= s <= student_depth] + [
            t for t in teacher if not 0 <= t <= teacher_depth
        ]
        if bad:
            raise ValueError(
                f"layer pairs {student} / {teacher}: {bad} out of range (student has {student_depth} blocks, "
                f"teacher {teacher_depth}; valid indices 0..depth)"
            )
        return student, teacher


def evenly_spaced(depth: int, count: int) -> list[int]:
    """count interior hidden-state indices spread evenly over a depth-block model (the paper's GPT-2 choice)."""
    if count < 1:
        raise ValueError(f"layer pairs: count must be >= 1, got {count}")
    return [round(j * depth / (count + 1)) for j in range(1, count + 1)]


# ----------------------------------------------------------------------------------------------------------------
# Terms: what one call of the objective returns


@dataclass
class Terms(Mapping):
    """One batch's objective: the supervised-token count, the token sum of each term, each lens pair's token mean.

    Read as a mapping: ``terms["tokens"]``, a term's token sum (``terms["kd"]``) or a pair's token mean
    (``terms["lens/s2_t4"]``).
    """

    tokens: Tensor
    """() the number of supervised tokens in the batch."""
    sums: dict[str, Tensor]
    """Term name (ce, kd, lens, mse) -> its token sum; only the terms computed."""
    pair_means: dict[str, Tensor]
    """"s<i>_t<j>" -> token mean of that lens pair (detached); empty when training drew a subset of the pairs."""
    weights: dict[str, float]
    """Term name -> weight in the objective."""

    def __getitem__(self, name: str) -> Tensor:
        if name == "tokens":
            return self.tokens
        if name.startswith("lens/"):
            return self.pair_means[name.removeprefix("lens/")]
        return self.sums[name]

    def __iter__(self) -> Iterator[str]:
        yield "tokens"
        yield from self.sums
        yield from (f"lens/{pair}" for pair in self.pair_means)

    def __len__(self) -> int:
        return 1 + len(self.sums) + len(self.pair_means)

    def total(self) -> Tensor:
        """The objective's token sum: each weighted term present (the one to differentiate)."""
        weighted = [self.weights[name] * value for name, value in self.sums.items() if self.weights.get(name)]
        return sum(weighted[1:], weighted[0]) if weighted else self.tokens.new_zeros((), dtype=torch.float32)

    def means(self) -> dict[str, Tensor]:
        """Detached token means for logging: "loss", each term, and "lens/<pair>" (already a mean)."""
        tokens = self.tokens.clamp_min(1)
        means = {name: value.detach() / tokens for name, value in {"loss": self.total(), **self.sums}.items()}
        return means | {f"lens/{pair}": mean for pair, mean in self.pair_means.items()}

    def token_sums(self) -> dict[str, Tensor]:
        """Everything as a detached token sum (pair means times the count), to add up over batches: see
        ``token_means``."""
        sums = {"tokens": self.tokens, "loss": self.total(), **self.sums}
        sums |= {f"lens/{pair}": mean * self.tokens for pair, mean in self.pair_means.items()}
        return {name: value.detach() for name, value in sums.items()}


def token_means(sums: Mapping[str, Tensor | float]) -> dict[str, Tensor | float]:
    """Token sums added up over any set of batches (with their "tokens") -> token means over that set."""
    tokens = sums["tokens"]
    tokens = tokens.clamp_min(1) if isinstance(tokens, Tensor) else max(tokens, 1)
    return {name: value / tokens for name, value in sums.items() if name != "tokens"}


# ----------------------------------------------------------------------------------------------------------------
# The objective


class Objective:
    """The DistillLens objective on a student and its frozen teacher (no teacher: the student's cross-entropy).

    Holds lenses of both models (for the layer pairs) and their output heads (for the final-layer term), and the
    resolved layer pairs. Not an ``nn.Module``: it refers to modules its owner holds, so it adds nothing to a state
    dict or an optimizer.

    Args:
        config: weights, divergences and options.
        pairs: the lens layer pairs.
        student: the trained causal LM.
        teacher: the frozen causal LM, or None.
        projections: the MSE baseline's teacher -> student projections, one per pair; filled here when empty.
        copied_from: the teacher block each student block was copied from (a layer-subset student), for
            automatic layer pairs.
    """

    def __init__(
        self,
        config: LossConfig,
        pairs: LayerPairs,
        student: nn.Module,
        teacher: nn.Module | None = None,
        projections: nn.ModuleList | None = None,
        copied_from: list[int] | None = None,
    ) -> None:
        self.config, self.student, self.teacher = config, student, teacher
        self.projections = projections if projections is not None else nn.ModuleList()
        self.student_layers: list[int] = []
        self.teacher_layers: list[int] = []
        if teacher is None:
            return
        self.student_lens = LogitLens(student, apply_final_norm=config.lens_final_norm)
        self.teacher_lens = LogitLens(teacher, apply_final_norm=config.lens_final_norm)
        self.student_head = LogitLens(student)  # the real output head, for the final-layer term
        self.teacher_head = LogitLens(teacher)
        self.pairs, self.copied_from = pairs, copied_from
        if config.lens_weight or config.mse_weight:
            self.student_layers, self.teacher_layers = self.configured_pairs()
        pairs_per_step, count = config.lens_pairs_per_step, len(self.student_layers)
        if config.lens_weight and pairs_per_step is not None and pairs_per_step > count:
            log.warning(
                "model.loss.lens_pairs_per_step=%d is more than the %d layer pairs: every pair is used in every "
                "step (the exact lens term)", pairs_per_step, count,
            )  # fmt: skip
        if config.mse_weight and not len(self.projections):
            d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
            self.projections.extend(nn.Linear(d_t, d_s, bias=False) for _ in self.student_layers)

    def configured_pairs(self) -> tuple[list[int], list[int]]:
        """The layer pairs as configured, resolved whatever the weights: a teacher cache stores them all, so that
        every method of a study (KD without a lens term included) reads one cache."""
        return self.pairs.resolve(
            self.student_lens.num_layers, self.teacher_lens.num_layers, self.copied_from
        )

    @property
    def samples_lens(self) -> bool:
        """Whether training draws a subset of the lens pairs or tokens (and so needs a draw seed)."""
        return self.config.lens_pairs_per_step is not None or self.config.lens_token_fraction < 1

    def __call__(self, batch: dict[str, Tensor], *, training: bool, draw_seed: int = 0) -> Terms:
        """Every term of the objective on one batch (in training, only the weighted ones, the lens maybe sampled).

        Args:
            batch: input_ids, attention_mask and labels (B, T), optionally position_ids (packed rows) and
                has_reference (False: the responses are the student's own answers, with no cross-entropy).
            training: compute what the loss needs; evaluation computes every term the models allow, exactly.
            draw_seed: seed of the sampled lens's draw (``sampling.draw_seed``); unused when nothing is sampled.
        """
        labels = batch["labels"]  # (B, T)
        mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts token t+1
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        has_reference = batch.get(HAS_REFERENCE, True)
        need_logits = (bool(self.config.ce_weight) and has_reference) or not training
        student_depth = self.student_lens.num_layers if self.teacher is not None else 0
        with self._capture_student(self.student_layers + [student_depth]) as s_hidden:
            s_out = self.student(**inputs, use_cache=False, logits_to_keep=0 if need_logits else 1)
        terms = Terms(tokens=mask.sum(), sums={}, pair_means={}, weights=self.config.weights)
        if need_logits:
            terms.sums["ce"] = cross_entropy_sum(s_out.logits[:, :-1], labels[:, 1:])
        elif self.config.ce_weight:
            # no target: the term adds 0 (kept so that train/ce is logged on every step)
            terms.sums["ce"] = torch.zeros((), dtype=torch.float32, device=labels.device)
        if self.teacher is None or (training and not self.config.reads_teacher):
            return terms  # plain SFT with a teacher (for initialisation and validation): no teacher forward
        cached: CachedTargets | None = batch.get(TEACHER_TARGETS)
        s_hidden = {i: h[:, :-1] for i, h in s_hidden.items()}  # (B, T-1, d_s) aligned with the mask
        if cached is not None and cached.topk:
            with gathered(self.student), float32_default_dtype():
                return self._teacher_terms(terms, s_hidden, cached.topk, mask, training, draw_seed)
        t_hidden = cached.hidden if cached is not None else self._teacher_hidden(inputs)  # (B, T-1, d_t) each
        # the lens reads full final norm + unembedding weights: gathered when sharded; divergences in fp32
        with gathered(self.student, self.teacher), float32_default_dtype():
            self._teacher_terms(terms, s_hidden, t_hidden, mask, training, draw_seed)
            if self.config.mse_weight:
                terms.sums["mse"] = self.mse_sum(s_hidden, t_hidden, mask)
        return terms

    def _teacher_hidden(self, inputs: dict[str, Tensor]) -> dict[int, Tensor]:
        """The live teacher's hidden states at the paired layers and its last: index -> (B, T-1, d_t)."""
        teacher_depth = self.teacher_lens.num_layers
        with torch.no_grad(), self.teacher_lens.capture(self.teacher_layers + [teacher_depth]) as t_hidden:
            self.teacher(
                **inputs, use_cache=False, logits_to_keep=1
            )  # hidden states only: no (B, T, V) logits
        return {j: h[:, :-1] for j, h in t_hidden.items()}  # (B, T-1, d_t)

    def _teacher_terms(self, terms: Terms, s_hidden: dict, teacher: dict, mask: Tensor, training: bool,
                       draw_seed: int) -> Terms:  # fmt: skip
        """The final-layer and lens terms against the teacher: its hidden states (live or cached: index -> (B, T-1,
        d_t)), or cached top-k targets ("final" for the output, the index for a lens layer -> ``TopK``)."""
        student_depth = self.student_lens.num_layers
        if self.config.kd_weight or not training:
            last = teacher["final"] if "final" in teacher else teacher[self.teacher_lens.num_layers]
            terms.sums["kd"] = self.final_layer_sum(s_hidden[student_depth], last, mask)
        if self.student_layers and (self.config.lens_weight or not training):
            draw = self.lens_draw(mask, training, draw_seed)
            terms.sums["lens"], terms.pair_means = self.lens_sum(s_hidden, teacher, draw, mask)
        return terms

    def _capture_student(self, layers: list[int]) -> contextlib.AbstractContextManager[dict[int, Tensor]]:
        """The student's residual streams at ``layers``; nothing to capture without a teacher (no lens terms)."""
        if self.teacher is None:
            return contextlib.nullcontext({})
        return self.student_lens.capture(sorted(set(layers)))

    def final_layer_sum(self, student_last: Tensor, teacher_last: Tensor | TopK, mask: Tensor) -> Tensor:
        """Token sum of the final-layer divergence between the two models' output distributions.

        ``student_last`` (B, T, d_s) and ``teacher_last`` (B, T, d_t): the last hidden states, aligned with ``mask``;
        or ``teacher_last`` the cached top-k targets at the positions of ``mask``.
        """
        config = self.config
        if isinstance(teacher_last, TopK):
            value, _ = topk_divergence(
                [student_last], [teacher_last], self.student_head, mask, config.kd_divergence,
                chunk_size=config.chunk_size, reduction="sum", temperature=config.temperature, **config.kd_params,
            )  # fmt: skip
            return value
        value, _ = projected_divergence(
            [student_last], [teacher_last], self.student_head, self.teacher_head, mask, config.kd_divergence,
            chunk_size=config.chunk_size, reduction="sum", fused=config.fused, temperature=config.temperature,
            **config.kd_params,
        )  # fmt: skip
        return value

    def lens_draw(self, mask: Tensor, training: bool, seed: int) -> LensDraw:
        """This micro-batch's lens pairs and tokens: a seeded draw in training, every one of them otherwise."""
        pairs = len(self.student_layers)
        if not training or not self.samples_lens:
            return exact_draw(mask, pairs)
        config = self.config
        return draw_lens_subset(mask, pairs, config.lens_pairs_per_step, config.lens_token_fraction, seed)

    def lens_sum(
        self, s_hidden: dict, t_hidden: dict, draw: LensDraw, mask: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The lens term's token sum over the drawn pairs and tokens, and each pair's mean when all are drawn.

        ``s_hidden`` / ``t_hidden``: hidden-state index -> (B, T, d), aligned with ``draw.mask``; or ``t_hidden``
        index -> cached top-k targets (``TopK`` at the positions of ``mask``, the batch's supervised tokens).
        """
        config = self.config
        s_layers = [self.student_layers[p] for p in draw.pairs]
        t_layers = [self.teacher_layers[p] for p in draw.pairs]
        student, teacher = [s_hidden[i] for i in s_layers], [t_hidden[j] for j in t_layers]
        if isinstance(teacher[0], TopK):
            drawn = draw.mask[mask.bool()]  # (N,): which supervised positions the draw kept
            lens, per_pair = topk_divergence(
                student, [target.rows(drawn) for target in teacher], self.student_lens, draw.mask,
                config.lens_divergence, chunk_size=config.chunk_size, reduction="sum",
                temperature=config.temperature, **config.lens_params,
            )  # fmt: skip
        else:
            lens, per_pair = LENS_IMPLEMENTATIONS[config.lens_impl](
                student, teacher, self.student_lens, self.teacher_lens, draw.mask,
                config.lens_divergence, chunk_size=config.chunk_size, reduction="sum", fused=config.fused,
                temperature=config.temperature, **config.lens_params,
            )  # fmt: skip
        # per-pair values only when every pair is drawn: Lightning would re-log an undrawn pair's stale value
        pair_means = {}
        if len(draw.pairs) == len(self.student_layers):
            pair_means = {
                f"s{i}_t{j}": value for i, j, value in zip(s_layers, t_layers, per_pair, strict=True)
            }
        # an unbiased token sum: N / n times the sum over the n drawn tokens (x 1.0, exact, when all are kept)
        return lens * draw.token_scale, pair_means

    def mse_sum(self, s_hidden: dict, t_hidden: dict, mask: Tensor) -> Tensor:
        """Token sum of the MSE feature baseline, averaged over pairs."""
        pairs = zip(self.projections, self.student_layers, self.teacher_layers, strict=True)
        per_pair = [masked_mse(proj(t_hidden[j]), s_hidden[i], mask) * mask.sum() for proj, i, j in pairs]
        return sum(per_pair) / len(self.projections)


def cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum over supervised tokens of the student's cross-entropy, in fp32. logits (B, T, V), labels (B, T)."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@contextlib.contextmanager
def float32_default_dtype() -> Iterator[None]:
    """Run the objective with fp32 as torch's default dtype.

    Lightning's bf16-true precision makes bf16 the default dtype during the step; buffers the losses create
    (per-row divergences, token sums) would silently become bf16. The divergences must stay fp32.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _naive_lens_sum(
    student_hidden: list[Tensor],
    teacher_hidden: list[Tensor],
    student_lens: LogitLens,
    teacher_lens: LogitLens,
    mask: Tensor,
    divergence: str,
    *,
    chunk_size: int,
    reduction: str,
    fused: bool,
    **params: float,
) -> tuple[Tensor, Tensor]:
    """``naive_lens_loss`` with ``lens_loss``'s signature: the token sum (or mean) of the published code's lens.

    ``chunk_size`` and ``fused`` do not apply: the naive lens projects every position of every pair at once, through
    the autograd of the per-token divergence.
    """
    loss, per_pair = naive_lens_loss(
        student_hidden, teacher_hidden, student_lens, teacher_lens, mask, divergence, **params
    )
    return (loss * mask.sum() if reduction == "sum" else loss), per_pair


LENS_IMPLEMENTATIONS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "chunked": lens_loss,
    "naive": _naive_lens_sum,
}
"""``LossConfig.lens_impl`` -> the lens-term function; both return (loss, per-pair token means)."""
