"""`distillens fit|validate|test --config ...` through LightningCLI, plus `distillens export` and
`distillens diagnose` (distillens/commands.py); bad input is one line on stderr (distillens/console.py)."""

from __future__ import annotations

import logging
import os
import sys

from jsonargparse import set_parsing_settings
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from distillens.checkpoints import check_checkpoint_file
from distillens.commands import COMMANDS, command_parser, run_command
from distillens.console import (
    DEBUG_FLAG,
    check_config_files,
    debug_requested,
    route_logging,
    user_errors_as_one_line,
)
from distillens.data import InstructionDataModule
from distillens.module import DistillationModule

log = logging.getLogger(__name__)


class DistillensParser(LightningArgumentParser):
    """LightningCLI's parser, whose subcommands also list export and diagnose (which main() runs itself)."""

    def add_subcommands(self, **kwargs):
        subcommands = super().add_subcommands(**kwargs)
        for name, command in COMMANDS.items():
            subcommands.add_subcommand(name, command_parser(name), help=command.summary)
        return subcommands


class DistillensCLI(LightningCLI):
    """LightningCLI whose data module receives the models' tokenizer once both are built."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test. Not predict: the module has no prediction step (answers to prompts are what
        ``distillens test`` generates, scores and saves), so the subcommand could only fail."""
        return {name: kwargs for name, kwargs in LightningCLI.subcommands().items() if name != "predict"}

    def _parse_ckpt_path(self) -> None:
        """Lightning reads --ckpt_path right after parsing: a file cut short fails first here, naming the file."""
        if self.config.get("subcommand"):
            check_checkpoint_file(self.config[self.config.subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self.datamodule.connect(self.model.tokenizer)
        warn_if_oversubscribed(self.trainer)


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


def main(args: list[str] | None = None) -> None:
    """Console entry point."""
    from_command_line = args is None
    args = list(sys.argv[1:] if from_command_line else args)
    debug = debug_requested(args)
    args = [a for a in args if a != DEBUG_FLAG]
    if from_command_line:
        sys.argv = sys.argv[:1] + args  # LightningCLI reads sys.argv itself
    route_logging()
    with user_errors_as_one_line(debug):
        check_config_files(args)
        if args[:1] and args[0] in COMMANDS:
            run_command(args[0], args[1:])
        else:
            run_cli(None if from_command_line else args)


if __name__ == "__main__":
    main()
