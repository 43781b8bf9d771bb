"""Divergences between student and teacher token distributions (pure torch, no Lightning).

Every public divergence shares one signature::

    fn(student_logits, teacher_logits, mask=None, *, temperature=1.0, **params) -> scalar Tensor

Logits have shape (..., V); ``mask`` has shape (...) and is truthy where a token counts. The result is the mean over
counted tokens of the per-token divergence (summed over the vocabulary), computed in fp32 whatever the input dtype.
When no token counts the result is 0 and still has a gradient path, so a step on an all-prompt micro-batch is harmless.

Each divergence is written once as a *per-token* function ``(student_logits, teacher_logits, **params) -> (...)`` and
registered by name (``REGISTRY``, one ``Divergence`` record each); the masked, averaged public function is derived
from it. Forward KL, reverse KL and JSD also register a closed-form value and gradient, which the chunked lens loss
(lens.py) uses instead of autograd, and ``fused.py`` adds their compiled kernel to the same record; those are
separate arithmetic, tied to the per-token value by one test per divergence (tests/test_divergences.py).

Vocabulary entries set to -inf (masked tokens) are handled without NaN: log-probabilities are clamped to the most
negative finite float before any product, so ``0 * log 0`` terms vanish in value and in gradient.

No temperature-squared factor is applied: callers who want Hinton's T^2 scaling multiply the result themselves.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""Label value of positions no loss counts (prompt and padding tokens), as Hugging Face losses skip it."""
HAS_REFERENCE = "has_reference"
"""Batch key set to False on a batch of the student's own answers (onpolicy.py): cross-entropy has no target there."""

TokenDivergence = Callable[..., Tensor]
"""(student_logits (..., V), teacher_logits (..., V), **params) -> per-token divergence (...)."""


@dataclass(frozen=True)
class DivergenceParam:
    """One parameter a divergence takes besides the temperature: what configs may set in ``kd_params``."""

    name: str
    default: float
    low: float
    high: float
    doc: str


TokenValueAndGrad = Callable[..., tuple[Tensor, Tensor]]
"""(student_logits (n, V), teacher_logits (n, V), **params) -> (per-row divergence (n,), d/d student_logits (n, V))."""


@dataclass
class Divergence:
    """Everything about one divergence, registered together under its name.

    ``value`` is the per-token function every path can run (autograd gives its gradient); ``gradient`` its
    closed-form value and gradient, which the chunked lens loss uses instead of autograd where it exists; ``kernel``
    the same closed form written for torch.compile (set by ``fused.py``, which compiles it). A divergence with a
    ``gradient`` has a ``kernel`` too; tests/test_divergences.py holds every registered one to its value.
    """

    name: str
    value: TokenDivergence
    params: tuple[DivergenceParam, ...] = ()
    gradient: TokenValueAndGrad | None = None
    kernel: TokenValueAndGrad | None = None


REGISTRY: dict[str, Divergence] = {}
"""Divergence name -> its record: what configs choose by string."""


def register(name: str, *params: DivergenceParam) -> Callable[[TokenDivergence], TokenDivergence]:
    """Register a per-token divergence under ``name``, with the parameters it takes, so configs choose it by string."""

    def decorator(fn: TokenDivergence) -> TokenDivergence:
        REGISTRY[name] = Divergence(name, fn, params)
        return fn

    return decorator


def register_gradient(name: str) -> Callable[[TokenValueAndGrad], TokenValueAndGrad]:
    """Register the closed-form value-and-gradient of divergence ``name`` (registered before with its value)."""

    def decorator(fn: TokenValueAndGrad) -> TokenValueAndGrad:
        get_token_divergence(name)  # one line for a name with no value registered
        REGISTRY[name].gradient = fn
        return fn

    return decorator


def closed_forms() -> list[str]:
    """Names of the divergences with a closed-form gradient (and so a fused kernel)."""
    return sorted(name for name, divergence in REGISTRY.items() if divergence.gradient is not None)


def check_divergence_params(name: str, params: Mapping[str, float], field: str) -> None:
    """One line naming ``field``'s key for a divergence that does not exist, or a parameter it does not take or
    that lies out of its range (e.g. ``model.loss.kd_params.betta: unknown parameter of reverse_kl (it takes none)``).
    """
    get_token_divergence(name)
    declared = {param.name: param for param in REGISTRY[name].params}
    for key, value in params.items():
        if key not in declared:
            takes = ", ".join(declared) or "none"
            raise ValueError(f"{field}.{key}: unknown parameter of {name} (it takes {takes})")
        param = declared[key]
        if not param.low <= value <= param.high:
            raise ValueError(
                f"{field}.{key}={value}: out of range for {name}; use a value in [{param.low}, {param.high}]"
            )


