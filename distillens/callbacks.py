"""Callbacks: a checkpoint on Ctrl-C, a progress bar counting steps, token throughput, a fixed number of sequences
per optimizer step whatever the device count, initial validation, generation-based evaluation (test and
validation), export of the trained student as a Hugging Face folder, and lens diagnostics."""

from __future__ import annotations

import itertools
import logging
import signal
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n
from lightning.pytorch.loggers import TensorBoardLogger

from distillens.diagnostics import copied_depths, lens_diagnostics, plot_lens_diagnostics
from distillens.evaluation import GenerationEvaluator, GenerationSettings
from distillens.generation import eval_mode
from distillens.lens import LogitLens
from distillens.objective import token_means
from distillens.records import shard_loader
from distillens.results import metric_values, results_markdown, write_results
from distillens.resume import adopt_last_checkpoints, checkpoint_folders, last_checkpoint_lags, save_as_last
from distillens.teacher_cache import is_stripped

log = logging.getLogger(__name__)


class _AtOptimizerSteps(L.Callback):
    """Base of callbacks that act once per optimizer step: ``_stepped`` tells, in ``on_train_batch_end``, whether
    the batch ended one (with gradient accumulation, most micro-batches do not)."""

    _step_at_batch_start = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def _stepped(self, trainer) -> bool:
        return trainer.global_step != self._step_at_batch_start


