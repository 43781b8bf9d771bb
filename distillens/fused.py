"""Fused divergence kernels: a chunk's closed-form divergence and gradient compiled into a few loops over its rows.

Run eagerly, a closed-form value-and-gradient (``losses.Divergence.gradient``) over an (n, V) chunk of logits makes about
twenty passes over n x V fp32 values: two log-softmaxes, exponentials, the mixture and its log, row products, the
softmax backward, the row weight and the cast to the backward's dtype. On a CPU that costs more than the chunk's four
vocabulary matrix products in bf16. ``torch.compile`` (Inductor) turns the kernels below into a few loops per row that
read the logits in their own dtype, keep every intermediate value in registers and write the weighted gradient once.
The arithmetic is the same fp32 arithmetic; only the memory traffic goes.

The kernels are written for the compiler, out of place and with the log-softmax spelt out: Inductor fuses that form
into two loops per row, while its decomposition of ``torch.log_softmax`` and in-place updates made the same kernel
slower (README, Speed). Eager, the memory-lean in-place functions of losses.py run instead; tests compare the two.
Each kernel is stored in its divergence's ``losses.REGISTRY`` record, beside its value and closed-form gradient.

Where compilation is not possible (a CPU machine without a C++ compiler, a GPU without Triton), one warning says so
and the eager functions run instead, with the same results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from distillens.losses import REGISTRY

log = logging.getLogger(__name__)

Kernel = Callable[..., tuple[Tensor, Tensor]]
"""(student_logits (n, V), teacher_logits (n, V), temperature, **params) -> (values (n,), d/d student_logits (n, V)),
both fp32; the same contract as ``losses.Divergence.gradient``."""


def kernel(name: str) -> Callable[[Kernel], Kernel]:
    """Register the compiler-oriented form of divergence ``name``'s closed-form value and gradient, in the
    divergence's own record."""

    def decorator(fn: Kernel) -> Kernel:
        REGISTRY[name].kernel = fn
        return fn

    return decorator


def has_kernel(divergence: str) -> bool:
    """Whether ``divergence`` has a closed-form gradient, hence a fused kernel (and an eager one)."""
    return divergence in REGISTRY and REGISTRY[divergence].gradient is not None


# ----------------------------------------------------------------------------------------------------------------
# The kernels. p = softmax(z / T); where a probability is 0, its p * log(p / q) term is 0 (masked vocabulary entries).


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    """fp32 log-softmax of ``logits / temperature``, spelt out (max, sum of exponentials, log) for the compiler."""
    scaled = logits.float() / temperature  # (n, V)
    top = scaled.amax(-1, keepdim=True)  # (n, 1)
    return scaled - (top + (scaled - top).exp().sum(-1, keepdim=True).log())  # (n, V)


def _where_possible(p: Tensor, log_ratio: Tensor) -> Tensor:
    return torch.where(p == 0, 0.0, log_ratio)  # (n, V)


@kernel("forward_kl")
def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0):
    """KL(T||S) and its gradient (p_S - p_T) / T."""
    logp_s, logp_t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    p_t = logp_t.exp()  # (n, V)
    values = (p_t * _where_possible(p_t, logp_t - logp_s)).sum(-1)  # (n,)
    return values, (logp_s.exp() - p_t) / temperature


@kernel("reverse_kl")
def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0):
    """KL(S||T) and its gradient p_S * (log(p_S / p_T) - KL) / T."""
    logp_s, logp_t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    p_s = logp_s.exp()  # (n, V)
    ratio = _where_possible(p_s, logp_s - logp_t)  # (n, V)
    values = (p_s * ratio).sum(-1, keepdim=True)  # (n, 1)
    return values.squeeze(-1), p_s * (ratio - values) / temperature