def get_token_divergence(name: str) -> TokenDivergence:
    """The per-token divergence registered as ``name``; a clear error lists the valid names."""
    try:
        return REGISTRY[name].value
    except KeyError:
        valid = ", ".join(sorted(REGISTRY))
        raise ValueError(f"unknown divergence {name!r}; valid names: {valid}") from None


def get_divergence(name: str) -> Callable[..., Tensor]:
    """The masked, token-averaged divergence registered as ``name`` (see the module docstring for its signature)."""
    return _masked(get_token_divergence(name))


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """fp32 log-softmax of ``logits / temperature`` with -inf clamped to the lowest finite float (NaN-free products)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (..., V)
    return logp.clamp_min(torch.finfo(logp.dtype).min)  # (..., V)


def kl_from_log_probs(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per row, summed over the vocabulary, from clamped log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)  # (...)


def log_mixture(logp: Tensor, logq: Tensor, weight_p: float) -> Tensor:
    """log(weight_p * p + (1 - weight_p) * q), computed in log space; 0 < weight_p < 1."""
    return torch.logaddexp(logp + math.log(weight_p), logq + math.log1p(-weight_p))  # (..., V)


def masked_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``per_token`` over positions where ``mask`` is truthy; 0 (with a gradient path) when none counts."""
    if mask is None:
        return per_token.mean() if per_token.numel() else per_token.sum()
    if mask.shape != per_token.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the token shape {tuple(per_token.shape)}"
        )
    keep = mask.bool()  # (...)
    total = torch.where(keep, per_token, torch.zeros_like(per_token)).sum()
    return total / keep.sum().clamp_min(1)


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


# ----------------------------------------------------------------------------------------------------------------
# Per-token divergences. Student first, teacher second, as in the public signature.


@register("forward_kl")
def token_forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """KL(T || S): mean-seeking; the classic KD loss."""
    return kl_from_log_probs(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))


@register("reverse_kl")
def token_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """KL(S || T): mode-seeking; the paper's default for the final layer."""
    return kl_from_log_probs(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature))


@register("jeffreys")
def token_jeffreys(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """KL(T || S) + KL(S || T): symmetric, unbounded on both sides."""
    logp_s, logp_t = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    return kl_from_log_probs(logp_t, logp_s) + kl_from_log_probs(logp_s, logp_t)


@register("jsd", DivergenceParam("beta", 0.5, 0.0, 1.0, "the teacher's weight in the mixture"))
def token_jsd(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, beta: float = 0.5
) -> Tensor:
    """Generalised Jensen-Shannon: beta*KL(T||M) + (1-beta)*KL(S||M) with M = beta*T + (1-beta)*S.

    beta = 0.5 is the symmetric JSD the paper uses (bounded by log 2). At beta = 0 the mixture is S itself and at
    beta = 1 it is T itself, so both ends are exactly 0; near the ends jsd/beta tends to KL(T||S) and
    jsd/(1-beta) to KL(S||T).
    """
    _check_unit_interval("beta", beta)
    logp_s, logp_t = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    if beta in (0.0, 1.0):
        return (logp_s * 0).sum(-1)  # (...) zeros that keep the gradient path
    log_m = log_mixture(logp_t, logp_s, beta)  # (..., V)
    return beta * kl_from_log_probs(logp_t, log_m) + (1 - beta) * kl_from_log_probs(logp_s, log_m)


@register("skew_forward_kl", DivergenceParam("alpha", 0.1, 0.0, 1.0, "the teacher's weight in the mixture"))
def token_skew_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, alpha: float = 0.1
) -> Tensor:
    """Skew KL (DistiLLM): KL(T || alpha*T + (1-alpha)*S); alpha = 0 is forward KL."""
    logp_s, logp_t = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    return _skew_kl(logp_t, logp_s, alpha, student=logp_s)


