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
from torch.utils.checkpoint import checkpoint

from distillens.lens import LogitLens
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
        """The positions where the boolean (N,) ``keep`` is true (a sampled lens's token subset)."""
        return TopK(self.logprobs[keep], self.ids[keep], self.tail[keep])


def top_k_of(logits: Tensor, k: int, temperature: float = 1.0) -> TopK:
    """The top k of the distribution ``softmax(logits / temperature)``; ``logits`` (N, V), computed in fp32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (N, V)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (N, k), (N, k)
    return TopK(values, ids, _tail(logp, ids))


def student_buckets(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """(N, k + 1) the student's log-probabilities of the teacher's top-k ``ids`` (N, k) and of everything else."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (N, V)
    return torch.cat([logp.gather(-1, ids), _tail(logp, ids)[:, None]], dim=-1)  # (N, k+1)


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

    Args:
        student_hidden: k tensors (B, T, d_s), one per pair, aligned with ``mask``.
        teacher: k ``TopK``, one per pair, at the positions where ``mask`` is true (row-major order).
        student_projection: the student's lens (or output head) mapping hidden states to logits.
        mask: (B, T) bool, the supervised (or drawn) positions.
        divergence: a registered divergence name.
        chunk_size: rows projected at once; each chunk is recomputed in the backward pass (activation
            checkpointing), so peak memory holds one chunk of vocabulary-sized rows.
        reduction: "sum" (token sum, averaged over pairs) or "mean" (token mean).
        temperature: the student's softmax temperature (the teacher's targets were stored at it).

    Returns:
        (loss, per_pair): the scalar with its gradient path, and each pair's token mean (detached).
    """
    token_divergence = get_token_divergence(divergence)
    keep = mask.reshape(-1).bool()  # (B*T,)
    count = int(keep.sum())
    per_pair, total = [], None
    for hidden, target in zip(student_hidden, teacher, strict=True):
        rows = hidden.reshape(-1, hidden.shape[-1])[keep]  # (N, d_s)
        if target.ids.shape[0] != count:
            raise ValueError(f"top-k targets hold {target.ids.shape[0]} positions, the batch {count}")
        pair = _pair_sum(rows, target, student_projection, token_divergence, chunk_size, temperature, params)
        per_pair.append(pair.detach() / max(count, 1))
        total = pair if total is None else total + pair
    loss = total / len(per_pair) / (max(count, 1) if reduction == "mean" else 1)
    return loss, torch.stack(per_pair)


def _pair_sum(rows, target: TopK, projection: LogitLens, token_divergence, chunk_size, temperature, params):
    """Token sum of one pair's divergence, chunk by chunk, each chunk's (n, V) logits recomputed in backward."""

    def chunk_sum(hidden: Tensor, ids: Tensor, teacher_buckets: Tensor) -> Tensor:
        buckets = student_buckets(projection.logits(hidden), ids, temperature)  # (n, k+1)
        return token_divergence(buckets, teacher_buckets, temperature=1.0, **params).sum()

    teacher_buckets = target.buckets()  # (N, k+1)
    ids = target.ids.long()  # (N, k)
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        args = (rows[part], ids[part], teacher_buckets[part])
        total = total + (
            checkpoint(chunk_sum, *args, use_reentrant=False) if rows.requires_grad else chunk_sum(*args)
        )
    return total
