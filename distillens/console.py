"""What the command line shows: bad input as one error line, progress on stdout, warnings and errors on stderr.

Errors a user can cause (a bad path, an unknown loss name, mismatched vocabularies, bad layer pairs, a malformed
config) print one line on stderr and exit with status 1; ``--debug`` (or DISTILLENS_DEBUG=1) shows the full traceback
instead. Progress messages go to stdout, so a failed run leaves exactly that one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

USER_ERRORS = (
    ValueError,  # bad values: our checks of settings, layer pairs, vocabularies, data and checkpoints
    OSError,  # FileNotFoundError, NotADirectoryError: missing paths; an unknown model id (distillens.models)
    ImportError,  # an optional extra a config asks for and that is not installed (metric sbert)
    argparse.ArgumentError,  # jsonargparse's parsing errors (the parsers raise them: exit_on_error=False)
)
"""Exceptions reported as one line: those raised for bad input. Anything else is a bug and keeps its traceback."""
CONFIG_FLAGS = ("--config", "-c")
DEBUG_FLAG = "--debug"
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")  # each has a stderr handler
REDUNDANT_WARNINGS = (
    # a fresh fit refuses a folder with checkpoints (runs.py): a non-empty one means a resume, which is meant
    r"Checkpoint directory .* exists and is not empty",
    # Lightning's own use of a torch API torch deprecated: nothing a user can act on
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # PEFT's use of a transformers API transformers deprecated, on every LoRA student
    r"`is_gradient_checkpointing` is deprecated",
)
"""Library warnings the CLI hides: each says nothing true and useful about a distillens run."""
REDUNDANT_RECORDS = (
    # Lightning's advertisement of its cloud logger, on every run
    "Tip: For seamless cloud logging",
)
"""Library log records the CLI hides, by a part of their message."""


def debug_requested(args: list[str]) -> bool:
    """Whether the user asked for tracebacks: ``--debug`` anywhere in ``args``, or DISTILLENS_DEBUG set and not 0."""
    return DEBUG_FLAG in args or os.environ.get("DISTILLENS_DEBUG", "") not in ("", "0")


@contextmanager
def user_errors_as_one_line(debug: bool, prog: str = "distillens") -> Iterator[None]:
    """Report a USER_ERRORS exception as ``<prog>: error: <one line>`` on stderr and exit with status 1 (unless
    ``debug``: the exception then propagates with its traceback)."""
    try:
        yield
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"{prog}: error: {error_line(error)} (run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def check_config_files(args: list[str]) -> None:
    """Check every ``--config`` file first, before anything heavy is imported: a missing one answers at once, and
    malformed YAML is reported with its file and line (jsonargparse names only ``<unicode string>``). A value
    that is not a file name (jsonargparse also takes YAML text after ``--config``) is left to jsonargparse."""
    for index, flag in enumerate(args):
        value = args[index + 1] if flag in CONFIG_FLAGS and index + 1 < len(args) else None
        if flag.startswith("--config="):
            value = flag.split("=", 1)[1]
        if value is None:
            continue
        if Path(value).is_file():
            check_config_file(value)
        elif Path(value).suffix in (".yaml", ".yml") and "\n" not in value:
            raise FileNotFoundError(f"--config {value}: no such file")


def check_config_file(value: str) -> None:
    """One line naming the file when it is not UTF-8, not YAML, or not a mapping of settings."""
    try:
        settings = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{value}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"{value}{where}: malformed YAML ({problem})") from None
    if settings is None:
        raise ValueError(f"{value}: empty; a config sets trainer:, model: or data: (or leave the file out)")
    if not isinstance(settings, dict):
        kind = "a list" if isinstance(settings, list) else f"a {type(settings).__name__}"
        raise ValueError(
            f"{value}: the file holds {kind}, not a mapping of settings (trainer:, model:, data:)"
        )


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


def not_yet_printed(record: logging.LogRecord) -> bool:
    """Whether no console handler between the record's logger and the root has printed it already.

    A library that gives its logger a stream handler and lets it propagate (huggingface_hub does) would otherwise
    have every record printed twice: by its handler, then by the root's.
    """
    logger = logging.root.manager.loggerDict.get(record.name)
    while isinstance(logger, logging.Logger) and logger is not logging.root:
        if any(_prints_to_console(handler, record) for handler in logger.handlers):
            return False
        if not logger.propagate:
            break
        logger = logger.parent
    return True


def _prints_to_console(handler: logging.Handler, record: logging.LogRecord) -> bool:
    return (
        isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler | _CurrentStream)
        and record.levelno >= handler.level
    )


def not_redundant(record: logging.LogRecord) -> bool:
    """Whether a record is not one of REDUNDANT_RECORDS."""
    message = record.getMessage()
    return not any(part in message for part in REDUNDANT_RECORDS)


def quiet_library_progress_bars() -> None:
    """Turn off the progress bars transformers ("Loading weights", "Writing model shards"), datasets ("Generating
    train split") and huggingface_hub draw on stderr, where a failed run leaves its one error line; the run logs
    what it loads and converts on stdout, and Lightning's training bar (stdout) stays."""
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def route_logging() -> None:
    """Progress messages (below WARNING) to stdout, warnings and errors to stderr, without libraries' progress bars
    and redundant records; once per process.

    Lightning gave its loggers their own stderr handlers when it was imported (the root logger had none yet):
    they now propagate to the root handlers instead, as Lightning does when the root logger is configured first.
    Other libraries (huggingface_hub, torchmetrics) keep their own console handlers, which may be added after this
    runs: the root handlers skip a record one of those has already printed (`not_yet_printed`).
    """
    for message in REDUNDANT_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    quiet_library_progress_bars()
    root = logging.getLogger()
    if not any(isinstance(handler, _CurrentStream) for handler in root.handlers):
        progress, problems = _CurrentStream("stdout"), _CurrentStream("stderr")
        progress.addFilter(lambda record: record.levelno < logging.WARNING)
        problems.setLevel(logging.WARNING)
        for handler in (progress, problems):
            handler.addFilter(not_yet_printed)
            handler.addFilter(not_redundant)
            handler.setFormatter(logging.Formatter("%(message)s"))
            root.addHandler(handler)
        root.setLevel(logging.INFO)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


class Interrupted(BaseException):
    """Ctrl-C, as the handler of `ctrl_c_as_one_line` raises it: not a KeyboardInterrupt, which Lightning answers
    with a line of its own and status 1 (and which code catching Exception would not catch either)."""


@contextmanager
def ctrl_c_as_one_line(debug: bool, prog: str = "distillens") -> Iterator[None]:
    """Ctrl-C outside fit's steps (loading models, tokenising, or a second Ctrl-C in fit) ends the program with one
    line on stderr and status 130 (128 + SIGINT), without a traceback (``debug``: with it). During fit's steps,
    the first Ctrl-C is `callbacks.CheckpointOnInterrupt`'s: it saves a checkpoint, then restores this handler.
    A SIGINT the shell told the process to ignore (a background job) stays ignored."""

    def interrupt(signum, frame) -> None:
        raise Interrupted

    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not (
        signal.SIG_IGN
    ):
        previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    except (Interrupted, KeyboardInterrupt):
        if debug:
            raise
        print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