@register("skew_reverse_kl", DivergenceParam("alpha", 0.1, 0.0, 1.0, "the student's weight in the mixture"))
def token_skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, alpha: float = 0.1
) -> Tensor:
    """Skew reverse KL (DistiLLM): KL(S || alpha*S + (1-alpha)*T); alpha = 0 is reverse KL."""
    logp_s, logp_t = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    return _skew_kl(logp_s, logp_t, alpha, student=logp_s)


def _skew_kl(logp: Tensor, logq: Tensor, alpha: float, *, student: Tensor) -> Tensor:
    """KL(P || alpha P + (1-alpha) Q) per token, exact at both ends: KL(P || Q) at alpha 0, zeros (with the
    ``student``'s gradient path) at alpha 1."""
    _check_unit_interval("alpha", alpha)
    if alpha == 0.0:
        return kl_from_log_probs(logp, logq)
    if alpha == 1.0:
        return (student * 0).sum(-1)  # (...)
    return kl_from_log_probs(logp, log_mixture(logp, logq, alpha))


@register("akl", DivergenceParam("mu", 0.5, 0.0, 1.0, "teacher probability mass of the head"))
def token_akl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, mu: float = 0.5
) -> Tensor:
    """Adaptive KL (Wu et al. 2024): forward and reverse KL weighted by where the two distributions disagree.

    The teacher's vocabulary is split into a *head* (the most probable tokens, up to cumulative probability ``mu``,
    the token crossing ``mu`` included) and a *tail*. With gap_head and gap_tail the L1 gaps |p_T - p_S| summed over
    each part, AKL = g_head * KL(T||S) + g_tail * KL(S||T), g_head = gap_head / (gap_head + gap_tail). The weights
    are treated as constants (no gradient through the split), as they are a per-token choice between two losses.
    """
    _check_unit_interval("mu", mu)
    logp_s, logp_t = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    p_s, p_t = logp_s.exp(), logp_t.exp()  # (..., V)
    with torch.no_grad():
        sorted_p_t, order = p_t.sort(dim=-1, descending=True)  # (..., V)
        mass_before = (
            sorted_p_t.cumsum(-1) - sorted_p_t
        )  # (..., V) teacher mass of strictly more probable tokens
        head = torch.zeros_like(p_t, dtype=torch.bool).scatter(-1, order, mass_before < mu)  # (..., V)
        gap = (p_t - p_s).abs()  # (..., V)
        gap_head = torch.where(head, gap, torch.zeros_like(gap)).sum(-1)  # (...)
        gap_total = gap.sum(-1)  # (...)
        g_head = torch.where(
            gap_total > 0, gap_head / gap_total.clamp_min(1e-30), torch.full_like(gap_total, 0.5)
        )
    return g_head * kl_from_log_probs(logp_t, logp_s) + (1 - g_head) * kl_from_log_probs(logp_s, logp_t)


@register("tvd")
def token_tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Total variation distance: 1/2 * sum |p_T - p_S|, bounded by 1."""
    p_s, p_t = log_probs(student_logits, temperature).exp(), log_probs(teacher_logits, temperature).exp()
    return 0.5 * (p_t - p_s).abs().sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# Public masked, token-averaged divergences, derived from the per-token ones above.


def _masked(token_fn: TokenDivergence) -> Callable[..., Tensor]:
    @functools.wraps(token_fn)
    def divergence(
        student_logits: Tensor,
        teacher_logits: Tensor,
        mask: Tensor | None = None,
        *,
        temperature: float = 1.0,
        **params: float,
    ) -> Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher logits "
                f"{tuple(teacher_logits.shape)} differ in shape"
            )
        per_token = token_fn(student_logits, teacher_logits, temperature=temperature, **params)  # (...)
        return masked_mean(per_token, mask)

    divergence.__name__ = divergence.__qualname__ = token_fn.__name__.removeprefix("token_")
    return divergence


DIVERGENCES: dict[str, Callable[..., Tensor]] = {name: _masked(d.value) for name, d in REGISTRY.items()}
forward_kl = DIVERGENCES["forward_kl"]
reverse_kl = DIVERGENCES["reverse_kl"]
jeffreys = DIVERGENCES["jeffreys"]
jsd = DIVERGENCES["jsd"]
skew_forward_kl = DIVERGENCES["skew_forward_kl"]
skew_reverse_kl = DIVERGENCES["skew_reverse_kl"]
akl = DIVERGENCES["akl"]
tvd = DIVERGENCES["tvd"]


def masked_mse(student_features: Tensor, teacher_features: Tensor, mask: Tensor | None = None) -> Tensor:
    """The MSE feature baseline: squared error averaged over features, then over counted tokens (fp32).

    Unlike the published code, padding and prompt tokens do not count. Features of shape (..., d), mask (...).
    """
    diff = student_features.float() - teacher_features.float()  # (..., d)
    return masked_mean(diff.pow(2).mean(-1), mask)


# ----------------------------------------------------------------------------------------------------------------
# Closed-form gradients with respect to the student's logits, for the chunked lens loss.
#
# Autograd through a divergence keeps about a dozen (n, V) tensors alive for its backward; these functions return
# the value and d/dz_student together from four or five, updated in place. For a student softmax p = softmax(z / T)
# and g = dD/dp, the chain rule through the softmax gives dD/dz = p * (g - <p, g>) / T. Tests check every one against
# autograd on the per-token functions above.


def _probabilities(student_logits: Tensor, teacher_logits: Tensor, temperature: float):
    """Unclamped fp32 log-probabilities and probabilities of both models, plus whether any logit is -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (n, V)
    logp_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (n, V)
    has_inf = not (torch.isfinite(student_logits).all() and torch.isfinite(teacher_logits).all())
    return logp_s, logp_t, logp_s.exp(), logp_t.exp(), has_inf


