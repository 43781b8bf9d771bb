"""`distillens fit|validate|test --config ...` through LightningCLI; its top-level parser also lists `distillens
export` and `distillens diagnose` (distillens/commands.py). The console entry point is distillens/cli.py, which
imports this module (and so Lightning) only for these three commands."""

from __future__ import annotations

import logging
import os

from jsonargparse import set_parsing_settings
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from distillens.callbacks import count_steps_in_progress_bar
from distillens.checkpoints import check_checkpoint_file
from distillens.commands import COMMANDS, command_parser
from distillens.console import route_logging
from distillens.data import InstructionDataModule
from distillens.module import DistillationModule
from distillens.precision import fall_back_from_slow_bf16
from distillens.resume import checkpoint_folders, resolve_checkpoint
from distillens.runs import check_fresh_run, place_run

log = logging.getLogger(__name__)


class DistillensParser(LightningArgumentParser):
    """LightningCLI's parser, whose subcommands also list export and diagnose (which main() runs itself)."""

    def add_subcommands(self, **kwargs):
        subcommands = super().add_subcommands(**kwargs)
        for name, command in COMMANDS.items():
            subcommands.add_subcommand(name, command_parser(name), help=command.summary)
        teach = "Run the teacher once over the training and validation splits and cache its targets "
        teach += "(model.teacher_targets); takes fit's options"
        subcommands.add_subcommand("teach", LightningArgumentParser(description=teach), help=teach)
        return subcommands


class DistillensCLI(LightningCLI):
    """LightningCLI whose data module receives the models' tokenizer once both are built."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test. Not predict: the module has no prediction step (answers to prompts are what
        ``distillens test`` generates, scores and saves), so the subcommand could only fail."""
        return {name: kwargs for name, kwargs in LightningCLI.subcommands().items() if name != "predict"}

    def _parse_ckpt_path(self) -> None:
        """Lightning would overwrite the parsed settings with the checkpoint's: here what the user wrote wins. A file
        cut short fails first, naming the file; the checkpoint is checked against the configured models once the
        trainer exists (``_resolve_ckpt_path``, distillens/resume.py)."""
        if self.config.get("subcommand"):
            check_checkpoint_file(self.config[self.config.subcommand].get("ckpt_path"))

    def before_instantiate_classes(self) -> None:
        """Every file of the launch under the run's root, evaluation launches in a folder of their own (runs.py);
        fp32 instead of bf16 on a CPU that has no native bf16 (precision.py)."""
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        place_run(config.trainer, self.subcommand)
        fall_back_from_slow_bf16(config.trainer)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self.datamodule.connect(self.model.tokenizer)
        warn_if_oversubscribed(self.trainer)
        count_steps_in_progress_bar(self.trainer)

    def before_fit(self) -> None:
        self._resolve_ckpt_path("fit")

    def after_fit(self) -> None:
        """A fit stopped by Ctrl-C has saved its checkpoint (callbacks.CheckpointOnInterrupt); its status says it
        did not finish, as an interrupted program's does (128 + SIGINT)."""
        if any(getattr(callback, "interrupted", False) for callback in self.trainer.callbacks):
            raise SystemExit(130)

    def before_validate(self) -> None:
        self._resolve_ckpt_path("validate")

    def before_test(self) -> None:
        self._resolve_ckpt_path("test")

    def _resolve_ckpt_path(self, stage: str) -> None:
        """Resolve ``--ckpt_path`` (``last`` included) and refuse a checkpoint of other models, in one line."""
        options = self.config_init[stage]
        if stage == "fit" and options.get("ckpt_path") is None:
            check_fresh_run(checkpoint_folders(self.trainer))
        options["ckpt_path"] = resolve_checkpoint(
            self.trainer, options.get("ckpt_path"), self.model.hparams, stage
        )


def warn_if_oversubscribed(trainer) -> None:
    """One warning when CPU processes outnumber the cores: each would get less than one, slower than fewer."""
    cores = os.cpu_count() or 1
    if isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices > cores:
        log.warning(
            "trainer.devices=%d CPU processes on a machine with %d core(s): each gets less than a core, so the run "
            "is slower than with devices=%d",
            trainer.num_devices, cores, cores,
        )  # fmt: skip


def run_cli(args: list[str] | None = None) -> DistillensCLI:
    """Build and run the Lightning CLI (subcommand, configs and overrides in ``args``)."""
    route_logging()  # again: importing Lightning gave its logger a stderr handler of its own ("INFO: ...")
    # dataclass fields are documented by the string under each one: make them the --help text
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    return DistillensCLI(
        DistillationModule,
        InstructionDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the module builds its own AdamW + warm-up/cosine schedule
        parser_class=DistillensParser,
        parser_kwargs={
            "description": "DistillLens distillation on PyTorch Lightning (arXiv 2602.13567).",
            "exit_on_error": False,  # raise, so that main() reports one line instead of the usage text
        },
    )
