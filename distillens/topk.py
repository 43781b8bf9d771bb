"""Divergences against a teacher kept as its top k tokens: the approximate targets of a teacher cache.

A cached teacher distribution is its k most likely tokens' log-probabilities (normalised over the whole vocabulary,
at the objective's temperature) and one *tail bucket* holding the rest of its mass. The student's distribution is
mapped onto the same k + 1 outcomes (its log-probabilities of those k ids, and the log of all its other mass) and any
registered divergence runs on the two (k + 1)-outcome distributions. Why a bucket and not renormalising the top k:
both distributions stay proper distributions of the same outcomes, so every divergence keeps its meaning and its
bounds (JSD <= log 2, TVD <= 1), the student is still pushed to put the teacher's tail mass outside the top k, and
with k = V the tail is empty on both sides and the value equals the exact one. Merging outcomes can only lose
information, so each divergence here is at most its exact value (data processing); ``docs/method.md`` says what
that does to each divergence and the README measures the gap for several k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from distillens.lens import LogitLens, cast_for_chunks, chunked_divergence
from distillens.losses import get_token_divergence


@dataclass
class TopK:
    """A teacher distribution at N positions: its top k log-probabilities, their token ids and its tail."""

    logprobs: Tensor
    """(N, k) log-probabilities of the teacher's k most likely tokens, normalised over the whole vocabulary."""
    ids: Tensor
    """(N, k) the token ids of those log-probabilities (int64 when read)."""
    tail: Tensor
    """(N,) log of the teacher's mass outside the top k (-inf when k is the vocabulary size)."""

    def buckets(self) -> Tensor:
        """(N, k + 1) the teacher's log-probabilities of the top k tokens and of the tail bucket."""
        return torch.cat([self.logprobs.float(), self.tail.float()[:, None]], dim=-1)  # (N, k+1)

    def rows(self, keep: Tensor) -> TopK:
        """The positions ``keep`` selects: a boolean (N,) mask (a sampled lens's token subset) or indices."""
        return TopK(self.logprobs[keep], self.ids[keep], self.tail[keep])

    @staticmethod
    def cat(parts: Sequence[TopK]) -> TopK:
        """Several pairs' targets one after the other, as their student rows are."""
        return TopK(*(torch.cat([getattr(p, name) for p in parts]) for name in ("logprobs", "ids", "tail")))