class CheckpointOnInterrupt(_AtOptimizerSteps):
    """Ctrl-C during fit finishes the optimizer step under way, saves ``last.ckpt`` and stops, saying how to go on.

    Periodic checkpoints alone lose the work since the last one. A checkpoint written in the middle of a step
    cannot be resumed exactly (the batch in flight is half counted by the loops and the data position), so the
    first Ctrl-C asks for a stop at the end of the step and the checkpoint is written there, where the run's
    ``ModelCheckpoint`` keeps its ``last`` file: the same command with ``--ckpt_path last`` continues exactly. A
    second Ctrl-C stops at once, without one. With several processes, the ranks agree at each step's end whether
    any of them was interrupted, so that they save and stop together. An exception in the loop cannot be saved
    from: one line names the newest checkpoint instead.

    Stopping is all an interrupted fit does: Lightning would validate a run asked to stop (as after early
    stopping), ``ModelCheckpoint`` could save again at the epoch's end, and ``ExportStudent`` would export the
    half-trained student; none of them does after Ctrl-C. When fit starts, a ``last.ckpt`` already in a
    ``ModelCheckpoint``'s folder (that of the run being resumed, also when the folder was copied or moved) is
    made that callback's own, so its next save replaces it instead of going to ``last-v1.ckpt``.
    """

    def __init__(self) -> None:
        self.requested = False
        self.interrupted = False  # a checkpoint was saved on Ctrl-C and fit stopped: the CLI exits with 130
        self._previous_handler = None
        self._training = (
            False  # the steps have started: a failure from then on has a checkpoint to go on from
        )

    def on_train_start(self, trainer, pl_module) -> None:
        self._training = True
        adopt_last_checkpoints(trainer)  # after Lightning restored the callbacks' state from the checkpoint
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._request_stop)

    def _request_stop(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous_handler)  # a second Ctrl-C interrupts at once
        log.info(
            "Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again stops at once, without one)"
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._stepped(trainer):
            return  # gradient accumulation: the optimizer step is not done yet
        requested = self.requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        path = _last_checkpoint_path(trainer)
        if not requested or path is None:
            return
        save_as_last(trainer, path)
        trainer.should_stop = self.interrupted = True
        trainer.limit_val_batches = 0  # Lightning validates a run that stops early: not this one
        log.info("interrupted at step %d: saved %s; to go on, run the same command with --ckpt_path last",
                 trainer.global_step, path)  # fmt: skip

    def on_train_end(self, trainer, pl_module) -> None:
        self._training = False
        self._restore_handler()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handler()
        path = _last_checkpoint_path(trainer)
        if not self._training or path is None or not path.is_file() or not trainer.is_global_zero:
            return  # an error (or Ctrl-C) while starting, or nothing saved yet: the error line says it all
        log.info(
            "%s at step %d: the newest checkpoint is %s", type(exception).__name__, trainer.global_step, path
        )

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None


class LastCheckpointNewest(Checkpoint):
    """``last.ckpt`` saved at every validation of fit, not only at those that improved the monitored value.

    Lightning's ModelCheckpoint writes its ``last`` file only at a validation where it also saved a top-k
    checkpoint: after one that did not improve, ``last.ckpt`` stays at an older step, so a finished fit leaves a
    ``student/`` of its final step beside a ``last.ckpt`` of an earlier one, and exporting ``last.ckpt`` or resuming
    from it goes back without a word. This saves it where it lags, at the point of the ModelCheckpoint's own saves
    (a ``Checkpoint`` subclass, so that Lightning runs it after them). A step that no validation ends keeps
    ModelCheckpoint's schedule.
    """

    def on_validation_end(self, trainer, pl_module) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return  # `validate` and the sanity check save nothing
        path = _last_checkpoint_path(trainer)
        if path is not None and last_checkpoint_lags(trainer, path):
            save_as_last(trainer, path)


def with_last_checkpoint_newest(trainer) -> list[L.Callback]:
    """[LastCheckpointNewest()] where the run's first ModelCheckpoint keeps a ``last`` file, else [] (without a
    ModelCheckpoint before it, Lightning would take it for the run's checkpoint callback)."""
    checkpoints = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    return [LastCheckpointNewest()] if checkpoints and checkpoints[0].save_last else []


def _last_checkpoint_path(trainer) -> Path | None:
    """Where the run's first ModelCheckpoint keeps its ``last`` file (None without one)."""
    folders = checkpoint_folders(trainer)
    return (
        folders[0] / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
        if folders
        else None
    )


def planned_steps(trainer) -> int | None:
    """The run's length in optimizer steps when ``trainer.max_steps`` sets it, else None (epoch-based)."""
    return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None


class StepsRichProgressBar(RichProgressBar):
    """Lightning's rich bar, counting optimizer steps of the planned total when ``max_steps`` sets the run's length.

    Lightning's bar counts the batches of the current epoch and titles it ``Epoch e/max_epochs-1``: on a run
    limited by steps it reads ``Epoch 0/-2``, and ``4/2`` batches after a mid-epoch resume.
    """

    @property
    def total_train_batches(self) -> int | float:
        return planned_steps(self.trainer) or super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if planned_steps(self.trainer) is None:
            return super()._get_train_description(current_epoch)
        return f"{'Steps':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if planned_steps(trainer) is not None:
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if planned_steps(trainer) is not None:
            self._update(self.train_progress_bar_id, trainer.global_step)


class StepsTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar (used when rich is not installed), counting steps like ``StepsRichProgressBar``."""

    @property
    def total_train_batches(self) -> int | float:
        return planned_steps(self.trainer) or super().total_train_batches

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        if planned_steps(trainer) is not None:
            self.train_progress_bar.set_description("Steps")
            _update_n(self.train_progress_bar, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if planned_steps(trainer) is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        _update_n(self.train_progress_bar, trainer.global_step)
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


def count_steps_in_progress_bar(trainer) -> None:
    """Swap Lightning's default progress bar, if the trainer has it, for the one that counts steps (in place)."""
    swaps = {RichProgressBar: StepsRichProgressBar, TQDMProgressBar: StepsTQDMProgressBar}
    for index, callback in enumerate(trainer.callbacks):
        if type(callback) in swaps:
            counting = swaps[type(callback)].__new__(swaps[type(callback)])
            counting.__dict__.update(callback.__dict__)  # the bar's own settings (theme, refresh rate, leave)
            trainer.callbacks[index] = counting


class TokenThroughput(_AtOptimizerSteps):
    """Log ``train/tokens_per_sec``: non-padding tokens trained over the wall time, per logging window, all ranks.

    Timed from one logged value to the next (``trainer.log_every_n_steps`` optimizer steps), data loading,
    backward and optimizer steps included, and after the accelerator has finished its queued work: the rate the
    run achieves. A per-micro-batch timing without a device sync swings with whatever the batch's neighbours
    left queued.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        self._restart_window(pl_module.device)

    def _restart_window(self, device: torch.device) -> None:
        _synchronize(device)
        self._tokens, self._since = 0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += int(batch["attention_mask"].sum()) * trainer.world_size
        if not self._stepped(trainer) or trainer.global_step % trainer.log_every_n_steps:
            return  # Lightning writes logged values at the same steps
        _synchronize(pl_module.device)
        seconds = max(time.perf_counter() - self._since, 1e-9)
        pl_module.log("train/tokens_per_sec", self._tokens / seconds, batch_size=batch["input_ids"].shape[0])
        self._restart_window(pl_module.device)


def _synchronize(device: torch.device) -> None:
    """Wait for the accelerator's queued work, so that wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SequencesPerStep(L.Callback):
    """Keep the sequences of one optimizer step fixed, whatever the number of devices, through gradient accumulation.

    ``accumulate_grad_batches`` becomes ``sequences / (data.batch_size x devices x nodes)``, set when fit starts
    (before the optimizer's schedule counts its steps), so a config written for 4 GPUs trains the same
    optimizer steps on 1 (4 times the accumulation) or 8 (half the per-device batch). A count that does not divide
    stops the run with a one-line error naming what to change.

    Args:
        sequences: sequences (rows) per optimizer step over all devices, e.g. 16 for the paper's GPT-2 runs.
    """

    def __init__(self, sequences: int) -> None:
        if sequences < 1:
            raise ValueError(f"SequencesPerStep: sequences={sequences} must be at least 1")
        self.sequences = sequences

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        batch_size = getattr(trainer.datamodule, "batch_size", None)
        if batch_size is None:
            raise ValueError("SequencesPerStep needs a data module with a batch_size (per device)")
        trainer.accumulate_grad_batches = accumulation_for(self.sequences, batch_size, trainer.world_size)
        print(
            f"{self.sequences} sequences per optimizer step = {batch_size} per device x {trainer.world_size} "
            f"device(s) x {trainer.accumulate_grad_batches} accumulated"
        )


def accumulation_for(sequences: int, batch_size: int, world_size: int) -> int:
    """Micro-batches to accumulate so that ``batch_size x world_size x accumulation == sequences``."""
    per_micro_step = batch_size * world_size
    if sequences % per_micro_step:
        hint = (
            f"use a data.batch_size that divides {sequences // world_size}"
            if sequences % world_size == 0
            else f"they cannot be split evenly over {world_size} devices"
        )
        raise ValueError(
            f"SequencesPerStep: {sequences} sequences per step is not a multiple of data.batch_size {batch_size} x "
            f"{world_size} device(s) = {per_micro_step}: {hint}"
        )
    return sequences // per_micro_step


class InitialValidation(L.Callback):
    """Log the validation losses of the untrained student at step 0, so a run shows where it started.

    Lightning validates only after training steps; this runs the module's own loss on (at most ``max_batches`` of)
    the validation set before the first step and logs ``val/<term>`` at step 0 through the run's loggers.

    Args:
        max_batches: validation batches to use; None follows the trainer's ``limit_val_batches`` (a count, or a
            fraction of the batches, as Lightning's validations use it).
    """

    def __init__(self, max_batches: int | None = None) -> None:
        self.max_batches = max_batches

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 or trainer.datamodule is None:
            return  # resumed run: its curve already has a start
        loader = trainer.datamodule.val_dataloader()
        limit = self.max_batches
        if limit is None and isinstance(trainer.limit_val_batches, int):
            limit = trainer.limit_val_batches
        elif limit is None and trainer.limit_val_batches < 1.0:  # a fraction, counted as Lightning counts it
            limit = int(len(loader) * trainer.limit_val_batches)
        sums: dict[str, float] = {}
        batches = itertools.islice(loader, limit)
        # in the run's precision (bf16-mixed: autocast), as Lightning runs the later validations
        with eval_mode(pl_module), torch.no_grad(), trainer.precision_plugin.forward_context():
            for batch in batches:
                terms = pl_module.evaluation_terms(
                    pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                )
                for name, value in terms.token_sums().items():
                    sums[name] = sums.get(name, 0.0) + float(value)
        metrics = {f"val/{name}": value for name, value in token_means(sums).items()} if sums else {}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)
        print(
            "initial validation: "
            + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if "/lens/" not in k)
        )


