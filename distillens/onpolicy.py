"""On-policy training: micro-batches whose responses are answers sampled from the student or from the teacher.

A student is judged on text it writes itself, but teacher forcing on the data set's reference responses only ever
shows it prefixes a person wrote (exposure bias, the argument of GKD and MiniLLM). With ``student_fraction`` of the
training micro-batches, the reference responses are replaced by the student's own sampled answers to the same
prompts (GKD's lambda); with ``teacher_fraction``, by the teacher's (sequence-level KD). On such a micro-batch the
final-layer and lens terms are computed as usual, teacher-forced on the new text, on exactly the generated tokens
(up to and including the eos that ended each answer).

Which micro-batches are replaced is a pure function of (run seed, optimizer step, micro-batch): every data-parallel
rank replaces the same ones, which a sharded model needs (its generation is a collective), and a resumed run
replaces what the uninterrupted one did. The answers are sampled under a seed of the same kind (and the rank), so a
resumed run also generates the same text.

Everything here is plain torch and transformers (no Lightning): ``choose_source`` draws the kind of a micro-batch,
``roll_out`` generates the answers and ``rebuild`` turns a training batch plus generated ids into the batch that
supervises them; ``RolloutWindow`` adds up what a logger shows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from distillens.data.collate import PROMPT_LENGTHS, TrainingCollator, pad_sequences, position_ids_from_mask
from distillens.generation import generate_ids, generation_config, several_ranks
from distillens.losses import HAS_REFERENCE

REFERENCE, STUDENT, TEACHER = "reference", "student", "teacher"
"""Who wrote a micro-batch's responses: the data set, the student (on-policy) or the teacher (sequence-level KD)."""
SOURCES = (REFERENCE, STUDENT, TEACHER)


