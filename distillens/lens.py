"""The logit lens: read any layer's residual stream in vocabulary space, and the memory-efficient lens loss.

``LogitLens(model)`` finds, from transformers' own module structure, what a causal LM applies between its last block
and its logits: the final norm, an output projection if any (OPT's ``project_out``), the unembedding, and the
post-processing its config asks for (final-logit softcapping, logit scale). ``lens.logits(h_L)`` therefore equals the
model's logits, and ``lens.logits(h_i)`` is the logit lens of layer i.

``lens_loss`` compares teacher and student lens distributions layer pair by layer pair (``projected_divergence``
with the lenses; the final-layer term is the same routine with the output heads). It never materialises
(k, B, T, V) logits as the published code does: it gathers the supervised positions, projects them chunk by chunk,
and computes each chunk's gradient while the chunk is live, so peak memory holds one chunk of vocabulary-sized rows per
model whatever the number of pairs, the batch or the sequence length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillens import fused as fused_kernels
from distillens.losses import get_token_divergence
from distillens.structure import blocks_of, decoder_of, final_norm_of, unembedding_of


class LogitLens:
    """Final norm + unembedding (+ the family's post-processing) of one causal LM, and capture of its layers.

    Not an ``nn.Module`` on purpose: it only *refers* to modules the model already owns, so holding a lens never
    duplicates parameters in a state dict or an optimizer.

    Args:
        model: a Hugging Face decoder-only causal LM (``AutoModelForCausalLM``).
        apply_final_norm: False reproduces the published code's lens, ``lm_head(h_i)`` on the raw residual stream.
    """

    def __init__(self, model: nn.Module, *, apply_final_norm: bool = True) -> None:
        self.model = model
        self.apply_final_norm = apply_final_norm
        decoder = decoder_of(model)
        self.blocks = blocks_of(model, decoder)
        self.norm = final_norm_of(decoder, self.blocks)
        self.output_projection = getattr(
            decoder, "project_out", None
        )  # OPT with word_embed_proj_dim != hidden
        self.unembedding = unembedding_of(model)
        config = model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3: cap * tanh(z / cap)
        self.logit_scale = getattr(config, "logit_scale", None)  # Cohere: z * scale

    @classmethod
    def from_parts(
        cls,
        norm: nn.Module | None,
        unembedding: nn.Module,
        *,
        output_projection: nn.Module | None = None,
        softcap: float | None = None,
        logit_scale: float | None = None,
    ) -> LogitLens:
        """A lens from bare modules, without a model to capture from (benchmarks, synthetic workloads)."""
        lens = cls.__new__(cls)
        lens.model, lens.apply_final_norm, lens.blocks = None, True, nn.ModuleList()
        lens.norm, lens.output_projection, lens.unembedding = norm, output_projection, unembedding
        lens.softcap, lens.logit_scale = softcap, logit_scale
        return lens

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks L; valid capture indices are 0 (embeddings) to L."""
        return len(self.blocks)

    def parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the lens computation uses (norm, output projection, unembedding), each once."""
        seen: set[int] = set()
        for module in (self.norm, self.output_projection, self.unembedding):
            for param in module.parameters() if module is not None else ():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield param

    def logits(self, hidden: Tensor, unembedding_weight: Tensor | None = None) -> Tensor:
        """U(norm(h)) plus the family's post-processing; ``hidden`` (..., d) raw residual stream -> (..., V).

        ``unembedding_weight`` stands in for the unembedding's own weight (``cast_unembedding``'s copy).
        """
        if self.apply_final_norm and self.norm is not None:
            hidden = self.norm(hidden)  # (..., d)
        if self.output_projection is not None:
            hidden = self.output_projection(hidden)  # (..., d_out)
        if unembedding_weight is None:
            logits = self.unembedding(hidden)  # (..., V)
        else:
            logits = F.linear(hidden, unembedding_weight, self.unembedding.bias)  # (..., V)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def cast_unembedding(self) -> Tensor | None:
        """The unembedding weight (V, d) cast once to the autocast dtype in force, as a leaf that requires a gradient
        when the weight does; None without autocast, when the weight already has that dtype, or for an unembedding
        that is not a plain ``nn.Linear``.

        Autocast casts a weight at every use and keeps the copy only for parameters that require a gradient: a
        chunked loss would cast the frozen teacher's unembedding once per chunk and, for the student's, turn each
        chunk's weight gradient back to fp32 on its own. Used in place of the weight, one copy serves every chunk
        with the same values.
        """
        if not isinstance(self.unembedding, nn.Linear):
            return None
        weight = self.unembedding.weight  # (V, d)
        if not torch.is_autocast_enabled(weight.device.type):
            return None
        dtype = torch.get_autocast_dtype(weight.device.type)
        if weight.dtype == dtype:
            return None
        return weight.detach().to(dtype).requires_grad_(weight.requires_grad)  # (V, d)

    def check_layers(self, layers: Sequence[int]) -> None:
        """Raise a clear error for any index outside 0..L."""
        bad = [i for i in layers if not 0 <= int(i) <= self.num_layers]
        if bad:
            raise ValueError(
                f"layer indices {bad} out of range for {type(self.model).__name__} with {self.num_layers} blocks "
                f"(valid: 0 = embeddings .. {self.num_layers} = last block)"
            )

    @contextlib.contextmanager
    def capture(self, layers: Sequence[int]) -> Iterator[dict[int, Tensor]]:
        """Capture the raw residual streams of ``layers`` (hidden_states indexing) during forwards in the block.

        Yields a dict filled as the forward runs: index -> (B, T, d) tensor, before any final norm. Only the listed
        layers are kept, and the hooks are removed on exit, also after an exception.
        """
        self.check_layers(layers)
        captured: dict[int, Tensor] = {}
        handles = []
        try:
            for index in sorted(set(int(i) for i in layers)):
                handles.append(self._hook(index, captured))
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, index: int, captured: dict[int, Tensor]):
        if index == 0:  # the embeddings: the input of the first block

            def before_first(_module, args, kwargs):
                captured[0] = args[0] if args else kwargs["hidden_states"]  # (B, T, d)

            return self.blocks[0].register_forward_pre_hook(before_first, with_kwargs=True)

        def after_block(_module, _args, output):
            captured[index] = output[0] if isinstance(output, tuple) else output  # (B, T, d)

        return self.blocks[index - 1].register_forward_hook(after_block)


# ----------------------------------------------------------------------------------------------------------------
# The lens loss


def projected_divergence(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    student_projection: LogitLens,
    teacher_projection: LogitLens,
    mask: Tensor,
    divergence: str = "jsd",
    chunk_size: int = 256,
    reduction: str = "mean",
    fused: bool = False,
    **params: float,
) -> tuple[Tensor, Tensor]:
    """Divergence between the vocabulary distributions two projections give of aligned hidden states.

    Behind both distillation terms: the output heads on the last hidden states give the final-layer term, the lenses
    on layer pairs the lens term (``lens_loss``). Chunk by chunk; the pairs' token means (or sums) are averaged.

    Args:
        student_hidden: k tensors (B, T, d_s), aligned by pair with ``teacher_hidden`` (k tensors (B, T, d_t)).
        student_projection, teacher_projection: map a hidden state to logits (a lens, or the output head).
        mask: (B, T), truthy where a token is supervised.
        divergence: a registered divergence name (losses.REGISTRY).
        chunk_size: rows projected at once; bounds peak memory at about chunk_size x V per model.
        reduction: "mean" averages over supervised tokens; "sum" returns the token sum (still averaged over pairs),
            for callers that normalise by a token count gathered across micro-batches and ranks.
        fused: run the divergence's closed-form value and gradient as a compiled kernel (fused.py), when it has one.
        **params: the divergence's parameters (``temperature``, ``beta``, ...).

    Returns:
        (loss, per_pair): the scalar loss with its gradient path, and the k per-pair token means (detached).
    """
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(
            f"need the same non-zero number of student and teacher layers, got {len(student_hidden)} and "
            f"{len(teacher_hidden)}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    get_token_divergence(divergence)  # a clear error for an unknown name, before any work
    keep = mask.reshape(-1).bool()  # (B*T,)
    count, pairs = int(keep.sum()), len(student_hidden)
    student_rows = torch.cat([h.reshape(-1, h.shape[-1])[keep] for h in student_hidden])  # (k*N, d_s)
    teacher_rows = torch.cat([h.reshape(-1, h.shape[-1])[keep] for h in teacher_hidden])  # (k*N, d_t)
    row_weight = 1.0 / pairs / (max(count, 1) if reduction == "mean" else 1)
    tracking = torch.is_grad_enabled()  # under no_grad (validation) no gradient is computed chunk by chunk
    student_params = [p for p in student_projection.parameters() if p.requires_grad] if tracking else []
    chunks = _ChunkPlan(
        student_projection,
        teacher_projection,
        divergence,
        params,
        chunk_size,
        row_weight,
        fused,
        student_params,
    )
    loss, per_row = _ChunkedLensDivergence.apply(
        chunks, student_rows if tracking else student_rows.detach(), teacher_rows, *student_params
    )
    per_pair = per_row.reshape(pairs, count).sum(-1) / max(count, 1)  # (k,)
    return loss, per_pair


def lens_loss(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    student_lens: LogitLens,
    teacher_lens: LogitLens,
    mask: Tensor,
    divergence: str = "jsd",
    **options: float | int | str,
) -> tuple[Tensor, Tensor]:
    """The lens term: mean over layer pairs of the masked token mean (or sum) of the divergence between the two
    models' logit-lens distributions; ``projected_divergence`` with the lenses (``options``: its ``chunk_size``,
    ``reduction`` and the divergence's parameters)."""
    return projected_divergence(
        student_hidden, teacher_hidden, student_lens, teacher_lens, mask, divergence, **options
    )