def top_k_of(logits: Tensor, k: int, temperature: float = 1.0) -> TopK:
    """The top k of the distribution ``softmax(logits / temperature)``; ``logits`` (N, V), computed in fp32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (N, V)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (N, k), (N, k)
    return TopK(values, ids, _tail(logp, ids))


def _tail_of_head(logp: Tensor, ids: Tensor, head: Tensor) -> Tensor:
    """``_tail`` from the top k's log-probabilities ``head`` (n, k): log(1 - their mass), a pass over (n, k) only;
    rows whose top k hold more than 0.99 of the mass (where 1 - mass loses digits) take the exact ``_tail``."""
    if ids.shape[-1] >= logp.shape[-1]:
        return _tail(logp, ids)
    mass = head.exp().sum(-1)  # (n,)
    tail = torch.log1p(-mass.clamp_max(1.0))  # (n,)
    close = mass > 0.99
    if close.any():
        tail = tail.masked_scatter(close, _tail(logp[close], ids[close]))
    return tail


def _tail(logp: Tensor, ids: Tensor) -> Tensor:
    """(N,) log of the mass of ``logp`` (N, V) outside ``ids`` (N, k); -inf, with no gradient path, when k = V
    (a log-sum-exp over nothing has a NaN gradient)."""
    if ids.shape[-1] >= logp.shape[-1]:
        return torch.full(logp.shape[:-1], float("-inf"), dtype=logp.dtype, device=logp.device)  # (N,)
    rest = logp.scatter(-1, ids, float("-inf"))  # (N, V): the top k removed
    return torch.logsumexp(rest, dim=-1)  # (N,)


def topk_divergence(
    student_hidden: Sequence[Tensor],
    teacher: Sequence[TopK],
    student_projection: LogitLens,
    mask: Tensor,
    divergence: str,
    *,
    chunk_size: int = 256,
    reduction: str = "sum",
    temperature: float = 1.0,
    **params: float,
) -> tuple[Tensor, Tensor]:
    """The divergence between the student's projected distributions and cached top-k teacher targets.

    Chunk by chunk, as the live lens term (``lens.chunked_divergence``): each chunk's (n, V) student logits exist
    once, and their gradient is computed while they do, from the gradient with respect to the k + 1 buckets
    (``bucket_values_and_grads``); no teacher projection at all.

    Args:
        student_hidden: p tensors (B, T, d_s), one per pair, aligned with ``mask``.
        teacher: p ``TopK``, one per pair, at the positions where ``mask`` is true (row-major order).
        student_projection: the student's lens (or output head) mapping hidden states to logits.
        mask: (B, T) bool, the supervised (or drawn) positions.
        divergence: a registered divergence name.
        chunk_size: rows projected at once.
        reduction: "sum" (token sum, averaged over pairs) or "mean" (token mean).
        temperature: the student's softmax temperature (the teacher's targets were stored at it).

    Returns:
        (loss, per_pair): the scalar with its gradient path, and each pair's token mean (detached).
    """
    keep = mask.reshape(-1).bool()  # (B*T,)
    count, pairs = int(keep.sum()), len(student_hidden)
    for target in teacher:
        if target.ids.shape[0] != count:
            raise ValueError(f"top-k targets hold {target.ids.shape[0]} positions, the batch {count}")
    student_rows = torch.cat([h.reshape(-1, h.shape[-1])[keep] for h in student_hidden])  # (p*N, d_s)
    tracking = torch.is_grad_enabled()
    student_params = [p for p in student_projection.parameters() if p.requires_grad] if tracking else []
    row_weight = 1.0 / pairs / (max(count, 1) if reduction == "mean" else 1)
    plan = _TopKPlan(student_projection, TopK.cat(teacher), divergence, params, chunk_size, row_weight,
                     temperature, student_params)  # fmt: skip
    rows = torch.arange(
        student_rows.shape[0], device=student_rows.device
    )  # (p*N,): which targets a chunk reads
    loss, per_row = chunked_divergence(
        plan, student_rows if tracking else student_rows.detach(), rows, *student_params
    )
    return loss, per_row.reshape(pairs, count).sum(-1) / max(count, 1)


class _TopKPlan:
    """What every chunk needs (``lens.chunked_divergence``'s plan): the student's projection, the targets, the
    divergence; under autocast the unembedding is cast once for all chunks, as the live plan does."""

    def __init__(
        self, lens, targets, divergence, params, chunk_size, row_weight, temperature, student_params
    ):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.lens, self.targets, self.token_fn = lens, targets, get_token_divergence(divergence)
        self.params, self.chunk_size, self.row_weight = params, chunk_size, row_weight
        self.temperature = temperature
        self.weight, self.differentiated = cast_for_chunks(lens, student_params)

    def values(self, student_rows: Tensor, rows: Tensor) -> Tensor:
        """Per-row divergences of one chunk, no gradient: (n, d_s) and the chunk's target rows (n,) -> (n,)."""
        with torch.no_grad():
            logits = self.lens.logits(student_rows, self.weight)  # (n, V)
            return bucket_values_and_grads(logits, self.targets.rows(rows), self.token_fn, self.temperature,
                                           self.params, weight=None)[0]  # fmt: skip

    def values_and_grads(self, student_rows: Tensor, rows: Tensor, wanted: list[Tensor]):
        """Per-row divergences (n,) and the gradients of their weighted sum with respect to ``wanted``."""
        with torch.enable_grad():
            logits = self.lens.logits(student_rows, self.weight)  # (n, V)
            values, grad_logits = bucket_values_and_grads(
                logits.detach(), self.targets.rows(rows), self.token_fn, self.temperature, self.params,
                weight=self.row_weight,
            )  # fmt: skip
            grads = torch.autograd.grad(logits, wanted, grad_logits.to(logits.dtype), allow_unused=True)
        return values, grads


def bucket_values_and_grads(logits: Tensor, target: TopK, token_fn, temperature: float, params: dict,
                            weight: float | None) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Per-row divergences between the student's (k + 1)-bucket distribution and the teacher's, and the gradient of
    ``weight`` x their sum with respect to the student's logits (None without a weight).

    Autograd runs through the divergence on the small (n, k + 1) buckets only; the chain rule to the (n, V) logits
    is written out. With z the logits over temperature t, q = softmax(z) and b the buckets' log-probabilities
    (b_i = log q_{id_i}, b_tail = log q_tail): d b_i / d z_j = [j = id_i] - q_j and d b_tail / d z_j = [j in tail]
    q_j / q_tail - q_j, so dL/dz_j = g_{i: id_i = j} + [j in tail] g_tail q_j / q_tail - q_j sum(g), over t.
    """
    logq = torch.log_softmax(logits.float() / temperature, dim=-1)  # (n, V)
    ids = target.ids.long()  # (n, k)
    head = logq.gather(-1, ids)  # (n, k)
    buckets = torch.cat([head, _tail_of_head(logq, ids, head)[:, None]], dim=-1)  # (n, k+1)
    if weight is None:
        return token_fn(buckets, target.buckets(), temperature=1.0, **params), None
    buckets = buckets.detach().requires_grad_()
    with torch.enable_grad():
        values = token_fn(buckets, target.buckets(), temperature=1.0, **params)  # (n,)
        (g,) = torch.autograd.grad(values.sum() * weight, buckets)  # (n, k+1)
    total = g.sum(-1, keepdim=True)  # (n, 1)
    tail = buckets[:, -1].detach()  # (n,)
    per_tail_mass = torch.where(torch.isfinite(tail), g[:, -1] * torch.exp(-tail), 0.0)[:, None]  # (n, 1)
    q = logq.exp_()  # (n, V), in place: logq is not needed again
    grad = q * (per_tail_mass - total)  # (n, V): every token as if in the tail
    grad.scatter_(-1, ids, g[:, :-1] - q.gather(-1, ids) * total)  # the top k are not
    return values.detach(), grad / temperature
