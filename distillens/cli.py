"""`distillens fit|validate|test|predict --config ...` through LightningCLI, plus `distillens export` and
`distillens diagnose`.

Errors a user can cause (a bad path, an unknown loss name, mismatched vocabularies, bad layer pairs) print one line
and exit with status 1; ``--debug`` (or DISTILLENS_DEBUG=1) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from distillens.data import InstructionDataModule
from distillens.module import DistillationModule

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    OSError,
    KeyError,
    ImportError,
    RuntimeError,
)


class DistillensCLI(LightningCLI):
    """LightningCLI whose data module receives the models' tokenizer once both are built."""

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self.datamodule.connect(self.model.tokenizer)


def run_cli(args: list[str] | None = None) -> DistillensCLI:
    """Build and run the Lightning CLI (subcommand, configs and overrides in ``args``)."""
    # dataclass fields are documented by the string under each one: make them the --help text
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    return DistillensCLI(
        DistillationModule,
        InstructionDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "DistillLens distillation on PyTorch Lightning (arXiv 2602.13567)."},
    )


def export_command(args: list[str]) -> None:
    """`distillens export CHECKPOINT OUT_DIR`: a Hugging Face folder of the student from any checkpoint."""
    from distillens.export import export_checkpoint

    parser = argparse.ArgumentParser(prog="distillens export", description=export_command.__doc__)
    parser.add_argument("checkpoint", type=Path, help="a .ckpt written by `distillens fit`")
    parser.add_argument("out_dir", type=Path, help="folder to write (safetensors, config, tokenizer)")
    options = parser.parse_args(args)
    folder = export_checkpoint(options.checkpoint, options.out_dir)
    print(f"student exported to {folder}")


def diagnose_command(args: list[str]) -> None:
    """`distillens diagnose --teacher SPEC --student SPEC --data FILE --out DIR`: lens diagnostics (PNG + JSON)."""
    from distillens.diagnostics import diagnose

    parser = argparse.ArgumentParser(prog="distillens diagnose", description=diagnose_command.__doc__)
    teacher_help = "hub id, folder, .gguf file or smollm2-135m-instruct"
    parser.add_argument("--teacher", required=True, help=teacher_help)
    parser.add_argument(
        "--student", required=True, help="as --teacher, a .ckpt, or layers:i,j,... of the teacher"
    )
    parser.add_argument("--data", required=True, help="a data file or folder the data module reads")
    parser.add_argument("--out", required=True, type=Path, help="folder for lens_diagnostics.png and .json")
    parser.add_argument("--divergence", default="jsd", help="divergence between lens distributions")
    parser.add_argument("--max-samples", type=int, default=32, help="examples to use (the first ones)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512, help="longest prompt + response in tokens")
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--template", default="alpaca", help="alpaca, chat, or a string with {instruction}")
    parser.add_argument("--cache-dir", default="data/cache")
    options = parser.parse_args(args)
    png, report = diagnose(
        options.teacher, options.student, options.data, options.out, divergence=options.divergence,
        max_samples=options.max_samples, batch_size=options.batch_size, max_length=options.max_length,
        max_prompt_length=options.max_prompt_length, template=options.template, cache_dir=options.cache_dir,
    )  # fmt: skip
    print(f"lens diagnostics written to {png} and {report}")


def main(args: list[str] | None = None) -> None:
    """Console entry point."""
    from_command_line = args is None
    args = list(sys.argv[1:] if from_command_line else args)
    debug = "--debug" in args or os.environ.get("DISTILLENS_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if from_command_line:
        sys.argv = sys.argv[:1] + args  # LightningCLI reads sys.argv itself
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args[:1] == ["export"]:
            export_command(args[1:])
        elif args[:1] == ["diagnose"]:
            diagnose_command(args[1:])
        else:
            run_cli(None if from_command_line else args)
    except USER_ERRORS as error:
        if debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"distillens: error: {message} (run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