def cast_for_chunks(lens: LogitLens, params: Sequence[Tensor]) -> tuple[Tensor | None, list[Tensor]]:
    """The lens's unembedding cast once for all chunks (``LogitLens.cast_unembedding``; None when no cast is
    needed) and the tensors the chunks differentiate: ``params`` with that copy in the place of its weight."""
    weight = lens.cast_unembedding()  # (V, d) or None
    if weight is None:
        return None, list(params)
    own = lens.unembedding.weight  # a plain nn.Linear: its cast weight stands in for it
    return weight, [weight if p is own else p for p in params]


class _ChunkPlan:
    """What every chunk of the lens loss needs: the two lenses, the divergence and its parameters, the row weight,
    whether its closed-form kernels run compiled, and the tensors the chunks differentiate.

    Under autocast both unembedding weights are cast once for all chunks (``LogitLens.cast_unembedding``); the
    student's copy is then what each chunk differentiates, in the place of its parameter in ``differentiated``, and
    its gradients are summed into that parameter's fp32 accumulator as before.
    """

    def __init__(
        self,
        student_lens,
        teacher_lens,
        divergence,
        params,
        chunk_size,
        row_weight,
        fused=False,
        student_params=(),
    ):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.student_lens, self.teacher_lens = student_lens, teacher_lens
        self.divergence, self.token_fn = divergence, get_token_divergence(divergence)
        self.closed_form, self.fused = fused_kernels.has_kernel(divergence), fused
        self.params, self.chunk_size, self.row_weight = params, chunk_size, row_weight
        self.teacher_weight = teacher_lens.cast_unembedding()  # (V, d_t) or None
        self.student_weight, self.differentiated = cast_for_chunks(student_lens, student_params)

    def values(self, student_rows: Tensor, teacher_rows: Tensor) -> Tensor:
        """Per-row divergences of one chunk, no gradient: (n, d_s), (n, d_t) -> (n,)."""
        with torch.no_grad():
            student_logits = self.student_lens.logits(student_rows, self.student_weight)  # (n, V)
            teacher_logits = self.teacher_lens.logits(teacher_rows, self.teacher_weight)  # (n, V)
            if self.fused and self.closed_form:
                return fused_kernels.values(
                    self.divergence, student_logits, teacher_logits, fused=True, **self.params
                )
            return self.token_fn(student_logits, teacher_logits, **self.params)

    def values_and_grads(self, student_rows: Tensor, teacher_rows: Tensor, wanted: list[Tensor]):
        """Per-row divergences (n,) and the gradients of their weighted sum with respect to ``wanted``.

        With a closed-form gradient registered for the divergence, autograd only runs through the lens
        (norm + unembedding); otherwise it also runs through the divergence.
        """
        with torch.no_grad():
            teacher_logits = self.teacher_lens.logits(teacher_rows, self.teacher_weight)  # (n, V)
        with torch.enable_grad():
            student_logits = self.student_lens.logits(student_rows, self.student_weight)  # (n, V)
            if self.closed_form:
                weight = torch.tensor(self.row_weight, dtype=torch.float32, device=student_logits.device)
                values, grad_logits = fused_kernels.value_and_weighted_grad(
                    self.divergence,
                    student_logits.detach(),
                    teacher_logits,
                    weight,
                    fused=self.fused,
                    **self.params,
                )  # (n,), (n, V) in the student logits' dtype
                grads = torch.autograd.grad(student_logits, wanted, grad_logits, allow_unused=True)
            else:
                values = self.token_fn(student_logits, teacher_logits, **self.params)  # (n,)
                grads = torch.autograd.grad(values.sum() * self.row_weight, wanted, allow_unused=True)
        return values.detach(), grads


