"""`distillens export` and `distillens diagnose`, the commands beside LightningCLI's fit, validate and test.

Each one's parser is built by jsonargparse from a function's signature and docstring, as LightningCLI builds its
own from the classes: a default or a help text lives in the function alone. The spellings of the earlier argparse
parsers (``--max-samples``, a bare ``--adapter-only``) are still accepted, as jsonargparse's ``--max_samples`` and
``--adapter_only true``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from docstring_parser import parse as parse_docstring
from jsonargparse import ArgumentParser

from distillens.console import route_logging

BOOLEAN_VALUES = ("true", "false", "yes", "no")


@dataclass(frozen=True)
class Command:
    """A function run from the command line (``module:function``, imported when the command runs, so that one
    command does not load what another needs), the line printed with what it returns, and whether its required
    parameters are positionals (``export CHECKPOINT OUT``) or required options (``--teacher SPEC``)."""

    target: str
    done: str
    positional: bool

    @property
    def function(self) -> Callable:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)

    @property
    def summary(self) -> str:
        """The first line of the function's docstring: the command's entry in `distillens --help`."""
        return parse_docstring(self.function.__doc__ or "").short_description or ""


COMMANDS = {
    "export": Command("distillens.export:export_checkpoint", "student exported to {}", positional=True),
    "diagnose": Command(
        "distillens.diagnose:diagnose", "lens diagnostics written to {} and {}", positional=False
    ),
}


def command_parser(name: str) -> ArgumentParser:
    """jsonargparse's parser of a command: its function's parameters, each documented by the docstring's Args
    section."""
    command = COMMANDS[name]
    parser = ArgumentParser(prog=f"distillens {name}", description=command.summary, exit_on_error=False)
    parser.add_function_arguments(command.function, as_positional=command.positional)
    return parser


def run_command(name: str, args: list[str]) -> None:
    """Parse ``args`` for command ``name``, run it and print what it wrote."""
    function = COMMANDS[name].function
    route_logging()  # again, in case importing the command loaded Lightning (its logger's own stderr handler)
    options = command_parser(name).parse_args(earlier_spellings(args, function))
    result = function(**options.as_dict())
    print(COMMANDS[name].done.format(*(result if isinstance(result, tuple) else (result,))))


def earlier_spellings(args: list[str], function: Callable) -> list[str]:
    """``args`` with the argparse spellings of ``function``'s options in jsonargparse's: dashes in an option's
    name become underscores, and a boolean option given bare (a flag) gets the value true."""
    parameters = inspect.signature(function).parameters
    spelled: list[str] = []
    for index, arg in enumerate(args):
        name, equals, value = arg.partition("=")
        key = name[2:].replace("-", "_") if name.startswith("--") else ""
        if key not in parameters:
            spelled.append(arg)
            continue
        spelled.append(f"--{key}{equals}{value}")
        following = args[index + 1] if index + 1 < len(args) else ""
        if (
            isinstance(parameters[key].default, bool)
            and not equals
            and following.lower() not in BOOLEAN_VALUES
        ):
            spelled.append("true")
    return spelled