class GenerationEvaluation(L.Callback):
    """Generation-based evaluation, driven from the trainer's loops: ``distillens test`` and validation generation.

    The module adds it itself (``configure_callbacks``) with its ``model.generation`` settings, so every run that
    tests or validates has it. In ``test``, every prompt-only batch (the data module's generation loaders) is
    answered under every generation seed in the run's precision, as a test step would be; at the end, the scores
    are logged as ``test/<set>/<metric>`` and written with the answers to ``<run folder>/eval`` (or
    ``generation.output_dir``). In ``fit``, every ``every_n_val``-th validation answers (the first ``max_prompts``)
    validation prompts under the first seed and logs ``val/<metric>`` (the paper keeps the checkpoint with the best
    validation ROUGE-L).

    Args:
        settings: the module's generation settings.
    """

    def __init__(self, settings: GenerationSettings) -> None:
        self.settings = settings
        self._validations = 0  # validation runs since this process started (generation every N-th)
        self._evaluator: GenerationEvaluator | None = None

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._evaluator = GenerationEvaluator(self.settings, pl_module.tokenizer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if "labels" in batch:
            return  # a labelled batch: the module's teacher-forced loss
        with trainer.precision_plugin.test_step_context():
            self._evaluator.add(_generator_of(pl_module, self.settings), batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        protocol = getattr(trainer.datamodule, "eval_protocol", None)  # prompt and reference filters
        outcome = self._evaluator.results(protocol() if callable(protocol) else None)
        if outcome is None:
            return
        results, runs = outcome
        for name, value in metric_values(results).items():
            pl_module.log(name, value, sync_dist=True)  # the same value on every rank
        if trainer.is_global_zero:
            run_folder = Path(trainer.log_dir or trainer.default_root_dir)
            folder = Path(self.settings.output_dir) if self.settings.output_dir else run_folder / "eval"
            write_results(folder, results, runs)
            print(f"\n{results_markdown(results)}results and answers written to {folder}")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.settings.every_n_val:
            return
        self._validations += 1
        if self._validations % self.settings.every_n_val:
            return
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "generation_dataloader"):
            raise ValueError(
                "generation.every_n_val > 0 needs the InstructionDataModule (its validation prompts)"
            )
        prompts = shard_loader(
            datamodule.generation_dataloader("validation"),
            trainer.global_rank, trainer.world_size, self.settings.max_prompts,
        )  # fmt: skip
        batches = (pl_module.transfer_batch_to_device(batch, pl_module.device, 0) for batch in prompts)
        evaluator = GenerationEvaluator(self.settings, pl_module.tokenizer)
        for name, value in evaluator.validation_scores(
            _generator_of(pl_module, self.settings), batches
        ).items():
            pl_module.log(f"val/{name}", value, sync_dist=True)  # the same value on every rank


def _generator_of(pl_module, settings: GenerationSettings):
    """The model that answers: the student, or the teacher for the reference row of a results table."""
    if settings.generator == "teacher" and pl_module.teacher is None:
        raise ValueError("generation.generator is 'teacher' but model.teacher is not set")
    return pl_module.teacher if settings.generator == "teacher" else pl_module.student


class ExportStudent(L.Callback):
    """At the end of fit, save the student (safetensors + config + tokenizer) where ``from_pretrained`` loads it.

    A student sharded by FSDP is gathered into one ordinary model first (every rank takes part), so the folder is
    the same single Hugging Face folder a one-process run writes.

    A LoRA student is written merged (a plain model); ``adapter_only`` writes its adapter folder instead. The
    tokenizer's chat template renders the prompts the student was trained on (the data module's template).

    Args:
        dirpath: target folder; default ``<run folder>/student``.
        adapter_only: for a LoRA student, save the adapter alone rather than the merged model.
        overwrite: replace an earlier export in the folder (a re-run of the same run replaces its own); false
            refuses a non-empty folder when fit starts. A non-empty folder without an export is always refused.
    """

    def __init__(
        self, dirpath: str | None = None, adapter_only: bool = False, overwrite: bool = True
    ) -> None:
        self.dirpath = dirpath
        self.adapter_only = adapter_only
        self.overwrite = overwrite

    def folder(self, trainer) -> Path:
        """The target folder; every rank must call this (``trainer.log_dir`` is a broadcast from rank 0)."""
        return Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "student")

    def on_fit_start(self, trainer, pl_module) -> None:
        from distillens.export import adapter_base, check_export_folder

        if self.adapter_only:  # an adapter that cannot be used without the student fails now too
            adapter_base(pl_module.student_spec)
        folder, problem = self.folder(trainer), None
        if trainer.is_global_zero:  # a folder that cannot be written fails now, not after training
            try:
                check_export_folder(folder, self.overwrite)
            except OSError as error:
                problem = error
        problem = trainer.strategy.broadcast(problem)  # every rank stops, not rank 0 alone
        if problem is not None:
            raise problem

    def on_fit_end(self, trainer, pl_module) -> None:
        if any(getattr(callback, "interrupted", False) for callback in trainer.callbacks):
            return  # Ctrl-C: the student is half-trained, and the run goes on from its last.ckpt
        targets = getattr(pl_module, "teacher_targets", None)
        if targets is not None and targets.build_only:
            return  # `distillens teach`: the teacher cache was the work, the student is untrained
        from distillens.export import consolidated_model, export_trained_student

        folder = self.folder(trainer)
        template = getattr(trainer.datamodule, "template", None)
        student = consolidated_model(pl_module.student)  # a collective when sharded; None off rank 0
        if trainer.is_global_zero:
            export_trained_student(
                student, pl_module.tokenizer, folder, template=template,
                adapter_only=self.adapter_only, overwrite=self.overwrite, student_spec=pl_module.student_spec,
            )  # fmt: skip
            print(f"student exported to {folder}")