@kernel("jsd")
def jsd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, beta: float = 0.5):
    """Generalised JSD, beta * KL(T||M) + (1 - beta) * KL(S||M), and its gradient; M = beta p_T + (1 - beta) p_S."""
    logp_s, logp_t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    if beta in (0.0, 1.0):  # M is one of the two distributions: exactly 0
        return logp_s.new_zeros(logp_s.shape[:-1]), torch.zeros_like(logp_s)
    p_s, p_t = logp_s.exp(), logp_t.exp()  # (n, V)
    log_m = (beta * p_t + (1 - beta) * p_s).clamp_min(torch.finfo(torch.float32).tiny).log()  # (n, V)
    student_ratio = _where_possible(p_s, logp_s - log_m)  # (n, V)
    student_term = (p_s * student_ratio).sum(-1, keepdim=True)  # (n, 1)
    teacher_term = (p_t * _where_possible(p_t, logp_t - log_m)).sum(-1)  # (n,)
    values = beta * teacher_term + (1 - beta) * student_term.squeeze(-1)  # (n,)
    return values, p_s * (student_ratio - student_term) * ((1 - beta) / temperature)


# ----------------------------------------------------------------------------------------------------------------
# Entry points: compiled kernels, or the eager closed forms.


def value_and_weighted_grad(
    divergence: str, student_logits: Tensor, teacher_logits: Tensor, weight: Tensor, *, fused: bool, **params
) -> tuple[Tensor, Tensor]:
    """Per-row divergences (n,) in fp32, and ``weight`` times their gradient with respect to ``student_logits`` (n, V),
    in the student logits' dtype (what their backward takes).

    ``weight`` is a 0-dim tensor, so a weight that changes from step to step does not recompile the kernel.
    """
    return _run("value_and_grad", divergence, fused, student_logits, teacher_logits, weight, **params)


def values(
    divergence: str, student_logits: Tensor, teacher_logits: Tensor, *, fused: bool, **params
) -> Tensor:
    """Per-row divergences (n,) in fp32 (no gradient: validation); compiled, the gradient's loops are dropped."""
    return _run("values", divergence, fused, student_logits, teacher_logits, **params)


def _value_and_weighted_grad(closed_form: Kernel) -> Callable:
    def value_and_weighted_grad(student_logits: Tensor, teacher_logits: Tensor, weight: Tensor, **params):
        row_values, grad = closed_form(student_logits, teacher_logits, **params)  # (n,), (n, V) fp32
        # in place: eagerly, one (n, V) fp32 tensor stays alive
        return row_values, grad.mul_(weight).to(student_logits.dtype)  # (n, V)

    return value_and_weighted_grad


def _values(closed_form: Kernel) -> Callable:
    def row_values(student_logits: Tensor, teacher_logits: Tensor, **params) -> Tensor:
        return closed_form(student_logits, teacher_logits, **params)[0]  # (n,)

    return row_values


_ENTRY_POINTS = {"value_and_grad": _value_and_weighted_grad, "values": _values}

_COMPILED: dict[tuple[str, str], Callable] = {}
"""(entry point, divergence name) -> its compiled kernel, built once per process."""
_UNAVAILABLE: dict[str, str] = {}
"""Device type -> why compilation failed there; such devices run the eager closed forms."""


def _run(entry: str, divergence: str, fused: bool, student_logits: Tensor, *args, **params):
    device = student_logits.device.type
    # under a dispatch mode (FLOP counting, debugging) the kernel compiled then would be kept for every later call,
    # and it runs op by op (measured: a bench-train step as slow as eager after one FLOP-counted step)
    if not fused or device in _UNAVAILABLE or is_in_torch_dispatch_mode():
        return _ENTRY_POINTS[entry](REGISTRY[divergence].gradient)(student_logits, *args, **params)
    key = (entry, divergence)
    if key not in _COMPILED:
        # dynamic: the last chunk of a step has another row count; one kernel serves every count
        _COMPILED[key] = torch.compile(_ENTRY_POINTS[entry](REGISTRY[divergence].kernel), dynamic=True)
    try:
        with torch.no_grad():  # a gradient-mode kernel is traced for autograd and fuses worse (README, Speed)
            return _COMPILED[key](student_logits, *args, **params)
    except Exception as error:  # noqa: BLE001 - any compiler failure: the eager closed form gives the same result
        lines = str(error).strip().splitlines()
        _UNAVAILABLE[device] = lines[0] if lines else type(error).__name__
        log.warning(
            "fused divergence kernels unavailable on %s (%s); running them eagerly (slower, same results; "
            "model.loss.fused: false skips the attempt)",
            device,
            _UNAVAILABLE[device][:200],
        )
        return _ENTRY_POINTS[entry](REGISTRY[divergence].gradient)(student_logits, *args, **params)
