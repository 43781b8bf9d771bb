"""DistillationModule: a frozen teacher, a trained student, and the DistillLens objective.

    L = ce_weight * CE(S) + kd_weight * D_final(T_L, S_L) + lens_weight * mean_pairs D_lens(T_j, S_i)
        (+ mse_weight * the masked MSE feature baseline)

Every term is a sum over supervised tokens (labels != -100); the sum of the weighted terms is divided by the number of
supervised tokens of the whole optimizer step, across gradient-accumulation micro-batches and data-parallel ranks
(``on_before_optimizer_step``), so long and short micro-batches weigh by their tokens, not by their count.

The teacher is deliberately *not* a submodule: it is never in ``state_dict`` (checkpoints hold the student only),
never in the optimizer, never switched to train mode by Lightning, and it never receives gradients.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import SumMetric
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from distillens.distributed import gathered, is_sharded, shard_models, sharding_options
from distillens.evaluation import (
    GenerationRecord,
    batch_seed,
    check_metrics,
    gather_records,
    generate,
    records_from_batch,
    results_markdown,
    score_records,
    shard_loader,
    summarize_runs,
    write_results,
)
from distillens.lens import LogitLens, lens_loss, naive_lens_loss
from distillens.losses import get_token_divergence, masked_mse
from distillens.models import (
    ModelSpec,
    check_same_vocabulary,
    is_lora,
    load_model,
    load_tokenizer,
    rebuildable,
)
from distillens.sampling import LensDraw, check_sampling, draw_lens_subset, draw_seed, exact_draw


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
    """Extra parameters of the final-layer divergence (beta for jsd, alpha for skew KL, mu for akl)."""
    lens_weight: float = 1.0
    """Weight of the logit-lens term, averaged over layer pairs."""
    lens_divergence: str = "jsd"
    """Divergence between lens distributions (the paper: Jensen-Shannon, beta 0.5)."""
    lens_params: dict[str, float] = field(default_factory=dict)
    """Extra parameters of the lens divergence."""
    mse_weight: float = 0.0
    """Weight of the MSE feature baseline (learned teacher->student projection per pair, supervised tokens only)."""
    temperature: float = 1.0
    """Softmax temperature of both divergences (the paper: 1)."""
    lens_final_norm: bool = True
    """Apply the final norm in the lens; False reproduces the published code, which skips it."""
    chunk_size: int = 256
    """Rows projected to the vocabulary at once by the chunked lens and final-layer losses (peak memory knob)."""
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


@dataclass
class LayerPairs:
    """Which student layer is aligned with which teacher layer (hidden-state indices, 0 = embeddings).

    Give both lists to reproduce the paper exactly, or leave them empty for ``count`` evenly spaced pairs
    (index round(j * L / (count + 1)) for j = 1..count on each side).
    """

    student: list[int] = field(default_factory=list)
    """Student hidden-state indices, e.g. [2, 4, 6, 8, 10] for GPT-2 120M."""
    teacher: list[int] = field(default_factory=list)
    """Teacher hidden-state indices, e.g. [8, 16, 24, 32, 40] for GPT-2 1.5B."""
    count: int = 5
    """Number of evenly spaced pairs when the lists are empty."""

    def resolve(self, student_depth: int, teacher_depth: int) -> tuple[list[int], list[int]]:
        """Explicit or evenly spaced pairs, checked against both depths."""
        student, teacher = list(self.student), list(self.teacher)
        if not student and not teacher:
            student = evenly_spaced(student_depth, self.count)
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


GENERATORS = ("student", "teacher")


@dataclass
class GenerationSettings:
    """How answers are generated and scored: in ``distillens test``, and during validation when ``every_n_val > 0``."""

    max_new_tokens: int = 256
    """Longest generated response in tokens (the paper's evaluation: 256, as prompts of up to 256 tokens are
    left-padded to 256 and generation stops at a total length of 512)."""
    do_sample: bool = True
    """Sample (the paper: top_k 0, top_p 1, temperature 1) or decode greedily."""
    top_k: int = 0
    """Top-k filter when sampling; 0 disables it."""
    top_p: float = 1.0
    """Nucleus filter when sampling; 1 disables it."""
    temperature: float = 1.0
    """Sampling temperature."""
    no_repeat_ngram_size: int = 0
    """Never generate an n-gram of this size twice in a sequence (prompt included), as transformers' option of the
    same name; 0 turns it off. The paper's evaluation: 6."""
    seeds: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 50])
    """Generation seeds (MiniLLM's five): test reports mean and std over them all; validation uses the first."""
    metrics: list[str] = field(default_factory=lambda: ["rougeL", "exact_match"])
    """Scores to compute: rougeL, exact_match, sbert (SBERT cosine similarity; needs the ``sbert`` extra)."""
    every_n_val: int = 0
    """Generate on the validation prompts at every N-th validation and log ``val/<metric>``; 0 never does."""
    max_prompts: int | None = None
    """Validation generation answers only the first this many validation prompts; None answers them all."""
    generator: str = "student"
    """Which model answers: "student", or "teacher" for the reference row of the paper's tables."""
    output_dir: str | None = None
    """Where ``distillens test`` writes results.json, results.md and the answers; default ``<run folder>/eval``."""

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("generation.seeds is empty: give at least one generation seed")
        if self.every_n_val < 0:
            raise ValueError(f"generation.every_n_val={self.every_n_val}: use 0 (never) or a positive count")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"generation.max_prompts={self.max_prompts}: use a positive count or null")
        if self.generator not in GENERATORS:
            raise ValueError(f"generation.generator={self.generator!r}: use one of {', '.join(GENERATORS)}")
        check_metrics(self.metrics)


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up and cosine decay, stepped every optimizer step."""

    lr: float = 5e-4
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to biases and norm weights)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    warmup: float = 0.05
    """Warm-up length: a fraction of the total steps if < 1, else a number of steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (used when ``min_lr`` is unset)."""
    min_lr: float | None = None
    """Final learning rate as an absolute value (the paper: 1e-7); overrides ``min_lr_ratio`` when set."""

    def __post_init__(self) -> None:
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optimizer.min_lr={self.min_lr}: must be between 0 and optimizer.lr={self.lr}")

    @property
    def floor_ratio(self) -> float:
        """The cosine schedule's final learning rate as a fraction of the peak."""
        return self.min_lr / self.lr if self.min_lr is not None else self.min_lr_ratio