class LensDiagnostics(L.Callback):
    """Every ``every_n_val``-th validation, log where the student's lens distributions depart from the teacher's.

    Computed by ``distillens.diagnostics.lens_diagnostics`` on the first ``max_batches`` validation batches (the
    same ones each time, so the curves are comparable), at every student depth (a layer-subset student's against
    the teacher depths its blocks were copied from): scalars ``lens_diag/<quantity>/s<i>_t<j>`` (divergence,
    entropies, top-1 agreement with the teacher's answer) through the module's loggers, and the three-panel figure
    as ``lens_diag/figure`` in each TensorBoard logger. Skipped in the sanity check and without a teacher.

    Args:
        every_n_val: run at every N-th validation.
        max_batches: validation batches to diagnose on.
        divergence: divergence between the lens distributions (any name of the loss registry; the paper: jsd).
    """

    def __init__(self, every_n_val: int = 1, max_batches: int = 2, divergence: str = "jsd") -> None:
        if every_n_val < 1 or max_batches < 1:
            raise ValueError(
                f"LensDiagnostics: every_n_val={every_n_val} and max_batches={max_batches} must be >= 1"
            )
        self.every_n_val, self.max_batches, self.divergence = every_n_val, max_batches, divergence
        self._validations = 0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        teacher = pl_module.teacher
        if trainer.sanity_checking or teacher is None or is_stripped(teacher) or trainer.datamodule is None:
            return  # no teacher to run: none, or its blocks freed for cached targets
        self._validations += 1
        if self._validations % self.every_n_val:
            return
        batches = itertools.islice(trainer.datamodule.val_dataloader(), self.max_batches)
        report = lens_diagnostics(
            LogitLens(pl_module.student),
            LogitLens(pl_module.teacher),
            batches,
            divergence=self.divergence,
            pairs=copied_depths(pl_module.student_spec.init_from_teacher_layers),
        )
        for name, value in report.scalars().items():
            pl_module.log(name, value, sync_dist=True)  # every rank diagnosed the same batches
        if trainer.is_global_zero:
            figure = plot_lens_diagnostics(report)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_figure("lens_diag/figure", figure, global_step=trainer.global_step)
