"""DistillationModule: a frozen teacher, a trained student, and the DistillLens objective in Lightning.

The objective itself (its terms, lenses and layer pairs) lives in ``distillens.objective`` and knows nothing of
Lightning. This module holds what Lightning needs around it: building both models when the strategy asks
(``configure_model``), the teacher's placement, the step's token normalisation, evaluation sums, the optimizer and
what a checkpoint holds. Generation-based evaluation is a callback (``callbacks.GenerationEvaluation``) that the
module adds for its ``generation`` settings.

Every term is a token sum over supervised tokens; the sum of the weighted terms is divided by the number of
supervised tokens of the whole optimizer step, across gradient-accumulation micro-batches and data-parallel ranks
(``on_before_optimizer_step``), so long and short micro-batches weigh by their tokens, not by their count.

With ``on_policy`` fractions above 0, ``training_step`` first rebuilds a drawn micro-batch on answers the student
or the teacher generates to its prompts (``distillens.onpolicy``); the objective then supervises those answers.

The teacher is deliberately *not* a submodule: it is never in ``state_dict`` (checkpoints hold the student only),
never in the optimizer, never switched to train mode by Lightning, and it never receives gradients.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import SumMetric
from transformers import PreTrainedModel

from distillens.callbacks import CheckpointOnInterrupt, GenerationEvaluation, with_last_checkpoint_newest
from distillens.distributed import shard_models, sharding_options
from distillens.evaluation import GenerationSettings
from distillens.generation import several_ranks
from distillens.lora import (
    adapters_only_checkpoints,
    frozen_parameters,
    leave_base_out,
    put_base_back,
    weights_fingerprint,
)
from distillens.models import (
    ModelSpec,
    TeacherSpec,
    check_hub_sources,
    check_run_lengths,
    check_same_vocabulary,
    load_model,
    load_tokenizer,
    lora_base_description,
    position_limit,
    rebuildable,
    teacher_model_spec,
    teacher_skeleton,
    weight_files,
)
from distillens.objective import LayerPairs, LossConfig, Objective, Terms, token_means
from distillens.onpolicy import (
    REFERENCE,
    STUDENT,
    OnPolicyConfig,
    RolloutWindow,
    check_same_draw,
    choose_source,
    roll_out,
)
from distillens.optimization import OptimizerConfig, adamw_with_schedule, apply_settings
from distillens.sampling import (
    CHOICE_STREAM,
    DROPOUT_STREAM,
    LENS_STREAM,
    SAMPLING_STREAM,
    draw_seed,
    seeded_dropout,
)
from distillens.sharding import is_sharded
from distillens.teacher_cache import (
    TEACHER_TARGETS,
    CacheLocation,
    TeacherCache,
    TeacherTargets,
    TeacherView,
    files_fingerprint,
    is_complete,
    is_stripped,
    locate,
    prepare,
)


class DistillationModule(L.LightningModule):
    """Distil a teacher into a student with the DistillLens objective (no teacher: plain SFT of the student).

    Args:
        student: how to build the student (hub id, folder, GGUF, config, or a subset of the teacher's layers).
        teacher: how to build the frozen teacher; None trains the student alone on cross-entropy.
        loss: the objective's weights and divergences.
        layers: the lens layer pairs.
        optimizer: learning rate, weight decay and schedule.
        generation: sampling settings of generation-based evaluation.
        on_policy: training on the student's own answers (on-policy) or the teacher's (sequence-level KD) for a
            fraction of the micro-batches.
        teacher_targets: the live teacher in every step, or its targets computed once and cached (teacher_cache.py).
    """

    def __init__(
        self,
        student: ModelSpec,
        teacher: TeacherSpec | None = None,
        loss: LossConfig | None = None,
        layers: LayerPairs | None = None,
        optimizer: OptimizerConfig | None = None,
        generation: GenerationSettings | None = None,
        on_policy: OnPolicyConfig | None = None,
        teacher_targets: TeacherTargets | None = None,
    ) -> None:
        super().__init__()
        self.student_spec = _as(ModelSpec, student)
        self.teacher_spec = teacher_model_spec(teacher) if teacher is not None else None
        self.loss_config = _as(LossConfig, loss or LossConfig())
        self.layer_pairs = _as(LayerPairs, layers or LayerPairs())
        self.optimizer_config = _as(OptimizerConfig, optimizer or OptimizerConfig())
        self.generation = _as(GenerationSettings, generation or GenerationSettings())
        self.on_policy = _as(OnPolicyConfig, on_policy or OnPolicyConfig())
        self.loss_config.check(has_teacher=self.teacher_spec is not None)
        self.on_policy.check(self.teacher_spec is not None, self.loss_config.reads_teacher)
        loss = self.loss_config
        self.teacher_targets = _as(TeacherTargets, teacher_targets or TeacherTargets()).resolved(
            loss.reads_teacher, self.on_policy.enabled, bool(loss.mse_weight)
        )
        # plain dicts and lists: checkpoints load with torch.load(weights_only=True), hparams.yaml with safe_load
        self.save_hyperparameters(
            json.loads(json.dumps({
                "student": asdict(self.student_spec),
                "teacher": asdict(self.teacher_spec) if self.teacher_spec else None,
                "loss": asdict(self.loss_config),
                "layers": asdict(self.layer_pairs),
                "optimizer": asdict(self.optimizer_config),
                "generation": asdict(self.generation),
                "on_policy": asdict(self.on_policy),
                "teacher_targets": asdict(self.teacher_targets),
            }))
        )  # fmt: skip
        for role, spec in (("student", self.student_spec), ("teacher", self.teacher_spec)):
            if spec is not None:
                check_hub_sources(spec, f"model.{role}")  # no network: one line in seconds, before any load
        has_own = self.student_spec.tokenizer_source is not None
        self.tokenizer = load_tokenizer(self.student_spec if has_own else self.teacher_spec)
        check_same_tokenizer(self.student_spec, self.teacher_spec, self.tokenizer)
        self.student: PreTrainedModel | None = None
        self.projections = nn.ModuleList()  # MSE baseline: teacher -> student hidden size, one per pair
        self.objective: Objective | None = None  # built with the models, in configure_model
        self._window_tokens = 0  # supervised tokens seen since the last optimizer step (this rank)
        self._window_batches = 0  # micro-batches since the last optimizer step: part of the lens draw's seed
        self.rollouts = RolloutWindow()  # the sources of this step's micro-batches and their generation cost
        self.val_sums = nn.ModuleDict()  # term -> SumMetric of token sums over the evaluation set
        self.teacher_cache: TeacherCache | None = None  # a fit's cached teacher targets (on_fit_start)
        object.__setattr__(self, "teacher", None)  # not a submodule: see the module docstring

    # ------------------------------------------------------------------------------------------------------------
    # Building

    def configure_model(self) -> None:
        """Build teacher and student here (not in __init__) so strategies can create large ones sharded."""
        if self.student is not None:
            return
        self._cache_location = teacher_cache_location(self)  # None: the teacher runs live
        teacher = build_teacher(self)
        self.student = load_model(self.student_spec, teacher=teacher)
        self.student.train()  # a copy of an eval-mode teacher's blocks would otherwise stay in eval mode
        if teacher is not None:
            teacher.requires_grad_(False).eval()
            object.__setattr__(self, "teacher", teacher)
            check_same_vocabulary(self.student, teacher)
        check_sequence_lengths(self)
        self.objective = Objective(
            self.loss_config, self.layer_pairs, self.student, teacher, self.projections,
            copied_from=self.student_spec.init_from_teacher_layers,
        )  # fmt: skip
        self._apply_strategy()

    def configure_callbacks(self) -> list[L.Callback]:
        """Generation-based evaluation with this module's settings, in every run that tests or validates, and a
        checkpoint when fit is interrupted, and last.ckpt kept at the newest validated step."""
        return [
            GenerationEvaluation(self.generation),
            CheckpointOnInterrupt(),
            *with_last_checkpoint_newest(self.trainer),
        ]

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

    def _place_teacher(self) -> None:
        if self.teacher is None or is_stripped(self.teacher):  # cached targets: placed before its blocks went
            return
        if not is_sharded(self.teacher):  # FSDP placed the shards: on the device, or offloaded to CPU
            self.teacher.to(self.device)
        self.teacher.eval()

    def on_fit_start(self) -> None:
        self._place_teacher()
        if self._cache_location is not None:  # build the cache if missing, then free the teacher's blocks
            self.teacher_cache = prepare(
                self._cache_location, self.teacher_targets, TeacherView.of(self.objective), self
            )

    def on_validation_start(self) -> None:
        self._place_teacher()

    def on_test_start(self) -> None:
        self._place_teacher()

    # ------------------------------------------------------------------------------------------------------------
    # Steps

    def forward(self, batch: dict[str, Tensor]) -> Terms:
        """The objective's terms on one batch: in training the weighted ones (the lens maybe sampled), else all."""
        seed = 0
        if self.training and self.objective.samples_lens:  # the same draw on every rank, and again on resume
            seed = self._draw_seed(*LENS_STREAM)
        return self.objective(batch, training=self.training, draw_seed=seed)

    def _draw_seed(self, *stream: int) -> int:
        """The seed of a draw of this micro-batch: a function of the run's seed, the step, the micro-batch (and
        ``stream``) only, so the same on every rank and again on resume."""
        return draw_seed(_run_seed(), self.global_step, self._window_batches, *stream)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        batch = self._with_cached_targets(self._maybe_roll_out(batch), "train")
        with seeded_dropout(self._draw_seed(DROPOUT_STREAM, self.global_rank), self.device):
            terms = self(batch)
        self._window_tokens += int(terms.tokens)
        self._window_batches += 1
        batch_size = batch["input_ids"].shape[0]
        for name, value in terms.means().items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size)
        return terms.total()

    def _maybe_roll_out(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """This micro-batch as drawn: as it is, or rebuilt on the student's or the teacher's answers (onpolicy.py).

        Every rank draws the same source, so under FSDP all ranks generate together (``synced_gpus``); ranks that
        drew differently (a seed per process) stop at once with one error (``check_same_draw``), not in a hang.
        """
        if not self.on_policy.enabled:
            return batch  # off: nothing to draw or record
        source = choose_source(self.on_policy, self._draw_seed(CHOICE_STREAM), self.global_step)
        check_same_draw(source, _run_seed(), self.global_step, self._window_batches, self.device)
        if source == REFERENCE:
            self.rollouts.add(source, None)
            return batch
        rollout = roll_out(
            self.student if source == STUDENT else self.teacher, batch, self.on_policy.generation(self.tokenizer),
            source=source,
            seed=self._draw_seed(SAMPLING_STREAM, self.global_rank),
            synced_gpus=several_ranks(),
        )  # fmt: skip
        self.rollouts.add(source, rollout)
        return rollout.batch

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
        if self.on_policy.enabled:
            log_rollouts(self)
            self.rollouts = RolloutWindow()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._accumulate_eval(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Teacher-forced loss on labelled batches; prompt-only batches are answered by GenerationEvaluation."""
        if "labels" in batch:
            self._accumulate_eval(batch)

    def _with_cached_targets(self, batch: dict[str, Tensor], split: str) -> dict[str, Tensor]:
        """The micro-batch with its cached teacher targets when this fit reads a teacher cache."""
        if self.teacher_cache is None:
            return batch
        return {**batch, TEACHER_TARGETS: self.teacher_cache.targets(batch, split)}

    def evaluation_terms(self, batch: dict[str, Tensor]) -> Terms:
        """The objective's terms on a validation batch, read from the teacher cache when this fit has one: the
        validation step's path, and InitialValidation's (whose step-0 point must match the later ones)."""
        return self(self._with_cached_targets(batch, "validation"))

    def _accumulate_eval(self, batch: dict[str, Tensor]) -> None:
        for name, value in self.evaluation_terms(batch).token_sums().items():
            key = name.replace("/", "__")  # ModuleDict keys cannot hold "/" or "."
            if key not in self.val_sums:
                self.val_sums[key] = SumMetric().to(self.device)
            self.val_sums[key].update(value.float())

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        """Token means over the whole evaluation set (synchronised across ranks by the metrics)."""
        if "tokens" not in self.val_sums:
            return
        sums = {key.replace("__", "/"): metric.compute() for key, metric in self.val_sums.items()}
        for name, value in token_means(sums).items():
            self.log(f"{stage}/{name}", value)
        for metric in self.val_sums.values():
            metric.reset()

    # ------------------------------------------------------------------------------------------------------------
    # Optimisation and checkpoints

    def configure_optimizers(self):
        return adamw_with_schedule(self.named_parameters(), self.optimizer_config, self._total_steps())

    def on_train_start(self) -> None:
        """The run's own optimizer settings and schedule over the restored state of a resumed run: Lightning
        restores the optimizer (and its saved learning rate) after ``configure_optimizers``, just before this."""
        apply_settings(
            self.optimizers(use_pl_optimizer=False),
            self.lr_schedulers(),
            self.optimizer_config,
            self._total_steps(),
        )

    def _total_steps(self) -> int:
        return max(int(self.trainer.estimated_stepping_batches), 1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the student's architecture, so the checkpoint can be restored and exported without a teacher;
        a LoRA student's frozen base weights are left out (``lora.leave_base_out``): they are its source's."""
        checkpoint["student_config"] = self.student.config.to_dict()
        if self._adapters_only_checkpoints():
            leave_base_out(checkpoint, self.student, self._lora_base_fingerprint())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Complete an adapters-only checkpoint with the base weights the student was just built with, once they
        are known to be those the adapters were trained on."""
        if self._adapters_only_checkpoints():
            path = self._trainer.ckpt_path if self._trainer is not None else None
            base = lora_base_description(self.student_spec, self.teacher_spec)
            put_base_back(
                checkpoint, self.state_dict(), self.student, self._lora_base_fingerprint(), (path, base)
            )

    def _adapters_only_checkpoints(self) -> bool:
        rebuilds = rebuildable(self.student_spec, self.teacher_spec)
        return adapters_only_checkpoints(self.student, rebuilds, is_sharded(self.student))

    def _lora_base_fingerprint(self) -> str:
        """The fingerprint of the student's frozen base weights (computed once: they never change)."""
        if getattr(self, "_base_fingerprint", None) is None:
            self._base_fingerprint = weights_fingerprint(frozen_parameters(self.student))
        return self._base_fingerprint


def check_sequence_lengths(module: DistillationModule) -> None:
    """Every sequence the run's settings make fits the models that read it (``models.check_run_lengths``)."""
    data = getattr(module._trainer, "datamodule", None)
    max_length, max_prompt = getattr(data, "max_length", None), getattr(data, "max_prompt_length", None)
    if not isinstance(max_length, int) or not isinstance(max_prompt, int):
        return  # no trainer, or a data module without these settings
    models = {"student": module.student, "teacher": module.teacher}
    limits = {role: position_limit(model, role) for role, model in models.items() if model is not None}
    generates = module.generation.every_n_val > 0 or module._trainer.state.fn == "test"
    check_run_lengths(
        max_length, max_prompt, list(limits.values()),
        on_policy_new_tokens=module.on_policy.max_new_tokens if module.on_policy.enabled else None,
        generation=(module.generation.max_new_tokens, limits.get(module.generation.generator)) if generates else None,
    )  # fmt: skip


def build_teacher(module: DistillationModule) -> PreTrainedModel | None:
    """The teacher, whole; or only its structure when complete top-k targets replace it, no student block is
    copied from it, it is not kept (keep_teacher) and no FSDP strategy shards it."""
    if module.teacher_spec is None:
        return None
    location, targets = module._cache_location, module.teacher_targets
    copies_blocks = module.student_spec.init_from_teacher_layers is not None
    whole = copies_blocks or targets.keep_teacher or module.device_mesh is not None  # FSDP shards a whole one
    if location is not None and targets.kind == "topk" and is_complete(location.folder) and not whole:
        return teacher_skeleton(module.teacher_spec)
    return load_model(module.teacher_spec)


def log_rollouts(module: DistillationModule) -> None:
    """The step's fractions of micro-batches answered by the student and by the teacher, its generation time
    and, on steps that generated, the mean generated length (both averaged over ranks).

    The length goes to the loggers directly: a value logged with ``module.log`` on some steps only would be
    repeated by Lightning on the steps in between, which generated nothing.
    """
    metrics = module.rollouts.metrics()
    length = metrics.pop("gen_length", None)
    for name, value in metrics.items():
        module.log(f"train/{name}", float(value), sync_dist=name == "gen_time")
    if length is not None:  # every rank generated in this step (the same source on every rank)
        mean = module.trainer.strategy.reduce(torch.tensor(length, device=module.device), reduce_op="mean")
        for logger in module.loggers:
            logger.log_metrics({"train/gen_length": float(mean)}, step=module.global_step)


def check_same_tokenizer(student: ModelSpec, teacher: ModelSpec | None, student_tokenizer) -> None:
    """When teacher and student name different tokenizers, their token-to-id maps must still be identical."""
    student_source = student.tokenizer_source
    teacher_source = teacher.tokenizer_source if teacher is not None else None
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


def _run_seed() -> int:
    """The run's seed (``seed_everything``), which Lightning passes to every rank's process."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def _as(cls, value):
    """Accept a dataclass instance or its dict form (as stored in checkpoints' hyper-parameters)."""
    return cls(**value) if isinstance(value, dict) else value


def teacher_cache_location(module: DistillationModule) -> CacheLocation | None:
    """Where this fit's cached teacher targets live, keyed by everything that changes them; None when the
    teacher runs live (its kind is live, or the stage is not fit)."""
    trainer = module._trainer
    if not module.teacher_targets.cached or trainer is None or trainer.state.fn != "fit":
        return None
    data, spec, loss = trainer.datamodule, module.teacher_spec, module.loss_config
    key = {
        "teacher": asdict(spec),
        "files": [files_fingerprint(path) for path in weight_files(spec)],
        "seed": _run_seed() if spec.config is not None else None,  # a random-config teacher's weights
        "splits": {name: data.split_key(name) for name in ("train", "validation") if name in data.splits},
        "layers": asdict(module.layer_pairs),
        "copied_from": module.student_spec.init_from_teacher_layers,
        "precision": str(trainer.precision),
        "temperature": loss.temperature,
        "lens_final_norm": loss.lens_final_norm,
    }
    return locate(module.teacher_targets, key, Path(data.cache_dir) / "teacher")