class _ChunkedLensDivergence(torch.autograd.Function):
    """Weighted sum of per-row lens divergences, with gradients computed chunk by chunk during the forward.

    Computing each chunk's gradient while its logits are alive (instead of saving them, or recomputing them in
    backward as activation checkpointing would) keeps one chunk of (n, V) rows in memory per model and projects every
    row exactly once. The backward only scales the stored gradients by the incoming scalar.
    """

    @staticmethod
    def forward(ctx, plan: _ChunkPlan, student_rows: Tensor, teacher_rows: Tensor, *student_params: Tensor):
        inputs = [student_rows, *student_params]
        needs_grad = [t.requires_grad for t in inputs]
        # fp32 accumulators whatever the parameters' dtype: under bf16 a sum over many chunks would lose the small
        # late contributions (bf16 keeps 8 significant bits); cast back to each input's dtype once, in backward
        grads = [
            torch.zeros_like(t, dtype=torch.float32) if need else None
            for t, need in zip(inputs, needs_grad, strict=True)
        ]
        per_row = torch.empty(
            student_rows.shape[0], device=student_rows.device, dtype=torch.float32
        )  # (k*N,)
        for start in range(0, student_rows.shape[0], plan.chunk_size):
            chunk = slice(start, start + plan.chunk_size)
            if not any(needs_grad):
                per_row[chunk] = plan.values(student_rows[chunk], teacher_rows[chunk])
                continue
            rows = student_rows[chunk].detach().requires_grad_(needs_grad[0])  # (n, d_s)
            wanted = [t for t, need in zip([rows, *plan.differentiated], needs_grad, strict=True) if need]
            per_row[chunk], chunk_grads = plan.values_and_grads(rows, teacher_rows[chunk], wanted)
            _accumulate(grads, needs_grad, chunk_grads, chunk)
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.needs_grad, ctx.dtypes = needs_grad, [t.dtype for t in inputs]
        ctx.mark_non_differentiable(per_row)
        return per_row.sum() * plan.row_weight, per_row

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_row):
        stored = iter(ctx.saved_tensors)
        grads = [
            (next(stored) * grad_loss).to(dtype) if need else None
            for need, dtype in zip(ctx.needs_grad, ctx.dtypes, strict=True)
        ]
        return (None, grads[0], None, *grads[1:])