@dataclass
class OnPolicyConfig:
    """Training on generated answers, the student's own (on-policy) or the teacher's (sequence-level KD).

    A seeded random fraction of the training micro-batches has its reference responses replaced by answers sampled
    from the student (GKD's lambda) or from the teacher; the final-layer and lens terms supervise those answers."""

    student_fraction: float = 0.0
    """Fraction of training micro-batches whose responses are replaced by the student's sampled answers to the same
    prompts (GKD's lambda); 0 never does (the paper's training)."""
    teacher_fraction: float = 0.0
    """Fraction of training micro-batches whose responses are replaced by the teacher's sampled answers
    (sequence-level KD); student_fraction + teacher_fraction must be at most 1."""
    max_new_tokens: int = 64
    """Longest generated answer in tokens; an answer cut here has no eos and is supervised as it stands."""
    temperature: float = 1.0
    """Sampling temperature of the generated answers."""
    top_k: int = 0
    """Top-k filter of the generated answers; 0 disables it."""
    top_p: float = 1.0
    """Nucleus filter of the generated answers; 1 disables it."""
    start_step: int = 0
    """Optimizer steps trained on the reference responses alone before any micro-batch is drawn: an untrained
    student's own answers are filler that runs to the length limit, nothing worth supervising; 0 draws from the
    first step."""

    @property
    def enabled(self) -> bool:
        """Whether any micro-batch may be replaced (otherwise training is exactly the reference-only path)."""
        return self.student_fraction > 0 or self.teacher_fraction > 0

    def check(self, has_teacher: bool, reads_teacher: bool) -> None:
        """One clear line for a fraction or sampling setting that cannot work."""
        for name in ("student_fraction", "teacher_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"model.on_policy.{name}={value}: use a fraction in [0, 1]")
        if self.student_fraction + self.teacher_fraction > 1.0:
            raise ValueError(
                f"model.on_policy: student_fraction + teacher_fraction = "
                f"{self.student_fraction + self.teacher_fraction:g} > 1; the two fractions share the micro-batches"
            )
        if self.teacher_fraction and not has_teacher:
            raise ValueError("model.on_policy.teacher_fraction > 0 needs model.teacher to write the answers")
        if self.student_fraction and not reads_teacher:  # the teacher's answers are CE's references
            raise ValueError(
                "model.on_policy.student_fraction > 0 needs a teacher term (model.loss.kd_weight, lens_weight or "
                "mse_weight > 0): the student's own answers have no reference for the cross-entropy"
            )
        if self.start_step < 0:
            raise ValueError(f"model.on_policy.start_step={self.start_step}: use 0 or a positive step count")
        if self.max_new_tokens < 1 or self.temperature <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"model.on_policy: max_new_tokens={self.max_new_tokens}, temperature={self.temperature}, "
                f"top_k={self.top_k}, top_p={self.top_p}: use max_new_tokens >= 1, temperature > 0, top_k >= 0 "
                "and top_p in (0, 1]"
            )

    def generation(self, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
        """The transformers settings of the answers: sampled with these filters, eos and pad from ``tokenizer``."""
        return generation_config(
            tokenizer, self.max_new_tokens, True, self.top_k, self.top_p, self.temperature
        )  # fmt: skip


def choose_source(config: OnPolicyConfig, seed: int, step: int = 0) -> str:
    """Who writes this micro-batch's responses: one uniform draw u under ``seed`` (``sampling.draw_seed`` of the
    run seed, step, micro-batch and ``sampling.CHOICE_STREAM``): the student if u < student_fraction, the teacher
    if u < student_fraction + teacher_fraction, else the data set. Nothing is drawn when both fractions are 0 or
    before optimizer step ``config.start_step``."""
    if not config.enabled or step < config.start_step:
        return REFERENCE
    u = float(
        torch.rand((), generator=torch.Generator().manual_seed(seed))
    )  # on the CPU: the same on every device
    if u < config.student_fraction:
        return STUDENT
    if u < config.student_fraction + config.teacher_fraction:
        return TEACHER
    return REFERENCE


def check_same_draw(source: str, run_seed: int, step: int, micro_batch: int, device: torch.device) -> None:
    """Raise the same error on every rank when the ranks' draws of this micro-batch differ; nothing on one rank.

    The draw is a function of (run seed, step, micro-batch), so ranks disagree only when those do: a seed drawn
    at random in each process (``seed_everything: true`` under torchrun), or a bug. A rank that generates while
    another does not would wait forever in a collective the other never joins (``synced_gpus``, FSDP's
    all-gathers); this all-gather of four integers per micro-batch turns that hang into an error at once.
    """
    if not several_ranks():
        return
    mine = torch.tensor([SOURCES.index(source), run_seed, step, micro_batch], device=device)  # (4,) int64
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    rows = [row.tolist() for row in everyone]
    if all(row == rows[0] for row in rows):
        return
    drawn = "; ".join(
        f"rank {rank}: {SOURCES[code]} (run seed {seed}, step {at}, micro-batch {index})"
        for rank, (code, seed, at, index) in enumerate(rows)
    )
    raise ValueError(
        f"model.on_policy: the ranks drew differently for one micro-batch ({drawn}); every rank must draw the "
        "same, from the same run seed: set seed_everything to a number"
    )


def prompt_lengths(batch: dict[str, Tensor]) -> Tensor:
    """(B,) each row's prompt length, as ``TrainingCollator`` recorded it in the batch."""
    if PROMPT_LENGTHS not in batch:
        raise ValueError(
            f"on-policy training needs each row's prompt length: batch key {PROMPT_LENGTHS!r}, which "
            "TrainingCollator (data/collate.py) writes"
        )
    return batch[PROMPT_LENGTHS]  # (B,)


def left_padded_prompts(batch: dict[str, Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """The prompts of a right-padded training batch, left-padded for generation: input ids and attention mask."""
    mask = batch["attention_mask"]  # (B, T)
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("on-policy training needs right-padded training rows (TrainingCollator's)")
    if "position_ids" in batch and bool((batch["position_ids"] != position_ids_from_mask(mask)).any()):
        raise ValueError("on-policy training needs one example per row: a packed row has no single prompt")
    lengths = prompt_lengths(batch).tolist()
    prompts = [row[:length] for row, length in zip(batch["input_ids"], lengths, strict=True)]
    input_ids, attention_mask = pad_sequences(prompts, pad_id, "left", None)  # (B, P), (B, P)
    device = batch["input_ids"].device
    return input_ids.to(device), attention_mask.to(device)


def answer_lengths(new_ids: Tensor, eos_id: int) -> Tensor:
    """(B,) tokens of each generated answer up to and including its first eos; all of them when it has none
    (an answer cut at max_new_tokens)."""
    is_eos = new_ids == eos_id  # (B, G)
    first = is_eos.int().argmax(dim=1)  # (B,) first eos (0 when there is none)
    return torch.where(is_eos.any(dim=1), first + 1, new_ids.shape[1])  # (B,)


def rebuild(
    batch: dict[str, Tensor], new_ids: Tensor, lengths: Tensor, pad_id: int, *, has_reference: bool
) -> dict[str, Tensor | bool]:
    """The training batch whose responses are the generated answers: each row its prompt then its answer's first
    ``lengths`` tokens, right-padded, with labels on exactly those answer tokens, as ``TrainingCollator`` pads a
    row of the same ids.

    Args:
        batch: the right-padded training batch the prompts come from.
        new_ids: (B, G) the generated ids (what follows an answer's eos is ignored).
        lengths: (B,) the answers' lengths (``answer_lengths``).
        pad_id: the padding id of the data's collator.
        has_reference: False for the student's own answers, on which the cross-entropy term has no target.
    """
    prompts = prompt_lengths(batch).tolist()
    rows = zip(batch["input_ids"].cpu(), prompts, new_ids.cpu(), lengths.tolist(), strict=True)
    features = [
        {"input_ids": torch.cat([ids[:prompt], answer[:length]]).tolist(), "prompt_length": prompt}
        for ids, prompt, answer, length in rows
    ]
    rebuilt = TrainingCollator(pad_id)(
        features
    )  # right-padded, labels on the answers: as the data is collated
    device = batch["input_ids"].device
    return {name: tensor.to(device) for name, tensor in rebuilt.items()} | {HAS_REFERENCE: has_reference}


@dataclass(frozen=True)
class Rollout:
    """A micro-batch rebuilt on generated answers, and what producing it cost."""

    batch: dict[str, Tensor | bool]
    lengths: Tensor
    """(B,) generated tokens of each answer (eos included), all supervised."""
    seconds: float
    """Wall time of generation and rebuilding."""


def roll_out(
    model: PreTrainedModel,
    batch: dict[str, Tensor],
    config: GenerationConfig,
    *,
    source: str,
    seed: int,
    synced_gpus: bool,
) -> Rollout:
    """``model`` answers the prompts of ``batch`` (no gradient, eval mode, sampled under ``seed``); the rebuilt batch
    supervises exactly its answers. ``source``: STUDENT or TEACHER; ``config``: eos and pad ids and sampling."""
    start = time.perf_counter()
    input_ids, attention_mask = left_padded_prompts(batch, config.pad_token_id)  # (B, P), (B, P)
    new_ids = generate_ids(
        model, input_ids, attention_mask, config, seed=seed, synced_gpus=synced_gpus
    )  # (B, G)
    lengths = answer_lengths(new_ids, config.eos_token_id)  # (B,)
    rebuilt = rebuild(batch, new_ids, lengths, config.pad_token_id, has_reference=source != STUDENT)
    return Rollout(batch=rebuilt, lengths=lengths.cpu(), seconds=time.perf_counter() - start)


@dataclass
class RolloutWindow:
    """What one optimizer step's micro-batches were (their sources in order) and what their generation cost."""

    sources: list[str] = field(default_factory=list)
    answers: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, source: str, rollout: Rollout | None) -> None:
        self.sources.append(source)
        if rollout is not None:
            self.answers += rollout.lengths.numel()
            self.tokens += int(rollout.lengths.sum())
            self.seconds += rollout.seconds

    def metrics(self) -> dict[str, float]:
        """on_policy / seq_kd: the fractions of the step's micro-batches answered by the student / the teacher;
        gen_time: seconds spent generating in the step; gen_length: mean generated answer length (only in steps
        that generated)."""
        count = max(len(self.sources), 1)
        metrics = {
            "on_policy": self.sources.count(STUDENT) / count,
            "seq_kd": self.sources.count(TEACHER) / count,
            "gen_time": self.seconds,
        }
        if self.answers:
            metrics["gen_length"] = self.tokens / self.answers
        return metrics
