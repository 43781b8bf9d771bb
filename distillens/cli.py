"""`distillens fit|validate|test|predict --config ...` through LightningCLI, plus `distillens export` and
`distillens diagnose`.

Errors a user can cause (a bad path, an unknown loss name, mismatched vocabularies, bad layer pairs, a malformed
config) print one line on stderr and exit with status 1; ``--debug`` (or DISTILLENS_DEBUG=1) shows the full traceback
instead. Progress messages go to stdout, so a failed run leaves exactly that one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

import yaml
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
    argparse.ArgumentError,  # jsonargparse's parsing errors (the parser raises them: exit_on_error=False)
)
CONFIG_FLAGS = ("--config", "-c")
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")  # each has a stderr handler


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
        auto_configure_optimizers=False,  # the module builds its own AdamW + warm-up/cosine schedule
        parser_kwargs={
            "description": "DistillLens distillation on PyTorch Lightning (arXiv 2602.13567).",
            "exit_on_error": False,  # raise, so that main() reports one line instead of the usage text
        },
    )


def export_command(args: list[str]) -> None:
    """`distillens export CHECKPOINT OUT_DIR`: a Hugging Face folder of the student from any checkpoint."""
    from distillens.export import export_checkpoint

    parser = argparse.ArgumentParser(prog="distillens export", description=export_command.__doc__)
    parser.add_argument("checkpoint", type=Path, help="a .ckpt written by `distillens fit`")
    parser.add_argument("out_dir", type=Path, help="folder to write (safetensors, config, tokenizer)")
    parser.add_argument(
        "--adapter-only",
        action="store_true",
        help="for a LoRA student: write its adapter folder alone instead of the merged model (the default)",
    )
    options = parser.parse_args(args)
    folder = export_checkpoint(options.checkpoint, options.out_dir, adapter_only=options.adapter_only)
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


def check_config_files(args: list[str]) -> None:
    """Parse every existing ``--config`` file first, so that malformed YAML is reported with its file and line
    (jsonargparse names only ``<unicode string>``); missing files are left to jsonargparse, which names them."""
    for index, flag in enumerate(args):
        value = args[index + 1] if flag in CONFIG_FLAGS and index + 1 < len(args) else None
        if flag.startswith("--config="):
            value = flag.split("=", 1)[1]
        if value is None or not Path(value).is_file():
            continue
        try:
            yaml.safe_load(Path(value).read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error)
            raise ValueError(f"{value}{where}: malformed YAML ({problem})") from None


def error_line(error: BaseException) -> str:
    """One line saying what went wrong, from an exception whose message may span many lines.

    jsonargparse reports a bad value of an optional field (``X | None``) as "Does not validate against any of the
    Union subtypes", then one "- reason" per subtype: the reasons not about ``None`` are the real ones.
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    prefix = ""
    # jsonargparse names the option first: 'Parser key "trainer.max_steps":', alone or before the reason
    if key := re.match(r'Parser key "([^"]+)":\s*', lines[0]):
        prefix, lines[0] = f"{key.group(1)}: ", lines[0][key.end() :]
        lines = [line for line in lines if line]
    if lines and lines[0].startswith("Does not validate against any of the Union subtypes"):
        reasons = _union_reasons(lines)
        if reasons:
            return prefix + "; ".join(reasons)
    return prefix + " ".join(lines)


def _union_reasons(lines: list[str]) -> list[str]:
    """The lines between "Errors:" and "Given value", without the None subtype's and class-path headers."""
    start = lines.index("Errors:") + 1 if "Errors:" in lines else len(lines)
    stop = next((i for i, line in enumerate(lines) if line.startswith("Given value")), len(lines))
    return [
        line.removeprefix("- ")
        for line in lines[start:stop]
        if "NoneType" not in line and not line.startswith("- Problem with given class_path")
    ]


class _CurrentStream(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stdout``/``sys.stderr`` is when a record comes (tests swap them)."""

    def __init__(self, name: str) -> None:
        self.stream_name = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value) -> None:
        pass  # always the current sys stream


def route_logging() -> None:
    """Progress messages (below WARNING) to stdout, warnings and errors to stderr; once per process.

    Lightning gave its loggers their own stderr handlers when it was imported (the root logger had none yet):
    they now propagate to the root handlers instead, as Lightning does when the root logger is configured first.
    Other libraries log warnings only, which belong on stderr anyway.
    """
    root = logging.getLogger()
    if not any(isinstance(handler, _CurrentStream) for handler in root.handlers):
        progress, problems = _CurrentStream("stdout"), _CurrentStream("stderr")
        progress.addFilter(lambda record: record.levelno < logging.WARNING)
        problems.setLevel(logging.WARNING)
        for handler in (progress, problems):
            handler.setFormatter(logging.Formatter("%(message)s"))
            root.addHandler(handler)
        root.setLevel(logging.INFO)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def main(args: list[str] | None = None) -> None:
    """Console entry point."""
    from_command_line = args is None
    args = list(sys.argv[1:] if from_command_line else args)
    debug = "--debug" in args or os.environ.get("DISTILLENS_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if from_command_line:
        sys.argv = sys.argv[:1] + args  # LightningCLI reads sys.argv itself
    route_logging()
    try:
        check_config_files(args)
        if args[:1] == ["export"]:
            export_command(args[1:])
        elif args[:1] == ["diagnose"]:
            diagnose_command(args[1:])
        else:
            run_cli(None if from_command_line else args)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"distillens: error: {error_line(error)} (run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