def chunked_divergence(plan, student_rows: Tensor, teacher_rows: Tensor, *student_params: Tensor):
    """``_ChunkedLensDivergence`` for any plan with its interface (``chunk_size``, ``differentiated``, ``row_weight``,
    ``values``, ``values_and_grads``): the top-k targets of a teacher cache (topk.py) reuse it. Returns (the
    weighted sum, the per-row values)."""
    return _ChunkedLensDivergence.apply(plan, student_rows, teacher_rows, *student_params)


def _accumulate(grads: list, needs_grad: list[bool], chunk_grads: Sequence, chunk: slice) -> None:
    """Add one chunk's gradients: rows into their slice of the row gradient, parameters into the running sum."""
    chunk_grads = iter(chunk_grads)
    for position, need in enumerate(needs_grad):
        grad = next(chunk_grads) if need else None
        if grad is None:
            continue
        if position == 0:
            grads[0][chunk] += grad  # fp32 += (n, d) in the inputs' dtype: upcast element-wise
        else:
            grads[position] += grad


def naive_lens_loss(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    student_lens: LogitLens,
    teacher_lens: LogitLens,
    mask: Tensor,
    divergence: str = "jsd",
    **params: float,
) -> tuple[Tensor, Tensor]:
    """The published code's computation, for tests and the benchmark: project every position of every pair at once.

    Materialises (k, B, T, V) logits for both models; same result as ``lens_loss``.
    """
    token_fn = get_token_divergence(divergence)
    student_logits = student_lens.logits(torch.stack(list(student_hidden)))  # (k, B, T, V)
    with torch.no_grad():
        teacher_logits = teacher_lens.logits(torch.stack(list(teacher_hidden)))  # (k, B, T, V)
    per_token = token_fn(student_logits, teacher_logits, **params)  # (k, B, T)
    keep = mask.bool().expand_as(per_token)  # (k, B, T), the same mask for every pair
    per_pair = torch.where(keep, per_token, 0).sum((1, 2)) / keep[0].sum().clamp_min(1)  # (k,)
    return per_pair.mean(), per_pair.detach()
