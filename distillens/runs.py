"""Where a run's files go, so that launches never write over each other's files unless asked to.

- ``--trainer.default_root_dir DIR`` is the root of everything a run writes: the TensorBoard logger's ``save_dir``
  follows it, and checkpoints, ``eval/`` and the exported ``student/`` live in the logger's folder
  ``DIR/<name>/<version>``. Without it, the config's ``save_dir`` (``logs``) is the root.
- ``validate`` and ``test`` log into a subfolder of the run of their own, ``<stage>-<k>``: written into the fit's
  folder at step 0, their points would make TensorBoard drop the fit's later ones as out of order. Their
  ``config.yaml`` and ``eval/`` go there too; ``--ckpt_path last`` still finds the fit's ``checkpoints/``.
- A fresh ``fit`` (no ``--ckpt_path``) refuses a folder that already holds checkpoints: the new run's ``last.ckpt``
  would replace the earlier run's. Resuming (``--ckpt_path``) is how to ask for the same folder.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"
EVALUATION_STAGES = ("validate", "test")


def logger_configs(trainer_config: Any) -> list[Any]:
    """The parsed ``trainer.logger`` entries that are classes with arguments (not ``true``/``false``)."""
    loggers = trainer_config.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    return [logger for logger in loggers if hasattr(logger, "init_args") and logger.init_args is not None]


def place_run(trainer_config: Any, stage: str) -> None:
    """Re-root the loggers under ``default_root_dir`` and give an evaluation launch its own subfolder (in place)."""
    root = trainer_config.get("default_root_dir")
    for logger in logger_configs(trainer_config):
        arguments = logger.init_args
        if root is not None and "save_dir" in arguments:
            arguments.save_dir = str(root)
        if stage in EVALUATION_STAGES and logger.class_path == TENSORBOARD and not arguments.get("sub_dir"):
            folder = run_folder(arguments)
            if folder is not None:  # version None: a new version_<n> folder per launch already
                arguments.sub_dir = next_launch_folder(folder, stage)


def run_folder(arguments: Any) -> Path | None:
    """``save_dir/name/version`` of a logger with a fixed version; None when each launch gets a new version."""
    version = arguments.get("version")
    if version is None:
        return None
    version = version if isinstance(version, str) else f"version_{version}"
    return Path(arguments.save_dir) / (arguments.get("name") or "") / version


def next_launch_folder(folder: Path, stage: str) -> str:
    """``<stage>-<k>`` with the smallest k not yet taken in the run folder."""
    return next(f"{stage}-{k}" for k in itertools.count() if not (folder / f"{stage}-{k}").exists())


def check_fresh_run(checkpoint_folders: list[Path]) -> None:
    """A new run must not write its checkpoints over an earlier run's."""
    for folder in checkpoint_folders:
        earlier = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
        if earlier:
            run = folder.parent
            raise ValueError(
                f"{run} already holds a run ({len(earlier)} checkpoint(s) in {folder}): continue it with "
                "--ckpt_path last, or start this one elsewhere with --trainer.default_root_dir DIR (or delete "
                f"{run})"
            )
