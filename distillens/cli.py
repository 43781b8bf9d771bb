"""The `distillens` console entry point: fit, validate and test through LightningCLI (distillens/lightning_cli.py),
export and diagnose (distillens/commands.py); bad input is one line on stderr (distillens/console.py).

Only the standard library and the console helpers load before the checks that need nothing else (config files
that are missing, not UTF-8 or not YAML) and before the Ctrl-C handler is in place: a mistyped path answers in a
fraction of a second, and Ctrl-C while Lightning, transformers or PEFT import ends in one line. Each command then
imports what it needs: export and diagnose do without Lightning's CLI.
"""

from __future__ import annotations

import sys

from distillens.allocator import keep_freed_memory
from distillens.console import (
    DEBUG_FLAG,
    check_config_files,
    ctrl_c_as_one_line,
    debug_requested,
    route_logging,
    user_errors_as_one_line,
)

COMMAND_NAMES = ("export", "diagnose")
"""The commands beside LightningCLI's (the keys of distillens.commands.COMMANDS, named here so that choosing one
imports nothing)."""
TEACH = ("teach", ["--model.teacher_targets.build_only", "true"])
"""`distillens teach ...` is `distillens fit ...` that builds the teacher cache and stops before the first step."""


def main(args: list[str] | None = None) -> None:
    """Console entry point."""
    from_command_line = args is None
    args = list(sys.argv[1:] if from_command_line else args)
    debug = debug_requested(args)
    args = [a for a in args if a != DEBUG_FLAG]
    if args[:1] == [TEACH[0]]:
        args = ["fit", *args[1:], *TEACH[1]]
    if from_command_line:
        sys.argv = sys.argv[:1] + args  # LightningCLI reads sys.argv itself
    with ctrl_c_as_one_line(debug), user_errors_as_one_line(debug):
        check_config_files(args)
        route_logging()
        keep_freed_memory()  # steps reuse freed host memory instead of faulting in fresh pages (allocator.py)
        if args[:1] and args[0] in COMMAND_NAMES:
            from distillens.commands import run_command

            run_command(args[0], args[1:])
        else:
            from distillens.lightning_cli import run_cli

            run_cli(None if from_command_line else args)


if __name__ == "__main__":
    main()