class DistillationModule(L.LightningModule):
    """Distil a teacher into a student with the DistillLens objective (no teacher: plain SFT of the student).

    Args:
        student: how to build the student (hub id, folder, GGUF, config, or a subset of the teacher's layers).
        teacher: how to build the frozen teacher; None trains the student alone on cross-entropy.
        loss: the objective's weights and divergences.
        layers: the lens layer pairs.
        optimizer: learning rate, weight decay and schedule.
        generation: sampling settings of generation-based evaluation.
    """

    def __init__(
        self,
        student: ModelSpec,
        teacher: ModelSpec | None = None,
        loss: LossConfig | None = None,
        layers: LayerPairs | None = None,
        optimizer: OptimizerConfig | None = None,
        generation: GenerationSettings | None = None,
    ) -> None:
        super().__init__()
        self.student_spec = _as(ModelSpec, student)
        self.teacher_spec = _as(ModelSpec, teacher) if teacher is not None else None
        self.loss_config = _as(LossConfig, loss or LossConfig())
        self.layer_pairs = _as(LayerPairs, layers or LayerPairs())
        self.optimizer_config = _as(OptimizerConfig, optimizer or OptimizerConfig())
        self.generation = _as(GenerationSettings, generation or GenerationSettings())
        self._check_objective()
        if self.teacher_spec is not None and self.teacher_spec.lora is not None:
            raise ValueError(
                "model.teacher.lora: the teacher is frozen and never trained; fold a trained adapter into it with "
                "model.teacher.adapter instead"
            )
        # plain dicts, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "student": asdict(self.student_spec),
                "teacher": asdict(self.teacher_spec) if self.teacher_spec else None,
                "loss": asdict(self.loss_config),
                "layers": asdict(self.layer_pairs),
                "optimizer": asdict(self.optimizer_config),
                "generation": asdict(self.generation),
            }
        )
        self.tokenizer = load_tokenizer(
            self.student_spec if self._has_tokenizer_source(self.student_spec) else self.teacher_spec
        )
        check_same_tokenizer(self.student_spec, self.teacher_spec, self.tokenizer)
        self.student: PreTrainedModel | None = None
        self.projections = nn.ModuleList()  # MSE baseline: teacher -> student hidden size, one per pair
        self.student_layers: list[int] = []
        self.teacher_layers: list[int] = []
        self._student_config: dict[str, Any] | None = None  # set when restoring a student without its teacher
        self._window_tokens = 0  # supervised tokens seen since the last optimizer step (this rank)
        self._window_batches = 0  # micro-batches since the last optimizer step: part of the lens draw's seed
        self._validations_done = 0  # validation runs since this process started (generation every N-th)
        self.val_sums = nn.ModuleDict()  # term -> SumMetric of token sums over the validation set
        object.__setattr__(self, "teacher", None)  # not a submodule: see the module docstring

    # ------------------------------------------------------------------------------------------------------------
    # Building

    @staticmethod
    def _has_tokenizer_source(spec: ModelSpec | None) -> bool:
        return spec is not None and (spec.tokenizer is not None or spec.source is not None)

    def _check_objective(self) -> None:
        config = self.loss_config
        for name in (config.kd_divergence, config.lens_divergence):
            get_token_divergence(name)
        check_sampling(config.lens_pairs_per_step, config.lens_token_fraction)
        if config.lens_impl not in LENS_IMPLEMENTATIONS:
            raise ValueError(
                f"loss.lens_impl={config.lens_impl!r}: expected one of {', '.join(sorted(LENS_IMPLEMENTATIONS))}"
            )
        if self.teacher_spec is None and (config.kd_weight or config.lens_weight or config.mse_weight):
            raise ValueError(
                "model.teacher is not set but loss.kd_weight/lens_weight/mse_weight are not 0: "
                "set a teacher, or zero them for plain SFT (configs/sft.yaml)"
            )
        if not (config.ce_weight or config.kd_weight or config.lens_weight or config.mse_weight):
            raise ValueError("every loss weight is 0: nothing to train")

    def configure_model(self) -> None:
        """Build teacher and student here (not in __init__) so strategies can create large ones sharded."""
        if self.student is not None:
            return
        teacher = load_model(self.teacher_spec) if self.teacher_spec is not None else None
        if self._student_config is not None:  # restoring a checkpoint: the architecture, weights come next
            self.student = AutoModelForCausalLM.from_config(AutoConfig.for_model(**self._student_config))
        else:
            self.student = load_model(self.student_spec, teacher=teacher)
        self.student.train()  # a copy of an eval-mode teacher's blocks would otherwise stay in eval mode
        if teacher is not None:
            self._attach_teacher(teacher)
        self._apply_strategy()

    def _apply_strategy(self) -> None:
        """Give both models the trainer's precision, then shard them if the strategy provides a device mesh.

        Lightning converts only the LightningModule (the student) to a "-true" precision; the teacher is not a
        submodule, so it is converted here. Both are converted *before* sharding, so that FSDP all-gathers them in
        their training dtype. ModelParallelStrategy (FSDP2, configs/trainer/fsdp.yaml) sets ``device_mesh``.
        """
        trainer = self._trainer
        if trainer is None:
            return
        trainer.precision_plugin.convert_module(self)
        if self.teacher is not None:
            trainer.precision_plugin.convert_module(self.teacher)
        if self.device_mesh is not None:
            options = sharding_options(trainer.strategy)
            shard_models(self.student, self.teacher, self.projections, self.device_mesh, options)

    def _attach_teacher(self, teacher: PreTrainedModel) -> None:
        teacher.requires_grad_(False).eval()
        object.__setattr__(self, "teacher", teacher)
        check_same_vocabulary(self.student, teacher)
        self.student_lens = LogitLens(self.student, apply_final_norm=self.loss_config.lens_final_norm)
        self.teacher_lens = LogitLens(teacher, apply_final_norm=self.loss_config.lens_final_norm)
        self.student_final = LogitLens(self.student)  # the real output head, for the final-layer term
        self.teacher_final = LogitLens(teacher)
        if self.loss_config.lens_weight or self.loss_config.mse_weight:
            self.student_layers, self.teacher_layers = self.layer_pairs.resolve(
                self.student_lens.num_layers, self.teacher_lens.num_layers
            )
        if self.loss_config.mse_weight and not len(self.projections):
            d_s, d_t = self.student.config.hidden_size, teacher.config.hidden_size
            self.projections.extend(nn.Linear(d_t, d_s, bias=False) for _ in self.student_layers)

    def _place_teacher(self) -> None:
        if self.teacher is None:
            return
        if not is_sharded(self.teacher):  # FSDP placed the shards: on the device, or offloaded to CPU
            self.teacher.to(self.device)
        self.teacher.eval()

    def on_fit_start(self) -> None:
        self._place_teacher()

    def on_validation_start(self) -> None:
        self._place_teacher()

    def on_test_start(self) -> None:
        self._place_teacher()

    # ------------------------------------------------------------------------------------------------------------
    # The objective

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Token sums of every active loss term on one batch, plus the supervised-token count under "tokens"."""
        labels = batch["labels"]  # (B, T)
        mask = labels[:, 1:] != -100  # (B, T-1): position t predicts token t+1
        student_depth = len(self.student_lens.blocks) if self.teacher is not None else 0
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        need_logits = bool(self.loss_config.ce_weight) or not self.training
        with _capture(self, "student_lens", self.student_layers + [student_depth]) as s_hidden:
            s_out = self.student(**inputs, use_cache=False, logits_to_keep=0 if need_logits else 1)
        terms = {"tokens": mask.sum()}
        if need_logits:
            terms["ce"] = _cross_entropy_sum(s_out.logits[:, :-1], labels[:, 1:])
        if self.teacher is None or (self.training and not self._trains_on_teacher):
            return terms  # plain SFT with a teacher (for initialisation and validation): no teacher forward
        teacher_depth = self.teacher_lens.num_layers
        with torch.no_grad(), self.teacher_lens.capture(self.teacher_layers + [teacher_depth]) as t_hidden:
            self.teacher(
                **inputs, use_cache=False, logits_to_keep=1
            )  # hidden states only: no (B, T, V) logits
        shift = lambda hidden: hidden[:, :-1]  # noqa: E731  (B, T-1, d)
        # the lens reads full final norm + unembedding weights: gathered when sharded; divergences in fp32
        with gathered(self.student, self.teacher), _float32_default_dtype():
            terms |= self._distillation_terms(s_hidden, t_hidden, shift, mask, student_depth, teacher_depth)
        return terms

    @property
    def _trains_on_teacher(self) -> bool:
        """Whether any training term reads the teacher (its forward is skipped in training otherwise)."""
        config = self.loss_config
        return bool(config.kd_weight or config.lens_weight or config.mse_weight)

    def _distillation_terms(
        self, s_hidden, t_hidden, shift, mask, student_depth, teacher_depth
    ) -> dict[str, Tensor]:
        config, terms = self.loss_config, {}
        chunked = dict(chunk_size=config.chunk_size, reduction="sum", temperature=config.temperature)
        if config.kd_weight or not self.training:
            terms["kd"], _ = lens_loss(
                [shift(s_hidden[student_depth])], [shift(t_hidden[teacher_depth])], self.student_final,
                self.teacher_final, mask, config.kd_divergence, **chunked, **config.kd_params,
            )  # fmt: skip
        if self.student_layers and (config.lens_weight or not self.training):
            draw = self._lens_draw(mask)  # training: the sampled pairs and tokens; validation: all of them
            s_layers = [self.student_layers[p] for p in draw.pairs]
            t_layers = [self.teacher_layers[p] for p in draw.pairs]
            lens, per_pair = LENS_IMPLEMENTATIONS[config.lens_impl](
                [shift(s_hidden[i]) for i in s_layers], [shift(t_hidden[j]) for j in t_layers], self.student_lens,
                self.teacher_lens, draw.mask, config.lens_divergence, **chunked, **config.lens_params,
            )  # fmt: skip
            # an unbiased token sum: N / n times the sum over the n drawn tokens (x 1.0, exact, when all are kept)
            terms["lens"] = lens * draw.token_scale
            # per-pair values only when every pair is drawn: Lightning would re-log an undrawn pair's stale value
            if len(draw.pairs) == len(self.student_layers):
                per_pair_terms = zip(s_layers, t_layers, per_pair, strict=True)
                terms.update({f"lens/s{i}_t{j}": v for i, j, v in per_pair_terms})
        if config.mse_weight:
            terms["mse"] = sum(
                masked_mse(proj(shift(t_hidden[j])), shift(s_hidden[i]), mask) * mask.sum()
                for proj, i, j in zip(self.projections, self.student_layers, self.teacher_layers, strict=True)
            ) / len(self.projections)
        return terms

    def _lens_draw(self, mask: Tensor) -> LensDraw:
        """This micro-batch's lens pairs and tokens: a seeded draw in training, every one of them otherwise."""
        config, pairs = self.loss_config, len(self.student_layers)
        if not self.training:
            return exact_draw(mask, pairs)
        seed = draw_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), self.global_step, self._window_batches)
        return draw_lens_subset(mask, pairs, config.lens_pairs_per_step, config.lens_token_fraction, seed)

    def weighted_sum(self, terms: dict[str, Tensor]) -> Tensor:
        """The objective's token sum: the configured weight of each term present."""
        weights = {
            "ce": self.loss_config.ce_weight,
            "kd": self.loss_config.kd_weight,
            "lens": self.loss_config.lens_weight,
            "mse": self.loss_config.mse_weight,
        }
        return sum(weight * terms[name] for name, weight in weights.items() if weight and name in terms)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        terms = self(batch)
        total = self.weighted_sum(terms)
        tokens = int(terms["tokens"])
        self._window_tokens += tokens
        self._window_batches += 1
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", total.detach() / max(tokens, 1), prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            if name != "tokens":
                per_token = value if name.startswith("lens/") else value.detach() / max(tokens, 1)
                self.log(f"train/{name}", per_token, batch_size=batch_size)
        return total

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn the accumulated gradient of token *sums* into the gradient of the step's token *mean*.

        Lightning divides each micro-batch loss by the accumulation count A and data parallelism averages over the
        W ranks, so the gradient holds sum / (A * W); multiplying by A * W / N, with N the supervised tokens of the
        whole step on all ranks, gives exactly sum / N.
        """
        tokens = torch.tensor(float(self._window_tokens), device=self.device)
        tokens = (
            self.trainer.strategy.reduce(tokens, reduce_op="sum") if self.trainer.world_size > 1 else tokens
        )
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / max(float(tokens), 1.0)
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(scale)
        self._window_tokens = self._window_batches = 0

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._accumulate_eval(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Teacher-forced loss on labelled batches; answers under every generation seed on prompt-only batches."""
        if "labels" in batch:
            self._accumulate_eval(batch)
            return
        by_seed = self._answers.setdefault(batch["name"], {})
        for seed in self.generation.seeds:
            by_seed.setdefault(seed, []).extend(self.answer(batch, seed))

    def answer(self, batch: dict[str, Any], seed: int) -> list[GenerationRecord]:
        """The configured model's answers to a left-padded prompt batch, sampled as configured under ``seed``."""
        settings = self.generation
        if settings.generator == "teacher" and self.teacher is None:
            raise ValueError("generation.generator is 'teacher' but model.teacher is not set")
        model = self.teacher if settings.generator == "teacher" else self.student
        predictions = generate(
            model, self.tokenizer, batch["input_ids"], batch["attention_mask"],
            max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample, top_k=settings.top_k,
            top_p=settings.top_p, temperature=settings.temperature, seed=batch_seed(seed, batch["index"][0]),
            no_repeat_ngram_size=settings.no_repeat_ngram_size,
            synced_gpus=torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1,
        )  # fmt: skip
        return records_from_batch(batch, predictions)

    def on_test_epoch_start(self) -> None:
        self._answers: dict[str, dict[int, list[GenerationRecord]]] = {}  # set -> seed -> this rank's answers

    def _accumulate_eval(self, batch: dict[str, Tensor]) -> None:
        terms = self(batch)
        terms["loss"] = self.weighted_sum(terms)
        for name, value in terms.items():
            if name.startswith("lens/"):
                value = value * terms["tokens"]
            key = name.replace("/", "__")  # ModuleDict keys cannot hold "/" or "."
            if key not in self.val_sums:
                self.val_sums[key] = SumMetric().to(self.device)
            self.val_sums[key].update(value.detach().float())

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")
        if self.trainer.sanity_checking or not self.generation.every_n_val:
            return
        self._validations_done += 1
        if self._validations_done % self.generation.every_n_val == 0:
            self._log_validation_generation()

    def _log_validation_generation(self) -> None:
        """Answer (the first ``max_prompts``) validation prompts under the first seed, sharded over the ranks, and
        log ``val/<metric>`` for checkpoint selection (the paper keeps the checkpoint with the best val ROUGE-L)."""
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "generation_dataloader"):
            raise ValueError(
                "generation.every_n_val > 0 needs the InstructionDataModule (its validation prompts)"
            )
        prompts = shard_loader(
            datamodule.generation_dataloader("validation"),
            self.global_rank, self.trainer.world_size, self.generation.max_prompts,
        )  # fmt: skip
        seed, records = self.generation.seeds[0], []
        for batch in prompts:
            records += self.answer(self.transfer_batch_to_device(batch, self.device, 0), seed)
        for name, value in score_records(gather_records(records), self.generation.metrics).items():
            self.log(f"val/{name}", value, sync_dist=True)  # the same value on every rank

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")
        if not self._answers:
            return
        runs = {
            name: {seed: gather_records(records) for seed, records in by_seed.items()}
            for name, by_seed in self._answers.items()
        }  # every rank takes part in each gather, in the same (dataloader, seed) order
        results = summarize_runs(runs, self.generation.metrics)
        self._log_results(results)
        if self.trainer.is_global_zero:
            self._save_results(results, runs)

    def _log_results(self, results: dict[str, Any]) -> None:
        """``test/<set>/<metric>`` (mean over seeds) and ``.../<metric>_std``; ``test/average/...`` for several sets."""
        rows = dict(results["sets"], **({"average": results["average"]} if len(results["sets"]) > 1 else {}))
        for name, summary in rows.items():
            for metric in results["metrics"]:
                self.log(f"test/{name}/{metric}", summary["mean"][metric], sync_dist=True)
                self.log(f"test/{name}/{metric}_std", summary["std"][metric], sync_dist=True)

    def _save_results(
        self, results: dict[str, Any], runs: dict[str, dict[int, list[GenerationRecord]]]
    ) -> None:
        """Print the table and write it (JSON, Markdown) with every answer (jsonl) to the run's eval folder."""
        run_folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        folder = Path(self.generation.output_dir) if self.generation.output_dir else run_folder / "eval"
        protocol = getattr(self.trainer.datamodule, "eval_protocol", None)  # prompt and reference filters
        data = {"data": protocol()} if callable(protocol) else {}
        results = {
            "generator": self.generation.generator,
            "generation": asdict(self.generation),
            **data,
            **results,
        }
        write_results(folder, results, runs)
        print(f"\n{results_markdown(results)}results and answers written to {folder}")

    def _log_eval(self, stage: str) -> None:
        """Token means over the whole evaluation set (synchronised across ranks by the metrics)."""
        if "tokens" not in self.val_sums:
            return
        tokens = self.val_sums["tokens"].compute().clamp_min(1)
        for key, metric in self.val_sums.items():
            if key != "tokens":
                self.log(f"{stage}/{key.replace('__', '/')}", metric.compute() / tokens)
            metric.reset()

    # ------------------------------------------------------------------------------------------------------------
    # Optimisation and checkpoints

    def configure_optimizers(self):
        config = self.optimizer_config
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(config.warmup * total) if config.warmup < 1 else int(config.warmup)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(warmup, total, config.floor_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the student's architecture, so the checkpoint can be restored and exported without a teacher.

        A LoRA student's frozen base weights are left out: they are its source's, loaded again on resume or
        export, so a checkpoint holds the adapters (and optimizer state) only. They are kept for a student built
        from a random config (nothing could rebuild them) and in a sharded (FSDP) checkpoint, as Lightning's
        distributed loader expects every key of the model.
        """
        checkpoint["student_config"] = self.student.config.to_dict()
        if self._adapters_only_checkpoints():
            frozen = self._frozen_student_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Complete an adapters-only checkpoint with the frozen base weights the student was just built with."""
        if self._adapters_only_checkpoints():
            state, saved = self.state_dict(), checkpoint["state_dict"]
            saved.update({key: state[key] for key in self._frozen_student_keys() - saved.keys()})

    def _adapters_only_checkpoints(self) -> bool:
        """A LoRA student rebuilt with the same base weights at every load (a source, not a random config)."""
        return (
            is_lora(self.student)
            and not is_sharded(self.student)
            and rebuildable(self.student_spec, self.teacher_spec)
        )

    def _frozen_student_keys(self) -> set[str]:
        """State-dict keys of the student's frozen parameters (tied ones under each of their names)."""
        named = self.student.named_parameters(remove_duplicate=False)
        return {f"student.{name}" for name, param in named if not param.requires_grad}


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at a step: linear warm-up, then cosine decay to min_ratio."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def _tokenizer_source(spec: ModelSpec | None) -> str | None:
    return None if spec is None else (spec.tokenizer or spec.source)


def check_same_tokenizer(student: ModelSpec, teacher: ModelSpec | None, student_tokenizer) -> None:
    """When teacher and student name different tokenizers, their token-to-id maps must still be identical."""
    student_source, teacher_source = _tokenizer_source(student), _tokenizer_source(teacher)
    if student_source is None or teacher_source is None or student_source == teacher_source:
        return
    student_vocab = student_tokenizer.get_vocab()
    teacher_vocab = load_tokenizer(teacher).get_vocab()
    if student_vocab != teacher_vocab:
        differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=str)[:1]
        raise ValueError(
            f"teacher tokenizer {teacher_source!r} and student tokenizer {student_source!r} differ "
            f"({len(teacher_vocab)} vs {len(student_vocab)} tokens; e.g. {differing}); distillation needs the "
            "same token ids"
        )


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
    **params: float,
) -> tuple[Tensor, Tensor]:
    """``naive_lens_loss`` with ``lens_loss``'s signature: the token sum (or mean) of the published code's lens.

    ``chunk_size`` does not apply: the naive lens projects every position of every pair at once.
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


@contextlib.contextmanager
def _float32_default_dtype() -> Iterator[None]:
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


def _cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum over supervised tokens of the student's cross-entropy, in fp32. logits (B, T, V), labels (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


class _capture:
    """Capture from a lens if the module has one (teacher-free SFT runs have none)."""

    def __init__(self, module: DistillationModule, lens_name: str, layers: list[int]) -> None:
        lens = getattr(module, lens_name, None)
        self.context = lens.capture(sorted(set(layers))) if lens is not None else None

    def __enter__(self) -> dict[int, Tensor]:
        return self.context.__enter__() if self.context is not None else {}

    def __exit__(self, *exc) -> None:
        if self.context is not None:
            self.context.__exit__(*exc)


def _as(cls, value):
    """Accept a dataclass instance or its dict form (as stored in checkpoints' hyper-parameters)."""
    return cls(**value) if isinstance(value, dict) else value