def _zero_where_impossible(log_ratio: Tensor, p: Tensor, has_inf: bool) -> Tensor:
    """0 * log(0 / x) = 0: clear the (NaN or infinite) log ratio where p is 0, in place."""
    return log_ratio.masked_fill_(p == 0, 0.0) if has_inf else log_ratio


def _softmax_backward_(g: Tensor, p: Tensor, inner: Tensor, scale: float) -> Tensor:
    """In place: g <- p * (g - inner) * scale, with inner = <p, g> per row (n,)."""
    return g.sub_(inner.unsqueeze(-1)).mul_(p).mul_(scale)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.vecdot(a, b)  # (n,) without an (n, V) product temporary


@register_gradient("forward_kl")
def grad_forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0):
    """KL(T||S) and its gradient (p_S - p_T) / T."""
    logp_s, logp_t, p_s, p_t, has_inf = _probabilities(student_logits, teacher_logits, temperature)
    log_ratio = _zero_where_impossible(logp_t.sub_(logp_s), p_t, has_inf)  # (n, V) log p_T - log p_S
    value = _rowdot(p_t, log_ratio)  # (n,)
    return value, p_s.sub_(p_t).div_(temperature)


@register_gradient("reverse_kl")
def grad_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0):
    """KL(S||T); dD/dp_S = log(p_S / p_T) + 1, the constant cancels in the softmax backward."""
    logp_s, logp_t, p_s, _, has_inf = _probabilities(student_logits, teacher_logits, temperature)
    log_ratio = _zero_where_impossible(logp_s.sub_(logp_t), p_s, has_inf)  # (n, V) log p_S - log p_T
    value = _rowdot(p_s, log_ratio)  # (n,)
    return value, _softmax_backward_(log_ratio, p_s, value, 1.0 / temperature)


@register_gradient("jsd")
def grad_jsd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, beta: float = 0.5):
    """Generalised JSD; dD/dp_S = (1 - beta) * log(p_S / M), M = beta * p_T + (1 - beta) * p_S."""
    _check_unit_interval("beta", beta)
    logp_s, logp_t, p_s, p_t, has_inf = _probabilities(student_logits, teacher_logits, temperature)
    if beta in (0.0, 1.0):
        return logp_s.new_zeros(logp_s.shape[:-1]), torch.zeros_like(logp_s)
    m = torch.add(p_t, p_s, alpha=(1 - beta) / beta).mul_(beta)  # (n, V) the mixture
    log_m = m.clamp_min_(torch.finfo(m.dtype).tiny).log_()  # (n, V) finite where both underflow
    teacher_ratio = _zero_where_impossible(logp_t.sub_(log_m), p_t, has_inf)  # (n, V) log p_T - log M
    student_ratio = _zero_where_impossible(logp_s.sub_(log_m), p_s, has_inf)  # (n, V) log p_S - log M
    student_term = _rowdot(p_s, student_ratio)  # (n,)
    value = beta * _rowdot(p_t, teacher_ratio) + (1 - beta) * student_term  # (n,)
    return value, _softmax_backward_(student_ratio, p_s, student_term, (1 - beta) / temperature)
